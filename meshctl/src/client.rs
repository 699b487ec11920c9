//! A typed, blocking client for the coordinator's HTTP/JSON admin API.
//!
//! One method per route. Requests and answers are the types of [`meshlink_api`], the same
//! definitions the coordinator serves, so the two ends cannot drift apart unnoticed. A method
//! that returns data returns a [`Reply`]: the typed answer that the tables are drawn from, and
//! the JSON exactly as the server sent it, which `-o json` prints. Unknown answer fields are
//! ignored, and fields a coordinator of an older version did not send read as their default
//! where the type says so, so a coordinator that adds a field does not break the CLI.
//!
//! Errors are grouped by who is at fault: the caller's URL ([`UrlError`]), the network
//! ([`ClientError::Unreachable`], [`ClientError::Transport`], [`ClientError::Unanswered`],
//! [`ClientError::Unavailable`]), the caller's request as judged by the server
//! ([`ClientError::Unauthorized`], [`ClientError::Api`]) and the server itself
//! ([`ClientError::NotJson`], [`ClientError::BadResponse`]).
//!
//! # Several coordinators
//!
//! A mesh may have several coordinators sharing one database; the client is given all of
//! their URLs ([`CoordinatorUrls`]) and sends each request to the first. Only when no HTTP
//! answer comes does it try the next one: an answer, even an error such as 404 or 409, is the
//! mesh's answer and is returned as it is. A read (`GET`) goes to the next coordinator after
//! any failure of the exchange, since asking twice changes nothing. A write goes to the next
//! one only when it surely never reached the first (the connection was refused or could not
//! be made, the name did not resolve); once it may have been delivered, the client does not
//! send it again elsewhere, where it could be carried out twice, and reports
//! [`ClientError::Unanswered`], naming the coordinator and saying that the outcome is unknown.
//!
//! # Security
//!
//! The admin token goes in an `Authorization: Bearer` header on every request. The admin API
//! speaks plain HTTP and is meant to be reached on loopback or through an SSH tunnel; `https`
//! URLs are refused rather than silently downgraded. Redirects are not followed and the
//! `HTTP_PROXY`-style variables are ignored, so the token goes to the coordinator named and to
//! no other host. `Debug` on [`AdminClient`] hides the token.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use meshlink_api::{
    AdminToken as AdminTokenView, AuditEntry, AuditFilter, CreateAdminToken, CreateExternalNode,
    CreateNetwork, CreateToken, CreateWorkload, CreatedAdminToken, CreatedToken, EditTags,
    ExternalNode, FlowVerdict, MoveWorkload, MovedWorkload, Network, Node, PolicyChanged,
    PolicyVersion, PublicKey, Relays, RollbackPolicy, RotateKey, SetPolicy, Status, TestFlow,
    Token, TokenId, Workload,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::admin_token::AdminToken;

/// Where the coordinator listens by default.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7444";

/// How long to wait for a TCP connection to the coordinator.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a whole request, answer included, may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer read; a node list of many thousands of nodes fits easily.
const RESPONSE_LIMIT: u64 = 64 * 1024 * 1024;

/// The longest server error message shown; longer ones are cut.
const MESSAGE_LIMIT: usize = 500;

/// The base URL of a coordinator's admin API: `http://host[:port][/prefix]`, without a
/// trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorUrl(String);

/// Why a coordinator URL is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The URL asks for TLS, which the admin API does not speak.
    #[error(
        "{url}: the admin API speaks plain HTTP; use http:// on loopback, or reach a remote \
         coordinator through an SSH tunnel"
    )]
    Https {
        /// The URL given.
        url: String,
    },
    /// The URL is not of the form `http://host[:port]`.
    #[error("{url:?} is not a coordinator URL; write it like {DEFAULT_COORDINATOR}")]
    Malformed {
        /// The URL given.
        url: String,
    },
}

impl FromStr for CoordinatorUrl {
    type Err = UrlError;

