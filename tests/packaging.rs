//! Installing vxmesh on a host: the agent configuration file through the
//! CLI (every key reaches the agent, flags override, problems are named),
//! and the Debian package scripts/package.sh builds: its file list, its
//! systemd unit (`systemd-analyze verify`), the binary and the CNI plugin
//! run from the extracted tree, and its man pages render (`man -l`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{exe, spec, up, vxmesh};
use nix::sys::signal::Signal;
use vxmesh::agent_config::KEYS;
use vxmesh::config::Mode;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Run a command; (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const CLUSTER: &str = r#"
[[network]]
name = "demo"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 100

[[node]]
name = "host1"
underlay_ip = "198.18.0.1"
"#;

#[test]
fn the_example_file_documents_every_key_and_validates() {
    let example = std::fs::read_to_string(repo().join("packaging/agent.toml")).unwrap();
    for k in KEYS {
        assert!(
            example.contains(&format!("\n{} = ", k.name))
                || example.contains(&format!("\n# {} = ", k.name)),
            "packaging/agent.toml does not show the key {}",
            k.name
        );
    }
    // As shipped it names /etc/vxmesh/cluster.toml; pointed at a real
    // cluster file it is a valid configuration.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.toml"), CLUSTER).unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        example.replace("/etc/vxmesh/cluster.toml", "cluster.toml"),
    )
    .unwrap();
    let (code, out, err) = vxmesh(&["validate", "--agent-config", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "{}: node host1, static store {}",
            file.display(),
            dir.path().join("cluster.toml").display()
        )
    );
    // validate --cluster keeps working, alone or with --agent-config.
    let cluster = dir.path().join("cluster.toml");
    let (code, out, err) = vxmesh(&[
        "validate",
        "--cluster",
        cluster.to_str().unwrap(),
        "--agent-config",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 network(s), 1 node(s)"), "{out}");
    assert!(out.contains("node host1, static store"), "{out}");
    let (code, _, err) = vxmesh(&["validate"]);
    assert_ne!(code, 0);
    assert!(err.contains("--agent-config"), "{err}");
}

#[test]
fn validate_agent_config_names_every_problem_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "node = \"h 1\"\nstore = \"etcd://127.0.0.1:2379\"\nnetworks = [\"blue\"]\nunderlay_ip = \"198.18.0.1\"\nttl = 0\nstate-dir = \"/x\"\n",
    )
    .unwrap();
    // The unknown key first (the file is not read further)...
    let (code, _, err) = vxmesh(&["validate", "--agent-config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("state-dir: unknown key: did you mean state_dir?"),
        "{err}"
    );
    // ...then every bad value at once, each with its key.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("state-dir", "state_dir");
    std::fs::write(&file, text).unwrap();
    let (code, _, err) = vxmesh(&["validate", "--agent-config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("invalid agent configuration ({})", file.display())),
        "{err}"
    );
    assert!(
        err.contains("node = \"h 1\": 'h 1' is not a valid node name"),
        "{err}"
    );
    assert!(err.contains("ttl = 0: out of range"), "{err}");
    // A valid etcd file whose password file is missing: read, not contacted.
    std::fs::write(
        &file,
        "node = \"h1\"\nstore = \"etcd://127.0.0.1:2379\"\nnetworks = [\"blue\"]\nunderlay_ip = \"198.18.0.1\"\netcd_user = \"u\"\netcd_password_file = \"pw\"\n",
    )
    .unwrap();
    let (code, _, err) = vxmesh(&["validate", "--agent-config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&dir.path().join("pw").display().to_string()),
        "{err}"
    );
    std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
    let (code, out, err) = vxmesh(&["validate", "--agent-config", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("etcd store etcd://127.0.0.1:2379, network(s) blue, underlay 198.18.0.1"),
        "{out}"
    );
    // The agent refuses the same bad file before touching anything.
    std::fs::write(&file, "node = \"h1\"\ncluster = \"c.toml\"\nttl = 5\n").unwrap();
    let (code, _, err) = vxmesh(&["agent", "--config", file.to_str().unwrap(), "--once"]);
    assert_eq!(code, 1);
    assert!(err.contains("ttl = 5: belongs to the etcd store"), "{err}");
    // A flag's problem is named as the flag.
    let (code, _, err) = vxmesh(&["agent", "--config", file.to_str().unwrap(), "--resync", "0"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--resync 0: must be between 0 and 86400"),
        "{err}"
    );
    assert!(err.contains("and the command line"), "{err}");
    let (code, _, err) = vxmesh(&["agent", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("file: cannot read it"), "{err}");
}

/// The agent runs from a configuration file alone, and flags override it:
/// host1's lab agent is stopped and a `vxmesh agent --config FILE` pass
/// takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_from_the_file_alone_and_flags_override_it() {
    let mut lab = up(&spec("pk", 2, 1, Mode::Routed, 1)).await;
    let name = lab.info.name.clone();
    {
        lab.stop_agent_async("host1", Signal::SIGTERM)
            .await
            .unwrap();
        let h1 = lab.node("host1").unwrap().clone();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let file = dir.path().join("agent.toml");
        let write = |node: &str| {
            std::fs::write(
                &file,
                format!(
                    "node = \"{node}\"\ncluster = \"{}\"\nstate_dir = \"state\"\nresync = 1\nonce = true\n",
                    lab.info.cluster_file.display()
                ),
            )
            .unwrap()
        };
        let agent = |extra: &[&str]| {
            let mut args = vec![
                "--netns",
                &h1.netns,
                "agent",
                "--config",
                file.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            vxmesh(&args)
        };
        // The file names a node the cluster does not know...
        write("nosuch");
        let (code, _, err) = agent(&[]);
        assert_eq!(code, 1);
        assert!(err.contains("node 'nosuch' is not in"), "{err}");
        assert!(!state.exists(), "a refused agent wrote its state dir");
        // ...which --node overrides; once = true makes it one pass.
        let (code, _, err) = agent(&["--node", "host1"]);
        assert_eq!(code, 0, "{err}");
        assert!(state.join("networks/demo.json").exists(), "{err}");
        // The file alone.
        write("host1");
        std::fs::remove_dir_all(&state).unwrap();
        let (code, _, err) = agent(&[]);
        assert_eq!(code, 0, "{err}");
        assert!(state.join("networks/demo.json").exists(), "{err}");
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert!(report.failures().is_empty(), "{}", report.matrix());
    }
    drop(lab);
    common::assert_gone(&name);
}

/// The package, built once by scripts/package.sh from the debug binary.
fn deb() -> &'static Path {
    static DEB: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DEB.get_or_init(|| {
        let out = tempfile::tempdir().unwrap();
        // The target dir this test binary's vxmesh was built in (TARGET/debug/vxmesh).
        let target = exe().parent().unwrap().parent().unwrap().to_path_buf();
        let (ok, text) = run(Command::new(repo().join("scripts/package.sh"))
            .args(["--dev", "--output"])
            .arg(out.path())
            .env("CARGO_TARGET_DIR", target)
            .stdin(Stdio::null()));
        assert!(ok, "scripts/package.sh --dev failed:\n{text}");
        let deb = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .unwrap_or_else(|| panic!("no .deb in {}:\n{text}", out.path().display()));
        (out, deb)
    });
    path
}

/// The package extracted into a throwaway root.
fn extracted() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let (ok, text) = run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb())
            .arg(root.path()));
        assert!(ok, "dpkg-deb -x: {text}");
        root
    })
    .path()
}

