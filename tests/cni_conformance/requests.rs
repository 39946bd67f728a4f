//! Requested addresses and MACs: honoured, or refused with error 7, never
//! ignored (issue 18 finding 5).

use super::*;

/// Requested addresses from every place the conventions name, the IPv4
/// entry of each list, and two different ones refused (finding 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_addresses_are_honoured_or_refused() {
    let s = spec("kr", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let c = conf("1.1.0", "overlay", &sd);
    type Case<'a> = (&'a str, Option<&'a str>, Option<(&'a str, Value)>, &'a str);
    let cases: [Case; 4] = [
        (
            "ipl",
            Some("IP=fd00::50,172.18.10.50"),
            None,
            "172.18.10.50/24",
        ),
        (
            "rci",
            None,
            Some((
                "runtimeConfig",
                json!({"ips": ["fd00::51/64", "172.18.10.51/24"]}),
            )),
            "172.18.10.51/24",
        ),
        (
            "aci",
            None,
            Some(("args", json!({"cni": {"ips": ["172.18.10.52"]}}))),
            "172.18.10.52/24",
        ),
        (
            "mix",
            Some("IgnoreUnknown=1;K8S_POD_NAME=web;IP=172.18.10.53"),
            Some(("runtimeConfig", json!({"ips": ["172.18.10.53/24"]}))),
            "172.18.10.53/24",
        ),
    ];
    for (tag, args, key, want) in cases {
        let cname = format!("vxm-{}-{tag}", lab.info.name);
        let _g = NetnsGuard::create(&cname).unwrap();
        let p = netns_path(&cname);
        let mut env = container_env(tag, &p, "eth0").to_vec();
        if let Some(a) = args {
            env.push(("CNI_ARGS", a));
        }
        let stdin = match &key {
            Some((k, v)) => with(c.clone(), k, v.clone()),
            None => c.to_string(),
        };
        let add = cni(&h1.netns, "ADD", &env, &stdin);
        assert_eq!(add.code, 0, "{tag}: {} {}", add.json, add.stderr);
        assert_eq!(add.json["ips"][0]["address"], json!(want), "{tag}");
        assert!(addresses_in(&cname, "eth0").contains(want), "{tag}");
        assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
    }
    let cname = format!("vxm-{}-two", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let two = [
        ("IP=172.18.10.60,172.18.10.61", None),
        (
            "IgnoreUnknown=1",
            Some(json!({"ips": ["172.18.10.60/24", "172.18.10.61/24"]})),
        ),
    ];
    for (args, rc) in two {
        let mut env = container_env("two", &p, "eth0").to_vec();
        env.push(("CNI_ARGS", args));
        let stdin = match rc {
            Some(r) => with(c.clone(), "runtimeConfig", r),
            None => c.to_string(),
        };
        let o = cni(&h1.netns, "ADD", &env, &stdin);
        assert_eq!(o.err_code(), json!(7), "two addresses: {}", o.json);
        assert!(!holders(&h1.state_dir).contains(&"two".to_string()));
    }
}

/// Requested MACs: applied in a routed network, from CNI_ARGS, the `mac`
/// capability and args.cni.mac; a multicast one refused (finding 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_macs_are_applied_or_refused() {
    let s = spec("km", 1, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let c = conf("1.1.0", "overlay", &sd);
    // The `mac` capability first: the old plugin ignored it silently.
    let cases = [
        (
            "mcr",
            None,
            Some(("runtimeConfig", json!({"mac": "02:11:22:33:44:66"}))),
            "02:11:22:33:44:66",
        ),
        (
            "mca",
            Some("MAC=02:11:22:33:44:55"),
            None,
            "02:11:22:33:44:55",
        ),
        (
            "mcg",
            None,
            Some(("args", json!({"cni": {"mac": "02:11:22:33:44:77"}}))),
            "02:11:22:33:44:77",
        ),
    ];
    for (tag, arg, key, want) in cases {
        let cname = format!("vxm-{}-{tag}", lab.info.name);
        let _g = NetnsGuard::create(&cname).unwrap();
        let p = netns_path(&cname);
        let mut env = container_env(tag, &p, "eth0").to_vec();
        if let Some(a) = arg {
            env.push(("CNI_ARGS", a));
        }
        let stdin = match &key {
            Some((k, v)) => with(c.clone(), k, v.clone()),
            None => c.to_string(),
        };
        let add = cni(&h1.netns, "ADD", &env, &stdin);
        assert_eq!(add.code, 0, "{tag}: {}", add.json);
        let link = ip(&cname, &["-o", "link", "show", "eth0"]);
        assert!(link.contains(want), "{tag}: the MAC is applied: {link}");
        assert_eq!(add.json["interfaces"][1]["mac"], json!(want), "{tag}");
        assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
    }
    let cname = format!("vxm-{}-bad", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let mut env = container_env("badmac", &p, "eth0").to_vec();
    env.push(("CNI_ARGS", "MAC=01:00:5e:00:00:01"));
    let o = cni(&h1.netns, "ADD", &env, &c.to_string());
    assert_eq!(
        o.err_code(),
        json!(7),
        "a multicast MAC is refused: {}",
        o.json
    );
    assert!(!ip(&cname, &["link"]).contains("eth0"));
}

/// In a bridged network peers reach a container at the MAC derived from
/// its address: a requested MAC is taken when it is that one and refused
/// with error 7 otherwise, never ignored (finding 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_networks_take_only_the_reachable_mac() {
    let s = spec("kb", 1, 0, Mode::Bridged, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let mut c = conf("1.1.0", "overlay", &sd);
    c["network"] = json!("net1");
    let cname = format!("vxm-{}-bm", lab.info.name);
    let _g = NetnsGuard::create(&cname).unwrap();
    let p = netns_path(&cname);
    let env = container_env("bm", &p, "eth0");
    // Learn a free address of this node's slice.
    let add = cni(&h1.netns, "ADD", &env, &c.to_string());
    assert_eq!(add.code, 0, "{}", add.json);
    let addr = add.json["ips"][0]["address"].as_str().unwrap().to_string();
    let ip: std::net::Ipv4Addr = addr.split('/').next().unwrap().parse().unwrap();
    assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
    let derived = vxmesh::model::container_mac(ip).to_string();
    for (args, ok) in [
        (format!("MAC=02:11:22:33:44:55;IP={ip}"), false),
        ("MAC=02:11:22:33:44:55".to_string(), false),
        (format!("MAC={derived};IP={ip}"), true),
    ] {
        let mut e = env.to_vec();
        e.push(("CNI_ARGS", &args));
        let o = cni(&h1.netns, "ADD", &e, &c.to_string());
        if ok {
            assert_eq!(o.code, 0, "{args}: {}", o.json);
            assert_eq!(o.json["interfaces"][1]["mac"], json!(derived));
            assert_eq!(cni(&h1.netns, "DEL", &env, &c.to_string()).code, 0);
        } else {
            assert_eq!(o.err_code(), json!(7), "{args}: {}", o.json);
            assert!(!ip_link_has(&cname, "eth0"), "{args}: nothing attached");
        }
    }
}

fn ip_link_has(netns: &str, ifname: &str) -> bool {
    ip(netns, &["-o", "link"]).contains(&format!(": {ifname}@"))
}