    /// Accepts `http://host[:port][/prefix]`, and `host[:port]` as shorthand for it.
    fn from_str(text: &str) -> Result<Self, UrlError> {
        let url = text.trim();
        let malformed = || UrlError::Malformed {
            url: text.to_owned(),
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(UrlError::Https {
                    url: text.to_owned(),
                })
            }
            Some(_) => return Err(malformed()),
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        let host = rest.split('/').next().unwrap_or_default();
        let bad_char = |c: char| c.is_whitespace() || c.is_control() || "?#@\\".contains(c);
        if host.is_empty() || rest.contains(bad_char) {
            return Err(malformed());
        }
        Ok(Self(format!("http://{rest}")))
    }
}

impl fmt::Display for CoordinatorUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The admin API URLs of a mesh's coordinators, in the order to try them: at least one, each
/// once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorUrls(Vec<CoordinatorUrl>);

impl CoordinatorUrls {
    /// `urls` in order, repeats left out; `None` when there is none.
    pub fn new(urls: impl IntoIterator<Item = CoordinatorUrl>) -> Option<Self> {
        let mut unique: Vec<CoordinatorUrl> = Vec::new();
        for url in urls {
            if !unique.contains(&url) {
                unique.push(url);
            }
        }
        (!unique.is_empty()).then_some(Self(unique))
    }

    /// The URLs, in order.
    pub fn iter(&self) -> impl Iterator<Item = &CoordinatorUrl> {
        self.0.iter()
    }

    /// The first URL, where every request goes first.
    pub fn first(&self) -> &CoordinatorUrl {
        &self.0[0]
    }
}

impl From<CoordinatorUrl> for CoordinatorUrls {
    fn from(url: CoordinatorUrl) -> Self {
        Self(vec![url])
    }
}

impl FromStr for CoordinatorUrls {
    type Err = UrlError;

    /// Comma-separated coordinator URLs, each as [`CoordinatorUrl`] reads it.
    fn from_str(text: &str) -> Result<Self, UrlError> {
        let urls = text
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<CoordinatorUrl>, _>>()?;
        Self::new(urls).ok_or_else(|| UrlError::Malformed {
            url: text.to_owned(),
        })
    }
}

impl fmt::Display for CoordinatorUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No HTTP exchange happened: the connection was refused, the name did not resolve, or
    /// the coordinator did not answer in time.
    #[error("cannot reach the coordinator at {url}: {}", describe(.cause))]
    Unreachable {
        /// The coordinator's base URL.
        url: CoordinatorUrl,
        /// What the transport reported.
        #[source]
        cause: ureq::Error,
    },
    /// The exchange broke down after the connection was made (for example, the peer does not
    /// speak HTTP, or did not answer in time).
    #[error("talking to the coordinator at {url} failed: {}", describe(.cause))]
    Transport {
        /// The coordinator's base URL.
        url: CoordinatorUrl,
        /// What the transport reported.
        #[source]
        cause: ureq::Error,
    },
    /// A write may have reached the coordinator, but no answer came: whether it was carried
    /// out is unknown, so it was not sent to another coordinator.
    #[error(
        "no answer from the coordinator at {url} ({}) after the request was sent: whether it \
         was carried out is unknown; look (for example with a list command) before repeating it",
        describe(.cause)
    )]
    Unanswered {
        /// The coordinator's base URL.
        url: CoordinatorUrl,
        /// What the transport reported.
        #[source]
        cause: ureq::Error,
    },
    /// Several coordinators were tried and none answered; each failure, in order.
    #[error("no coordinator answered: {}", list(.attempts))]
    Unavailable {
        /// Why each coordinator did not answer ([`ClientError::Unreachable`] or
        /// [`ClientError::Transport`]).
        attempts: Vec<ClientError>,
    },
    /// The coordinator refused the admin token (HTTP 401).
    #[error("the coordinator refused the admin token (401)")]
    Unauthorized,
    /// The coordinator answered with an error status and, usually, a message.
    #[error("the coordinator answered {}: {message}", status_line(*.status))]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The server's `error` message, or a stand-in when it sent none.
        message: String,
    },
    /// The coordinator answered success with a body that is not JSON at all.
    #[error("the coordinator sent an unexpected answer ({status}): not JSON: {cause}")]
    NotJson {
        /// The HTTP status code.
        status: u16,
        /// Why the body is not JSON.
        #[source]
        cause: serde_json::Error,
    },
    /// The coordinator answered success with JSON that is not the answer expected (for
    /// example a field of the wrong type: a coordinator of another version, or not one at all).
    #[error("the coordinator sent an unexpected answer ({status}): {cause}")]
    BadResponse {
        /// The HTTP status code.
        status: u16,
        /// What did not fit the answer's type.
        #[source]
        cause: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status the coordinator answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Unauthorized => Some(401),
            Self::Api { status, .. }
            | Self::NotJson { status, .. }
            | Self::BadResponse { status, .. } => Some(*status),
            Self::Unreachable { .. }
            | Self::Transport { .. }
            | Self::Unanswered { .. }
            | Self::Unavailable { .. } => None,
        }
    }
}

