//! `meshlink-xfer`: a TCP bulk sender and receiver that each report the SHA-256 of the bytes
//! they moved, so a test can prove that a transfer through a tunnel arrived intact; and a
//! bulk server that can move between nodes in a live migration with its clients'
//! connections, with the client that measures it.
//!
//! The namespace tests run it on both ends of a tunnel with `ip netns exec`. It is a Rust binary
//! of this crate rather than a `nc`/`python3` one-liner so that the test-bed needs nothing
//! beyond iproute2 and what Cargo builds: `nc` is not on a fresh Debian, and its flavours
//! disagree on flags.
//!
//! ```text
//! meshlink-xfer recv --listen ADDR:PORT [--timeout SECS] [--idle SECS]
//! meshlink-xfer send --connect ADDR:PORT --bytes N [--rate-mbit R] [--seed S] [--timeout SECS] [--idle SECS]
//! meshlink-xfer serve --listen ADDR:PORT --bytes N [--seed S] [--rate-mbit R] [--idle SECS]
//!                     [--migrate WORKLOAD [--agent-socket PATH] [--handover-port P]]
//! meshlink-xfer fetch --connect ADDR:PORT [--bin-ms MS] [--timeout SECS] [--idle SECS]
//! meshlink-xfer expect --bytes N [--seed S]
//! ```
//!
//! Output contract (stdout, one line each):
//! - `recv` prints `listening ADDR:PORT` once the socket is bound, then, after the sender
//!   closes, `done bytes=N sha256=HEX secs=F`.
//! - `send` prints `done bytes=N sha256=HEX secs=F` after the receiver has closed its end,
//!   which it does only after reading everything: a zero exit means the bytes arrived.
//! - `serve` prints `listening ADDR:PORT` once the socket is bound, then for every client it
//!   took to the end (here, or after a migration brought it here) `served peer=ADDR:PORT
//!   bytes=N secs=F` (`secs`: since it was accepted or arrived here). It sends each client the
//!   first N bytes of the seed's pattern, half-closes, waits up to `--idle` for the client to
//!   close, and runs until SIGINT or SIGTERM (status 0). With `--migrate` it takes part in the
//!   workload's live migrations (`meshlink_tcp_migrate::handover`: each connection's offset
//!   travels with its socket) and logs every step as a `migrate: ` line on stderr, as the chat
//!   server does.
//! - `fetch` reads to the end of the stream and prints `done bytes=N sha256=HEX secs=F
//!   longest_stall_ms=F bins=R1,R2,...`: `secs` from the connection to the end, the longest
//!   time between two reads that brought data, and the rate of each `--bin-ms` interval from
//!   the connection in Mbit/s (the last one over its own length).
//! - `expect` prints `bytes=N sha256=HEX`: the sum of the first N bytes of the pattern of
//!   seed S, what `send --seed S`, `serve --seed S` and the receiving ends report.
//!
//! The pattern is xorshift64* from the seed, each output little-endian. `send` picks a random
//! seed when none is given; `serve` and `expect` take 1, so that their sums agree.
//!
//! Errors go to stderr and give exit status 1; bad arguments give exit status 2. `--timeout`
//! bounds the whole run (default 120 s) and `--idle` how long the data may stall (default
//! 30 s), so a broken tunnel fails a test instead of hanging it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

// The modules live beside this file (a directory without main.rs, so Cargo takes it for no
// binary of its own).
#[path = "meshlink-xfer/fetch.rs"]
mod fetch;
#[path = "meshlink-xfer/pattern.rs"]
mod pattern;
#[path = "meshlink-xfer/serve.rs"]
mod serve;

use pattern::{Pattern, XorShift64Star};

/// Bytes moved per read or write call.
const CHUNK: usize = 256 * 1024;
/// The seed of `serve` and `expect` when none is given.
const DEFAULT_SERVE_SEED: u64 = 1;
/// Where the agent serves its userspace API by default (its default interface, mesh0).
const DEFAULT_AGENT_SOCKET: &str = "/var/run/wireguard/mesh0.sock";
/// The port handovers arrive on and are sent to by default.
const DEFAULT_HANDOVER_PORT: u16 = 7071;

