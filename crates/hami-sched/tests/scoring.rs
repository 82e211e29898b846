//! GPU and node scoring (spec section 6): binpack and spread, the tie rules,
//! score weights, the node formula and pod annotations over the defaults.

mod common;

use common::*;
use hami_api::annotations as ann;
use hami_api::policy::{GpuPolicy, NodePolicy};
use hami_api::{DeviceInfo, NvidiaConfig};
use hami_sched::score::node_score;
use hami_sched::{Mode, Policies};

fn with_gpu_policy(policy: &str, kv: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Pod {
    pod("p")
        .ctr(kv)
        .ann(ann::GPU_SCHEDULER_POLICY, policy)
        .build()
}

const SMALL: &[(&str, &str)] = &[(GPU, "1"), (MEM, "100"), (CORES, "1")];

#[test]
fn binpack_takes_the_fullest_card_spread_the_emptiest() {
    let e = engine();
    // Registered: mid, full, empty, quarter. Neither order nor position
    // decides; the usage does.
    let cards = [t4("GPU-mid"), t4("GPU-full"), t4("GPU-empty"), t4("GPU-q")];
    let mut s = snapshot(&e, &[node("n1", &cards)]);
    hold(&mut s, "x/1", "n1", "GPU-mid,NVIDIA,4000,20:;");
    hold(&mut s, "x/2", "n1", "GPU-full,NVIDIA,8000,50:;");
    hold(&mut s, "x/3", "n1", "GPU-q,NVIDIA,1000,5:;");
    let out = decide(&e, &s, &with_gpu_policy("binpack", SMALL));
    assert_eq!(out.one(), "GPU-full");
    let out = decide(&e, &s, &with_gpu_policy("spread", SMALL));
    assert_eq!(out.one(), "GPU-empty");
    // Spread is the default.
    assert_eq!(decide(&e, &s, &gpu_pod("p", SMALL)).one(), "GPU-empty");
    // Binpack skips the fullest card when it does not fit.
    let big = [(GPU, "1"), (MEM, "8000"), (CORES, "1")];
    assert_eq!(
        decide(&e, &s, &with_gpu_policy("binpack", &big)).one(),
        "GPU-mid"
    );
}

#[test]
fn binpack_fills_one_card_before_the_next() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b")])]);
    let mut got = Vec::new();
    for i in 0..4 {
        let mut p = with_gpu_policy("binpack", SMALL);
        p.metadata.name = Some(format!("p{i}"));
        got.push(place(&e, &mut s, &p).one());
    }
    assert_eq!(got, ["GPU-b", "GPU-b", "GPU-b", "GPU-b"]);
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b")])]);
    let mut got = Vec::new();
    for i in 0..4 {
        let mut p = gpu_pod("p", SMALL);
        p.metadata.name = Some(format!("p{i}"));
        got.push(place(&e, &mut s, &p).one());
    }
    assert_eq!(got, ["GPU-b", "GPU-a", "GPU-b", "GPU-a"]);
}

#[test]
fn ties_go_to_the_card_registered_last() {
    let e = engine();
    for order in [["GPU-x", "GPU-y", "GPU-z"], ["GPU-z", "GPU-x", "GPU-y"]] {
        let cards: Vec<DeviceInfo> = order.iter().map(|id| t4(id)).collect();
        let s = snapshot(&e, &[node("n1", &cards)]);
        for policy in ["binpack", "spread"] {
            let out = decide(&e, &s, &with_gpu_policy(policy, SMALL));
            assert_eq!(out.one(), order[2], "{policy} over {order:?}");
        }
    }
    // Equal non-zero usage ties the same way.
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-b"), t4("GPU-a")])]);
    hold(&mut s, "x/1", "n1", "GPU-a,NVIDIA,100,1:;");
    hold(&mut s, "x/2", "n1", "GPU-b,NVIDIA,100,1:;");
    assert_eq!(
        decide(&e, &s, &with_gpu_policy("binpack", SMALL)).one(),
        "GPU-a"
    );
}

