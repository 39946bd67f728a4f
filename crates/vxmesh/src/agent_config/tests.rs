//! Tests of the agent configuration file: every key, flags over the file,
//! and every problem named with its key and fix.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const ETCD_FULL: &str = r#"
node = "host1"
store = "etcd://10.0.0.10:2379,10.0.0.11:2379"
prefix = "/lab"
etcd_ca = "/etc/vxmesh/ca.pem"
etcd_cert = "/etc/vxmesh/client.pem"
etcd_key = "/etc/vxmesh/client-key.pem"
etcd_user = "vxmesh"
etcd_password_file = "/etc/vxmesh/password"
networks = ["blue", "red"]
underlay_ip = "198.18.0.1"
underlay_dev = "eth1"
ttl = 30
leave = true
metrics = "198.18.0.1:9472"
state_dir = "/run/vxmesh-test"
resync = 2.5
once = true
vxlan_filter = false
key_file = "/etc/vxmesh/wg.key"
"#;

fn settings(text: &str) -> AgentSettings {
    let file = parse(text, "a.toml").unwrap_or_else(|e| panic!("{e}"));
    AgentSettings::from_file(file, Path::new("a.toml"))
}

fn problems(s: &AgentSettings) -> Vec<String> {
    match validate(s) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

fn has(list: &[String], needle: &str) {
    assert!(
        list.iter().any(|m| m.contains(needle)),
        "no problem containing '{needle}' in {list:#?}"
    );
}

#[test]
fn every_key_of_the_etcd_store_is_read() {
    // The file sets every key but cluster (the other store; see the next
    // test): a key missing from it would go unnoticed.
    let table: toml::Table = toml::from_str(ETCD_FULL).unwrap();
    for k in KEYS.iter().filter(|k| k.name != "cluster") {
        assert!(
            table.contains_key(k.name),
            "{} is not in the test file",
            k.name
        );
    }
    let c = validate(&settings(ETCD_FULL)).unwrap();
    assert_eq!(c.node, "host1");
    assert_eq!(c.state_dir, PathBuf::from("/run/vxmesh-test"));
    assert_eq!(c.resync, Duration::from_millis(2500));
    assert!(c.once);
    assert!(!c.vxlan_filter);
    assert_eq!(c.key_file, Some(PathBuf::from("/etc/vxmesh/wg.key")));
    assert_eq!(c.metrics, Some("198.18.0.1:9472".parse().unwrap()));
    assert!(c.leave());
    let AgentStore::Etcd(e) = &c.store else {
        panic!("etcd expected")
    };
    assert_eq!(
        e.login,
        EtcdLogin {
            store: Some("etcd://10.0.0.10:2379,10.0.0.11:2379".into()),
            prefix: Some("/lab".into()),
            ca: Some("/etc/vxmesh/ca.pem".into()),
            cert: Some("/etc/vxmesh/client.pem".into()),
            key: Some("/etc/vxmesh/client-key.pem".into()),
            user: Some("vxmesh".into()),
            password_file: Some("/etc/vxmesh/password".into()),
        }
    );
    assert_eq!(
        e.networks,
        ["blue", "red"].map(|n| n.parse::<crate::names::NetworkName>().unwrap())
    );
    assert_eq!(e.underlay_ip, Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(e.underlay_dev.as_deref(), Some("eth1"));
    assert_eq!(e.ttl, Some(30));
    let choice = c.store_choice();
    assert_eq!(choice.networks, ["blue", "red"]);
    assert_eq!(choice.ttl, Some(30));
    assert!(choice.leave);
    assert_eq!(choice.cluster, None);
}

#[test]
fn a_cluster_file_and_defaults() {
    let c = validate(&settings(
        "node = \"host1\"\ncluster = \"/etc/vxmesh/cluster.toml\"\n",
    ))
    .unwrap();
    assert_eq!(
        c.store,
        AgentStore::ClusterFile("/etc/vxmesh/cluster.toml".into())
    );
    assert_eq!(c.state_dir, PathBuf::from(crate::state::DEFAULT_STATE_DIR));
    assert_eq!(c.resync, Duration::from_secs(5));
    assert!(!c.once && !c.leave());
    assert_eq!(c.metrics, None);
    let choice = c.store_choice();
    assert_eq!(
        choice.cluster.as_deref(),
        Some(Path::new("/etc/vxmesh/cluster.toml"))
    );
    assert!(!choice.etcd.given());
    // An integer resync is fine too.
    let c = validate(&settings(
        "node = \"h\"\ncluster = \"/c.toml\"\nresync = 7\n",
    ))
    .unwrap();
    assert_eq!(c.resync, Duration::from_secs(7));
}

#[test]
fn relative_paths_are_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("agent.toml");
    std::fs::write(
        &f,
        "node = \"h\"\ncluster = \"cluster.toml\"\nstate_dir = \"/abs/state\"\n",
    )
    .unwrap();
    let s = load(&f).unwrap();
    assert_eq!(s.values.cluster, Some(dir.path().join("cluster.toml")));
    assert_eq!(s.values.state_dir, Some(PathBuf::from("/abs/state")));
    assert_eq!(s.file.as_deref(), Some(f.as_path()));
    assert_eq!(s.source_name(), f.display().to_string());
}

#[test]
fn flags_override_the_file_and_are_named_as_flags() {
    let mut s = settings(ETCD_FULL);
    s.override_with(AgentFile {
        node: Some("host9".into()),
        networks: Some(vec!["green".into()]),
        ttl: Some(1),
        ..AgentFile::default()
    });
    assert_eq!(s.values.node.as_deref(), Some("host9"));
    assert_eq!(s.values.networks, Some(vec!["green".to_string()]));
    // Keys the flags did not set keep the file's values.
    assert_eq!(s.values.prefix.as_deref(), Some("/lab"));
    assert_eq!(s.values.resync, Some(2.5));
    assert_eq!(
        s.from_flags.iter().copied().collect::<Vec<_>>(),
        ["networks", "node", "ttl"]
    );
    assert_eq!(s.source_name(), "a.toml and the command line");
    let p = problems(&s);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].starts_with("--ttl 1: out of range: use 2 to 3600"),
        "{p:#?}"
    );
    // The same mistake in the file is named as a key.
    let p = problems(&settings(&ETCD_FULL.replace("ttl = 30", "ttl = 1")));
    assert!(p[0].starts_with("ttl = 1: out of range"), "{p:#?}");
    // Flags alone.
    let mut s = AgentSettings::default();
    s.override_with(AgentFile {
        node: Some("h".into()),
        cluster: Some("/c.toml".into()),
        ..AgentFile::default()
    });
    assert_eq!(s.source_name(), "the command line");
    assert!(validate(&s).is_ok());
}

