//! A real coordinator in process, on loopback, for the tests that run `meshctl` against the
//! admin API itself rather than canned answers: its SQLite store and identity in a scratch
//! directory, its own tokio runtime (the client under test is blocking), nodes joined through
//! the coordinator's service with no QUIC, as `coordinator/tests/it/workloads.rs` does.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::sync::Arc;

use meshctl::admin_token::AdminToken;
use meshctl::client::AdminClient;
use meshlink_api::{CreateToken, NodeId, TokenUses};
use meshlink_coordinator::hub::Outbound;
use meshlink_coordinator::service::{Service, Session};
use meshlink_coordinator::{Coordinator, Settings};
use meshlink_proto::control::{
    Auth, Decoder, Hello, ServerMessage, MAX_SERVER_MESSAGE, PROTOCOL_VERSION,
};
use meshlink_proto::token::JoinToken;
use meshlink_proto::PublicKey;

/// The address the coordinator sees every joining node come from; it shows as the last of a
/// node's endpoints.
pub const OBSERVED: &str = "198.18.7.7";

/// A coordinator on 127.0.0.1 with ephemeral ports; shut down on drop.
pub struct Mesh {
    coordinator: Option<Coordinator>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Mesh {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// A coordinator whose settings `configure` changed (after the scratch directory and the
    /// loopback addresses were set).
    pub fn start_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("meshctl-admin-")
            .tempdir()
            .expect("a scratch directory");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut settings = Settings::with_state_dir(dir.path().to_path_buf());
        settings.listen = "127.0.0.1:0".parse().unwrap();
        settings.admin_listen = "127.0.0.1:0".parse().unwrap();
        configure(&mut settings);
        let coordinator = runtime
            .block_on(Coordinator::start(&settings))
            .expect("the coordinator starts");
        Self {
            coordinator: Some(coordinator),
            runtime,
            _dir: dir,
        }
    }

    pub fn coordinator(&self) -> &Coordinator {
        self.coordinator.as_ref().expect("running")
    }

    fn service(&self) -> Arc<Service> {
        self.coordinator().service().clone()
    }

    /// The admin API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.coordinator().admin_addr())
    }

    pub fn admin_token(&self) -> String {
        self.coordinator().admin_token().value.clone()
    }

    /// The library client, with the right token.
    pub fn client(&self) -> AdminClient {
        let token = AdminToken::new(&self.admin_token(), "test").unwrap();
        AdminClient::new(self.url().parse().unwrap(), token)
    }

    /// Runs the built `meshctl` with a clean environment, this coordinator and its token.
    pub fn meshctl(&self, args: &[&str]) -> Output {
        self.meshctl_as(&self.admin_token(), args)
    }

    /// [`Mesh::meshctl`] with another admin token (`token`).
    pub fn meshctl_as(&self, token: &str, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .env_clear()
            .env("MESHLINK_COORDINATOR", self.url())
            .env("MESHLINK_ADMIN_TOKEN", token)
            .args(args)
            .output()
            .expect("run meshctl")
    }

    /// [`Mesh::meshctl`] with `input` on its standard input.
    pub fn meshctl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .env_clear()
            .env("MESHLINK_COORDINATOR", self.url())
            .env("MESHLINK_ADMIN_TOKEN", self.admin_token())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run meshctl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().expect("meshctl ends")
    }

    /// `meshctl ARGS`, which must succeed; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.meshctl(args);
        assert!(
            output.status.success(),
            "meshctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `meshctl ARGS -o json`, parsed; it must succeed.
    pub fn run_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all);
        assert!(
            text.contains("\n  ") || !text.contains(','),
            "not pretty-printed: {text}"
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// What the admin API answers to `GET path`, straight from the server.
    pub fn get(&self, path: &str) -> serde_json::Value {
        ureq::get(format!("{}{path}", self.url()))
            .header("Authorization", format!("Bearer {}", self.admin_token()))
            .call()
            .expect("an answer")
            .body_mut()
            .read_json()
            .expect("JSON")
    }

    /// Joins a node named `name` to `network` with a one-use token made through the client,
    /// as an agent with key `key`, labels `provider=test` and endpoint `198.18.0.KEY:51820`
    /// would. An `online` node keeps its session (and answers every `Prepare` at once, as an
    /// agent whose tunnels are up); else the session ends at once.
    pub fn join(&self, network: &str, key: u8, name: &str, online: bool) -> NodeId {
        let endpoint = format!("198.18.0.{key}:51820").parse().unwrap();
        self.join_reporting(network, key, name, online, &[endpoint])
    }

    /// [`Mesh::join`] with the agent reporting `endpoints` (none: the coordinator knows no
    /// endpoint of the node, since it observes only the address of a port reported).
    pub fn join_reporting(
        &self,
        network: &str,
        key: u8,
        name: &str,
        online: bool,
        endpoints: &[SocketAddr],
    ) -> NodeId {
        let request = CreateToken {
            network: network.parse().unwrap(),
            tags: vec![],
            expires_in_secs: None,
            uses: Some(TokenUses::Limit(1)),
        };
        let token = self.client().create_token(&request).expect("a join token");
        let secret = JoinToken::decode(&token.value.token)
            .expect("a join token's text")
            .secret;
        let mut public_key = [key; 32];
        public_key[0] = 0x42;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            auth: Auth::JoinToken { secret },
            public_key: PublicKey(public_key),
            key_rotation: false,
            policy_edits: false,
            compression: false,
            name: Some(name.into()),
            labels: BTreeMap::from([("provider".to_owned(), "test".to_owned())]),
            endpoints: endpoints.to_vec(),
            handover: false,
        };
        let service = self.service();
        let remote: IpAddr = OBSERVED.parse().unwrap();
        let session = self
            .runtime
            .block_on(service.hello(&hello, remote))
            .expect("the hello is accepted");
        let id = NodeId(session.node);
        if online {
            self.runtime.spawn(answer_prepares(service, session));
        } else {
            self.runtime.block_on(service.session_closed(
                &session.network,
                session.node,
                session.attached.serial,
            ));
        }
        id
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(c) = self.coordinator.take() {
            self.runtime.block_on(c.shutdown());
        }
    }
}

