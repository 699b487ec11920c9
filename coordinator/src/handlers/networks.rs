//! Networks: creation (name and prefix rules) and listing.

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::{require_admin, validate_name, ApiError, Caller};
use crate::store::{NetworkRecord, NewNetwork, Store, StoreError, UnixTime};

/// The prefixes a network's prefix must lie in: the shared address space and the private
/// ranges.
pub const ALLOWED_RANGES: [&str; 4] = [
    "100.64.0.0/10",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// The longest prefix accepted: a /30 still holds two nodes.
pub const MAX_PREFIX_LEN: u8 = 30;

/// `POST /v1/networks`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    /// Name, `[a-z0-9-]{1,63}`.
    pub name: String,
    /// IPv4 prefix, such as `100.64.0.0/16`.
    pub cidr: String,
    /// IPv6 ULA /48, such as `fd7a:115c:a1e0::/48`; `None`: IPv4 only.
    #[serde(default)]
    pub cidr6: Option<String>,
}

/// Creates a network at version 0.
///
/// # Errors
/// [`ApiError::Invalid`] for a bad name or prefix, [`ApiError::Conflict`] when the name is
/// taken or the prefix overlaps another network's.
pub async fn create_network(
    store: &dyn Store,
    now: UnixTime,
    caller: &Caller,
    req: CreateNetwork,
) -> Result<NetworkRecord, ApiError> {
    require_admin(caller)?;
    validate_name("network", &req.name)?;
    let cidr = parse_cidr(&req.cidr)?;
    let cidr6 = req.cidr6.as_deref().map(parse_cidr6).transpose()?;
    for other in store.networks().await? {
        if let (Some(mine), Some(theirs)) = (cidr6, other.cidr6) {
            if mine == theirs {
                return Err(ApiError::Conflict(format!(
                    "cidr6: {mine} is the IPv6 prefix of network {} already",
                    other.name
                )));
            }
        }
        if other.name == req.name {
            return Err(ApiError::Conflict(format!(
                "a network named {} already exists",
                req.name
            )));
        }
        if other.cidr.contains(&cidr.network()) || cidr.contains(&other.cidr.network()) {
            return Err(ApiError::Conflict(format!(
                "{cidr} overlaps {} of network {}",
                other.cidr, other.name
            )));
        }
    }
    let new = NewNetwork {
        name: req.name,
        cidr,
        cidr6,
        created_at: now,
    };
    store.create_network(new).await.map_err(|e| match e {
        StoreError::Conflict(m) => ApiError::Conflict(m),
        e => e.into(),
    })
}

/// Every network, by name.
///
/// # Errors
/// [`ApiError::Forbidden`] for non-admins; [`ApiError::Internal`].
pub async fn list_networks(
    store: &dyn Store,
    caller: &Caller,
) -> Result<Vec<NetworkRecord>, ApiError> {
    require_admin(caller)?;
    Ok(store.networks().await?)
}

/// Parses and checks a network's IPv6 prefix: a ULA /48, host bits clear.
///
/// # Errors
/// [`ApiError::Invalid`] naming `cidr6` and what is wrong.
pub fn parse_cidr6(text: &str) -> Result<Ipv6Net, ApiError> {
    let cidr6: Ipv6Net = text.trim().parse().map_err(|_| {
        ApiError::Invalid(format!(
            "cidr6: {text:?} is not an IPv6 prefix such as fd7a:115c:a1e0::/48"
        ))
    })?;
    meshlink_proto::ipam::check_cidr6(cidr6)
        .map_err(|e| ApiError::Invalid(format!("cidr6: {e}")))?;
    Ok(cidr6)
}

/// Parses and checks a network prefix: IPv4, a network address, inside [`ALLOWED_RANGES`],
/// no longer than [`MAX_PREFIX_LEN`].
///
/// # Errors
/// [`ApiError::Invalid`] saying which rule is broken.
pub fn parse_cidr(text: &str) -> Result<Ipv4Net, ApiError> {
    let cidr: Ipv4Net = text.trim().parse().map_err(|_| {
        ApiError::Invalid(format!(
            "{text:?} is not an IPv4 prefix such as 100.64.0.0/16"
        ))
    })?;
    if cidr.trunc() != cidr {
        return Err(ApiError::Invalid(format!(
            "{cidr} has host bits set; did you mean {}?",
            cidr.trunc()
        )));
    }
    if cidr.prefix_len() > MAX_PREFIX_LEN {
        return Err(ApiError::Invalid(format!(
            "{cidr} is too small: use a prefix of /{MAX_PREFIX_LEN} or shorter"
        )));
    }
    let inside = ALLOWED_RANGES
        .iter()
        .filter_map(|r| r.parse::<Ipv4Net>().ok())
        .any(|range| range.contains(&cidr));
    if !inside {
        return Err(ApiError::Invalid(format!(
            "{cidr} is not inside 100.64.0.0/10 or a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
        )));
    }
    Ok(cidr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rules() {
        assert_eq!(
            parse_cidr("100.64.0.0/10").unwrap().to_string(),
            "100.64.0.0/10"
        );
        assert!(parse_cidr("10.1.0.0/16").is_ok());
        assert!(parse_cidr("192.168.7.0/24").is_ok());
        assert!(parse_cidr("100.64.0.0/31").is_err(), "too small");
        assert!(parse_cidr("100.64.0.1/24")
            .unwrap_err()
            .to_string()
            .contains("100.64.0.0/24"));
        assert!(parse_cidr("8.8.8.0/24").is_err(), "public");
        assert!(
            parse_cidr("100.0.0.0/8").is_err(),
            "wider than the shared space"
        );
        assert!(parse_cidr("fd00::/64").is_err(), "IPv6 not yet");
        assert!(parse_cidr("junk").is_err());
    }
}