/// HAMi's "Spread: NUMA tiebreaker when scores equal" (and binpack's, and
/// mutex's): among equal scores the higher NUMA id wins, with or without
/// NUMA binding, before the registration order.
#[test]
fn equal_scores_go_to_the_higher_numa_node() {
    let e = engine();
    let cards = [with_numa(t4("GPU-n1"), 1), with_numa(t4("GPU-n0"), 0)];
    let s = snapshot(&e, &[node("n1", &cards)]);
    for policy in ["spread", "binpack", "mutex", "binpack,numa", "spread,numa"] {
        let out = decide(&e, &s, &with_gpu_policy(policy, SMALL));
        assert_eq!(out.one(), "GPU-n1", "{policy}");
    }
    assert_eq!(decide(&e, &s, &gpu_pod("p", SMALL)).one(), "GPU-n1");
    let p = pod("p")
        .ctr(SMALL)
        .ann(ann::NVIDIA_NUMA_BIND, "true")
        .build();
    assert_eq!(decide(&e, &s, &p).one(), "GPU-n1");
    // Two cards on the higher NUMA node: the one registered last of them.
    let cards = [
        with_numa(t4("GPU-n1a"), 1),
        with_numa(t4("GPU-n1b"), 1),
        with_numa(t4("GPU-n0"), 0),
    ];
    let s = snapshot(&e, &[node("n1", &cards)]);
    assert_eq!(decide(&e, &s, &gpu_pod("p", SMALL)).one(), "GPU-n1b");
    // The score still comes first: a used NUMA-1 card loses under spread.
    let mut s = snapshot(
        &e,
        &[node(
            "n1",
            &[with_numa(t4("GPU-n1"), 1), with_numa(t4("GPU-n0"), 0)],
        )],
    );
    hold(&mut s, "x/1", "n1", "GPU-n1,NVIDIA,100,1:;");
    for policy in ["spread", "spread,numa"] {
        let out = decide(&e, &s, &with_gpu_policy(policy, SMALL));
        assert_eq!(out.one(), "GPU-n0", "{policy}");
    }
}

#[test]
fn scoring_weights_change_the_choice() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-slots"), t4("GPU-mem")])]);
    let t4_mem = 15360;
    // GPU-slots: 5 small tenants (5/10 slots, 500 MiB). GPU-mem: one tenant
    // with 40% of memory.
    for i in 0..5 {
        hold(&mut s, &format!("x/s{i}"), "n1", "GPU-slots,NVIDIA,100,0:;");
    }
    let big = t4_mem * 4 / 10;
    hold(&mut s, "x/m", "n1", &format!("GPU-mem,NVIDIA,{big},0:;"));
    // Default weights: slots 0.5 + mem ~0.03 beats slots 0.1 + mem 0.4.
    let out = decide(&e, &s, &with_gpu_policy("binpack", SMALL));
    assert_eq!(out.one(), "GPU-slots");
    let weighted = pod("p")
        .ctr(SMALL)
        .ann(ann::GPU_SCHEDULER_POLICY, "binpack")
        .ann(ann::DEVICE_SCORING_WEIGHTS, "slot=1,core=1,memory=3")
        .build();
    assert_eq!(decide(&e, &s, &weighted).one(), "GPU-mem");
    // Spread flips both.
    let weighted_spread = pod("p")
        .ctr(SMALL)
        .ann(ann::DEVICE_SCORING_WEIGHTS, "slot=1,core=1,memory=3")
        .build();
    assert_eq!(decide(&e, &s, &weighted_spread).one(), "GPU-slots");
    assert_eq!(decide(&e, &s, &gpu_pod("p", SMALL)).one(), "GPU-mem");
    // A zero weight drops a term: only memory counts.
    let only_mem = pod("p")
        .ctr(SMALL)
        .ann(ann::GPU_SCHEDULER_POLICY, "binpack")
        .ann(ann::DEVICE_SCORING_WEIGHTS, "slot=0,core=0,memory=1")
        .build();
    assert_eq!(decide(&e, &s, &only_mem).one(), "GPU-mem");
}

#[test]
fn request_terms_count_only_when_the_card_type_is_the_vendor_word() {
    let e = engine();
    // Both empty; the request is 500 MiB. On a card registered as plain
    // "NVIDIA", the request counts: it fills the small card more, so
    // binpack prefers it although it was registered first.
    let s = snapshot(
        &e,
        &[node(
            "n1",
            &[
                card("GPU-small", "NVIDIA", 1000),
                card("GPU-big", "NVIDIA", 2000),
            ],
        )],
    );
    let p = with_gpu_policy("binpack", &[(GPU, "1"), (MEM, "500")]);
    assert_eq!(decide(&e, &s, &p).one(), "GPU-small");
    // With model names (what plugins really register) the request is left
    // out: both cards score 0 and the one registered last wins.
    let s = snapshot(
        &e,
        &[node(
            "n1",
            &[
                card("GPU-small", "NVIDIA-Tesla T4", 1000),
                card("GPU-big", "NVIDIA-Tesla T4", 2000),
            ],
        )],
    );
    assert_eq!(decide(&e, &s, &p).one(), "GPU-big");
}

