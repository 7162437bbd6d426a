//! `wake`: a Wake-on-LAN magic packet to an allowlisted host — or, through the relay
//! endpoint, to an explicit MAC, but only towards the destinations the relay allows: the
//! limited broadcast (255.255.255.255, ff02::1), the broadcast addresses of the configured
//! targets and networks, and the addresses listed in `actions.wake.relay.destinations`, on
//! ports 7 and 9 (and the targets' own). The relay is no way to aim UDP at any host and port.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use aistack_common::config::Problems;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Deserializer};

use super::{Action, ActionError, Job, RawWake, RunContext};
use crate::vocab::{ActionKind, MacAddress};
use crate::wol;

/// `actions.wake`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeConfig {
    /// File holding the relay key for `POST /api/v1/wake`.
    pub key_file: Option<PathBuf>,
    /// Hosts that may be woken, by name.
    pub targets: BTreeMap<String, WakeTarget>,
    /// Where and how often `POST /api/v1/wake` may send to an explicit MAC.
    pub relay: RelayConfig,
}

/// `actions.wake.targets.<name>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WakeTarget {
    /// The NIC's MAC, in any common notation.
    pub mac: MacAddress,
    /// Broadcast address to send the magic packet to (default 255.255.255.255).
    #[serde(default = "limited_broadcast")]
    pub broadcast: IpAddr,
    /// UDP port (default 9; some NICs listen on 7).
    #[serde(default = "default_port")]
    pub port: u16,
    /// SecureOn password, six bytes written like a MAC, for NICs that require one.
    pub secureon: Option<SecureOn>,
}

fn limited_broadcast() -> IpAddr {
    IpAddr::V4(Ipv4Addr::BROADCAST)
}

const fn default_port() -> u16 {
    9
}

/// A SecureOn password: six bytes written like a MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureOn(pub MacAddress);

impl<'de> Deserialize<'de> for SecureOn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(Self).map_err(|_| {
            serde::de::Error::custom(
                "invalid SecureOn password: six bytes written like a MAC (aa:bb:cc:dd:ee:ff)",
            )
        })
    }
}

/// `actions.wake.relay`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// IPv4 networks (`192.168.1.0/24`) whose broadcast address the relay may send to.
    pub networks: Vec<Ipv4Network>,
    /// Other addresses the relay may send to, listed one by one.
    pub destinations: Vec<IpAddr>,
    /// UDP ports it may send to (default 7 and 9; the targets' ports are always allowed).
    pub ports: Vec<u16>,
    /// Requests per client address per minute (default 6); past it 429.
    pub per_client_per_minute: u32,
    /// Requests per minute from all clients together (default 60).
    pub total_per_minute: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            networks: Vec::new(),
            destinations: Vec::new(),
            ports: vec![7, 9],
            per_client_per_minute: 6,
            total_per_minute: 60,
        }
    }
}

/// An IPv4 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Network {
    /// Its address.
    pub address: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Network {
    /// The network's broadcast address (all host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        let host_bits = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
        Ipv4Addr::from(u32::from(self.address) | host_bits)
    }
}

impl FromStr for Ipv4Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid =
            || format!("invalid network {s:?}: write an IPv4 network like 192.168.1.0/24");
        let (address, prefix) = s.trim().split_once('/').ok_or_else(invalid)?;
        let address: Ipv4Addr = address.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(invalid)?;
        Ok(Self { address, prefix })
    }
}

impl fmt::Display for Ipv4Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Ipv4Network {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl WakeConfig {
    /// Problems with the targets and the relay (paths under `actions.wake`).
    pub fn validate(&self, problems: &mut Problems) {
        for (name, target) in &self.targets {
            problems.check(
                target.port != 0,
                format!("actions.wake.targets.{name}.port"),
                "must be 1..65535",
            );
        }
        for (i, port) in self.relay.ports.iter().enumerate() {
            problems.check(
                *port != 0,
                format!("actions.wake.relay.ports[{i}]"),
                "must be 1..65535",
            );
        }
        for (key, value) in [
            ("per_client_per_minute", self.relay.per_client_per_minute),
            ("total_per_minute", self.relay.total_per_minute),
        ] {
            problems.check(
                (1..=6000).contains(&value),
                format!("actions.wake.relay.{key}"),
                "must be 1 to 6000",
            );
        }
    }

    /// Where the relay may send a magic packet for an explicit MAC.
    pub fn relay_destinations(&self) -> RelayDestinations {
        let mut addresses: BTreeSet<IpAddr> = [limited_broadcast(), IpAddr::V6(ALL_NODES)].into();
        let mut ports: BTreeSet<u16> = self.relay.ports.iter().copied().collect();
        for target in self.targets.values() {
            addresses.insert(target.broadcast);
            ports.insert(target.port);
        }
        addresses.extend(
            self.relay
                .networks
                .iter()
                .map(|n| IpAddr::V4(n.broadcast())),
        );
        addresses.extend(self.relay.destinations.iter().copied());
        RelayDestinations { addresses, ports }
    }
}

/// ff02::1, all nodes on the link: IPv6's broadcast.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The addresses and ports the relay may send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayDestinations {
    addresses: BTreeSet<IpAddr>,
    ports: BTreeSet<u16>,
}

