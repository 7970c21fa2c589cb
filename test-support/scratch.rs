//! A test's scratch folder under the temp dir, removed when the test ends (kept when it fails,
//! to be looked at). Included with `#[path]` by the test binaries that need one.

use std::path::{Path, PathBuf};

/// A scratch folder; the folder goes when this is dropped, unless the thread is panicking.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// An empty folder `<temp>/<prefix>-<pid>-<name>` (an old one of that name is removed).
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
