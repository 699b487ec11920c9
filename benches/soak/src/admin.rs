//! The admin API calls the soak makes (`coordinator/src/admin.rs` documents the routes), with
//! the request and answer types of `meshlink-api`. Blocking (ureq): called from the
//! operator's thread, or from `spawn_blocking`.

use std::time::Duration;

use meshlink_api as api;
use serde::de::DeserializeOwned;
use serde::Serialize;

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

impl AdminError {
    /// The HTTP status, or 0 when there was none.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::Status { status, .. } => *status,
            _ => 0,
        }
    }
}

/// An admin API client for one network.
#[derive(Debug, Clone)]
pub struct Admin {
    base: String,
    authorization: String,
    network: String,
    agent: ureq::Agent,
}

impl Admin {
    /// A client for `base` (`http://127.0.0.1:7444`) with the admin token `token`, acting on
    /// `network`.
    pub fn new(base: &str, token: &str, network: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Admin {
            base: base.trim_end_matches('/').to_string(),
            authorization: format!("Bearer {}", token.trim()),
            network: network.to_string(),
            agent,
        }
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&dyn erased::Body>,
    ) -> Result<Option<T>, AdminError> {
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
                .header("Content-Type", "application/json")
                .send(body.json()),
            ("POST", None) => self
                .agent
                .post(&url)
                .header("Authorization", &self.authorization)
                .send_empty(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .call(),
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
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AdminError::Answer {
                url,
                message: e.to_string(),
            })
    }

    fn expect<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&dyn erased::Body>,
    ) -> Result<T, AdminError> {
        self.call(method, path, body)?
            .ok_or_else(|| AdminError::Answer {
                url: format!("{}{path}", self.base),
                message: "an empty answer".into(),
            })
    }

    /// `POST /v1/tokens`: a token of the network for any number of joins, valid a day.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn create_token(&self) -> Result<String, AdminError> {
        let body = api::CreateToken {
            network: self.network.clone(),
            tags: vec!["soak".into()],
            expires_in_secs: Some(api::TokenLifetime::Secs(24 * 3600)),
            uses: Some(api::TokenUses::Unlimited),
        };
        let created: api::CreatedToken = self.expect("POST", "/v1/tokens", Some(&body))?;
        Ok(created.token)
    }

    /// The network from `GET /v1/networks`.
    ///
    /// # Errors
    /// [`AdminError`]; [`AdminError::Answer`] when there is no such network.
    pub fn network_state(&self) -> Result<api::Network, AdminError> {
        let list: Vec<api::Network> = self.expect("GET", "/v1/networks", None)?;
        list.into_iter()
            .find(|n| n.name == self.network)
            .ok_or_else(|| AdminError::Answer {
                url: format!("{}/v1/networks", self.base),
                message: format!("no network named {}", self.network),
            })
    }

    /// `GET /v1/nodes?network=`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn nodes(&self) -> Result<Vec<api::Node>, AdminError> {
        self.expect("GET", &format!("/v1/nodes?network={}", self.network), None)
    }

    /// `GET /v1/workloads?network=`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn workloads(&self) -> Result<Vec<api::Workload>, AdminError> {
        self.expect(
            "GET",
            &format!("/v1/workloads?network={}", self.network),
            None,
        )
    }

    /// `POST /v1/workloads`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn create_workload(
        &self,
        name: &str,
        address: std::net::Ipv4Addr,
        standby: Vec<String>,
        allowed: Vec<String>,
    ) -> Result<api::Workload, AdminError> {
        let body = api::CreateWorkload {
            name: name.to_string(),
            network: self.network.clone(),
            address: Some(address),
            standby,
            allowed,
            tags: Vec::new(),
        };
        self.expect("POST", "/v1/workloads", Some(&body))
    }

    /// `DELETE /v1/workloads/{name}`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn delete_workload(&self, name: &str) -> Result<(), AdminError> {
        self.call::<serde_json::Value>(
            "DELETE",
            &format!("/v1/workloads/{name}?network={}", self.network),
            None,
        )
        .map(drop)
    }

    /// `POST /v1/workloads/{name}/move` to `node`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn move_workload(&self, name: &str, node: &str) -> Result<api::MovedWorkload, AdminError> {
        let body = api::MoveWorkload {
            node: node.to_string(),
        };
        self.expect(
            "POST",
            &format!("/v1/workloads/{name}/move?network={}", self.network),
            Some(&body),
        )
    }

    /// `POST /v1/workloads/{name}/detach`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn detach_workload(&self, name: &str) -> Result<api::MovedWorkload, AdminError> {
        self.expect(
            "POST",
            &format!("/v1/workloads/{name}/detach?network={}", self.network),
            None,
        )
    }

    /// `POST /v1/nodes/{name}/revoke`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn revoke_node(&self, name: &str) -> Result<(), AdminError> {
        self.call::<serde_json::Value>(
            "POST",
            &format!("/v1/nodes/{name}/revoke?network={}", self.network),
            None,
        )
        .map(drop)
    }

    /// `DELETE /v1/nodes/{name}`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn delete_node(&self, name: &str) -> Result<(), AdminError> {
        self.call::<serde_json::Value>(
            "DELETE",
            &format!("/v1/nodes/{name}?network={}", self.network),
            None,
        )
        .map(drop)
    }
}

/// Request bodies as JSON text, so that `call` takes any of them.
mod erased {
    /// A request body.
    pub trait Body {
        /// The body as JSON.
        fn json(&self) -> String;
    }

    impl<T: super::Serialize> Body for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