/// Man page files the CLI defines: vxmesh.1 and one per visible command.
fn man_pages() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = vxmesh(&["man", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    pages
}

#[test]
fn the_package_lists_every_file() {
    let (ok, list) = run(Command::new("dpkg-deb").arg("-c").arg(deb()));
    assert!(ok, "{list}");
    let has = |entry: &str| {
        list.lines().any(|l| {
            l.contains(&format!(" .{entry}"))
                && (l.ends_with(entry) || l.contains(&format!(".{entry} -> ")))
        })
    };
    for f in [
        "/usr/bin/vxmesh",
        "/usr/lib/systemd/system/vxmesh-agent.service",
        "/usr/lib/systemd/system/vxmesh-docker-plugin.socket",
        "/usr/lib/systemd/system/vxmesh-docker-plugin.service",
        "/usr/share/doc/vxmesh/examples/agent.toml",
        "/usr/share/doc/vxmesh/copyright",
        "/usr/share/bash-completion/completions/vxmesh",
        "/usr/share/zsh/vendor-completions/_vxmesh",
        "/usr/share/fish/vendor_completions.d/vxmesh.fish",
    ] {
        assert!(has(f), "{f} is not in the package:\n{list}");
    }
    for link in ["/usr/lib/cni/vxmesh", "/opt/cni/bin/vxmesh"] {
        assert!(
            list.lines()
                .any(|l| l.starts_with('l') && l.contains(&format!(".{link} -> "))),
            "{link} is not a symlink in the package:\n{list}"
        );
    }
    let pages = man_pages();
    for must in [
        "vxmesh.1",
        "vxmesh-agent.1",
        "vxmesh-validate.1",
        "vxmesh-completions.1",
        "vxmesh-net-create.1",
    ] {
        assert!(
            pages.iter().any(|p| p == must),
            "{must} not generated: {pages:?}"
        );
    }
    for p in &pages {
        let entry = format!("/usr/share/man/man1/{p}.gz");
        assert!(has(&entry), "{entry} is not in the package:\n{list}");
    }
    // The maintainer scripts: the agent starts only once configured.
    let (ok, postinst) = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(deb())
        .arg("postinst"));
    assert!(ok, "{postinst}");
    assert!(postinst.contains("if [ -e \"$CONFIG\" ]"), "{postinst}");
    assert!(
        postinst.contains("CONFIG=/etc/vxmesh/agent.toml"),
        "{postinst}"
    );
    assert!(postinst.contains("try-restart"), "{postinst}");
}

