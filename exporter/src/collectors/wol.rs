//! `wol`: whether Wake-on-LAN by magic packet is armed on the host's network interfaces.
//!
//! Read from the kernel's ethtool netlink interface (generic netlink family `ethtool`,
//! `ETHTOOL_MSG_WOL_GET`), the API `ethtool <iface>` itself uses — no shelling out, no ioctl.
//! No crate wraps this message, so it is built and parsed here, following
//! `Documentation/networking/ethtool-netlink.rst`: a request header naming the device and
//! asking for compact bitsets, and a reply whose `ETHTOOL_A_WOL_MODES` bitset holds the armed
//! modes (value) and the supported ones (mask). `aistack_wol_enabled` is 1 when `g` (magic
//! packet, bit 5) is armed.
//!
//! Interfaces: the configured ones, else every physical interface (those with a `device` link
//! under `<sysfs>/class/net`). An interface whose driver has no Wake-on-LAN (EOPNOTSUPP), that
//! vanished (ENODEV) or that we may not query (EPERM) is left out quietly.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures_util::StreamExt as _;
use netlink_packet_core::{
    DecodeError, Emitable, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, NlasIterator,
    ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use serde::Deserialize;

use super::{Collector, CollectorError, EncodeSample, blocking};
use crate::metrics::gauge_family;

const ETHTOOL_GENL_VERSION: u8 = 1;
const ETHTOOL_MSG_WOL_GET: u8 = 9;
const ETHTOOL_MSG_WOL_GET_REPLY: u8 = 9;
const ETHTOOL_A_WOL_HEADER: u16 = 1;
const ETHTOOL_A_WOL_MODES: u16 = 2;
const ETHTOOL_A_HEADER_DEV_NAME: u16 = 2;
const ETHTOOL_A_HEADER_FLAGS: u16 = 3;
const ETHTOOL_FLAG_COMPACT_BITSETS: u32 = 1;
const ETHTOOL_A_BITSET_VALUE: u16 = 4;
const ETHTOOL_A_BITSET_MASK: u16 = 5;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `WAKE_MAGIC`: the `g` of `ethtool -s <iface> wol g`.
pub const WAKE_MAGIC: u32 = 1 << 5;

/// `wol:` in the config.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WolConfig {
    /// Interfaces to report; empty means every physical interface.
    pub interfaces: Vec<String>,
}

/// Wake-on modes of one interface, as ethtool bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WolModes {
    /// Armed modes.
    pub enabled: u32,
    /// Modes the driver supports, when the kernel said.
    pub supported: Option<u32>,
}

/// Appends one netlink attribute (header, value, padding to 4 bytes).
fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

/// The payload of a WOL_GET request for `interface`, asking for compact bitsets.
pub fn wol_request(interface: &str) -> Vec<u8> {
    let mut name = interface.as_bytes().to_vec();
    name.push(0);
    let mut header = Vec::new();
    put_attr(&mut header, ETHTOOL_A_HEADER_DEV_NAME, &name);
    put_attr(
        &mut header,
        ETHTOOL_A_HEADER_FLAGS,
        &ETHTOOL_FLAG_COMPACT_BITSETS.to_ne_bytes(),
    );
    let mut payload = Vec::new();
    put_attr(&mut payload, ETHTOOL_A_WOL_HEADER | NLA_F_NESTED, &header);
    payload
}

fn first_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Why a WOL_GET reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WolReplyError {
    /// An attribute is malformed (a length past the buffer, say).
    #[error(transparent)]
    Attribute(#[from] DecodeError),
    /// The reply has no `ETHTOOL_A_WOL_MODES`.
    #[error("reply without ETHTOOL_A_WOL_MODES")]
    NoModes,
    /// The modes bitset has no compact value.
    #[error("modes without a compact value")]
    NoValue,
}

/// Parses the attributes of a WOL_GET reply.
pub fn parse_wol_reply(payload: &[u8]) -> Result<WolModes, WolReplyError> {
    let attrs = |bytes: &[u8]| -> Result<Vec<(u16, Vec<u8>)>, WolReplyError> {
        NlasIterator::new(bytes)
            .map(|nla| {
                let nla = nla?;
                Ok((nla.kind() & NLA_TYPE_MASK, nla.value().to_vec()))
            })
            .collect()
    };
    let modes = attrs(payload)?
        .into_iter()
        .find(|(kind, _)| *kind == ETHTOOL_A_WOL_MODES)
        .ok_or(WolReplyError::NoModes)?
        .1;
    let bitset = attrs(&modes)?;
    let find = |kind| {
        bitset
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| first_u32(v))
    };
    let enabled = find(ETHTOOL_A_BITSET_VALUE).ok_or(WolReplyError::NoValue)?;
    Ok(WolModes {
        enabled,
        supported: find(ETHTOOL_A_BITSET_MASK),
    })
}

/// An ethtool generic netlink message: the WOL_GET request we send or the reply we get.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EthtoolWol {
    cmd: u8,
    payload: Vec<u8>,
}

