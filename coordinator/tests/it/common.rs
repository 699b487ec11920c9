//! Helpers shared by the integration tests: scratch directories, hellos, a minimal HTTP
//! client for the admin API, and a QUIC agent that pins the coordinator's certificate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshlink_coordinator::config::Settings;
use meshlink_coordinator::handlers::tokens::CreateToken;
use meshlink_coordinator::identity::SERVER_NAME;
use meshlink_coordinator::service::{Service, Session};
use meshlink_coordinator::store::{SqlStore, StoreError};
use meshlink_coordinator::{pin, Coordinator};
use meshlink_proto::control::{
    encode, Auth, ClientMessage, Decoder, Hello, ServerMessage, MAX_SERVER_MESSAGE,
    PROTOCOL_VERSION,
};
use meshlink_proto::{NodeId, PublicKey};
use meshlink_tests::postgres::PgCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(10);

/// The one message of a frame the hub queued (a whole frame, one message, no bytes left).
pub fn decode_frame(frame: &[u8]) -> ServerMessage {
    let mut d = Decoder::new(MAX_SERVER_MESSAGE);
    d.push(frame).expect("a frame within the cap");
    let msg = d
        .decode()
        .expect("a well-formed frame")
        .expect("a whole frame");
    assert_eq!(d.buffered(), 0, "one frame is one message");
    msg
}

/// A scratch directory, removed on drop (also on panic).
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshlink-coord-{name}-"))
            .tempdir()
            .expect("a temporary directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A database for one test: a scratch SQLite file, or a new database of the private
/// PostgreSQL cluster this test binary shares ([`PgCluster::shared`]).
pub enum TestDb {
    Sqlite(TempDir),
    Postgres(String),
}

impl TestDb {
    pub fn sqlite() -> Self {
        TestDb::Sqlite(TempDir::new("db"))
    }

    /// `None` when PostgreSQL is missing and skipping is allowed (never under `CI=true`).
    pub fn postgres() -> Option<Self> {
        let cluster = PgCluster::shared()?;
        Some(TestDb::Postgres(
            cluster.create_database("meshlink").expect("a new database"),
        ))
    }

    /// Opens the store (again: the data stays).
    pub async fn open(&self) -> SqlStore {
        self.try_open().await.expect("the store opens")
    }

    pub async fn try_open(&self) -> Result<SqlStore, StoreError> {
        match self {
            TestDb::Sqlite(dir) => SqlStore::open_sqlite(&dir.path().join("coordinator.db")).await,
            TestDb::Postgres(url) => SqlStore::connect_postgres(url).await,
        }
    }

    /// A URL for sqlx's `Any` driver, to reach the database behind the store's back.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite(dir) => {
                format!("sqlite://{}", dir.path().join("coordinator.db").display())
            }
            TestDb::Postgres(url) => url.clone(),
        }
    }
}

/// Makes, for each named `async fn NAME(db: &TestDb)` of the calling module, two tests:
/// `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&$crate::common::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::postgres() {
                        super::$name(&db).await;
                    }
                }
            )*
        }
    };
}

pub fn key(n: u8) -> PublicKey {
    let mut k = [n; 32];
    k[0] = 0x42;
    PublicKey(k)
}

/// A node `name` joined to `network` with a one-use token tagged `tag` and key byte `key`, its
/// agent taking policy edits or not, saying hello from 198.18.3.3.
pub async fn join_tagged(
    s: &Service,
    network: &str,
    name: &str,
    tag: &str,
    key: u8,
    edits: bool,
) -> Session {
    let (_, secret) = s
        .create_token(CreateToken {
            network: network.into(),
            tags: vec![tag.into()],
            expires_in_secs: None,
            uses: Some(1),
        })
        .await
        .unwrap();
    let hello = Hello {
        policy_edits: edits,
        ..join_hello(&secret, key, Some(name))
    };
    s.hello(&hello, "198.18.3.3".parse().unwrap())
        .await
        .unwrap()
}

