//! Domain types: VNI, MAC addresses and the identities vxmesh derives.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A VXLAN network identifier (24 bits, 1..=16777215).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = 0x00ff_ffff;

    pub fn new(v: u32) -> Result<Self, VniOutOfRange> {
        if (1..=Self::MAX).contains(&v) {
            Ok(Vni(v))
        } else {
            Err(VniOutOfRange(v))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// A VNI outside 1..=16777215.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("VNI {0} is out of range: use a value from 1 to {max}", max = Vni::MAX)]
pub struct VniOutOfRange(pub u32);

impl TryFrom<u32> for Vni {
    type Error = VniOutOfRange;
    fn try_from(v: u32) -> Result<Self, VniOutOfRange> {
        Vni::new(v)
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Unicast: the I/G bit (lowest bit of the first octet) is clear.
    pub fn is_unicast(self) -> bool {
        self.0[0] & 0x01 == 0
    }

    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }

    /// A MAC vxmesh may program as a peer: unicast and not all zeros.
    pub fn is_valid_peer(self) -> bool {
        self.is_unicast() && !self.is_zero()
    }

    /// Locally administered: the U/L bit (second lowest of the first octet) is set.
    pub fn is_local(self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// `aa:bb:cc:dd:ee:ff`, lower case, without the formatting machinery
    /// (a plan of N peers holds N of them, written at every change).
    fn text(self) -> [u8; 17] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            out[3 * i] = HEX[usize::from(b >> 4)];
            out[3 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        out
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text();
        f.pad(std::str::from_utf8(&text).expect("ASCII"))
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Text that is not a MAC address, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("'{0}' is not a MAC address (want six hex octets like 0a:00:c6:12:00:01)")]
    NotSixOctets(String),
    #[error("'{text}' is not a MAC address: octet '{octet}' is not 1-2 hex digits")]
    BadOctet { text: String, octet: String },
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(MacError::NotSixOctets(s.to_string()));
        }
        let mut out = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            let bad = || MacError::BadOctet {
                text: s.to_string(),
                octet: p.to_string(),
            };
            if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            out[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.text();
        s.serialize_str(std::str::from_utf8(&text).expect("ASCII"))
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The VTEP MAC of a node on a VNI: locally administered unicast, derived from
/// (VNI, underlay IP) so that it survives restarts and reboots.
///
/// Layout: `0a:HH:ip0:ip1:ip2:ip3` where HH folds the three VNI bytes. Within one
/// VNI, distinct underlay IPs always give distinct MACs.
pub fn vtep_mac(vni: Vni, underlay: Ipv4Addr) -> Mac {
    let v = vni.get();
    let fold = ((v >> 16) ^ (v >> 8) ^ v) as u8;
    let ip = underlay.octets();
    Mac([0x0a, fold, ip[0], ip[1], ip[2], ip[3]])
}

/// The MAC of a bridged network's distributed gateway: the same on every
/// node (it is each bridge's own MAC), derived from the VNI alone.
/// Layout `06:67:77:v0:v1:v2` (locally administered unicast), distinct from
/// VTEP (`0a:`), bridge (`0e:`) and container (`02:42:`) MACs.
pub fn gateway_mac(vni: Vni) -> Mac {
    let v = vni.get().to_be_bytes();
    Mac([0x06, 0x67, 0x77, v[1], v[2], v[3]])
}

/// The MAC of a container in bridged mode, derived from its IPv4 address
/// (`02:42:` + the four address bytes, as Docker's overlay does).
pub fn container_mac(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// An underlay address that cannot carry VXLAN to other hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} cannot carry VXLAN to other hosts: use the node's unicast underlay address")]
pub struct UnusableUnderlayIp(pub Ipv4Addr);

/// The one rule for a node's underlay address: a unicast address another
/// host can send to (not unspecified, loopback, multicast or broadcast).
pub fn check_underlay_ip(ip: Ipv4Addr) -> Result<Ipv4Addr, UnusableUnderlayIp> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(UnusableUnderlayIp(ip));
    }
    Ok(ip)
}

/// Device names vxmesh owns all start with this prefix.
pub const DEVICE_PREFIX: &str = "vxm-";

/// Route protocol number vxmesh stamps on every route it installs ("V").
pub const ROUTE_PROTOCOL: u8 = 86;

/// The interface alias vxmesh writes on every device it creates; a `vxm-` device
/// without it is foreign and is never modified or deleted.
pub const OWNER_ALIAS_PREFIX: &str = "vxmesh:";

pub fn vtep_name(vni: Vni) -> String {
    format!("vxm-vx{}", vni.get())
}

/// Routed mode uses one bridge per node, `vxm-br0`.
pub const ROUTED_BRIDGE: &str = "vxm-br0";

pub fn bridged_bridge_name(vni: Vni) -> String {
    format!("vxm-br{}", vni.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_range() {
        assert!(Vni::new(0).is_err());
        assert!(Vni::new(1).is_ok());
        assert!(Vni::new(16_777_215).is_ok());
        assert_eq!(
            Vni::new(16_777_216).unwrap_err().to_string(),
            "VNI 16777216 is out of range: use a value from 1 to 16777215"
        );
    }

    #[test]
    fn mac_roundtrip() {
        let m: Mac = "0a:1b:C6:12:00:01".parse().unwrap();
        assert_eq!(m.to_string(), "0a:1b:c6:12:00:01");
        assert!("0a:1b:c6:12:00".parse::<Mac>().is_err());
        assert_eq!(
            "0a:1b:c6:12:00:zz".parse::<Mac>().unwrap_err().to_string(),
            "'0a:1b:c6:12:00:zz' is not a MAC address: octet 'zz' is not 1-2 hex digits"
        );
        assert!("0a:1b:c6:12:00:123".parse::<Mac>().is_err());
        // from_str_radix alone would take a sign.
        assert!("0a:+b:c6:12:00:01".parse::<Mac>().is_err());
        // Every octet value prints as two lower-case digits, in JSON too.
        for b in [0x00, 0x09, 0x0a, 0x7f, 0xa0, 0xff] {
            let m = Mac([b, 0xff - b, 0, 1, 0x10, b]);
            let text = format!("{b:02x}:{:02x}:00:01:10:{b:02x}", 0xff - b);
            assert_eq!(m.to_string(), text);
            assert_eq!(text.parse::<Mac>().unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{text}\""));
        }
        assert_eq!(format!("[{:>18}]", Mac([1; 6])), "[ 01:01:01:01:01:01]");
    }

    #[test]
    fn vtep_mac_is_local_unicast_and_stable() {
        let a = vtep_mac(Vni::new(100).unwrap(), Ipv4Addr::new(198, 18, 0, 1));
        let b = vtep_mac(Vni::new(100).unwrap(), Ipv4Addr::new(198, 18, 0, 1));
        let c = vtep_mac(Vni::new(100).unwrap(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.is_unicast() && a.is_local() && a.is_valid_peer());
    }

    #[test]
    fn gateway_mac_is_per_vni_local_unicast() {
        let a = gateway_mac(Vni::new(100).unwrap());
        assert_eq!(a.to_string(), "06:67:77:00:00:64");
        assert_ne!(a, gateway_mac(Vni::new(101).unwrap()));
        assert!(a.is_valid_peer() && a.is_local());
    }

    #[test]
    fn container_mac_from_ip() {
        let m = container_mac(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(m.to_string(), "02:42:0a:01:02:03");
        assert!(m.is_valid_peer() && m.is_local());
    }

    #[test]
    fn names_fit_ifnamsiz() {
        let v = Vni::new(Vni::MAX).unwrap();
        assert!(vtep_name(v).len() <= 15);
        assert!(bridged_bridge_name(v).len() <= 15);
    }
}

/// What the cluster knows about one node: its underlay identity and the
/// subnet (routed) or address slice (bridged) it holds in each network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_dev: Option<String>,
    pub subnets: std::collections::BTreeMap<String, ipnet::Ipv4Net>,
    /// The node's WireGuard public key (secure underlay); a node without
    /// one gets no tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<crate::secure::PublicKey>,
    /// The key it rotates to, listed beside `public_key` during a rotation:
    /// peers accept handshakes with either (docs/encryption.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<crate::secure::PublicKey>,
}

/// A container attached to a bridged network somewhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub node: String,
}
