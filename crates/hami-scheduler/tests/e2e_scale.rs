//! Against a real kube-apiserver, kube-scheduler and kwok: 500 pods
//! created at once on 50 nodes of 8 GPUs, with hami-scheduler killed and
//! restarted midway. Every pod that fits is bound, and no GPU ever holds
//! more than its slots, memory or cores (checked from the final
//! annotations). Skips when the control-plane binaries are not built.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;

use hami_api::PodDevices;
use hami_api::annotations as ann;
use hami_e2e::{GpuNode, TestNs};
use hami_sched::{Engine, Mode, Snapshot};

const NODES: usize = 50;
const GPUS: u32 = 8;
const MEM: u64 = 16384;
const SPLIT: u32 = 10;

fn limits(i: usize) -> serde_json::Value {
    // Per ten pods: five whole cards, three 12000 MiB slices (no two fit one
    // card), one 6000 MiB slice, one pod of two 4000 MiB slices: 400 cards
    // cannot hold all of it.
    match i % 10 {
        0..=4 => json!({"nvidia.com/gpu": "1"}),
        5..=7 => json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "12000"}),
        8 => {
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "6000", "nvidia.com/gpucores": "30"})
        }
        _ => {
            json!({"nvidia.com/gpu": "2", "nvidia.com/gpumem": "4000", "nvidia.com/gpucores": "20"})
        }
    }
}

/// kube-scheduler's verdict: no node fits (as opposed to an error retry).
fn unschedulable(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
}

