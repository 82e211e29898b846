//! Property tests over random clusters and random streams of pods: capacity
//! is never exceeded, exclusive stays exclusive, decisions are deterministic,
//! removal is exact, Fast and Explain agree, and Explain picks the
//! best-scoring node that fits.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use hami_api::annotations as ann;
use hami_api::topology::DevicePairScore;
use hami_api::{DeviceInfo, DeviceMode, PodDevices};
use hami_sched::score::node_score;
use hami_sched::snapshot::NodeTotals;
use hami_sched::{Engine, Mode, NodeDevices, PodRequest, Snapshot, pod_key};
use k8s_openapi::api::core::v1::{Node, Pod};
use proptest::prelude::*;

const TYPES: [&str; 3] = ["NVIDIA-Tesla T4", "NVIDIA-A100-SXM4-80GB", "NVIDIA"];

#[derive(Debug, Clone)]
struct CardSpec {
    count: u32,
    mem: u64,
    devcore: u32,
    numa: i32,
    ty: usize,
    healthy: bool,
    cordoned: bool,
    mig: bool,
}

#[derive(Debug, Clone)]
struct NodeSpec {
    cards: Vec<CardSpec>,
    /// Pair scores, row-major over the cards; `None` for no annotation.
    links: Option<Vec<i64>>,
}

fn arb_card() -> impl Strategy<Value = CardSpec> {
    (
        1u32..=4,
        prop_oneof![Just(1000u64), Just(2000), Just(4000)],
        prop_oneof![9 => Just(100u32), 1 => Just(200)],
        0i32..2,
        0usize..TYPES.len(),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(count, mem, devcore, numa, ty, healthy, cordoned, mig)| CardSpec {
                count,
                mem,
                devcore,
                numa,
                ty,
                healthy,
                cordoned,
                mig,
            },
        )
}

fn arb_node() -> impl Strategy<Value = NodeSpec> {
    (
        prop::collection::vec(arb_card(), 1..=4),
        prop::option::of(prop::collection::vec(0i64..300, 16)),
    )
        .prop_map(|(cards, links)| NodeSpec { cards, links })
}

fn arb_cluster() -> impl Strategy<Value = Vec<NodeSpec>> {
    prop::collection::vec(arb_node(), 1..=4)
}

fn uuid(node: usize, card: usize) -> String {
    format!("GPU-{node}-{card}")
}

fn k8s_node(i: usize, spec: &NodeSpec) -> Node {
    let devices: Vec<DeviceInfo> = spec
        .cards
        .iter()
        .enumerate()
        .map(|(j, c)| DeviceInfo {
            id: uuid(i, j),
            index: j as u32,
            count: c.count,
            devmem: c.mem,
            devcore: c.devcore,
            device_type: TYPES[c.ty].into(),
            numa: c.numa,
            mode: c.mig.then_some(DeviceMode::Mig),
            mig_profiles: None,
            custom_info: None,
            health: c.healthy,
        })
        .collect();
    let cordon: Vec<String> = spec
        .cards
        .iter()
        .enumerate()
        .filter(|(_, c)| c.cordoned)
        .map(|(j, _)| uuid(i, j))
        .collect();
    let mut extra = vec![(ann::DEVICE_CORDON, cordon.join(","))];
    if let Some(links) = &spec.links {
        let n = spec.cards.len();
        let scores: Vec<DevicePairScore> = (0..n)
            .map(|a| DevicePairScore {
                uuid: uuid(i, a),
                score: (0..n)
                    .filter(|&b| b != a)
                    .map(|b| (uuid(i, b), links[a.min(b) * 4 + a.max(b)]))
                    .collect(),
            })
            .collect();
        extra.push((
            ann::NODE_NVIDIA_SCORE,
            hami_api::topology::encode_pair_scores(&scores),
        ));
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node_with(&format!("node-{i}"), &devices, &extra)
}

#[derive(Debug, Clone)]
enum MemSpec {
    Whole,
    Mib(u64),
    Pct(u32),
}

#[derive(Debug, Clone)]
struct CtrSpec {
    gpus: u32,
    mem: MemSpec,
    cores: Option<u32>,
}

#[derive(Debug, Clone)]
struct PodSpecR {
    init: Option<CtrSpec>,
    ctrs: Vec<Option<CtrSpec>>,
    gpu_policy: Option<&'static str>,
    node_policy: Option<&'static str>,
    numa_bind: bool,
    use_type: Option<&'static str>,
    weights: bool,
}

fn arb_ctr() -> impl Strategy<Value = CtrSpec> {
    (
        prop_oneof![6 => Just(1u32), 2 => Just(2), 1 => Just(3)],
        prop_oneof![
            1 => Just(MemSpec::Whole),
            4 => (50u64..2500).prop_map(MemSpec::Mib),
            2 => (1u32..=100).prop_map(MemSpec::Pct),
        ],
        prop_oneof![
            2 => Just(None),
            4 => (0u32..=60).prop_map(Some),
            1 => Just(Some(100)),
            1 => Just(Some(150)),
        ],
    )
        .prop_map(|(gpus, mem, cores)| CtrSpec { gpus, mem, cores })
}

fn arb_pod() -> impl Strategy<Value = PodSpecR> {
    (
        prop::option::weighted(0.2, arb_ctr()),
        prop::collection::vec(prop::option::weighted(0.85, arb_ctr()), 1..=2),
        prop::option::of(prop::sample::select(vec![
            "binpack",
            "spread",
            "mutex",
            "topology-aware",
            "binpack,numa",
            "topology-aware,numa",
        ])),
        prop::option::of(prop::sample::select(vec!["binpack", "spread"])),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.15, prop::sample::select(vec!["t4", "A100", "nvidia"])),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(init, ctrs, gpu_policy, node_policy, numa_bind, use_type, weights)| PodSpecR {
                init,
                ctrs,
                gpu_policy,
                node_policy,
                numa_bind,
                use_type,
                weights,
            },
        )
        .prop_filter("asks for a GPU", |p| {
            p.init.is_some() || p.ctrs.iter().any(Option::is_some)
        })
}

