//! A per-test scratch directory for configs, keys and logs.

use std::path::{Path, PathBuf};

use crate::unique_name;

/// A directory under the system temp dir, `ml<pid>d<n>-<tag>`, removed on drop unless the test
/// is panicking: then it is kept, and its path printed, for inspection.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates the directory; `tag` (e.g. the test's name) makes it recognisable.
    ///
    /// # Panics
    /// When it cannot be created.
    pub fn create(tag: &str) -> ScratchDir {
        let path = std::env::temp_dir().join(format!("{}-{tag}", unique_name("d")));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        ScratchDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept scratch directory {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
