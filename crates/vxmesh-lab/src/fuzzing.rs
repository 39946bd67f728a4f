//! Fuzz target bodies: every parser of outside input, driven with arbitrary
//! bytes. Used by the cargo-fuzz crate in `fuzz/` (one target per function)
//! and by `tests/fuzz_corpus.rs`, which replays the kept corpus and every
//! past crash on stable. Not an API: the functions may change at any time.
//!
//! Each function calls the real parser (the one the file reader, the CNI
//! entry point or the etcd watcher uses), returns quietly on an error and
//! panics only when an invariant breaks: what validation accepts must be
//! usable by the code behind it (plan, re-serialise, round-trip).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use vxmesh::cni;
use vxmesh::config::{self, Cluster, ClusterFile, Mode, NetworkFile, NodeFile};
use vxmesh::dataplane::kernel::ActualState;
use vxmesh::dataplane::plan::{self, PlanInput};
use vxmesh::dataplane::{NodePlan, diff};
use vxmesh::model::{self, Endpoint, Vni};
use vxmesh::names::{IfName, NodeName};
use vxmesh::store::etcd::{NetworkRecords, Record};

/// Planning a bridged network from a static file derives one endpoint per
/// address of every node's slice; above this many the fuzzer skips planning
/// (a big but valid file is slow, not wrong).
const MAX_PLANNED_ADDRESSES: u64 = 4096;

fn underlay_ok(ip: Ipv4Addr) -> bool {
    model::check_underlay_ip(ip).is_ok()
}

/// The cluster file (`--cluster FILE`, the static store): TOML parse and
/// validation. A file that validates must hold what validation promises,
/// re-serialise to a file that validates to the same cluster, and plan on
/// every node.
pub fn cluster_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cluster = match config::parse(text, "fuzz.toml") {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !e.problems.is_empty(),
                "an error names at least one problem"
            );
            let _ = e.to_string();
            return;
        }
    };
    check_cluster(&cluster);

    // Re-serialise with every subnet explicit: validates to the same cluster.
    let file = ClusterFile {
        networks: cluster.networks.iter().map(NetworkFile::from).collect(),
        nodes: cluster
            .nodes
            .iter()
            .map(|n| NodeFile {
                name: n.name.clone(),
                underlay_ip: n.underlay_ip.to_string(),
                underlay_dev: n.underlay_dev.clone(),
                subnet: None,
                subnets: n
                    .subnets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                public_key: n.public_key.map(|k| k.to_string()),
                next_public_key: n.next_public_key.map(|k| k.to_string()),
            })
            .collect(),
        encryption: Some((&cluster.encryption).into()),
    };
    let again = toml::to_string(&file).expect("a cluster file serialises");
    match config::parse(&again, "again.toml") {
        Ok(c) => assert_eq!(c, cluster, "re-serialised file:\n{again}"),
        Err(e) => panic!("re-serialised file does not validate: {e}\n{again}"),
    }

    plan_nodes(&cluster, None);
}

/// What validation promises about a cluster.
fn check_cluster(c: &Cluster) {
    assert!(!c.networks.is_empty());
    let mut names = HashSet::new();
    let mut vnis = HashSet::new();
    for n in &c.networks {
        assert!(names.insert(&n.name), "duplicate network {}", n.name);
        assert!(vnis.insert(n.vni), "duplicate VNI {}", n.vni);
        assert!(n.port != 0);
        assert!(Vni::new(n.vni.get()).is_ok());
        assert_eq!(n.cidr.trunc(), n.cidr, "cidr {} has host bits", n.cidr);
        assert!(n.subnet_len > n.cidr.prefix_len() && n.subnet_len <= 32);
        if n.mode == Mode::Routed {
            assert!(n.subnet_len <= 30);
        }
        if let Some(m) = n.mtu {
            assert!((config::MIN_MTU..=config::MAX_MTU).contains(&m));
        }
    }
    assert!(c.networks.iter().filter(|n| n.mode == Mode::Routed).count() <= 1);
    let mut node_names = HashSet::new();
    let mut ips = HashSet::new();
    for n in &c.nodes {
        assert!(node_names.insert(&n.name), "duplicate node {}", n.name);
        assert!(ips.insert(n.underlay_ip), "duplicate IP {}", n.underlay_ip);
        assert!(
            underlay_ok(n.underlay_ip),
            "underlay IP {} accepted",
            n.underlay_ip
        );
        assert!(n.name.parse::<NodeName>().is_ok(), "node name {}", n.name);
        if let Some(d) = &n.underlay_dev {
            assert!(!d.is_empty() && d.len() <= 15 && !d.contains('/'));
            assert!(d.parse::<IfName>().is_ok(), "underlay_dev {d}");
        }
    }
    for net in &c.networks {
        let mut taken: Vec<ipnet::Ipv4Net> = Vec::new();
        for n in &c.nodes {
            let s = n
                .subnets
                .get(&net.name)
                .unwrap_or_else(|| panic!("node {} has no subnet in {}", n.name, net.name));
            assert_eq!(s.trunc(), *s);
            assert!(net.cidr.contains(s) && s.prefix_len() == net.subnet_len);
            assert!(
                !taken.iter().any(|t| t.contains(s) || s.contains(t)),
                "overlapping subnet {s}"
            );
            taken.push(*s);
        }
        for n in &c.nodes {
            for k in n.subnets.keys() {
                assert!(c.network(k).is_some(), "subnet for unknown network {k}");
            }
        }
    }
}

