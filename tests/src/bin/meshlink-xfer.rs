//! `meshlink-xfer`: a TCP bulk sender and receiver that each report the SHA-256 of the bytes
//! they moved, so a test can prove that a transfer through a tunnel arrived intact.
//!
//! The namespace tests run it on both ends of a tunnel with `ip netns exec`. It is a Rust binary
//! of this crate rather than a `nc`/`python3` one-liner so that the test-bed needs nothing
//! beyond iproute2 and what Cargo builds: `nc` is not on a fresh Debian, and its flavours
//! disagree on flags.
//!
//! ```text
//! meshlink-xfer recv --listen ADDR:PORT [--timeout SECS] [--idle SECS]
//! meshlink-xfer send --connect ADDR:PORT --bytes N [--rate-mbit R] [--seed S] [--timeout SECS] [--idle SECS]
//! ```
//!
//! Output contract (stdout, one line each):
//! - `recv` prints `listening ADDR:PORT` once the socket is bound, then, after the sender
//!   closes, `done bytes=N sha256=HEX secs=F`.
//! - `send` prints `done bytes=N sha256=HEX secs=F` after the receiver has closed its end,
//!   which it does only after reading everything: a zero exit means the bytes arrived.
//!
//! Errors go to stderr and give exit status 1; bad arguments give exit status 2. `--timeout`
//! bounds the whole run (default 120 s) and `--idle` how long the data may stall (default
//! 30 s), so a broken tunnel fails a test instead of hanging it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Bytes moved per read or write call.
const CHUNK: usize = 256 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match Args::parse(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("meshlink-xfer: {message}");
            eprintln!("usage: meshlink-xfer recv --listen ADDR:PORT | send --connect ADDR:PORT --bytes N [--rate-mbit R] [--seed S] [--timeout S] [--idle S]");
            return ExitCode::from(2);
        }
    };
    let result = match parsed.mode {
        Mode::Recv => receive(&parsed),
        Mode::Send => send(&parsed),
    };
    match result {
        Ok(summary) => {
            println!(
                "done bytes={} sha256={} secs={:.3}",
                summary.bytes, summary.sha256, summary.secs
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("meshlink-xfer: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Mode {
    Recv,
    Send,
}

/// The command line, checked.
struct Args {
    mode: Mode,
    addr: SocketAddr,
    bytes: u64,
    rate_mbit: Option<f64>,
    seed: u64,
    timeout: Duration,
    idle: Duration,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let (mode, rest) = match args.split_first() {
            Some((m, rest)) if m == "recv" => (Mode::Recv, rest),
            Some((m, rest)) if m == "send" => (Mode::Send, rest),
            _ => return Err("first argument must be `recv` or `send`".into()),
        };
        let mut addr = None;
        let mut bytes = None;
        let mut rate_mbit = None;
        let mut seed = None;
        let mut timeout = Duration::from_secs(120);
        let mut idle = Duration::from_secs(30);
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--listen" | "--connect" => addr = Some(value.parse().map_err(|e| bad(&e))?),
                "--bytes" => bytes = Some(value.parse().map_err(|e| bad(&e))?),
                "--rate-mbit" => rate_mbit = Some(value.parse().map_err(|e| bad(&e))?),
                "--seed" => seed = Some(value.parse().map_err(|e| bad(&e))?),
                "--timeout" => timeout = secs(value).map_err(|e| bad(&e))?,
                "--idle" => idle = secs(value).map_err(|e| bad(&e))?,
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        let addr = addr.ok_or("--listen or --connect is required")?;
        let bytes = match mode {
            Mode::Send => bytes.ok_or("send needs --bytes")?,
            Mode::Recv => 0,
        };
        if rate_mbit.is_some_and(|r: f64| r.is_nan() || r <= 0.0) {
            return Err("--rate-mbit must be positive".into());
        }
        let seed = seed.unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        });
        Ok(Args {
            mode,
            addr,
            bytes,
            rate_mbit,
            seed,
            timeout,
            idle,
        })
    }
}

fn secs(value: &str) -> Result<Duration, std::num::ParseFloatError> {
    value.parse::<f64>().map(Duration::from_secs_f64)
}

/// What one side moved.
struct Summary {
    bytes: u64,
    sha256: String,
    secs: f64,
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn receive(args: &Args) -> Result<Summary, String> {
    let deadline = Instant::now() + args.timeout;
    let listener = TcpListener::bind(args.addr).map_err(|e| format!("bind {}: {e}", args.addr))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {local}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;

    // std has no accept timeout: poll a non-blocking listener until the deadline.
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!("no connection within {:?}", args.timeout));
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let started = Instant::now();
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(args.idle))
        .map_err(|e| e.to_string())?;

    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "stalled: no data for {:?} after {total} bytes",
                    args.idle
                ));
            }
            Err(e) => return Err(format!("read after {total} bytes: {e}")),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not finished within {:?} ({total} bytes)",
                args.timeout
            ));
        }
    }
    // Closing our end is the sender's acknowledgement that everything arrived.
    let _ = stream.shutdown(Shutdown::Both);
    Ok(Summary {
        bytes: total,
        sha256: hex(&hasher.finalize()),
        secs: started.elapsed().as_secs_f64(),
    })
}

fn send(args: &Args) -> Result<Summary, String> {
    let deadline = Instant::now() + args.timeout;
    // The tunnel may still be handshaking: retry the connection until the deadline.
    let mut stream = loop {
        match TcpStream::connect_timeout(&args.addr, Duration::from_secs(2)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                eprintln!("meshlink-xfer: connect {}: {e}; retrying", args.addr);
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("connect {}: {e}", args.addr)),
        }
    };
    stream
        .set_write_timeout(Some(args.idle))
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(args.idle))
        .map_err(|e| e.to_string())?;

    let started = Instant::now();
    let mut rng = XorShift64Star::new(args.seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < args.bytes {
        let n = usize::try_from(args.bytes - sent).map_or(CHUNK, |left| left.min(CHUNK));
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        stream
            .write_all(&buf[..n])
            .map_err(|e| format!("write after {sent} bytes: {e}"))?;
        sent += n as u64;
        if Instant::now() >= deadline {
            return Err(format!(
                "not finished within {:?} ({sent} bytes)",
                args.timeout
            ));
        }
        if let Some(rate) = args.rate_mbit {
            // Pace to the requested rate: sleep until the schedule catches up with us.
            let due = Duration::from_secs_f64(sent as f64 * 8.0 / (rate * 1e6));
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                thread::sleep(ahead);
            }
        }
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    // Wait for the receiver to close: it does so only after reading to our end of stream.
    let mut rest = [0u8; 64];
    loop {
        match stream.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("waiting for the receiver to close: {e}")),
        }
    }
    Ok(Summary {
        bytes: sent,
        sha256: hex(&hasher.finalize()),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// A small, fast pseudo-random generator (xorshift64*): the payload only has to be
/// incompressible-looking and different per run, not secret.
struct XorShift64Star(u64);

impl XorShift64Star {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; any other value works.
        XorShift64Star(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}
