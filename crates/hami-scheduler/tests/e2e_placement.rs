//! Against a real kube-apiserver, kube-scheduler and kwok: placement
//! follows binpack/spread at node and GPU level, type and UUID selectors,
//! numa-bind and exclusive use; an unschedulable pod stays Pending with the
//! reasons per node; a node whose handshake went stale gets no new pods
//! until it reports again. Skips when the control-plane binaries are not
//! built (see hami-e2e).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use hami_api::annotations as ann;
use hami_e2e::{GpuNode, TestNs, wait_for};

const BIND: Duration = Duration::from_secs(60);

/// UUIDs per container from the allocated annotation.
fn uuids(pod: &Pod) -> Vec<Vec<String>> {
    TestNs::allocation(pod)
        .0
        .into_iter()
        .map(|c| c.into_iter().map(|d| d.uuid).collect())
        .collect()
}

async fn place(ns: &TestNs, name: &str, limits: serde_json::Value, ann: serde_json::Value) -> Pod {
    ns.create_pod(ns.gpu_pod(name, limits, ann))
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    ns.wait_bound(name, BIND).await;
    // Wait for kwok to run it too: a running pod is past the device
    // plugin's Allocate, so its node lock no longer holds anyone back, and
    // the next placement depends on policies alone.
    let pod = wait_for(BIND, &format!("{name} Running"), || async {
        let p = ns.get_pod(name).await;
        (p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).then_some(p)
    })
    .await;
    // The bind writes the protocol annotations before the binding.
    assert_eq!(
        TestNs::annotation(&pod, ann::VGPU_NODE).as_deref(),
        Some(TestNs::node_of(&pod).as_str())
    );
    assert_eq!(
        TestNs::annotation(&pod, ann::BIND_PHASE).as_deref(),
        Some("allocating")
    );
    assert_eq!(
        TestNs::annotation(&pod, ann::NVIDIA_DEVICES_TO_ALLOCATE),
        TestNs::annotation(&pod, ann::NVIDIA_DEVICES_ALLOCATED)
    );
    pod
}

#[tokio::test]
async fn binpack_and_spread_at_node_and_gpu_level() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("policy").await;
    let a = ns
        .add_node(&GpuNode::new("a", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let b = ns
        .add_node(&GpuNode::new("b", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let mem = json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"});

    let first = place(&ns, "first", mem.clone(), json!({})).await;
    let busy = TestNs::node_of(&first);
    let idle = if busy == a { b.clone() } else { a.clone() };
    let first_gpu = uuids(&first)[0][0].clone();

    // Node binpack (the default) joins the busy node; GPU spread (the
    // default) takes its other, empty card.
    let second = place(&ns, "second", mem.clone(), json!({})).await;
    assert_eq!(TestNs::node_of(&second), busy);
    assert_ne!(uuids(&second)[0][0], first_gpu);

    // GPU binpack: the fullest card of the busy node.
    let third = place(
        &ns,
        "third",
        mem.clone(),
        json!({ann::GPU_SCHEDULER_POLICY: "binpack"}),
    )
    .await;
    assert_eq!(TestNs::node_of(&third), busy);
    let held: Vec<String> = vec![uuids(&first)[0][0].clone(), uuids(&second)[0][0].clone()];
    assert!(held.contains(&uuids(&third)[0][0]));

    // Node spread: the empty node.
    let fourth = place(
        &ns,
        "fourth",
        mem.clone(),
        json!({ann::NODE_SCHEDULER_POLICY: "spread"}),
    )
    .await;
    assert_eq!(TestNs::node_of(&fourth), idle);
}

#[tokio::test]
async fn type_and_uuid_selectors_numa_bind_and_exclusive_use() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("select").await;
    let t4 = ns
        .add_node(&GpuNode::new("t4", 1, 16384, "NVIDIA-Tesla T4"))
        .await;
    let mut big = GpuNode::new("a100", 4, 81920, "NVIDIA A100-SXM4-80GB");
    big.numa = vec![0, 0, 1, 1];
    let a100 = ns.add_node(&big).await;
    let small = json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"});

    let p = place(
        &ns,
        "want-a100",
        small.clone(),
        json!({ann::NVIDIA_USE_GPUTYPE: "a100"}),
    )
    .await;
    assert_eq!(TestNs::node_of(&p), a100);
    let p = place(
        &ns,
        "not-a100",
        small.clone(),
        json!({ann::NVIDIA_NOUSE_GPUTYPE: "A100"}),
    )
    .await;
    assert_eq!(TestNs::node_of(&p), t4);
    let wanted = GpuNode::uuid(&a100, 2);
    let p = place(
        &ns,
        "want-uuid",
        small.clone(),
        json!({ann::NVIDIA_USE_GPUUUID: wanted}),
    )
    .await;
    assert_eq!(uuids(&p), vec![vec![wanted.clone()]]);

    // Take card 1 (NUMA 0) whole: NUMA 0 keeps one free card, NUMA 1 two.
    let card1 = GpuNode::uuid(&a100, 1);
    let p = place(
        &ns,
        "hold-card1",
        json!({"nvidia.com/gpu": "1"}),
        json!({ann::NVIDIA_USE_GPUUUID: card1}),
    )
    .await;
    assert_eq!(uuids(&p), vec![vec![card1.clone()]]);
    // Exclusive: the webhook made it gpucores 100, so nothing else joins card 1.
    let err_pod = ns
        .create_pod(ns.gpu_pod(
            "join-card1",
            small.clone(),
            json!({ann::NVIDIA_USE_GPUUUID: card1}),
        ))
        .await
        .expect("created");
    let pair = place(
        &ns,
        "numa-pair",
        json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "1000"}),
        json!({ann::NVIDIA_NUMA_BIND: "true"}),
    )
    .await;
    let got = &uuids(&pair)[0];
    assert_eq!(got.len(), 2);
    let numa_of = |u: &str| {
        if u.ends_with("-0") || u.ends_with("-1") {
            0
        } else {
            1
        }
    };
    assert_eq!(
        numa_of(&got[0]),
        numa_of(&got[1]),
        "{got:?} spans NUMA nodes"
    );
    assert!(!got.contains(&card1));

    // The extender judged it (its event proves the chance was had) and
    // refused card 1, which is held whole.
    let name = err_pod.metadata.name.clone().unwrap();
    let ev = ns.wait_event(&name, "FilteringFailed", BIND).await;
    let msg = ev.message.unwrap_or_default();
    assert!(msg.contains(&a100), "{msg}");
    assert_eq!(
        TestNs::node_of(&ns.get_pod(&name).await),
        "",
        "joined an exclusive card"
    );
}

