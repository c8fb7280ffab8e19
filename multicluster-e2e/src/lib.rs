//! The multi-cluster harness: N clusters on this machine, each a set of
//! real processes of the `isthmus` binary — a controller, an east-west
//! gateway, and a sidecar per workload — in front of built-in sample
//! apps, with the cluster's manifests in a directory of YAML files (the
//! files source). Clusters are peered with `isthmus link` tokens, as a
//! user would. `isthmus demo` and the end-to-end tests both run on it.
//!
//! Address plan, cluster `net` N on 127.0.N.0/24 (the well-known ports,
//! so a user can guess them): controller 127.0.N.1 (15010 local, 15012
//! federation), gateway 127.0.N.2 (15443 tcp and udp), workloads from
//! 127.0.N.10 (sidecar 15001 outbound, 15006 inbound; app 8080); every
//! component's admin 15000, metrics 15020, readiness 15021 on its own IP.
//!
//! The kube tier ([`Harness::new_kube`]) keeps each cluster's objects in a
//! Kubernetes API of its own (the stand-in, on 127.0.N.3) instead of a
//! directory, written with kubectl; controllers run in kube mode.

pub mod client;
pub mod delay;
pub mod kit;
pub mod kube;
pub mod load;
pub mod netns;
pub mod sample;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

pub use client::{Answer, Client};

pub const SERVICE_PORT: u16 = 5000;
pub const NAMESPACE: &str = "sample";

/// One workload instance.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Instance name, e.g. `helloworld-v1-0`.
    pub name: String,
    /// Service account and `app` label: `helloworld` or `sleep`.
    pub app: String,
    pub version: String,
    pub zone: String,
}

/// One cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub name: String,
    pub region: String,
    /// Third octet of the cluster's range.
    pub net: u8,
    /// First two octets: 127.0 on loopback, 10.77 in the
    /// network-namespace tier.
    pub prefix: [u8; 2],
    pub workloads: Vec<WorkloadSpec>,
    /// Controller replicas (kube tier): with more than one, they run on
    /// 127.0.N.4, .5, … behind one Service address at 127.0.N.1, and one
    /// at a time holds the leader Lease.
    pub controller_replicas: u8,
}

impl ClusterSpec {
    /// A cluster with a `sleep` client and helloworld instances
    /// `(version, zone)`.
    pub fn new(name: &str, region: &str, net: u8, helloworld: &[(&str, &str)]) -> Self {
        let zone0 = helloworld
            .first()
            .map_or(format!("{region}-a"), |(_, z)| z.to_string());
        let mut workloads = vec![WorkloadSpec {
            name: "sleep".into(),
            app: "sleep".into(),
            version: "v1".into(),
            zone: zone0,
        }];
        let mut per_version: BTreeMap<&str, usize> = BTreeMap::new();
        for (v, z) in helloworld {
            let n = per_version.entry(v).or_default();
            workloads.push(WorkloadSpec {
                name: format!("helloworld-{v}-{n}"),
                app: "helloworld".into(),
                version: v.to_string(),
                zone: z.to_string(),
            });
            *n += 1;
        }
        Self {
            name: name.into(),
            region: region.into(),
            net,
            prefix: [127, 0],
            workloads,
            controller_replicas: 1,
        }
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.net, host)
    }
    /// The controller's address (its Service's, with several replicas).
    pub fn controller_ip(&self) -> Ipv4Addr {
        self.ip(1)
    }
    /// Where controller replica `r` listens.
    pub fn replica_ip(&self, r: u8) -> Ipv4Addr {
        if self.controller_replicas > 1 {
            self.ip(4 + r)
        } else {
            self.controller_ip()
        }
    }
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.ip(2)
    }
    /// The kube tier's API server.
    pub fn api_ip(&self) -> Ipv4Addr {
        self.ip(3)
    }
    pub fn workload_ip(&self, i: usize) -> Ipv4Addr {
        self.ip(10 + i as u8)
    }
}

/// The demo's three clusters (`base` is the first range's third octet:
/// 1 gives 127.0.1.0/24, 127.0.2.0/24, 127.0.3.0/24).
pub fn demo_clusters(base: u8) -> Vec<ClusterSpec> {
    vec![
        ClusterSpec::new(
            "east",
            "us-east1",
            base,
            &[("v1", "us-east1-a"), ("v1", "us-east1-b")],
        ),
        ClusterSpec::new(
            "west",
            "us-west1",
            base + 1,
            &[("v1", "us-west1-a"), ("v2", "us-west1-a")],
        ),
        ClusterSpec::new("eu", "europe-west1", base + 2, &[("v1", "europe-west1-b")]),
    ]
}

/// The admin API must be on loopback; in the network-namespace tier each
/// component takes 127.0.0.<host> inside its namespace.
pub fn admin_ip(ip: Ipv4Addr) -> Ipv4Addr {
    if ip.is_loopback() {
        ip
    } else {
        Ipv4Addr::new(127, 0, 0, ip.octets()[3])
    }
}

