//! `serve`: the bulk server, on tokio, with live migration.

use std::future::Future;
use std::io::IsTerminal;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time;

use meshlink_tcp_migrate::handover::{
    self, Application, Config, Event, FormatError, Migrator, Outcome, Paused, Resumed, Shipment,
};

use super::*;

/// One client's transfer: what travels with its socket in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Progress {
    /// Bytes to send in all.
    pub(super) total: u64,
    /// Bytes handed to the socket so far, and the pattern there.
    pub(super) pattern: Pattern,
    /// The pace in bits per second; 0: as fast as the connection takes it.
    pub(super) rate_bps: u64,
}

/// The size of an encoded [`Progress`]: four big-endian u64.
const PROGRESS_LEN: usize = 32;

/// The bulk server's part in a handover: no state of its own, a [`Progress`] per client.
pub(super) struct Bulk;

impl Application for Bulk {
    /// History: 1 (the first): total, offset, generator state, pace (each u64 BE).
    const FORMAT: &'static str = "meshlink-xfer/1";
    type State = ();
    type Session = Progress;

    fn encode_state((): &()) -> Vec<u8> {
        Vec::new()
    }

    fn decode_state(bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(FormatError::invalid(
                "",
                format!("{} bytes, expected none", bytes.len()),
            ))
        }
    }

    fn encode_session(p: &Progress) -> Vec<u8> {
        [p.total, p.pattern.offset, p.pattern.state, p.rate_bps]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }

    fn decode_session(bytes: &[u8]) -> Result<Progress, FormatError> {
        if bytes.len() != PROGRESS_LEN {
            return Err(FormatError::invalid(
                "",
                format!("{} bytes, expected {PROGRESS_LEN}", bytes.len()),
            ));
        }
        let field =
            |i: usize| u64::from_be_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (total, offset, state, rate_bps) = (field(0), field(1), field(2), field(3));
        if offset > total {
            return Err(FormatError::invalid(
                "offset",
                format!("{offset} beyond the total of {total}"),
            ));
        }
        if state == 0 {
            return Err(FormatError::invalid(
                "state",
                "0, the generator's fixed point",
            ));
        }
        Ok(Progress {
            total,
            pattern: Pattern { offset, state },
            rate_bps,
        })
    }
}

/// What the connection tasks are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    /// Stop at the next await and hand the connection back.
    Pause,
}

/// The tasks sending to the clients.
struct Connections {
    control: watch::Sender<Control>,
    tasks: JoinSet<Option<Paused<Progress>>>,
    idle: Duration,
}

impl Connections {
    fn new(idle: Duration) -> Connections {
        Connections {
            control: watch::channel(Control::Run).0,
            tasks: JoinSet::new(),
            idle,
        }
    }

    fn spawn(&mut self, p: Paused<Progress>) {
        let control = self.control.subscribe();
        self.tasks.spawn(send_to(p, control, self.idle));
    }

    fn take_back(&mut self, back: Resumed<Progress>) {
        for p in back.connections {
            self.spawn(p);
        }
        for g in back.gone {
            eprintln!("meshlink-xfer: {} gone during a handover", g.peer);
        }
    }

    /// Waits until a task ends (forever when there are none). Cancel-safe.
    async fn reap(&mut self) {
        match self.tasks.join_next().await {
            // Only a pause hands a connection back; should one come here, it goes on.
            Some(Ok(Some(paused))) => self.spawn(paused),
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Stops every task at its next await and takes their connections back.
    async fn pause(&mut self) -> Vec<Paused<Progress>> {
        self.control.send_replace(Control::Pause);
        let mut paused = Vec::new();
        while let Some(ended) = self.tasks.join_next().await {
            if let Ok(Some(p)) = ended {
                paused.push(p);
            }
        }
        self.control.send_replace(Control::Run);
        paused
    }
}

/// Whether the control says pause (or is gone).
async fn paused(control: &mut watch::Receiver<Control>) {
    loop {
        if *control.borrow_and_update() == Control::Pause {
            return;
        }
        if control.changed().await.is_err() {
            return;
        }
    }
}

/// Sends one client the rest of its bytes, half-closes and waits for it to close; or
/// stops at the next await on a pause and hands the connection back. Every await here can
/// be dropped without losing count: a write is one call whose count is kept.
async fn send_to(
    p: Paused<Progress>,
    mut control: watch::Receiver<Control>,
    idle: Duration,
) -> Option<Paused<Progress>> {
    let Paused {
        mut stream,
        peer,
        session: mut progress,
    } = p;
    let since = Instant::now();
    // The pace goes on from here: what was sent is due now.
    let origin = (progress.rate_bps > 0).then(|| {
        since
            - Duration::from_secs_f64(
                progress.pattern.offset as f64 * 8.0 / progress.rate_bps as f64,
            )
    });
    let step = if origin.is_some() { CHUNK / 16 } else { CHUNK };
    let mut buf = vec![0u8; step];
    let (mut at, mut end) = (0, 0);
    while progress.pattern.offset < progress.total {
        if at == end {
            let left = progress.total - progress.pattern.offset;
            end = usize::try_from(left).map_or(step, |left| left.min(step));
            at = 0;
            progress.pattern.fill(&mut buf[..end]);
        }
        if let Some(origin) = origin {
            let due = origin
                + Duration::from_secs_f64(
                    progress.pattern.offset as f64 * 8.0 / progress.rate_bps as f64,
                );
            if due > Instant::now() {
                tokio::select! {
                    () = time::sleep_until(due.into()) => continue,
                    () = paused(&mut control) => return Some(back(stream, peer, progress)),
                }
            }
        }
        tokio::select! {
            written = stream.write(&buf[at..end]) => match written {
                Ok(0) | Err(_) => {
                    eprintln!("meshlink-xfer: {peer} went away after {} bytes", progress.pattern.offset);
                    return None;
                }
                Ok(n) => {
                    at += n;
                    progress.pattern.advance(n as u64);
                }
            },
            () = paused(&mut control) => return Some(back(stream, peer, progress)),
        }
    }
    let _ = stream.shutdown().await;
    // The client closes once it has read to the end.
    let mut sink = [0u8; 512];
    let closed = time::timeout(idle, async {
        while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    tokio::select! {
        _ = closed => {}
        () = paused(&mut control) => return Some(back(stream, peer, progress)),
    }
    println!(
        "served peer={peer} bytes={} secs={:.3}",
        progress.total,
        since.elapsed().as_secs_f64()
    );
    None
}

fn back(stream: TcpStream, peer: SocketAddr, session: Progress) -> Paused<Progress> {
    Paused {
        stream,
        peer,
        session,
    }
}

pub(super) fn run(args: &Args) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("MESHLINK_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .init();
        // Signal handlers go in before binding, so that a signal sent as soon as the
        // server says it listens is never fatal.
        let (mut interrupt, mut terminate) = match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(i), Ok(t)) => (i, t),
            (Err(e), _) | (_, Err(e)) => return Err(format!("cannot handle signals: {e}")),
        };
        let listener = match &args.migrate {
            Some(_) => handover::listen(args.addr),
            None => TcpListener::bind(args.addr).await,
        }
        .map_err(|e| format!("bind {}: {e}", args.addr))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!("listening {local}");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        let shutdown = async {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        };
        serve(args, listener, shutdown).await
    })
}

