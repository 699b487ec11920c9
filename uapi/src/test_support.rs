//! A stand-in server for the tests of userspace API clients (this crate's, `meshctl`'s): one
//! connection, one scripted reply. Built for tests only (the `test-support` feature).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;

/// Listens on `path` and serves one connection on a thread: reads the request up to its empty
/// line, then writes `reply`, or with `None` stays silent until the client leaves. Joining the
/// handle gives the request as received, its empty line included.
///
/// # Panics
/// When `path` cannot be bound; the thread panics when accepting or reading fails or the
/// request is not UTF-8.
pub fn serve_once(path: &Path, reply: Option<&[u8]>) -> thread::JoinHandle<String> {
    let listener = UnixListener::bind(path).unwrap();
    let reply = reply.map(<[u8]>::to_vec);
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\n\n") && stream.read(&mut byte).unwrap() == 1 {
            request.push(byte[0]);
        }
        match reply {
            // A client may leave before reading all of a reply it finds too long.
            Some(reply) => drop(stream.write_all(&reply)),
            None => while stream.read(&mut byte).unwrap_or(0) == 1 {},
        }
        String::from_utf8(request).unwrap()
    })
}
