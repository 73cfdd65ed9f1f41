//! Without aiosmtpd, `SmtpServer::start` panics and says what to install.
//!
//! The interpreter is chosen by an environment variable, which a test
//! cannot set for itself without affecting the tests running beside it;
//! so each case re-runs this test binary as a child with the variable set.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use school_testkit::SmtpServer;

/// In the child: start a server, which must panic.
fn child_starts_a_server() -> bool {
    if std::env::var_os("EVENTOS_SMTP_PYTHON").is_some() {
        let _server = SmtpServer::start();
        return true;
    }
    false
}

/// Runs `test` in a child with `EVENTOS_SMTP_PYTHON=python`; returns its
/// output, asserting it failed.
fn run_child(test: &str, python: &Path) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("EVENTOS_SMTP_PYTHON", python)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "the child should fail: {text}");
    text
}

#[test]
fn start_without_aiosmtpd_says_to_install_it() {
    if child_starts_a_server() {
        return;
    }
    let test = "start_without_aiosmtpd_says_to_install_it";
    let text = run_child(test, Path::new("/nonexistent/python3"));
    assert!(text.contains("install python3-aiosmtpd"), "{text}");

    // A stand-in interpreter that fails the way Python does without the
    // module. (One test, not two: a child spawned by a parallel test could
    // inherit the script's descriptor while it is written, and exec would
    // then fail with "text file busy".)
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("python3");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"$0: No module named aiosmtpd\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = run_child(test, &fake);
    assert!(text.contains("install python3-aiosmtpd"), "{text}");
}
