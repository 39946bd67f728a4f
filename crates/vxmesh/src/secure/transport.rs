//! Transport addresses: each node's address in the secure underlay's
//! private range, derived from its underlay address so every node can
//! compute every peer's without asking.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The transport range when the cluster file names none.
pub const DEFAULT_TRANSPORT_CIDR: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 255, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => panic!("valid default"),
};

/// The WireGuard UDP port when the cluster file names none.
pub const DEFAULT_PORT: u16 = 51820;

/// What WireGuard adds on an IPv4 underlay: IP 20 + UDP 8 + header 16 + tag 16.
pub const WG_OVERHEAD: u32 = 60;

/// The secure underlay's TUN device.
pub const TUN_NAME: &str = "vxm-wg0";

/// The ownership alias of the TUN device.
pub const TUN_ALIAS: &str = "vxmesh:secure";

/// A node whose derived transport address is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error(
        "node '{node}': underlay {underlay} maps to {addr}, the {which} address of transport range {range}: use a larger transport_cidr"
    )]
    Reserved {
        node: String,
        underlay: Ipv4Addr,
        addr: Ipv4Addr,
        which: &'static str,
        range: Ipv4Net,
    },
    #[error(
        "nodes '{first}' and '{second}' both map to transport address {addr} in {range}: use a larger transport_cidr"
    )]
    Collision {
        first: String,
        second: String,
        addr: Ipv4Addr,
        range: Ipv4Net,
    },
}

/// The range's network address plus the underlay address modulo the
/// range's size (`198.18.0.7` in `10.255.0.0/16` -> `10.255.0.7`).
pub fn derive(range: Ipv4Net, underlay: Ipv4Addr) -> Ipv4Addr {
    let host_bits = 32 - u32::from(range.prefix_len());
    let mask = if host_bits == 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    Ipv4Addr::from(u32::from(range.network()) | (u32::from(underlay) & mask))
}

/// `derive`, refusing the range's network and broadcast addresses.
pub fn transport_addr(
    range: Ipv4Net,
    node: &str,
    underlay: Ipv4Addr,
) -> Result<Ipv4Addr, TransportError> {
    let addr = derive(range, underlay);
    let which = if addr == range.network() {
        "network"
    } else if addr == range.broadcast() {
        "broadcast"
    } else {
        return Ok(addr);
    };
    Err(TransportError::Reserved {
        node: node.to_string(),
        underlay,
        addr,
        which,
        range,
    })
}

/// Every node's transport address, refusing reserved ones and collisions.
pub fn assign<'a>(
    range: Ipv4Net,
    nodes: impl IntoIterator<Item = (&'a str, Ipv4Addr)>,
) -> Result<BTreeMap<String, Ipv4Addr>, TransportError> {
    let mut by_addr: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (node, underlay) in nodes {
        let addr = transport_addr(range, node, underlay)?;
        if let Some(first) = by_addr.insert(addr, node) {
            return Err(TransportError::Collision {
                first: first.to_string(),
                second: node.to_string(),
                addr,
                range,
            });
        }
        out.insert(node.to_string(), addr);
    }
    Ok(out)
}

/// The TUN device's MTU on an underlay of `underlay_mtu`.
pub fn tun_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(WG_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_keep_the_underlay_host_bits() {
        let r = DEFAULT_TRANSPORT_CIDR;
        assert_eq!(r, net("10.255.0.0/16"));
        assert_eq!(
            derive(r, "198.18.0.7".parse().unwrap()),
            Ipv4Addr::new(10, 255, 0, 7)
        );
        assert_eq!(
            derive(r, "192.168.3.4".parse().unwrap()),
            Ipv4Addr::new(10, 255, 3, 4)
        );
        assert_eq!(
            derive(net("100.64.0.0/24"), "10.0.9.200".parse().unwrap()),
            Ipv4Addr::new(100, 64, 0, 200)
        );
    }

    #[test]
    fn reserved_addresses_and_collisions_are_named() {
        let r = net("10.255.0.0/24");
        let e = transport_addr(r, "h0", "198.18.1.0".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("node 'h0'"), "{e}");
        assert!(e.to_string().contains("the network address"), "{e}");
        let e = transport_addr(r, "h9", "198.18.1.255".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("broadcast"), "{e}");
        let e = assign(
            r,
            [
                ("a", "198.18.0.5".parse().unwrap()),
                ("b", "198.18.7.5".parse().unwrap()),
            ],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "nodes 'a' and 'b' both map to transport address 10.255.0.5 in 10.255.0.0/24: use a larger transport_cidr"
        );
        let ok = assign(
            net("10.255.0.0/16"),
            [
                ("a", "198.18.0.5".parse().unwrap()),
                ("b", "198.18.7.5".parse().unwrap()),
            ],
        )
        .unwrap();
        assert_eq!(ok["b"], Ipv4Addr::new(10, 255, 7, 5));
    }

    #[test]
    fn the_tun_mtu_leaves_room_for_wireguard() {
        assert_eq!(tun_mtu(1500), 1440);
        assert_eq!(tun_mtu(1500) - crate::config::VXLAN_OVERHEAD, 1390);
    }
}