impl RelayDestinations {
    /// `Err` says why the relay may not send to `address:port`.
    pub fn check(&self, address: IpAddr, port: u16) -> Result<(), String> {
        if !self.addresses.contains(&address) {
            return Err(format!(
                "{address} is not a broadcast address of a wake target or of actions.wake.relay.networks, nor in actions.wake.relay.destinations"
            ));
        }
        if !self.ports.contains(&port) {
            return Err(format!(
                "port {port} is not a Wake-on-LAN port of actions.wake.relay.ports or a target"
            ));
        }
        Ok(())
    }
}

/// Sends magic packets.
#[derive(Debug)]
pub struct Wake {
    targets: BTreeMap<String, RawWake>,
}

impl Wake {
    /// The allowlisted targets of the config.
    pub fn new(config: &WakeConfig) -> Self {
        let targets = config
            .targets
            .iter()
            .map(|(name, t)| {
                let raw = RawWake {
                    mac: t.mac,
                    broadcast: t.broadcast,
                    port: t.port,
                    secureon: t.secureon.map(|s| s.0),
                };
                (name.clone(), raw)
            })
            .collect();
        Self { targets }
    }

    fn resolve(&self, job: &Job) -> Result<RawWake, ActionError> {
        if let Some(raw) = job.raw_wake {
            return Ok(raw);
        }
        let name = job.plan.target.as_deref().unwrap_or_default();
        self.targets
            .get(name)
            .copied()
            .ok_or_else(|| ActionError::Failed(format!("{name:?} is not a wake target")))
    }
}

impl Action for Wake {
    fn kind(&self) -> ActionKind {
        ActionKind::Wake
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn concurrency(&self) -> usize {
        4
    }

    fn describe(&self, job: &Job) -> String {
        match self.resolve(job) {
            Ok(t) => format!(
                "would send a magic packet for {} to {}:{}",
                t.mac, t.broadcast, t.port
            ),
            Err(err) => format!("would fail: {err}"),
        }
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        _context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(async move {
            let t = self.resolve(job)?;
            let packet = wol::magic_packet(t.mac, t.secureon.as_ref().map(|p| &p.0[..]));
            tokio::task::spawn_blocking(move || wol::send(&packet, t.broadcast, t.port))
                .await
                .map_err(|e| ActionError::Failed(e.to_string()))?
                .map_err(|e| {
                    ActionError::Failed(format!("sending to {}:{}: {e}", t.broadcast, t.port))
                })?;
            Ok(format!(
                "magic packet for {} sent to {}:{}",
                t.mac, t.broadcast, t.port
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_sends_only_where_wake_packets_belong() {
        let config: WakeConfig = serde_yaml::from_str(
            r#"
targets:
  nas: {mac: "aa:bb:cc:dd:ee:ff", broadcast: 192.168.0.255, port: 40000}
relay:
  networks: ["10.1.2.0/23"]
  destinations: ["172.16.0.9"]
"#,
        )
        .unwrap();
        let relay = config.relay_destinations();
        for (address, port) in [
            ("255.255.255.255", 9),
            ("ff02::1", 7),
            ("192.168.0.255", 9),
            ("192.168.0.255", 40000),
            ("10.1.3.255", 9),
            ("172.16.0.9", 9),
        ] {
            assert_eq!(
                relay.check(address.parse().unwrap(), port),
                Ok(()),
                "{address}:{port}"
            );
        }
        for (address, port) in [
            ("10.1.2.7", 9),
            ("8.8.8.8", 9),
            ("127.0.0.1", 9),
            ("255.255.255.255", 22),
            ("255.255.255.255", 53),
        ] {
            assert!(
                relay.check(address.parse().unwrap(), port).is_err(),
                "{address}:{port}"
            );
        }
    }

    #[test]
    fn networks_give_their_broadcast_address() {
        for (network, broadcast) in [
            ("192.168.1.0/24", "192.168.1.255"),
            ("10.0.0.0/8", "10.255.255.255"),
            ("10.0.0.5/32", "10.0.0.5"),
            ("0.0.0.0/0", "255.255.255.255"),
        ] {
            let n: Ipv4Network = network.parse().unwrap();
            assert_eq!(n.broadcast().to_string(), broadcast);
        }
        for bad in ["192.168.1.0", "192.168.1.0/33", "fd00::/8", "x/24", ""] {
            assert!(bad.parse::<Ipv4Network>().is_err(), "{bad}");
        }
    }
}