/// A child process, killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// A process started from `cmd`, named `name` in messages; killed when
    /// dropped. The one process handle of the lab and the tests.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.into(),
            child,
        })
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workload's running parts.
#[derive(Debug)]
pub struct Workload {
    pub spec: WorkloadSpec,
    pub ip: Ipv4Addr,
    pub app: Option<sample::App>,
    /// The app as a process (network-namespace tier).
    pub app_proc: Option<Proc>,
    pub sidecar: Option<Proc>,
    /// Not killed (its endpoint is ready).
    pub running: bool,
}

impl Workload {
    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 15001))
    }
    pub fn inbound(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 15006))
    }
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from((admin_ip(self.ip), 15000))
    }
    pub fn metrics(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 15020))
    }
    pub fn readiness(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 15021))
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub dir: PathBuf,
    /// Controller replicas' processes.
    pub controllers: Vec<Option<Proc>>,
    /// The controller's Service address (several replicas), served while
    /// the cluster lives.
    _vips: Vec<kube::ServiceVip>,
    pub gateway: Option<Proc>,
    pub workloads: Vec<Workload>,
    /// The cluster's Kubernetes API (kube tier).
    pub api: Option<kube::KubeApi>,
}

impl Cluster {
    /// The (first replica's) controller admin.
    pub fn controller_admin(&self) -> SocketAddr {
        self.replica_admin(0)
    }
    pub fn controller_readiness(&self) -> SocketAddr {
        self.replica_readiness(0)
    }
    pub fn replica_admin(&self, r: u8) -> SocketAddr {
        SocketAddr::from((admin_ip(self.spec.replica_ip(r)), 15000))
    }
    pub fn replica_readiness(&self, r: u8) -> SocketAddr {
        SocketAddr::from((self.spec.replica_ip(r), 15021))
    }
    pub fn gateway_admin(&self) -> SocketAddr {
        SocketAddr::from((admin_ip(self.spec.gateway_ip()), 15000))
    }
    pub fn gateway_metrics(&self) -> SocketAddr {
        SocketAddr::from((self.spec.gateway_ip(), 15020))
    }
    pub fn gateway_readiness(&self) -> SocketAddr {
        SocketAddr::from((self.spec.gateway_ip(), 15021))
    }
    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }
    /// The cluster's API (kube tier only).
    pub fn api(&self) -> &kube::KubeApi {
        self.api.as_ref().unwrap_or_else(|| {
            panic!(
                "{} has no Kubernetes API (not the kube tier)",
                self.spec.name
            )
        })
    }
    /// Runs kubectl against the cluster's API (kube tier only).
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.api().kubectl(args, None)
    }
    /// The `sleep` client workload.
    pub fn client(&self) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.spec.app == "sleep")
            .expect("sleep")
    }
    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.spec.name == name)
            .unwrap_or_else(|| panic!("no workload {name} in {}", self.spec.name))
    }
    fn index(&self, name: &str) -> usize {
        self.workloads
            .iter()
            .position(|w| w.spec.name == name)
            .unwrap_or_else(|| panic!("no workload {name} in {}", self.spec.name))
    }
}

/// The whole mesh.
#[derive(Debug)]
pub struct Harness {
    bin: PathBuf,
    pub root: PathBuf,
    pub clusters: Vec<Cluster>,
    /// Where processes' stderr goes (`None`: inherited).
    log_dir: Option<PathBuf>,
    log_level: String,
    /// Set in the network-namespace tier.
    pub namespaces: Option<netns::Namespaces>,
    /// Controllers' `staleLease`.
    stale_lease: Duration,
    /// Sidecars' `certificateTtl`.
    certificate_ttl: Duration,
    /// Delay relays between regions (network-namespace tier).
    relays: Option<delay::Relays>,
    /// The sidecar-only `isthmus-proxy` binary, when sidecars should run
    /// it instead of `isthmus proxy`.
    proxy_bin: Option<PathBuf>,
}

fn yaml_path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

impl Harness {
    /// Prepares PKI, manifests and configs under `root` for `specs`.
    /// `bin` is the `isthmus` binary.
    pub fn new(bin: &Path, root: &Path, specs: Vec<ClusterSpec>) -> anyhow::Result<Self> {
        Self::build(bin, root, specs, false)
    }

    /// Like [`Harness::new`], each cluster with a Kubernetes API of its
    /// own (see [`kube`]): its objects applied with kubectl, its controller
    /// in kube mode (Lease, link Secrets, TokenReview for the CA).
    pub fn new_kube(bin: &Path, root: &Path, specs: Vec<ClusterSpec>) -> anyhow::Result<Self> {
        Self::build(bin, root, specs, true)
    }

