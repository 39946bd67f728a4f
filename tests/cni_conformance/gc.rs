//! GC: never guesses, reads both list keys, collects only its own CNI
//! network's attachments, goes on after a failure (issue 18 finding 1).

use super::*;

/// Makes a file immutable (even to root) while alive: a release that fails.
struct Immutable(PathBuf);

impl Immutable {
    fn new(path: PathBuf) -> Self {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .unwrap();
        assert!(ok.success(), "chattr +i {}", path.display());
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// GC (finding 1): no list or a null one deletes nothing; both keys are
/// read; only attachments made under the same CNI network name are
/// collected (not another configuration's, not the lab's own container);
/// a failure does not stop it and is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_is_scoped_and_never_guesses() {
    let s = spec("kg", 1, 1, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().clone();
    let sd = h1.state_dir.to_str().unwrap().to_string();
    let lab_container = lab.container_on("host1").unwrap().clone();
    let mut guards = Vec::new();
    for (id, name) in [
        ("k1", "overlay"),
        ("k2", "overlay"),
        ("k3", "overlay"),
        ("o1", "other"),
    ] {
        let cname = format!("vxm-{}-{id}", lab.info.name);
        guards.push(NetnsGuard::create(&cname).unwrap());
        let p = netns_path(&cname);
        let add = cni(
            &h1.netns,
            "ADD",
            &container_env(id, &p, "eth0"),
            &conf("1.1.0", name, &sd).to_string(),
        );
        assert_eq!(add.code, 0, "{}", add.json);
    }
    let lab_holder = holders(&h1.state_dir)
        .into_iter()
        .find(|h| !["k1", "k2", "k3", "o1"].contains(&h.as_str()))
        .expect("the lab's own container holds an address");
    let all = |extra: &[&str]| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.push(lab_holder.clone());
        v.sort();
        v
    };
    assert_eq!(holders(&h1.state_dir), all(&["k1", "k2", "k3", "o1"]));
    let overlay = conf("1.1.0", "overlay", &sd);

    // No list, then a null list: nothing deleted, and it says so.
    for stdin in [
        overlay.to_string(),
        with(overlay.clone(), "cni.dev/attachments", Value::Null),
    ] {
        let o = cni(&h1.netns, "GC", &[], &stdin);
        assert_eq!(o.code, 0, "{}", o.json);
        assert_eq!(holders(&h1.state_dir), all(&["k1", "k2", "k3", "o1"]));
        assert!(
            o.stderr.contains("nothing is deleted"),
            "GC says so: {:?}",
            o.stderr
        );
        assert!(host_veth_exists(&h1.netns, "k2", "eth0"));
    }

    // The 1.1.0 key; k2's release fails: k3 is collected anyway, k2 reported.
    let k2_file = std::fs::read_dir(h1.state_dir.join("ipam/demo"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains("\"k2\"")
        })
        .unwrap()
        .path();
    let stuck = Immutable::new(k2_file);
    let keep = json!([{"containerID": "k1", "ifname": "eth0"}]);
    let o = cni(
        &h1.netns,
        "GC",
        &[],
        &with(overlay.clone(), "cni.dev/attachments", keep.clone()),
    );
    assert_eq!(o.err_code(), json!(5), "{}", o.json);
    assert!(
        o.json["details"].as_str().unwrap().contains("k2"),
        "{}",
        o.json
    );
    assert_eq!(
        holders(&h1.state_dir),
        all(&["k1", "k2", "o1"]),
        "k3 collected after k2 failed"
    );
    assert!(!host_veth_exists(&h1.netns, "k3", "eth0"));
    assert!(host_veth_exists(&h1.netns, "k1", "eth0"));
    assert!(
        host_veth_exists(&h1.netns, "o1", "eth0"),
        "another CNI network's attachment"
    );
    let lab_ns = &lab_container.netns;
    assert!(
        addresses_in(lab_ns, "eth0").contains(&lab_container.ip.to_string()),
        "the lab container kept its address"
    );
    drop(stuck);

    // The key libcni also sends.
    let o = cni(
        &h1.netns,
        "GC",
        &[],
        &with(overlay.clone(), "cni.dev/valid-attachments", keep),
    );
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(holders(&h1.state_dir), all(&["k1", "o1"]));

    // The other CNI network collects its own, and only its own.
    let other = conf("1.1.0", "other", &sd);
    let o = cni(
        &h1.netns,
        "GC",
        &[],
        &with(other, "cni.dev/attachments", json!([])),
    );
    assert_eq!(o.code, 0, "{}", o.json);
    assert_eq!(holders(&h1.state_dir), all(&["k1"]));
    assert!(host_veth_exists(&h1.netns, "k1", "eth0"));
    let p = netns_path(&format!("vxm-{}-k1", lab.info.name));
    assert_eq!(
        cni(
            &h1.netns,
            "DEL",
            &container_env("k1", &p, "eth0"),
            &overlay.to_string()
        )
        .code,
        0
    );
    drop(guards);
}