fn limits_of(c: &CtrSpec) -> Vec<(&'static str, String)> {
    let mut kv = vec![(GPU, c.gpus.to_string())];
    match c.mem {
        MemSpec::Whole => {}
        MemSpec::Mib(m) => kv.push((MEM, m.to_string())),
        MemSpec::Pct(p) => kv.push((PCT, p.to_string())),
    }
    if let Some(cores) = c.cores {
        kv.push((CORES, cores.to_string()));
    }
    kv
}

fn build_pod(name: &str, spec: &PodSpecR) -> Pod {
    let as_refs = |kv: &[(&'static str, String)]| -> Vec<(&'static str, String)> { kv.to_vec() };
    let mut b = pod(name);
    if let Some(init) = &spec.init {
        let kv = as_refs(&limits_of(init));
        let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
        b = b.init(&kv);
    }
    for c in &spec.ctrs {
        let kv = c.as_ref().map(limits_of).unwrap_or_default();
        let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
        b = b.ctr(&kv);
    }
    if let Some(p) = spec.gpu_policy {
        b = b.ann(ann::GPU_SCHEDULER_POLICY, p);
    }
    if let Some(p) = spec.node_policy {
        b = b.ann(ann::NODE_SCHEDULER_POLICY, p);
    }
    if spec.numa_bind {
        b = b.ann(ann::NVIDIA_NUMA_BIND, "true");
    }
    if let Some(t) = spec.use_type {
        b = b.ann(ann::NVIDIA_USE_GPUTYPE, t);
    }
    if spec.weights {
        b = b.ann(ann::DEVICE_SCORING_WEIGHTS, "slot=1,core=2,memory=3");
    }
    b.build()
}

#[derive(Debug, Clone)]
enum Op {
    Place(PodSpecR),
    /// Removes the n-th (mod count) pod still placed.
    Remove(usize),
    /// The n-th (mod count) node re-registers with one slot per card,
    /// possibly fewer than its pods already hold.
    Shrink(usize),
}

fn arb_ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            6 => arb_pod().prop_map(Op::Place),
            2 => any::<usize>().prop_map(Op::Remove),
            1 => any::<usize>().prop_map(Op::Shrink),
        ],
        1..=max,
    )
}

fn registration(s: &Snapshot, name: &str) -> NodeDevices {
    let n = s.node(name).unwrap();
    NodeDevices {
        devices: n.devices.iter().map(|d| d.info.clone()).collect(),
        cordoned: n
            .devices
            .iter()
            .filter(|d| d.cordoned)
            .map(|d| d.info.id.clone())
            .collect(),
        pair_scores: n.pair_scores.clone(),
        soft_split: n.soft_split,
        vendor_cards: n.vendor_cards.clone(),
    }
}

/// The same cluster built from scratch: the current registrations plus the
/// records of the pods still placed.
fn rebuilt(s: &Snapshot) -> Snapshot {
    let mut fresh = Snapshot::new();
    for n in s.nodes() {
        fresh.upsert_node(&n.name, registration(s, &n.name));
    }
    let mut pods: Vec<_> = s.pods().collect();
    pods.sort_by_key(|(k, _)| k.to_string());
    for (k, r) in pods {
        fresh.add_pod(k, r.clone());
    }
    fresh
}

