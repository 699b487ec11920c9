//! The real agents, as `meshlink-agent status -o json` shows them (its userspace API's
//! `get=meshlink`): the workloads each answers for now, its map's version, the generations it
//! knows.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use meshlink_proto::NodeId;

use crate::fencing::Holding;

/// One real agent.
#[derive(Debug, Clone)]
pub struct RealAgent {
    /// Its node name.
    pub name: String,
    /// Its node id (from the admin API).
    pub node: NodeId,
    /// Its interface.
    pub interface: String,
    /// The `meshlink-agent` binary that asks it.
    pub bin: PathBuf,
    /// The directory of its UAPI socket.
    pub uapi_dir: PathBuf,
}

/// What one answer says.
#[derive(Debug, Clone, Default)]
pub struct RealState {
    /// Whether its control session is connected.
    pub connected: bool,
    /// Its map's version.
    pub map_version: u64,
    /// Workload name -> (address, generation, holder in its map, answered for here).
    pub workloads: BTreeMap<String, (IpAddr, u64, Option<NodeId>, bool)>,
}

impl RealState {
    /// The addresses answered for here, with their generations (the status shows no
    /// workload ids).
    pub fn held(&self) -> Vec<Holding> {
        self.workloads
            .values()
            .filter(|w| w.3)
            .map(|w| Holding {
                address: w.0,
                generation: w.1,
                workload: None,
            })
            .collect()
    }
}

/// Why a real agent's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RealError {
    /// `meshlink-agent status` could not run, or failed.
    #[error("meshlink-agent status --interface {interface}: {what}")]
    Status {
        /// The interface.
        interface: String,
        /// Why.
        what: String,
    },
    /// The answer is not the status document.
    #[error("meshlink-agent status --interface {interface}: unexpected answer: {what}")]
    Answer {
        /// The interface.
        interface: String,
        /// What is wrong.
        what: String,
    },
}

impl RealAgent {
    /// Asks the agent for its state.
    ///
    /// # Errors
    /// [`RealError`].
    pub async fn state(&self) -> Result<RealState, RealError> {
        let failed = |what: String| RealError::Status {
            interface: self.interface.clone(),
            what,
        };
        // A blocking child on the blocking pool: tokio's own process support would change the
        // feature set of tokio, and so the build, of every crate in a workspace-wide build.
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.arg("status")
            .arg("--interface")
            .arg(&self.interface)
            .arg("--uapi-dir")
            .arg(&self.uapi_dir)
            .args(["-o", "json"])
            .stdin(std::process::Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let bad = |what: String| RealError::Answer {
            interface: self.interface.clone(),
            what,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| bad(e.to_string()))?;
        let c = &v["control"];
        if !c.is_object() {
            return Err(bad("no control session in the status".into()));
        }
        let mut workloads = BTreeMap::new();
        for w in c["workloads"].as_array().into_iter().flatten() {
            let name = w["name"]
                .as_str()
                .ok_or_else(|| bad("a workload without a name".into()))?;
            let address: IpAddr = w["address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| bad(format!("workload {name}: no address")))?;
            let generation = w["generation"]
                .as_u64()
                .ok_or_else(|| bad(format!("workload {name}: no generation")))?;
            workloads.insert(
                name.to_string(),
                (
                    address,
                    generation,
                    w["holder"].as_u64(),
                    w["held_here"].as_bool() == Some(true),
                ),
            );
        }
        Ok(RealState {
            connected: c["connected"].as_bool() == Some(true),
            map_version: c["map_version"]
                .as_u64()
                .ok_or_else(|| bad("no map version".into()))?,
            workloads,
        })
    }
}
