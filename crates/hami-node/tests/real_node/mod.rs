//! The real node as the hami-node scenarios and the real-node benchmark
//! use it: the shared cluster's real node, the test image, and hami-node
//! running on it as a host process with sim-gpu's cards.
#![allow(dead_code)]

#[path = "../../../hami-core/tests/common/mod.rs"]
pub mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use hami_api::annotations as ann;
use hami_e2e::{Cluster, RealNode, TestNs, wait_for};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams};
use serde_json::{Value, json};

pub const WAIT: Duration = Duration::from_secs(60);
/// The test image: busybox, cuda-probe and what it and the injected
/// libraries (interposer, simulated driver) load.
pub const IMAGE: &str = "localhost/hami-cuda:1";

/// The simulated cards of the node: `(memory, sms, uuid, name)`.
pub const CARDS: [&str; 4] = [
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000000 NVIDIA Sim 8GB",
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000001 NVIDIA Sim 8GB",
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000002 NVIDIA Sim 8GB",
    "8g 80 GPU-e2e00000-0000-4000-8000-000000000003 NVIDIA Sim 8GB",
];

/// A binary of another package of the workspace: next to this test's
/// dir when `cargo test --workspace` built it, else built here.
pub fn workspace_bin(name: &str) -> PathBuf {
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

pub struct Setup {
    pub cluster: &'static Cluster,
    pub node: &'static RealNode,
    /// Slots per card (the device config's `deviceSplitCount`).
    pub split: u64,
    pub hami_node: Mutex<Option<Child>>,
    hami_node_args: Vec<String>,
    hami_node_starts: Mutex<u32>,
}

impl Setup {
    pub fn start_hami_node(&self) {
        self.start_hami_node_with(&[]);
    }

    /// Stops hami-node and starts it again with `changed` flags
    /// (`--flag=value`, replacing the setup's value of that flag).
    pub fn restart_hami_node_with(&self, changed: &[&str]) {
        if let Some(mut c) = self.hami_node.lock().unwrap().take() {
            hami_e2e::kill_child(&mut c);
        }
        self.start_hami_node_with(changed);
    }

    fn start_hami_node_with(&self, changed: &[&str]) {
        let args = with_flags(&self.hami_node_args, changed);
        let mut n = self.hami_node_starts.lock().unwrap();
        *n += 1;
        let log = std::fs::File::create(self.node.root.join(format!("hami-node-{n}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hami-node"));
        cmd.args(&args)
            .env("RUST_LOG", "info,hami_node=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        *self.hami_node.lock().unwrap() = Some(hami_e2e::spawn_child(cmd).unwrap());
    }

    /// The running hami-node's monitor address, from its log.
    pub async fn monitor_address(&self) -> String {
        wait_for(WAIT, "hami-node's monitor listening", || async {
            let log = self.hami_node_log();
            log.lines()
                .rev()
                .find_map(|l| l.split("node monitor listening on ").nth(1))
                .map(|a| a.trim().to_string())
        })
        .await
    }

    pub fn hami_node_log(&self) -> String {
        let n = *self.hami_node_starts.lock().unwrap();
        std::fs::read_to_string(self.node.root.join(format!("hami-node-{n}.log")))
            .unwrap_or_default()
    }
}

impl Setup {
    /// The shared cluster, its real node with the test image, and hami-node
    /// serving it with `split` slots per card; None when the harness skips.
    pub fn start(split: u64) -> Option<Setup> {
        Setup::start_with(split, &[])
    }

    /// [`Setup::start`] with more hami-node flags.
    pub fn start_with(split: u64, extra: &[&str]) -> Option<Setup> {
        let cluster = hami_e2e::cluster(workspace_bin("hami-scheduler").to_str()?)?;
        let node = cluster.real_node()?;
        let a = common::artifacts();
        import_test_image(node);
        let devices = node.root.join("sim-devices");
        std::fs::write(&devices, CARDS.join("\n") + "\n").unwrap();
        let device_config = node.root.join("device-config.yaml");
        std::fs::write(
            &device_config,
            format!("nvidia:\n  deviceSplitCount: {split}\n"),
        )
        .unwrap();
        let s = |v: &Path| v.display().to_string();
        let args: Vec<String> = [
            format!("--node-name={}", node.name),
            format!("--kubeconfig={}", s(&cluster.kubeconfig)),
            format!("--sim-devices={}", s(&devices)),
            format!("--nvml-lib={}", s(&a.sim)),
            format!("--hook-path={}", s(&node.root.join("hook"))),
            format!("--lib-source={}", s(&a.vgpu)),
            format!("--device-config-file={}", s(&device_config)),
            "--rescan-period=2s".to_string(),
            "--monitor-address=127.0.0.1:0".to_string(),
            "--monitor-period=500ms".to_string(),
            "--monitor-cleanup-grace=2s".to_string(),
            format!("--pod-resources-socket={}", s(&node.pod_resources_socket)),
            format!("--nri-socket={}", s(&node.nri_socket)),
        ]
        .into();
        let args = with_flags(&args, extra);
        let setup = Setup {
            cluster,
            node,
            split,
            hami_node: Mutex::new(None),
            hami_node_args: args,
            hami_node_starts: Mutex::new(0),
        };
        setup.start_hami_node();
        Some(setup)
    }
}

/// Imports [`IMAGE`] into the node: busybox, cuda-probe and the shared
/// libraries it and the injected libraries (interposer, simulated driver)
/// load.
pub fn import_test_image(node: &RealNode) {
    let a = common::artifacts();
    node.import_image(
        IMAGE,
        &[("/bin/cuda-probe", &a.probe)],
        &[&a.sim, &a.vgpu],
        &[],
    )
    .expect("importing the test image");
}

/// `args` with each of `changed` (`--flag=value`) replacing that flag's
/// value, or added (hami-node refuses a flag given twice).
fn with_flags(args: &[String], changed: &[&str]) -> Vec<String> {
    let flag = |a: &str| a.split('=').next().unwrap_or(a).to_string();
    args.iter()
        .filter(|a| !changed.iter().any(|c| flag(c) == flag(a)))
        .cloned()
        .chain(changed.iter().map(|c| c.to_string()))
        .collect()
}

pub fn allocatable_gpus(n: &Node) -> u64 {
    n.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("nvidia.com/gpu"))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

/// Waits until the kubelet offers every slot and the scheduler can use the
/// node (registered, handshake answered).
pub async fn wait_node_serves(s: &Setup) {
    let nodes: Api<Node> = Api::all(s.cluster.client().await);
    let name = s.node.name.clone();
    wait_for(WAIT, "the real node offering nvidia.com/gpu", || async {
        let n = nodes.get(&name).await.ok()?;
        let a = n.metadata.annotations.clone().unwrap_or_default();
        (allocatable_gpus(&n) == CARDS.len() as u64 * s.split
            && a.contains_key(ann::NODE_NVIDIA_REGISTER)
            && a.get(ann::NODE_HANDSHAKE)
                .is_some_and(|h| h.starts_with("Reported")))
        .then_some(())
    })
    .await;
}

/// A pod of the test image on the real node, running `command`.
pub fn probe_pod(ns: &TestNs, name: &str, limits: Value, command: &[&str]) -> Value {
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

pub fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// Waits until the pod `name` of `ns` is Running; returns it.
pub async fn wait_running(ns: &TestNs, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(WAIT, &format!("pod {name} running"), || async {
        let p = pods.get(name).await.ok()?;
        (phase(&p) == "Running").then_some(p)
    })
    .await
}

/// Waits until the pod has ended; returns it and its log.
pub async fn wait_finished(s: &Setup, ns: &TestNs, name: &str) -> (Pod, String) {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let pod = wait_for(WAIT, &format!("pod {name} to finish"), || async {
        let p = pods.get(name).await.ok()?;
        matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p)
    })
    .await;
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.container_id.is_some()));
    if !started {
        // Rejected at admission (e.g. Allocate failed): no log to read.
        return (pod, String::new());
    }
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
pub fn line<'a>(log: &'a str, command: &str, n: usize) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.split_whitespace().next() == Some(command))
        .nth(n)
        .unwrap_or_else(|| panic!("no {command} line #{n} in:\n{log}"))
        .split_whitespace()
        .collect()
}

