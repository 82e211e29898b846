//! hami-node on a real node: the harness's kubelet, containerd and runc
//! (hami-e2e's `real_node`), the shared control plane with hami-scheduler
//! beside kube-scheduler and the webhook, and sim-gpu's cards. hami-node
//! runs as a host process with `--sim-devices`, which also plays the
//! NVIDIA container toolkit for the simulated driver (each GPU container
//! gets `libcuda.so.1` and only its own cards).
//!
//! Needs root, runc, the CNI plugins, a static busybox and gcc; skips with
//! the reason otherwise, unless HAMI_E2E_REQUIRE=1.

#[path = "../../hami-core/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hami_api::annotations as ann;
use hami_e2e::{Cluster, RealNode, TestNs, wait_for};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// The test image: busybox, cuda-probe and what it and the injected
/// libraries (interposer, simulated driver) load.
const IMAGE: &str = "localhost/hami-cuda:1";
const SPLIT: u64 = 10;

/// The simulated cards of the node: `(memory, sms, uuid, name)`.
const CARDS: [&str; 4] = [
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000000 NVIDIA Sim 8GB",
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000001 NVIDIA Sim 8GB",
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000002 NVIDIA Sim 8GB",
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000003 NVIDIA Sim 8GB",
];

/// A binary of another package of the workspace: next to this test's
/// dir when `cargo test --workspace` built it, else built here.
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let next = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir");
    if next.is_file() {
        return next;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = root.join("target/hami-bins");
    let ok = Command::new(env!("CARGO"))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "-j2", "-p", name, "--bin", name])
        .status()
        .expect("running cargo")
        .success();
    assert!(ok, "building {name} failed");
    target.join("debug").join(name)
}

struct Setup {
    cluster: &'static Cluster,
    node: &'static RealNode,
    hami_node: Mutex<Option<Child>>,
    hami_node_args: Vec<String>,
    hami_node_starts: Mutex<u32>,
}

impl Setup {
    fn start_hami_node(&self) {
        let mut n = self.hami_node_starts.lock().unwrap();
        *n += 1;
        let log = std::fs::File::create(self.node.root.join(format!("hami-node-{n}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hami-node"));
        cmd.args(&self.hami_node_args)
            .env("RUST_LOG", "info,hami_node=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        *self.hami_node.lock().unwrap() = Some(hami_e2e::spawn_child(cmd).unwrap());
    }

    fn hami_node_log(&self) -> String {
        let n = *self.hami_node_starts.lock().unwrap();
        std::fs::read_to_string(self.node.root.join(format!("hami-node-{n}.log")))
            .unwrap_or_default()
    }
}

static SETUP: OnceLock<Option<Setup>> = OnceLock::new();

/// The cluster, its real node with the test image, and hami-node serving
/// it; None when the harness skips.
fn setup() -> Option<&'static Setup> {
    SETUP
        .get_or_init(|| {
            let cluster = hami_e2e::cluster(workspace_bin("hami-scheduler").to_str()?)?;
            let node = cluster.real_node()?;
            let a = common::artifacts();
            node.import_image(
                IMAGE,
                &[("/bin/cuda-probe", &a.probe)],
                &[&a.sim, &a.vgpu],
                &[],
            )
            .expect("importing the test image");
            let devices = node.root.join("sim-devices");
            std::fs::write(&devices, CARDS.join("\n") + "\n").unwrap();
            let s = |v: &Path| v.display().to_string();
            let args = vec![
                format!("--node-name={}", node.name),
                format!("--kubeconfig={}", s(&cluster.kubeconfig)),
                format!("--sim-devices={}", s(&devices)),
                format!("--nvml-lib={}", s(&a.sim)),
                format!("--hook-path={}", s(&node.root.join("hook"))),
                format!("--lib-source={}", s(&a.vgpu)),
                "--rescan-period=2s".to_string(),
            ];
            let setup = Setup {
                cluster,
                node,
                hami_node: Mutex::new(None),
                hami_node_args: args,
                hami_node_starts: Mutex::new(0),
            };
            setup.start_hami_node();
            Some(setup)
        })
        .as_ref()
}

fn allocatable_gpus(n: &Node) -> u64 {
    n.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("nvidia.com/gpu"))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

/// Waits until the kubelet offers every slot and the scheduler can use the
/// node (registered, handshake answered).
async fn wait_node_serves(s: &Setup) {
    let nodes: Api<Node> = Api::all(s.cluster.client().await);
    let name = s.node.name.clone();
    wait_for(WAIT, "the real node offering nvidia.com/gpu", || async {
        let n = nodes.get(&name).await.ok()?;
        let a = n.metadata.annotations.clone().unwrap_or_default();
        (allocatable_gpus(&n) == CARDS.len() as u64 * SPLIT
            && a.contains_key(ann::NODE_NVIDIA_REGISTER)
            && a.get(ann::NODE_HANDSHAKE).is_some_and(|h| h.starts_with("Reported")))
        .then_some(())
    })
    .await;
}

/// A pod of the test image on the real node, running `command`.
fn probe_pod(ns: &TestNs, name: &str, limits: Value, command: &[&str]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns.name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": hami_e2e::REAL_NODE},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": IMAGE, "imagePullPolicy": "Never",
                "command": command,
                "resources": {"limits": limits},
            }],
        },
    })
}

fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// Waits until the pod has ended; returns it and its log.
async fn wait_finished(s: &Setup, ns: &TestNs, name: &str) -> (Pod, String) {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let pod = wait_for(WAIT, &format!("pod {name} to finish"), || async {
        let p = pods.get(name).await.ok()?;
        matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p)
    })
    .await;
    let log = pods
        .logs(name, &LogParams::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "log of {name}: {e}\nkubelet:\n{}",
                s.node.kubelet_log_tail(30)
            )
        });
    (pod, log)
}

/// The `<command> <rc> ...` line of the probe's output for `command`
/// (the n-th such line).
fn line<'a>(log: &'a str, command: &str, n: usize) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.split_whitespace().next() == Some(command))
        .nth(n)
        .unwrap_or_else(|| panic!("no {command} line #{n} in:\n{log}"))
        .split_whitespace()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_through_webhook_scheduler_kubelet_and_allocate_runs_limited() {
    let Some(s) = setup() else { return };
    wait_node_serves(s).await;
    let ns = s.cluster.namespace("real-limited").await;
    let pod = probe_pod(
        &ns,
        "limited",
        json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 3000}),
        &[
            "/bin/cuda-probe",
            "init",
            "alloc",
            "2999m",
            "free",
            "0",
            "alloc",
            "3001m",
            "nvml-mem",
            "0",
            "meminfo",
        ],
    );
    ns.create_pod(pod).await.expect("creating the pod");
    let (pod, log) = wait_finished(s, &ns, "limited").await;
    let context = || {
        format!(
            "log:\n{log}\nhami-node:\n{}\nkubelet:\n{}",
            s.hami_node_log(),
            s.node.kubelet_log_tail(20)
        )
    };
    assert_eq!(phase(&pod), "Succeeded", "{}", context());
    assert_eq!(line(&log, "alloc", 0)[1], "0", "2,999 MiB fits: {}", context());
    assert_eq!(
        line(&log, "alloc", 1)[1],
        "2",
        "3,001 MiB is over the limit (CUDA_ERROR_OUT_OF_MEMORY): {}",
        context()
    );
    let nvml = line(&log, "nvml-mem", 0);
    assert_eq!(nvml[1], "0", "{}", context());
    assert_eq!(nvml[2], (3000u64 << 20).to_string(), "NVML total in the container");
    let meminfo = line(&log, "meminfo", 0);
    assert_eq!(meminfo[3], (3000u64 << 20).to_string(), "CUDA total in the container");
    assert_eq!(
        TestNs::annotation(&pod, ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    let node = Api::<Node>::all(ns.client.clone())
        .get(&s.node.name)
        .await
        .unwrap();
    assert!(
        !node
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(ann::NODE_LOCK),
        "the node lock is released"
    );
}
