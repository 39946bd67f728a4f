//! What the plugin prints on stdout: the ADD result, the VERSION reply and
//! the error reply, as serde types. The plugin writes them; callers that
//! run a plugin as a runtime does (the lab, the CNI bench) read them back.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The result of ADD (spec "ADD Success"); CHECK gets it back as prevResult.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

/// An interface the plugin created (host or container side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The container's namespace path; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address assigned to an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length (`10.0.0.2/24`).
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings (vxmesh sets none: `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl AddResult {
    /// The first IPv4 address in `ips`, without its prefix.
    pub fn first_ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip.address {
            IpNet::V4(n) => Some(n.addr()),
            IpNet::V6(_) => None,
        })
    }

    /// The result as JSON, chained after a previous plugin's `prev` result
    /// if there is one (see [`merge_prev`]).
    pub fn to_json(&self, prev: Option<&Value>) -> Value {
        let mut out = serde_json::to_value(self).expect("a CNI result is plain JSON");
        if let Some(prev) = prev {
            merge_prev(&mut out, prev);
        }
        out
    }
}

/// Put the previous plugin's interfaces/ips/routes first, re-indexing ours.
///
/// This works on JSON, not on [`AddResult`]: a previous plugin's result is
/// passed on as it came, with whatever fields that plugin wrote.
pub fn merge_prev(result: &mut Value, prev: &Value) {
    let prev_ifaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let offset = prev_ifaces.len() as u64;
    let mut ifaces = prev_ifaces;
    ifaces.extend(result["interfaces"].as_array().cloned().unwrap_or_default());
    let mut ips = prev
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for mut ip in result["ips"].as_array().cloned().unwrap_or_default() {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = json!(i + offset);
        }
        ips.push(ip);
    }
    let mut routes = prev
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    routes.extend(result["routes"].as_array().cloned().unwrap_or_default());
    result["interfaces"] = json!(ifaces);
    result["ips"] = json!(ips);
    result["routes"] = json!(routes);
    if let Some(dns) = prev.get("dns") {
        result["dns"] = dns.clone();
    }
}

/// Put a result (ours, or merged with a previous plugin's) into the shape
/// of CNI `version`, as libcni's converters would: before 0.4.0... 1.0.0
/// every `ips[]` entry names its family (`"version": "4"|"6"`), from 1.0.0
/// on it must not; the 1.1.0-only interface and route fields (`mtu`,
/// `socketPath`, `pciID`, route `mtu`, `advmss`, `priority`, `table`,
/// `scope`) are dropped before 1.1.0.
pub fn convert_result(result: &mut Value, version: &str) {
    result["cniVersion"] = json!(version);
    let before_1_0 = matches!(version, "0.3.0" | "0.3.1" | "0.4.0");
    let before_1_1 = before_1_0 || version == "1.0.0";
    if let Some(ips) = result.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if before_1_0 {
                let family = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse::<IpNet>().ok())
                    .map(|n| if n.addr().is_ipv4() { "4" } else { "6" });
                if let Some(f) = family {
                    ip.insert("version".into(), json!(f));
                }
            } else {
                ip.remove("version");
            }
        }
    }
    if before_1_1 {
        for iface in result
            .get_mut("interfaces")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            for k in ["mtu", "socketPath", "pciID"] {
                iface.remove(k);
            }
        }
        for route in result
            .get_mut("routes")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            for k in ["mtu", "advmss", "priority", "table", "scope"] {
                route.remove(k);
            }
        }
    }
}

/// The reply to VERSION.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionReply {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

/// The error JSON a plugin prints when it fails (fields a plugin left out
/// read as empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub code: Option<u32>,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed() -> AddResult {
        AddResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "vxm-0123456789".into(),
                    mac: Some(String::new()),
                    mtu: None,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:ac:12:0a:00:02".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/c1".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "172.18.10.2/24".parse().unwrap(),
                gateway: Some("172.18.10.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("172.18.10.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn serializes_as_the_plugin_always_printed() {
        assert_eq!(
            routed().to_json(None),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    { "name": "vxm-0123456789", "mac": "" },
                    { "name": "eth0", "mac": "02:ac:12:0a:00:02", "mtu": 1450, "sandbox": "/run/netns/c1" },
                ],
                "ips": [ { "address": "172.18.10.2/24", "interface": 1, "gateway": "172.18.10.1" } ],
                "routes": [ { "dst": "0.0.0.0/0", "gw": "172.18.10.1" } ],
                "dns": {},
            })
        );
        let mut bridged = routed();
        bridged.ips[0].gateway = None;
        bridged.routes[0].gw = None;
        let v = bridged.to_json(None);
        assert_eq!(
            v["ips"][0],
            json!({ "address": "172.18.10.2/24", "interface": 1 })
        );
        assert_eq!(v["routes"], json!([{ "dst": "0.0.0.0/0" }]));
    }

    #[test]
    fn reads_back_what_it_wrote_and_other_plugins_results() {
        let r = routed();
        let back: AddResult = serde_json::from_value(r.to_json(None)).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.first_ipv4(), Some("172.18.10.2".parse().unwrap()));
        // The reference bridge plugin's shape: more interfaces, v6 first.
        let other: AddResult = serde_json::from_value(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name":"br0","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips": [{"address":"fd00::2/64","interface":1},{"address":"10.99.0.2/24","gateway":"10.99.0.1","interface":1}],
            "routes": [{"dst":"0.0.0.0/0","gw":"10.99.0.1","mtu":1400}],
            "dns": {"nameservers":["10.99.0.53"]},
        }))
        .unwrap();
        assert_eq!(other.first_ipv4(), Some("10.99.0.2".parse().unwrap()));
        assert_eq!(other.dns.nameservers, ["10.99.0.53"]);
    }

    #[test]
    fn prev_result_is_kept_first() {
        let mut ours = json!({"interfaces":[{"name":"h"},{"name":"eth0"}],"ips":[{"address":"10.0.0.2/24","interface":1}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}});
        let prev = json!({"interfaces":[{"name":"lo0"}],"ips":[{"address":"192.0.2.1/32","interface":0}],"routes":[],"dns":{"nameservers":["192.0.2.53"]}});
        merge_prev(&mut ours, &prev);
        assert_eq!(ours["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(ours["ips"][1]["interface"], json!(2));
        assert_eq!(ours["dns"]["nameservers"][0], json!("192.0.2.53"));
    }

    #[test]
    fn chained_result_keeps_the_previous_plugins_fields() {
        let prev = json!({"interfaces":[{"name":"lo0","socketPath":"/x"}],"ips":[],"routes":[]});
        let v = routed().to_json(Some(&prev));
        assert_eq!(v["interfaces"][0], json!({"name":"lo0","socketPath":"/x"}));
        assert_eq!(v["ips"][0]["interface"], json!(2));
        assert_eq!(v["dns"], json!({}));
    }

    #[test]
    fn results_take_the_shape_of_each_version() {
        let prev = json!({"interfaces":[{"name":"br0"},{"name":"eth0","sandbox":"/x","mtu":1400}],
            "ips":[{"address":"fd00::2/64","interface":1}],"routes":[{"dst":"fd00::/8","mtu":1300}]});
        let merged = routed().to_json(Some(&prev));
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let mut r = merged.clone();
            convert_result(&mut r, v);
            assert_eq!(r["cniVersion"], json!(v));
            assert_eq!(r["ips"][0]["version"], json!("6"));
            assert_eq!(r["ips"][1]["version"], json!("4"));
            assert!(
                r["interfaces"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|i| i.get("mtu").is_none())
            );
            assert_eq!(r["routes"][0], json!({"dst":"fd00::/8"}));
        }
        let mut r = merged.clone();
        r["ips"][0]["version"] = json!("6");
        convert_result(&mut r, "1.0.0");
        assert!(r["ips"][0].get("version").is_none());
        assert!(r["interfaces"][3].get("mtu").is_none(), "mtu is 1.1.0-only");
        let mut r = merged.clone();
        convert_result(&mut r, "1.1.0");
        assert_eq!(r, merged);
    }

    #[test]
    fn error_reply_reads_partial_errors() {
        let e: ErrorReply = serde_json::from_value(json!({"code": 7, "msg": "bad"})).unwrap();
        assert_eq!(e.code, Some(7));
        assert_eq!(e.details, "");
    }
}