    fn build(bin: &Path, root: &Path, specs: Vec<ClusterSpec>, kube: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        let mut h = Self {
            bin: bin.to_owned(),
            root: root.to_owned(),
            clusters: Vec::new(),
            log_dir: Some(root.join("logs")),
            // ISTHMUS_E2E_LOG raises the processes' log level when a
            // scenario needs a closer look (logs under <root>/logs).
            log_level: std::env::var("ISTHMUS_E2E_LOG").unwrap_or_else(|_| "warn".into()),
            namespaces: None,
            stale_lease: Duration::from_secs(30),
            certificate_ttl: Duration::from_secs(24 * 3600),
            relays: None,
            proxy_bin: None,
        };
        std::fs::create_dir_all(root.join("logs"))?;
        for spec in specs {
            let dir = root.join(&spec.name);
            std::fs::create_dir_all(dir.join("manifests"))?;
            let d = |p: &str| yaml_path(&dir.join(p));
            if !dir.join("ca/ca-cert.pem").exists() {
                h.isthmus(&[
                    "ca",
                    "init",
                    "--trust-domain",
                    &format!("{}.local", spec.name),
                    "--out",
                    &d("root"),
                ])?;
                h.isthmus(&[
                    "ca",
                    "cluster",
                    &spec.name,
                    "--ca",
                    &d("root"),
                    "--out",
                    &d("ca"),
                ])?;
            }
            let workloads = spec
                .workloads
                .iter()
                .enumerate()
                .map(|(i, w)| Workload {
                    spec: w.clone(),
                    ip: spec.workload_ip(i),
                    app: None,
                    app_proc: None,
                    sidecar: None,
                    running: false,
                })
                .collect();
            let api = match kube {
                true => Some(kube::KubeApi::start(
                    SocketAddr::from((spec.api_ip(), 0)),
                    &dir.join("kubeconfig"),
                    &spec.name,
                )?),
                false => None,
            };
            let mut vips = Vec::new();
            if spec.controller_replicas > 1 {
                for port in [15010, 15012] {
                    vips.push(kube::ServiceVip::start(
                        SocketAddr::from((spec.controller_ip(), port)),
                        (0..spec.controller_replicas)
                            .map(|r| SocketAddr::from((spec.replica_ip(r), port)))
                            .collect(),
                    )?);
                }
            }
            let c = Cluster {
                controllers: (0..spec.controller_replicas).map(|_| None).collect(),
                _vips: vips,
                spec,
                dir,
                gateway: None,
                workloads,
                api,
            };
            h.write_configs(&c)?;
            h.write_manifests(&c, &[])?;
            h.clusters.push(c);
        }
        Ok(h)
    }

    /// Like [`Harness::new`], each cluster in a network namespace of its
    /// own with addresses 10.77.N.x (see [`netns`]).
    pub fn new_netns(bin: &Path, root: &Path, mut specs: Vec<ClusterSpec>) -> anyhow::Result<Self> {
        for s in &mut specs {
            s.prefix = netns::PREFIX;
        }
        let most = specs.iter().map(|s| s.workloads.len()).max().unwrap_or(0) as u8;
        let mut hosts = vec![1, 2];
        hosts.extend(10..10 + most);
        let namespaces = netns::Namespaces::create(&specs, &hosts)?;
        let mut h = Self::new(bin, root, specs)?;
        h.namespaces = Some(namespaces);
        Ok(h)
    }

    /// Puts `delay` on every path between clusters of different regions,
    /// each way (gateways' QUIC and controllers' federation), through
    /// relays on the bridge. Call before starting; partitions do not
    /// apply to relayed paths.
    pub async fn region_delay(&mut self, delay: Duration) -> anyhow::Result<()> {
        let ns = self
            .namespaces
            .as_ref()
            .context("region_delay needs the network-namespace tier")?;
        let bridge = Ipv4Addr::new(netns::PREFIX[0], netns::PREFIX[1], 0, 1);
        let mut relays = delay::Relays::default();
        for b in &self.clusters {
            let gw = SocketAddr::from((b.spec.gateway_ip(), 15443));
            let ctl = SocketAddr::from((b.spec.controller_ip(), 15012));
            let u = relays.udp(SocketAddr::from((bridge, 0)), gw, delay).await?;
            let t = relays
                .tcp(SocketAddr::from((bridge, 0)), ctl, delay)
                .await?;
            for a in self
                .clusters
                .iter()
                .filter(|a| a.spec.region != b.spec.region)
            {
                ns.dnat(&a.spec.name, "udp", gw, u)?;
                ns.dnat(&a.spec.name, "tcp", ctl, t)?;
            }
        }
        self.relays = Some(relays);
        Ok(())
    }

    /// Drops every packet between clusters `a` and `b` (iptables inside
    /// both namespaces).
    pub fn partition(&self, a: &str, b: &str) -> anyhow::Result<()> {
        let ns = self
            .namespaces
            .as_ref()
            .context("partition needs the network-namespace tier")?;
        ns.partition(a, &self.cluster(b).spec)?;
        ns.partition(b, &self.cluster(a).spec)
    }

    /// Removes a partition.
    pub fn heal(&self, a: &str, b: &str) -> anyhow::Result<()> {
        let ns = self
            .namespaces
            .as_ref()
            .context("heal needs the network-namespace tier")?;
        ns.heal(a, &self.cluster(b).spec)?;
        ns.heal(b, &self.cluster(a).spec)
    }

