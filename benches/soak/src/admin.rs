//! The admin API calls the soak makes, through meshctl's client (`meshctl::client`, typed with
//! `meshlink-api`), bound to the soak's network. Blocking (ureq): called from the operator's
//! thread, or from `spawn_blocking`.

use std::sync::Arc;
use std::time::Duration;

use meshctl::admin_token::AdminToken;
use meshctl::client::{AdminClient, ClientError, CoordinatorUrls};
use meshlink_api as api;

/// Why an admin call failed: meshctl's client error (its `status()` is the HTTP status, when
/// the coordinator answered).
pub type AdminError = ClientError;

/// The coordinator's admin API, acting on one network.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Arc<AdminClient>,
    network: api::NetworkName,
}

impl Admin {
    /// A client for `base` (`http://127.0.0.1:7444`) with the admin token `token`, acting on
    /// `network`.
    ///
    /// # Errors
    /// A message naming the URL when it is not usable.
    pub fn new(base: &str, token: AdminToken, network: &str) -> anyhow::Result<Self> {
        let urls: CoordinatorUrls = base
            .parse()
            .map_err(|e| anyhow::anyhow!("--admin {base}: {e}"))?;
        let network = network
            .parse()
            .map_err(|e| anyhow::anyhow!("--network: {e}"))?;
        Ok(Admin {
            client: Arc::new(AdminClient::with_timeouts(
                urls,
                token,
                Duration::from_secs(5),
                Duration::from_secs(30),
            )),
            network,
        })
    }

    fn network(&self) -> Option<&str> {
        Some(&self.network)
    }

    /// `POST /v1/tokens`: a token of the network for any number of joins, valid a day.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn create_token(&self) -> Result<String, AdminError> {
        let request = api::CreateToken {
            network: self.network.clone(),
            tags: vec!["soak".into()],
            expires_in_secs: Some(api::TokenLifetime::Secs(24 * 3600)),
            uses: Some(api::TokenUses::Unlimited),
        };
        Ok(self.client.create_token(&request)?.value.token)
    }

    /// The network from `GET /v1/networks`.
    ///
    /// # Errors
    /// [`AdminError`]; `anyhow` names a missing network.
    pub fn network_state(&self) -> anyhow::Result<api::Network> {
        self.client
            .networks()?
            .value
            .into_iter()
            .find(|n| self.network == n.name.as_str())
            .ok_or_else(|| anyhow::anyhow!("no network named {}", self.network))
    }

    /// `GET /v1/nodes?network=`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn nodes(&self) -> Result<Vec<api::Node>, AdminError> {
        Ok(self.client.nodes(self.network())?.value)
    }

    /// `GET /v1/workloads?network=`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn workloads(&self) -> Result<Vec<api::Workload>, AdminError> {
        Ok(self.client.workloads(self.network())?.value)
    }

    /// `POST /v1/workloads`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn create_workload(
        &self,
        name: &api::WorkloadName,
        address: std::net::Ipv4Addr,
        standby: Vec<String>,
        allowed: Vec<String>,
    ) -> Result<api::Workload, AdminError> {
        let request = api::CreateWorkload {
            name: name.clone(),
            network: self.network.clone(),
            address: Some(address),
            standby,
            allowed,
            tags: Vec::new(),
        };
        Ok(self.client.create_workload(&request)?.value)
    }

    /// `DELETE /v1/workloads/{name}`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn delete_workload(&self, name: &str) -> Result<(), AdminError> {
        self.client.delete_workload(name, self.network())
    }

    /// `POST /v1/workloads/{name}/move` to `node`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn move_workload(&self, name: &str, node: &str) -> Result<api::MovedWorkload, AdminError> {
        Ok(self.client.move_workload(name, node, self.network())?.value)
    }

    /// `POST /v1/workloads/{name}/detach`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn detach_workload(&self, name: &str) -> Result<api::MovedWorkload, AdminError> {
        Ok(self.client.detach_workload(name, self.network())?.value)
    }

    /// `POST /v1/nodes/{name}/revoke`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn revoke_node(&self, name: &str) -> Result<(), AdminError> {
        self.client.revoke_node(name, self.network()).map(drop)
    }

    /// `DELETE /v1/nodes/{name}`.
    ///
    /// # Errors
    /// [`AdminError`].
    pub fn delete_node(&self, name: &str) -> Result<(), AdminError> {
        self.client.delete_node(name, self.network())
    }
}