/// Serves `listener` until `shutdown` completes.
async fn serve(
    args: &Args,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let fresh = Progress {
        total: args.bytes,
        pattern: Pattern::new(args.seed),
        rate_bps: args.rate_mbit.map_or(0, |r| (r * 1e6) as u64),
    };
    let mut connections = Connections::new(args.idle);
    match &args.migrate {
        None => {
            let mut shutdown = std::pin::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    accepted = listener.accept() => accept(&mut connections, accepted, fresh).await,
                    () = connections.reap() => {}
                }
            }
        }
        Some(m) => migrating(listener, m, fresh, connections, shutdown).await?,
    }
    Ok(())
}

async fn accept(
    connections: &mut Connections,
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
    fresh: Progress,
) {
    match accepted {
        Ok((stream, peer)) => connections.spawn(Paused {
            stream,
            peer,
            session: fresh,
        }),
        Err(e) => {
            eprintln!("meshlink-xfer: accept: {e}");
            time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn migrating(
    listener: TcpListener,
    m: &Migrate,
    fresh: Progress,
    mut connections: Connections,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let handover_addr = SocketAddr::from(([0, 0, 0, 0], m.handover_port));
    let handovers = TcpListener::bind(handover_addr)
        .await
        .map_err(|e| format!("bind {handover_addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let config = Config::new(m.workload.clone(), m.agent_socket.clone());
    let mut migrator =
        Migrator::<Bulk>::start(config, local, handovers).map_err(|e| e.to_string())?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept(), if !migrator.parked() => {
                accept(&mut connections, accepted, fresh).await;
            }
            () = connections.reap() => {}
            event = migrator.next() => match event {
                Event::HandOver(request) => {
                    let paused = connections.pause().await;
                    let outcome = migrator
                        .hand_over(request, paused, |freeze| {
                            for g in freeze.gone {
                                eprintln!("meshlink-xfer: {} closed before the freeze", g.peer);
                            }
                            Shipment { state: (), connections: freeze.frozen }
                        })
                        .await;
                    if let Outcome::Failed(back) = outcome {
                        connections.take_back(back);
                    }
                }
                Event::Resume(back) => connections.take_back(back),
                Event::Released(_) => {}
                Event::Arrived(arrival) => {
                    for p in arrival.connections {
                        connections.spawn(p);
                    }
                }
            },
        }
    }
    migrator.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's transfer stopped at a clean point and served again (as after a
    /// handover that failed) goes on from where it stopped: every byte, in order.
    #[test]
    fn a_transfer_paused_and_served_again_arrives_whole() {
        let total = 2_000_000;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let (stream, peer) = listener.accept().await.unwrap();
                let mut connections = Connections::new(Duration::from_secs(5));
                connections.spawn(Paused {
                    stream,
                    peer,
                    session: Progress {
                        total,
                        pattern: Pattern::new(3),
                        // 2 MB in 200 ms.
                        rate_bps: 80_000_000,
                    },
                });
                time::sleep(Duration::from_millis(60)).await;
                let paused = connections.pause().await;
                assert_eq!(paused.len(), 1);
                let offset = paused[0].session.pattern.offset;
                assert!(0 < offset && offset < total, "paused at {offset}");
                time::sleep(Duration::from_millis(100)).await;
                for p in paused {
                    connections.spawn(p);
                }
                while connections.tasks.join_next().await.is_some() {}
                offset
            })
        });
        let args = Args::parse(&[
            "fetch".to_string(),
            "--connect".to_string(),
            addr.to_string(),
            "--bin-ms".to_string(),
            "50".to_string(),
        ])
        .unwrap();
        let fetched = fetch::run(&args).unwrap();
        let offset = server.join().unwrap();
        assert_eq!(fetched.summary.bytes, total);
        assert_eq!(fetched.summary.sha256, expected_sha256(total, 3));
        assert!(
            fetched.longest_stall >= Duration::from_millis(90),
            "the pause at {offset} shows as a stall: {fetched:?}"
        );
    }
}