pub fn join_hello(secret: &str, key_byte: u8, name: Option<&str>) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::JoinToken {
            secret: secret.into(),
        },
        public_key: key(key_byte),
        key_rotation: false,
        policy_edits: false,
        compression: false,
        name: name.map(str::to_string),
        labels: BTreeMap::from([("provider".to_string(), "test".to_string())]),
        endpoints: vec![format!("198.18.0.{key_byte}:51820").parse().unwrap()],
        handover: false,
    }
}

pub fn node_hello(node_id: NodeId, secret: &str, key_byte: u8) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        auth: Auth::Node {
            node_id,
            secret: secret.into(),
        },
        public_key: key(key_byte),
        key_rotation: false,
        policy_edits: false,
        compression: false,
        name: None,
        labels: BTreeMap::new(),
        endpoints: vec![format!("198.18.0.{key_byte}:51820").parse().unwrap()],
        handover: false,
    }
}

/// Settings for a coordinator on loopback with ephemeral ports.
pub fn loopback_settings(state_dir: &Path) -> Settings {
    let mut s = Settings::with_state_dir(state_dir.to_path_buf());
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.admin_listen = "127.0.0.1:0".parse().unwrap();
    s
}

pub async fn start(state_dir: &Path) -> Coordinator {
    Coordinator::start(&loopback_settings(state_dir))
        .await
        .unwrap()
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the parsed body
/// (`Null` when empty).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "test client reads plain bodies only"
    );
    let value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap()
    };
    (status, value)
}

/// A minimal agent: one QUIC connection, one stream, framed messages.
pub struct Agent {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
    /// Bytes read from the stream so far.
    pub received: usize,
    _endpoint: quinn::Endpoint,
}

impl Agent {
    /// Connects, pinning `fingerprint`, and opens the stream (the server sees it with the
    /// first bytes).
    pub async fn connect(addr: SocketAddr, fingerprint: &str) -> Result<Agent, String> {
        Agent::connect_from("127.0.0.1:0".parse().unwrap(), addr, fingerprint).await
    }

    /// As [`Agent::connect`], from the local address `local` (such as another loopback
    /// address, to be another source).
    pub async fn connect_from(
        local: SocketAddr,
        addr: SocketAddr,
        fingerprint: &str,
    ) -> Result<Agent, String> {
        let mut endpoint = quinn::Endpoint::client(local).map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(pin::client_config(fingerprint).unwrap());
        let conn = endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Agent {
            conn,
            send,
            recv,
            decoder: Decoder::new(MAX_SERVER_MESSAGE),
            received: 0,
            _endpoint: endpoint,
        })
    }

    /// From now on takes compressed records (as an agent whose hello says so); before any
    /// message is read.
    pub fn take_compression(&mut self) {
        assert_eq!(self.decoder.buffered(), 0);
        self.decoder = Decoder::with_compression(MAX_SERVER_MESSAGE);
    }

    pub async fn send(&mut self, msg: &ClientMessage) {
        self.send.write_all(&encode(msg)).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// The next message, or `None` when the stream or connection ended.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(m) = self.decoder.decode::<ServerMessage>().unwrap() {
                return Some(m);
            }
            match tokio::time::timeout(WAIT, self.recv.read(&mut buf))
                .await
                .expect("timed out waiting for a message")
            {
                Ok(Some(n)) => {
                    self.received += n;
                    self.decoder.push(&buf[..n]).unwrap();
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Sends a hello and returns the first answer.
    pub async fn hello(&mut self, hello: Hello) -> ServerMessage {
        self.send(&ClientMessage::Hello(hello)).await;
        self.recv().await.expect("an answer to the hello")
    }

    /// The application close code once the coordinator closes the connection.
    pub async fn closed_code(&self) -> u64 {
        match tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .expect("the coordinator did not close")
        {
            quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
            other => panic!("closed otherwise: {other}"),
        }
    }
}

/// The keys of a JSON object, sorted.
pub fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}

/// `list` as owned strings, sorted (to compare with [`keys`]).
pub fn sorted(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}
