//! Resident memory of a snapshot: builds a 1k/5k/10k-node snapshot (8 GPUs
//! per node, half full), each in a fresh process so freed memory from a
//! smaller run cannot hide growth, and prints a table of the VmRSS growth.
//! Run: `cargo bench -p hami-sched --bench memory`.

use std::process::Command;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--nodes") {
        let nodes: usize = args[pos + 1].parse().expect("--nodes N");
        let before = rss_kib();
        let snapshot = hami_sched::sim::synthetic_cluster(nodes, 8, 0.5, 42);
        let after = rss_kib();
        println!(
            "{:>8} {:>8} {:>10} {:>11.1} MB",
            nodes,
            nodes * 8,
            snapshot.pods().count(),
            after.saturating_sub(before) as f64 / 1024.0
        );
        return;
    }
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return; // probes from cargo's test harness
    }
    println!(
        "{:>8} {:>8} {:>10} {:>14}",
        "nodes", "GPUs", "pods", "snapshot RSS"
    );
    let me = std::env::current_exe().expect("own path");
    for nodes in [1_000, 5_000, 10_000] {
        let status = Command::new(&me)
            .args(["--nodes", &nodes.to_string()])
            .status()
            .expect("child runs");
        assert!(status.success());
    }
}