/// Errors joined with `; `.
fn list(errors: &[ClientError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The transport error as one line, without ureq's `io:` prefix for plain socket errors.
fn describe(cause: &ureq::Error) -> String {
    match cause {
        ureq::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// `404 Not Found`, or just `599` for a code without a standard reason.
fn status_line(status: u16) -> String {
    let reason = ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|code| code.canonical_reason());
    match reason {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// What a data-returning route answered: the typed answer and the JSON as sent.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    /// The answer, read into its [`meshlink_api`] type.
    pub value: T,
    /// The answer exactly as the server sent it.
    pub json: Value,
}

/// The HTTP methods the admin API uses.
#[derive(Debug, Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    /// Whether sending the request twice is the same as sending it once.
    fn is_read(self) -> bool {
        matches!(self, Method::Get)
    }
}

/// A client for a mesh's coordinators, holding the admin token. See the module
/// documentation for how it picks a coordinator.
pub struct AdminClient {
    urls: CoordinatorUrls,
    token: AdminToken,
    agent: ureq::Agent,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("urls", &self.urls)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client for the coordinators at `urls` (tried in order), authenticating with `token`,
    /// waiting [`CONNECT_TIMEOUT`] for a connection and [`REQUEST_TIMEOUT`] for a whole
    /// exchange.
    pub fn new(urls: CoordinatorUrls, token: AdminToken) -> Self {
        Self::with_timeouts(urls, token, CONNECT_TIMEOUT, REQUEST_TIMEOUT)
    }

    /// [`AdminClient::new`] with other timeouts: `connect` for a connection to one
    /// coordinator, `request` for one whole exchange with it.
    pub fn with_timeouts(
        urls: CoordinatorUrls,
        token: AdminToken,
        connect: Duration,
        request: Duration,
    ) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_connect(Some(connect))
            .timeout_global(Some(request))
            .user_agent(concat!("meshctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Self { urls, token, agent }
    }

    /// The coordinators' base URLs, in the order they are tried.
    pub fn urls(&self) -> &CoordinatorUrls {
        &self.urls
    }

    /// `POST /v1/networks`: creates a network.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; a name already taken is [`ClientError::Api`] with status 409.
    pub fn create_network(&self, request: &CreateNetwork) -> Result<Reply<Network>, ClientError> {
        self.fetch(Method::Post, "/v1/networks", None, Some(request))
    }

    /// `GET /v1/networks`: every network.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn networks(&self) -> Result<Reply<Vec<Network>>, ClientError> {
        self.fetch(Method::Get, "/v1/networks", None, None::<&()>)
    }

    /// `POST /v1/tokens`: creates a join token; the answer holds its secret text.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn create_token(&self, request: &CreateToken) -> Result<Reply<CreatedToken>, ClientError> {
        self.fetch(Method::Post, "/v1/tokens", None, Some(request))
    }

    /// `GET /v1/tokens`: every join token, without secret text.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn tokens(&self) -> Result<Reply<Vec<Token>>, ClientError> {
        self.fetch(Method::Get, "/v1/tokens", None, None::<&()>)
    }

    /// `DELETE /v1/tokens/{id}`: revokes a join token.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; an unknown id is [`ClientError::Api`] with status 404.
    pub fn revoke_token(&self, id: TokenId) -> Result<(), ClientError> {
        let path = format!("/v1/tokens/{id}");
        self.send(Method::Delete, &path, None, None::<&()>)
            .map(drop)
    }

    /// `GET /v1/nodes`: every node, or those of one network.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn nodes(&self, network: Option<&str>) -> Result<Reply<Vec<Node>>, ClientError> {
        self.fetch(Method::Get, "/v1/nodes", network, None::<&()>)
    }

    /// `GET /v1/nodes/{node}`: one node, by id or name. `network` disambiguates a name used
    /// in several networks.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; an unknown node is [`ClientError::Api`] with status 404.
    pub fn node(&self, node: &str, network: Option<&str>) -> Result<Reply<Node>, ClientError> {
        let path = format!("/v1/nodes/{}", encode(node));
        self.fetch(Method::Get, &path, network, None::<&()>)
    }

    /// `POST /v1/nodes/{node}/revoke`: cuts a node off; the answer is the revoked node.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn revoke_node(
        &self,
        node: &str,
        network: Option<&str>,
    ) -> Result<Reply<Node>, ClientError> {
        let path = format!("/v1/nodes/{}/revoke", encode(node));
        self.fetch(Method::Post, &path, network, None::<&()>)
    }

    /// `POST /v1/nodes/{node}/rotate-key`: rotates a node's WireGuard key. A node with an
    /// agent is asked to (`public_key` `None`: its agent makes the pair), and the answer is the
    /// node with the time the rotation was asked; an external node is given its device's new
    /// `public_key`, which is its key at once.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; a revoked node is [`ClientError::Api`] with status 409, an
    /// external node without `public_key` (or a node with an agent with one) status 400.
    pub fn rotate_key(
        &self,
        node: &str,
        network: Option<&str>,
        public_key: Option<PublicKey>,
    ) -> Result<Reply<Node>, ClientError> {
        let path = format!("/v1/nodes/{}/rotate-key", encode(node));
        let body = public_key.map(|key| RotateKey {
            public_key: Some(key),
        });
        self.fetch(Method::Post, &path, network, body.as_ref())
    }

    /// `POST /v1/external-nodes`: registers a device that runs stock WireGuard as a node,
    /// reached through a gateway node; the answer holds what its configuration needs.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; a name or key already taken is [`ClientError::Api`] with status
    /// 409, an unknown network or gateway status 404, a gateway that cannot be one status 400.
    pub fn add_external(
        &self,
        request: &CreateExternalNode,
    ) -> Result<Reply<ExternalNode>, ClientError> {
        self.fetch(Method::Post, "/v1/external-nodes", None, Some(request))
    }

    /// `GET /v1/external-nodes/{node}`: an external node, by id or name, with what its
    /// configuration needs. `network` disambiguates a name used in several networks.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; a node with an agent is [`ClientError::Api`] with status 400.
    pub fn external(
        &self,
        node: &str,
        network: Option<&str>,
    ) -> Result<Reply<ExternalNode>, ClientError> {
        let path = format!("/v1/external-nodes/{}", encode(node));
        self.fetch(Method::Get, &path, network, None::<&()>)
    }

    /// `DELETE /v1/nodes/{node}`: removes a node.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn delete_node(&self, node: &str, network: Option<&str>) -> Result<(), ClientError> {
        let path = format!("/v1/nodes/{}", encode(node));
        self.send(Method::Delete, &path, network, None::<&()>)
            .map(drop)
    }

    /// `POST /v1/workloads`: creates a detached workload.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; a name or address already taken is [`ClientError::Api`] with
    /// status 409.
    pub fn create_workload(
        &self,
        request: &CreateWorkload,
    ) -> Result<Reply<Workload>, ClientError> {
        self.fetch(Method::Post, "/v1/workloads", None, Some(request))
    }

    /// `GET /v1/workloads`: every workload, or those of one network.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn workloads(&self, network: Option<&str>) -> Result<Reply<Vec<Workload>>, ClientError> {
        self.fetch(Method::Get, "/v1/workloads", network, None::<&()>)
    }

    /// `GET /v1/workloads/{name}`: one workload. `network` may be left out when the name is
    /// used in one network only.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; an unknown workload is [`ClientError::Api`] with status 404, a
    /// name used in several networks without `network` one with status 409.
    pub fn workload(
        &self,
        name: &str,
        network: Option<&str>,
    ) -> Result<Reply<Workload>, ClientError> {
        let path = format!("/v1/workloads/{}", encode(name));
        self.fetch(Method::Get, &path, network, None::<&()>)
    }

    /// `DELETE /v1/workloads/{name}`: removes a workload and frees its address.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn delete_workload(&self, name: &str, network: Option<&str>) -> Result<(), ClientError> {
        let path = format!("/v1/workloads/{}", encode(name));
        self.send(Method::Delete, &path, network, None::<&()>)
            .map(drop)
    }

    /// `POST /v1/workloads/{name}/attach`: gives a workload to `node` (a name or an id).
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn attach_workload(
        &self,
        name: &str,
        node: &str,
        network: Option<&str>,
    ) -> Result<Reply<MovedWorkload>, ClientError> {
        let path = format!("/v1/workloads/{}/attach", encode(name));
        let body = MoveWorkload {
            node: node.to_owned(),
            live: false,
        };
        self.fetch(Method::Post, &path, network, Some(&body))
    }

    /// `POST /v1/workloads/{name}/move`: moves a workload to `node` (a name or an id).
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn move_workload(
        &self,
        name: &str,
        node: &str,
        network: Option<&str>,
    ) -> Result<Reply<MovedWorkload>, ClientError> {
        self.move_to(name, node, network, false)
    }

    /// `POST /v1/workloads/{name}/move` with `live`: a live migration to `node`.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; a 409 when the application did not hand over (nothing moved).
    pub fn migrate_workload(
        &self,
        name: &str,
        node: &str,
        network: Option<&str>,
    ) -> Result<Reply<MovedWorkload>, ClientError> {
        self.move_to(name, node, network, true)
    }

    /// `POST /v1/workloads/{name}/move`, live or not.
    fn move_to(
        &self,
        name: &str,
        node: &str,
        network: Option<&str>,
        live: bool,
    ) -> Result<Reply<MovedWorkload>, ClientError> {
        let path = format!("/v1/workloads/{}/move", encode(name));
        let body = MoveWorkload {
            node: node.to_owned(),
            live,
        };
        self.fetch(Method::Post, &path, network, Some(&body))
    }

    /// `POST /v1/workloads/{name}/detach`: takes a workload from its holder; nobody answers
    /// for its address until it is attached again.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn detach_workload(
        &self,
        name: &str,
        network: Option<&str>,
    ) -> Result<Reply<MovedWorkload>, ClientError> {
        let path = format!("/v1/workloads/{}/detach", encode(name));
        self.fetch(Method::Post, &path, network, None::<&()>)
    }

    /// `GET /v1/status`: the coordinator's own state.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn status(&self) -> Result<Reply<Status>, ClientError> {
        self.fetch(Method::Get, "/v1/status", None, None::<&()>)
    }

    /// `GET /v1/relays`: the coordinator's embedded relay and the standalone relays it
    /// vouches for.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`].
    pub fn relays(&self) -> Result<Reply<Relays>, ClientError> {
        self.fetch(Method::Get, "/v1/relays", None, None::<&()>)
    }

    /// Sets a network's policy.
    ///
    /// # Errors
    /// Any [`ClientError`]; a bad file is a 400 naming its line and field.
    pub fn set_policy(
        &self,
        network: &str,
        request: &SetPolicy,
    ) -> Result<Reply<PolicyChanged>, ClientError> {
        let path = format!("/v1/networks/{}/policy", encode(network));
        self.fetch(Method::Post, &path, None, Some(request))
    }

    /// The policy in force in a network.
    ///
    /// # Errors
    /// Any [`ClientError`]; 404 when the network never had one.
    pub fn policy(&self, network: &str) -> Result<Reply<PolicyVersion>, ClientError> {
        let path = format!("/v1/networks/{}/policy", encode(network));
        self.fetch(Method::Get, &path, None, None::<&()>)
    }

    /// Clears a network's policy: the network is open again.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn clear_policy(&self, network: &str) -> Result<Reply<PolicyChanged>, ClientError> {
        let path = format!("/v1/networks/{}/policy", encode(network));
        self.fetch(Method::Delete, &path, None, None::<&()>)
    }

    /// Every version of a network's policy, oldest first.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn policy_history(&self, network: &str) -> Result<Reply<Vec<PolicyVersion>>, ClientError> {
        let path = format!("/v1/networks/{}/policy/history", encode(network));
        self.fetch(Method::Get, &path, None, None::<&()>)
    }

    /// Restores an earlier version of a network's policy, as a new version.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn rollback_policy(
        &self,
        network: &str,
        version: u64,
    ) -> Result<Reply<PolicyChanged>, ClientError> {
        let path = format!("/v1/networks/{}/policy/rollback", encode(network));
        self.fetch(Method::Post, &path, None, Some(&RollbackPolicy { version }))
    }

    /// The verdict of the policy on one flow.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn test_flow(&self, request: &TestFlow) -> Result<Reply<FlowVerdict>, ClientError> {
        self.fetch(Method::Post, "/v1/policy/test", None, Some(request))
    }

    /// Adds (`+TAG`) and removes (`-TAG`) a node's tags.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn tag_node(
        &self,
        node: &str,
        network: Option<&str>,
        edits: Vec<String>,
    ) -> Result<Reply<Node>, ClientError> {
        let path = format!("/v1/nodes/{}/tags", encode(node));
        self.fetch(Method::Post, &path, network, Some(&EditTags { edits }))
    }

    /// Adds (`+TAG`) and removes (`-TAG`) a workload's tags.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn tag_workload(
        &self,
        name: &str,
        network: Option<&str>,
        edits: Vec<String>,
    ) -> Result<Reply<Workload>, ClientError> {
        let path = format!("/v1/workloads/{}/tags", encode(name));
        self.fetch(Method::Post, &path, network, Some(&EditTags { edits }))
    }

    /// Makes an admin token (its secret is in the answer, and nowhere else ever).
    ///
    /// # Errors
    /// Any [`ClientError`]; 403 unless this token is an admin for every network.
    pub fn create_admin_token(
        &self,
        request: &CreateAdminToken,
    ) -> Result<Reply<CreatedAdminToken>, ClientError> {
        self.fetch(Method::Post, "/v1/admin-tokens", None, Some(request))
    }

    /// Every admin token, without secrets.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn admin_tokens(&self) -> Result<Reply<Vec<AdminTokenView>>, ClientError> {
        self.fetch(Method::Get, "/v1/admin-tokens", None, None::<&()>)
    }

    /// Revokes an admin token.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn revoke_admin_token(&self, id: u64) -> Result<(), ClientError> {
        let path = format!("/v1/admin-tokens/{id}");
        self.send(Method::Delete, &path, None, None::<&()>)
            .map(drop)
    }

    /// Entries of the audit log, oldest first.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub fn audit(&self, filter: &AuditFilter) -> Result<Reply<Vec<AuditEntry>>, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = filter.since {
            query.push(format!("since={s}"));
        }
        if let Some(n) = &filter.node {
            query.push(format!("node={}", encode(n)));
        }
        if let Some(l) = filter.limit {
            query.push(format!("limit={l}"));
        }
        let mut path = "/v1/audit".to_string();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.fetch(Method::Get, &path, None, None::<&()>)
    }

    /// Sends a request and reads the JSON answer into `T` as well.
    fn fetch<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        network: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<Reply<T>, ClientError> {
        let (status, json) = self.send(method, path, network, body)?;
        let value =
            T::deserialize(&json).map_err(|cause| ClientError::BadResponse { status, cause })?;
        Ok(Reply { value, json })
    }

    /// Sends a request to the first coordinator that answers (see the module documentation)
    /// and returns the success status with its JSON body (`null` when the body is empty, as
    /// for 204), or the error the answer means.
    fn send(
        &self,
        method: Method,
        path: &str,
        network: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<(u16, Value), ClientError> {
        let mut attempts = Vec::new();
        for base in self.urls.iter() {
            let failure = match self.exchange(base, method, path, network, body) {
                Ok((status, bytes)) => return interpret(status, &bytes),
                Err(failure) => failure,
            };
            let url = base.clone();
            let error = match failure {
                Failure::NotDelivered(cause) => ClientError::Unreachable { url, cause },
                Failure::Exchange(cause) if method.is_read() => {
                    ClientError::Transport { url, cause }
                }
                Failure::Exchange(cause) => return Err(ClientError::Unanswered { url, cause }),
            };
            attempts.push(error);
        }
        Err(if attempts.len() == 1 {
            attempts.remove(0)
        } else {
            ClientError::Unavailable { attempts }
        })
    }

    /// One exchange with the coordinator at `base`: the status and body of its answer.
    fn exchange(
        &self,
        base: &CoordinatorUrl,
        method: Method,
        path: &str,
        network: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let mut url = format!("{base}{path}");
        if let Some(network) = network {
            url.push_str("?network=");
            url.push_str(&encode(network));
        }
        let authorization = format!("Bearer {}", self.token.secret());
        let result = match method {
            Method::Get => self
                .agent
                .get(&url)
                .header("Authorization", &authorization)
                .call(),
            Method::Delete => self
                .agent
                .delete(&url)
                .header("Authorization", &authorization)
                .call(),
            Method::Post => {
                let request = self
                    .agent
                    .post(&url)
                    .header("Authorization", &authorization);
                match body {
                    Some(body) => request.send_json(body),
                    None => request.send_empty(),
                }
            }
        };
        let mut response = result.map_err(Failure::of)?;
        let status = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(RESPONSE_LIMIT)
            .read_to_vec()
            .map_err(Failure::Exchange)?;
        Ok((status, bytes))
    }
}

