//! UAPI connections: the bytes a client writes to the agent's userspace API socket, read by
//! the real server (`meshlink_agent::uapi::serve`, on a socket made by `uapi::bind`) in front
//! of a handler that holds a configuration in memory. This reaches what `apply_set` alone does
//! not: the line and request framing, the size limits, UTF-8, the operations (`get=1`,
//! `get=meshlink`, `set=1`, `claim=NAME`, `handover=NAME`) and their errors.
//!
//! The handler refuses some requests the way the agent does, so that every error path of the
//! server is taken: `set=1` of listen port 1 or 2 fails to apply (a change the agent does not
//! take, a port in use); `claim=NAME` succeeds for names of even length and otherwise fails
//! with one of the agent's `ClaimFailure`s, chosen by the name's length, a refusal carrying
//! an empty line in its message. It holds a registry of live-migration applications, so a
//! `handover=NAME` registers (or is refused a bad name) and what follows on the connection is
//! read as the application's answers (`AppAnswer::parse`).
//!
//! Input: the bytes written on one connection, which is then shut for writing; the whole
//! answer is read until the server closes. Checked: the server answers (it never hangs or
//! dies), every answer ends with an `errno=N` line and an empty line (so no message, however
//! many lines it had, splits an answer), and whatever the requests set leaves a configuration
//! as `uapi_set` checks it. The server's request and op parsers (`read_request`,
//! `try_handle_request`) are private: this target is how they are fuzzed until they are given
//! a public, I/O-free entry point.

#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshlink_agent::control::handover::Handovers;
use meshlink_agent::control::workloads::ClaimFailure;
use meshlink_agent::platform::udp::UdpError;
use meshlink_agent::settings::{DeviceConfig, PeerConfig, PrivateKey};
use meshlink_agent::uapi::{self, ApplyError, DeviceStatus, UapiHandler};
use meshlink_proto::agent_session::ClaimError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;

struct Handler {
    config: Mutex<DeviceConfig>,
    handovers: Handovers,
}

impl UapiHandler for Handler {
    fn config(&self) -> DeviceConfig {
        self.config.lock().unwrap().clone()
    }
    fn status(&self) -> DeviceStatus {
        DeviceStatus::default()
    }
    fn apply(&self, new: DeviceConfig) -> Result<(), ApplyError> {
        match new.listen_port {
            1 => Err(ApplyError::Unsupported(
                "port 1 is refused here\n\nwith an empty line".into(),
            )),
            2 => Err(ApplyError::ListenPort {
                port: 2,
                source: UdpError::PortInUse(2),
            }),
            _ => {
                *self.config.lock().unwrap() = new;
                Ok(())
            }
        }
    }
    fn status_json(&self) -> String {
        "{\n\"peers\": []\r\n}".into()
    }
    fn handovers(&self) -> Option<&Handovers> {
        Some(&self.handovers)
    }
    fn claim(&self, workload: &str) -> Result<u64, ClaimFailure> {
        let n = workload.len();
        if n.is_multiple_of(2) {
            return Ok(n as u64);
        }
        Err(match n % 16 {
            1 => ClaimFailure::Session(ClaimError::Refused(format!(
                "refused\n\nby the fuzz handler: {workload}"
            ))),
            3 => ClaimFailure::Session(ClaimError::NoResult),
            5 => ClaimFailure::Session(ClaimError::SessionLost),
            7 => ClaimFailure::Session(ClaimError::Expired),
            9 => ClaimFailure::Busy,
            11 => ClaimFailure::Timeout(Duration::from_secs(10)),
            13 => ClaimFailure::Stopped,
            _ => ClaimFailure::NotJoined,
        })
    }
}

struct Server {
    rt: Runtime,
    path: PathBuf,
    handler: Arc<Handler>,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        // libFuzzer's own `main` runs instead of Rust's, which would ignore SIGPIPE: a write to
        // a connection the server has closed must fail, not kill the process.
        // SAFETY: setting a signal's disposition to "ignore" at start-up, before any thread.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = meshlink_fuzz::scratch_dir("uapi");
        let handler = Arc::new(Handler {
            config: Mutex::new(base()),
            handovers: Handovers::default(),
        });
        let listener = {
            let _guard = rt.enter();
            uapi::bind(&dir, "fuzz0").expect("binding the UAPI socket")
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        // The sender lives as long as the process: the server never stops.
        std::mem::forget(tx);
        rt.spawn(uapi::serve(listener, handler.clone(), rx));
        Server {
            rt,
            path: dir.join("fuzz0.sock"),
            handler,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    *s.handler.config.lock().unwrap() = base();
    let answer = s.rt.block_on(async {
        let exchange = async {
            let mut c = UnixStream::connect(&s.path).await?;
            c.write_all(data).await?;
            c.shutdown().await?;
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).await?;
            std::io::Result::Ok(answer)
        };
        tokio::time::timeout(Duration::from_secs(10), exchange).await
    });
    let answer = answer
        .expect("the server did not answer within 10 s")
        .expect("the connection failed");
    let text = String::from_utf8(answer).expect("an answer that is not UTF-8");
    if !text.is_empty() {
        assert!(
            text.ends_with("\n\n"),
            "an answer not ended by an empty line: {text:?}"
        );
        let errno = uapi::response_errno(&text);
        assert!(errno.is_some(), "an answer without errno: {text:?}");
    }
    for answer in text.split_inclusive("\n\n") {
        let last = answer.trim_end().lines().last().unwrap_or("");
        assert!(
            last.starts_with("errno="),
            "an answer not ending in errno: {answer:?}"
        );
    }
    check(&s.handler.config.lock().unwrap());
});

fn check(c: &DeviceConfig) {
    let own = c.private_key.public_key();
    for (i, p) in c.peers.iter().enumerate() {
        assert_ne!(p.public_key, own);
        assert!(c.peers[..i].iter().all(|q| q.public_key != p.public_key));
        for net in &p.allowed_ips {
            assert_eq!(net.trunc(), *net);
            assert!(c.peers[..i].iter().all(|q| !q.allowed_ips.contains(net)));
        }
    }
}

fn base() -> DeviceConfig {
    let peer = |seed: u8, net: &str| PeerConfig {
        public_key: PrivateKey::from_bytes([seed; 32]).public_key(),
        preshared_key: None,
        endpoint: Some(SocketAddr::from(([198, 18, 0, seed], 51820))),
        allowed_ips: vec![net.parse().unwrap()],
        persistent_keepalive: None,
    };
    DeviceConfig {
        private_key: PrivateKey::from_bytes([1; 32]),
        listen_port: 51820,
        fwmark: None,
        peers: vec![peer(2, "100.64.0.2/32"), peer(3, "100.64.0.3/32")],
    }
}
