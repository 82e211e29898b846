//! One real Kubernetes node beside the kwok nodes: a kubelet built from
//! the pinned `k8s.io/kubernetes` module, containerd 2.x (NRI on) from
//! `github.com/containerd/containerd/v2`, runc and the CNI plugins from the
//! distribution, registered to the shared control plane. Images are built
//! here from local files (no registry) and imported into containerd.
//! Recipe and pitfalls: ../shared/notes/real-node.md; tests/e2e/README.md.
//!
//! Global state the node cannot move (so at most one real node per
//! machine, guarded by a lock file): the kubelet's device-plugin dir
//! `/var/lib/kubelet/device-plugins/` (fixed in the kubelet) and
//! `/var/log/containers`, the cgroup trees `kubepods`, and a bridge. Every
//! other path is under the node's root in the cluster's dir, and every
//! port is picked free. When the test binary exits, the node is taken
//! down in the order that leaves nothing behind: kubelet, containers,
//! containerd and its shims, mounts deepest first, cgroups, the bridge,
//! the global dirs this node created.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::{Cluster, available, free_port, log_file, start_blocking, tail, write};
use crate::procs;

/// Name of the real node.
pub const REAL_NODE: &str = "e2e-real-node";
/// Bearer token of its kubelet (user `system:node:<REAL_NODE>`).
pub(crate) const KUBELET_TOKEN: &str = "e2e-real-node-kubelet-token";
/// The kubelet's device-plugin dir: fixed in the kubelet, whatever its root.
pub const DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// The sandbox (pause) image, built here.
pub const PAUSE_IMAGE: &str = "localhost/pause:1";
/// The base test image: a static busybox (`sh`, `sleep`, `cat`, ...).
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:1";

const BRIDGE: &str = "hamie2e0";
const POD_SUBNET: &str = "10.244.0.0/24";
const RUNC: &str = "/usr/sbin/runc";
const CNI_DIR: &str = "/usr/lib/cni";
pub(crate) const BUSYBOX: &str = "/bin/busybox";
/// Held (flock) while a real node runs on this machine.
const MACHINE_LOCK: &str = "/run/hami-e2e-real-node.lock";
/// Applets linked in the busybox image.
pub(crate) const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "echo", "env", "ls", "true", "false", "test", "grep", "kill", "ps", "wc",
    "head", "id", "mount",
];

/// The real node of this test binary.
pub struct RealNode {
    pub name: String,
    /// Everything of the node lives under this dir.
    pub root: PathBuf,
    /// The kubelet's PodResources socket.
    pub pod_resources_socket: PathBuf,
    /// containerd's NRI socket.
    pub nri_socket: PathBuf,
    containerd_socket: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    kubelet_args: Vec<String>,
    kubelet: Mutex<Option<Child>>,
    kubelet_starts: Mutex<u32>,
    _containerd: Mutex<Option<Child>>,
}

static NODE: OnceLock<Result<RealNode, String>> = OnceLock::new();

/// What this machine lacks for a real node, if anything.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the real node (kubelet, containerd, runc) needs root".into());
    }
    for (path, what) in [
        (RUNC, "runc (apt-get install runc)"),
        (
            "/usr/lib/cni/bridge",
            "the CNI plugins (apt-get install containernetworking-plugins)",
        ),
        (BUSYBOX, "a static busybox (apt-get install busybox-static)"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("the real node needs {what}: no {path}"));
        }
    }
    if Command::new("gcc").arg("--version").output().is_err() {
        return Some("the real node's pause image is built with gcc, which is missing".into());
    }
    None
}

/// What this machine lacks for [`crate::deploy_cluster`]: a real node, and
/// iptables for the `kubernetes` Service address.
pub(crate) fn missing_for_deploy() -> Result<(), String> {
    if let Some(m) = missing() {
        return Err(m);
    }
    match Command::new("iptables")
        .args(["-w", "-t", "nat", "-S", "OUTPUT"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "the deploy cluster routes the kubernetes Service address with iptables, which failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!(
            "the deploy cluster needs iptables (apt-get install iptables): {e}"
        )),
    }
}

