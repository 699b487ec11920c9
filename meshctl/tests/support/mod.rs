//! A fake coordinator for tests: a thread on 127.0.0.1 that answers each connection with the
//! next canned response and records what it was sent.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

/// One request as the fake coordinator received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Recorded {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A canned answer.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub body: String,
}

impl Canned {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
        }
    }
}

/// The running fake; it serves one connection per canned answer, then its thread ends.
pub struct FakeCoordinator {
    addr: SocketAddr,
    received: Receiver<Recorded>,
}

impl FakeCoordinator {
    pub fn start(answers: Vec<Canned>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake coordinator");
        let addr = listener.local_addr().unwrap();
        let (sender, received) = mpsc::channel();
        thread::spawn(move || {
            for answer in answers {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                if let Some(request) = serve(stream, &answer) {
                    if sender.send(request).is_err() {
                        return;
                    }
                }
            }
        });
        Self { addr, received }
    }

    /// The base URL to give the client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next request received, waiting a few seconds for it.
    pub fn request(&self) -> Recorded {
        self.received
            .recv_timeout(Duration::from_secs(10))
            .expect("the fake coordinator received no request")
    }

    /// Whether no request arrived (checked after the client is done with its call).
    pub fn received_nothing(&self) -> bool {
        self.received
            .recv_timeout(Duration::from_millis(200))
            .is_err()
    }
}

/// How a [`Mute`] coordinator treats a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Reads the request, then closes the connection without a word.
    HangUp,
    /// Reads the request and never answers (the connection stays open).
    Stall,
}

/// A coordinator that accepts connections and reads requests but never answers them: a
/// request sent to it was delivered, and its outcome is unknown to the client.
pub struct Mute {
    addr: SocketAddr,
    received: Receiver<String>,
}

impl Mute {
    pub fn start(silence: Silence) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the mute coordinator");
        let addr = listener.local_addr().unwrap();
        let (sender, received) = mpsc::channel();
        thread::spawn(move || {
            let mut open = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let Some(line) = read_head(&stream) else {
                    continue;
                };
                let _ = sender.send(line);
                match silence {
                    Silence::HangUp => drop(stream),
                    Silence::Stall => open.push(stream),
                }
            }
        });
        Self { addr, received }
    }

    /// The base URL to give the client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request line of the next request received.
    pub fn request_line(&self) -> String {
        self.received
            .recv_timeout(Duration::from_secs(10))
            .expect("the mute coordinator received no request")
    }
}

/// Reads a request's head (up to the empty line); returns its first line.
fn read_head(stream: &TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    Some(first.trim_end().to_owned())
}

/// Reads one request from `stream` and writes `answer`.
fn serve(stream: TcpStream, answer: &Canned) -> Option<Recorded> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let reason = match answer.status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Internal Server Error",
    };
    let mut writer = stream;
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        answer.status,
        if answer.status == 204 {
            0
        } else {
            answer.body.len()
        },
    );
    writer.write_all(head.as_bytes()).ok()?;
    if answer.status != 204 {
        writer.write_all(answer.body.as_bytes()).ok()?;
    }
    writer.flush().ok()?;
    Some(Recorded {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A URL on which nothing listens: a port that was just bound and released.
pub fn closed_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Runs the built `meshctl` with a clean environment, the fake's URL and an inline admin token.
pub fn meshctl(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_clear()
        .env("MESHLINK_COORDINATOR", url)
        .env("MESHLINK_ADMIN_TOKEN", "cli-secret")
        .args(args)
        .output()
        .expect("run meshctl")
}

/// A command's stdout as text.
pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// A command's stderr as text.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}
