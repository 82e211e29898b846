//! Allocate latency and pod start throughput on the harness's real node
//! (issue 9 section 6): 100 pods of one card each (300 MiB, no cores
//! limit) created at once on 4 simulated cards split 25 ways, through the
//! webhook, kube-scheduler + hami-scheduler, the kubelet, hami-node's
//! Allocate, containerd and runc. Prints a table; see bench/README.md.
//!
//! `cargo bench -p hami-node --bench real_node` (as root, like the
//! real-node tests; prints why and does nothing when the harness cannot
//! run, fails instead under HAMI_E2E_REQUIRE=1). `HAMI_BENCH_PODS` changes
//! the pod count (at most 100: the node has 100 slots);
//! `HAMI_BENCH_MODE` picks hami-node's `--allocation-mode`: `nri` (the
//! default: the harness's containerd has NRI), `pod-resources` or `lock`.

#[path = "../tests/real_node/mod.rs"]
mod real_node;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use real_node::{Setup, phase, probe_pod, wait_node_serves};
use serde_json::json;

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() {
    let pods_wanted: usize = std::env::var("HAMI_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .clamp(1, 100);
    let mode = std::env::var("HAMI_BENCH_MODE").unwrap_or_else(|_| "nri".into());
    let Some(s) = Setup::start_with(25, &[&format!("--allocation-mode={mode}")]) else {
        eprintln!(
            "real_node bench: the real-node harness is not available here (see above); nothing measured"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&s, pods_wanted, &mode));
}

async fn run(s: &Setup, n: usize, mode: &str) {
    wait_node_serves(s).await;
    let ns = s.cluster.namespace("bench-real").await;
    let api: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let names: Vec<String> = (0..n).map(|i| format!("p{i:03}")).collect();
    let t0 = Instant::now();
    let created: BTreeMap<String, Instant> = futures::stream::iter(names.clone())
        .map(|name| {
            let ns = &ns;
            async move {
                let pod = probe_pod(
                    ns,
                    &name,
                    json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": 300}),
                    &["/bin/sleep", "3600"],
                );
                ns.create_pod(pod).await.expect("creating a pod");
                (name, Instant::now())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let all_created = t0.elapsed();

    // When each pod was first seen Running (a list every 100 ms).
    let mut running: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while running.len() < n {
        let list = api
            .list(&ListParams::default())
            .await
            .expect("listing pods");
        let now = Instant::now();
        for p in &list.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            if phase(p) == "Running" {
                running.entry(name.clone()).or_insert(now);
            }
            assert!(phase(p) != "Failed", "pod {name} failed: {:?}", p.status);
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} pods Running after 900 s",
            running.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_running = running.values().max().expect("pods").duration_since(t0);

    let mut start_ms: Vec<f64> = names
        .iter()
        .map(|p| running[p].duration_since(created[p]).as_secs_f64() * 1e3)
        .collect();
    start_ms.sort_by(f64::total_cmp);
    let prefix = format!("pod={}/", ns.name);
    // hami-node's own time per pod: Allocate under the lock, else NRI's
    // CreateContainer or PreStartContainer (Allocate then answers from the
    // IDs alone).
    let mut alloc_ms: Vec<f64> = s
        .hami_node_log()
        .lines()
        .filter(|l| l.contains(&prefix))
        .filter_map(|l| l.split("elapsed_us=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect();
    alloc_ms.sort_by(f64::total_cmp);
    assert_eq!(
        alloc_ms.len(),
        n,
        "one timed call per pod in hami-node's log"
    );

    println!(
        "real node: {n} pods of 1 card (300 MiB) on 4 simulated cards split 25, --allocation-mode={mode}"
    );
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| all created (16 at a time) | {:.2} s |",
        all_created.as_secs_f64()
    );
    println!(
        "| all Running, from the first create | {:.2} s |",
        all_running.as_secs_f64()
    );
    println!(
        "| throughput | **{:.2} pods/s** |",
        n as f64 / all_running.as_secs_f64()
    );
    println!(
        "| create to Running, p50 / p99 | {:.0} ms / {:.0} ms |",
        quantile(&start_ms, 0.5),
        quantile(&start_ms, 0.99)
    );
    println!(
        "| {} (hami-node), p50 / p99 / max | **{:.2} ms / {:.2} ms** / {:.2} ms |",
        match mode {
            "lock" => "Allocate",
            "nri" => "NRI CreateContainer",
            _ => "PreStartContainer",
        },
        quantile(&alloc_ms, 0.5),
        quantile(&alloc_ms, 0.99),
        alloc_ms.last().copied().unwrap_or(f64::NAN)
    );
}
