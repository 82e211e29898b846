//! hami-kube against a real kube-apiserver: the node bind lock (mutual
//! exclusion under concurrent binders, waiting, takeover, release),
//! following kube-scheduler's leader Lease, and events. Skips when the control-plane binaries are
//! not built (see hami-e2e).

use std::time::Duration;

use jiff::SignedDuration;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use hami_api::annotations as ann;
use hami_api::node::NodeLock;
use hami_e2e::{GpuNode, TestNs, wait_for};
use hami_kube::clock::{Clock, ManualClock, SystemClock};
use hami_kube::events::{EventWriter, Severity};
use hami_kube::leader::{self, LeaseConfig};
use hami_kube::lock::{self, LockPolicy};

/// A pod that stays Pending forever (no node matches it).
async fn pending_pod(ns: &TestNs, name: &str, bind_phase: Option<&str>) -> Pod {
    let mut annotations = serde_json::Map::new();
    if let Some(b) = bind_phase {
        annotations.insert(ann::BIND_PHASE.into(), json!(b));
    }
    ns.create_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns.name, "annotations": annotations},
        "spec": {"nodeSelector": {"nowhere": "true"},
                 "containers": [{"name": "c", "image": "fake"}]},
    }))
    .await
    .expect("pod created")
}

async fn lock_value(ns: &TestNs, node: &str) -> Option<NodeLock> {
    let n = Api::<Node>::all(ns.client.clone())
        .get(node)
        .await
        .expect("node");
    n.metadata
        .annotations
        .and_then(|a| a.get(ann::NODE_LOCK).cloned())
        .map(|v| NodeLock::decode(&v).expect("a valid lock"))
}

#[tokio::test]
async fn node_lock_excludes_waits_takes_over_and_releases() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("lock").await;
    let node = ns.add_node(&GpuNode::new("n", 1, 1000, "NVIDIA-T4")).await;
    let clock = SystemClock;
    let quick = LockPolicy {
        wait: Duration::from_millis(800),
        ..LockPolicy::default()
    };

    // Eight binders race for a free node: exactly one wins.
    for i in 0..8 {
        pending_pod(&ns, &format!("racer{i}"), Some("allocating")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = ns.client.clone();
        let (node, nsn) = (node.clone(), ns.name.clone());
        tasks.push(tokio::spawn(async move {
            lock::acquire(
                &client,
                &node,
                &nsn,
                &format!("racer{i}"),
                &SystemClock,
                &quick,
            )
            .await
        }));
    }
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("task") {
            Ok(_) => winners.push(i),
            Err(e) => assert!(
                matches!(
                    e,
                    hami_kube::Error::Locked { .. } | hami_kube::Error::LockContention { .. }
                ),
                "{e}"
            ),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let holder = format!("racer{}", winners[0]);
    assert_eq!(lock_value(&ns, &node).await.unwrap().pod, holder);

    // Taking it again as the holder is a no-op success.
    lock::acquire(&ns.client, &node, &ns.name, &holder, &clock, &quick)
        .await
        .expect("re-entrant");

    // Once the holder is past allocation, the next binder takes over.
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    pods.patch(
        &holder,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {ann::BIND_PHASE: "success"}}})),
    )
    .await
    .expect("patched");
    pending_pod(&ns, "next", Some("allocating")).await;
    lock::acquire(&ns.client, &node, &ns.name, "next", &clock, &quick)
        .await
        .expect("takeover after success");
    // A lock whose pod is gone may be taken at once.
    pods.delete("next", &Default::default())
        .await
        .expect("deleted");
    lock::acquire(
        &ns.client,
        &node,
        &ns.name,
        "ghost-successor",
        &clock,
        &quick,
    )
    .await
    .expect("takeover from a deleted pod");

    // An expired lock may be taken even from a live allocating holder.
    pending_pod(&ns, "slow", Some("allocating")).await;
    let later = ManualClock::new(jiff::Timestamp::now());
    lock::acquire(&ns.client, &node, &ns.name, "slow", &clock, &quick)
        .await
        .expect("takeover from ghost");
    let err = lock::acquire(&ns.client, &node, &ns.name, "late", &later, &quick)
        .await
        .expect_err("slow holds it");
    assert!(err.to_string().contains("locked by"), "{err}");
    later.advance(SignedDuration::from_mins(6));
    lock::acquire(&ns.client, &node, &ns.name, "late", &later, &quick)
        .await
        .expect("expired lock taken");

    // Release only removes our own lock.
    lock::release(&ns.client, &node, &ns.name, "slow")
        .await
        .expect("no-op");
    assert_eq!(lock_value(&ns, &node).await.unwrap().pod, "late");
    lock::release(&ns.client, &node, &ns.name, "late")
        .await
        .expect("released");
    assert_eq!(lock_value(&ns, &node).await, None);
}

