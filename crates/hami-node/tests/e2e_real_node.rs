//! hami-node on a real node: the harness's kubelet, containerd and runc
//! (hami-e2e's `real_node`), the shared control plane with hami-scheduler
//! beside kube-scheduler and the webhook, and sim-gpu's cards. hami-node
//! runs as a host process with `--sim-devices`, which also plays the
//! NVIDIA container toolkit for the simulated driver (each GPU container
//! gets `libcuda.so.1` and only its own cards).
//!
//! Needs root, runc, the CNI plugins, a static busybox and gcc; skips with
//! the reason otherwise, unless HAMI_E2E_REQUIRE=1.

mod real_node;

use std::sync::OnceLock;
use std::time::Duration;

use hami_api::annotations as ann;
use hami_e2e::{TestNs, wait_for};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, LogParams};
use real_node::{
    CARDS, Setup, WAIT, line, phase, probe_pod, wait_finished, wait_node_serves, wait_running,
};
use serde_json::json;

static SETUP: OnceLock<Option<Setup>> = OnceLock::new();

/// The real node with 10 slots per card (HAMi's default split).
fn setup() -> Option<&'static Setup> {
    SETUP.get_or_init(|| Setup::start(10)).as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_through_webhook_scheduler_kubelet_and_allocate_runs_limited() {
    let Some((s, _node, ns)) = scenario("real-limited").await else {
        return;
    };
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
    assert_eq!(
        line(&log, "alloc", 0)[1],
        "0",
        "2,999 MiB fits: {}",
        context()
    );
    assert_eq!(
        line(&log, "alloc", 1)[1],
        "2",
        "3,001 MiB is over the limit (CUDA_ERROR_OUT_OF_MEMORY): {}",
        context()
    );
    let nvml = line(&log, "nvml-mem", 0);
    assert_eq!(nvml[1], "0", "{}", context());
    assert_eq!(
        nvml[2],
        (3000u64 << 20).to_string(),
        "NVML total in the container"
    );
    let meminfo = line(&log, "meminfo", 0);
    assert_eq!(
        meminfo[3],
        (3000u64 << 20).to_string(),
        "CUDA total in the container"
    );
    assert_eq!(
        TestNs::annotation(&pod, ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert_eq!(
        ns.node_lock(&s.node.name).await,
        None,
        "the node lock is released"
    );
}

/// The achieved share of device time of a `busy <ms> 1000` run (1 ms
/// kernels), in percent, and the fraction of it the probe was CPU-starved.
fn busy_share(log: &str) -> (f64, f64) {
    let l = line(log, "busy", 0);
    assert_eq!(l[1], "0", "{log}");
    let (n, elapsed, late): (f64, f64, f64) = (
        l[2].parse().unwrap(),
        l[3].parse().unwrap(),
        l[6].parse().unwrap(),
    );
    (100.0 * n * 1e6 / elapsed, late / elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_at_30_and_60_percent_of_one_card_get_their_shares_within_5_points() {
    let Some((s, _node, ns)) = scenario("real-cores").await else {
        return;
    };
    let card = CARDS[1].split_whitespace().nth(2).unwrap();
    // Both probes start their kernels when the test creates `go` in this
    // host directory: under the default core policy a pod alone on its
    // card is not held back, so a pod that started first would run
    // unpaced for as long as the other one took to start.
    let barrier = s.node.root.join(format!("barrier-{}", ns.name));
    std::fs::create_dir_all(&barrier).unwrap();
    for (name, cores) in [("cores-30", 30), ("cores-60", 60)] {
        let mut pod = probe_pod(
            &ns,
            name,
            json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000, "nvidia.com/gpucores": cores}),
            &[
                "/bin/cuda-probe",
                "init",
                "alloc",
                "10m",
                "wait-path",
                "/barrier/go",
                "120000",
                "busy",
                "4000",
                "1000",
            ],
        );
        pod["metadata"]["annotations"] = json!({ann::NVIDIA_USE_GPUUUID: card});
        pod["spec"]["volumes"] =
            json!([{"name": "barrier", "hostPath": {"path": barrier, "type": "Directory"}}]);
        pod["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "barrier", "mountPath": "/barrier", "readOnly": true}]);
        ns.create_pod(pod).await.expect("creating the pod");
    }
    // The go-ahead once the monitor has seen both processes on the card
    // (their memory in its metrics): from then on each is paced.
    let addr = s.monitor_address().await;
    wait_for(WAIT, "the monitor showing both pods", || async {
        let m = http_get(&addr, "/metrics");
        let seen = |pod| container_series(&m, "hami_vgpu_memory_used_bytes", &ns.name, pod);
        (seen("cores-30")? > 0.0 && seen("cores-60")? > 0.0).then_some(())
    })
    .await;
    std::fs::write(barrier.join("go"), "").unwrap();
    let mut results = Vec::new();
    for (name, want) in [("cores-30", 30.0), ("cores-60", 60.0)] {
        let (pod, log) = wait_finished(s, &ns, name).await;
        results.push((name, want, pod, log));
    }
    let mut report = String::new();
    let mut ok = true;
    for (name, want, pod, log) in &results {
        assert_eq!(phase(pod), "Succeeded", "{log}");
        assert_eq!(
            TestNs::allocation(pod).0[0][0].uuid,
            card,
            "both pods on one card"
        );
        assert_eq!(
            line(log, "wait-path", 0)[1],
            "0",
            "the go-ahead came: {log}"
        );
        let (got, starved) = busy_share(log);
        // Within 5 points of the quota (as hami-core's pacing tests; a probe
        // starved of CPU may fall short by `quota x starved` more): the
        // monitor scales what each container is charged by how much of
        // what it measured was waiting behind the other one.
        report.push_str(&format!(
            "{name}: {got:.1}% of the card, quota {want}% (CPU-starved {:.1}% of the run)\n",
            100.0 * starved
        ));
        ok &= got <= want + 5.0 && got >= want - 5.0 - want * starved;
    }
    eprint!("{report}");
    assert!(ok, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_pod_holds_the_low_priority_one_on_its_card_within_10_ms() {
    let Some((s, _node, ns)) = scenario("real-priority").await else {
        return;
    };
    let card = CARDS[3].split_whitespace().nth(2).unwrap();
    let limits = json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000});
    let mut low = probe_pod(
        &ns,
        "low",
        limits.clone(),
        &["/bin/cuda-probe", "init", "busy", "6000", "1000"],
    );
    low["metadata"]["annotations"] = json!({ann::NVIDIA_USE_GPUUUID: card});
    ns.create_pod(low)
        .await
        .expect("creating the low-priority pod");
    wait_running(&ns, "low").await;
    // The high-priority process allocates first (its slot says priority 0),
    // then waits past a monitor scan (500 ms) before its kernels start.
    let mut high = probe_pod(
        &ns,
        "high",
        limits,
        &[
            "/bin/cuda-probe",
            "init",
            "alloc",
            "10m",
            "sleep",
            "1500",
            "busy",
            "1500",
            "1000",
        ],
    );
    high["metadata"]["annotations"] = json!({ann::NVIDIA_USE_GPUUUID: card});
    high["spec"]["containers"][0]["env"] = json!([{"name": "CUDA_TASK_PRIORITY", "value": "0"}]);
    ns.create_pod(high)
        .await
        .expect("creating the high-priority pod");
    let (high_pod, high_log) = wait_finished(s, &ns, "high").await;
    let (low_pod, low_log) = wait_finished(s, &ns, "low").await;
    assert_eq!(phase(&high_pod), "Succeeded", "{high_log}");
    assert_eq!(phase(&low_pod), "Succeeded", "{low_log}");
    for p in [&high_pod, &low_pod] {
        assert_eq!(TestNs::allocation(p).0[0][0].uuid, card, "both on one card");
    }
    let h = line(&high_log, "busy", 0);
    let l = line(&low_log, "busy", 0);
    let num = |v: &str| v.parse::<u64>().unwrap();
    let (high_start, high_end) = (num(h[4]), num(h[5]));
    let (low_end, gap_start, gap_end) = (num(l[5]), num(l[7]), num(l[8]));
    assert!(
        low_end > high_end,
        "the high-priority run must fall inside the low one's: {high_log}\n{low_log}"
    );
    let ms = |ns: i128| ns as f64 / 1e6;
    // The low-priority process's longest wait between two launches is the
    // hold: its last launch before it is at most 10 ms after the first
    // high-priority launch (it may be before: the probe launches in bursts
    // of 8 and then waits for the card), and it ends about --priority-idle
    // (100 ms) after the last high-priority launch.
    let paused_after = ms(gap_start as i128 - high_start as i128);
    let resumed_after = ms(gap_end as i128 - high_end as i128);
    let report = format!(
        "held {paused_after:.1} ms after the first high-priority launch, for {:.0} ms; resumed {resumed_after:.1} ms after the last",
        ms((gap_end - gap_start) as i128)
    );
    eprintln!("{report}");
    assert!(paused_after <= 10.0, "{report}");
    assert!(gap_end - gap_start >= high_end - high_start, "{report}");
    assert!((90.0..=200.0).contains(&resumed_after), "{report}");
    assert!(
        s.hami_node_log().contains("holding low-priority launches"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_default_core_policy_only_a_shared_card_is_paced() {
    let Some((s, _node, ns)) = scenario("real-policy").await else {
        return;
    };
    let pinned = |name: &str, card: &str, command: &[&str]| {
        let mut pod = probe_pod(
            &ns,
            name,
            json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000, "nvidia.com/gpucores": 30}),
            command,
        );
        pod["metadata"]["annotations"] = json!({ann::NVIDIA_USE_GPUUUID: card});
        pod
    };
    let (lone_card, shared_card) = (
        CARDS[0].split_whitespace().nth(2).unwrap(),
        CARDS[2].split_whitespace().nth(2).unwrap(),
    );
    // Alone on its card: 30 % cores, not paced once the monitor (500 ms
    // scans) says so.
    let busy = ["/bin/cuda-probe", "init", "busy", "3000", "1000"];
    ns.create_pod(pinned("alone", lone_card, &busy))
        .await
        .unwrap();
    // Beside a running container that holds the same card: paced.
    ns.create_pod(pinned("holder", shared_card, &["/bin/sleep", "3600"]))
        .await
        .unwrap();
    wait_running(&ns, "holder").await;
    ns.create_pod(pinned("shared", shared_card, &busy))
        .await
        .unwrap();
    let (alone, alone_log) = wait_finished(s, &ns, "alone").await;
    let (shared, shared_log) = wait_finished(s, &ns, "shared").await;
    assert_eq!(phase(&alone), "Succeeded", "{alone_log}");
    assert_eq!(phase(&shared), "Succeeded", "{shared_log}");
    let (got_alone, _) = busy_share(&alone_log);
    let (got_shared, _) = busy_share(&shared_log);
    let report =
        format!("alone: {got_alone:.1}% of the card, shared: {got_shared:.1}% (quota 30%)");
    eprintln!("{report}");
    assert!(got_alone > 50.0, "{report}");
    assert!(got_shared <= 35.0, "{report}");
    assert!(
        s.hami_node_log()
            .contains("the container is alone on its cards"),
        "{report}"
    );
}

/// The containerd id of the pod's first container.
fn container_id(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .and_then(|id| id.strip_prefix("containerd://").map(str::to_string))
        .expect("a running container's id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_execd_without_the_pods_environment_is_held_to_the_limit() {
    let Some((s, _node, ns)) = scenario("real-exec").await else {
        return;
    };
    // The container's own process holds 1,000 of its 2,000 MiB.
    let pod = probe_pod(
        &ns,
        "exec",
        json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 2000}),
        &["/bin/cuda-probe", "init", "alloc", "1000m", "hold"],
    );
    ns.create_pod(pod).await.expect("creating the pod");
    let pod = wait_running(&ns, "exec").await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(WAIT, "the container's 1,000 MiB allocated", || async {
        let log = pods.logs("exec", &LogParams::default()).await.ok()?;
        log.lines()
            .any(|l| l == "alloc 0" || l.starts_with("alloc 0 "))
            .then_some(())
    })
    .await;
    let id = container_id(&pod);
    // The runtime's exec, with an empty environment: no
    // CUDA_DEVICE_MEMORY_LIMIT_0, no CUDA_DEVICE_MEMORY_SHARED_CACHE, no
    // NVIDIA_VISIBLE_DEVICES, no PATH. It finds the limits file beside the
    // interposer, and through it the container's region: the 1,000 MiB
    // already held count against it.
    let out = s
        .node
        .ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "no-env",
            &id,
            "/bin/env",
            "-i",
            "/bin/cuda-probe",
            "init",
            "alloc",
            "1001m",
            "alloc",
            "999m",
            "nvml-mem",
            "0",
        ])
        .expect("exec in the container");
    assert_eq!(
        line(&out, "alloc", 0)[1],
        "2",
        "1,001 MiB more is over the container's 2,000: {out}"
    );
    assert_eq!(line(&out, "alloc", 1)[1], "0", "999 MiB more fits: {out}");
    assert_eq!(
        line(&out, "nvml-mem", 0)[2],
        (2000u64 << 20).to_string(),
        "{out}"
    );
}

/// Creates, in a namespace the webhook ignores, a pod bound to the real
/// node exactly as HAMi's scheduler leaves it (its annotations, the node
/// lock, `spec.nodeName`), asking for `card`'s `mem` MiB.
async fn bound_as_hamis_scheduler_would(s: &Setup, ns: &TestNs, name: &str, card: &str, mem: u64) {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Patch, PatchParams};
    Api::<Namespace>::all(ns.client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {ann::WEBHOOK_LABEL: "ignore"}}})),
        )
        .await
        .unwrap();
    let now = jiff::Timestamp::now();
    let lock = format!("{},{},{name}", now.strftime("%Y-%m-%dT%H:%M:%SZ"), ns.name);
    Api::<Node>::all(ns.client.clone())
        .patch(
            &s.node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ann::NODE_LOCK: lock}}})),
        )
        .await
        .unwrap();
    let devices = format!("{card},NVIDIA,{mem},0:;");
    let mut pod = probe_pod(
        ns,
        name,
        json!({"nvidia.com/gpu": 1}),
        &[
            "/bin/cuda-probe",
            "init",
            "alloc",
            &format!("{}m", mem - 1),
            "free",
            "0",
            "alloc",
            &format!("{}m", mem + 1),
        ],
    );
    pod["metadata"]["labels"] = json!({ann::WEBHOOK_LABEL: "ignore"});
    pod["metadata"]["annotations"] = json!({
        ann::VGPU_NODE: s.node.name,
        ann::VGPU_TIME: now.as_second().to_string(),
        ann::BIND_TIME: now.as_second().to_string(),
        ann::BIND_PHASE: "allocating",
        ann::NVIDIA_DEVICES_TO_ALLOCATE: devices,
        ann::NVIDIA_DEVICES_ALLOCATED: devices,
    });
    pod["spec"]["nodeName"] = json!(s.node.name);
    pod["spec"]["schedulerName"] = json!("hami-scheduler");
    pod["spec"].as_object_mut().unwrap().remove("nodeSelector");
    ns.create_pod(pod).await.expect("creating the bound pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_bound_with_hamis_annotations_alone_allocates_and_one_naming_no_card_fails() {
    let Some((s, _node, ns)) = scenario("real-interop").await else {
        return;
    };
    let card = CARDS[2].split_whitespace().nth(2).unwrap();
    bound_as_hamis_scheduler_would(s, &ns, "interop", card, 1500).await;
    let (pod, log) = wait_finished(s, &ns, "interop").await;
    assert_eq!(phase(&pod), "Succeeded", "{log}\n{}", s.hami_node_log());
    assert_eq!(line(&log, "alloc", 0)[1], "0", "{log}");
    assert_eq!(
        line(&log, "alloc", 1)[1],
        "2",
        "over HAMi's 1500 MiB: {log}"
    );
    assert_eq!(
        TestNs::annotation(&pod, ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert_eq!(ns.node_lock(&s.node.name).await, None, "lock released");

    // A card this node does not have: without the lock, Allocate does not
    // know the pod; its container's start fails at PreStartContainer, the
    // bind is marked failed with an event naming the card, the lock goes,
    // and the container never runs.
    bound_as_hamis_scheduler_would(s, &ns, "no-card", "GPU-not-on-this-node", 1000).await;
    let why = wait_for(WAIT, "an event naming the card", || async {
        ns.events_for("no-card")
            .await
            .into_iter()
            .filter_map(|e| e.message)
            .find(|m| m.contains("GPU-not-on-this-node"))
    })
    .await;
    assert!(why.contains("pod real-interop"), "{why}");
    let pod = wait_for(WAIT, "bind-phase failed", || async {
        let p = ns.get_pod("no-card").await;
        (TestNs::annotation(&p, ann::BIND_PHASE).as_deref() == Some("failed")).then_some(p)
    })
    .await;
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.container_id.is_some()));
    assert!(!started, "the container was created: {:?}", pod.status);
    wait_for(WAIT, "the node lock released", || async {
        ns.node_lock(&s.node.name).await.is_none().then_some(())
    })
    .await;
    Api::<Pod>::namespaced(ns.client.clone(), &ns.name)
        .delete("no-card", &Default::default())
        .await
        .expect("deleting the pod that cannot start");
}

