//! The names vxmesh reads from outside: node, network and interface names
//! and the alias it writes on container veths. Each type states its rules
//! once; the cluster file, etcd records, the CNI plugin, GC, agent repair
//! and the fuzz targets all parse through these types.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that breaks its type's rules; the message says which rule and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("'{0}' is not a valid node name: use 1-{max} characters from [A-Za-z0-9._-]", max = NodeName::MAX_LEN)]
    Node(String),
    #[error("'{0}' is not a valid network name: use 1-{max} characters from [A-Za-z0-9._-]", max = NetworkName::MAX_LEN)]
    Network(String),
    #[error(
        "'{0}' is not a valid interface name (1-15 characters, no '/', ':' or spaces, not '.' or '..')"
    )]
    Interface(String),
    #[error("'{0}' is not a vxmesh veth alias (want vxmesh:veth:NETWORK:IFNAME:CONTAINER_ID)")]
    VethAlias(String),
}

/// Node and network names: letters, digits, `.`, `_` and `-`, 1 to `max` bytes.
fn is_portable_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// The kernel's rule for device names (`dev_valid_name`): 1 to 15 bytes
/// (IFNAMSIZ - 1), not `.` or `..`, no `/`, `:` or whitespace.
fn is_interface_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= IfName::MAX_LEN
        && s != "."
        && s != ".."
        && !s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

/// A string newtype: its rule is `$valid`, its error `$err`; everything
/// else (parsing, display, serde, borrowing) follows from those two.
macro_rules! string_name {
    ($(#[$doc:meta])* $name:ident, $valid:expr, $err:path) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                let valid: fn(&str) -> bool = $valid;
                if valid(&s) { Ok($name(s)) } else { Err($err(s)) }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                $name::try_from(s.to_string())
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $name::try_from(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_name!(
    /// A node's name in the cluster (file, etcd records, endpoint owners).
    NodeName,
    |s| is_portable_name(s, NodeName::MAX_LEN),
    NameError::Node
);

string_name!(
    /// A network's name (cluster file, etcd key level, CNI `network`).
    NetworkName,
    |s| is_portable_name(s, NetworkName::MAX_LEN),
    NameError::Network
);

string_name!(
    /// A Linux network interface name (an underlay device, a container's ifname).
    IfName,
    is_interface_name,
    NameError::Interface
);

impl NodeName {
    pub const MAX_LEN: usize = 64;
}

impl NetworkName {
    pub const MAX_LEN: usize = 32;
}

impl IfName {
    /// IFNAMSIZ (16) minus the terminating NUL.
    pub const MAX_LEN: usize = 15;
}

/// The alias vxmesh writes on a container's host-side veth,
/// `vxmesh:veth:NETWORK:IFNAME:CONTAINER_ID`: it marks the veth as an
/// attachment (never touched by the reconciler) and says whose it is.
/// The container id is the rest of the alias and may itself hold `:`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VethAlias {
    pub network: NetworkName,
    pub ifname: IfName,
    pub container_id: String,
}

impl VethAlias {
    /// Every alias of a container veth starts with this.
    pub const PREFIX: &'static str = "vxmesh:veth:";

    /// The alias text for an attachment, from names not (yet) typed; the
    /// one place the format is written.
    pub fn render(network: &str, ifname: &str, container_id: &str) -> String {
        format!("{}{network}:{ifname}:{container_id}", Self::PREFIX)
    }

    /// The network of an alias that starts with [`Self::PREFIX`], without
    /// checking the rest (for callers that only need to know whose it is).
    pub fn network_of(alias: &str) -> Option<&str> {
        let rest = alias.strip_prefix(Self::PREFIX)?;
        Some(rest.split(':').next().unwrap_or_default())
    }
}

impl fmt::Display for VethAlias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Self::render(
            &self.network,
            &self.ifname,
            &self.container_id,
        ))
    }
}

impl FromStr for VethAlias {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bad = || NameError::VethAlias(s.to_string());
        let rest = s.strip_prefix(Self::PREFIX).ok_or_else(bad)?;
        let (network, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (ifname, container_id) = rest.split_once(':').ok_or_else(bad)?;
        Ok(VethAlias {
            network: network.parse().map_err(|_| bad())?,
            ifname: ifname.parse().map_err(|_| bad())?,
            container_id: container_id.to_string(),
        })
    }
}

impl TryFrom<&str> for VethAlias {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        s.parse()
    }
}