#[test]
fn every_unknown_key_and_wrong_type_is_named() {
    let e = parse(
        "nodes = \"h\"\nunderlay-ip = \"1.2.3.4\"\nnetwork = \"blue\"\ncolour = 3\nttl = \"ten\"\nleave = \"yes\"\nnetworks = \"blue\"\n",
        "a.toml",
    )
    .unwrap_err();
    let p: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(p.len(), 7, "{p:#?}");
    has(&p, "nodes: unknown key: did you mean node?");
    has(&p, "underlay-ip: unknown key: did you mean underlay_ip?");
    has(&p, "network: unknown key: did you mean networks?");
    has(
        &p,
        "colour: unknown key: remove it (known keys: node, cluster",
    );
    has(
        &p,
        "ttl = \"ten\": wrong type: want a whole number of seconds",
    );
    has(&p, "leave = \"yes\": wrong type: want true or false");
    has(&p, "networks = \"blue\": wrong type: want a list of names");
    assert!(
        e.to_string()
            .starts_with("invalid agent configuration (a.toml):\n  - ")
    );
    // A TOML syntax error names its line.
    let e = parse("node = \"h\"\nstore = \n", "a.toml").unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].field, "line 2");
    // An unreadable file names itself.
    let e = load(Path::new("/nonexistent/agent.toml")).unwrap_err();
    assert_eq!(e.problems[0].field, "file");
    assert!(e.problems[0].message.contains("cannot read it"));
}

