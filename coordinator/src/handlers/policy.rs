//! Access policies and tags: set, roll back and clear a network's policy (validated, its
//! tests run against the network's map first), the verdict on one flow, and the tags of
//! nodes and workloads that policies select by.

use std::collections::HashSet;

use meshlink_proto::policy::{
    self, unmatched_selectors, Entity, FlowPort, Policy, PolicyFile, Selector,
};
use meshlink_proto::Netmap;

use super::{require_admin, ApiError, Caller};
use crate::store::{NewPolicy, PolicyRecord, Store, StoreError, UnixTime};

/// The largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// The most tags a node, workload or join token may carry.
pub const MAX_TAGS: usize = 32;

/// A policy accepted: the stored version, the map version that carries it, and warnings
/// (selectors that name nobody yet; tests skipped on rollback that fail now).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The stored record.
    pub record: PolicyRecord,
    /// The network map version the change made.
    pub map_version: u64,
    /// The policy as maps carry it, numbered as the store numbered it (`None`: cleared).
    pub policy: Option<Policy>,
    /// What the operator should know.
    pub warnings: Vec<String>,
}

/// Parses a submitted or stored policy file. It becomes a [`Policy`] once the store has
/// given it its version ([`put`]).
///
/// # Errors
/// [`ApiError::Invalid`] with the parser's line and field.
pub fn parse_source(source: &str) -> Result<PolicyFile, ApiError> {
    if source.len() > MAX_POLICY_BYTES {
        return Err(ApiError::Invalid(format!(
            "the policy file is {} bytes; at most {MAX_POLICY_BYTES} are accepted",
            source.len()
        )));
    }
    policy::parse(source).map_err(|e| ApiError::Invalid(format!("policy: {e}")))
}

/// The selectors of `file` that name nobody in `map` (nodes may join and workloads be
/// created later: a warning, not an error).
pub fn unmatched(file: &PolicyFile, map: &Netmap) -> Vec<String> {
    let mut seen = HashSet::new();
    unmatched_selectors(&file.rules, map)
        .into_iter()
        .filter(|(_, s)| **s != Selector::Any)
        .map(|(rule, s)| format!("line {}: {s} names nobody yet", rule.line))
        .filter(|text| seen.insert(text.clone()))
        .collect()
}

/// Sets the next version of `network`'s policy to `source` (admin), after parsing it and
/// running its `[[test]]` flows against `map` (the network's current map) under it.
///
/// # Errors
/// [`ApiError::Invalid`] naming the line and field of a parse error, or listing the tests
/// that fail; [`ApiError::NotFound`] for an unknown network.
pub async fn set_policy(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    map: &Netmap,
    network: &str,
    source: String,
    author: &str,
) -> Result<Accepted, ApiError> {
    require_admin(caller)?;
    require_network(store, network).await?;
    let file = parse_source(&source)?;
    let failures = file.run_tests(map);
    if !failures.is_empty() {
        let lines: Vec<String> = failures
            .iter()
            .map(|f| format!("line {}: {}", f.line, f.message))
            .collect();
        return Err(ApiError::Invalid(format!(
            "policy tests failed, nothing was changed: {}",
            lines.join("; ")
        )));
    }
    let warnings = unmatched(&file, map);
    put(
        store,
        now,
        network,
        Some(source),
        author,
        None,
        Some(file),
        warnings,
    )
    .await
}

/// Makes the network open again (admin): a new version with no policy.
///
/// # Errors
/// [`ApiError::NotFound`] for an unknown network.
pub async fn clear_policy(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    network: &str,
    author: &str,
) -> Result<Accepted, ApiError> {
    require_admin(caller)?;
    require_network(store, network).await?;
    put(store, now, network, None, author, None, None, Vec::new()).await
}

/// Restores version `version` of the network's policy as a new version (admin). Its tests
/// are run against `map` but do not block a rollback (it is how an operator gets out of a bad
/// policy quickly): failures come back as warnings.
///
/// # Errors
/// [`ApiError::NotFound`] when the network or that version does not exist.
pub async fn rollback_policy(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    map: &Netmap,
    network: &str,
    version: u64,
    author: &str,
) -> Result<Accepted, ApiError> {
    require_admin(caller)?;
    require_network(store, network).await?;
    let old = store
        .policies(network)
        .await?
        .into_iter()
        .find(|p| p.version == version)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "network {network} has no policy version {version} (see policy history)"
            ))
        })?;
    let (file, warnings) = match &old.source {
        Some(source) => {
            let file = parse_source(source)?;
            let mut warnings: Vec<String> = file
                .run_tests(map)
                .iter()
                .map(|f| format!("test at line {} fails now: {}", f.line, f.message))
                .collect();
            warnings.extend(unmatched(&file, map));
            (Some(file), warnings)
        }
        None => (None, Vec::new()),
    };
    put(
        store,
        now,
        network,
        old.source,
        author,
        Some(version),
        file,
        warnings,
    )
    .await
}

