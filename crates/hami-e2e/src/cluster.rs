//! Starting and stopping the shared control plane.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::certs::Pki;
use crate::procs;

/// The resources hami-scheduler manages, as kube-scheduler must know them.
const MANAGED: &[&str] = &[
    "nvidia.com/gpu",
    "nvidia.com/gpumem",
    "nvidia.com/gpumem-percentage",
    "nvidia.com/gpucores",
    "nvidia.com/priority",
    // Other vendors, as HAMi's chart lists them (Cambricon: the count only).
    "huawei.com/Ascend910B3",
    "huawei.com/Ascend910B3-memory",
    "cambricon.com/vmlu",
];

/// A running control plane shared by the tests of one binary.
pub struct Cluster {
    pub dir: PathBuf,
    pub api_url: String,
    pub kubeconfig: PathBuf,
    pub ca_pem: String,
    /// HTTPS port of hami-scheduler (extender, webhook, metrics).
    pub scheduler_port: u16,
    /// Plain-HTTP port of hami-scheduler's dashboard (/ui, /api/v1).
    pub dashboard_port: u16,
    scheduler_bin: PathBuf,
    scheduler_args: Vec<String>,
    scheduler: Mutex<Option<Child>>,
    scheduler_starts: Mutex<u32>,
    /// In HA mode, the host name of the main scheduler pair (both processes
    /// run in their own UTS namespace, as the two containers of a pod).
    scheduler_host: Option<String>,
    kube_scheduler: Mutex<Option<Child>>,
    k8s_bin: PathBuf,
    _others: Mutex<Vec<Child>>,
}

/// Namespace and name of kube-scheduler's leader Lease in HA mode, as
/// HAMi's chart sets them (`resourceName: {{schedulerName}}`).
pub const HA_LEASE: (&str, &str) = ("kube-system", "hami-scheduler");

/// Host name of the main scheduler pair in HA mode.
pub const HA_MAIN_HOST: &str = "hami-pair-a";

/// An extra hami-scheduler process (and, for a pair, its kube-scheduler),
/// killed when dropped.
pub struct Replica {
    pub port: u16,
    child: Mutex<Option<Child>>,
    kube_scheduler: Mutex<Option<Child>>,
}

impl Replica {
    /// Kills it (and its kube-scheduler) with SIGKILL.
    pub fn kill(&self) {
        for c in [&self.child, &self.kube_scheduler] {
            if let Some(mut c) = c.lock().unwrap_or_else(|e| e.into_inner()).take() {
                procs::kill(&mut c);
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// Where the control-plane binaries are, or why there are none.
pub fn binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("HAMI_K8S_BIN") {
        let dir = PathBuf::from(dir);
        for b in ["etcd", "kube-apiserver", "kube-scheduler", "kwok"] {
            if !dir.join(b).is_file() {
                return Err(format!("HAMI_K8S_BIN={}: no {b} there", dir.display()));
            }
        }
        return Ok(dir);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("tests/e2e/build-k8s.sh");
    if !script.exists() {
        return Err(format!("{} does not exist", script.display()));
    }
    let out = Command::new(&script)
        .arg("--check")
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "control-plane binaries not built (run tests/e2e/build-k8s.sh first): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    if dir.is_empty() {
        return Err("build-k8s.sh --check printed no directory".into());
    }
    Ok(PathBuf::from(dir))
}

/// The shared cluster of this test binary, started on first use with
/// `scheduler_bin` as hami-scheduler. `None` (after printing why) when the
/// control-plane binaries are not available; panics when they are but the
/// cluster does not come up, or when HAMI_E2E_REQUIRE=1 and they are not.
pub fn cluster(scheduler_bin: &str) -> Option<&'static Cluster> {
    cluster_with(scheduler_bin, &[])
}

/// Like [`cluster`], with extra hami-scheduler flags. The first call of the
/// test binary decides: the cluster is shared by all its tests.
pub fn cluster_with(scheduler_bin: &str, extra_args: &[&str]) -> Option<&'static Cluster> {
    start_shared(scheduler_bin, extra_args, false)
}

/// Like [`cluster_with`], deployed for high availability as HAMi's chart
/// does: kube-scheduler elects a leader through the Lease [`HA_LEASE`],
/// and hami-scheduler follows it (`--leader-elect`). The two run in one
/// UTS namespace with host name [`HA_MAIN_HOST`], as the two containers
/// of one scheduler pod; [`Cluster::start_pair`] adds another such pod.
pub fn cluster_ha(scheduler_bin: &str, extra_args: &[&str]) -> Option<&'static Cluster> {
    start_shared(scheduler_bin, extra_args, true)
}