/// A failed command's one line on stderr; it must have failed with status 1 and printed
/// nothing on stdout.
pub fn failure(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let text = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    text
}

/// Keeps a session open, answering each `Prepare` on its queue as an agent with its tunnels up.
async fn answer_prepares(service: Arc<Service>, mut session: Session) {
    while let Some(Outbound::Frame(frame)) = session.attached.rx.recv().await {
        let mut decoder = Decoder::new(MAX_SERVER_MESSAGE);
        if decoder.push(&frame).is_err() {
            continue;
        }
        if let Ok(Some(ServerMessage::Prepare {
            workload,
            generation,
            ..
        })) = decoder.decode()
        {
            service.prepared(session.node, &workload, generation);
        }
    }
}

/// `text` with what changes from run to run masked: times (`2024-05-01T12:00:00Z` becomes
/// `<time>`), durations (`5s`, `1m30s`, `1h` become `<dur>`) and milliseconds (`12.4 ms`
/// becomes `<ms>`).
pub fn mask(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        let at_word = i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '.');
        if let Some((len, name)) = at_word.then(|| volatile(rest)).flatten() {
            out.push_str(name);
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The length and mask of the volatile value `text` starts with, if it does.
fn volatile(text: &[char]) -> Option<(usize, &'static str)> {
    let time = "dddd-dd-ddTdd:dd:ddZ";
    let fits = time.len() <= text.len()
        && time.chars().zip(text).all(|(p, c)| match p {
            'd' => c.is_ascii_digit(),
            p => p == *c,
        });
    if fits {
        return Some((time.len(), "<time>"));
    }
    let number = text
        .iter()
        .take_while(|c| c.is_ascii_digit() || **c == '.')
        .count();
    if number == 0 {
        return None;
    }
    if text[number..].starts_with(&[' ', 'm', 's']) {
        return Some((number + 3, "<ms>"));
    }
    // Durations: (digits unit)+, then no letter or digit.
    let mut len = 0;
    loop {
        let digits = text[len..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        match text.get(len + digits) {
            Some(unit) if digits > 0 && "smhdw".contains(*unit) => len += digits + 1,
            _ => break,
        }
    }
    let ends = text.get(len).is_none_or(|c| !c.is_ascii_alphanumeric());
    (len > 0 && ends).then_some((len, "<dur>"))
}

#[test]
fn masking() {
    assert_eq!(
        mask("MOVED  2024-05-01T11:59:00Z (1m30s ago)\nx in 12.4 ms (ready in 3.1 ms) v1.2 ms"),
        "MOVED  <time> (<dur> ago)\nx in <ms> (ready in <ms>) v1.2 ms"
    );
    assert_eq!(
        mask("vm-a 0s ago 100.64.0.1 in 1h 59m59s 3s5 1d2h"),
        "vm-a <dur> ago 100.64.0.1 in <dur> <dur> 3s5 <dur>"
    );
}