const USAGE: &str = "usage: meshlink-xfer recv --listen ADDR:PORT [--timeout S] [--idle S]
       meshlink-xfer send --connect ADDR:PORT --bytes N [--rate-mbit R] [--seed S] [--timeout S] [--idle S]
       meshlink-xfer serve --listen ADDR:PORT --bytes N [--seed S] [--rate-mbit R] [--idle S] [--migrate WORKLOAD [--agent-socket PATH] [--handover-port P]]
       meshlink-xfer fetch --connect ADDR:PORT [--bin-ms MS] [--timeout S] [--idle S]
       meshlink-xfer expect --bytes N [--seed S]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match Args::parse(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("meshlink-xfer: {message}");
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match parsed.mode {
        Mode::Recv => receive(&parsed).map(|s| s.line()),
        Mode::Send => send(&parsed).map(|s| s.line()),
        Mode::Fetch => fetch::run(&parsed).map(|f| f.line()),
        Mode::Expect => Ok(format!(
            "bytes={} sha256={}",
            parsed.bytes,
            expected_sha256(parsed.bytes, parsed.seed)
        )),
        Mode::Serve => serve::run(&parsed).map(|()| String::new()),
    };
    match result {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("meshlink-xfer: {message}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Recv,
    Send,
    Serve,
    Fetch,
    Expect,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Recv => "recv",
            Mode::Send => "send",
            Mode::Serve => "serve",
            Mode::Fetch => "fetch",
            Mode::Expect => "expect",
        }
    }

    /// The flags the mode takes.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::Recv => &["--listen", "--timeout", "--idle"],
            Mode::Send => &[
                "--connect",
                "--bytes",
                "--rate-mbit",
                "--seed",
                "--timeout",
                "--idle",
            ],
            Mode::Serve => &[
                "--listen",
                "--bytes",
                "--seed",
                "--rate-mbit",
                "--idle",
                "--migrate",
                "--agent-socket",
                "--handover-port",
            ],
            Mode::Fetch => &["--connect", "--bin-ms", "--timeout", "--idle"],
            Mode::Expect => &["--bytes", "--seed"],
        }
    }
}

/// `serve --migrate`'s settings.
#[derive(Debug, Clone, PartialEq)]
struct Migrate {
    workload: String,
    agent_socket: PathBuf,
    handover_port: u16,
}

/// The command line, checked.
#[derive(Debug)]
struct Args {
    mode: Mode,
    /// `--listen` or `--connect` (unused by `expect`).
    addr: SocketAddr,
    bytes: u64,
    rate_mbit: Option<f64>,
    seed: u64,
    timeout: Duration,
    idle: Duration,
    bin: Duration,
    migrate: Option<Migrate>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let (mode, rest) = match args.split_first().map(|(m, rest)| (m.as_str(), rest)) {
            Some(("recv", rest)) => (Mode::Recv, rest),
            Some(("send", rest)) => (Mode::Send, rest),
            Some(("serve", rest)) => (Mode::Serve, rest),
            Some(("fetch", rest)) => (Mode::Fetch, rest),
            Some(("expect", rest)) => (Mode::Expect, rest),
            _ => {
                return Err(
                    "first argument must be `recv`, `send`, `serve`, `fetch` or `expect`".into(),
                )
            }
        };
        let mut addr = None;
        let mut bytes = None;
        let mut rate_mbit = None;
        let mut seed = None;
        let mut timeout = Duration::from_secs(120);
        let mut idle = Duration::from_secs(30);
        let mut bin = Duration::from_millis(100);
        let mut workload = None;
        let mut agent_socket = None;
        let mut handover_port = None;
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            if !mode.flags().contains(&flag.as_str()) {
                return Err(format!("{} does not take {flag}", mode.name()));
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--listen" | "--connect" => addr = Some(value.parse().map_err(|e| bad(&e))?),
                "--bytes" => bytes = Some(value.parse().map_err(|e| bad(&e))?),
                "--rate-mbit" => rate_mbit = Some(value.parse().map_err(|e| bad(&e))?),
                "--seed" => seed = Some(value.parse().map_err(|e| bad(&e))?),
                "--timeout" => timeout = secs(value).map_err(|e| bad(&e))?,
                "--idle" => idle = secs(value).map_err(|e| bad(&e))?,
                "--bin-ms" => {
                    let ms: u64 = value.parse().map_err(|e| bad(&e))?;
                    if ms == 0 {
                        return Err(format!("{flag} must be at least 1"));
                    }
                    bin = Duration::from_millis(ms);
                }
                "--migrate" => {
                    if value.is_empty() {
                        return Err(format!("{flag} needs a workload name"));
                    }
                    workload = Some(value.clone());
                }
                "--agent-socket" => agent_socket = Some(PathBuf::from(value)),
                "--handover-port" => {
                    let port: u16 = value.parse().map_err(|e| bad(&e))?;
                    if port == 0 {
                        return Err(format!("{flag} must be a port, 1-65535"));
                    }
                    handover_port = Some(port);
                }
                _ => unreachable!("every flag a mode takes is handled"),
            }
        }
        let addr = match (mode, addr) {
            (Mode::Expect, _) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (Mode::Recv | Mode::Serve, None) => return Err("--listen is required".into()),
            (Mode::Send | Mode::Fetch, None) => return Err("--connect is required".into()),
            (_, Some(addr)) => addr,
        };
        let bytes = match (mode, bytes) {
            (Mode::Send | Mode::Serve | Mode::Expect, None) => {
                return Err(format!("{} needs --bytes", mode.name()))
            }
            (_, bytes) => bytes.unwrap_or(0),
        };
        if rate_mbit.is_some_and(|r: f64| r.is_nan() || r <= 0.0) {
            return Err("--rate-mbit must be positive".into());
        }
        let seed = match (mode, seed) {
            (_, Some(seed)) => seed,
            (Mode::Serve | Mode::Expect, None) => DEFAULT_SERVE_SEED,
            (_, None) => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                nanos ^ u64::from(std::process::id()).rotate_left(32)
            }
        };
        let migrate = match (workload, agent_socket, handover_port) {
            (Some(workload), socket, port) => Some(Migrate {
                workload,
                agent_socket: socket.unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET)),
                handover_port: port.unwrap_or(DEFAULT_HANDOVER_PORT),
            }),
            (None, None, None) => None,
            (None, _, _) => return Err("--agent-socket and --handover-port need --migrate".into()),
        };
        Ok(Args {
            mode,
            addr,
            bytes,
            rate_mbit,
            seed,
            timeout,
            idle,
            bin,
            migrate,
        })
    }
}