/// The shared cluster of this test binary without hami-scheduler: etcd,
/// kube-apiserver and kwok only (no kube-scheduler, no webhook), for tests
/// of other components, e.g. hami-node's device plugin, that bind their
/// pods themselves. Skips and fails as [`cluster`] does.
pub fn control_plane() -> Option<&'static Cluster> {
    start_shared("", &[], false)
}

/// The shared cluster of this test binary as an installer finds one: etcd,
/// kube-apiserver, kube-controller-manager and a plain kube-scheduler (no
/// hami-scheduler, no webhook), the API server reachable from pods through
/// the `kubernetes` Service's address, for installing hami-rs itself (the
/// Helm chart) onto [`Cluster::real_node`]. Needs root (iptables). Skips
/// and fails as [`cluster`] does.
pub fn deploy_cluster() -> Option<&'static Cluster> {
    start_flavor("", &[], Flavor::Deploy)
}

/// What runs beside the API server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// hami-scheduler as a host process, or nothing (an empty path).
    Host,
    /// As [`Flavor::Host`], in HA mode.
    Ha,
    /// [`deploy_cluster`].
    Deploy,
}

fn start_shared(scheduler_bin: &str, extra_args: &[&str], ha: bool) -> Option<&'static Cluster> {
    start_flavor(
        scheduler_bin,
        extra_args,
        if ha { Flavor::Ha } else { Flavor::Host },
    )
}

fn start_flavor(
    scheduler_bin: &str,
    extra_args: &[&str],
    flavor: Flavor,
) -> Option<&'static Cluster> {
    let ha = flavor == Flavor::Ha;
    let extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
    let r = CLUSTER.get_or_init(|| {
        let bin = match binaries() {
            Ok(b) => b,
            Err(reason) => return Err(reason),
        };
        if ha {
            own_host_names()?;
        }
        if flavor == Flavor::Deploy {
            crate::realnode::missing_for_deploy()?;
        }
        let scheduler_bin = PathBuf::from(scheduler_bin);
        Ok(start_blocking("the e2e control plane", move || {
            Cluster::start(&bin, &scheduler_bin, extra, flavor)
        }))
    });
    available(r, "e2e")
}

/// Runs a blocking startup on its own thread (so it does not matter which
/// runtime, if any, the first test uses); panics naming `what` if it fails.
pub(crate) fn start_blocking<T: Send + 'static>(
    what: &str,
    start: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> T {
    let started = std::thread::spawn(start)
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("startup panicked")));
    match started {
        Ok(v) => v,
        Err(e) => panic!("{what} did not start: {e:#}"),
    }
}