#[tokio::test]
async fn unschedulable_pod_stays_pending_with_reasons_per_node() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("pending").await;
    let n1 = ns
        .add_node(&GpuNode::new("n1", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let n2 = ns
        .add_node(&GpuNode::new("n2", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    ns.create_pod(ns.gpu_pod(
        "too-big",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "20000"}),
        json!({}),
    ))
    .await
    .expect("created");
    // Our event names every candidate node and HAMi's reason.
    let ev = ns.wait_event("too-big", "FilteringFailed", BIND).await;
    let msg = ev.message.unwrap_or_default();
    assert!(msg.contains(&n1) && msg.contains(&n2), "{msg}");
    assert!(msg.contains("2/2 CardInsufficientMemory"), "{msg}");
    // kube-scheduler's own event carries the reason too.
    let ev = ns.wait_event("too-big", "FailedScheduling", BIND).await;
    let msg = ev.message.unwrap_or_default();
    assert!(msg.contains("CardInsufficientMemory"), "{msg}");
    let pod = ns.get_pod("too-big").await;
    assert_eq!(TestNs::node_of(&pod), "");
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
}

#[tokio::test]
async fn stale_handshake_node_gets_no_pods_until_it_reports() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("stale").await;
    let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(5);
    let mut stale = GpuNode::new("stale", 2, 16384, "NVIDIA-Tesla T4");
    stale.handshake = Some(format!(
        "Requesting_{}",
        long_ago.strftime("%Y-%m-%d %H:%M:%S")
    ));
    stale.allocatable = Some(0);
    let stale_name = ns.add_node(&stale).await;
    let healthy = ns
        .add_node(&GpuNode::new("ok", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let small = json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"});
    for i in 0..4 {
        let p = place(&ns, &format!("p{i}"), small.clone(), json!({})).await;
        assert_eq!(TestNs::node_of(&p), healthy);
    }
    // A pod that only fits the stale node waits.
    let card = GpuNode::uuid(&stale_name, 0);
    ns.create_pod(ns.gpu_pod(
        "pinned",
        small.clone(),
        json!({ann::NVIDIA_USE_GPUUUID: card}),
    ))
    .await
    .expect("created");
    let ev = ns.wait_event("pinned", "FilteringFailed", BIND).await;
    let msg = ev.message.unwrap_or_default();
    assert!(
        msg.contains(&format!("{stale_name}: NodeNotReporting")) && msg.contains("Requesting_"),
        "{msg}"
    );
    assert_eq!(TestNs::node_of(&ns.get_pod("pinned").await), "");

    // The device plugin comes back: it reports and advertises its GPUs.
    let nodes: Api<Node> = Api::all(ns.client.clone());
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string();
    nodes
        .patch(
            &stale_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ann::NODE_HANDSHAKE: format!("Reported {now}")}}})),
        )
        .await
        .expect("handshake patched");
    nodes
        .patch_status(
            &stale_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"allocatable": {"nvidia.com/gpu": "20"}, "capacity": {"nvidia.com/gpu": "20"}}})),
        )
        .await
        .expect("allocatable patched");
    let p = ns.wait_bound("pinned", Duration::from_secs(120)).await;
    assert_eq!(TestNs::node_of(&p), stale_name);
    // The scheduler answers the report with a new request at its next
    // resync (1 s here).
    hami_e2e::wait_for(Duration::from_secs(30), "the report answered", || async {
        let n = nodes.get(&stale_name).await.ok()?;
        let hs = n.metadata.annotations?.get(ann::NODE_HANDSHAKE).cloned()?;
        hs.starts_with("Requesting_").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_of_another_scheduler_is_neither_reserved_nor_bound() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("foreign").await;
    let node = ns
        .add_node(&GpuNode::new("n", 1, 16384, "NVIDIA-Tesla T4"))
        .await;
    let mut pod = ns.gpu_pod(
        "theirs",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "16384"}),
        json!({}),
    );
    pod["spec"]["schedulerName"] = json!("nobody");
    let pod = ns.create_pod(pod).await.expect("created");
    // Someone with loopback access calls the extender for it by hand, as
    // kube-scheduler would.
    let filtered = cluster
        .scheduler_post("/filter", &json!({"Pod": pod, "NodeNames": [node.clone()]}))
        .await;
    assert_eq!(filtered["NodeNames"], json!([]), "{filtered}");
    let why = filtered["FailedAndUnresolvableNodes"][&node]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("nobody"), "{filtered}");
    let bound = cluster
        .scheduler_post(
            "/bind",
            &json!({"PodName": "theirs", "PodNamespace": ns.name,
                "PodUID": pod.metadata.uid, "Node": node}),
        )
        .await;
    let error = bound["Error"].as_str().unwrap_or_default();
    assert!(error.contains("nobody"), "{bound}");
    // The Bind answered: had it bound, the pod would show it now.
    assert_eq!(TestNs::node_of(&ns.get_pod("theirs").await), "");
    // Nothing was reserved: a pod of ours takes the whole card.
    let mine = place(
        &ns,
        "mine",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "16384"}),
        json!({}),
    )
    .await;
    assert_eq!(TestNs::node_of(&mine), node);
}

