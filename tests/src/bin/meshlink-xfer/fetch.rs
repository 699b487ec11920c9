//! `fetch`: a client that reads to the end and measures how the data came.

use super::*;

/// What `fetch` reports.
#[derive(Debug)]
pub(super) struct Fetched {
    pub(super) summary: Summary,
    pub(super) longest_stall: Duration,
    /// Mbit/s per bin.
    pub(super) bins: Vec<f64>,
}

impl Fetched {
    pub(super) fn line(&self) -> String {
        let bins: Vec<String> = self.bins.iter().map(|r| format!("{r:.1}")).collect();
        format!(
            "{} longest_stall_ms={:.1} bins={}",
            self.summary.line(),
            self.longest_stall.as_secs_f64() * 1000.0,
            bins.join(",")
        )
    }
}

/// How the data came: bytes per bin of time since the start, and the longest gap between
/// two arrivals.
#[derive(Debug)]
pub(super) struct Meter {
    bin: Duration,
    bytes: Vec<u64>,
    last: Option<Duration>,
    longest_stall: Duration,
}

impl Meter {
    pub(super) fn new(bin: Duration) -> Meter {
        Meter {
            bin,
            bytes: Vec::new(),
            last: None,
            longest_stall: Duration::ZERO,
        }
    }

    /// `n` bytes arrived `at` after the start.
    pub(super) fn arrived(&mut self, at: Duration, n: usize) {
        let i = usize::try_from(at.as_nanos() / self.bin.as_nanos()).unwrap_or(usize::MAX);
        if self.bytes.len() <= i {
            self.bytes.resize(i + 1, 0);
        }
        self.bytes[i] += n as u64;
        if let Some(last) = self.last {
            self.longest_stall = self.longest_stall.max(at.saturating_sub(last));
        }
        self.last = Some(at);
    }

    /// The rates in Mbit/s of each bin up to `end`, the last over its own length.
    pub(super) fn rates(&self, end: Duration) -> Vec<f64> {
        let full = self.bin.as_secs_f64();
        let bins = usize::try_from(end.as_nanos().div_ceil(self.bin.as_nanos()))
            .unwrap_or(usize::MAX)
            .max(self.bytes.len());
        (0..bins)
            .map(|i| {
                let bytes = self.bytes.get(i).copied().unwrap_or(0);
                let start = full * i as f64;
                let length = (end.as_secs_f64() - start).clamp(0.0, full);
                if length <= 0.0 {
                    0.0
                } else {
                    bytes as f64 * 8.0 / length / 1e6
                }
            })
            .collect()
    }

    pub(super) fn longest_stall(&self) -> Duration {
        self.longest_stall
    }
}

pub(super) fn run(args: &Args) -> Result<Fetched, String> {
    let deadline = Instant::now() + args.timeout;
    let mut stream = connect(args.addr, deadline)?;
    let started = Instant::now();
    stream
        .set_read_timeout(Some(args.idle))
        .map_err(|e| e.to_string())?;
    let mut meter = Meter::new(args.bin);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                meter.arrived(started.elapsed(), n);
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
    let end = started.elapsed();
    drop(stream);
    Ok(Fetched {
        summary: Summary {
            bytes: total,
            sha256: hex(&hasher.finalize()),
            secs: end.as_secs_f64(),
        },
        longest_stall: meter.longest_stall(),
        bins: meter.rates(end),
    })
}