impl Cluster {
    /// The real node, started on first use. `None` (after printing why)
    /// when this machine cannot run one (not root, runc or the CNI plugins
    /// missing), unless HAMI_E2E_REQUIRE=1, which makes that a failure.
    /// Panics when the node should start but does not.
    pub fn real_node(&'static self) -> Option<&'static RealNode> {
        let r = NODE.get_or_init(|| {
            if let Some(reason) = missing() {
                return Err(reason);
            }
            Ok(start_blocking("the e2e real node", move || {
                RealNode::start(self)
            }))
        });
        available(r, "real node")
    }
}

/// The host's address the API server reaches the kubelet on.
pub(crate) fn node_ip() -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "get", "1.1.1.1"])
        .output()
        .context("running `ip route get`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src"
            && let Some(ip) = words.next()
        {
            return Ok(ip.to_string());
        }
    }
    let out = Command::new("ip").args(["-4", "-o", "addr"]).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace();
        if let Some(cidr) = it.find(|w| *w == "inet").and_then(|_| it.next()) {
            let ip = cidr.split('/').next().unwrap_or_default();
            if !ip.starts_with("127.") {
                return Ok(ip.to_string());
            }
        }
    }
    bail!("no non-loopback IPv4 address for the kubelet's --node-ip")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RealNode {
    fn start(cluster: &'static Cluster) -> anyhow::Result<RealNode> {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(MACHINE_LOCK)
            .with_context(|| format!("opening {MACHINE_LOCK}"))?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on an open fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another test binary runs a real node on this machine ({MACHINE_LOCK} is locked)"
            );
        }
        // Held until the process exits.
        std::mem::forget(lock);
        sweep_dead_nodes();
        let root = cluster.dir.join("realnode");
        let r = RealNode::start_in(cluster, &root);
        if let Err(e) = &r {
            let mut msg = format!("{e:#}\nlogs in {}", root.display());
            for c in ["containerd", "kubelet"] {
                msg.push_str(&format!("\n---- {c}\n{}", tail(&root, c, 25)));
            }
            bail!(msg);
        }
        r
    }

    fn start_in(cluster: &'static Cluster, root: &Path) -> anyhow::Result<RealNode> {
        for d in [
            "etc",
            "run",
            "bin",
            "images",
            "cni/net.d",
            "cni/ipam",
            "pod-logs",
        ] {
            fs::create_dir_all(root.join(d))?;
        }
        let created_var_lib_kubelet = !Path::new("/var/lib/kubelet").exists();
        let created_var_log_containers = !Path::new("/var/log/containers").exists();
        {
            let root = root.to_path_buf();
            procs::at_exit_first(Box::new(move || {
                teardown(&root, created_var_lib_kubelet, created_var_log_containers)
            }));
        }
        let bin = cluster.k8s_bin().to_path_buf();
        for b in ["kubelet", "containerd", "containerd-shim-runc-v2", "ctr"] {
            if !bin.join(b).is_file() {
                bail!("no {b} in {} (run tests/e2e/build-k8s.sh)", bin.display());
            }
        }
        let containerd_socket = root.join("run/containerd.sock");
        let nri_socket = root.join("run/nri/nri.sock");
        let r = root.display();
        write(
            &root.join("etc"),
            "containerd.toml",
            &format!(
                r#"version = 3
root = "{r}/containerd/root"
state = "{r}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{r}/run/containerd.sock"
[ttrpc]
  address = "{r}/run/containerd.sock.ttrpc"
[debug]
  address = "{r}/run/containerd-debug.sock"
[metrics]
  address = ""
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    restrict_oom_score_adj = true
    cdi_spec_dirs = ['{r}/cdi']
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{RUNC}'
          Root = '{r}/run/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{CNI_DIR}']
      conf_dir = '{r}/cni/net.d'
      max_conf_num = 1
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
  [plugins.'io.containerd.nri.v1.nri']
    disable = false
    socket_path = '{r}/run/nri/nri.sock'
    plugin_path = '{r}/nri/plugins'
    plugin_config_path = '{r}/nri/conf.d'
"#
            ),
        )?;
        write(
            &root.join("cni/net.d"),
            "10-hami-e2e.conflist",
            &serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "hami-e2e",
                "plugins": [{
                    "type": "bridge", "bridge": BRIDGE, "isGateway": true,
                    "ipMasq": false, "hairpinMode": true,
                    "ipam": {"type": "host-local",
                        "dataDir": root.join("cni/ipam").display().to_string(),
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}]},
                }],
            })
            .to_string(),
        )?;

        // containerd: the shim must be on its PATH.
        let (out, err) = log_file(root, "containerd")?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(bin.join("containerd"));
        cmd.arg("--config")
            .arg(root.join("etc/containerd.toml"))
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let containerd = procs::spawn(cmd).context("starting containerd")?;
        let ctr = |args: &[&str]| {
            let mut c = Command::new(bin.join("ctr"));
            c.arg("--address")
                .arg(&containerd_socket)
                .args(["-n", "k8s.io"])
                .args(args);
            c
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while run(&mut ctr(&["version"])).is_err() {
            if Instant::now() > deadline {
                bail!("containerd did not answer `ctr version` within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        // Images: pause and busybox.
        let pause = build_pause(&root.join("images"))?;
        let pause_tar = root.join("images/pause.tar");
        crate::image::write_oci(
            &pause_tar,
            PAUSE_IMAGE,
            &crate::image::Layer::new().file("/pause", &pause, 0o755)?,
            &["/pause"],
            &[],
        )?;
        let busybox_tar = root.join("images/busybox.tar");
        crate::image::write_oci(
            &busybox_tar,
            BUSYBOX_IMAGE,
            &crate::image::Layer::busybox()?,
            &[],
            &[],
        )?;
        for tar in [&pause_tar, &busybox_tar] {
            run(ctr(&["images", "import", "--platform", "linux/amd64"]).arg(tar))?;
        }

        // kubelet
        let name = REAL_NODE.to_string();
        let ip = node_ip()?;
        let (port, healthz) = (free_port()?, free_port()?);
        let kubeconfig = write(
            &root.join("etc"),
            "kubelet.kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: kubelet\n  user:\n    token: {KUBELET_TOKEN}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: kubelet}}\ncurrent-context: e2e\n",
                cluster.api_url,
                cluster.dir.join("ca.crt").display(),
            ),
        )?;
        let config = write(
            &root.join("etc"),
            "kubelet.yaml",
            &format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{r}/run/containerd.sock
imageServiceEndpoint: unix://{r}/run/containerd.sock
podLogsDir: {r}/pod-logs
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
address: {ip}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
evictionHard: {{memory.available: \"50Mi\", nodefs.available: \"1%\", nodefs.inodesFree: \"1%\", imagefs.available: \"1%\"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
syncFrequency: 5s
"
            ),
        )?;
        let kubelet_args = vec![
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--root-dir={r}/kubelet"),
            format!("--cert-dir={r}/kubelet-pki"),
            format!("--volume-plugin-dir={r}/kubelet-plugins"),
            format!("--hostname-override={name}"),
            format!("--node-ip={ip}"),
            "--v=2".to_string(),
        ];
        let node = RealNode {
            name,
            root: root.to_path_buf(),
            pod_resources_socket: root.join("kubelet/pod-resources/kubelet.sock"),
            nri_socket,
            containerd_socket,
            bin,
            kubeconfig: cluster.kubeconfig.clone(),
            kubelet_args,
            kubelet: Mutex::new(None),
            kubelet_starts: Mutex::new(0),
            _containerd: Mutex::new(Some(containerd)),
        };
        node.start_kubelet()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(node.wait_ready(cluster, Duration::from_secs(60)))?;
        Ok(node)
    }

    /// Starts the kubelet (again, after [`RealNode::kill_kubelet`]).
    pub fn start_kubelet(&self) -> anyhow::Result<()> {
        let mut n = self
            .kubelet_starts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *n += 1;
        let log = if *n == 1 {
            "kubelet".to_string()
        } else {
            format!("kubelet-{n}")
        };
        let (out, err) = log_file(&self.root, &log)?;
        let mut cmd = Command::new(self.bin.join("kubelet"));
        cmd.args(&self.kubelet_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = procs::spawn(cmd).context("starting the kubelet")?;
        *self.kubelet.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// Kills the kubelet with SIGKILL (its containers keep running).
    pub fn kill_kubelet(&self) {
        if let Some(mut c) = self
            .kubelet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            procs::kill(&mut c);
        }
    }

    /// The kubelet's log (all its runs), for failure messages.
    pub fn kubelet_log_tail(&self, lines: usize) -> String {
        let n = *self
            .kubelet_starts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let last = if n <= 1 {
            "kubelet".to_string()
        } else {
            format!("kubelet-{n}")
        };
        tail(&self.root, &last, lines)
    }

    /// Waits until the node is Ready, then removes the registration taint
    /// (no controller manager here does).
    async fn wait_ready(&self, cluster: &Cluster, timeout: Duration) -> anyhow::Result<()> {
        let client = cluster.client().await;
        let nodes: Api<Node> = Api::all(client);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(n) = nodes.get(&self.name).await {
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ready {
                    let tainted = n
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|t| !t.is_empty());
                    if tainted {
                        nodes
                            .patch(
                                &self.name,
                                &PatchParams::default(),
                                &Patch::Merge(serde_json::json!({"spec": {"taints": null}})),
                            )
                            .await?;
                    }
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("node {} not Ready after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `ctr -n k8s.io <args>` against this node's containerd.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(self.bin.join("ctr"))
            .arg("--address")
            .arg(&self.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args))
    }

    /// Builds an image named `name` (busybox plus `files`, each
    /// `(path in the image, host file)`, plus the shared libraries that
    /// `files` and `libs_for` need, as the host's dynamic loader resolves
    /// them), with `env`, and imports it into the node's containerd.
    pub fn import_image(
        &self,
        name: &str,
        files: &[(&str, &Path)],
        libs_for: &[&Path],
        env: &[&str],
    ) -> anyhow::Result<()> {
        let mut layer = crate::image::Layer::busybox()?;
        let mut needs: Vec<&Path> = libs_for.to_vec();
        for (at, host) in files {
            layer = layer.file(at, host, 0o755)?;
            needs.push(host);
        }
        for lib in crate::image::shared_libraries(&needs)? {
            layer = layer.file(&lib.display().to_string(), &lib, 0o755)?;
        }
        let mut all_env = vec!["PATH=/bin:/usr/bin".to_string()];
        all_env.extend(env.iter().map(|e| e.to_string()));
        let process = crate::image::Process {
            env: all_env,
            ..Default::default()
        };
        self.import_layer(name, &layer, &process)
    }

    /// Imports the image `name` made of `layer` running `process` into the
    /// node's containerd (as a registry pull would leave it).
    pub fn import_layer(
        &self,
        name: &str,
        layer: &crate::image::Layer,
        process: &crate::image::Process,
    ) -> anyhow::Result<()> {
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let tar = self.root.join(format!("images/{safe}.tar"));
        crate::image::write_oci_image(&tar, name, layer, process)?;
        self.ctr(&[
            "images",
            "import",
            "--platform",
            "linux/amd64",
            &tar.display().to_string(),
        ])?;
        Ok(())
    }

    /// The admin kubeconfig of the cluster the node is registered to.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
}

/// The pause program: sleeps until SIGTERM/SIGINT, then exits 0 at once
/// (pod teardown waits for it otherwise).
fn build_pause(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = dir.join("pause.c");
    fs::write(
        &src,
        "#include <signal.h>\n#include <unistd.h>\nstatic void done(int s) { (void)s; _exit(0); }\nint main(void) { signal(SIGTERM, done); signal(SIGINT, done); for (;;) pause(); }\n",
    )?;
    let out = dir.join("pause");
    run(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src))?;
    Ok(out)
}

/// Mount points under `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Pids whose command line mentions `root` (the shims of this node's
/// containerd name its socket).
fn pids_mentioning(root: &Path) -> Vec<i32> {
    let needle = root.display().to_string();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = fs::read(e.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Takes a node down (see the module doc); safe to call on a half-started
/// or already-dead node.
fn teardown(root: &Path, var_lib_kubelet: bool, var_log_containers: bool) {
    // The kubelet and containerd die with the test binary's pids (SIGTERM
    // after this); stop them first here so nothing restarts containers.
    for pid in pids_mentioning(root) {
        // SAFETY: kill(2) on pids found by their command line.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    // The shims' children (containers) run in their own pid namespaces:
    // runc tracks them in its state dir.
    if let Ok(out) = Command::new(RUNC)
        .arg("--root")
        .arg(root.join("run/runc/k8s.io"))
        .args(["list", "-q"])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = Command::new(RUNC)
                .arg("--root")
                .arg(root.join("run/runc/k8s.io"))
                .args(["delete", "-f", id])
                .output();
        }
    }
    for m in mounts_under(root) {
        let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: umount2 with a valid C string.
        unsafe {
            if libc::umount2(c.as_ptr(), 0) != 0 {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    remove_cgroups();
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    if var_lib_kubelet && mounts_under(Path::new("/var/lib/kubelet")).is_empty() {
        let _ = fs::remove_dir_all("/var/lib/kubelet");
    } else {
        // Only what this node's kubelet and plugins put there.
        if let Ok(d) = fs::read_dir(DEVICE_PLUGIN_DIR) {
            for e in d.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if var_log_containers {
        let _ = fs::remove_dir_all("/var/log/containers");
    }
    if !mounts_under(root).is_empty() {
        // Never delete through a mount: leave the dir for a later sweep.
        procs::keep_dir(root);
        eprintln!(
            "real node: mounts remain under {}; left in place",
            root.display()
        );
    }
}

/// The kubelet's pod cgroups, bottom-up, in every hierarchy.
fn remove_cgroups() {
    for h in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let top = h.path().join("kubepods");
        if top.is_dir() {
            let _ = Command::new("find")
                .arg(&top)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .output();
        }
    }
}

/// Real nodes of test binaries that died without tearing down (SIGKILL,
/// a timeout): `/tmp/hami-e2e-<pid>-*/realnode` whose pid is gone.
fn sweep_dead_nodes() {
    let tmp = std::env::temp_dir();
    for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("hami-e2e-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let root = e.path().join("realnode");
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if alive || !root.is_dir() {
            continue;
        }
        eprintln!(
            "real node: sweeping {} left by dead pid {pid}",
            root.display()
        );
        teardown(&root, false, false);
        if mounts_under(&root).is_empty() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