/// A shared test fixture, or why there is none: `None` after printing the
/// reason (the test skips), or a panic when HAMI_E2E_REQUIRE=1.
pub(crate) fn available<T>(r: &'static Result<T, String>, what: &str) -> Option<&'static T> {
    match r {
        Ok(v) => Some(v),
        Err(reason) => {
            if std::env::var("HAMI_E2E_REQUIRE").is_ok_and(|v| v == "1") {
                panic!("HAMI_E2E_REQUIRE=1 but: {reason}");
            }
            eprintln!("SKIP {what}: {reason}");
            None
        }
    }
}

/// A port that is free now and stays out of the kernel's way: ports below
/// the ephemeral range (32768+ on Linux) are never handed to outgoing
/// connections, so a component's own client traffic cannot take the port
/// between this check and the component's bind (seen once in CI as
/// "Address already in use"). Ports are never handed out twice.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut seed = [0u8; 2];
    urandom(&mut seed)?;
    let start = u16::from_le_bytes(seed);
    for i in 0..12_000u16 {
        let port = 20_000 + start.wrapping_add(i) % 12_000;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no free port in 20000-31999")
}

fn urandom(buf: &mut [u8]) -> anyhow::Result<()> {
    fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}

/// `bytes` random bytes as hex, from the kernel.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    urandom(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

pub(crate) fn log_file(dir: &Path, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
    let f = fs::File::create(dir.join(format!("{name}.log")))?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

fn start(dir: &Path, name: &str, bin: &Path, args: &[String]) -> anyhow::Result<Child> {
    start_as(dir, name, None, bin, args)
}

/// Whether processes can be given a host name of their own (`unshare
/// --uts`, which needs root), as the HA scheduler pods need.
fn own_host_names() -> Result<(), String> {
    let out = Command::new("unshare")
        .args(["--uts", "hostname", "hami-e2e-probe"])
        .output()
        .map_err(|e| format!("the HA cluster needs `unshare` (util-linux): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the HA cluster gives each scheduler pod its own host name with `unshare --uts`, which failed (run as root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Starts `bin`, in a UTS namespace of its own with host name `host` when
/// given (root only; `unshare` execs, so the child is the binary itself).
fn start_as(
    dir: &Path,
    name: &str,
    host: Option<&str>,
    bin: &Path,
    args: &[String],
) -> anyhow::Result<Child> {
    let (out, err) = log_file(dir, name)?;
    let mut cmd = match host {
        None => Command::new(bin),
        Some(h) => {
            let mut c = Command::new("unshare");
            c.args(["--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\"", h])
                .arg(bin);
            c
        }
    };
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    procs::spawn(cmd).with_context(|| format!("starting {}", bin.display()))
}

/// kube-scheduler's configuration: our extender at `hs_port`, and in HA
/// mode leader election on the Lease [`HA_LEASE`] with short terms.
fn kube_scheduler_config(
    dir: &Path,
    name: &str,
    kubeconfig: &Path,
    hs_port: u16,
    ca_pem: &str,
    ha: bool,
) -> anyhow::Result<PathBuf> {
    let ca_b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let managed: String = MANAGED
        .iter()
        .map(|r| format!("  - name: {r}\n    ignoredByScheduler: true\n"))
        .collect();
    let leader = if ha {
        format!(
            "leaderElection:\n  leaderElect: true\n  resourceNamespace: {}\n  resourceName: {}\n  leaseDuration: 4s\n  renewDeadline: 3s\n  retryPeriod: 1s\n",
            HA_LEASE.0, HA_LEASE.1
        )
    } else {
        "leaderElection:\n  leaderElect: false\n".to_string()
    };
    write(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nclientConnection:\n  kubeconfig: {}\n  qps: 500\n  burst: 1000\n{leader}profiles:\n- schedulerName: hami-scheduler\n- schedulerName: default-scheduler\nextenders:\n- urlPrefix: https://127.0.0.1:{hs_port}\n  filterVerb: filter\n  bindVerb: bind\n  enableHTTPS: true\n  tlsConfig:\n    caData: {ca_b64}\n  nodeCacheCapable: true\n  weight: 1\n  httpTimeout: 30s\n  managedResources:\n{managed}",
            kubeconfig.display()
        ),
    )
}

fn kube_scheduler_args(config: &Path, kubeconfig: &Path, port: u16) -> Vec<String> {
    vec![
        format!("--config={}", config.display()),
        format!("--authentication-kubeconfig={}", kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kubeconfig.display()),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={port}"),
        // Logs why each pod did not fit ("no fit"), for failure messages.
        "--v=2".to_string(),
    ]
}

/// The stand-in for kube-proxy, for the one Service pods need before
/// hami-rs is installed: connections to the `kubernetes` Service address
/// (10.96.0.1:443, what in-cluster clients dial) go to the API server on the
/// host, from pods (PREROUTING) and from host-network processes (OUTPUT).
/// Removed when the test binary exits.
fn route_service_address(node_ip: &str, api_port: u16) -> anyhow::Result<()> {
    let rule = |op: &str, chain: &str| {
        let mut c = Command::new("iptables");
        c.args([
            "-w",
            "-t",
            "nat",
            op,
            chain,
            "-d",
            "10.96.0.1/32",
            "-p",
            "tcp",
        ])
        .args(["--dport", "443", "-j", "DNAT", "--to-destination"])
        .arg(format!("{node_ip}:{api_port}"));
        c
    };
    for chain in ["PREROUTING", "OUTPUT"] {
        let out = rule("-A", chain)
            .output()
            .context("running iptables (the deploy cluster needs root and iptables)")?;
        if !out.status.success() {
            bail!(
                "iptables -A {chain}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let chain = chain.to_string();
        let mut undo = rule("-D", &chain);
        procs::at_exit_first(Box::new(move || {
            let _ = undo.output();
        }));
    }
    Ok(())
}

/// Last lines of a component's log, for failure messages.
pub(crate) fn tail(dir: &Path, name: &str, lines: usize) -> String {
    let text = fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls a plain-HTTP GET until it answers 200.
fn wait_http(port: u16, path: &str, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = (|| -> std::io::Result<bool> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200"))
        })()
        .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kube client for an arbitrary HTTPS endpoint signed by our CA (or any
/// certificate when `insecure`), authenticated as admin.
async fn https_client(
    kubeconfig: &Path,
    url: &str,
    insecure: bool,
) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.cluster_url = url.parse()?;
    config.accept_invalid_certs = insecure;
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(5));
    Ok(kube::Client::try_from(config)?)
}

async fn wait_https(
    kubeconfig: &Path,
    url: &str,
    path: &str,
    insecure: bool,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = https_client(kubeconfig, url, insecure).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let req = http::Request::get(path).body(Vec::new())?;
        match client.request_text(req).await {
            Ok(t) if t.trim() == "ok" => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(t) => bail!("{what} not ready after {timeout:?}: {t}"),
            Err(e) => bail!("{what} not ready after {timeout:?}: {e}"),
        }
    }
}

impl Cluster {
    fn start(
        bin: &Path,
        scheduler_bin: &Path,
        extra: Vec<String>,
        flavor: Flavor,
    ) -> anyhow::Result<Cluster> {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let dir = std::env::temp_dir().join(format!(
            "hami-e2e-{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_millisecond()
        ));
        fs::create_dir_all(&dir)?;
        procs::remove_at_exit(dir.clone());
        let r = Cluster::start_in(&dir, bin, scheduler_bin, extra, flavor);
        if let Err(e) = &r {
            let mut msg = format!("{e:#}\nlogs in {}", dir.display());
            for c in [
                "etcd",
                "kube-apiserver",
                "hami-scheduler",
                "kube-scheduler",
                "kube-controller-manager",
                "kwok",
            ] {
                msg.push_str(&format!("\n---- {c}\n{}", tail(&dir, c, 15)));
            }
            bail!(msg);
        }
        r
    }

    fn start_in(
        dir: &Path,
        bin: &Path,
        scheduler_bin: &Path,
        extra: Vec<String>,
        flavor: Flavor,
    ) -> anyhow::Result<Cluster> {
        let ha = flavor == Flavor::Ha;
        let deploy = flavor == Flavor::Deploy;
        let pki = Pki::generate()?;
        let ca = write(dir, "ca.crt", &pki.ca.cert)?;
        let api_crt = write(dir, "apiserver.crt", &pki.apiserver.cert)?;
        let api_key = write(dir, "apiserver.key", &pki.apiserver.key)?;
        let sched_crt = write(dir, "scheduler.crt", &pki.scheduler.cert)?;
        let sched_key = write(dir, "scheduler.key", &pki.scheduler.key)?;
        let sa_key = write(dir, "sa.key", &pki.sa_key)?;
        let sa_pub = write(dir, "sa.pub", &pki.sa_pub)?;
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let (ks_port, kwok_port, hs_port) = (free_port()?, free_port()?, free_port()?);
        let api_url = format!("https://127.0.0.1:{api_port}");
        // Clients authenticate with a static token: the API server verifies
        // a client certificate chain on every request, which cost 14 % of
        // its CPU in the 1,000-node load run (tests/e2e/README.md).
        let admin_token = random_hex(16)?;
        let tokens = write(
            dir,
            "tokens.csv",
            &format!(
                "{admin_token},admin,admin,\"system:masters\"\n{},system:node:{},{},\"system:nodes\"\n",
                crate::realnode::KUBELET_TOKEN,
                crate::realnode::REAL_NODE,
                crate::realnode::REAL_NODE,
            ),
        )?;
        let kubeconfig = write(
            dir,
            "admin.kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {api_url}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {admin_token}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: admin}}\ncurrent-context: e2e\n",
                ca.display(),
            ),
        )?;
        let mut others = Vec::new();
        let s = |v: &str| v.to_string();

        // etcd
        let etcd_data = dir.join("etcd-data");
        others.push(start(
            dir,
            "etcd",
            &bin.join("etcd"),
            &[
                s("--name=e2e"),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=e2e=http://127.0.0.1:{peer_port}"),
                s("--unsafe-no-fsync"),
                s("--log-level=warn"),
            ],
        )?);
        wait_http(etcd_port, "/health", "etcd", Duration::from_secs(30))?;

        // kube-apiserver (flags as in tests/e2e/smoke-control-plane.sh).
        // Deployed: pods reach it on the host's address (through the
        // `kubernetes` Service address, see `route_service_address`).
        let node_ip = if deploy {
            crate::realnode::node_ip()?
        } else {
            s("127.0.0.1")
        };
        let mut api_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            format!(
                "--bind-address={}",
                if deploy { "0.0.0.0" } else { "127.0.0.1" }
            ),
            format!("--advertise-address={node_ip}"),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", api_crt.display()),
            format!("--tls-private-key-file={}", api_key.display()),
            format!("--client-ca-file={}", ca.display()),
            format!("--token-auth-file={}", tokens.display()),
            format!("--requestheader-client-ca-file={}", ca.display()),
            s("--requestheader-allowed-names=front-proxy-client"),
            s("--requestheader-username-headers=X-Remote-User"),
            s("--requestheader-group-headers=X-Remote-Group"),
            s("--requestheader-extra-headers-prefix=X-Remote-Extra-"),
            // Node: the real node's kubelet acts as itself.
            s("--authorization-mode=Node,RBAC"),
            // The real node's name does not resolve; its IP does.
            s("--kubelet-preferred-address-types=InternalIP"),
            s("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            s("--service-cluster-ip-range=10.96.0.0/16"),
            s("--endpoint-reconciler-type=none"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            s("--profiling=true"),
            s("--max-requests-inflight=2000"),
            s("--max-mutating-requests-inflight=1000"),
        ];
        if deploy {
            // Pods get service-account tokens; webhooks are called on their
            // endpoints' pod IPs (there is no kube-proxy for Service IPs).
            api_args.push(s("--disable-admission-plugins=TaintNodesByCondition"));
            api_args.push(s("--enable-aggregator-routing=true"));
            // The node agent runs privileged, as on any real cluster.
            api_args.push(s("--allow-privileged=true"));
        } else {
            api_args.push(s(
                "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
            ));
        }
        others.push(start(
            dir,
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &api_args,
        )?);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(wait_https(
            &kubeconfig,
            &api_url,
            "/readyz",
            false,
            "kube-apiserver",
            Duration::from_secs(120),
        ))?;

        if deploy {
            route_service_address(&node_ip, api_port)?;
            let (kcm_port, plain_port) = (free_port()?, free_port()?);
            others.push(start(
                dir,
                "kube-controller-manager",
                &bin.join("kube-controller-manager"),
                &[
                    format!("--kubeconfig={}", kubeconfig.display()),
                    format!("--authentication-kubeconfig={}", kubeconfig.display()),
                    format!("--authorization-kubeconfig={}", kubeconfig.display()),
                    format!("--service-account-private-key-file={}", sa_key.display()),
                    format!("--root-ca-file={}", ca.display()),
                    s("--use-service-account-credentials=true"),
                    s("--leader-elect=false"),
                    s("--bind-address=127.0.0.1"),
                    format!("--secure-port={kcm_port}"),
                    s("--v=2"),
                ],
            )?);
            let plain = write(
                dir,
                "kube-scheduler.yaml",
                &format!(
                    "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nclientConnection:\n  kubeconfig: {}\nleaderElection:\n  leaderElect: false\n",
                    kubeconfig.display()
                ),
            )?;
            others.push(start(
                dir,
                "kube-scheduler",
                &bin.join("kube-scheduler"),
                &kube_scheduler_args(&plain, &kubeconfig, plain_port),
            )?);
            for (port, what) in [
                (kcm_port, "kube-controller-manager"),
                (plain_port, "kube-scheduler"),
            ] {
                rt.block_on(wait_https(
                    &kubeconfig,
                    &format!("https://127.0.0.1:{port}"),
                    "/healthz",
                    true,
                    what,
                    Duration::from_secs(60),
                ))?;
            }
        }

        // hami-scheduler, the binary under test
        let dashboard_port = free_port()?;
        let mut scheduler_args = vec![
            format!("--bind-address=127.0.0.1:{hs_port}"),
            format!("--dashboard-bind-address=127.0.0.1:{dashboard_port}"),
            format!("--tls-cert-file={}", sched_crt.display()),
            format!("--tls-key-file={}", sched_key.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            s("--resync-period=1s"),
        ];
        if ha {
            scheduler_args.push(s("--leader-elect=true"));
            scheduler_args.push(format!("--leader-elect-resource-namespace={}", HA_LEASE.0));
            scheduler_args.push(format!("--leader-elect-resource-name={}", HA_LEASE.1));
        }
        scheduler_args.extend(extra);
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            api_url: api_url.clone(),
            kubeconfig: kubeconfig.clone(),
            ca_pem: pki.ca.cert.clone(),
            scheduler_port: hs_port,
            dashboard_port,
            scheduler_bin: scheduler_bin.to_path_buf(),
            scheduler_args,
            scheduler: Mutex::new(None),
            scheduler_starts: Mutex::new(0),
            scheduler_host: ha.then(|| HA_MAIN_HOST.to_string()),
            kube_scheduler: Mutex::new(None),
            k8s_bin: bin.to_path_buf(),
            _others: Mutex::new(Vec::new()),
        };
        // An empty scheduler path: the bare control plane ([`control_plane`]).
        if !scheduler_bin.as_os_str().is_empty() {
            cluster.start_scheduler()?;
            rt.block_on(cluster.wait_scheduler_ready(Duration::from_secs(60)))?;
            rt.block_on(cluster.register_webhook())?;

            // kube-scheduler with our extender
            let ks_config = kube_scheduler_config(
                dir,
                "kube-scheduler",
                &kubeconfig,
                hs_port,
                &pki.ca.cert,
                ha,
            )?;
            *cluster
                .kube_scheduler
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(start_as(
                dir,
                "kube-scheduler",
                cluster.scheduler_host.as_deref(),
                &bin.join("kube-scheduler"),
                &kube_scheduler_args(&ks_config, &kubeconfig, ks_port),
            )?);
            rt.block_on(wait_https(
                &kubeconfig,
                &format!("https://127.0.0.1:{ks_port}"),
                "/readyz",
                true,
                "kube-scheduler",
                Duration::from_secs(60),
            ))?;
        }

        // kwok: fakes the nodes annotated kwok.x-k8s.io/node=fake and their pods
        let kwok_config = write(
            dir,
            "kwok.yaml",
            "apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions: {}\n",
        )?;
        others.push(start(
            dir,
            "kwok",
            &bin.join("kwok"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                s("--manage-all-nodes=false"),
                s("--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake"),
                // kwok renews each lease every quarter of this; at 40 s a
                // 1,000-node load run spent 100 API writes/s on leases alone,
                // which nothing here reads.
                s("--node-lease-duration-seconds=600"),
                format!("--server-address=127.0.0.1:{kwok_port}"),
                format!("--config={}", kwok_config.display()),
            ],
        )?);
        wait_http(kwok_port, "/healthz", "kwok", Duration::from_secs(30))?;
        *cluster._others.lock().unwrap_or_else(|e| e.into_inner()) = others;
        Ok(cluster)
    }

    /// Where the Kubernetes binaries are.
    pub fn k8s_bin(&self) -> &Path {
        &self.k8s_bin
    }

    /// A fresh client (one per test: clients are bound to the runtime that
    /// made them, and every test has its own).
    pub async fn client(&self) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("reading the e2e kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("e2e kubeconfig");
        kube::Client::try_from(config).expect("e2e client")
    }

    /// A client acting as `user` (in `groups`), through impersonation by
    /// the admin: for checks of who may do what.
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> kube::Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("reading the e2e kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("e2e kubeconfig");
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        kube::Client::try_from(config).expect("e2e client")
    }

    /// A client for hami-scheduler's own HTTPS endpoint.
    pub async fn scheduler_client(&self) -> kube::Client {
        https_client(
            &self.kubeconfig,
            &format!("https://127.0.0.1:{}", self.scheduler_port),
            false,
        )
        .await
        .expect("scheduler client")
    }

    /// GET a path of hami-scheduler (e.g. `/metrics`) as text.
    pub async fn scheduler_get(&self, path: &str) -> Result<String, kube::Error> {
        let req = http::Request::get(path)
            .body(Vec::new())
            .expect("a valid request");
        self.scheduler_client().await.request_text(req).await
    }

    /// POST a JSON body to hami-scheduler (e.g. an extender verb, as
    /// kube-scheduler would over loopback); the JSON answer.
    pub async fn scheduler_post(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let req = http::Request::post(path)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).expect("json"))
            .expect("a valid request");
        let text = self
            .scheduler_client()
            .await
            .request_text(req)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }

    /// Starts hami-scheduler (again).
    pub fn start_scheduler(&self) -> anyhow::Result<()> {
        let mut n = self
            .scheduler_starts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *n += 1;
        let name = if *n == 1 {
            "hami-scheduler".to_string()
        } else {
            format!("hami-scheduler-{n}")
        };
        let mut cmd_args = self.scheduler_args.clone();
        cmd_args.retain(|a| !a.is_empty());
        let child = start_as(
            &self.dir,
            &name,
            self.scheduler_host.as_deref(),
            &self.scheduler_bin,
            &cmd_args,
        )?;
        *self.scheduler.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// A client for a replica's HTTPS endpoint (extender, metrics).
    pub async fn replica_client(&self, replica: &Replica) -> kube::Client {
        https_client(
            &self.kubeconfig,
            &format!("https://127.0.0.1:{}", replica.port),
            false,
        )
        .await
        .expect("replica client")
    }

    /// Kills hami-scheduler with SIGKILL (a crash, not a clean stop).
    pub fn kill_scheduler(&self) {
        if let Some(mut c) = self
            .scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            procs::kill(&mut c);
        }
    }

    /// Kills the main kube-scheduler with SIGKILL.
    pub fn kill_kube_scheduler(&self) {
        if let Some(mut c) = self
            .kube_scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            procs::kill(&mut c);
        }
    }

    /// In HA mode: another scheduler pod, i.e. a hami-scheduler and a
    /// kube-scheduler (calling it as its extender) sharing host name
    /// `host`, both following the Lease [`HA_LEASE`]. Returns once
    /// hami-scheduler is ready and kube-scheduler serves.
    pub async fn start_pair(&self, host: &str) -> anyhow::Result<Replica> {
        let (hs_port, ks_port) = (free_port()?, free_port()?);
        let mut args: Vec<String> = self
            .scheduler_args
            .iter()
            .filter(|a| {
                !a.is_empty()
                    && !a.starts_with("--bind-address=")
                    && !a.starts_with("--dashboard-bind-address=")
            })
            .cloned()
            .collect();
        args.push(format!("--bind-address=127.0.0.1:{hs_port}"));
        args.push("--dashboard-bind-address=off".to_string());
        let hs_name = format!("hami-scheduler-{host}");
        let hami = start_as(&self.dir, &hs_name, Some(host), &self.scheduler_bin, &args)?;
        let replica = Replica {
            port: hs_port,
            child: Mutex::new(Some(hami)),
            kube_scheduler: Mutex::new(None),
        };
        wait_https(
            &self.kubeconfig,
            &format!("https://127.0.0.1:{hs_port}"),
            "/readyz",
            false,
            &hs_name,
            Duration::from_secs(60),
        )
        .await?;
        let ks_name = format!("kube-scheduler-{host}");
        let config = kube_scheduler_config(
            &self.dir,
            &ks_name,
            &self.kubeconfig,
            hs_port,
            &self.ca_pem,
            true,
        )?;
        let ks = start_as(
            &self.dir,
            &ks_name,
            Some(host),
            &self.k8s_bin.join("kube-scheduler"),
            &kube_scheduler_args(&config, &self.kubeconfig, ks_port),
        )?;
        *replica
            .kube_scheduler
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(ks);
        wait_https(
            &self.kubeconfig,
            &format!("https://127.0.0.1:{ks_port}"),
            "/healthz",
            true,
            &ks_name,
            Duration::from_secs(60),
        )
        .await?;
        Ok(replica)
    }

    /// Waits until hami-scheduler's /readyz says ok.
    pub async fn wait_scheduler_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_https(
            &self.kubeconfig,
            &format!("https://127.0.0.1:{}", self.scheduler_port),
            "/readyz",
            false,
            "hami-scheduler",
            timeout,
        )
        .await
    }

    /// The last lines of hami-scheduler's first run's log.
    pub fn scheduler_log_tail(&self, lines: usize) -> String {
        tail(&self.dir, "hami-scheduler", lines)
    }

    /// The last `lines` lines of a component's log (`hami-scheduler`,
    /// `kube-scheduler`, ...; every run of it: `hami-scheduler.log`, then
    /// `hami-scheduler-2.log`, ...) that contain `needle`, for failure
    /// messages.
    pub fn log_lines_with(&self, component: &str, needle: &str, lines: usize) -> String {
        let mut text =
            fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default();
        for run in 2.. {
            match fs::read_to_string(self.dir.join(format!("{component}-{run}.log"))) {
                Ok(t) => text.push_str(&t),
                Err(_) => break,
            }
        }
        let hits: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
        hits[hits.len().saturating_sub(lines)..].join("\n")
    }

    async fn register_webhook(&self) -> anyhow::Result<()> {
        use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
        let client = self.client().await;
        let ca_b64 = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let selector = serde_json::json!({"matchExpressions": [
            {"key": "hami.io/webhook", "operator": "NotIn", "values": ["ignore"]}
        ]});
        let cfg: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "hami-webhook"},
            "webhooks": [{
                "name": "vgpu.hami.io",
                "admissionReviewVersions": ["v1", "v1beta1"],
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{}/webhook", self.scheduler_port),
                    "caBundle": ca_b64,
                },
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "timeoutSeconds": 10,
                "namespaceSelector": selector,
                "objectSelector": selector,
                "rules": [{
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "operations": ["CREATE"],
                    "resources": ["pods"],
                    "scope": "*",
                }],
            }],
        }))?;
        let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client.clone());
        api.create(&Default::default(), &cfg).await?;
        // The API server picks the configuration up asynchronously: probe
        // with a dry-run pod until the webhook mutates it.
        let probe: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "webhook-probe", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "fake",
                "resources": {"limits": {"nvidia.com/gpumem": "1"}}}]},
        }))?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client, "default");
        let dry = kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = pods.create(&dry, &probe).await?;
            if out.spec.and_then(|s| s.scheduler_name).as_deref() == Some("hami-scheduler") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the webhook is registered but pods are not mutated after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