/// Three nodes of two 1000 MiB cards whose node scores differ per term.
fn three_nodes() -> (hami_sched::Engine, hami_sched::Snapshot) {
    let e = engine();
    let cards = |p: &str| {
        [
            card(&format!("{p}-0"), "NVIDIA-T4", 1000),
            card(&format!("{p}-1"), "NVIDIA-T4", 1000),
        ]
    };
    let mut s = snapshot(
        &e,
        &[
            node("slots", &cards("S")),
            node("mem", &cards("M")),
            node("cores", &cards("C")),
        ],
    );
    // slots: 12/20 slots, 120/2000 MiB, 0 cores -> 10 x (0.6 + 0 + 0.06) = 6.6
    for i in 0..6 {
        hold(
            &mut s,
            &format!("x/s{i}"),
            "slots",
            "S-0,NVIDIA,10,0:S-1,NVIDIA,10,0:;",
        );
    }
    // mem: 1/20 slots, 1000/2000 MiB, 0 cores -> 10 x (0.05 + 0 + 0.5) = 5.5
    hold(&mut s, "x/m", "mem", "M-0,NVIDIA,1000,0:;");
    // cores: 2/20 slots, 20/2000 MiB, 100/200 cores -> 10 x (0.1 + 0.5 + 0.01) = 6.1
    hold(
        &mut s,
        "x/c",
        "cores",
        "C-0,NVIDIA,10,50:C-1,NVIDIA,10,50:;",
    );
    (e, s)
}

#[test]
fn node_score_formula() {
    let (_, s) = three_nodes();
    let score = |n: &str| node_score(&s.node(n).unwrap().totals);
    assert!((score("slots") - 6.6).abs() < 1e-9, "{}", score("slots"));
    assert!((score("mem") - 5.5).abs() < 1e-9, "{}", score("mem"));
    assert!((score("cores") - 6.1).abs() < 1e-9, "{}", score("cores"));
}

#[test]
fn node_binpack_takes_the_highest_score_spread_the_lowest() {
    let (e, s) = three_nodes();
    let p = |policy: &str| {
        pod("p")
            .ctr(&[(GPU, "1"), (MEM, "10"), (CORES, "1")])
            .ann(ann::NODE_SCHEDULER_POLICY, policy)
            .build()
    };
    assert_eq!(decide(&e, &s, &p("binpack")).node.as_deref(), Some("slots"));
    assert_eq!(decide(&e, &s, &p("spread")).node.as_deref(), Some("mem"));
    // Binpack is the default.
    assert_eq!(
        decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "10")]))
            .node
            .as_deref(),
        Some("slots")
    );
    // The best node that fits. Free per card: "slots" 940 MiB on both,
    // "mem" 0 and 1000, "cores" 990 on both.
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "991")]));
    assert_eq!(out.node, None);
    assert_eq!(out.rejected.len(), 3);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "941")]));
    assert_eq!(out.node.as_deref(), Some("cores"));
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "940")]));
    assert_eq!(out.node.as_deref(), Some("slots"));
}

#[test]
fn node_ties_keep_candidate_order() {
    let e = engine();
    let s = snapshot(&e, &[node("a", &[t4("A")]), node("b", &[t4("B")])]);
    let req = request(&e, &gpu_pod("p", SMALL));
    let order = vec!["b".to_string(), "a".to_string()];
    for mode in [Mode::Explain, Mode::Fast] {
        assert_eq!(e.filter(&s, &req, None, mode).node, Some("a"));
        assert_eq!(e.filter(&s, &req, Some(&order), mode).node, Some("b"));
    }
}

#[test]
fn pod_annotations_override_the_default_policies() {
    let defaults = Policies {
        node: NodePolicy::Spread,
        gpu: GpuPolicy::Binpack,
    };
    let e = engine_with(NvidiaConfig::default(), defaults);
    let (_, mut s) = three_nodes();
    s.upsert_node(
        "slots",
        hami_sched::NodeDevices {
            devices: vec![
                card("S-0", "NVIDIA-T4", 1000),
                card("S-1", "NVIDIA-T4", 1000),
            ],
            ..Default::default()
        },
    );
    hold(&mut s, "x/extra", "slots", "S-0,NVIDIA,10,0:;");
    // Defaults: spread nodes ("mem"), binpack cards (its used card M-0 is full,
    // so M-1)...
    let plain = gpu_pod("p", SMALL);
    let out = decide(&e, &s, &plain);
    assert_eq!(out.node.as_deref(), Some("mem"));
    assert_eq!(out.one(), "M-1");
    // ...overridden: binpack nodes ("slots"), and on it binpack cards picks
    // the fuller S-0 while spread picks S-1.
    let over = pod("p")
        .ctr(SMALL)
        .ann(ann::NODE_SCHEDULER_POLICY, "binpack")
        .build();
    let out = decide(&e, &s, &over);
    assert_eq!(out.node.as_deref(), Some("slots"));
    assert_eq!(out.one(), "S-0");
    let over = pod("p")
        .ctr(SMALL)
        .ann(ann::NODE_SCHEDULER_POLICY, "binpack")
        .ann(ann::GPU_SCHEDULER_POLICY, "spread")
        .build();
    let out = decide(&e, &s, &over);
    assert_eq!(out.one(), "S-1");
}
