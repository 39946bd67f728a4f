//! `vxmesh bench cni`: ADD+DEL latency of the vxmesh CNI plugin vs the
//! reference `bridge` + `host-local` plugins (containernetworking-plugins),
//! interleaved in one run.
//!
//! Both plugins are run exactly as a runtime runs them: a process with the
//! CNI_* environment and the network configuration on stdin, entered into a
//! host namespace (vxmesh: a lab host with its agent; reference: a namespace
//! of the bench's own, with the reference bridge in it and host-local's data
//! in a temp dir). Each iteration attaches one fresh container namespace per
//! plugin, ADD then DEL, the plugin order alternating; one untimed warm-up
//! iteration first (the reference creates its bridge on its first ADD). The
//! times are wall-clock per plugin process, process start included.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Summary, Table, TempDir, ensure_tool, ms, ratio};
use crate::lab::{Lab, LabGuard, LabSpec, run_plugin};
use vxmesh::cni::{AddResult, Env};
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::{self, Netns, NetnsGuard};

pub const CNI_DIR: &str = "/usr/lib/cni";
const PACKAGE: &str = "containernetworking-plugins";
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct CniOptions {
    pub iterations: usize,
    /// The vxmesh binary (plugin and lab agent).
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct PluginTimes {
    pub plugin: String,
    pub add_ms: Summary,
    pub del_ms: Summary,
    pub add_del_ms: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct CniReport {
    pub iterations: usize,
    pub vxmesh: PluginTimes,
    pub reference: PluginTimes,
    /// The kernel work alone: the same veth pair, bridge port, address and
    /// route made and removed in-process over a warm netlink connection (no
    /// process start, no IPAM, no config): what no plugin can go below.
    pub floor: PluginTimes,
    /// floor / reference, medians of ADD+DEL.
    pub floor_ratio_p50: f64,
    /// vxmesh / reference, medians of ADD+DEL (target: <= 0.5).
    pub ratio_p50: f64,
    /// vxmesh / reference, p90s of ADD+DEL.
    pub ratio_p90: f64,
}

/// One plugin under test: how to run it and where.
struct Plugin {
    name: &'static str,
    exe: PathBuf,
    cni_path: String,
    conf: Value,
    host_ns: String,
}

impl Plugin {
    /// ADD then DEL of container `id` in namespace `cns`; returns both times.
    fn add_del(&self, id: &str, cns: &str) -> Result<(Duration, Duration)> {
        let ns = Netns::open(&self.host_ns)?;
        let conf = self.conf.to_string();
        let cns_path = Path::new(netns::NETNS_DIR).join(cns).display().to_string();
        let mut times = [Duration::ZERO; 2];
        for (i, cmd) in ["ADD", "DEL"].into_iter().enumerate() {
            let env = Env::for_container(cmd, id, &cns_path, "eth0")
                .with_path(self.cni_path.clone())
                .to_vars();
            let t0 = Instant::now();
            let out = run_plugin(&self.exe, &ns, &env, conf.as_bytes(), TIMEOUT)?;
            times[i] = t0.elapsed();
            if !out.status.success() {
                bail!(
                    "{} {cmd} of {id} failed ({}): {} {}",
                    self.name,
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if cmd == "ADD" {
                let added: AddResult = serde_json::from_slice(&out.stdout).with_context(|| {
                    format!("{} ADD of {id}: the result is not a CNI result", self.name)
                })?;
                if added.ips.is_empty() {
                    bail!(
                        "{} ADD of {id}: no address in the result: {}",
                        self.name,
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
        }
        Ok((times[0], times[1]))
    }
}

/// The kernel floor of one ADD+DEL: what the plugin asks of the kernel,
/// done in-process over a warm connection in the host namespace.
async fn floor_add_del(
    host: &Netlink,
    bridge: &str,
    cns: &Netns,
    i: usize,
) -> Result<(Duration, Duration)> {
    let veth = format!("vxm-f{}-{i}", std::process::id() % 100_000);
    let t0 = Instant::now();
    let cont = Netlink::connect_in(cns).await?;
    host.create_veth(&veth, "eth0", Some(cns), 1450).await?;
    host.set_link(
        &veth,
        LinkOptions {
            master: Some(bridge.to_string()),
            up: Some(true),
            ..Default::default()
        },
    )
    .await?;
    cont.set_link(
        "eth0",
        LinkOptions {
            up: Some(true),
            ..Default::default()
        },
    )
    .await?;
    cont.add_address("eth0", "10.98.0.2/24".parse().expect("valid"))
        .await?;
    cont.add_route(
        "0.0.0.0/0".parse().expect("valid"),
        Some(Ipv4Addr::new(10, 98, 0, 1)),
        "eth0",
        false,
        None,
    )
    .await?;
    let add = t0.elapsed();
    let t1 = Instant::now();
    host.delete_link(&veth).await?;
    Ok((add, t1.elapsed()))
}

pub async fn run(o: &CniOptions) -> Result<CniReport> {
    if o.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    for p in ["bridge", "host-local"] {
        ensure_tool(&format!("{CNI_DIR}/{p}"), PACKAGE)?;
    }
    let name = super::lab_name("n");
    let mut spec = LabSpec::new(&name, 1, 0);
    spec.exe = o.exe.clone();
    let lab = LabGuard(Lab::up(&spec).await.context("cni lab")?);
    let host = lab.node("host1")?.clone();
    let network = crate::lab::network_names(lab.info.mode, 1)[0].clone();
    let tmp = TempDir::new("cni")?;
    // The reference's host: a namespace of its own (bridge plugin state
    // lives in the namespace the plugin runs in; never the root one).
    let ref_host = NetnsGuard::create(&format!("vxm-{name}-ref"))?;
    let vx = Plugin {
        name: "vxmesh",
        exe: o.exe.clone(),
        cni_path: o
            .exe
            .parent()
            .unwrap_or(Path::new("/"))
            .display()
            .to_string(),
        conf: json!({
            "cniVersion": "1.0.0", "name": "vxmesh-bench", "type": "vxmesh",
            "network": network, "stateDir": host.state_dir,
        }),
        host_ns: host.netns.clone(),
    };
    let reference = Plugin {
        name: "bridge+host-local",
        exe: Path::new(CNI_DIR).join("bridge"),
        cni_path: CNI_DIR.to_string(),
        conf: json!({
            "cniVersion": "1.0.0", "name": "vxm-bench-ref", "type": "bridge",
            "bridge": "vxm-refbr0", "isGateway": true, "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.99.0.0/24" }]],
                "dataDir": tmp.path().join("host-local"),
            },
        }),
        host_ns: ref_host.name.clone(),
    };
    let plugins = [vx, reference];
    let host_nl = Netlink::connect_in(&Netns::open(&host.netns)?).await?;
    let bridge = vxmesh::state::read_network(&host.state_dir, &network)?
        .state
        .bridge;
    let mut add = [Vec::new(), Vec::new(), Vec::new()];
    let mut del = [Vec::new(), Vec::new(), Vec::new()];
    let mut sum = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..=o.iterations {
        let order: [usize; 3] = match i % 3 {
            0 => [0, 1, 2],
            1 => [1, 2, 0],
            _ => [2, 0, 1],
        };
        for k in order {
            let cname = format!("vxm-{name}-c{k}-{i}");
            let cns = NetnsGuard::create(&cname)?;
            let (a, d) = if k == 2 {
                let ns = cns.open()?;
                floor_add_del(&host_nl, &bridge, &ns, i)
                    .await
                    .with_context(|| format!("kernel floor, iteration {i}"))?
            } else {
                let id = format!("bench-{k}-{i}");
                let p = &plugins[k];
                let (p_name, cns_name) = (p.name, cns.name.clone());
                tokio::task::block_in_place(|| p.add_del(&id, &cns_name))
                    .with_context(|| format!("{p_name}, iteration {i}"))?
            };
            drop(cns);
            if i == 0 {
                continue; // warm-up
            }
            add[k].push(ms(a));
            del[k].push(ms(d));
            sum[k].push(ms(a + d));
        }
    }
    drop(ref_host);
    drop(lab);
    drop(host_nl);
    let names = [plugins[0].name, plugins[1].name, "kernel floor"];
    let times = |k: usize| PluginTimes {
        plugin: names[k].to_string(),
        add_ms: Summary::of(&add[k]),
        del_ms: Summary::of(&del[k]),
        add_del_ms: Summary::of(&sum[k]),
    };
    let (v, r, f) = (times(0), times(1), times(2));
    Ok(CniReport {
        iterations: o.iterations,
        ratio_p50: ratio(v.add_del_ms.p50, r.add_del_ms.p50),
        ratio_p90: ratio(v.add_del_ms.p90, r.add_del_ms.p90),
        floor_ratio_p50: ratio(f.add_del_ms.p50, r.add_del_ms.p50),
        vxmesh: v,
        reference: r,
        floor: f,
    })
}

pub fn table(r: &CniReport) -> Table {
    let mut t = Table::new(&[
        "plugin",
        "n",
        "ADD p50 ms",
        "ADD p90 ms",
        "DEL p50 ms",
        "DEL p90 ms",
        "ADD+DEL p50 ms",
        "ADD+DEL p90 ms",
    ]);
    for p in [&r.vxmesh, &r.reference, &r.floor] {
        t.row(vec![
            p.plugin.clone(),
            p.add_del_ms.n.to_string(),
            format!("{:.1}", p.add_ms.p50),
            format!("{:.1}", p.add_ms.p90),
            format!("{:.1}", p.del_ms.p50),
            format!("{:.1}", p.del_ms.p90),
            format!("{:.1}", p.add_del_ms.p50),
            format!("{:.1}", p.add_del_ms.p90),
        ]);
    }
    t.note(format!(
        "ratio vxmesh/reference, ADD+DEL: p50 {:.2}, p90 {:.2} (target p50 <= 0.5: {})",
        r.ratio_p50,
        r.ratio_p90,
        if r.ratio_p50 <= 0.5 { "met" } else { "MISSED" }
    ));
    t.note(format!(
        "kernel floor (the same kernel work in-process, no process start or IPAM): {:.2} of the reference's ADD+DEL median",
        r.floor_ratio_p50
    ));
    t
}
