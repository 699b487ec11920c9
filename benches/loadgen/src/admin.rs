//! The few admin API calls the benchmark makes (`coordinator/src/admin.rs` documents the
//! routes): create a network, create a join token, read a network's version and how many of
//! its nodes are online. Blocking (ureq); call it from a blocking thread.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The coordinator could not be reached, or the exchange broke down.
    #[error("admin API {url}: {message}")]
    Transport {
        /// The request's URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The coordinator answered with an error status.
    #[error("admin API {url}: HTTP {status}: {body}")]
    Status {
        /// The request's URL.
        url: String,
        /// The status code.
        status: u16,
        /// The answer's body.
        body: String,
    },
    /// The answer is not what the route documents.
    #[error("admin API {url}: unexpected answer: {message}")]
    Answer {
        /// The request's URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

/// A network as `GET /v1/networks` lists it (the fields used here).
#[derive(Debug, Clone, Deserialize)]
pub struct NetworkState {
    /// Name.
    pub name: String,
    /// Map version.
    pub version: u64,
    /// Nodes that are not revoked.
    pub nodes: usize,
    /// Nodes with a live session.
    pub online: usize,
}

/// An admin API client.
#[derive(Debug, Clone)]
pub struct Admin {
    base: String,
    authorization: String,
    agent: ureq::Agent,
}

impl Admin {
    /// A client for `base` (`http://127.0.0.1:7444`) with the admin token `token`.
    pub fn new(base: &str, token: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Admin {
            base: base.trim_end_matches('/').to_string(),
            authorization: format!("Bearer {}", token.trim()),
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, AdminError> {
        let url = format!("{}{path}", self.base);
        let transport = |e: ureq::Error| AdminError::Transport {
            url: url.clone(),
            message: e.to_string(),
        };
        let result = match (method, body) {
            ("POST", Some(body)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.authorization)
                .send_json(&body),
            _ => self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call(),
        };
        let mut response = result.map_err(transport)?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(AdminError::Status {
                url,
                status,
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| AdminError::Answer {
            url,
            message: e.to_string(),
        })
    }

    /// `POST /v1/networks`.
    ///
    /// # Errors
    /// [`AdminError`]; a name or prefix already taken is a 409 [`AdminError::Status`].
    pub fn create_network(&self, name: &str, cidr: &str) -> Result<(), AdminError> {
        self.call(
            "POST",
            "/v1/networks",
            Some(json!({"name": name, "cidr": cidr})),
        )
        .map(drop)
    }

    /// `POST /v1/tokens` for `uses` joins; returns the token text (`mlj1_...`).
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn create_token(&self, network: &str, uses: u64) -> Result<String, AdminError> {
        let url = format!("{}/v1/tokens", self.base);
        let answer = self.call(
            "POST",
            "/v1/tokens",
            Some(json!({"network": network, "uses": uses, "tags": ["loadgen"]})),
        )?;
        answer["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AdminError::Answer {
                url,
                message: "no token text".into(),
            })
    }

    /// `POST /v1/networks/{network}/policy`: sets the network's policy.
    ///
    /// # Errors
    /// [`AdminError`]; a policy the coordinator refuses is a 400 [`AdminError::Status`].
    pub fn set_policy(&self, network: &str, source: &str) -> Result<(), AdminError> {
        self.call(
            "POST",
            &format!("/v1/networks/{network}/policy"),
            Some(json!({ "source": source })),
        )
        .map(drop)
    }

    /// `POST /v1/workloads`: a workload in `network`, no holder yet.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn create_workload(&self, network: &str, name: &str) -> Result<(), AdminError> {
        self.call(
            "POST",
            "/v1/workloads",
            Some(json!({"name": name, "network": network})),
        )
        .map(drop)
    }

    /// `POST /v1/workloads/{name}/move?network=`: gives the workload to `node` (a name or an
    /// id); returns the coordinator's answer (`took_ms`, `prepared_ms`).
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn move_workload(
        &self,
        network: &str,
        name: &str,
        node: &str,
    ) -> Result<Value, AdminError> {
        self.call(
            "POST",
            &format!("/v1/workloads/{name}/move?network={network}"),
            Some(json!({ "node": node })),
        )
    }

    /// The network named `name` from `GET /v1/networks`.
    ///
    /// # Errors
    /// [`AdminError`], [`AdminError::Answer`] when there is no such network.
    pub fn network(&self, name: &str) -> Result<NetworkState, AdminError> {
        let url = format!("{}/v1/networks", self.base);
        let answer = self.call("GET", "/v1/networks", None)?;
        let list: Vec<NetworkState> =
            serde_json::from_value(answer).map_err(|e| AdminError::Answer {
                url: url.clone(),
                message: e.to_string(),
            })?;
        list.into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| AdminError::Answer {
                url,
                message: format!("no network named {name}"),
            })
    }
}
