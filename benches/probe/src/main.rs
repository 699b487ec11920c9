//! `meshlink-probe`: a steady UDP probe and its echo responder.
//!
//! ```text
//! meshlink-probe echo --bind 0.0.0.0:7000 --name vm-b
//! meshlink-probe send --to 100.64.50.10:7000 [--interval-us 1000] [--duration-s 30]
//!                     --out /tmp/probe.jsonl [--ready-file PATH] [--grace-ms 500]
//! ```
//!
//! `echo` prints `meshlink-probe: echo on <addr> as <name>` to stderr once it answers, and on
//! SIGINT or SIGTERM prints how many probes it answered and exits 0.
//!
//! `send` probes until the duration is over or SIGINT/SIGTERM, waits for late answers, writes
//! one JSON object per probe to `--out` (`{"seq":..,"sent":..,"recv":..|null,"by":..|null}`,
//! times in Unix nanoseconds) and prints a one-line summary to stderr. Exit status: 0, or 1
//! when the socket, the ready file or the output could not be set up or written.

use std::fs::File;
use std::io::BufWriter;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};

use meshlink_probe::echo::Echo;
use meshlink_probe::prober::{self, ProberConfig};
use meshlink_probe::wire::Name;

/// A steady UDP probe to a workload address, and the echo responder it probes.
#[derive(Debug, Parser)]
#[command(name = "meshlink-probe", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer probes, from the address each was sent to, with this responder's name.
    Echo {
        /// The address to answer on (0.0.0.0:PORT answers on every local address).
        #[arg(long)]
        bind: SocketAddr,
        /// The name put in every answer (up to 64 bytes).
        #[arg(long)]
        name: Name,
    },
    /// Send probes and record the answers.
    Send {
        /// The target: the workload address and the responder's port.
        #[arg(long)]
        to: SocketAddr,
        /// Microseconds between two probes.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        interval_us: u64,
        /// How long to send, in seconds (fractions allowed).
        #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
        duration_s: f64,
        /// Where to write the records, one JSON object per line.
        #[arg(long)]
        out: PathBuf,
        /// A file to create once the first probe is sent.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// How long to wait for late answers after the last probe.
        #[arg(long, default_value_t = 500)]
        grace_ms: u64,
    },
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(s),
        _ => Err("a positive number of seconds".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SIGINT and SIGTERM are blocked in every thread (threads inherit the mask) and taken with
    // sigwait, so that they end the run cleanly instead of killing the process.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("meshlink-probe: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Echo { bind, name } => echo(bind, name, signals),
        Command::Send {
            to,
            interval_us,
            duration_s,
            out,
            ready_file,
            grace_ms,
        } => {
            let mut config = ProberConfig::new(
                to,
                Duration::from_micros(interval_us),
                Duration::from_secs_f64(duration_s),
            );
            config.grace = Duration::from_millis(grace_ms);
            config.ready_file = ready_file;
            send(&config, &out, signals)
        }
    }
}

fn echo(bind: SocketAddr, name: Name, signals: SigSet) -> ExitCode {
    let echo = match Echo::bind(bind, name.clone()) {
        Ok(echo) => echo,
        Err(e) => {
            eprintln!("meshlink-probe: cannot answer on {bind}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = echo.local_addr().map_or(bind, |a| a);
    eprintln!("meshlink-probe: echo on {local} as {}", name.as_str());
    let stop = AtomicBool::new(false);
    let answered = thread::scope(|scope| {
        let serving = scope.spawn(|| match echo.serve(&stop) {
            Ok(answered) => answered,
            Err(e) => {
                // The main thread is waiting for a signal; nothing else is left to do.
                eprintln!("meshlink-probe: echo on {local} failed: {e}");
                std::process::exit(1);
            }
        });
        let _ = signals.wait();
        stop.store(true, Ordering::Relaxed);
        serving.join().expect("the responder does not panic")
    });
    eprintln!("meshlink-probe: echo answered {answered} probes");
    ExitCode::SUCCESS
}

fn send(config: &ProberConfig, out: &PathBuf, signals: SigSet) -> ExitCode {
    // Created first, so that a bad path fails before the run rather than after it.
    let file = match File::create(out) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("meshlink-probe: cannot create {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Left waiting when the run ends by itself; it ends with the process.
    thread::spawn({
        let stop = stop.clone();
        move || {
            if signals.wait().is_ok() {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    let report = match prober::run(config, &stop) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("meshlink-probe: probing {} failed: {e}", config.to);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = report.write_jsonl(BufWriter::new(file)) {
        eprintln!("meshlink-probe: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    eprintln!("meshlink-probe: {} -> {}", config.to, report.summary);
    ExitCode::SUCCESS
}
