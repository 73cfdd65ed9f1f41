//! Searching what a run left on disk for text that must not be there.

use std::path::Path;

/// Every file under `dir` (recursively) that holds one of `needles`, as
/// `"<path> holds <needle>"` lines. Files are read as bytes, so databases,
/// logs and segments are searched alike. A file that goes between the
/// listing and the read (a mail moved out of a server's `tmp/`, a
/// database's `-shm` removed on close) is skipped.
///
/// # Panics
///
/// If `dir` cannot be listed or a file that exists cannot be read.
pub fn files_containing(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    scan(dir, needles, &mut found);
    found
}

fn scan(dir: &Path, needles: &[&str], found: &mut Vec<String>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, needles, found);
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        };
        let text = String::from_utf8_lossy(&bytes);
        for needle in needles {
            if text.contains(needle) {
                found.push(format!("{} holds {needle}", path.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_needles_in_nested_files_only_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/x.db"), b"\0\x01card 4242424242424242\0").unwrap();
        std::fs::write(dir.path().join("y.log"), "nothing here").unwrap();
        let found = files_containing(dir.path(), &["4242424242424242", "0002"]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].ends_with("x.db holds 4242424242424242"),
            "{found:?}"
        );
    }
}