/// A mixed cluster: a node whose agent announces a lock-free allocation
/// mode gets its pods bound without HAMi's node lock (the lock never
/// appears on it, and its binds do not wait for one another), while a
/// node in HAMi's lock mode beside it still gets the lock for every bind.
#[tokio::test]
async fn lock_free_nodes_bind_without_the_lock_beside_lock_nodes() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("mixed").await;
    let locked = ns
        .add_node(&GpuNode::new("locked", 1, 16384, "NVIDIA-Tesla T4"))
        .await;
    let mut spec = GpuNode::new("free", 1, 16384, "NVIDIA-Tesla T4");
    // No kwok: nothing runs the pods, so nothing would ever release a lock
    // on this node; every bind after the first would wait for one.
    spec.kwok = false;
    spec.allocation_mode = Some("pod-resources".into());
    let free = ns.add_node(&spec).await;
    let free_locks = hami_e2e::LockWatch::start(ns.client.clone(), &free).await;
    let locked_locks = hami_e2e::LockWatch::start(ns.client.clone(), &locked).await;

    let mut names = Vec::new();
    for (node, n) in [(&free, 4), (&locked, 2)] {
        let card = GpuNode::uuid(node, 0);
        for i in 0..n {
            let name = format!("{}-{i}", if node == &free { "free" } else { "locked" });
            ns.create_pod(ns.gpu_pod(
                &name,
                json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}),
                json!({ann::NVIDIA_USE_GPUUUID: card}),
            ))
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
            names.push((name, node.clone(), card.clone()));
        }
    }
    for (name, node, card) in &names {
        let pod = ns.wait_bound(name, BIND).await;
        assert_eq!(&TestNs::node_of(&pod), node, "{name}");
        assert_eq!(uuids(&pod), vec![vec![card.clone()]], "{name}");
        assert_eq!(
            TestNs::annotation(&pod, ann::BIND_PHASE).as_deref(),
            Some("allocating"),
            "{name}: the agent's protocol starts as HAMi's"
        );
    }
    // Every bind of both nodes has happened: the watches saw all they would.
    let (free_seen, locked_seen) = (free_locks.stop(BIND).await, locked_locks.stop(BIND).await);
    assert!(
        free_seen.is_empty(),
        "the lock-free node was locked: {free_seen:?}"
    );
    assert!(
        !locked_seen.is_empty(),
        "the lock-mode node never showed HAMi's lock"
    );
}
