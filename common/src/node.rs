//! A node's name as alerts carry it (their `host` label, else the host part of `instance`):
//! whether it can name a host in a URL, and whether two spellings name the same node. Shared
//! by the exporter (`services[].node`) and the actioner (`exporter_url`'s `{node}`,
//! `actions.failover.nodes`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest node name taken (a DNS name's limit).
const MAX_NODE_BYTES: usize = 253;

/// Whether `node` is a node name: a DNS name or an IP address (see [`url_host`]).
pub fn valid(node: &str) -> bool {
    url_host(node).is_some()
}

/// `node` as the host of a URL: a DNS name (one trailing dot allowed) or an IPv4 address as it
/// is, an IPv6 address in brackets; `None` for anything else — a `/`, `@`, `?` or `:` could
/// point the request elsewhere, and a name that a URL parser would read as a number
/// (`012.1.1.1`, `2130706433`) is not the address it looks like.
pub fn url_host(node: &str) -> Option<String> {
    if node.is_empty() || node.len() > MAX_NODE_BYTES {
        return None;
    }
    if node.parse::<Ipv4Addr>().is_ok() {
        return Some(node.to_owned());
    }
    let unbracketed = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    if let Ok(v6) = unbracketed.parse::<Ipv6Addr>() {
        return Some(format!("[{v6}]"));
    }
    let name = node.strip_suffix('.').unwrap_or(node);
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x") {
        return None;
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    name.split('.').all(label_ok).then(|| node.to_owned())
}

/// Whether `a` and `b` name the same node: the same IP address however written (`fd00::7`,
/// `fd00:0::7`, `[fd00::7]`), or the same host name in any case, with or without its
/// trailing dot (`GPU-B.` is `gpu-b`).
pub fn same(a: &str, b: &str) -> bool {
    canonical(a) == canonical(b)
}

fn canonical(node: &str) -> String {
    let unbracketed = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    match unbracketed.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => node.trim_end_matches('.').to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_are_node_names() {
        for node in [
            "gpu-b",
            "gpu-b.lan",
            "gpu-b.lan.",
            "10.0.0.7",
            "fd00::7",
            "[fd00::7]",
        ] {
            assert!(valid(node), "{node}");
        }
        assert_eq!(url_host("fd00::7").as_deref(), Some("[fd00::7]"));
    }

    #[test]
    fn a_name_that_could_point_elsewhere_is_refused() {
        for node in [
            "",
            "evil.example/x?",
            "user@evil.example",
            "gpu-b:80",
            "a..b",
            "-gpu",
            "gpu b",
            "gpu-b#",
            &"a".repeat(300),
            "012.1.1.1",
            "2130706433",
            "0x7f.1",
            "[[fd00::7]]",
            "fe80::1%eth0",
            "gpü-b",
        ] {
            assert!(!valid(node), "{node:?}");
        }
    }

    #[test]
    fn one_node_spelt_two_ways_is_the_same() {
        for (a, b) in [
            ("gpu-b", "GPU-B."),
            ("fd00::7", "fd00:0:0::7"),
            ("fd00::7", "[fd00::7]"),
            ("10.0.0.7", "10.0.0.7"),
        ] {
            assert!(same(a, b), "{a} {b}");
        }
        assert!(!same("gpu-a", "gpu-b"));
        assert!(!same("10.0.0.7", "10.0.0.8"));
    }
}
