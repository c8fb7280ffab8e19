//! The network-namespace tier: each cluster in a namespace of its own,
//! joined to the others by a veth pair on one bridge, with its own
//! addresses (10.77.N.0/24 inside 10.77.0.0/16); partitions are iptables
//! DROP rules inside a namespace. Needs root, `ip` and `iptables`.

use std::process::Command;

use anyhow::{Context, bail};

use crate::ClusterSpec;

/// First two octets of the tier's addresses.
pub const PREFIX: [u8; 2] = [10, 77];

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this machine can run the tier, and why not.
pub fn available() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Err("needs root (network namespaces, veth, iptables)".into());
    }
    for (tool, flag) in [("ip", "-V"), ("iptables", "--version")] {
        let ok = Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!(
                "needs `{tool}` (apt-get install iproute2 iptables)"
            ));
        }
    }
    Ok(())
}

/// The namespaces of one harness; removed on drop.
#[derive(Debug)]
pub struct Namespaces {
    tag: String,
    bridge: String,
    names: Vec<(String, String)>,
}

impl Namespaces {
    /// The namespace a cluster runs in.
    pub fn of(&self, cluster: &str) -> String {
        format!("isth{}-{cluster}", self.tag)
    }

    /// Creates a namespace per cluster with `hosts` addresses each
    /// (10.77.N.h/16 for every h), all on one bridge with 10.77.0.1.
    pub fn create(clusters: &[ClusterSpec], hosts: &[u8]) -> anyhow::Result<Self> {
        let tag = (std::process::id() % 100_000).to_string();
        let bridge = format!("ibr{tag}");
        let mut me = Self {
            tag,
            bridge: bridge.clone(),
            names: Vec::new(),
        };
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&["ip", "addr", "add", "10.77.0.1/16", "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for c in clusters {
            let ns = me.of(&c.name);
            let host_end = format!("iv{}n{}", me.tag, c.net);
            run(&["ip", "netns", "add", &ns])?;
            me.names.push((ns.clone(), host_end.clone()));
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            run(&["ip", "link", "set", &host_end, "master", &bridge])?;
            run(&["ip", "link", "set", &host_end, "up"])?;
            let x = |args: &[&str]| {
                let mut v = vec!["ip", "netns", "exec", ns.as_str()];
                v.extend_from_slice(args);
                run(&v)
            };
            x(&["ip", "link", "set", "lo", "up"])?;
            x(&["ip", "link", "set", "eth0", "up"])?;
            for h in hosts {
                let a = format!("{}.{}.{}.{h}/16", PREFIX[0], PREFIX[1], c.net);
                x(&["ip", "addr", "add", &a, "dev", "eth0"])?;
            }
        }
        Ok(me)
    }

    fn iptables(&self, cluster: &str, op: &str, peer: &ClusterSpec) -> anyhow::Result<()> {
        let ns = self.of(cluster);
        let range = format!("{}.{}.{}.0/24", PREFIX[0], PREFIX[1], peer.net);
        run(&[
            "ip", "netns", "exec", &ns, "iptables", op, "INPUT", "-s", &range, "-j", "DROP",
        ])?;
        run(&[
            "ip", "netns", "exec", &ns, "iptables", op, "OUTPUT", "-d", &range, "-j", "DROP",
        ])
    }

    /// Inside `cluster`'s namespace, sends new `proto` flows addressed to
    /// `dest` to `to` instead (the delay relays).
    pub fn dnat(
        &self,
        cluster: &str,
        proto: &str,
        dest: std::net::SocketAddr,
        to: std::net::SocketAddr,
    ) -> anyhow::Result<()> {
        let ns = self.of(cluster);
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            proto,
            "-d",
            &dest.ip().to_string(),
            "--dport",
            &dest.port().to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &to.to_string(),
        ])
    }

    /// Drops every packet between `a` and `b` (rules inside `a`).
    pub fn partition(&self, a: &str, b: &ClusterSpec) -> anyhow::Result<()> {
        self.iptables(a, "-I", b)
    }

    /// Removes the partition.
    pub fn heal(&self, a: &str, b: &ClusterSpec) -> anyhow::Result<()> {
        self.iptables(a, "-D", b)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for (ns, host_end) in &self.names {
            let _ = run(&["ip", "link", "del", host_end]);
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