impl GenlFamily for EthtoolWol {
    fn family_name() -> &'static str {
        "ethtool"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        ETHTOOL_GENL_VERSION
    }
}

impl Emitable for EthtoolWol {
    fn buffer_len(&self) -> usize {
        self.payload.len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        buffer[..self.payload.len()].copy_from_slice(&self.payload);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for EthtoolWol {
    fn parse_with_param(buffer: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            cmd: header.cmd,
            payload: buffer.to_vec(),
        })
    }
}

/// What asking the kernel about one interface gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WolAnswer {
    /// The interface's modes.
    Modes(WolModes),
    /// No Wake-on-LAN here (EOPNOTSUPP), no such interface (ENODEV) or no permission.
    NoData(String),
}

/// Asks the kernel for the Wake-on modes of each interface over one netlink connection.
async fn query(interfaces: &[String]) -> Result<Vec<(String, WolAnswer)>, CollectorError> {
    let (connection, mut handle, _) = genetlink::new_connection()
        .map_err(|e| CollectorError::NoData(format!("generic netlink unavailable: {e}")))?;
    let driver = tokio::spawn(connection);
    let mut answers = Vec::with_capacity(interfaces.len());
    for interface in interfaces {
        let mut message = NetlinkMessage::from(GenlMessage::from_payload(EthtoolWol {
            cmd: ETHTOOL_MSG_WOL_GET,
            payload: wol_request(interface),
        }));
        message.header.flags = NLM_F_REQUEST;
        let answer = match handle.request(message).await {
            Err(err) => WolAnswer::NoData(format!("ethtool netlink family unavailable: {err}")),
            Ok(mut replies) => match replies.next().await {
                Some(Ok(reply)) => match reply.payload {
                    NetlinkPayload::InnerMessage(genl)
                        if genl.payload.cmd == ETHTOOL_MSG_WOL_GET_REPLY =>
                    {
                        match parse_wol_reply(&genl.payload.payload) {
                            Ok(modes) => WolAnswer::Modes(modes),
                            Err(err) => {
                                driver.abort();
                                let at = PathBuf::from(format!("netlink:ethtool/{interface}"));
                                return Err(CollectorError::parse(&at, err));
                            }
                        }
                    }
                    NetlinkPayload::Error(err) => WolAnswer::NoData(err.to_io().to_string()),
                    other => WolAnswer::NoData(format!("unexpected reply {other:?}")),
                },
                Some(Err(err)) => WolAnswer::NoData(err.to_string()),
                None => WolAnswer::NoData("no reply".into()),
            },
        };
        answers.push((interface.clone(), answer));
    }
    driver.abort();
    Ok(answers)
}

/// Physical interfaces: those under `class/net` with a `device` link (no lo, veth, bridges).
pub fn physical_interfaces(sysfs: &Path) -> Result<Vec<String>, CollectorError> {
    let net = sysfs.join("class/net");
    let entries = std::fs::read_dir(&net).map_err(|e| CollectorError::read(&net, e))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
}

/// One `wol` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WolSample {
    /// Interfaces that answered, with their modes.
    pub interfaces: Vec<(String, WolModes)>,
}

impl EncodeSample for WolSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge_family(
            encoder,
            "wol_enabled",
            "1 when Wake-on-LAN by magic packet (ethtool's `g`) is armed on the interface.",
            None,
            self.interfaces.iter().map(|(name, modes)| {
                let labels = InterfaceLabels {
                    interface: name.clone(),
                };
                (
                    labels,
                    if modes.enabled & WAKE_MAGIC != 0 {
                        1.0
                    } else {
                        0.0
                    },
                )
            }),
        )
    }
}

/// Reads Wake-on settings through ethtool netlink.
#[derive(Debug)]
pub struct WolCollector {
    interfaces: Vec<String>,
    sysfs: PathBuf,
}

impl WolCollector {
    /// Reports `config.interfaces`, or the physical interfaces under `sysfs`.
    pub fn new(config: &WolConfig, sysfs: &Path) -> Self {
        Self {
            interfaces: config.interfaces.clone(),
            sysfs: sysfs.to_owned(),
        }
    }
}

impl Collector for WolCollector {
    type Sample = WolSample;

