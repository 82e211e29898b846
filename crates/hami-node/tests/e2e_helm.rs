//! The Helm chart installed as an operator would: onto a cluster with a
//! real node (kubelet, containerd with NRI, runc) and nothing of hami-rs
//! on it, from images built out of deploy/images/Dockerfile, with HAMi's
//! own values file (plus the paths of this test node). A GPU pod then runs
//! limited to its share, and `helm uninstall` leaves nothing behind.

mod real_node;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hami_e2e::image::{self, Layer, Process};
use hami_e2e::{Cluster, RealNode, wait_for};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams, Patch, PatchParams};
use real_node::{CARDS, allocatable_gpus, common, line, phase, probe_pod, workspace_bin};
use serde_json::json;

const RELEASE: &str = "hami";
const NAMESPACE: &str = "kube-system";
const INSTALL_WAIT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/hami-rs")
}

/// A tool that deploy/helm/check.sh installs (`helm` or `kubectl`).
fn tool(which: &str) -> PathBuf {
    let out = Command::new(repo().join("deploy/helm/check.sh"))
        .arg(format!("--print-{which}"))
        .output()
        .expect("running deploy/helm/check.sh");
    assert!(
        out.status.success(),
        "deploy/helm/check.sh --print-{which}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(Path::new(&path).is_file(), "no {which} at {path:?}");
    PathBuf::from(path)
}

/// Runs `bin args` against the cluster; its stdout, or a panic with both
/// streams.
fn run(bin: &Path, cluster: &Cluster, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("HELM_CACHE_HOME", cluster.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", cluster.dir.join("helm/config"))
        .env("HELM_DATA_HOME", cluster.dir.join("helm/data"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}{}",
        bin.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The values this test adds to HAMi's file: where this node keeps what a
/// node keeps under /var/lib/kubelet and /var/run, and sim-gpu's cards.
fn node_values(node: &RealNode, cluster: &Cluster) -> PathBuf {
    let cards: Vec<String> = CARDS.iter().map(|c| format!("      - {c:?}\n")).collect();
    let text = format!(
        "global:\n  gpuHookPath: {hook}\nkubeletRootDir: {root}/kubelet\nnri:\n  socketPath: {nri}\ndevicePlugin:\n  monitorCleanupGrace: 2s\n  simulate:\n    enabled: true\n    devices:\n{cards}",
        hook = node.root.join("hook").display(),
        root = node.root.display(),
        nri = node.nri_socket.display(),
        cards = cards.concat(),
    );
    let path = cluster.dir.join("node-values.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The images the rendered chart runs.
fn images_of(manifests: &str) -> BTreeSet<String> {
    manifests
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(|i| i.trim().trim_matches('"').to_string())
        .collect()
}

/// Builds and imports every image the chart runs: ours from the
/// Dockerfile's runtime stages, kube-scheduler from the cluster's binary.
fn import_images(node: &RealNode, cluster: &Cluster, images: &BTreeSet<String>) {
    let dockerfile =
        std::fs::read_to_string(repo().join("deploy/images/Dockerfile")).expect("the Dockerfile");
    let stages = image::runtime_stages(&dockerfile).expect("the Dockerfile's runtime stages");
    let a = common::artifacts();
    let node_bin = PathBuf::from(env!("CARGO_BIN_EXE_hami-node"));
    let scheduler_bin = workspace_bin("hami-scheduler");
    let certgen_bin = workspace_bin("hami-certgen");
    let uninstall_bin = workspace_bin("hami-uninstall");
    let artifact = |file: &str| -> Option<PathBuf> {
        Some(match file {
            "hami-node" => node_bin.clone(),
            "hami-scheduler" => scheduler_bin.clone(),
            "hami-certgen" => certgen_bin.clone(),
            "hami-uninstall" => uninstall_bin.clone(),
            "libsim_gpu.so" => a.sim.clone(),
            "libvgpu.so" => a.vgpu.clone(),
            _ => return None,
        })
    };
    for name in images {
        let repository = name.rsplit_once(':').map_or(name.as_str(), |(r, _)| r);
        let stage = |n: &str| stages.iter().find(|s| s.name == n).unwrap();
        if repository.ends_with("/kube-scheduler") {
            // registry.k8s.io/kube-scheduler holds the binary on its PATH.
            let layer = Layer::new()
                .file(
                    "/usr/local/bin/kube-scheduler",
                    &cluster.k8s_bin().join("kube-scheduler"),
                    0o755,
                )
                .unwrap()
                .dir("tmp", 0o1777);
            let process = Process {
                env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
                ..Default::default()
            };
            node.import_layer(name, &layer, &process).unwrap();
            continue;
        }
        let s = if repository.ends_with("/hami-scheduler") {
            stage("scheduler")
        } else if repository.ends_with("/hami-node") {
            stage("node")
        } else {
            panic!("the chart runs an image this test cannot build: {name}");
        };
        let layer = s
            .layer(&artifact)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        node.import_layer(name, &layer, &s.process)
            .unwrap_or_else(|e| panic!("importing {name}: {e:#}"));
    }
}

/// Everything that exists in the release's namespace and at cluster scope,
/// as `kind/name` (events and the nodes themselves aside).
fn inventory(kubectl: &Path, cluster: &Cluster) -> BTreeSet<String> {
    let kinds = |namespaced: bool| -> String {
        run(
            kubectl,
            cluster,
            &[
                "api-resources",
                "--verbs=list",
                &format!("--namespaced={namespaced}"),
                "-o",
                "name",
            ],
        )
        .lines()
        .filter(|k| !k.starts_with("events") && !matches!(*k, "nodes" | "namespaces"))
        .filter(|k| !k.starts_with("componentstatuses"))
        .collect::<Vec<_>>()
        .join(",")
    };
    let mut all = BTreeSet::new();
    for (namespaced, ns_args) in [(true, vec!["-n", NAMESPACE]), (false, vec![])] {
        let k = kinds(namespaced);
        let mut args = vec!["get", k.as_str(), "-o", "name", "--ignore-not-found"];
        args.extend(ns_args);
        all.extend(run(kubectl, cluster, &args).lines().map(str::to_string));
    }
    all
}

/// `kubectl port-forward <target> :<remote>`; the child and the local port
/// it listens on (from its "Forwarding from" line).
fn port_forward(
    kubectl: &Path,
    cluster: &Cluster,
    target: &str,
    remote: u16,
) -> (std::process::Child, u16) {
    use std::io::BufRead as _;
    let mut child = Command::new(kubectl)
        .args(["port-forward", "-n", NAMESPACE, target])
        .arg(format!(":{remote}"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("running kubectl port-forward");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("reading kubectl port-forward");
    // "Forwarding from 127.0.0.1:43109 -> 9396"
    let port = line
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("kubectl port-forward said {line:?}"));
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, port)
}

/// The body of `GET path` on 127.0.0.1:`port` (empty on any failure).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// Files (not dirs) under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn hami_annotations(n: &Node) -> Vec<String> {
    n.metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .filter(|k| k.starts_with("hami.io/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_with_a_hami_values_file_runs_a_limited_gpu_pod_and_uninstalls_clean() {
    let Some(cluster) = hami_e2e::deploy_cluster() else {
        return;
    };
    let Some(node) = cluster.real_node() else {
        return;
    };
    let (helm, kubectl) = (tool("helm"), tool("kubectl"));
    let client = cluster.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    // The chart's node agent runs on nodes labelled as HAMi's chart wants.
    nodes
        .patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"gpu": "on"}}})),
        )
        .await
        .unwrap();
    let hami_values = chart().join("ci/hami-defaults.yaml");
    let ours = node_values(node, cluster);
    let (hami_values, ours) = (hami_values.to_str().unwrap(), ours.to_str().unwrap());
    let chart_dir = chart();
    let chart_dir = chart_dir.to_str().unwrap();
    let values = ["-f", hami_values, "-f", ours];

    // Render against this cluster's version, then check it server-side.
    let mut template = vec!["template", RELEASE, chart_dir, "-n", NAMESPACE];
    template.extend(values);
    template.push("--kube-version=v1.34.2");
    let manifests = run(&helm, cluster, &template);
    let rendered = cluster.dir.join("rendered.yaml");
    std::fs::write(&rendered, &manifests).unwrap();
    run(
        &kubectl,
        cluster,
        &[
            "apply",
            "--dry-run=server",
            "-n",
            NAMESPACE,
            "-f",
            rendered.to_str().unwrap(),
        ],
    );

    let images = images_of(&manifests);
    assert!(
        images
            .iter()
            .any(|i| i.starts_with("registry.k8s.io/kube-scheduler:v1.34.2")
                || i.contains("kube-scheduler:v1.34.2")),
        "kube-scheduler follows the cluster's version: {images:?}"
    );
    import_images(node, cluster, &images);
    real_node::import_test_image(node);

    // What an uninstalled HAMi leaves behind: its kube-scheduler's Lease
    // and its certificate Job's Opaque Secret, both with the names HAMi's
    // chart gives them. The install goes over them.
    let leftovers = json!([
        {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
         "metadata": {"name": "hami-scheduler", "namespace": NAMESPACE}},
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": "hami-scheduler-tls", "namespace": NAMESPACE},
         "data": {"cert": "eA==", "key": "eA=="}},
    ]);
    let leftovers_file = cluster.dir.join("hami-leftovers.json");
    std::fs::write(
        &leftovers_file,
        json!({"apiVersion": "v1", "kind": "List", "items": leftovers}).to_string(),
    )
    .unwrap();
    run(
        &kubectl,
        cluster,
        &["create", "-f", leftovers_file.to_str().unwrap()],
    );
    let before = inventory(&kubectl, cluster);
    let mut install = vec!["install", RELEASE, chart_dir, "-n", NAMESPACE];
    install.extend(values);
    install.extend(["--wait", "--timeout", "5m"]);
    let notes = run(&helm, cluster, &install);
    assert!(notes.contains("STATUS: deployed"), "{notes}");

    // The agent registers the simulated cards and the scheduler answers.
    let split = 10; // HAMi's deviceSplitCount default, from its values file
    let name = node.name.clone();
    wait_for(
        INSTALL_WAIT,
        "the chart's agent to register the cards",
        || async {
            let n = nodes.get(&name).await.ok()?;
            let a = n.metadata.annotations.clone().unwrap_or_default();
            (allocatable_gpus(&n) == CARDS.len() as u64 * split
                && a.get("hami.io/node-handshake")
                    .is_some_and(|h| h.starts_with("Reported")))
            .then_some(())
        },
    )
    .await;

    // A GPU pod with HAMi's resource names, no scheduler named: the
    // chart's webhook sends it to the chart's scheduler, which places it,
    // and the agent limits it to 300 MiB.
    let ns = cluster.namespace("helm").await;
    let pod = probe_pod(
        &ns,
        "limited",
        json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 300}),
        &[
            "/bin/cuda-probe",
            "init",
            "alloc",
            "299m",
            "free",
            "0",
            "alloc",
            "301m",
            "nvml-mem",
            "0",
        ],
    );
    ns.create_pod(pod).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let done = wait_for(INSTALL_WAIT, "the GPU pod to finish", || async {
        let p = pods.get("limited").await.ok()?;
        matches!(phase(&p).as_str(), "Succeeded" | "Failed").then_some(p)
    })
    .await;
    let log = pods
        .logs("limited", &LogParams::default())
        .await
        .unwrap_or_default();
    assert_eq!(
        done.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()),
        Some("hami-scheduler"),
        "the chart's webhook names the chart's scheduler"
    );
    assert_eq!(phase(&done), "Succeeded", "{log}");
    assert_eq!(line(&log, "alloc", 0)[1], "0", "under its limit: {log}");
    assert_eq!(line(&log, "alloc", 1)[1], "2", "over its limit: {log}");
    assert_eq!(
        line(&log, "nvml-mem", 0)[2],
        (300u64 << 20).to_string(),
        "nvidia-smi's total is its limit: {log}"
    );

    // The dashboard, as NOTES.txt says to reach it (a port-forward to the
    // scheduler pod's loopback), shows the real node's cards with live
    // usage read from the chart's node monitor.
    let (mut forward, port) = port_forward(&kubectl, cluster, "deploy/hami-scheduler", 9396);
    let page = http_get(port, "/ui");
    assert!(page.contains("hami-rs"), "{page}");
    let node_name = node.name.clone();
    wait_for(
        Duration::from_secs(90),
        "live usage of the real node's cards",
        || {
            let body = http_get(port, "/api/v1/nodes");
            let nodes: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let cards = nodes["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["name"] == node_name.as_str())
                .and_then(|n| n["cards"].as_array().cloned())
                .unwrap_or_default();
            let ready = cards.len() == CARDS.len() && cards.iter().all(|c| c["usage"].is_object());
            async move { ready.then_some(()) }
        },
    )
    .await;
    let _ = forward.kill();
    let _ = forward.wait();

    // Uninstall once the pod is gone and the monitor has dropped its dir.
    drop(ns);
    let vgpu = node.root.join("hook/vgpu");
    wait_for(
        INSTALL_WAIT,
        "the monitor to drop the pod's dir",
        || async {
            std::fs::read_dir(vgpu.join("containers"))
                .map_or(true, |mut d| d.next().is_none())
                .then_some(())
        },
    )
    .await;
    // The agent's log through its stop, for the failure messages below.
    let agent_log = cluster.dir.join("hami-node-pod.log");
    let mut follow = Command::new(&kubectl)
        .args(["logs", "-f", "-n", NAMESPACE, "daemonset/hami-node"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(std::fs::File::create(&agent_log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    run(
        &helm,
        cluster,
        &[
            "uninstall",
            RELEASE,
            "-n",
            NAMESPACE,
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    // Garbage collection (the certificate Secret, the hook Jobs' pods) is
    // asynchronous: wait until the inventory is back to what it was.
    let left = wait_for(
        Duration::from_secs(120),
        "uninstall to leave nothing",
        || async {
            let now = inventory(&kubectl, cluster);
            let extra: Vec<String> = now.difference(&before).cloned().collect();
            extra.is_empty().then_some(now)
        },
    )
    .await;
    assert!(left.is_subset(&before));
    let _ = follow.kill();
    let _ = follow.wait();
    let agent_log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let agent_tail: String = agent_log
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    let n = nodes.get(&name).await.unwrap();
    let writers: Vec<String> = n
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| format!("{:?} {:?} {:?}", m.manager, m.operation, m.time))
        .collect();
    assert_eq!(
        hami_annotations(&n),
        Vec::<String>::new(),
        "no registration, handshake, mode or lock annotation is left: {:?}, written by {writers:?}",
        n.metadata.annotations
    );
    let files = files_under(&node.root.join("hook"));
    assert!(
        files.is_empty(),
        "files left on the host: {files:?}\nhami-node's last lines:\n{agent_tail}"
    );
    let socket = Path::new(hami_e2e::DEVICE_PLUGIN_DIR).join("nvidia-gpu.sock");
    assert!(!socket.exists(), "the device-plugin socket is left");
}