/// The verdict on a flow from `from` to `to` (node or workload names; `node:`/`workload:`
/// to tell them apart) in `map`, under the map's policy. `None`: the network has no policy,
/// every flow is allowed.
///
/// # Errors
/// [`ApiError::Invalid`] for a bad port, [`ApiError::NotFound`] for a name nobody has.
pub fn test_flow(
    caller: &Caller,
    map: &Netmap,
    from: &str,
    to: &str,
    port: &str,
) -> Result<Option<(Policy, Option<usize>)>, ApiError> {
    require_admin(caller)?;
    let port: FlowPort = port
        .parse()
        .map_err(|e: policy::SyntaxError| ApiError::Invalid(format!("port: {e}")))?;
    let from = Entity::resolve(map, from).map_err(|e| ApiError::NotFound(format!("from: {e}")))?;
    let to = Entity::resolve(map, to).map_err(|e| ApiError::NotFound(format!("to: {e}")))?;
    Ok(map.policy.as_ref().map(|p| {
        let verdict = p.check(map, &from, &to, port);
        (p.clone(), verdict.rule)
    }))
}

/// Applies `+tag` / `-tag` edits to `tags`, in order.
///
/// # Errors
/// [`ApiError::Invalid`] for an edit without its sign, a bad tag, or too many tags.
pub fn edit_tags(mut tags: Vec<String>, edits: &[String]) -> Result<Vec<String>, ApiError> {
    for edit in edits {
        let (add, tag) = match edit.split_at_checked(1) {
            Some(("+", t)) => (true, t),
            Some(("-", t)) => (false, t),
            _ => {
                return Err(ApiError::Invalid(format!(
                    "tag edit {edit:?}: write +TAG to add or -TAG to remove"
                )))
            }
        };
        validate_tags(std::slice::from_ref(&tag.to_string()))?;
        if add && !tags.iter().any(|t| t == tag) {
            tags.push(tag.to_string());
        } else if !add {
            tags.retain(|t| t != tag);
        }
    }
    validate_tags(&tags)?;
    Ok(tags)
}

/// Checks tags: at most [`MAX_TAGS`], each a name policies can select
/// ([`policy::valid_name`]: 1 to 63 of a-z, 0-9, `-`, `_`, `.`).
///
/// # Errors
/// [`ApiError::Invalid`] naming the tag.
pub fn validate_tags(tags: &[String]) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::Invalid(format!("at most {MAX_TAGS} tags")));
    }
    for tag in tags {
        if !policy::valid_name(tag) {
            return Err(ApiError::Invalid(format!(
                "tag {tag:?} is not valid: use 1 to 63 of a-z, 0-9, -, _ and ."
            )));
        }
    }
    Ok(())
}

async fn require_network(store: &dyn Store, network: &str) -> Result<(), ApiError> {
    if store.network(network).await?.is_none() {
        return Err(ApiError::NotFound(format!("no network named {network:?}")));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn put(
    store: &dyn Store,
    now: UnixTime,
    network: &str,
    source: Option<String>,
    author: &str,
    restored: Option<u64>,
    file: Option<PolicyFile>,
    warnings: Vec<String>,
) -> Result<Accepted, ApiError> {
    let (record, map_version) = store
        .put_policy(NewPolicy {
            network: network.to_string(),
            source,
            author: author.to_string(),
            created_at: now,
            restored,
        })
        .await?;
    // The store numbers versions (with several coordinators on one database, it alone can).
    let policy = file.map(|f| f.into_policy(record.version));
    Ok(Accepted {
        record,
        map_version,
        policy,
        warnings,
    })
}

/// The policy in force in `network`, as maps carry it (`None`: open).
///
/// # Errors
/// [`StoreError`] when the store cannot be read or the stored source no longer parses.
pub async fn current(store: &dyn Store, network: &str) -> Result<Option<Policy>, StoreError> {
    match store.policy(network).await? {
        None => Ok(None),
        Some(record) => stored_policy(&record).map_err(|e| match e {
            ApiError::Internal(e) => e,
            other => StoreError::Corrupt(other.to_string()),
        }),
    }
}

/// The policy of a stored record, as maps carry it.
///
/// # Errors
/// [`ApiError::Internal`] when a stored source no longer parses (edited by hand).
pub fn stored_policy(record: &PolicyRecord) -> Result<Option<Policy>, ApiError> {
    match &record.source {
        None => Ok(None),
        Some(source) => policy::parse(source)
            .map(|f| Some(f.into_policy(record.version)))
            .map_err(|e| {
                ApiError::Internal(crate::store::StoreError::Corrupt(format!(
                    "policies.source of {} version {}: {e}",
                    record.network, record.version
                )))
            }),
    }
}
