//! Against a real control plane, with a short --allocating-timeout: a pod
//! bound to a node whose device plugin never allocates (here: no kubelet at
//! all) is marked failed, its devices and the node lock are released, and
//! the next pod can have the card. Its own test binary, because the
//! timeout is a flag of the shared hami-scheduler.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use serde_json::json;

use hami_api::annotations as ann;
use hami_e2e::{GpuNode, TestNs, wait_for};

#[tokio::test]
async fn a_bind_stuck_in_allocating_is_failed_and_released() {
    let Some(cluster) = hami_e2e::cluster_with(
        env!("CARGO_BIN_EXE_hami-scheduler"),
        &["--allocating-timeout=3s"],
    ) else {
        return;
    };
    let mut ns = cluster.namespace("stuck").await;
    let mut dead = GpuNode::new("dead", 1, 16384, "NVIDIA-Tesla T4");
    dead.kwok = false;
    let node = ns.add_node(&dead).await;

    // An exclusive pod: binds, then nothing ever allocates it.
    ns.create_pod(ns.gpu_pod("first", json!({"nvidia.com/gpu": "1"}), json!({})))
        .await
        .expect("created");
    let pod = ns.wait_bound("first", Duration::from_secs(60)).await;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(node.as_str()));

    // A second exclusive pod cannot share the card meanwhile.
    ns.create_pod(ns.gpu_pod("second", json!({"nvidia.com/gpu": "1"}), json!({})))
        .await
        .expect("created");

    let failed = wait_for(
        Duration::from_secs(60),
        "bind-phase=failed on first",
        || async {
            let p = ns.get_pod("first").await;
            (TestNs::annotation(&p, ann::BIND_PHASE).as_deref() == Some("failed")).then_some(p)
        },
    )
    .await;
    assert_eq!(failed.status.unwrap().phase.as_deref(), Some("Pending"));
    let ev = wait_for(
        Duration::from_secs(30),
        "an AllocationTimeout event",
        || async {
            ns.events_for("first")
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("AllocationTimeout"))
        },
    )
    .await;
    assert!(ev.message.unwrap_or_default().contains(&node));

    // The card is free again, the lock too: the second pod gets it.
    let second = ns.wait_bound("second", Duration::from_secs(120)).await;
    assert_eq!(
        second.spec.unwrap().node_name.as_deref(),
        Some(node.as_str())
    );
    let n = Api::<Node>::all(ns.client.clone())
        .get(&node)
        .await
        .expect("node");
    let lock = n
        .metadata
        .annotations
        .unwrap_or_default()
        .get(ann::NODE_LOCK)
        .cloned()
        .unwrap_or_default();
    assert!(
        !lock.contains(",first"),
        "the failed pod still holds the lock: {lock}"
    );
}