/// Capacity, totals and exclusivity on every card of every node that was
/// never shrunk under its pods.
fn check_invariants(s: &Snapshot, shrunk: &BTreeSet<String>) -> Result<(), TestCaseError> {
    for n in s.nodes() {
        let mut sum = NodeTotals::default();
        for d in &n.devices {
            sum.slots += u64::from(d.info.count);
            sum.cores += u64::from(d.info.devcore);
            sum.mem += d.info.devmem;
            sum.used_slots += u64::from(d.used.slots);
            sum.used_cores += u64::from(d.used.cores);
            sum.used_mem += d.used.mem;
            if shrunk.contains(&n.name) {
                continue;
            }
            prop_assert!(
                d.used.slots <= d.info.count,
                "{}: slots {:?}",
                d.info.id,
                d.used
            );
            prop_assert!(
                d.used.mem <= d.info.devmem,
                "{}: mem {:?}",
                d.info.id,
                d.used
            );
            prop_assert!(
                d.used.cores <= d.info.devcore,
                "{}: cores {:?}",
                d.info.id,
                d.used
            );
        }
        prop_assert_eq!(sum, n.totals, "totals of {}", n.name);
    }
    // Exclusive stays exclusive: a card of 100 cores given whole to one
    // container holds that pod alone, and within the container's phase (one
    // init container, or the app containers together) one slot.
    for (key, record) in s.pods() {
        let Some(n) = s.node(&record.node) else {
            continue;
        };
        if shrunk.contains(&n.name) {
            continue;
        }
        let init = record.init_count.min(record.devices.0.len());
        let phases = record.devices.0[..init]
            .iter()
            .map(std::slice::from_ref)
            .chain([&record.devices.0[init..]]);
        for phase in phases {
            let in_phase = || phase.iter().flatten();
            for d in in_phase().filter(|d| d.cores == 100) {
                let card = n.devices.iter().find(|c| c.info.id == d.uuid).unwrap();
                if card.info.devcore != 100 {
                    continue;
                }
                let uses = in_phase().filter(|o| o.uuid == d.uuid).count();
                prop_assert_eq!(uses, 1, "{} holds {} twice", key, d.uuid);
                let held = record.held().iter().find(|(u, _)| *u == d.uuid).unwrap().1;
                prop_assert_eq!(card.used, held, "{} shares exclusive {}", key, d.uuid);
            }
        }
    }
    Ok(())
}

/// Explain's answer is the best node (by the node policy, ties to the
/// earlier node) among those where the pod fits, with that node's cards;
/// every other node fits worse or is rejected.
fn check_best(
    e: &Engine,
    s: &Snapshot,
    req: &PodRequest,
    explain: &hami_sched::Decision<'_>,
) -> Result<(), TestCaseError> {
    let mut scratch = hami_sched::PodScratch::default();
    let mut best: Option<(f64, &str, PodDevices)> = None;
    let mut unfit = BTreeSet::new();
    for n in s.nodes() {
        match e.fit_pod(n, req, &mut scratch) {
            Ok(devices) => {
                let score = node_score(&n.totals);
                let better = match &best {
                    None => true,
                    Some((b, _, _)) => match req.constraints.node_policy {
                        hami_api::policy::NodePolicy::Binpack => score > *b,
                        hami_api::policy::NodePolicy::Spread => score < *b,
                    },
                };
                if better {
                    best = Some((score, n.name.as_str(), devices));
                }
            }
            Err(_) => {
                unfit.insert(n.name.as_str());
            }
        }
    }
    let rejected: BTreeSet<&str> = explain.rejected.iter().map(|(n, _)| *n).collect();
    prop_assert_eq!(rejected, unfit);
    match best {
        None => prop_assert_eq!(explain.node, None),
        Some((_, name, devices)) => {
            prop_assert_eq!(explain.node, Some(name));
            prop_assert_eq!(&explain.devices, &devices);
        }
    }
    Ok(())
}

/// Per placed pod: its decision (node and devices), for comparing runs.
type Trace = Vec<(Option<String>, PodDevices)>;

