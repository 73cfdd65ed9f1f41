//! A small filesystem to fill: the disk-full tests mount a tmpfs of a few
//! megabytes, fill it with a file, and free it, against the real kernel's
//! `ENOSPC` rather than a simulated one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
#[derive(Debug)]
pub struct TinyFs {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

impl TinyFs {
    /// Mounts a tmpfs of `bytes` (rounded up to pages by the kernel).
    ///
    /// Mounting needs root. Without it the test cannot run: in CI
    /// (`EVENTOS_CI` set) that is a failure; elsewhere `None`, after saying
    /// so on stderr, so a developer without root is not blocked by it.
    ///
    /// # Panics
    ///
    /// When mounting fails in CI, or fails for any reason as root.
    pub fn mount(bytes: u64) -> Option<Self> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !root {
            assert!(
                std::env::var_os("EVENTOS_CI").is_none(),
                "the disk-full tests mount a tmpfs and need root, which CI has"
            );
            eprintln!("skipped: mounting a tmpfs needs root (CI runs it)");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).expect("a mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("tmpfs")
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            mount.display()
        );
        Some(Self { dir, mount })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    fn filler(&self) -> PathBuf {
        self.mount.join("filler")
    }

    /// Fills what is left with one file, to the last byte it takes.
    pub fn fill(&self) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .expect("create the filler");
        for size in [1 << 16, 4096, 512, 1] {
            let chunk = vec![0u8; size];
            while file.write_all(&chunk).is_ok() {}
        }
    }

    /// Gives back `bytes` of what [`TinyFs::fill`] took: a disk nearly
    /// full, where some writes fit and others do not.
    pub fn release(&self, bytes: u64) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.filler())
            .expect("open the filler");
        let len = file.metadata().expect("the filler's size").len();
        file.set_len(len.saturating_sub(bytes))
            .expect("shrink the filler");
    }

    /// Frees what [`TinyFs::fill`] took.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        // Lazily: a process under test may still hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = &self.dir;
    }
}