/// Plan every node (up to a few) and check the plan is one the reconciler
/// accepts, with only unicast MACs and usable underlay IPs.
fn plan_nodes(c: &Cluster, endpoints: Option<&[Endpoint]>) {
    if endpoints.is_none() {
        let derived: u64 = c
            .networks
            .iter()
            .filter(|n| n.mode == Mode::Bridged)
            .map(|n| {
                c.nodes
                    .iter()
                    .filter_map(|node| node.subnets.get(&n.name))
                    .map(|s| 1u64 << (32 - s.prefix_len()))
                    .sum::<u64>()
            })
            .sum();
        if derived > MAX_PLANNED_ADDRESSES {
            return;
        }
    }
    for node in c.nodes.iter().take(4) {
        let input = PlanInput {
            vxlan_filter: true,
            cluster: c,
            node: &node.name,
            endpoints,
            underlay_mtu: 1500,
        };
        let p = match plan::plan(&input) {
            Ok(p) => p,
            Err(e) => panic!("a valid cluster does not plan on node {}: {e}", node.name),
        };
        check_plan(&p);
        if let Err(e) = diff::diff(&p, &ActualState::default()) {
            panic!("the reconciler refuses the plan of node {}: {e}", node.name);
        }
    }
}

fn check_plan(p: &NodePlan) {
    for n in &p.neighbours {
        assert!(n.mac.is_valid_peer(), "neighbour with MAC {}", n.mac);
    }
    for f in &p.fdb {
        assert!(f.mac.is_valid_peer(), "FDB entry with MAC {}", f.mac);
        assert!(underlay_ok(f.dst), "FDB entry towards {}", f.dst);
    }
}

/// A sample ADD result for merging a prevResult into.
fn sample_result() -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [{ "name": "vxm-0123456789" }, { "name": "eth0", "sandbox": "/run/netns/x" }],
        "ips": [{ "address": "172.18.10.2/24", "gateway": "172.18.10.1", "interface": 1 }],
        "routes": [{ "dst": "0.0.0.0/0", "gw": "172.18.10.1" }],
        "dns": {},
    })
}

/// The CNI network configuration on stdin (incl. prevResult, runtimeConfig
/// and valid attachments): parse and check, then everything the plugin
/// reads from it without touching the host.
pub fn cni_config(data: &[u8]) {
    let _ = cni::reply_version(data);
    let conf = match cni::parse_conf(data) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_json(&cni::reply_version(data));
            return;
        }
    };
    assert!(cni::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
    assert_eq!(conf.plugin_type, "vxmesh");
    if let Some(m) = conf.mtu {
        assert!((config::MIN_MTU..=config::MAX_MTU).contains(&m));
    }
    assert_eq!(cni::reply_version(data), conf.cni_version);
    let _ = cni::requested_ip(&cni::Env::default(), &conf);
    let _ = cni::requested_mac(&cni::Env::default(), &conf);
    let _ = conf.gc_attachments();
    if let Some(prev) = &conf.prev_result {
        let _ = cni::prev_expectations(prev, "eth0");
        let mut result = sample_result();
        cni::merge_prev(&mut result, prev);
        let ours = 2;
        let theirs = prev
            .get("interfaces")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        assert_eq!(
            result["interfaces"].as_array().map(Vec::len),
            Some(theirs + ours)
        );
        // Our address still points at our container interface.
        let last = result["ips"].as_array().and_then(|a| a.last()).cloned();
        assert_eq!(
            last.and_then(|ip| ip["interface"].as_u64()),
            Some(theirs as u64 + 1)
        );
    }
}