    async fn sample(&mut self, _now: Instant) -> Result<WolSample, CollectorError> {
        let interfaces = if self.interfaces.is_empty() {
            let sysfs = self.sysfs.clone();
            blocking(move || physical_interfaces(&sysfs)).await?
        } else {
            self.interfaces.clone()
        };
        if interfaces.is_empty() {
            return Err(CollectorError::NoData(
                "no physical network interface".into(),
            ));
        }
        let mut sample = WolSample::default();
        let mut why = Vec::new();
        for (interface, answer) in query(&interfaces).await? {
            match answer {
                WolAnswer::Modes(modes) => sample.interfaces.push((interface, modes)),
                WolAnswer::NoData(reason) => why.push(format!("{interface}: {reason}")),
            }
        }
        if sample.interfaces.is_empty() {
            return Err(CollectorError::NoData(why.join("; ")));
        }
        for reason in why {
            tracing::debug!(collector = "wol", %reason, "interface left out");
        }
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WOL_GET reply as the kernel builds it (ethnl_wol_fill_reply): the header nest, then
    /// the modes as a compact bitset (size, value, mask), then the SecureOn password.
    fn reply(enabled: u32, supported: u32) -> Vec<u8> {
        let mut header = Vec::new();
        put_attr(&mut header, 1, &3u32.to_ne_bytes()); // DEV_INDEX
        put_attr(&mut header, ETHTOOL_A_HEADER_DEV_NAME, b"enp5s0\0");
        let mut bitset = Vec::new();
        put_attr(&mut bitset, 2, &32u32.to_ne_bytes()); // SIZE in bits
        put_attr(&mut bitset, ETHTOOL_A_BITSET_VALUE, &enabled.to_ne_bytes());
        put_attr(&mut bitset, ETHTOOL_A_BITSET_MASK, &supported.to_ne_bytes());
        let mut payload = Vec::new();
        put_attr(&mut payload, ETHTOOL_A_WOL_HEADER | NLA_F_NESTED, &header);
        put_attr(&mut payload, ETHTOOL_A_WOL_MODES | NLA_F_NESTED, &bitset);
        put_attr(&mut payload, 3, &[0u8; 6]); // SOPASS
        payload
    }

    #[test]
    fn replies_give_armed_and_supported_modes() {
        // Supports p, u, m, b, g (0b10_1111); armed: g.
        let modes = parse_wol_reply(&reply(WAKE_MAGIC, 0b10_1111)).unwrap();
        assert_eq!(
            modes,
            WolModes {
                enabled: WAKE_MAGIC,
                supported: Some(0b10_1111)
            }
        );
        let modes = parse_wol_reply(&reply(0, 0b10_1111)).unwrap();
        assert_eq!(modes.enabled & WAKE_MAGIC, 0);
    }

    #[test]
    fn broken_replies_are_errors_not_panics() {
        assert!(parse_wol_reply(&[]).is_err());
        assert!(parse_wol_reply(&[1, 2, 3]).is_err());
        let full = reply(WAKE_MAGIC, 0xff);
        for cut in 0..full.len() {
            let _ = parse_wol_reply(&full[..cut]);
        }
        let mut no_modes = Vec::new();
        put_attr(&mut no_modes, ETHTOOL_A_WOL_HEADER | NLA_F_NESTED, &[]);
        let err = parse_wol_reply(&no_modes).unwrap_err();
        assert!(matches!(err, WolReplyError::NoModes), "{err:?}");
        assert_eq!(err.to_string(), "reply without ETHTOOL_A_WOL_MODES");
        assert!(matches!(
            parse_wol_reply(&[1, 2, 3]),
            Err(WolReplyError::Attribute(_))
        ));
    }

    #[test]
    fn requests_name_the_device_and_ask_for_compact_bitsets() {
        let request = wol_request("eth0");
        // One nested header attribute holding DEV_NAME "eth0\0" and FLAGS 1.
        let outer: Vec<_> = NlasIterator::new(&request).map(Result::unwrap).collect();
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].kind(), ETHTOOL_A_WOL_HEADER);
        assert!(outer[0].nested_flag());
        let inner: Vec<(u16, Vec<u8>)> = NlasIterator::new(outer[0].value())
            .map(|n| n.map(|n| (n.kind(), n.value().to_vec())).unwrap())
            .collect();
        assert_eq!(inner[0], (ETHTOOL_A_HEADER_DEV_NAME, b"eth0\0".to_vec()));
        assert_eq!(
            inner[1],
            (ETHTOOL_A_HEADER_FLAGS, 1u32.to_ne_bytes().to_vec())
        );
        assert_eq!(request.len() % 4, 0);
    }

    #[test]
    fn physical_interfaces_have_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("class/net");
        for (name, physical) in [
            ("lo", false),
            ("enp5s0", true),
            ("docker0", false),
            ("wlp4s0", true),
        ] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            if physical {
                std::os::unix::fs::symlink(
                    "../../../devices/pci0000:00/0000:05:00.0",
                    net.join(name).join("device"),
                )
                .unwrap();
                std::fs::create_dir_all(dir.path().join("devices/pci0000:00/0000:05:00.0"))
                    .unwrap();
            }
        }
        assert_eq!(
            physical_interfaces(dir.path()).unwrap(),
            ["enp5s0", "wlp4s0"]
        );
        assert!(
            physical_interfaces(&dir.path().join("nope"))
                .unwrap_err()
                .is_no_data()
        );
    }

    #[tokio::test]
    async fn the_loopback_interface_has_no_wake_on_lan() {
        // A real round trip through the kernel's ethtool netlink family.
        let answers = query(&["lo".to_owned(), "aistack-none0".to_owned()])
            .await
            .unwrap();
        assert_eq!(answers.len(), 2);
        for (interface, answer) in &answers {
            assert!(
                matches!(answer, WolAnswer::NoData(_)),
                "{interface}: {answer:?}"
            );
        }
    }
}
