//! The DNS server's request path: who may ask, how often, and the zone that answers.
//!
//! Every request, UDP or TCP, goes through [`MeshDns`]: a source other than this host (its
//! loopback and its own overlay addresses) gets no answer at all, a request beyond the rate
//! limit is refused, and the rest is
//! answered by hickory's catalog over the current [`NameTable`] zone (replaced whole when the
//! map's names change). UDP is hickory's server loop; TCP is accepted here so that at most
//! [`MAX_TCP_CONNECTIONS`] connections are open at once (hickory's own TCP loop has no such
//! bound), each closed after [`TCP_IDLE`] without a request; framing and parsing stay hickory's.
//!
//! # Security
//! Anything here comes from the network: requests are parsed by hickory and never logged above
//! debug level; the work one sender can cause is bounded by the rate limit, and the memory by
//! the TCP bound.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hickory_server::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::tcp::TcpStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{MessageType, ResponseCode};
use hickory_server::server::{
    Request, RequestHandler, ResponseHandle, ResponseHandler, ResponseInfo, TimeoutStream,
};
use hickory_server::zone_handler::{Catalog, MessageResponseBuilder};
use ipnet::IpNet;
use tracing::debug;

use super::names::NameTable;

/// The most TCP connections served at once; one more is closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection with no request for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// Requests answered per second, all senders together, in the long run.
pub const RATE: f64 = 1000.0;
/// Requests answered at once after a quiet spell.
pub const BURST: f64 = 2000.0;

/// A token bucket, given time: `rate` requests a second, `burst` at most at once.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        RateLimit {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether one more request may be answered at `now` (and takes its token if so).
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The request handler: access, rate limit, then the zone.
pub struct MeshDns {
    catalog: RwLock<Arc<Catalog>>,
    limit: Mutex<RateLimit>,
    allowed: Vec<IpNet>,
}

impl MeshDns {
    /// A server answering from `table` (map version `serial`) to senders in `allowed` (this
    /// node's own addresses) and on loopback.
    pub fn new(table: &NameTable, serial: u32, allowed: Vec<IpNet>) -> Self {
        MeshDns {
            catalog: RwLock::new(Arc::new(table.zone(serial))),
            limit: Mutex::new(RateLimit::new(RATE, BURST, Instant::now())),
            allowed,
        }
    }

    /// Answers from `table` from now on.
    pub fn set(&self, table: &NameTable, serial: u32) {
        let zone = Arc::new(table.zone(serial));
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = zone;
    }

    /// Whether `ip` may ask.
    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        ip.is_loopback() || self.allowed.iter().any(|n| n.contains(&ip))
    }
}

/// What hickory is told of `request` when no answer went out: `code`, no records.
fn unsent(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = request.metadata;
    metadata.message_type = MessageType::Response;
    metadata.response_code = code;
    hickory_server::proto::op::Header {
        metadata,
        counts: Default::default(),
    }
    .into()
}

/// Answers `request` with `code` and no records.
async fn refuse<R: ResponseHandler>(
    request: &Request,
    code: ResponseCode,
    mut response: R,
) -> ResponseInfo {
    let message =
        MessageResponseBuilder::from_message_request(request).error_msg(&request.metadata, code);
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            debug!("dns: sending a refusal: {e}");
            unsent(request, ResponseCode::ServFail)
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        if !self.allowed(request.src().ip()) {
            // No answer at all: a refusal would be a reflector for spoofed sources.
            return unsent(request, ResponseCode::Refused);
        }
        let allowed = self
            .limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(Instant::now());
        if !allowed {
            return refuse(request, ResponseCode::Refused, response).await;
        }
        let catalog = self
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        catalog.handle_request::<R, T>(request, response).await
    }
}