    /// Sets the controllers' `staleLease` (before they start).
    pub fn stale_lease(mut self, lease: Duration) -> anyhow::Result<Self> {
        self.stale_lease = lease;
        for c in &self.clusters {
            self.write_configs(c)?;
        }
        Ok(self)
    }

    /// Sets the sidecars' `certificateTtl` (before they start).
    pub fn certificate_ttl(mut self, ttl: Duration) -> anyhow::Result<Self> {
        self.certificate_ttl = ttl;
        for c in &self.clusters {
            self.write_configs(c)?;
        }
        Ok(self)
    }

    /// Log level of the processes (`ISTHMUS_LOG`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// Runs sidecars with the sidecar-only `isthmus-proxy` binary.
    pub fn proxy_bin(mut self, bin: &Path) -> Self {
        self.proxy_bin = Some(bin.to_owned());
        self
    }

    fn isthmus(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "isthmus {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&self, cluster: &str, name: &str, args: &[&str]) -> anyhow::Result<Proc> {
        self.spawn_bin(&self.bin, cluster, name, args)
    }

    fn spawn_bin(
        &self,
        bin: &Path,
        cluster: &str,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<Proc> {
        let stderr = match &self.log_dir {
            Some(d) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(d.join(format!("{name}.log")))?,
            ),
            None => Stdio::inherit(),
        };
        let mut cmd = match &self.namespaces {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.of(cluster)]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        Proc::spawn(
            name,
            cmd.args(args)
                .env("ISTHMUS_LOG", &self.log_level)
                .stdout(Stdio::null())
                .stderr(stderr),
        )
    }

