//! Engine benchmarks: one decision over 1k/5k/10k nodes of 8 GPUs, half
//! full; a 10,000-pod simulation on 1,000 nodes. Run: `cargo bench -p hami-sched --bench engine`.

use divan::{Bencher, black_box, counter::ItemsCount};
use hami_sched::sim::{self, Lifetime, Pattern, PodGroup, Seconds, Workload, model::Arrival};
use hami_sched::{Engine, Mode, PodRequest, Snapshot};

fn main() {
    divan::main();
}

fn pod(engine: &Engine, resources: &[(&str, u64)]) -> PodRequest {
    sim::group_request(engine, &group("bench", 1, resources)).expect("valid pod")
}

fn group(name: &str, count: u32, resources: &[(&str, u64)]) -> PodGroup {
    PodGroup {
        name: name.into(),
        count,
        arrival: Arrival {
            start: Seconds(0),
            end: None,
            pattern: Pattern::Poisson,
        },
        duration: Lifetime::Range {
            min: Seconds(600),
            max: Seconds(7200),
        },
        resources: resources
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect(),
        annotations: Default::default(),
    }
}

fn cluster(nodes: usize) -> Snapshot {
    sim::synthetic_cluster(nodes, 8, 0.5, 42)
}

/// One 1-GPU pod (30,000 MiB, 30 % cores) decided over a half-full cluster.
fn decide(bencher: Bencher, nodes: usize, mode: Mode) {
    let engine = Engine::default();
    let snapshot = cluster(nodes);
    let req = pod(
        &engine,
        &[
            ("nvidia.com/gpu", 1),
            ("nvidia.com/gpumem", 30000),
            ("nvidia.com/gpucores", 30),
        ],
    );
    bencher.bench_local(|| {
        let d = engine.filter(black_box(&snapshot), &req, None, mode);
        black_box(d.node.is_some())
    });
}

/// The extender's call: explain every rejected node.
#[divan::bench(args = [1_000, 5_000, 10_000], sample_count = 30)]
fn decide_one_pod_explain(bencher: Bencher, nodes: usize) {
    decide(bencher, nodes, Mode::Explain);
}

/// The simulator's call: best node only.
#[divan::bench(args = [1_000, 5_000, 10_000], sample_count = 30)]
fn decide_one_pod_fast(bencher: Bencher, nodes: usize) {
    decide(bencher, nodes, Mode::Fast);
}

/// An 8-card pod that fits nowhere: the worst case, every node explained.
#[divan::bench(args = [10_000], sample_count = 10)]
fn decide_unschedulable_pod_explain(bencher: Bencher, nodes: usize) {
    let engine = Engine::default();
    let snapshot = cluster(nodes);
    let req = pod(
        &engine,
        &[("nvidia.com/gpu", 8), ("nvidia.com/gpumem", 80000)],
    );
    bencher.bench_local(|| {
        black_box(
            engine
                .filter(&snapshot, &req, None, Mode::Explain)
                .rejected
                .len(),
        )
    });
}

/// 10,000 pods arriving over a day on 1,000 nodes of 8 GPUs.
#[divan::bench(sample_count = 5)]
fn simulate_10k_pods_1k_nodes(bencher: Bencher) {
    let engine = Engine::default();
    let cluster = sim::synthetic_cluster(1_000, 8, 0.0, 1);
    let workload = Workload {
        seed: 3,
        horizon: Seconds(86_400),
        groups: vec![
            group(
                "small",
                6_000,
                &[
                    ("nvidia.com/gpu", 1),
                    ("nvidia.com/gpumem", 10000),
                    ("nvidia.com/gpucores", 20),
                ],
            ),
            group(
                "large",
                3_000,
                &[
                    ("nvidia.com/gpu", 1),
                    ("nvidia.com/gpumem", 40000),
                    ("nvidia.com/gpucores", 50),
                ],
            ),
            group("multi", 1_000, &[("nvidia.com/gpu", 4)]),
        ],
    };
    bencher
        .counter(ItemsCount::new(10_000usize))
        .bench_local(|| {
            let r = sim::simulate(&engine, &cluster, &workload, "bench", &mut |_, _| {}).unwrap();
            black_box(r.placed)
        });
}