/// Serves DNS over TCP on `listener` until dropped: at most [`MAX_TCP_CONNECTIONS`] at once.
pub async fn serve_tcp(listener: tokio::net::TcpListener, handler: Arc<MeshDns>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("dns: accepting a TCP connection: {e}");
                // Out of descriptors, most likely: give the others time to finish.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if !handler.allowed(src.ip()) {
            // Not one of the senders it answers: no slot for it.
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%src, "dns: too many TCP connections; closing this one");
            continue;
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let _permit = permit;
            let (stream, sender) = TcpStream::from_stream(AsyncIoTokioAsStd(stream), src);
            let mut requests = TimeoutStream::new(stream, TCP_IDLE);
            while let Some(Ok(message)) = requests.next().await {
                let (bytes, src) = message.into_parts();
                let request = match Request::from_bytes(bytes, src, Protocol::Tcp) {
                    Ok(r) if r.metadata.message_type == MessageType::Query => r,
                    // Not a query we can read: this connection speaks something else.
                    _ => return,
                };
                let response = ResponseHandle::new(src, sender.clone(), Protocol::Tcp);
                handler
                    .handle_request::<_, TokioTime>(&request, response)
                    .await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::names::tests::{map, workload};
    use hickory_server::net::NetError;
    use hickory_server::proto::op::{Message, Query};
    use hickory_server::proto::rr::{Name, RData, RecordType};
    use hickory_server::proto::serialize::binary::{BinDecodable, BinEncodable, BinEncoder};
    use hickory_server::zone_handler::MessageResponse;

    /// A response handler that keeps the answer's bytes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    #[async_trait::async_trait]
    impl ResponseHandler for Capture {
        async fn send_response<'a>(
            &mut self,
            response: MessageResponse<
                '_,
                'a,
                impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
                impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
                impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
                impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
            >,
        ) -> Result<ResponseInfo, NetError> {
            let mut bytes = Vec::new();
            let mut encoder = BinEncoder::new(&mut bytes);
            let info = response.destructive_emit(&mut encoder)?;
            *self.0.lock().unwrap() = bytes;
            Ok(info)
        }
    }

    /// Asks `server` for `name`/`kind` from `src`, through the real request path, and
    /// decodes the answer.
    async fn ask(server: &MeshDns, name: &str, kind: RecordType, src: &str) -> Message {
        ask_maybe(server, name, kind, src)
            .await
            .expect("a DNS message")
    }

    /// The answer, `None` when none was sent.
    async fn ask_maybe(
        server: &MeshDns,
        name: &str,
        kind: RecordType,
        src: &str,
    ) -> Option<Message> {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        let bytes = query.to_bytes().unwrap();
        let request = Request::from_bytes(bytes, src.parse().unwrap(), Protocol::Udp).unwrap();
        let capture = Capture::default();
        server
            .handle_request::<_, TokioTime>(&request, capture.clone())
            .await;
        let bytes = capture.0.lock().unwrap().clone();
        (!bytes.is_empty()).then(|| Message::from_bytes(&bytes).expect("a DNS message"))
    }

    fn addresses(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    fn server() -> MeshDns {
        let table = NameTable::from_map(&map(), "prod", "mesh").unwrap();
        MeshDns::new(&table, 7, vec!["100.64.0.9/32".parse().unwrap()])
    }

    /// The node's own overlay address, as the host's resolver asks from it.
    const PEER: &str = "100.64.0.9:5353";

    #[tokio::test]
    async fn names_answer_their_addresses_whatever_the_case() {
        let s = server();
        for name in ["vm-a1.prod.mesh.", "VM-A1.Prod.MESH.", "vm-a1.prod.mesh"] {
            let m = ask(&s, name, RecordType::A, PEER).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(m.metadata.authoritative, "{name}");
            assert_eq!(addresses(&m), ["100.64.0.1".parse::<IpAddr>().unwrap()]);
            assert_eq!(m.answers[0].ttl, crate::dns::names::NODE_TTL);
            assert_eq!(m.metadata.id, 4242);
        }
        let m = ask(&s, "chat.prod.mesh.", RecordType::A, PEER).await;
        assert_eq!(addresses(&m), ["100.64.50.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(m.answers[0].ttl, crate::dns::names::WORKLOAD_TTL);
        let m = ask(&s, "chat.prod.mesh.", RecordType::TXT, PEER).await;
        let txt: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(txt, ["holder=VM-B1"]);
        let m = ask(&s, "v6.prod.mesh.", RecordType::AAAA, PEER).await;
        assert_eq!(addresses(&m), ["fd00::4".parse::<IpAddr>().unwrap()]);
        // A name that exists but has no record of the kind asked: no error, no answer.
        let m = ask(&s, "vm-a1.prod.mesh.", RecordType::AAAA, PEER).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[tokio::test]
    async fn unknown_names_in_the_suffix_do_not_exist_and_others_are_refused() {
        let s = server();
        for name in [
            "nope.prod.mesh.",
            "vm-a1.other.mesh.",
            "x.y.vm-a1.prod.mesh.",
        ] {
            let m = ask(&s, name, RecordType::A, PEER).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            // With the zone's SOA, so that the negative answer is cached briefly.
            let soa = m
                .authorities
                .iter()
                .find(|r| r.record_type() == RecordType::SOA);
            assert!(soa.is_some(), "{name}: {m:?}");
        }
        for name in ["example.com.", "mesh.example.com.", "prod.meshy."] {
            let m = ask(&s, name, RecordType::A, PEER).await;
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(m.answers.is_empty());
        }
    }

    #[tokio::test]
    async fn only_this_host_may_ask() {
        let s = server();
        let m = ask(&s, "vm-a1.prod.mesh.", RecordType::A, "127.0.0.1:5000").await;
        assert_eq!(addresses(&m).len(), 1);
        let m = ask(
            &s,
            "vm-a1.prod.mesh.",
            RecordType::A,
            "[::ffff:100.64.0.9]:5000",
        )
        .await;
        assert_eq!(addresses(&m).len(), 1);
        // Another node of the network (its own map may leave out peers this one sees), the
        // underlay, and the rest: no answer at all, not even a refusal.
        for outsider in [
            "100.64.1.1:5000",
            "198.18.1.5:5000",
            "100.65.0.1:5000",
            "[fd00::1]:53",
        ] {
            let m = ask_maybe(&s, "vm-a1.prod.mesh.", RecordType::A, outsider).await;
            assert!(m.is_none(), "{outsider} got {m:?}");
        }
    }

    #[tokio::test]
    async fn a_new_table_replaces_the_answers() {
        let s = server();
        let mut m = map();
        m.workloads
            .insert("chat".into(), workload("chat", "100.64.50.10/32", Some(1)));
        m.workloads.remove("idle");
        s.set(&NameTable::from_map(&m, "prod", "mesh").unwrap(), 8);
        let txt = ask(&s, "chat.prod.mesh.", RecordType::TXT, PEER).await;
        assert_eq!(txt.answers[0].data.to_string(), "holder=vm-a1");
        let gone = ask(&s, "idle.prod.mesh.", RecordType::A, PEER).await;
        assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn past_the_rate_limit_requests_are_refused() {
        let s = server();
        *s.limit.lock().unwrap() = RateLimit::new(1.0, 2.0, Instant::now());
        for _ in 0..2 {
            let m = ask(&s, "vm-a1.prod.mesh.", RecordType::A, PEER).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        }
        let m = ask(&s, "vm-a1.prod.mesh.", RecordType::A, PEER).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn the_bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = RateLimit::new(10.0, 3.0, t0);
        assert!((0..3).all(|_| b.allow(t0)));
        assert!(!b.allow(t0));
        // A tenth of a second: one more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.allow(t1));
        assert!(!b.allow(t1));
        // A long pause fills the bucket only to its burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.allow(t2)).count(), 3);
    }

    #[tokio::test]
    async fn tcp_answers_and_its_connections_are_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = Arc::new(MeshDns::new(
            &NameTable::from_map(&map(), "prod", "mesh").unwrap(),
            7,
            vec![],
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_tcp(listener, s));
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(Query::query(
            Name::from_ascii("vm-a1.prod.mesh.").unwrap(),
            RecordType::A,
        ));
        let bytes = query.to_bytes().unwrap();
        // Fill every slot with an idle connection (each accepted in turn).
        let mut idle = Vec::new();
        for _ in 0..MAX_TCP_CONNECTIONS {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            // A query answered proves the connection holds a slot.
            c.write_all(&(bytes.len() as u16).to_be_bytes())
                .await
                .unwrap();
            c.write_all(&bytes).await.unwrap();
            let mut len = [0u8; 2];
            c.read_exact(&mut len).await.unwrap();
            let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
            c.read_exact(&mut answer).await.unwrap();
            let m = Message::from_bytes(&answer).unwrap();
            assert_eq!(addresses(&m), ["100.64.0.1".parse::<IpAddr>().unwrap()]);
            idle.push(c);
        }
        // One more is closed at once, unanswered.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = extra.write_all(&(bytes.len() as u16).to_be_bytes()).await;
        let _ = extra.write_all(&bytes).await;
        let mut buf = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // Once the others go, there is room again.
        drop(idle);
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(&(bytes.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                c.write_all(&bytes).await.unwrap();
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "no slot came free");
        server.abort();
    }
}