/// Why an exchange with one coordinator gave no answer.
#[derive(Debug)]
enum Failure {
    /// The request surely never reached the coordinator: no connection was made.
    NotDelivered(ureq::Error),
    /// The exchange failed after the connection was made, or at a point where that is not
    /// known: the coordinator may have received the request.
    Exchange(ureq::Error),
}

impl Failure {
    /// Sorts a transport error by whether the request may have been delivered. Only errors
    /// that can happen before a connection exists count as "not delivered": a name that did
    /// not resolve, a connection refused, unroutable or timed out while connecting.
    fn of(cause: ureq::Error) -> Self {
        use std::io::ErrorKind;
        let before_connecting = match &cause {
            ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => true,
            ureq::Error::Io(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::NetworkDown
                    | ErrorKind::AddrNotAvailable
            ),
            _ => false,
        };
        if before_connecting {
            Failure::NotDelivered(cause)
        } else {
            Failure::Exchange(cause)
        }
    }
}

/// Turns a status and body into the JSON answer or the error it means.
fn interpret(status: u16, body: &[u8]) -> Result<(u16, Value), ClientError> {
    if status == 401 {
        return Err(ClientError::Unauthorized);
    }
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(Value::Null)
    } else {
        serde_json::from_slice::<Value>(body)
    };
    if (200..300).contains(&status) {
        return parsed
            .map(|json| (status, json))
            .map_err(|cause| ClientError::NotJson { status, cause });
    }
    let message = match &parsed {
        Ok(Value::Object(fields)) => match fields.get("error") {
            Some(Value::String(message)) => message.clone(),
            Some(other) if !other.is_null() => other.to_string(),
            _ => String::from_utf8_lossy(body).into_owned(),
        },
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let message = one_line(&message);
    let message = if message.is_empty() {
        "no error message".to_owned()
    } else {
        message
    };
    Err(ClientError::Api { status, message })
}

