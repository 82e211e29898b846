//! High availability as it is deployed: two scheduler pods, each a real
//! kube-scheduler with leader election on and a real hami-scheduler beside
//! it (same host name, as two containers of one pod), on one API server.
//! hami-scheduler never elects; it follows kube-scheduler's Lease. Pods
//! bind through whichever kube-scheduler leads, none is refused "not the
//! leader", and after the leading pod is SIGKILLed the other leads, binds,
//! and decides from what the API server shows, so no card is over-booked.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::{Value, json};

use hami_e2e::{GpuNode, HA_LEASE, HA_MAIN_HOST, TestNs, wait_for};

const PAIR_B: &str = "hami-pair-b";

async fn holder(ns: &TestNs) -> Option<String> {
    Api::<Lease>::namespaced(ns.client.clone(), HA_LEASE.0)
        .get_opt(HA_LEASE.1)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Waits until kube-scheduler of the pod with host name `host` holds the
/// Lease (it writes `<host>_<uuid>`); returns the identity.
async fn wait_leader(ns: &TestNs, host: &str, timeout: Duration) -> String {
    wait_for(
        timeout,
        &format!("kube-scheduler on {host} to lead"),
        || async {
            holder(ns)
                .await
                .filter(|h| h.starts_with(&format!("{host}_")))
        },
    )
    .await
}

fn gpu_pod(ns: &TestNs, name: &str, mem: &str) -> Value {
    let mut pod = ns.gpu_pod(
        name,
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": mem}),
        json!({}),
    );
    // Set here rather than by the webhook: after the failover the webhook
    // registered at the first pod's address is gone (failurePolicy Ignore).
    pod["spec"]["schedulerName"] = json!("hami-scheduler");
    pod
}

fn mem_of(pod: &Pod) -> u64 {
    TestNs::allocation(pod).devices().map(|d| d.mem).sum()
}

/// Every BindingFailed event of the namespace that says "not the leader".
async fn leader_refusals(ns: &TestNs, pods: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pods {
        for e in ns.events_for(p).await {
            let msg = e.message.unwrap_or_default();
            if msg.contains("not the leader") {
                out.push(format!("{p}: {msg}"));
            }
        }
    }
    out
}

#[tokio::test]
async fn binds_follow_kube_schedulers_leader_and_fail_over_without_over_booking() {
    let Some(cluster) = hami_e2e::cluster_ha(env!("CARGO_BIN_EXE_hami-scheduler"), &[]) else {
        return;
    };
    let mut ns = cluster.namespace("leader").await;
    let node = ns
        .add_node(&GpuNode::new("n", 1, 10000, "NVIDIA-Tesla T4"))
        .await;
    let first_term = wait_leader(&ns, HA_MAIN_HOST, Duration::from_secs(60)).await;
    let b = cluster.start_pair(PAIR_B).await.expect("pod b started");

    // Pod a leads; its kube-scheduler calls its own extender, which binds.
    ns.create_pod(gpu_pod(&ns, "first", "4000"))
        .await
        .expect("created");
    let first = ns.wait_bound("first", Duration::from_secs(60)).await;
    assert_eq!(
        first.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node.as_str())
    );
    assert_eq!(holder(&ns).await, Some(first_term), "the leader changed");

    // The leading pod dies; b's kube-scheduler takes the Lease once a's
    // term runs out, and b's extender leads with it.
    cluster.kill_scheduler();
    cluster.kill_kube_scheduler();
    wait_leader(&ns, PAIR_B, Duration::from_secs(60)).await;

    // b decides from what the API server shows: 4000 of 10000 MiB are held
    // by the pod a bound, so 7000 more do not fit...
    ns.create_pod(gpu_pod(&ns, "big", "7000"))
        .await
        .expect("created");
    ns.wait_event("big", "FilteringFailed", Duration::from_secs(60))
        .await;
    // ...and 6000 do.
    ns.create_pod(gpu_pod(&ns, "fits", "6000"))
        .await
        .expect("created");
    let fits = ns.wait_bound("fits", Duration::from_secs(60)).await;
    assert_eq!(mem_of(&first), 4000);
    assert_eq!(mem_of(&fits), 6000);
    // "big" was filtered by b (the event above) and is still not bound.
    let big = ns.get_pod("big").await;
    assert!(
        big.spec.and_then(|s| s.node_name).is_none(),
        "a 7000 MiB pod was bound to a card with 6000 MiB free"
    );
    let refused = leader_refusals(&ns, &["first", "big", "fits"]).await;
    assert!(refused.is_empty(), "binds refused: {refused:?}");
    drop(b);
}