/// Resolve `path` inside `root` as the installed system would, following
/// absolute symlinks into `root` rather than into this machine.
fn resolve_in(root: &Path, path: &str) -> PathBuf {
    let mut p = root.join(path.trim_start_matches('/'));
    for _ in 0..8 {
        match std::fs::read_link(&p) {
            Ok(target) if target.is_absolute() => {
                p = root.join(target.strip_prefix("/").unwrap());
            }
            Ok(target) => p = p.parent().unwrap().join(target),
            Err(_) => return p,
        }
    }
    panic!("{path}: too many symlinks");
}

#[test]
fn the_installed_binary_and_cni_plugin_answer() {
    let root = extracted();
    let bin = root.join("usr/bin/vxmesh");
    let (ok, out) = run(Command::new(&bin).arg("--version"));
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("vxmesh {}", env!("CARGO_PKG_VERSION")));
    for plugin in ["/usr/lib/cni/vxmesh", "/opt/cni/bin/vxmesh"] {
        let path = resolve_in(root, plugin);
        assert_eq!(
            std::fs::canonicalize(&path).unwrap(),
            std::fs::canonicalize(&bin).unwrap(),
            "{plugin} is not the packaged binary"
        );
        let mut child = Command::new(&path)
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"cniVersion":"1.1.0","name":"demo","type":"vxmesh"}"#)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{plugin}: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0", "{v}");
        let supported = v["supportedVersions"].as_array().unwrap();
        assert!(supported.iter().any(|s| s == "1.0.0"), "{v}");
    }
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let root = extracted();
    let unit_dir = root.join("usr/lib/systemd/system");
    let unit = unit_dir.join("vxmesh-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "ExecStart=/usr/bin/vxmesh -v agent --config /etc/vxmesh/agent.toml",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "Wants=network-online.target",
        "After=network-online.target",
        "WantedBy=multi-user.target",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    // Verify against a copy of the extracted tree that also holds this
    // machine's system units (the targets the unit names): ExecStart must
    // exist in that root, and Documentation=man: must find the packaged
    // page.
    let verify_root = tempfile::tempdir().unwrap();
    let (ok, out) = run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", root.display()))
        .arg(verify_root.path()));
    assert!(ok, "{out}");
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("multi-user.target").exists())
        .expect("this machine's systemd units (install Debian's systemd package)");
    let (ok, out) = run(Command::new("cp")
        .arg("-rn")
        .arg(format!("{system_units}/."))
        .arg(verify_root.path().join("usr/lib/systemd/system")));
    assert!(ok, "{out}");
    for unit in [
        "vxmesh-agent.service",
        "vxmesh-docker-plugin.socket",
        "vxmesh-docker-plugin.service",
    ] {
        let (ok, out) = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", verify_root.path().display()))
            .arg(verify_root.path().join("usr/lib/systemd/system").join(unit))
            .env("MANPATH", verify_root.path().join("usr/share/man"))
            .env("SYSTEMD_LOG_COLOR", "0"));
        assert!(ok, "systemd-analyze verify {unit} failed:\n{out}");
        // Warnings (an unknown key, say) do not fail verify: there must be none.
        assert!(
            out.trim().is_empty(),
            "systemd-analyze verify {unit} warned:\n{out}"
        );
    }
    // The plugin's units: socket activation at Docker's discovery path,
    // before docker.service.
    let socket = std::fs::read_to_string(unit_dir.join("vxmesh-docker-plugin.socket")).unwrap();
    for line in [
        "ListenStream=/run/docker/plugins/vxmesh.sock",
        "SocketMode=0600",
        "Before=docker.service",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "{line} missing:\n{socket}"
        );
    }
}