#[tokio::test]
async fn node_lock_swap_ignores_other_writes_and_distrusts_a_stale_cache() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("lockcas").await;
    let node = ns.add_node(&GpuNode::new("n", 1, 1000, "NVIDIA-T4")).await;
    let nodes: Api<Node> = Api::all(ns.client.clone());
    let quick = LockPolicy {
        wait: Duration::from_millis(600),
        poll: Duration::from_millis(20),
        api_poll: Duration::from_millis(100),
        ..LockPolicy::default()
    };
    pending_pod(&ns, "a", Some("allocating")).await;
    pending_pod(&ns, "b", Some("allocating")).await;
    let held = lock::acquire(&ns.client, &node, &ns.name, "a", &SystemClock, &quick)
        .await
        .expect("free node");
    // A cache that lags behind still shows the node free: the swap's test
    // fails, the node is read, and the live holder keeps its lock.
    let stale = || {
        Some(lock::CachedLock {
            resource_version: None,
            has_annotations: true,
            lock: None,
        })
    };
    let err = lock::acquire_cached(
        &ns.client,
        &node,
        &stale,
        &ns.name,
        "b",
        &SystemClock,
        &quick,
    )
    .await
    .expect_err("a holds the lock");
    assert!(err.to_string().contains("locked by"), "{err}");
    assert_eq!(lock_value(&ns, &node).await.unwrap().pod, "a");

    // Another writer touches the node (a heartbeat, a handshake): releasing
    // by value still works, no resourceVersion involved.
    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {ann::NODE_HANDSHAKE: "Reported now"}}}),
            ),
        )
        .await
        .expect("patched");
    // A release with some other value leaves the lock alone.
    lock::release_held(&ns.client, &node, "2020-01-01T00:00:00Z,x,y")
        .await
        .expect("no-op");
    assert_eq!(lock_value(&ns, &node).await.unwrap().pod, "a");
    lock::release_held(&ns.client, &node, &held)
        .await
        .expect("released");
    assert_eq!(lock_value(&ns, &node).await, None);

    // A node with no annotations at all can be locked too.
    let bare: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("{}-bare", ns.name)},
    }))
    .expect("a node");
    let bare_name = nodes
        .create(&Default::default(), &bare)
        .await
        .expect("created")
        .metadata
        .name
        .expect("named");
    let got = lock::acquire(&ns.client, &bare_name, &ns.name, "b", &SystemClock, &quick).await;
    nodes
        .delete(&bare_name, &Default::default())
        .await
        .expect("deleted");
    assert_eq!(
        NodeLock::decode(&got.expect("bare node locked"))
            .unwrap()
            .pod,
        "b"
    );
}

/// Writes kube-scheduler's Lease as kube-scheduler would: holder
/// `<hostname>_<uuid>`, renewed now.
async fn write_lease(ns: &TestNs, holder: &str, seconds: i32) {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let spec = LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(seconds),
        renew_time: Some(MicroTime(jiff::Timestamp::now())),
        ..Default::default()
    };
    match leases.get_opt("hami-scheduler").await.unwrap() {
        Some(mut l) => {
            l.spec = Some(spec);
            leases
                .replace("hami-scheduler", &Default::default(), &l)
                .await
                .unwrap();
        }
        None => {
            let l = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some("hami-scheduler".into()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            leases.create(&Default::default(), &l).await.unwrap();
        }
    }
}

#[tokio::test]
async fn leadership_follows_kube_schedulers_lease_and_never_writes_it() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let ns = cluster.namespace("lease").await;
    let cfg = |id: &str| LeaseConfig {
        namespace: ns.name.clone(),
        name: "hami-scheduler".into(),
        identity: id.into(),
    };
    let (a, task_a) = leader::follow(ns.client.clone(), cfg("sched-a"));
    let (b, task_b) = leader::follow(ns.client.clone(), cfg("sched-ab"));
    // No Lease: nobody leads (kube-scheduler has not elected yet).
    assert!(!a.confirm().await.unwrap() && !b.confirm().await.unwrap());
    write_lease(&ns, "sched-ab_0b5e7d62-1111-4c3e-9f00-123456789abc", 30).await;
    // Bind asks right after kube-scheduler won: the fresh read answers
    // even if the watch has not delivered the Lease yet.
    assert!(b.confirm().await.unwrap());
    // A host name that is a prefix of the holder's is not the holder.
    assert!(!a.confirm().await.unwrap());
    wait_for(
        Duration::from_secs(10),
        "the watch to show b leading",
        || async { b.is_leader().then_some(()) },
    )
    .await;
    write_lease(&ns, "sched-a_7c9d0e11-2222-4d4e-8a11-abcdefabcdef", 2).await;
    wait_for(
        Duration::from_secs(10),
        "a to lead through the watch",
        || async { (a.is_leader() && !b.is_leader()).then_some(()) },
    )
    .await;
    // a's kube-scheduler stops renewing: the term ends 2 s after the last
    // renewal this process saw, whoever the Lease still names.
    wait_for(Duration::from_secs(10), "a's term to run out", || async {
        (!a.is_leader()).then_some(())
    })
    .await;
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(ns.client.clone(), &ns.name)
            .get("hami-scheduler")
            .await
            .unwrap();
    // Followers only read: the Lease is exactly what "kube-scheduler" wrote.
    let spec = lease.spec.unwrap();
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some("sched-a_7c9d0e11-2222-4d4e-8a11-abcdefabcdef")
    );
    assert_eq!(spec.lease_transitions, None);
    task_a.abort();
    task_b.abort();
}

#[tokio::test]
async fn events_are_written_on_the_pod() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let ns = cluster.namespace("events").await;
    let pod = pending_pod(&ns, "p", None).await;
    let writer = EventWriter::new(ns.client.clone(), "hami-scheduler", "test");
    writer
        .pod_event(
            &pod,
            Severity::Warning,
            "BindingFailed",
            "node n is locked",
            &SystemClock,
        )
        .await
        .expect("event written");
    let events = ns.events_for("p").await;
    let e = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("BindingFailed"))
        .expect("our event");
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.message.as_deref(), Some("node n is locked"));
    assert_eq!(e.involved_object.uid, pod.metadata.uid);
    let _ = SystemClock.now();
}
