//! The cluster file's `[encryption]` table: the transport range and the
//! WireGuard port every node of the cluster uses.
//!
//! ```toml
//! [encryption]
//! transport_cidr = "10.255.0.0/16"   # optional, the default
//! port = 51820                       # optional, the default
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::transport::{self, DEFAULT_PORT, DEFAULT_TRANSPORT_CIDR, TransportError};
use crate::model::NodeRecord;

/// The table as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

/// The validated settings (defaults when the table is absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub transport: Ipv4Net,
    pub port: u16,
}

impl Default for Encryption {
    fn default() -> Self {
        Encryption {
            transport: DEFAULT_TRANSPORT_CIDR,
            port: DEFAULT_PORT,
        }
    }
}

impl From<&Encryption> for EncryptionFile {
    fn from(e: &Encryption) -> Self {
        EncryptionFile {
            transport_cidr: Some(e.transport.to_string()),
            port: Some(e.port.into()),
        }
    }
}

impl Encryption {
    /// A node's transport address (see [`transport::transport_addr`]).
    pub fn transport_addr(&self, node: &NodeRecord) -> Result<Ipv4Addr, TransportError> {
        transport::transport_addr(self.transport, &node.name, node.underlay_ip)
    }

    /// Every node's transport address, refusing collisions.
    pub fn assign(
        &self,
        nodes: &[NodeRecord],
    ) -> Result<BTreeMap<String, Ipv4Addr>, TransportError> {
        transport::assign(
            self.transport,
            nodes.iter().map(|n| (n.name.as_str(), n.underlay_ip)),
        )
    }
}

/// Validate the table: `(field, message)` for each problem.
pub fn validate(
    file: Option<&EncryptionFile>,
    vxlan_ports: &[u16],
) -> Result<Encryption, Vec<(String, String)>> {
    let mut problems = Vec::new();
    let mut e = Encryption::default();
    let Some(file) = file else {
        return Ok(e);
    };
    if let Some(text) = &file.transport_cidr {
        match crate::config::parse_net(text) {
            Ok(net) if net.prefix_len() <= 30 => e.transport = net,
            Ok(net) => problems.push((
                "encryption.transport_cidr".into(),
                format!("{net} is too small: use a prefix of /30 or shorter (default {DEFAULT_TRANSPORT_CIDR})"),
            )),
            Err(err) => problems.push(("encryption.transport_cidr".into(), err.to_string())),
        }
    }
    if let Some(port) = file.port {
        match u16::try_from(port) {
            Ok(p) if p != 0 && !vxlan_ports.contains(&p) => e.port = p,
            Ok(p) if p != 0 => problems.push((
                "encryption.port".into(),
                format!("{p} is also a network's VXLAN port: use another UDP port (default {DEFAULT_PORT})"),
            )),
            _ => problems.push((
                "encryption.port".into(),
                format!("{port} is not a UDP port: use 1-65535 (default {DEFAULT_PORT})"),
            )),
        }
    }
    if problems.is_empty() {
        Ok(e)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_means_the_defaults() {
        let e = validate(None, &[4789]).unwrap();
        assert_eq!(e, Encryption::default());
        assert_eq!(e.port, 51820);
        assert_eq!(e.transport.to_string(), "10.255.0.0/16");
    }

    #[test]
    fn bad_values_are_named_with_the_fix() {
        let f = EncryptionFile {
            transport_cidr: Some("10.255.0.0/31".into()),
            port: Some(4789),
        };
        let p = validate(Some(&f), &[4789]).unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "encryption.transport_cidr");
        assert!(p[0].1.contains("/30 or shorter"), "{p:?}");
        assert_eq!(p[1].0, "encryption.port");
        assert!(p[1].1.contains("VXLAN port"), "{p:?}");
        let f = EncryptionFile {
            transport_cidr: Some("nonsense".into()),
            port: Some(70000),
        };
        let p = validate(Some(&f), &[]).unwrap_err();
        assert!(p[1].1.contains("not a UDP port"), "{p:?}");
    }

    #[test]
    fn given_values_are_used() {
        let f = EncryptionFile {
            transport_cidr: Some("100.64.0.0/24".into()),
            port: Some(51999),
        };
        let e = validate(Some(&f), &[4789]).unwrap();
        assert_eq!(e.transport.to_string(), "100.64.0.0/24");
        assert_eq!(e.port, 51999);
    }

    const TWO_NODES: &str = r#"
[[network]]
name = "secret"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 100
encrypt = true

[[network]]
name = "open"
mode = "bridged"
cidr = "10.9.0.0/24"
subnet_len = 28
vni = 101

[[node]]
name = "a"
underlay_ip = "198.18.0.1"
public_key = "KEY_A"

[[node]]
name = "b"
underlay_ip = "198.18.0.2"
"#;

    fn file(key_a: &str, extra: &str) -> String {
        format!("{extra}\n{}", TWO_NODES.replace("KEY_A", key_a))
    }

    fn problems(text: &str) -> Vec<String> {
        crate::config::parse(text, "t.toml")
            .unwrap_err()
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn the_cluster_file_carries_keys_encrypt_and_the_table() {
        let key = crate::secure::PrivateKey::generate().unwrap().public();
        let c = crate::config::parse(&file(&key.to_string(), ""), "t.toml").unwrap();
        assert!(c.network("secret").unwrap().encrypt);
        assert!(!c.network("open").unwrap().encrypt);
        assert_eq!(c.node("a").unwrap().public_key, Some(key));
        assert_eq!(c.node("b").unwrap().public_key, None, "no key: no tunnel");
        assert_eq!(c.encryption, Encryption::default());
        let table = "[encryption]\ntransport_cidr = \"100.64.0.0/24\"\nport = 51999\n";
        let c = crate::config::parse(&file(&key.to_string(), table), "t.toml").unwrap();
        assert_eq!(c.encryption.port, 51999);
        assert_eq!(
            c.encryption.transport_addr(c.node("b").unwrap()).unwrap(),
            Ipv4Addr::new(100, 64, 0, 2)
        );
    }

    #[test]
    fn a_bad_public_key_names_the_node_and_the_fix() {
        let p = problems(&file("abc", ""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("node[0].public_key"), "{p:?}");
        assert!(p[0].contains("node 'a' public_key is not base64"), "{p:?}");
        let short = "AAAAAAAAAAAAAAAAAAAAAA==";
        let p = problems(&file(short, ""));
        assert!(p[0].contains("decodes to 16 bytes, not 32"), "{p:?}");
    }

    #[test]
    fn colliding_transport_addresses_are_refused_only_when_encrypting() {
        let key = crate::secure::PrivateKey::generate()
            .unwrap()
            .public()
            .to_string();
        let table = "[encryption]\ntransport_cidr = \"10.255.0.0/31\"\n";
        let p = problems(&file(&key, table));
        assert!(p[0].contains("encryption.transport_cidr"), "{p:?}");
        // 198.18.0.1 and 198.18.1.1 share their last octet: a /24 range collides.
        let text = file(&key, "[encryption]\ntransport_cidr = \"10.255.0.0/24\"\n")
            .replace("198.18.0.2", "198.18.1.1");
        let p = problems(&text);
        assert!(
            p[0].contains("nodes 'a' and 'b' both map to transport address 10.255.0.1"),
            "{p:?}"
        );
        let plain = text.replace("encrypt = true", "");
        assert!(crate::config::parse(&plain, "t.toml").is_ok());
    }
}
