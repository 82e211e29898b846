//! Two real hami-scheduler replicas against one API server, electing a
//! leader through a Lease: only the leader binds, the other still answers
//! Filter, and when the leader dies the other takes over and decides from
//! what the API server shows, so nothing is allocated twice.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::{Value, json};

use hami_e2e::{Cluster, GpuNode, Replica, TestNs, wait_for};

const LEASE_NAMESPACE: &str = "kube-system";
const LEASE_NAME: &str = "hami-scheduler";

async fn holder(ns: &TestNs) -> Option<String> {
    Api::<Lease>::namespaced(ns.client.clone(), LEASE_NAMESPACE)
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

async fn wait_holder(ns: &TestNs, who: &str, timeout: Duration) {
    wait_for(timeout, &format!("{who} to hold the Lease"), || async {
        (holder(ns).await.as_deref() == Some(who)).then_some(())
    })
    .await;
}

async fn post(cluster: &Cluster, replica: &Replica, path: &str, body: Value) -> Value {
    let client = cluster.replica_client(replica).await;
    let req = axum::http::Request::post(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("json"))
        .expect("a request");
    let text = client
        .request_text(req)
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
}

/// A GPU pod no scheduler picks up (its schedulerName is nobody's), for
/// driving a replica's extender by hand as kube-scheduler would.
async fn unscheduled_pod(ns: &TestNs, name: &str, mem: &str) -> Pod {
    let mut pod = ns.gpu_pod(
        name,
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": mem}),
        json!({}),
    );
    pod["spec"]["schedulerName"] = json!("nobody");
    ns.create_pod(pod).await.expect("pod created")
}

fn binding_args(pod: &Pod, node: &str) -> Value {
    json!({
        "PodName": pod.metadata.name,
        "PodNamespace": pod.metadata.namespace,
        "PodUID": pod.metadata.uid,
        "Node": node,
    })
}

fn mem_of(pod: &Pod) -> u64 {
    TestNs::allocation(pod).devices().map(|d| d.mem).sum()
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_fail_over_without_double_allocation() {
    let Some(cluster) = hami_e2e::cluster_with(
        env!("CARGO_BIN_EXE_hami-scheduler"),
        &[
            "--leader-elect=true",
            "--leader-elect-lease-duration=6s",
            "--leader-elect-identity=replica-a",
        ],
    ) else {
        return;
    };
    let mut ns = cluster.namespace("leader").await;
    let node = ns
        .add_node(&GpuNode::new("n", 1, 10000, "NVIDIA-Tesla T4"))
        .await;
    wait_holder(&ns, "replica-a", Duration::from_secs(30)).await;
    let b = cluster
        .start_replica("hami-scheduler-b", &["--leader-elect-identity=replica-b"])
        .await
        .expect("replica b started");

    // The leader (a, behind kube-scheduler) places a pod as usual.
    ns.create_pod(ns.gpu_pod(
        "first",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000"}),
        json!({}),
    ))
    .await
    .expect("created");
    let first = ns.wait_bound("first", Duration::from_secs(60)).await;
    assert_eq!(
        first.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node.as_str())
    );
    assert_eq!(
        holder(&ns).await.as_deref(),
        Some("replica-a"),
        "b must not have taken over"
    );

    // The follower answers Filter but refuses to bind.
    let q = unscheduled_pod(&ns, "q", "6000").await;
    let filtered = post(
        cluster,
        &b,
        "/filter",
        json!({"Pod": q, "NodeNames": [node.clone()]}),
    )
    .await;
    assert_eq!(filtered["NodeNames"], json!([node.clone()]), "{filtered}");
    let refused = post(cluster, &b, "/bind", binding_args(&q, &node)).await;
    let error = refused["Error"].as_str().unwrap_or_default();
    assert!(error.contains("not the leader"), "{refused}");
    assert!(
        ns.get_pod("q").await.spec.unwrap().node_name.is_none(),
        "a follower bound a pod"
    );

    // The leader dies; b takes over once a's Lease runs out.
    cluster.kill_scheduler();
    wait_holder(&ns, "replica-b", Duration::from_secs(30)).await;

    // b decides from what the API server shows: 4000 of 10000 MiB are held
    // by the pod a bound, so 7000 more do not fit and 6000 do.
    let big = unscheduled_pod(&ns, "big", "7000").await;
    let r = post(
        cluster,
        &b,
        "/filter",
        json!({"Pod": big, "NodeNames": [node.clone()]}),
    )
    .await;
    assert_eq!(r["NodeNames"], json!([]), "{r}");
    let why = r["FailedNodes"][&node].as_str().unwrap_or_default();
    assert!(why.contains("CardInsufficientMemory"), "{r}");

    let r = post(
        cluster,
        &b,
        "/filter",
        json!({"Pod": q, "NodeNames": [node.clone()]}),
    )
    .await;
    assert_eq!(r["NodeNames"], json!([node.clone()]), "{r}");
    let bound = post(cluster, &b, "/bind", binding_args(&q, &node)).await;
    assert_eq!(bound["Error"], json!(""), "{bound}");
    let q = ns.wait_bound("q", Duration::from_secs(30)).await;
    let total = mem_of(&first) + mem_of(&q);
    assert_eq!(total, 10000, "first {} + q {}", mem_of(&first), mem_of(&q));

    // Bring a back as a follower for whatever runs after this test.
    drop(b);
    cluster.start_scheduler().expect("scheduler restarted");
    cluster
        .wait_scheduler_ready(Duration::from_secs(60))
        .await
        .expect("scheduler ready");
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    assert!(pods.get_opt("big").await.expect("get").is_some());
}