    pub fn cluster(&self, name: &str) -> &Cluster {
        self.clusters
            .iter()
            .find(|c| c.spec.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }
    fn cluster_mut(&mut self, name: &str) -> &mut Cluster {
        self.clusters
            .iter_mut()
            .find(|c| c.spec.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    fn write_configs(&self, c: &Cluster) -> anyhow::Result<()> {
        let s = &c.spec;
        let d = |p: &str| yaml_path(&c.dir.join(p));
        let cluster = format!(
            "cluster: {{name: {n}, trustDomain: {n}.local, locality: {{region: {r}}}}}",
            n = s.name,
            r = s.region
        );
        let admin = |ip: Ipv4Addr| {
            format!(
                "admin: {{admin: \"{}:15000\", metrics: \"{ip}:15020\", readiness: \"{ip}:15021\"}}",
                admin_ip(ip)
            )
        };
        let ctl = s.controller_ip();
        let gw = s.gateway_ip();
        let mut tokens = String::new();
        for w in &s.workloads {
            tokens.push_str(&format!(
                "{}-{}-bootstrap-token {NAMESPACE}/{}\n",
                s.name, w.name, w.app
            ));
        }
        std::fs::write(c.dir.join("ca-tokens"), tokens)?;
        // Kube mode: the cluster's API, and no token file (the CA asks
        // the API's TokenReview who a sidecar's token belongs to).
        let source = match &c.api {
            Some(api) => format!(
                "source: {{kube: {{kubeconfig: {k}, namespace: {ns}, leaderElection: {{leaseDuration: 3s}}}}}}",
                k = yaml_path(api.kubeconfig()),
                ns = kube::CONTROLLER_NAMESPACE,
            ),
            None => format!(
                "source: {{files: {m}}}\ncaTokens: {t}",
                m = d("manifests"),
                t = d("ca-tokens")
            ),
        };
        for r in 0..s.controller_replicas {
            let ip = s.replica_ip(r);
            // Replicas behind a Service address tell peers that one.
            let advertise = if ip == ctl {
                String::new()
            } else {
                format!("advertiseAddress: \"{ctl}:15012\"\n")
            };
            std::fs::write(
                c.dir.join(controller_file(r)),
                format!(
                    "kind: Controller\n{cluster}\ncaDir: {ca}\n{source}\n\
                     listen: {{federation: \"{ip}:15012\", local: \"{ip}:15010\"}}\n{advertise}\
                     gatewayAddress: \"{gw}:15443\"\nheartbeatInterval: 500ms\nstaleLease: {lease}ms\n{a}\n{state}",
                    lease = self.stale_lease.as_millis(),
                    ca = d("ca"),
                    a = admin(ip),
                    // Kube mode keeps links in Secrets; a directory of
                    // each replica's own for anything else.
                    state = match &c.api {
                        Some(_) => format!("stateDir: {}\n", d(&format!("state-{r}"))),
                        None => String::new(),
                    },
                ),
            )?;
        }
        // Kube mode: no CA key with the gateway; its ServiceAccount's
        // token gets it a certificate from the controller.
        let gateway_cert = match &c.api {
            Some(api) => {
                let token = format!("{}-gateway-sa-token", s.name);
                std::fs::write(c.dir.join("token-gateway"), format!("{token}\n"))?;
                api.add_service_account_token(
                    &token,
                    kube::CONTROLLER_NAMESPACE,
                    "isthmus-gateway",
                );
                format!(
                    "tokenFile: {}\ncaRoot: {}",
                    d("token-gateway"),
                    d("ca/root-cert.pem")
                )
            }
            None => format!("caDir: {}", d("ca")),
        };
        std::fs::write(
            c.dir.join("gateway.yaml"),
            format!(
                "kind: Gateway\n{cluster}\ncontroller: \"{ctl}:15010\"\n{gateway_cert}\n\
                 listen: {{sidecars: \"{gw}:15443\", peers: \"{gw}:15443\"}}\n{a}\n",
                a = admin(gw),
            ),
        )?;
        for w in &c.workloads {
            let token = c.dir.join(format!("token-{}", w.spec.name));
            let secret = format!("{}-{}-bootstrap-token", s.name, w.spec.name);
            std::fs::write(&token, format!("{secret}\n"))?;
            if let Some(api) = &c.api {
                // What the kubelet projects into the pod (audience
                // isthmus-ca), known to the API's TokenReview.
                api.add_service_account_token(&secret, NAMESPACE, &w.spec.app);
            }
            let ip = w.ip;
            std::fs::write(
                c.dir.join(format!("sidecar-{}.yaml", w.spec.name)),
                format!(
                    "kind: Proxy\n{cluster}\nworkload: {{name: {name}, namespace: {NAMESPACE}, serviceAccount: {app}, app: \"{ip}:8080\", \
                     zone: {zone}, labels: {{app: {app}, version: {v}}}}}\n\
                     controller: \"{ctl}:15010\"\ntokenFile: {t}\ncaRoot: {root}\ngateway: \"{gw}:15443\"\naccessLog: false\ncertificateTtl: {ttl}ms\n\
                     listen: {{outbound: \"{ip}:15001\", inbound: \"{ip}:15006\"}}\n{a}\n",
                    name = w.spec.name,
                    app = w.spec.app,
                    zone = w.spec.zone,
                    v = w.spec.version,
                    t = yaml_path(&token),
                    root = d("ca/root-cert.pem"),
                    ttl = self.certificate_ttl.as_millis(),
                    a = admin(ip),
                ),
            )?;
        }
        Ok(())
    }

    /// Writes the helloworld Service, its ServiceExport and its
    /// EndpointSlice; instances in `down` are written not ready (what
    /// Kubernetes does when a pod dies).
    fn write_manifests(&self, c: &Cluster, down: &[&str]) -> anyhow::Result<()> {
        let m = c.manifests();
        let hw: Vec<&Workload> = c
            .workloads
            .iter()
            .filter(|w| w.spec.app == "helloworld")
            .collect();
        if hw.is_empty() {
            return Ok(());
        }
        write_atomic(
            &m.join("helloworld-service.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: helloworld, namespace: {NAMESPACE}}}\n\
                 spec: {{ports: [{{name: http, port: {SERVICE_PORT}, targetPort: 8080}}]}}\n"
            ),
        )?;
        // Locality failover as a user of Istio writes it: east and west
        // back each other up, eu goes to east. Outlier detection ejects
        // a dead instance after 3 failures.
        let dr = m.join("helloworld-destinationrule.yaml");
        if !dr.exists() {
            write_atomic(
                &dr,
                &format!(
                    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: helloworld, namespace: {NAMESPACE}}}\n\
                     spec:\n  host: helloworld.{NAMESPACE}.svc.cluster.local\n\
                     \x20 subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n\
                     \x20 trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover:\n\
                     \x20       - {{from: us-east1, to: us-west1}}\n        - {{from: us-west1, to: us-east1}}\n        - {{from: europe-west1, to: us-east1}}\n\
                     \x20   outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 100}}\n"
                ),
            )?;
        }
        let export = m.join("helloworld-export.yaml");
        if !self
            .root
            .join(format!(".{}-unexported", c.spec.name))
            .exists()
        {
            write_atomic(
                &export,
                &format!(
                    "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: helloworld, namespace: {NAMESPACE}}}\n"
                ),
            )?;
        }
        // Objects a real API server accepts (loopback addresses aside):
        // the instances' labels are on their Pods, which the slice's
        // endpoints name.
        let mut eps = String::new();
        let mut pods = Vec::new();
        for w in &hw {
            eps.push_str(&format!(
                "  - addresses: [\"{ip}\"]\n    conditions: {{ready: {ready}}}\n    zone: {z}\n    targetRef: {{kind: Pod, namespace: {NAMESPACE}, name: {n}}}\n",
                ip = w.ip,
                ready = !down.contains(&w.spec.name.as_str()),
                z = w.spec.zone,
                n = w.spec.name,
            ));
            pods.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {n}\n  namespace: {NAMESPACE}\n  labels: {{app: helloworld, version: {v}}}\n\
                 spec:\n  serviceAccountName: helloworld\n  containers: [{{name: helloworld, image: isthmus/sample-app}}]\n",
                n = w.spec.name,
                v = w.spec.version,
            ));
        }
        write_atomic(&m.join("helloworld-pods.yaml"), &pods.join("---\n"))?;
        write_atomic(
            &m.join("helloworld-endpoints.yaml"),
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: helloworld-1\n  namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: helloworld}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 15006}}]\nendpoints:\n{eps}"
            ),
        )?;
        if let Some(api) = &c.api {
            api.kubectl(&["apply", "--server-side", "-f", &yaml_path(&m)], None)?;
        }
        Ok(())
    }

    /// Starts one cluster's controller (every replica).
    pub fn start_controller(&mut self, cluster: &str) -> anyhow::Result<()> {
        for r in 0..self.cluster(cluster).spec.controller_replicas {
            self.start_replica(cluster, r)?;
        }
        Ok(())
    }

    /// Starts controller replica `r` of `cluster`.
    pub fn start_replica(&mut self, cluster: &str, r: u8) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let cfg = yaml_path(&c.dir.join(controller_file(r)));
        let name = match r {
            0 => format!("{cluster}-controller"),
            _ => format!("{cluster}-controller-{r}"),
        };
        let p = self.spawn(cluster, &name, &["controller", "--config", &cfg])?;
        self.cluster_mut(cluster).controllers[r as usize] = Some(p);
        Ok(())
    }

    /// SIGKILLs controller replica `r` of `cluster`.
    pub fn kill_replica(&mut self, cluster: &str, r: u8) {
        if let Some(p) = self.cluster_mut(cluster).controllers[r as usize].take() {
            p.kill();
        }
    }

    /// Starts one cluster's gateway.
    pub fn start_gateway(&mut self, cluster: &str) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let cfg = yaml_path(&c.dir.join("gateway.yaml"));
        let p = self.spawn(
            cluster,
            &format!("{cluster}-gateway"),
            &["gateway", "--config", &cfg],
        )?;
        self.cluster_mut(cluster).gateway = Some(p);
        Ok(())
    }

    /// Starts a workload's app (in this process) and its sidecar
    /// (a process).
    pub async fn start_workload(&mut self, cluster: &str, name: &str) -> anyhow::Result<()> {
        self.start_workload_with(cluster, name, 0).await
    }

    /// [`Harness::start_workload`] with answers padded to `pad` bytes.
    pub async fn start_workload_with(
        &mut self,
        cluster: &str,
        name: &str,
        pad: usize,
    ) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let i = c.index(name);
        let w = &c.workloads[i];
        let who = sample::Identity {
            cluster: cluster.into(),
            version: w.spec.version.clone(),
            instance: w.spec.name.clone(),
            zone: w.spec.zone.clone(),
        };
        let listen = SocketAddr::from((w.ip, 8080));
        let (app, app_proc) = if self.namespaces.is_some() {
            let p = self.spawn(
                cluster,
                &format!("{cluster}-{name}-app"),
                &[
                    "sample-app",
                    "--listen",
                    &listen.to_string(),
                    "--cluster",
                    cluster,
                    "--app-version",
                    &who.version,
                    "--instance",
                    &who.instance,
                    "--zone",
                    &who.zone,
                ],
            )?;
            (None, Some(p))
        } else {
            let app = sample::start(listen, who, pad)
                .await
                .with_context(|| format!("cannot start app {name} on {listen}"))?;
            (Some(app), None)
        };
        let cfg = yaml_path(&c.dir.join(format!("sidecar-{name}.yaml")));
        let p = match &self.proxy_bin {
            Some(bin) => self.spawn_bin(
                bin,
                cluster,
                &format!("{cluster}-{name}"),
                &["--config", &cfg],
            )?,
            None => self.spawn(
                cluster,
                &format!("{cluster}-{name}"),
                &["proxy", "--config", &cfg],
            )?,
        };
        let w = &mut self.cluster_mut(cluster).workloads[i];
        w.app = app;
        w.app_proc = app_proc;
        w.sidecar = Some(p);
        w.running = true;
        Ok(())
    }

    /// Starts everything, links every pair of clusters with `isthmus
    /// link`, and waits until all are ready and synced.
    pub async fn start_all(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let names: Vec<String> = self.clusters.iter().map(|c| c.spec.name.clone()).collect();
        for n in &names {
            self.start_controller(n)?;
            self.start_gateway(n)?;
            let ws: Vec<String> = self
                .cluster(n)
                .workloads
                .iter()
                .map(|w| w.spec.name.clone())
                .collect();
            for w in ws {
                self.start_workload(n, &w).await?;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for c in &self.clusters {
            for r in 0..c.spec.controller_replicas {
                wait_ready(
                    c.replica_readiness(r),
                    deadline,
                    &format!("{} controller replica {r}", c.spec.name),
                )
                .await?;
            }
        }
        self.link_all()?;
        self.wait_synced(deadline).await
    }

    /// Peers every pair: `isthmus link create` in one, `link apply` in
    /// the other.
    pub fn link_all(&self) -> anyhow::Result<()> {
        for (i, a) in self.clusters.iter().enumerate() {
            for b in &self.clusters[i + 1..] {
                if let (Some(ka), Some(kb)) = (&a.api, &b.api) {
                    // Kube mode: the token is a Secret in a's API, the
                    // peer one in b's.
                    let token = self.isthmus(&[
                        "link",
                        "create",
                        "--kubeconfig",
                        &yaml_path(ka.kubeconfig()),
                        "-n",
                        kube::CONTROLLER_NAMESPACE,
                    ])?;
                    self.isthmus(&[
                        "link",
                        "apply",
                        "--kubeconfig",
                        &yaml_path(kb.kubeconfig()),
                        "-n",
                        kube::CONTROLLER_NAMESPACE,
                        token.trim(),
                    ])?;
                    continue;
                }
                let token = self.isthmus(&[
                    "link",
                    "create",
                    "--config",
                    &yaml_path(&a.dir.join("controller.yaml")),
                ])?;
                let token = token.trim();
                self.isthmus(&[
                    "link",
                    "apply",
                    "--config",
                    &yaml_path(&b.dir.join("controller.yaml")),
                    token,
                ])?;
            }
        }
        Ok(())
    }

    /// Waits until every process answers ready and every client sidecar
    /// knows helloworld from every other cluster that runs it.
    pub async fn wait_synced(&self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        for c in &self.clusters {
            if c.gateway.is_some() {
                wait_ready(
                    c.gateway_readiness(),
                    deadline,
                    &format!("{} gateway", c.spec.name),
                )
                .await?;
            }
            for w in &c.workloads {
                if w.sidecar.is_some() {
                    wait_ready(
                        w.readiness(),
                        deadline,
                        &format!("{} sidecar {}", c.spec.name, w.spec.name),
                    )
                    .await?;
                }
            }
        }
        for c in &self.clusters {
            let want: Vec<&str> = self
                .clusters
                .iter()
                .filter(|o| o.spec.name != c.spec.name)
                .filter(|o| o.workloads.iter().any(|w| w.spec.app == "helloworld"))
                .map(|o| o.spec.name.as_str())
                .collect();
            loop {
                let have = self.imported(&c.spec.name).await;
                if want.iter().all(|w| have.iter().any(|h| h == w)) {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "{}: helloworld imported from {have:?}, expected {want:?} (see the logs in {})",
                        c.spec.name,
                        self.root.join("logs").display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// An instance dies: its app and sidecar stop (SIGKILL) and the
    /// cluster's EndpointSlice marks it not ready.
    pub fn kill_instance(&mut self, cluster: &str, name: &str) -> anyhow::Result<()> {
        let c = self.cluster_mut(cluster);
        let i = c.index(name);
        let w = &mut c.workloads[i];
        if let Some(a) = w.app.take() {
            a.stop();
        }
        if let Some(p) = w.app_proc.take() {
            p.kill();
        }
        if let Some(p) = w.sidecar.take() {
            p.kill();
        }
        w.running = false;
        self.rewrite_endpoints(cluster)
    }

    fn rewrite_endpoints(&self, cluster: &str) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let down: Vec<&str> = c
            .workloads
            .iter()
            .filter(|w| !w.running)
            .map(|w| w.spec.name.as_str())
            .collect();
        self.write_manifests(c, &down)
    }

    /// Brings a killed instance back and marks it ready.
    pub async fn revive_instance(&mut self, cluster: &str, name: &str) -> anyhow::Result<()> {
        self.start_workload(cluster, name).await?;
        let w = self.cluster(cluster).workload(name);
        wait_ready(
            w.readiness(),
            tokio::time::Instant::now() + Duration::from_secs(20),
            name,
        )
        .await?;
        self.rewrite_endpoints(cluster)
    }

    /// SIGKILLs a cluster's gateway.
    pub fn kill_gateway(&mut self, cluster: &str) {
        if let Some(p) = self.cluster_mut(cluster).gateway.take() {
            p.kill();
        }
    }

    /// SIGKILLs a cluster's controller.
    pub fn kill_controller(&mut self, cluster: &str) {
        for p in self.cluster_mut(cluster).controllers.iter_mut() {
            if let Some(p) = p.take() {
                p.kill();
            }
        }
    }

    /// Withdraws (deletes the ServiceExport) or restores helloworld's
    /// export in `cluster`.
    pub fn set_exported(&self, cluster: &str, exported: bool) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let marker = self.root.join(format!(".{cluster}-unexported"));
        if exported {
            let _ = std::fs::remove_file(&marker);
            self.write_manifests(c, &[])?;
        } else {
            std::fs::write(&marker, "")?;
            let _ = std::fs::remove_file(c.manifests().join("helloworld-export.yaml"));
            if c.api.is_some() {
                c.kubectl(&["delete", "serviceexport", "helloworld", "-n", NAMESPACE])?;
            }
        }
        Ok(())
    }

    /// Writes an extra manifest (a policy) into a cluster's directory
    /// (kube tier: and applies it with kubectl).
    pub fn apply(&self, cluster: &str, file: &str, yaml: &str) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let path = c.manifests().join(file);
        write_atomic(&path, yaml)?;
        if let Some(api) = &c.api {
            api.kubectl(&["apply", "--server-side", "-f", &yaml_path(&path)], None)?;
        }
        Ok(())
    }
}

/// Controller replica `r`'s configuration file.
fn controller_file(r: u8) -> String {
    match r {
        0 => "controller.yaml".into(),
        _ => format!("controller-{r}.yaml"),
    }
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    isthmus_core::identity::write_atomic(path, text.as_bytes(), false)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Waits for `GET /healthz/ready` to answer 200.
pub async fn wait_ready(
    addr: SocketAddr,
    deadline: tokio::time::Instant,
    what: &str,
) -> anyhow::Result<()> {
    loop {
        if isthmus_core::admin::http_get(addr, "/healthz/ready")
            .await
            .is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what} not ready at {addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Harness {
    /// GETs an admin path of a component of `cluster` (inside its
    /// namespace in the network-namespace tier).
    pub async fn admin_get(&self, cluster: &str, addr: SocketAddr, path: &str) -> Option<String> {
        match &self.namespaces {
            None => isthmus_core::admin::http_get(addr, path).await.ok(),
            Some(ns) => {
                let out = tokio::process::Command::new("ip")
                    .args(["netns", "exec", &ns.of(cluster)])
                    .arg(&self.bin)
                    .args(["admin-get", &addr.to_string(), path])
                    .output()
                    .await
                    .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        }
    }

    /// The clusters `cluster`'s client sidecar knows healthy helloworld
    /// endpoints in, sorted.
    pub async fn imported(&self, cluster: &str) -> Vec<String> {
        let admin = self.cluster(cluster).client().admin();
        parse_imported(self.admin_get(cluster, admin, "/config_dump").await)
    }

    /// Whether `cluster`'s controller marks `peer` stale.
    pub async fn peer_stale(&self, cluster: &str, peer: &str) -> Option<bool> {
        let admin = self.cluster(cluster).controller_admin();
        let body = self.admin_get(cluster, admin, "/config_dump").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["peers"]
            .as_array()?
            .iter()
            .find(|p| p["cluster"] == peer)?["stale"]
            .as_bool()
    }
}

/// Where a scenario keeps its clusters: `dir`, or with
/// `ISTHMUS_E2E_KEEP=DIR` set, `DIR/<base>` (files and logs stay there
/// for a closer look).
pub fn scenario_dir(dir: &Path, base: u8) -> PathBuf {
    match std::env::var_os("ISTHMUS_E2E_KEEP") {
        Some(k) => Path::new(&k).join(base.to_string()),
        None => dir.to_owned(),
    }
}

/// helloworld by its cluster-local name, as the sample's client calls it.
pub const HELLO_URL: &str = "http://helloworld.sample.svc.cluster.local:5000/hello";

impl Harness {
    /// Sends `n` requests from `cluster`'s client, 20 ms apart; the
    /// [`Answer::label`] of each.
    pub async fn traffic(&self, cluster: &str, n: usize) -> Vec<String> {
        let mut c = Client::new(self.cluster(cluster).client().outbound());
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(c.get(HELLO_URL).await.label());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out
    }

    /// Sends bursts of five requests until `check` holds for one (20 s at
    /// most, else panics naming `what`); how long it took.
    pub async fn until(
        &self,
        cluster: &str,
        what: &str,
        check: impl Fn(&[String]) -> bool,
    ) -> Duration {
        let t = std::time::Instant::now();
        loop {
            let a = self.traffic(cluster, 5).await;
            if check(&a) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: still {a:?} after 20 s"
            );
        }
    }
}

impl Harness {
    /// SIGKILLs `cluster`'s controller and starts it again, checking on
    /// the way what a user would notice: while it is down its sidecars
    /// keep importing helloworld from `imported` and calls still succeed;
    /// afterwards it is ready and every cluster synced again.
    pub async fn restart_controller(
        &mut self,
        cluster: &str,
        imported: &[&str],
    ) -> anyhow::Result<()> {
        self.kill_controller(cluster);
        for _ in 0..10 {
            let have = self.imported(cluster).await;
            if have != imported {
                bail!(
                    "{cluster} imports from {have:?} while its controller is down, expected {imported:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let a = self.traffic(cluster, 5).await;
        if !failures(&a).is_empty() {
            bail!("calls failed while {cluster}'s controller was down: {a:?}");
        }
        self.start_controller(cluster)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        wait_ready(
            self.cluster(cluster).controller_readiness(),
            deadline,
            &format!("{cluster} controller"),
        )
        .await?;
        self.wait_synced(deadline).await
    }
}

/// The failed answers among [`Harness::traffic`]'s.
pub fn failures(answers: &[String]) -> Vec<&String> {
    answers.iter().filter(|a| a.starts_with("FAILED")).collect()
}

/// The clusters a sidecar's config dump names for imported helloworld.
fn parse_imported(body: Option<String>) -> Vec<String> {
    let Some(body) = body else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["mesh"]["imported"][format!("{NAMESPACE}/helloworld")]["clusters"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| {
                    c["groups"]
                        .as_array()
                        .is_some_and(|g| g.iter().any(|g| g["healthy"].as_u64() > Some(0)))
                })
                .filter_map(|c| c["cluster"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .map(|mut v| {
            v.sort();
            v
        })
        .unwrap_or_default()
}