impl TryFrom<String> for VethAlias {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl From<VethAlias> for String {
    fn from(a: VethAlias) -> String {
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn node_and_network_names() {
        assert!("host-1.a_b".parse::<NodeName>().is_ok());
        assert!("".parse::<NodeName>().is_err());
        assert!("bad name".parse::<NodeName>().is_err());
        assert!("a/b".parse::<NodeName>().is_err());
        assert!("x".repeat(64).parse::<NodeName>().is_ok());
        assert!("x".repeat(65).parse::<NodeName>().is_err());
        assert!("x".repeat(32).parse::<NetworkName>().is_ok());
        assert!("x".repeat(33).parse::<NetworkName>().is_err());
        assert_eq!(
            "bad name".parse::<NodeName>().unwrap_err().to_string(),
            "'bad name' is not a valid node name: use 1-64 characters from [A-Za-z0-9._-]"
        );
        assert_eq!(
            "".parse::<NetworkName>().unwrap_err().to_string(),
            "'' is not a valid network name: use 1-32 characters from [A-Za-z0-9._-]"
        );
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        for ok in [
            "eth0",
            "enp0s31f6",
            "vxm-br0",
            "x",
            "a.b",
            "123456789012345",
        ] {
            assert!(ok.parse::<IfName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1234567890123456",
            ".",
            "..",
            "a/b",
            "eth0:1",
            "a b",
            "a\tb",
            "a\nb",
        ] {
            assert!(bad.parse::<IfName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_goes_through_the_rules() {
        let n: NodeName = serde_json::from_str("\"h1\"").unwrap();
        assert_eq!(n, "h1");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"h1\"");
        let e = serde_json::from_str::<NodeName>("\"bad name\"").unwrap_err();
        assert!(e.to_string().contains("not a valid node name"), "{e}");
        assert!(serde_json::from_str::<IfName>("\"a/b\"").is_err());
    }

    #[test]
    fn veth_alias() {
        let a: VethAlias = "vxmesh:veth:demo:eth0:c1".parse().unwrap();
        assert_eq!(a.network, "demo");
        assert_eq!(a.ifname, "eth0");
        assert_eq!(a.container_id, "c1");
        assert_eq!(a.to_string(), "vxmesh:veth:demo:eth0:c1");
        // The container id is the rest, colons included.
        let b: VethAlias = "vxmesh:veth:demo:eth0:a:b".parse().unwrap();
        assert_eq!(b.container_id, "a:b");
        for bad in [
            "vxmesh:demo:eth0:c1",
            "vxmesh:veth:demo:eth0",
            "vxmesh:veth:bad net:eth0:c1",
            "vxmesh:veth:demo::c1",
            "other",
        ] {
            assert!(bad.parse::<VethAlias>().is_err(), "{bad}");
        }
        assert_eq!(
            VethAlias::network_of("vxmesh:veth:demo:eth0:c1"),
            Some("demo")
        );
        assert_eq!(VethAlias::network_of("vxmesh:veth:demo"), Some("demo"));
        assert_eq!(VethAlias::network_of("vxmesh:bridge"), None);
    }

    fn portable() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,32}"
    }

    proptest! {
        #[test]
        fn node_name_round_trips(s in "[A-Za-z0-9._-]{1,64}") {
            let n: NodeName = s.parse().unwrap();
            prop_assert_eq!(n.to_string(), s.clone());
            prop_assert_eq!(n.to_string().parse::<NodeName>().unwrap(), n);
        }

        #[test]
        fn network_name_round_trips(s in portable()) {
            let n: NetworkName = s.parse().unwrap();
            prop_assert_eq!(n.to_string().parse::<NetworkName>().unwrap(), n);
        }

        #[test]
        fn any_accepted_name_round_trips(s in "\\PC{0,20}") {
            if let Ok(n) = s.parse::<NodeName>() {
                prop_assert_eq!(n.to_string(), s.clone());
            }
            if let Ok(n) = s.parse::<IfName>() {
                prop_assert_eq!(n.to_string(), s.clone());
                prop_assert!(n.len() <= 15 && !n.contains('/'));
            }
        }

        #[test]
        fn if_name_round_trips(s in "[a-z0-9._-]{1,15}") {
            prop_assume!(s != "." && s != "..");
            let n: IfName = s.parse().unwrap();
            prop_assert_eq!(n.to_string().parse::<IfName>().unwrap(), n);
        }

        #[test]
        fn veth_alias_round_trips(
            net in portable(),
            ifname in "[a-z][a-z0-9]{0,14}",
            id in "[A-Za-z0-9:_.-]{0,64}",
        ) {
            let text = VethAlias::render(&net, &ifname, &id);
            let a: VethAlias = text.parse().unwrap();
            prop_assert_eq!(a.network.as_str(), net.as_str());
            prop_assert_eq!(a.ifname.as_str(), ifname.as_str());
            prop_assert_eq!(a.container_id.as_str(), id.as_str());
            prop_assert_eq!(a.to_string(), text);
        }
    }
}
