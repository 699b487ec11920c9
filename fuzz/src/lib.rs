//! Helpers shared by the fuzz targets in `fuzz_targets/` (one binary each, see `README.md`).
//!
//! Nothing here is fuzzed: it builds the fixtures the targets feed their inputs through.

use std::path::PathBuf;

/// A directory of this process for files a target writes (a configuration file to load), made
/// once and removed by nobody: one per process id, holding a few small files, in `/dev/shm`
/// where there is one (a file rewritten on every run on a disk file system costs a flush each
/// time: ext4 flushes a file truncated and written again), else the temporary directory.
///
/// # Panics
/// When the directory cannot be made: the target cannot run without it.
pub fn scratch_dir(target: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("meshlink-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the fuzz scratch directory");
    dir
}

/// Writes `bytes` to `path` with mode 0600 (what a key file or a wg-quick file must have).
///
/// # Panics
/// When the file cannot be written.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("writing a fuzz fixture file");
    f.write_all(bytes).expect("writing a fuzz fixture file");
}

/// The X25519 public key of a private key (clamped as X25519 clamps).
pub fn public_of(private: [u8; 32]) -> [u8; 32] {
    let s = x25519_dalek::StaticSecret::from(private);
    *x25519_dalek::PublicKey::from(&s).as_bytes()
}

/// Chunk lengths for feeding a stream in pieces: `pattern` 0 means the whole stream at once,
/// anything else a repeatable sequence of lengths 1..=24 drawn from it.
pub fn chunks(pattern: u8, mut stream: &[u8]) -> Vec<&[u8]> {
    if pattern == 0 {
        return vec![stream];
    }
    let mut out = Vec::new();
    let mut s = pattern;
    while !stream.is_empty() {
        s = s.wrapping_mul(33).wrapping_add(7);
        let n = (1 + usize::from(s) % 24).min(stream.len());
        let (head, tail) = stream.split_at(n);
        out.push(head);
        stream = tail;
    }
    out
}