/// hami-scheduler's Filter and Bind call counts so far (this run of it),
/// from its metrics; zeros when it does not answer.
async fn scheduler_calls(cluster: &hami_e2e::Cluster) -> (f64, f64) {
    let text = cluster.scheduler_get("/metrics").await.unwrap_or_default();
    let count = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (
        count("hami_scheduler_filter_duration_seconds_count"),
        count("hami_scheduler_bind_duration_seconds_count"),
    )
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_pods_fifty_nodes_restart_midway_no_overcommit() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("scale").await;
    let mut node_names = Vec::new();
    for i in 0..NODES {
        let mut n = GpuNode::new(&format!("n{i:02}"), GPUS, MEM, "NVIDIA-Tesla T4");
        n.split = SPLIT;
        node_names.push(ns.add_node(&n).await);
    }
    let started = Instant::now();
    let pods: Vec<serde_json::Value> = (0..500)
        .map(|i| ns.gpu_pod(&format!("p{i:03}"), limits(i), json!({})))
        .collect();
    let created: Vec<_> = futures::stream::iter(pods)
        .map(|p| ns.create_pod(p))
        .buffer_unordered(16)
        .collect()
        .await;
    for c in created {
        c.expect("pod created");
    }
    let api: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let bound = |pods: &[Pod]| pods.iter().filter(|p| node_of(p).is_some()).count();

    // Kill the scheduler once a good share is bound, restart it.
    let mut restarted = false;
    let mut last = (0usize, Instant::now());
    let mut last_calls = ((0.0, 0.0), Instant::now());
    let final_pods = loop {
        let pods = api.list(&ListParams::default()).await.expect("list").items;
        let n = bound(&pods);
        if !restarted && n >= 150 {
            cluster.kill_scheduler();
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster.start_scheduler().expect("restarted");
            cluster
                .wait_scheduler_ready(Duration::from_secs(60))
                .await
                .expect("ready after restart");
            restarted = true;
            eprintln!(
                "restarted hami-scheduler with {n} pods bound after {:?}",
                started.elapsed()
            );
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        // hami-scheduler's Filter and Bind call counts: a pod kube-scheduler
        // will still try (its condition already says Unschedulable while it
        // waits in the backoff queue, up to 10 s after the event that
        // requeued it) calls Filter again.
        let calls = scheduler_calls(cluster).await;
        if calls != last_calls.0 {
            last_calls = (calls, Instant::now());
        }
        // Settled: after the restart, every unbound pod was found
        // unschedulable (not merely retrying after an error), nothing new
        // was bound for 10 s, and kube-scheduler called hami-scheduler for
        // nothing for longer than its longest backoff (10 s).
        let all_judged = pods
            .iter()
            .filter(|p| node_of(p).is_none())
            .all(unschedulable);
        if restarted
            && all_judged
            && last.1.elapsed() > Duration::from_secs(10)
            && last_calls.1.elapsed() > Duration::from_secs(12)
        {
            break pods;
        }
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "not settled after 400 s: {n} bound\n{}",
            cluster.scheduler_log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let n_bound = bound(&final_pods);
    eprintln!(
        "{n_bound} of 500 bound after {:?}; after the restart hami-scheduler answered {} Filter and {} Bind calls, the last {:?} before the end",
        started.elapsed(),
        last_calls.0.0,
        last_calls.0.1,
        last_calls.1.elapsed()
    );
    assert!(restarted);
    assert!(n_bound > 300, "only {n_bound} bound");

    // No GPU over its slots, memory or cores, counted from the annotations
    // alone, and every pod on the node its annotation names.
    #[derive(Default, Debug)]
    struct Held {
        slots: u32,
        mem: u64,
        cores: u32,
    }
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    for p in &final_pods {
        let Some(node) = node_of(p) else { continue };
        let name = p.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            TestNs::annotation(p, ann::VGPU_NODE).as_deref(),
            Some(node.as_str()),
            "{name}"
        );
        let alloc = TestNs::annotation(p, ann::NVIDIA_DEVICES_ALLOCATED)
            .unwrap_or_else(|| panic!("{name} bound without an allocation"));
        let devices = PodDevices::decode(ann::NVIDIA_DEVICES_ALLOCATED, &alloc).expect("valid");
        for d in devices.devices() {
            assert!(
                d.uuid.starts_with(&format!("GPU-{node}-")),
                "{name}: {} not on {node}",
                d.uuid
            );
            let h = held.entry(d.uuid.clone()).or_default();
            h.slots += 1;
            h.mem += d.mem;
            h.cores += d.cores;
        }
    }
    for (uuid, h) in &held {
        let holders: Vec<String> = final_pods
            .iter()
            .filter(|p| {
                TestNs::annotation(p, ann::NVIDIA_DEVICES_ALLOCATED)
                    .is_some_and(|a| a.contains(uuid.as_str()))
            })
            .map(|p| {
                format!(
                    "{} bind-time {:?}",
                    p.metadata.name.as_deref().unwrap_or_default(),
                    TestNs::annotation(p, ann::BIND_TIME)
                )
            })
            .collect();
        assert!(
            h.slots <= SPLIT && h.mem <= MEM && h.cores <= 100,
            "{uuid} overcommitted: {h:?}, held by {holders:?}"
        );
    }

    // Every pod still pending truly fits nowhere: ask the engine over the
    // final state of the cluster.
    let engine = Engine::default();
    let mut snapshot = Snapshot::new();
    let nodes: Api<Node> = Api::all(ns.client.clone());
    for name in &node_names {
        let n = nodes.get(name).await.expect("node");
        assert!(engine.add_node(&mut snapshot, &n).expect("registered"));
    }
    for p in &final_pods {
        if let Some(r) = engine.pod_record(p).expect("valid record") {
            snapshot.add_pod(&hami_sched::pod_key(p), r);
        }
    }
    let mut pending = 0;
    for p in final_pods.iter().filter(|p| node_of(p).is_none()) {
        pending += 1;
        let req = engine.prepare(p).expect("valid").expect("a GPU pod");
        let d = engine.filter(&snapshot, &req, None, Mode::Fast);
        if d.node.is_some() {
            let name = p.metadata.name.as_deref().unwrap_or_default();
            let condition = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
                .map(|c| {
                    format!(
                        "{:?} {:?} at {:?}",
                        c.reason, c.message, c.last_transition_time
                    )
                });
            let node = d.node.unwrap_or_default();
            panic!(
                "{name} is pending but fits {node}\ncondition: {condition:?}\nannotations: {:?}\nhami-scheduler on the pod:\n{}\nhami-scheduler on the node:\n{}\nkube-scheduler:\n{}",
                p.metadata.annotations,
                cluster.log_lines_with("hami-scheduler", name, 30),
                cluster.log_lines_with("hami-scheduler", node, 30),
                cluster.log_lines_with("kube-scheduler", name, 5),
            );
        }
    }
    assert_eq!(pending + n_bound, 500);
    assert!(
        pending > 0,
        "the workload was meant to overfill the cluster"
    );

    // The metrics see the same allocations.
    let metrics = cluster.scheduler_get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("hami_scheduler_filter_duration_seconds_count"),
        "{metrics:.400}"
    );
    assert!(
        metrics.contains("hami_gpu_memory_allocated_bytes{"),
        "no per-GPU metrics"
    );
    assert!(
        metrics.contains("hami_vgpu_memory_allocated_bytes{"),
        "no per-pod metrics"
    );
}