/// 50 GPU pods created at once onto the real node, each with its own
/// memory limit, all run limited to it (checked inside each container),
/// carry HAMi's node label, and the node's lock never appears (a watch of
/// the node sees every change), while a kwok node in HAMi's lock mode in
/// the same run gets the lock for its pods. Needs 25 slots per card.
pub async fn fifty_pods_at_once(s: &Setup, namespace: &str) {
    use futures::StreamExt as _;
    use hami_e2e::{GpuNode, LockWatch};
    const PODS: usize = 50;
    wait_node_serves(s).await;
    let mut ns = s.cluster.namespace(namespace).await;
    // A node in HAMi's lock mode (no allocation-mode annotation), run by kwok.
    let kwok = ns
        .add_node(&GpuNode::new("kwok-lock", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let real_locks = LockWatch::start(ns.client.clone(), &s.node.name).await;
    let kwok_locks = LockWatch::start(ns.client.clone(), &kwok).await;

    // Each real pod its own memory limit, so a pod given another's limits
    // shows it.
    let mib = |i: usize| 200 + 8 * i as u64;
    let mut pods = Vec::new();
    for i in 0..PODS {
        let m = mib(i);
        pods.push(probe_pod(
            &ns,
            &format!("p{i:02}"),
            json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": m}),
            &[
                "/bin/cuda-probe",
                "init",
                "alloc",
                &format!("{}m", m - 1),
                "free",
                "0",
                "alloc",
                &format!("{}m", m + 1),
                "nvml-mem",
                "0",
            ],
        ));
    }
    for i in 0..4 {
        pods.push(ns.gpu_pod(
            &format!("kwok{i}"),
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}),
            json!({}),
        ));
    }
    let created: Vec<_> = futures::stream::iter(pods)
        .map(|p| ns.create_pod(p))
        .buffer_unordered(16)
        .collect()
        .await;
    for c in created {
        c.expect("creating a pod");
    }

    for i in 0..PODS {
        let name = format!("p{i:02}");
        let (pod, log) = wait_finished(s, &ns, &name).await;
        let context = || format!("{name}: {log}\nhami-node:\n{}", s.hami_node_log());
        assert_eq!(phase(&pod), "Succeeded", "{}", context());
        // HAMi's node label, written by hami-node with its one patch.
        assert_eq!(
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("hami.io/vgpu-node"))
                .map(String::as_str),
            Some(s.node.name.as_str()),
            "{name}"
        );
        assert_eq!(
            line(&log, "alloc", 0)[1],
            "0",
            "under its limit: {}",
            context()
        );
        assert_eq!(
            line(&log, "alloc", 1)[1],
            "2",
            "1 MiB over its own {} MiB: {}",
            mib(i),
            context()
        );
        assert_eq!(
            line(&log, "nvml-mem", 0)[2],
            (mib(i) << 20).to_string(),
            "nvidia-smi's total is its own limit: {}",
            context()
        );
    }
    for i in 0..4 {
        let p = ns
            .wait_bound(&format!("kwok{i}"), Duration::from_secs(60))
            .await;
        assert_eq!(
            p.spec.and_then(|s| s.node_name).as_deref(),
            Some(kwok.as_str())
        );
    }
    let wait = Duration::from_secs(60);
    let (real_seen, kwok_seen) = (real_locks.stop(wait).await, kwok_locks.stop(wait).await);
    assert!(
        real_seen.is_empty(),
        "the lock-free real node was locked {} times, first {:?}",
        real_seen.len(),
        real_seen.first()
    );
    assert!(
        !kwok_seen.is_empty(),
        "the kwok node in lock mode never showed HAMi's lock"
    );
}