/// The CNI environment (`CNI_COMMAND`, `CNI_ARGS` with `IP=`, ...) and the
/// configuration together. Input: `KEY=VALUE` lines; a line `--` ends them
/// and the rest is the configuration on stdin.
pub fn cni_env(data: &[u8]) {
    let (env_part, stdin) = match data.windows(4).position(|w| w == b"\n--\n") {
        Some(i) => (&data[..i], &data[i + 4..]),
        None => (data, &b""[..]),
    };
    let Ok(env_text) = std::str::from_utf8(env_part) else {
        return;
    };
    let vars: HashMap<String, String> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env = cni::Env::from_vars(&vars);
    let _ = cni::reply_version(stdin);
    let conf = match cni::parse_conf(stdin) {
        Ok(c) => c,
        // A fixed, valid configuration: the environment alone is the input.
        Err(_) => cni::parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"vxmesh","network":"demo"}"#,
        )
        .expect("a valid configuration"),
    };
    match cni::requested_ip(&env, &conf) {
        Ok(Some(ip)) => {
            // The address came from somewhere the caller wrote it.
            let from_args = env.args.as_deref().is_some_and(|a| {
                a.split(';').any(|p| {
                    p.strip_prefix("IP=").is_some_and(|list| {
                        list.split(',').any(|v| {
                            v.split('/').next().and_then(|h| h.parse::<Ipv4Addr>().ok()) == Some(ip)
                        })
                    })
                })
            });
            let from_rc = conf.runtime_config.is_some() || conf.args.is_some();
            assert!(from_args || from_rc, "address {ip} from nowhere");
        }
        Ok(None) => {}
        Err(e) => assert!(!e.msg.is_empty()),
    }
}

/// etcd records of one network (config, subnet claims, node records,
/// endpoints) as the store reads them. Input: one record per line,
/// `KEY<TAB>VALUE`. Every record is also parsed on its own; the snapshot
/// derived from all of them must be consistent and plan on every node.
pub fn store_record(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let start = config::Network {
        outbound_nat: true,
        name: "demo".into(),
        mode: Mode::Bridged,
        cidr: "10.1.0.0/24".parse().expect("valid"),
        subnet_len: 28,
        vni: Vni::new(100).expect("valid"),
        port: 4789,
        mtu: None,
        gateway: None,
        encrypt: false,
    };
    let records = NetworkRecords::new("/vxmesh", start.clone());
    let listing: Vec<(&str, &[u8])> = text
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('\t').unwrap_or((line, ""));
            (key, value.as_bytes())
        })
        .collect();
    for (key, value) in &listing {
        record_alone(&records, key, value);
    }
    let snap = records.snapshot(listing.iter().copied());

    // The network: the last config listed if it is valid, else the one we started with.
    let (config_key, _) = records.encode(&Record::Network(start.clone()));
    let net = match listing.iter().rev().find(|(k, _)| *k == config_key) {
        Some((k, v)) => match records.parse(k, v) {
            Ok(Some(Record::Network(n))) => n,
            _ => start,
        },
        None => start,
    };
    assert_eq!(snap.cluster.networks, vec![net.clone()]);

    // What the snapshot holds validates again under that network.
    let current = NetworkRecords::new("/vxmesh", net.clone());
    let mut ips = HashSet::new();
    let mut subnets: Vec<ipnet::Ipv4Net> = Vec::new();
    for n in &snap.cluster.nodes {
        assert!(n.name.parse::<NodeName>().is_ok());
        assert!(
            underlay_ok(n.underlay_ip),
            "node {} at {}",
            n.name,
            n.underlay_ip
        );
        assert!(ips.insert(n.underlay_ip), "two nodes at {}", n.underlay_ip);
        let s = n.subnets[&net.name];
        let stored = Record::Node(vxmesh::store::etcd::StoredNode {
            name: n.name.clone(),
            underlay_ip: n.underlay_ip,
            underlay_dev: n.underlay_dev.clone(),
            subnet: s,
            public_key: n.public_key,
            next_public_key: n.next_public_key,
        });
        let (key, value) = current.encode(&stored);
        assert_eq!(
            current.parse(&key, &value),
            Ok(Some(stored)),
            "node {}",
            n.name
        );
        assert!(!subnets.iter().any(|t| t.contains(&s) || s.contains(t)));
        subnets.push(s);
    }
    let eps = snap.endpoints.clone().unwrap_or_default();
    for ep in &eps {
        let stored = Record::Endpoint(ep.clone());
        let (key, value) = current.encode(&stored);
        assert_eq!(
            current.parse(&key, &value),
            Ok(Some(stored)),
            "endpoint {ep:?}"
        );
    }
    plan_nodes(&snap.cluster, Some(&eps));
}

