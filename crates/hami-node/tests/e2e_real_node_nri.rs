//! hami-node in NRI mode (`--allocation-mode nri`) on the real node
//! (kubelet v1.34, containerd 2.4 with NRI on, runc): the runtime calls
//! hami-node at each container's creation and the container gets only its
//! cards and its limits, with no node lock; and with the NRI plugin
//! unreachable (the fallback, PreStartContainer, is off in this mode) a
//! GPU container gets no device memory and says why; 50 GPU pods at once
//! each run with their own limits and the node is never locked. Its own
//! test binary: hami-node runs in NRI mode here, 25 slots per card. Skips (printing why) where the
//! real-node harness cannot run.

mod real_node;

use hami_api::annotations as ann;
use hami_e2e::{TestNs, wait_for};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use real_node::{
    CARDS, Setup, WAIT, fifty_pods_at_once, line, phase, probe_pod, wait_finished, wait_node_serves,
};
use serde_json::json;

static SETUP: std::sync::OnceLock<Option<Setup>> = std::sync::OnceLock::new();

fn setup() -> Option<&'static Setup> {
    SETUP
        .get_or_init(|| Setup::start_with(25, &["--allocation-mode=nri"]))
        .as_ref()
}

/// One test at a time: one restarts hami-node.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

async fn wait_registered_with_nri(s: &Setup) {
    wait_for(
        WAIT,
        "hami-node registered with containerd's NRI",
        || async {
            s.hami_node_log()
                .contains("NRI: registered with the runtime")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_nri_a_container_gets_its_own_card_and_limits_without_a_lock() {
    let Some(s) = setup() else {
        return;
    };
    let _one = serial().await;
    wait_node_serves(s).await;
    wait_registered_with_nri(s).await;
    let ns = s.cluster.namespace("real-nri-limited").await;
    let node: Node = Api::all(ns.client.clone()).get(&s.node.name).await.unwrap();
    assert_eq!(
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ann::NODE_ALLOCATION_MODE))
            .map(String::as_str),
        Some("nri")
    );
    let card = CARDS[1].split_whitespace().nth(2).unwrap();
    let mut pod = probe_pod(
        &ns,
        "limited",
        json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 2000}),
        &[
            "sh",
            "-c",
            "echo visible $NVIDIA_VISIBLE_DEVICES; /bin/cuda-probe init alloc 1999m free 0 alloc 2001m nvml-mem 0",
        ],
    );
    pod["metadata"]["annotations"] = json!({ann::NVIDIA_USE_GPUUUID: card});
    ns.create_pod(pod).await.expect("creating the pod");
    let (pod, log) = wait_finished(s, &ns, "limited").await;
    let context = || format!("{log}\nhami-node:\n{}", s.hami_node_log());
    assert_eq!(phase(&pod), "Succeeded", "{}", context());
    assert_eq!(
        line(&log, "visible", 0)[1],
        card,
        "its card only: {}",
        context()
    );
    assert_eq!(line(&log, "alloc", 0)[1], "0", "{}", context());
    assert_eq!(
        line(&log, "alloc", 1)[1],
        "2",
        "over its 2000 MiB: {}",
        context()
    );
    assert_eq!(line(&log, "nvml-mem", 0)[2], (2000u64 << 20).to_string());
    assert_eq!(
        TestNs::annotation(&pod, ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert!(
        s.hami_node_log()
            .contains("NRI: container adjusted with its cards and limits"),
        "{}",
        context()
    );
    assert_eq!(ns.node_lock(&s.node.name).await, None, "no node lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_nri_plugin_unreachable_a_gpu_container_gets_no_device_memory() {
    let Some(s) = setup() else {
        return;
    };
    let _one = serial().await;
    wait_node_serves(s).await;
    // NRI mode, but the runtime's socket is not where hami-node looks: no
    // CreateContainer call reaches it, and PreStartContainer is off.
    s.restart_hami_node_with(&["--nri-socket=/run/hami-e2e-no-such-nri.sock"]);
    wait_for(WAIT, "the new hami-node registering", || async {
        s.hami_node_log()
            .contains("serving and registered with")
            .then_some(())
    })
    .await;
    let ns = s.cluster.namespace("real-nri-closed").await;
    ns.create_pod(probe_pod(
        &ns,
        "closed",
        json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000}),
        &["/bin/cuda-probe", "init", "alloc", "100m"],
    ))
    .await
    .expect("creating the pod");
    let (pod, log) = wait_finished(s, &ns, "closed").await;
    let context = || format!("{log}\nhami-node:\n{}", s.hami_node_log());
    assert_eq!(phase(&pod), "Succeeded", "{}", context());
    assert_eq!(line(&log, "init", 0)[1], "0", "{}", context());
    assert_eq!(
        line(&log, "alloc", 0)[1],
        "2",
        "no device memory: {}",
        context()
    );
    assert!(
        log.contains("never wrote its limits"),
        "the container says why: {}",
        context()
    );
    // Back to the setup's hami-node for whatever runs next.
    s.restart_hami_node_with(&[]);
    wait_registered_with_nri(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_nri_fifty_pods_at_once_run_with_their_own_limits_and_no_lock() {
    let Some(s) = setup() else {
        return;
    };
    let _one = serial().await;
    wait_registered_with_nri(s).await;
    fifty_pods_at_once(s, "real-nri-fifty").await;
    assert!(
        s.hami_node_log()
            .matches("NRI: container adjusted with its cards and limits")
            .count()
            >= 50,
        "every container went through NRI"
    );
}