/// Socket activation: the plugin serves the socket systemd passes it
/// (LISTEN_FDS/LISTEN_PID, fd 3), here made by `systemd-socket-activate`,
/// and leaves the socket file to its owner when it stops.
#[test]
fn the_docker_plugin_serves_a_socket_passed_by_systemd() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vxmesh-test.sock");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // Where the plugin would bind by itself: it must not, systemd's socket wins.
    let own = dir.path().join("own/vxmesh.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg(exe())
        .args([
            "docker-plugin",
            "--socket",
            "/nonexistent/never-bound.sock",
            "--state-dir",
        ])
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ask = |path: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let activate = ask("/Plugin.Activate");
    assert!(activate.starts_with("HTTP/1.1 200"), "{activate}");
    assert!(
        activate.contains("NetworkDriver") && activate.contains("IpamDriver"),
        "{activate}"
    );
    // The same process keeps serving (the listener is not re-created).
    let caps = ask("/NetworkDriver.GetCapabilities");
    assert!(caps.contains("\"Scope\":\"local\""), "{caps}");
    assert!(!own.exists(), "the plugin bound its own socket too");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "plugin exit {status:?}: {err}");
    assert!(err.contains(&format!("unix://{}", sock.display())), "{err}");
}

#[test]
fn man_pages_and_completions_render() {
    let root = extracted();
    let man1 = root.join("usr/share/man/man1");
    for (page, must) in [
        ("vxmesh.1.gz", "completions"),
        ("vxmesh-agent.1.gz", "--config"),
        ("vxmesh-validate.1.gz", "--agent-config"),
    ] {
        let (ok, out) = run(Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(man1.join(page))
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8"));
        assert!(ok, "man -l {page}: {out}");
        assert!(out.contains(must), "man -l {page} lacks {must}:\n{out}");
        assert!(!out.contains("warning"), "man -l {page}:\n{out}");
    }
    // Completion scripts: each names the commands; bash parses its own.
    let comp = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    for (file, must) in [
        ("usr/share/bash-completion/completions/vxmesh", "validate"),
        (
            "usr/share/zsh/vendor-completions/_vxmesh",
            "#compdef vxmesh",
        ),
        (
            "usr/share/fish/vendor_completions.d/vxmesh.fish",
            "agent-config",
        ),
    ] {
        assert!(comp(file).contains(must), "{file} lacks {must}");
    }
    let (ok, out) = run(Command::new("bash")
        .arg("-c")
        .arg("source \"$1\" && complete -p vxmesh")
        .arg("bash")
        .arg(root.join("usr/share/bash-completion/completions/vxmesh")));
    assert!(ok && out.contains("vxmesh"), "{out}");
    // `vxmesh completions` prints the same script the package holds.
    let out = Command::new(exe())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        comp("usr/share/bash-completion/completions/vxmesh")
    );
}