/// One record parsed the way the store parses it, with round trips: what
/// validates is stored under its canonical key and parses back the same.
fn record_alone(records: &NetworkRecords, key: &str, value: &[u8]) {
    let Ok(Some(record)) = records.parse(key, value) else {
        return;
    };
    let (again_key, again_value) = records.encode(&record);
    assert_eq!(again_key, key, "key not canonical");
    assert_eq!(
        records.parse(&again_key, &again_value),
        Ok(Some(record.clone()))
    );
    match record {
        Record::Network(n) => {
            // The table that declares it validates back to it.
            let file = ClusterFile {
                networks: vec![NetworkFile::from(&n)],
                nodes: vec![],
                encryption: None,
            };
            let valid = config::validate(&file, "etcd").map(|mut c| c.networks.remove(0));
            assert_eq!(valid, Ok(n));
        }
        Record::Encryption(e) => {
            // Usable: a transport range with room for nodes, a real port.
            assert!(e.transport.prefix_len() <= 30 && e.port != 0);
        }
        Record::Claim { node, .. } => assert!(node.parse::<NodeName>().is_ok()),
        Record::Node(n) => {
            assert!(underlay_ok(n.underlay_ip));
            assert_eq!(n.name, key.rsplit('/').next().unwrap_or_default());
        }
        Record::Endpoint(ep) => {
            assert!(ep.mac.is_valid_peer());
            assert_eq!(
                records.endpoint_key(ep.ip),
                key,
                "endpoint key not canonical"
            );
        }
    }
}

/// The node's state files: a served network (`networks/NET.json`, read by
/// attach and the CNI plugin), an address allocation (`ipam/NET/IP`), the
/// agent lock's pid and a lab's `lab.json`. The first byte picks the kind.
pub fn state_file(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            let Ok(s) = vxmesh::state::parse_served_network(rest) else {
                return;
            };
            let json = serde_json::to_vec(&s).expect("serialises");
            assert_eq!(
                vxmesh::state::parse_served_network(&json).ok(),
                Some(s.clone())
            );
            let n = &s.state;
            // What attach does with it before touching the host: pick
            // addresses from the pool.
            let _ = plan::usable_addresses(n.pool, n.subnet, n.gateway)
                .take(4)
                .count();
        }
        1 => {
            if let Ok(o) = vxmesh::ipam::parse_owner(rest) {
                let json = serde_json::to_vec(&o).expect("serialises");
                assert_eq!(vxmesh::ipam::parse_owner(&json).ok(), Some(o));
            }
        }
        2 => {
            if let Some(pid) = vxmesh::state::lock_holder(rest) {
                assert!(pid > 0);
                assert_eq!(
                    vxmesh::state::lock_holder(pid.to_string().as_bytes()),
                    Some(pid)
                );
            }
        }
        _ => {
            if let Ok(l) = crate::lab::LabInfo::from_json(rest) {
                let json = serde_json::to_vec(&l).expect("serialises");
                assert_eq!(crate::lab::LabInfo::from_json(&json).ok(), Some(l));
            }
        }
    }
}

/// `STATE/plan.json` as `vxmesh status` and `vxmesh doctor` read it: parse,
/// round-trip, and run both reports against an empty kernel.
pub fn saved_plan(data: &[u8]) {
    let Ok(saved) = vxmesh::status::parse_plan(data) else {
        return;
    };
    let json = serde_json::to_vec(&saved).expect("serialises");
    assert_eq!(vxmesh::status::parse_plan(&json).ok(), Some(saved.clone()));
    let actual = ActualState::default();
    let report = vxmesh::status::compare(&saved, &actual, false, 1_000);
    let _ = vxmesh::status::render(&report);
    let opts = vxmesh::doctor::DoctorOptions {
        to: None,
        ping: false,
    };
    let facts = vxmesh::doctor::HostFacts::default();
    if let Ok(r) = vxmesh::doctor::examine(&saved, &actual, &facts, &|_| None, false, &opts) {
        let _ = vxmesh::doctor::render(&r);
    }
}
