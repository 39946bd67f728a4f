//! A lab described for people: its hosts, agents and containers, as
//! `vxmesh lab up`, `lab info` and `lab demo` print them.

use super::LabInfo;

impl LabInfo {
    /// One line for the lab, its etcd server and metrics, then one per host
    /// and one per container.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "lab {} ({} mode), underlay namespace {}\n",
            self.name, self.mode, self.underlay_ns
        );
        if let Some(e) = &self.etcd {
            let members: Vec<String> = e
                .members
                .iter()
                .map(|m| {
                    let pid = m.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    format!("{} in {} pid {pid}", m.name, m.netns)
                })
                .collect();
            out.push_str(&format!(
                "  etcd     {} ({}), lease TTL {} s\n",
                e.store,
                members.join(", "),
                e.ttl_secs
            ));
        }
        if let Some(port) = self.metrics_port {
            out.push_str(&format!(
                "  metrics  http://UNDERLAY_IP:{port}/metrics (inside each host's namespace)\n"
            ));
        }
        for n in &self.nodes {
            let subs: Vec<String> = n.subnets.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out.push_str(&format!(
                "  {:8} netns {:22} underlay {:12} {}  agent pid {}\n",
                n.name,
                n.netns,
                n.underlay_ip.to_string(),
                subs.join(", "),
                n.agent_pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into())
            ));
            if let Some(d) = &n.docker {
                out.push_str(&format!(
                    "           dockerd  docker -H unix://{}  (plugin {})\n",
                    d.socket.display(),
                    super::plugin_name(&self.name)
                ));
            }
        }
        for c in &self.containers {
            out.push_str(&format!(
                "    {:14} on {:8} {:6} {:14} netns {}\n",
                c.name,
                c.node,
                c.network,
                c.ip.to_string(),
                c.netns
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{EtcdMember, LabContainer, LabEtcd, LabNode};
    use super::*;
    use vxmesh::config::Mode;

    fn info() -> LabInfo {
        LabInfo {
            name: "t".into(),
            mode: Mode::Routed,
            dir: "/run/vxmesh-lab/t".into(),
            underlay_ns: "vxm-t-ul".into(),
            cluster_file: "/run/vxmesh-lab/t/cluster.toml".into(),
            nodes: vec![LabNode {
                name: "host1".into(),
                netns: "vxm-t-host1".into(),
                underlay_ip: [198, 18, 0, 1].into(),
                subnets: BTreeMap::from([("default".into(), "172.18.1.0/24".parse().unwrap())]),
                state_dir: "/s".into(),
                agent_pid: Some(42),
                agent_log: "/l".into(),
                docker: None,
            }],
            external: false,
            published: Vec::new(),
            containers: vec![LabContainer {
                name: "host1-c1".into(),
                node: "host1".into(),
                network: "default".into(),
                netns: "vxm-t-host1-c1".into(),
                ip: [172, 18, 1, 2].into(),
            }],
            containers_per_node: 1,
            etcd: None,
            metrics_port: None,
            runtime: Default::default(),
        }
    }

    #[test]
    fn summary_of_a_static_lab() {
        assert_eq!(
            info().summary(),
            "lab t (routed mode), underlay namespace vxm-t-ul\n\
             \x20 host1    netns vxm-t-host1            underlay 198.18.0.1   default 172.18.1.0/24  agent pid 42\n\
             \x20   host1-c1       on host1    default 172.18.1.2     netns vxm-t-host1-c1\n"
        );
    }

    #[test]
    fn summary_names_etcd_and_metrics() {
        let mut i = info();
        let member = |i: u8, pid| EtcdMember {
            name: format!("etcd{i}"),
            netns: format!("vxm-t-etcd{i}"),
            ip: [198, 18, 0, 255 - i].into(),
            pid,
            data_dir: "/d".into(),
            log: "/l".into(),
        };
        i.etcd = Some(LabEtcd {
            store: "etcd://198.18.0.254:2379,198.18.0.253:2379".into(),
            members: vec![member(1, None), member(2, Some(7))],
            token: "vxmesh-lab-t".into(),
            ttl_secs: 3,
            networks: vec!["default".into()],
        });
        i.metrics_port = Some(9472);
        let s = i.summary();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines[1],
            "  etcd     etcd://198.18.0.254:2379,198.18.0.253:2379 (etcd1 in vxm-t-etcd1 pid -, etcd2 in vxm-t-etcd2 pid 7), lease TTL 3 s"
        );
        assert_eq!(
            lines[2],
            "  metrics  http://UNDERLAY_IP:9472/metrics (inside each host's namespace)"
        );
    }
}
