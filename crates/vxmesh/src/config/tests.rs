//! Tests of cluster file parsing and validation.

use super::*;

const GOOD: &str = r#"
[[network]]
name = "demo"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 100

[[node]]
name = "host1"
underlay_ip = "198.18.0.1"
subnet = "172.18.10.0/24"

[[node]]
name = "host2"
underlay_ip = "198.18.0.2"
"#;

fn errs(text: &str) -> Vec<String> {
    match parse(text, "t.toml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

fn has(text: &str, needle: &str) {
    let e = errs(text);
    assert!(
        e.iter().any(|m| m.contains(needle)),
        "no problem containing '{needle}' in {e:#?}"
    );
}

#[test]
fn good_file_resolves_subnets() {
    let c = parse(GOOD, "t").unwrap();
    assert_eq!(c.networks[0].port, 4789);
    assert_eq!(c.networks[0].mode, Mode::Routed);
    assert_eq!(c.nodes[0].subnets["demo"].to_string(), "172.18.10.0/24");
    // Derived: the first /24 not explicitly taken.
    assert_eq!(c.nodes[1].subnets["demo"].to_string(), "172.18.0.0/24");
}

#[test]
fn derivation_skips_explicit_subnets() {
    let t = GOOD.replace("172.18.10.0/24", "172.18.0.0/24");
    let c = parse(&t, "t").unwrap();
    assert_eq!(c.nodes[1].subnets["demo"].to_string(), "172.18.1.0/24");
}

#[test]
fn bad_cidr() {
    has(
        &GOOD.replace("172.18.0.0/16", "172.18.0.0/33"),
        "network[0].cidr",
    );
    has(
        &GOOD.replace("172.18.0.0/16", "172.18.0.1/16"),
        "host bits set: write it as 172.18.0.0/16",
    );
    has(
        &GOOD.replace("172.18.0.0/16", "banana"),
        "is not an IPv4 CIDR",
    );
}

#[test]
fn subnet_outside_and_overlapping() {
    has(
        &GOOD.replace("172.18.10.0/24", "172.19.10.0/24"),
        "node[0].subnet: subnet 172.19.10.0/24 is outside",
    );
    has(
        &GOOD.replace("172.18.10.0/24", "172.18.10.0/25"),
        "is a /25 but network 'demo' has subnet_len = 24",
    );
    let t = GOOD.replace(
        "underlay_ip = \"198.18.0.2\"",
        "underlay_ip = \"198.18.0.2\"\nsubnet = \"172.18.10.0/24\"",
    );
    has(&t, "overlaps the one of node[0]");
}

#[test]
fn duplicates() {
    has(
        &GOOD.replace("host2", "host1"),
        "node[1].name: node 'host1' is already declared",
    );
    has(
        &GOOD.replace("198.18.0.2", "198.18.0.1"),
        "node[1].underlay_ip: 198.18.0.1 is already",
    );
    has(
        &GOOD.replace("198.18.0.2", "127.0.0.1"),
        "cannot carry VXLAN",
    );
}

#[test]
fn ranges() {
    has(
        &GOOD.replace("vni = 100", "vni = 0"),
        "network[0].vni: VNI 0 is out of range",
    );
    has(&GOOD.replace("vni = 100", "vni = 16777216"), "out of range");
    has(
        &GOOD.replace("vni = 100", "vni = 100\nport = 0"),
        "network[0].port",
    );
    has(
        &GOOD.replace("vni = 100", "vni = 100\nport = 70000"),
        "network[0].port",
    );
    has(
        &GOOD.replace("vni = 100", "vni = 100\nmtu = 500"),
        "network[0].mtu: MTU 500 is out of range",
    );
    has(
        &GOOD.replace("subnet_len = 24", "subnet_len = 16"),
        "network[0].subnet_len",
    );
}

#[test]
fn unknown_keys_and_typos() {
    has(
        &GOOD.replace("vni = 100", "vni = 100\nvnii = 3"),
        "unknown field `vnii`",
    );
    has(
        &GOOD.replace("vni = 100", "vni = 100\nmode = \"routd\""),
        "unknown variant `routd`",
    );
    has(
        &GOOD.replace(
            "[[node]]\nname = \"host1\"",
            "[[node]]\nname = \"host1\"\ncolour = 1",
        ),
        "line 10: unknown field `colour`",
    );
}

#[test]
fn cidr_exhausted() {
    let t = GOOD
        .replace("172.18.0.0/16", "172.18.0.0/23")
        .replace("172.18.10.0/24", "172.18.0.0/24")
        + "\n[[node]]\nname = \"host3\"\nunderlay_ip = \"198.18.0.3\"\n";
    has(&t, "has no free /24 left for node 'host3'");
}

#[test]
fn several_networks() {
    let t = r#"
[[network]]
name = "a"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 28
vni = 200

[[network]]
name = "b"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 28
vni = 201

[[node]]
name = "h1"
underlay_ip = "198.18.0.1"
subnets = { a = "10.1.0.16/28" }

[[node]]
name = "h2"
underlay_ip = "198.18.0.2"
"#;
    let c = parse(t, "t").unwrap();
    assert_eq!(c.nodes[0].subnets["a"].to_string(), "10.1.0.16/28");
    assert_eq!(c.nodes[1].subnets["a"].to_string(), "10.1.0.0/28");
    assert_eq!(c.nodes[0].subnets["b"].to_string(), "10.1.0.0/28");
    has(
        &t.replace("vni = 201", "vni = 200"),
        "VNI 200 is already used by network 'a'",
    );
    has(
        &t.replace("vni = 201", "vni = 200\nport = 8472"),
        "with a different port",
    );
    has(
        &t.replace("{ a = \"10.1.0.16/28\" }", "{ c = \"10.1.0.16/28\" }"),
        "there is no network 'c'",
    );
    has(
        &t.replace("10.1.0.16/28", "10.2.0.16/28"),
        "address slice 10.2.0.16/28 is outside",
    );
    has(
        &t.replace("name = \"h2\"", "name = \"h2\"\nsubnet = \"10.1.0.0/28\""),
        "use subnets = {",
    );
    let two_routed = t.replace("mode = \"bridged\"", "mode = \"routed\"");
    has(&two_routed, "a node serves one routed network");
}

#[test]
fn names_follow_the_shared_rules() {
    has(
        &GOOD.replace("name = \"host2\"", "name = \"host 2\""),
        "node[1].name: 'host 2' is not a valid node name",
    );
    has(
        &GOOD.replace("name = \"demo\"", "name = \"de/mo\""),
        "network[0].name: 'de/mo' is not a valid network name",
    );
    for dev in ["eth0 1", "eth0\\t1", "a/b", "..", "0123456789abcdef"] {
        has(
            &GOOD.replace(
                "underlay_ip = \"198.18.0.2\"",
                &format!("underlay_ip = \"198.18.0.2\"\nunderlay_dev = \"{dev}\""),
            ),
            "node[1].underlay_dev: ",
        );
    }
    let c = parse(
        &GOOD.replace(
            "underlay_ip = \"198.18.0.2\"",
            "underlay_ip = \"198.18.0.2\"\nunderlay_dev = \"enp0s31f6\"",
        ),
        "t",
    )
    .unwrap();
    assert_eq!(c.nodes[1].underlay_dev.as_deref(), Some("enp0s31f6"));
}

const GATEWAY: &str = r#"
[[network]]
name = "seg"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 28
vni = 200
gateway = true

[[node]]
name = "host1"
underlay_ip = "198.18.0.1"
"#;

#[test]
fn gateway_true_is_the_first_host_and_round_trips() {
    let c = parse(GATEWAY, "t").unwrap();
    assert_eq!(c.networks[0].gateway, Some("10.1.0.1".parse().unwrap()));
    let back = NetworkFile::from(&c.networks[0]);
    assert_eq!(back.gateway, Some(GatewayFile::Address("10.1.0.1".into())));
    // The JSON etcd stores parses back as a network file.
    let json = serde_json::to_string(&c.networks[0]).unwrap();
    let f: NetworkFile = serde_json::from_str(&json).unwrap();
    assert_eq!(f, back);
    let at = GATEWAY.replace("gateway = true", "gateway = \"10.1.0.254\"");
    let c = parse(&at, "t").unwrap();
    assert_eq!(c.networks[0].gateway, Some("10.1.0.254".parse().unwrap()));
}

#[test]
fn gateway_errors_name_the_key() {
    has(
        &GATEWAY
            .replace("mode = \"bridged\"", "mode = \"routed\"")
            .replace("subnet_len = 28", "subnet_len = 26"),
        "network[0].gateway",
    );
    has(
        &GATEWAY.replace("gateway = true", "gateway = \"10.2.0.1\""),
        "not a host address of cidr 10.1.0.0/24",
    );
    let two = GATEWAY.replace(
        "[[node]]",
        "[[network]]\nname = \"other\"\nmode = \"bridged\"\ncidr = \"10.1.0.0/25\"\nsubnet_len = 28\nvni = 201\n\n[[node]]",
    );
    has(&two, "overlaps network 'other'");
}
