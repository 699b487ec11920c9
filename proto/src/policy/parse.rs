//! The operator's policy file (TOML) -> [`PolicyFile`]. Contract only; see the module docs.

use super::{Policy, Rule};

/// A parsed policy file: its rules and the flows it asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// The rules, in file order.
    pub rules: Vec<Rule>,
    /// The `[[test]]` flows, in file order.
    pub tests: Vec<FlowTest>,
}

/// One `[[test]]` of a policy file: a flow that must be allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTest {
    /// The line where the test starts.
    pub line: u32,
    /// The source, as written (`vm-a`, `node:vm-a`, `workload:chat`).
    pub from: String,
    /// The destination, as written.
    pub to: String,
    /// The flow's protocol and port.
    pub port: super::FlowPort,
    /// Whether the flow must be allowed (`expect = "allow"`) or denied (`"deny"`).
    pub allow: bool,
}

/// Why a policy file was refused: the line and field at fault, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {field}: {message}")]
pub struct PolicyError {
    /// The line (1-based) of the offending value.
    pub line: u32,
    /// The field (`rule[2].ports[1]`, `test[1].expect`, ...).
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Parses a policy file.
///
/// # Errors
/// [`PolicyError`] naming the line and field of the first problem.
pub fn parse(_text: &str) -> Result<PolicyFile, PolicyError> {
    unimplemented!("contract")
}

impl PolicyFile {
    /// The rules as version `version` of the network's policy.
    pub fn into_policy(self, version: u64) -> Policy {
        Policy {
            version,
            rules: self.rules,
        }
    }
}