#[test]
fn every_value_problem_is_reported_at_once() {
    let p = problems(&settings(
        r#"
node = "bad name"
store = "nonsense"
prefix = "lab"
etcd_cert = "/c.pem"
etcd_user = "u"
networks = ["blue", "blue", "bad/name"]
underlay_ip = "127.0.0.1"
underlay_dev = "a-much-too-long-device"
ttl = 99999
metrics = "9472"
resync = 0
"#,
    ));
    for needle in [
        "node = \"bad name\": 'bad name' is not a valid node name",
        "store = \"nonsense\": write it like etcd://HOST:2379",
        "prefix = \"lab\": etcd prefix 'lab' must start with '/'",
        "etcd_cert: needs etcd_key",
        "etcd_cert: needs etcd_ca",
        "etcd_user: needs etcd_password_file",
        "networks = \"blue\": listed twice",
        "networks = \"bad/name\": 'bad/name' is not a valid network name",
        "underlay_ip = \"127.0.0.1\": 127.0.0.1 cannot carry VXLAN",
        "underlay_dev = \"a-much-too-long-device\": 'a-much-too-long-device' is not a valid interface name",
        "ttl = 99999: out of range",
        "metrics = \"9472\": not an IP:PORT address",
        "resync = 0.0: must be between 0 and 86400 seconds",
    ] {
        has(&p, needle);
    }
    assert_eq!(p.len(), 13, "{p:#?}");
}

#[test]
fn missing_and_contradicting_keys() {
    let p = problems(&settings(""));
    assert_eq!(p.len(), 2, "{p:#?}");
    has(&p, "node: missing");
    has(&p, "store: no store given: use --cluster FILE");
    has(&p, "--store etcd://HOST:2379");
    let p = problems(&settings(
        "node = \"h\"\nstore = \"etcd://10.0.0.1:2379\"\n",
    ));
    has(&p, "networks: missing");
    has(&p, "underlay_ip: missing");
    has(&p, "--underlay-ip IP");
    let p = problems(&settings(
        "node = \"h\"\nstore = \"etcd://10.0.0.1:2379\"\nnetworks = []\nunderlay_ip = \"x\"\netcd_key = \"/k\"\netcd_password_file = \"/p\"\n",
    ));
    has(&p, "networks: missing");
    has(&p, "underlay_ip = \"x\": not an IPv4 address");
    has(&p, "etcd_key: needs etcd_cert");
    has(&p, "etcd_password_file: needs etcd_user");
    let p = problems(&settings(
        "node = \"h\"\ncluster = \"/c.toml\"\nstore = \"etcd://10.0.0.1:2379\"\n",
    ));
    assert_eq!(p.len(), 1);
    has(
        &p,
        "cluster = \"/c.toml\" and store = \"etcd://10.0.0.1:2379\": two different stores: give exactly one",
    );
    let p = problems(&settings("node = \"h\"\ncluster = \"\"\n"));
    has(&p, "cluster: empty path");
}

#[test]
fn etcd_keys_are_refused_with_a_cluster_file() {
    let text = ETCD_FULL.replace(
        "store = \"etcd://10.0.0.10:2379,10.0.0.11:2379\"",
        "cluster = \"/c.toml\"",
    );
    let p = problems(&settings(&text));
    for key in [
        "prefix",
        "etcd_ca",
        "etcd_cert",
        "etcd_key",
        "etcd_user",
        "etcd_password_file",
        "networks",
        "underlay_ip",
        "underlay_dev",
        "ttl",
        "leave",
    ] {
        has(&p, &format!("{key} = "));
    }
    assert_eq!(p.len(), 11, "{p:#?}");
    has(&p, "belongs to the etcd store (store)");
}