/// Runs a stream of operations, checking every property along the way.
fn run(cluster: &[NodeSpec], ops: &[Op]) -> Result<Trace, TestCaseError> {
    let e = engine();
    let nodes: Vec<Node> = cluster
        .iter()
        .enumerate()
        .map(|(i, n)| k8s_node(i, n))
        .collect();
    let mut s = snapshot(&e, &nodes);
    let empty = state(&s);
    let mut placed: Vec<String> = Vec::new();
    let mut shrunk = BTreeSet::new();
    let mut trace = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Place(spec) => {
                let p = build_pod(&format!("p{i}"), spec);
                let req = e.prepare(&p).unwrap().unwrap();
                let explain = e.filter(&s, &req, None, Mode::Explain);
                let fast = e.filter(&s, &req, None, Mode::Fast);
                prop_assert_eq!(
                    explain.node,
                    fast.node,
                    "Fast and Explain pick different nodes"
                );
                prop_assert_eq!(&explain.devices, &fast.devices);
                prop_assert!(fast.rejected.is_empty());
                check_best(&e, &s, &req, &explain)?;
                // Same inputs, same output, also on a copy.
                let copy = s.clone();
                let again = e.filter(&copy, &req, None, Mode::Explain);
                prop_assert_eq!(&again, &explain);
                trace.push((explain.node.map(str::to_string), explain.devices.clone()));
                if let Some(node) = explain.node.map(str::to_string) {
                    // Every container asking for n cards got n distinct cards.
                    for (c, want) in explain.devices.0.iter().zip(&req.containers) {
                        let want: usize = want.iter().map(|r| r.request.nums as usize).sum();
                        let distinct: BTreeSet<&str> = c.iter().map(|d| d.uuid.as_str()).collect();
                        prop_assert_eq!(c.len(), want);
                        prop_assert_eq!(distinct.len(), want);
                    }
                    let before = state(&s);
                    let devices = explain.devices.clone();
                    e.reserve(&mut s, &req, &node, devices.clone());
                    check_invariants(&s, &shrunk)?;
                    // Place then remove is the identity.
                    let mut undo = s.clone();
                    undo.remove_pod(&req.key);
                    prop_assert_eq!(state(&undo), before);
                    placed.push(req.key.clone());
                }
            }
            Op::Remove(k) => {
                if placed.is_empty() {
                    continue;
                }
                let key = placed.remove(k % placed.len());
                prop_assert!(s.remove_pod(&key).is_some());
                check_invariants(&s, &shrunk)?;
                prop_assert_eq!(state(&s), state(&rebuilt(&s)));
            }
            Op::Shrink(k) => {
                let name = s.nodes()[k % s.nodes().len()].name.clone();
                let mut reg = registration(&s, &name);
                for d in &mut reg.devices {
                    d.count = 1;
                }
                s.upsert_node(&name, reg);
                shrunk.insert(name);
                check_invariants(&s, &shrunk)?;
                prop_assert_eq!(state(&s), state(&rebuilt(&s)));
            }
        }
    }
    // Everything removed, in whatever order: back to the empty cluster,
    // apart from shrunk registrations.
    for key in placed.iter().rev() {
        s.remove_pod(key);
    }
    let now = state(&s);
    for (a, b) in now.iter().zip(&empty) {
        prop_assert_eq!(a.1.used_slots + a.1.used_mem + a.1.used_cores, 0);
        if !shrunk.contains(&a.0) {
            prop_assert_eq!(a, b);
        }
    }
    Ok(trace)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn streams_of_pods_keep_every_invariant(cluster in arb_cluster(), ops in arb_ops(24)) {
        run(&cluster, &ops)?;
    }

    #[test]
    fn decisions_are_deterministic_across_runs(cluster in arb_cluster(), ops in arb_ops(12)) {
        // Two independently built snapshots (their hash maps seeded
        // differently) decide the same stream identically.
        prop_assert_eq!(run(&cluster, &ops)?, run(&cluster, &ops)?);
    }

    #[test]
    fn a_snapshot_rebuilt_from_written_annotations_is_the_same(
        cluster in arb_cluster(),
        pods in prop::collection::vec(arb_pod(), 1..10),
    ) {
        // Place pods, write each decision's annotations onto the Pod and bind
        // it as the extender would, then build a second snapshot the way the shells do
        // (Nodes and Pods from the API server): usage must match exactly.
        let e = engine();
        let nodes: Vec<Node> = cluster.iter().enumerate().map(|(i, n)| k8s_node(i, n)).collect();
        let mut s = snapshot(&e, &nodes);
        let mut written = Vec::new();
        for (i, spec) in pods.iter().enumerate() {
            let mut p = build_pod(&format!("p{i}"), spec);
            let req = e.prepare(&p).unwrap().unwrap();
            let d = e.filter(&s, &req, None, Mode::Fast);
            let Some(node) = d.node.map(str::to_string) else { continue };
            let annotations: BTreeMap<String, String> = e.decision_annotations(&node, &d.devices, Some(&req), s.node(&node), 0);
            let devices = d.devices.clone();
            p.metadata.annotations.get_or_insert_with(BTreeMap::new).extend(annotations);
            // ...and binds it.
            p.spec.as_mut().unwrap().node_name = Some(node.clone());
            e.reserve(&mut s, &req, &node, devices);
            written.push(p);
        }
        let mut from_api = snapshot(&e, &nodes);
        for p in &written {
            let record = e.pod_record(p).unwrap().expect("a placed pod holds capacity");
            from_api.add_pod(&pod_key(p), record);
        }
        prop_assert_eq!(state(&from_api), state(&s));
    }
}
