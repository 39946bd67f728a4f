//! The distributed gateway of a bridged network (`gateway = true` or
//! `gateway = "A.B.C.D"`): one address and one MAC on every node's bridge,
//! answered by each node for its own containers only.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::Mode;

/// The `gateway` key as written: `true`/`false`, or the address to use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GatewayFile {
    Enabled(bool),
    Address(String),
}

/// The gateway address of a network, or why the `gateway` key is wrong.
/// `None` when the key is absent or `false`.
pub(super) fn resolve(
    key: Option<&GatewayFile>,
    mode: Mode,
    cidr: Ipv4Net,
) -> Result<Option<Ipv4Addr>, String> {
    let want = match key {
        None | Some(GatewayFile::Enabled(false)) => return Ok(None),
        Some(k) => k,
    };
    if mode == Mode::Routed {
        return Err(
            "a routed network always has a gateway on each node's bridge: `gateway` is for bridged networks, remove it"
                .into(),
        );
    }
    if cidr.prefix_len() > 30 {
        return Err(format!(
            "cidr {cidr} has no room for a gateway besides containers: use a /30 or larger, or remove `gateway`"
        ));
    }
    let ip = match want {
        GatewayFile::Enabled(_) => first_host(cidr),
        GatewayFile::Address(s) => s.parse::<Ipv4Addr>().map_err(|_| {
            format!(
                "'{s}' is not an IPv4 address: write `gateway = true` or an address like {}",
                first_host(cidr)
            )
        })?,
    };
    if !cidr.contains(&ip) || ip == cidr.network() || ip == cidr.broadcast() {
        return Err(format!(
            "gateway {ip} is not a host address of cidr {cidr}: use one from {} to {}, or `gateway = true` for {}",
            first_host(cidr),
            Ipv4Addr::from(u32::from(cidr.broadcast()) - 1),
            first_host(cidr)
        ));
    }
    Ok(Some(ip))
}

/// The first host address of a subnet: the default gateway address.
pub fn first_host(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn absent_or_false_is_none() {
        let c = cidr("10.1.0.0/24");
        assert_eq!(resolve(None, Mode::Bridged, c), Ok(None));
        let off = GatewayFile::Enabled(false);
        assert_eq!(resolve(Some(&off), Mode::Bridged, c), Ok(None));
        assert_eq!(resolve(Some(&off), Mode::Routed, c), Ok(None));
    }

    #[test]
    fn true_is_the_first_host_and_an_address_is_checked() {
        let c = cidr("10.1.0.0/24");
        let on = GatewayFile::Enabled(true);
        assert_eq!(
            resolve(Some(&on), Mode::Bridged, c),
            Ok(Some(Ipv4Addr::new(10, 1, 0, 1)))
        );
        let at = GatewayFile::Address("10.1.0.254".into());
        assert_eq!(
            resolve(Some(&at), Mode::Bridged, c),
            Ok(Some(Ipv4Addr::new(10, 1, 0, 254)))
        );
        for bad in ["10.1.0.0", "10.1.0.255", "10.2.0.1", "gw"] {
            let e = resolve(Some(&GatewayFile::Address(bad.into())), Mode::Bridged, c).unwrap_err();
            assert!(e.contains(bad) && e.contains("10.1.0.1"), "{e}");
        }
    }

    #[test]
    fn routed_or_tiny_networks_are_refused() {
        let on = GatewayFile::Enabled(true);
        let e = resolve(Some(&on), Mode::Routed, cidr("10.1.0.0/16")).unwrap_err();
        assert!(e.contains("bridged"), "{e}");
        let e = resolve(Some(&on), Mode::Bridged, cidr("10.1.0.0/31")).unwrap_err();
        assert!(e.contains("/30"), "{e}");
    }
}