/// The real node ready for one scenario: the setup, the node to this test
/// alone (held until the guard drops), its cards served, and a fresh
/// namespace named after `ns`; None when the harness skips.
async fn scenario(
    ns: &str,
) -> Option<(&'static Setup, tokio::sync::MutexGuard<'static, ()>, TestNs)> {
    let s = setup()?;
    let guard = serial().await;
    wait_node_serves(s).await;
    let ns = s.cluster.namespace(ns).await;
    Some((s, guard, ns))
}

/// One test at a time on the node: some stop the kubelet or hami-node or
/// hold the node lock, and shares of device time are measured.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_and_hami_node_restarts_lose_nothing() {
    let Some((s, _node, ns)) = scenario("real-restart").await else {
        return;
    };
    let limits = json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000});
    let probe = ["/bin/cuda-probe", "init", "alloc", "1001m"];

    // The kubelet restarts: its registration socket is new, hami-node
    // registers again, the slots come back, and a new pod runs limited.
    s.node.kill_kubelet();
    s.node.start_kubelet().unwrap();
    let registered_again = "hami-node registering with the new kubelet";
    wait_for(WAIT, registered_again, || async {
        (s.hami_node_log()
            .matches("serving and registered with")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    wait_node_serves(s).await;
    ns.create_pod(probe_pod(&ns, "after-kubelet", limits.clone(), &probe))
        .await
        .unwrap();
    let (pod, log) = wait_finished(s, &ns, "after-kubelet").await;
    assert_eq!(phase(&pod), "Succeeded", "{log}");
    assert_eq!(line(&log, "alloc", 0)[1], "2", "limited: {log}");

    // hami-node is killed while a pod it allocated runs, and starts again:
    // the running pod keeps its limits, and a new pod runs limited.
    let running = probe_pod(
        &ns,
        "across-agent",
        limits.clone(),
        &[
            "/bin/cuda-probe",
            "init",
            "ready",
            "sleep",
            "3000",
            "alloc",
            "1001m",
        ],
    );
    ns.create_pod(running).await.unwrap();
    wait_running(&ns, "across-agent").await;
    if let Some(mut c) = s.hami_node.lock().unwrap().take() {
        hami_e2e::kill_child(&mut c);
    }
    s.start_hami_node();
    wait_for(WAIT, "the new hami-node registering", || async {
        s.hami_node_log()
            .contains("serving and registered with")
            .then_some(())
    })
    .await;
    let (pod, log) = wait_finished(s, &ns, "across-agent").await;
    assert_eq!(phase(&pod), "Succeeded", "{log}");
    assert_eq!(line(&log, "alloc", 0)[1], "2", "still limited: {log}");
    wait_node_serves(s).await;
    ns.create_pod(probe_pod(&ns, "after-agent", limits, &probe))
        .await
        .unwrap();
    let (pod, log) = wait_finished(s, &ns, "after-agent").await;
    assert_eq!(phase(&pod), "Succeeded", "{log}");
    assert_eq!(line(&log, "alloc", 0)[1], "2", "limited: {log}");
    assert_eq!(
        ns.node_lock(&s.node.name).await,
        None,
        "no lock left behind"
    );
}

/// `GET path` from the monitor, the body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(addr).expect("connecting to the monitor");
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// The value of `metric` for the pod's container `main`, device index 0.
fn container_series(metrics: &str, metric: &str, ns: &str, pod: &str) -> Option<f64> {
    let prefix = format!(
        "{metric}{{namespace=\"{ns}\",pod=\"{pod}\",container=\"main\",vdevice_index=\"0\",device_uuid=\"GPU-"
    );
    metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_shows_each_pods_usage_frees_a_killed_process_and_forgets_the_pod() {
    let Some((s, _node, ns)) = scenario("real-monitor").await else {
        return;
    };
    let addr = s.monitor_address().await;
    // The container's own process uses no CUDA: what the exec'd process
    // leaves behind is nobody's once it is killed.
    let pod = probe_pod(
        &ns,
        "mon",
        // A cores limit: the pacer measures kernel time only when there is
        // a quota (alone on its card, it measures but does not hold back).
        json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 3000, "nvidia.com/gpucores": 50}),
        &["/bin/sleep", "3600"],
    );
    ns.create_pod(pod).await.expect("creating the pod");
    let pod = wait_running(&ns, "mon").await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let id = container_id(&pod);
    let uid = pod.metadata.uid.clone().unwrap();
    s.node
        .ctr(&[
            "tasks",
            "exec",
            "--detach",
            "--exec-id",
            "hog",
            &id,
            "/bin/cuda-probe",
            "init",
            "alloc",
            "1000m",
            "busy",
            "4000",
            "1000",
            "hold",
        ])
        .expect("exec in the container");
    let get = || http_get(&addr, "/metrics");
    let mib = |v: f64| (v / 1048576.0).round() as u64;
    // Memory and limit, with the pod's namespace, name and container.
    wait_for(WAIT, "the monitor showing 1000 of 3000 MiB", || async {
        let m = get();
        let used = container_series(&m, "hami_vgpu_memory_used_bytes", &ns.name, "mon")?;
        let limit = container_series(&m, "hami_vgpu_memory_limit_bytes", &ns.name, "mon")?;
        (mib(used) == 1000 && mib(limit) == 3000).then_some(())
    })
    .await;
    // Kernels running: a share of the card and a recent last kernel.
    let (util, last) = wait_for(WAIT, "the monitor showing the kernels", || async {
        let m = get();
        let util = container_series(
            &m,
            "hami_container_device_utilization_ratio",
            &ns.name,
            "mon",
        )?;
        let last = container_series(
            &m,
            "hami_container_last_kernel_elapsed_seconds",
            &ns.name,
            "mon",
        )?;
        (util > 0.0).then_some((util, last))
    })
    .await;
    assert!(
        util <= 100.0 && last < 10.0,
        "utilization {util}, last kernel {last} s ago"
    );
    let m = get();
    assert!(
        m.contains("hami_host_gpu_memory_used_bytes{device_index=\"0\",device_uuid=\"GPU-e2e00000"),
        "no host metrics:\n{m}"
    );

    // SIGKILL: its 1000 MiB stop counting, and its slot is freed in the
    // region file (nobody maps it any more).
    s.node
        .ctr(&[
            "tasks",
            "kill",
            "--exec-id",
            "hog",
            "--signal",
            "SIGKILL",
            &id,
        ])
        .expect("killing the exec'd process");
    wait_for(WAIT, "the killed process's memory freed", || async {
        let used = container_series(&get(), "hami_vgpu_memory_used_bytes", &ns.name, "mon")?;
        (mib(used) == 0).then_some(())
    })
    .await;
    let dir = s
        .node
        .root
        .join("hook/vgpu/containers")
        .join(format!("{uid}_main"));
    let region = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "cache"))
        .unwrap_or_else(|| panic!("no region in {}", dir.display()));
    wait_for(WAIT, "the dead slot freed in the region file", || async {
        let c =
            hami_shm::copy::RegionCopy::decode(&hami_shm::copy::read_file(&region).ok()?).ok()?;
        c.slots.is_empty().then_some(())
    })
    .await;

    // The pod ends: its series go at the next scan, its dirs after the grace.
    pods.delete("mon", &Default::default())
        .await
        .expect("deleting the pod");
    wait_for(WAIT, "pod mon gone", || async {
        pods.get_opt("mon").await.ok()?.is_none().then_some(())
    })
    .await;
    // Within a few scans (500 ms each) of the pod's end.
    let series = format!("namespace=\"{}\",pod=\"mon\"", ns.name);
    wait_for(
        Duration::from_secs(5),
        "the pod's series dropped",
        || async { (!get().contains(&series)).then_some(()) },
    )
    .await;
    wait_for(WAIT, "the pod's dirs removed", || async {
        (!dir.exists()
            && !s
                .node
                .root
                .join("hook/vgpu/limits")
                .join(format!("{uid}_main"))
                .exists())
        .then_some(())
    })
    .await;
}