fn secs(value: &str) -> Result<Duration, String> {
    let secs: f64 = value.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// What one side moved.
#[derive(Debug)]
struct Summary {
    bytes: u64,
    sha256: String,
    secs: f64,
}

impl Summary {
    fn line(&self) -> String {
        format!(
            "done bytes={} sha256={} secs={:.3}",
            self.bytes, self.sha256, self.secs
        )
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the first `bytes` bytes of the pattern of `seed`.
fn expected_sha256(bytes: u64, seed: u64) -> String {
    let mut pattern = Pattern::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < bytes {
        let n = usize::try_from(bytes - done).map_or(CHUNK, |left| left.min(CHUNK));
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        pattern.advance(n as u64);
        done += n as u64;
    }
    hex(&hasher.finalize())
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

/// Connects to `addr`, trying again until `deadline` (the tunnel may still be handshaking).
fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, String> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() < deadline => {
                eprintln!("meshlink-xfer: connect {addr}: {e}; retrying");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    }
}

fn send(args: &Args) -> Result<Summary, String> {
    let deadline = Instant::now() + args.timeout;
    let mut stream = connect(args.addr, deadline)?;
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

#[cfg(test)]
mod tests {
    use super::fetch::Meter;
    use super::serve::{Bulk, Progress};
    use super::*;
    use meshlink_tcp_migrate::handover::Application;

    fn args(line: &str) -> Result<Args, String> {
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        Args::parse(&words)
    }

    /// What `send` writes: its generator over chunks of `chunk` bytes.
    fn sent(seed: u64, bytes: usize, chunk: usize) -> Vec<u8> {
        let mut rng = XorShift64Star::new(seed);
        let mut out = vec![0u8; bytes];
        for part in out.chunks_mut(chunk) {
            rng.fill(part);
        }
        out
    }

    #[test]
    fn the_pattern_goes_on_from_any_offset() {
        let want = sent(42, 1000, 64);
        // Stopped at offsets that are not multiples of 8, and carried on.
        let mut pattern = Pattern::new(42);
        let mut got = Vec::new();
        for step in [3usize, 13, 8, 1, 200, 775] {
            let mut buf = vec![0u8; step];
            pattern.fill(&mut buf);
            got.extend_from_slice(&buf);
            pattern.advance(step as u64);
        }
        assert_eq!(pattern.offset, 1000);
        assert_eq!(got, want);
    }

    #[test]
    fn expect_sums_what_send_sends() {
        for bytes in [0usize, 5, 4096, CHUNK + 3] {
            let data = sent(7, bytes, CHUNK);
            assert_eq!(
                expected_sha256(bytes as u64, 7),
                hex(&Sha256::digest(&data))
            );
        }
        assert_ne!(expected_sha256(64, 7), expected_sha256(64, 8));
    }

    #[test]
    fn progress_travels_and_bad_ones_are_named() {
        let mut pattern = Pattern::new(9);
        pattern.advance(12_345);
        let progress = Progress {
            total: 64 << 20,
            pattern,
            rate_bps: 100_000_000,
        };
        let bytes = Bulk::encode_session(&progress);
        assert_eq!(Bulk::decode_session(&bytes).unwrap(), progress);
        let error = |bytes: &[u8]| Bulk::decode_session(bytes).unwrap_err().to_string();
        assert_eq!(error(&bytes[..31]), "31 bytes, expected 32");
        let mut beyond = bytes.clone();
        beyond[8..16].copy_from_slice(&(65u64 << 20).to_be_bytes());
        assert_eq!(
            error(&beyond),
            "offset: 68157440 beyond the total of 67108864"
        );
        let mut stuck = bytes;
        stuck[16..24].fill(0);
        assert!(error(&stuck).starts_with("state: 0"));
        assert!(Bulk::decode_state(b"").is_ok());
        assert!(Bulk::decode_state(b"x").is_err());
    }

    #[test]
    fn bins_rate_each_interval_and_the_longest_stall_is_kept() {
        let ms = Duration::from_millis;
        let mut meter = Meter::new(ms(100));
        meter.arrived(ms(10), 1_250_000); // bin 0: 10 MB/s worth of 100 ms = 100 Mbit/s
        meter.arrived(ms(50), 0);
        meter.arrived(ms(320), 625_000); // bins 1 and 2 empty; a stall of 270 ms
        meter.arrived(ms(340), 625_000);
        let rates = meter.rates(ms(350));
        assert_eq!(rates.len(), 4);
        assert!((rates[0] - 100.0).abs() < 1e-9, "{rates:?}");
        assert_eq!((rates[1], rates[2]), (0.0, 0.0));
        // The last bin counts over its 50 ms only.
        assert!((rates[3] - 200.0).abs() < 1e-9, "{rates:?}");
        assert_eq!(meter.longest_stall(), ms(270));
    }

    #[test]
    fn flags_are_checked_per_mode() {
        let serve = args("serve --listen 100.64.50.10:7000 --bytes 10 --migrate bulk").unwrap();
        assert_eq!(serve.seed, DEFAULT_SERVE_SEED);
        let m = serve.migrate.unwrap();
        assert_eq!(
            (m.workload.as_str(), m.handover_port),
            ("bulk", DEFAULT_HANDOVER_PORT)
        );
        assert_eq!(m.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        let fetch = args("fetch --connect 127.0.0.1:1 --bin-ms 250").unwrap();
        assert_eq!(fetch.bin, Duration::from_millis(250));
        assert_eq!(args("expect --bytes 5").unwrap().seed, DEFAULT_SERVE_SEED);
        for (line, wanted) in [
            ("serve --listen 127.0.0.1:1", "serve needs --bytes"),
            (
                "serve --listen 127.0.0.1:1 --bytes 1 --handover-port 7",
                "--agent-socket and --handover-port need --migrate",
            ),
            (
                "serve --listen 127.0.0.1:1 --bytes 1 --migrate x --handover-port 0",
                "--handover-port must be a port",
            ),
            (
                "fetch --connect 127.0.0.1:1 --bin-ms 0",
                "--bin-ms must be at least 1",
            ),
            (
                "fetch --connect 127.0.0.1:1 --bytes 5",
                "fetch does not take --bytes",
            ),
            (
                "recv --listen 127.0.0.1:1 --seed 5",
                "recv does not take --seed",
            ),
            ("fetch", "--connect is required"),
            ("expect --bytes x", "--bytes x: invalid digit"),
            ("fetch --connect 127.0.0.1:1 --idle -1", "--idle -1:"),
            ("bounce", "first argument must be"),
        ] {
            let error = args(line).unwrap_err();
            assert!(
                error.contains(wanted),
                "{line}: {error:?} should say {wanted:?}"
            );
        }
    }
}