/// Makes server (or agent) text safe to print on one terminal line: control characters become
/// spaces, runs of space collapse, and the text is cut at [`MESSAGE_LIMIT`] characters.
pub(crate) fn one_line(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = out.char_indices().nth(MESSAGE_LIMIT) {
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// Percent-encodes text for one URL path segment or query value: everything but ASCII letters,
/// digits and `-._~` is escaped, and a segment made only of dots is escaped whole so that it
/// cannot mean "this directory" or "the parent".
fn encode(text: &str) -> String {
    let all_dots = !text.is_empty() && text.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let plain = byte.is_ascii_alphanumeric() || b"-_~".contains(&byte) || byte == b'.';
        if plain && !(all_dots && byte == b'.') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_urls() {
        let url = |s: &str| s.parse::<CoordinatorUrl>().map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:7444"),
            Ok("http://127.0.0.1:7444".into())
        );
        assert_eq!(
            url("http://127.0.0.1:7444/"),
            Ok("http://127.0.0.1:7444".into())
        );
        assert_eq!(url("HTTP://[::1]:7444"), Ok("http://[::1]:7444".into()));
        assert_eq!(url("localhost:7444"), Ok("http://localhost:7444".into()));
        assert_eq!(url("http://h/mesh/"), Ok("http://h/mesh".into()));
        assert!(matches!(url("https://h:7444"), Err(UrlError::Https { .. })));
        assert!(matches!(url("ftp://h"), Err(UrlError::Malformed { .. })));
        assert!(matches!(url("http://"), Err(UrlError::Malformed { .. })));
        assert!(matches!(
            url("http://h?x=1"),
            Err(UrlError::Malformed { .. })
        ));
        assert!(matches!(url("http://u@h"), Err(UrlError::Malformed { .. })));
        assert!(matches!(url("http://a b"), Err(UrlError::Malformed { .. })));
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(encode("web-1.prod_x~"), "web-1.prod_x~");
        assert_eq!(encode("a/b c?#%"), "a%2Fb%20c%3F%23%25");
        assert_eq!(encode(".."), "%2E%2E");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn answers_are_interpreted() {
        assert_eq!(interpret(204, b"").unwrap(), (204, Value::Null));
        assert_eq!(interpret(200, b"[1]").unwrap().1, serde_json::json!([1]));
        assert!(matches!(
            interpret(401, b"{}"),
            Err(ClientError::Unauthorized)
        ));
        let err = interpret(200, b"<html>").unwrap_err();
        assert!(matches!(err, ClientError::NotJson { status: 200, .. }));
        assert!(
            err.to_string()
                .starts_with("the coordinator sent an unexpected answer (200): not JSON: "),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
        let err = interpret(409, br#"{"error":"network \"prod\" exists"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"the coordinator answered 409 Conflict: network "prod" exists"#
        );
        let err = interpret(502, b"bad gateway\n\x1b[31mred").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the coordinator answered 502 Bad Gateway: bad gateway [31mred"
        );
        let err = interpret(500, b"").unwrap_err();
        assert!(err.to_string().ends_with("no error message"), "{err}");
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(2 * MESSAGE_LIMIT);
        assert_eq!(one_line(&long).chars().count(), MESSAGE_LIMIT + 3);
    }
}
