//! The placement policies: mutex, NUMA binding and topology-aware pairs.

mod common;

use common::*;
use hami_api::annotations as ann;
use k8s_openapi::api::core::v1::Pod;

const SMALL: &[(&str, &str)] = &[(GPU, "1"), (MEM, "100"), (CORES, "1")];

fn with(policy: &str, kv: &[(&str, &str)]) -> Pod {
    pod("p")
        .ctr(kv)
        .ann(ann::GPU_SCHEDULER_POLICY, policy)
        .build()
}

fn set(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn mutex_takes_only_idle_cards() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b"), t4("GPU-c")])]);
    hold(&mut s, "x/1", "n1", "GPU-a,NVIDIA,100,1:;");
    hold(&mut s, "x/2", "n1", "GPU-b,NVIDIA,5000,10:;");
    hold(&mut s, "x/3", "n1", "GPU-c,NVIDIA,200,1:;");
    // Spread would share the least used card...
    assert_eq!(decide(&e, &s, &gpu_pod("p", SMALL)).one(), "GPU-a");
    // ...mutex refuses every busy card.
    let out = decide(&e, &s, &with("mutex", SMALL));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "3/3 CardInUseMutex");
    // An idle card, even registered first, is taken.
    let mut s = snapshot(
        &e,
        &[node("n1", &[t4("GPU-idle"), t4("GPU-a"), t4("GPU-b")])],
    );
    hold(&mut s, "x/1", "n1", "GPU-a,NVIDIA,100,1:;");
    hold(&mut s, "x/2", "n1", "GPU-b,NVIDIA,100,1:;");
    assert_eq!(decide(&e, &s, &with("mutex", SMALL)).one(), "GPU-idle");
}

#[test]
fn mutex_containers_of_one_pod_do_not_share() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b")])]);
    let two = pod("p")
        .ctr(SMALL)
        .ctr(SMALL)
        .ann(ann::GPU_SCHEDULER_POLICY, "mutex")
        .build();
    let out = decide(&e, &s, &two);
    assert_eq!(set(out.uuids().concat()), ["GPU-a", "GPU-b"]);
    let three = pod("p")
        .ctr(SMALL)
        .ctr(SMALL)
        .ctr(SMALL)
        .ann(ann::GPU_SCHEDULER_POLICY, "mutex")
        .build();
    let out = decide(&e, &s, &three);
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "2/2 CardInUseMutex");
}

fn numa_node() -> Vec<hami_api::DeviceInfo> {
    // NUMA 0: b, c. NUMA 1: a (registered last, so preferred by ties).
    vec![
        with_numa(t4("GPU-b"), 0),
        with_numa(t4("GPU-c"), 0),
        with_numa(t4("GPU-a"), 1),
    ]
}

#[test]
fn numa_bind_takes_every_card_from_one_numa_node() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &numa_node())]);
    let two = [(GPU, "2"), (MEM, "100")];
    // Unbound: the two cards registered last, across NUMA nodes.
    let out = decide(&e, &s, &gpu_pod("p", &two));
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-a", "GPU-c"]);
    let bound = [
        pod("p")
            .ctr(&two)
            .ann(ann::NVIDIA_NUMA_BIND, "true")
            .build(),
        with("spread,numa", &two),
        with("binpack,numa", &two),
    ];
    for p in &bound {
        let out = decide(&e, &s, p);
        assert_eq!(set(out.uuids()[0].clone()), ["GPU-b", "GPU-c"]);
    }
    // "false" binds nothing.
    let p = pod("p")
        .ctr(&two)
        .ann(ann::NVIDIA_NUMA_BIND, "false")
        .build();
    assert_eq!(
        set(decide(&e, &s, &p).uuids()[0].clone()),
        ["GPU-a", "GPU-c"]
    );
}

#[test]
fn numa_bind_skips_a_numa_node_whose_cards_do_not_fit() {
    let e = engine();
    let cards = [
        with_numa(t4("GPU-a"), 0),
        with_numa(t4("GPU-b"), 0),
        with_numa(t4("GPU-c"), 1),
        with_numa(t4("GPU-d"), 1),
    ];
    let mut s = snapshot(&e, &[node("n1", &cards)]);
    hold(&mut s, "x/1", "n1", "GPU-d,NVIDIA,15000,0:;");
    let p = pod("p")
        .ctr(&[(GPU, "2"), (MEM, "1000")])
        .ann(ann::NVIDIA_NUMA_BIND, "true")
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-a", "GPU-b"]);
}

#[test]
fn numa_not_fit_when_fitting_cards_span_numa_nodes() {
    let e = engine();
    let s = snapshot(
        &e,
        &[node(
            "n1",
            &[with_numa(t4("GPU-a"), 0), with_numa(t4("GPU-b"), 1)],
        )],
    );
    let p = pod("p")
        .ctr(&[(GPU, "2"), (MEM, "100")])
        .ann(ann::NVIDIA_NUMA_BIND, "true")
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "2/2 NumaNotFit");
    // The same pod unbound fits.
    assert!(
        decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "100")]))
            .node
            .is_some()
    );
}

#[test]
fn numa_bind_applies_per_container() {
    let e = engine();
    let cards = [
        with_numa(t4("GPU-a"), 0),
        with_numa(t4("GPU-b"), 0),
        with_numa(t4("GPU-c"), 1),
        with_numa(t4("GPU-d"), 1),
    ];
    let s = snapshot(&e, &[node("n1", &cards)]);
    let p = pod("p")
        .ctr(&[(GPU, "2"), (PCT, "100")])
        .ctr(&[(GPU, "2"), (PCT, "100")])
        .ann(ann::NVIDIA_NUMA_BIND, "true")
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-c", "GPU-d"]);
    assert_eq!(set(out.uuids()[1].clone()), ["GPU-a", "GPU-b"]);
}

/// Four cards: c-d linked by two NVLinks, a-b by one, the rest over PCIe
/// (a's cross links weaker than b's).
fn linked() -> k8s_openapi::api::core::v1::Node {
    let scores = r#"[
        {"uuid":"GPU-a","score":{"GPU-b":100,"GPU-c":10,"GPU-d":10}},
        {"uuid":"GPU-b","score":{"GPU-a":100,"GPU-c":20,"GPU-d":20}},
        {"uuid":"GPU-c","score":{"GPU-a":10,"GPU-b":20,"GPU-d":200}},
        {"uuid":"GPU-d","score":{"GPU-a":10,"GPU-b":20,"GPU-c":200}}
    ]"#;
    node_with(
        "n1",
        &[t4("GPU-c"), t4("GPU-a"), t4("GPU-d"), t4("GPU-b")],
        &[(ann::NODE_NVIDIA_SCORE, scores)],
    )
}

#[test]
fn topology_aware_takes_the_best_linked_pair() {
    let e = engine();
    let mut s = snapshot(&e, &[linked()]);
    let two = [(GPU, "2"), (MEM, "100")];
    // Spread alone would take the two registered last: d and b.
    assert_eq!(
        set(decide(&e, &s, &gpu_pod("p", &two)).uuids()[0].clone()),
        ["GPU-b", "GPU-d"]
    );
    let out = decide(&e, &s, &with("topology-aware", &two));
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-c", "GPU-d"]);
    // With c unable to fit, the next best pair is a-b.
    hold(&mut s, "x/1", "n1", "GPU-c,NVIDIA,15360,0:;");
    let out = decide(&e, &s, &with("topology-aware", &two));
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-a", "GPU-b"]);
}

#[test]
fn topology_aware_single_card_takes_the_weakest_linked() {
    let e = engine();
    let mut s = snapshot(&e, &[linked()]);
    // Links to the other free cards: a 120, b 140, c 230, d 230.
    let out = decide(&e, &s, &with("topology-aware", SMALL));
    assert_eq!(out.one(), "GPU-a");
    // Once a is busy, b has links of 40 to the free cards, c and d 220 each.
    let out = place(&e, &mut s, &with("topology-aware", SMALL));
    assert_eq!(out.one(), "GPU-a");
    let mut p = with("topology-aware", SMALL);
    p.metadata.name = Some("q".into());
    assert_eq!(decide(&e, &s, &p).one(), "GPU-b");
}

#[test]
fn topology_aware_needs_enough_fitting_cards() {
    let e = engine();
    let s = snapshot(&e, &[linked()]);
    let out = decide(&e, &s, &with("topology-aware", &[(GPU, "5"), (MEM, "100")]));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "4/4 AllocatedCardsInsufficientRequest");
    let out = decide(&e, &s, &with("topology-aware", &[(GPU, "4"), (MEM, "100")]));
    assert_eq!(
        set(out.uuids()[0].clone()),
        ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    );
}

#[test]
fn topology_aware_with_numa_stays_on_one_numa_node() {
    let e = engine();
    // The strongest pair (c-d) spans NUMA nodes; a-b shares NUMA 0.
    let scores = r#"[
        {"uuid":"GPU-a","score":{"GPU-b":100,"GPU-c":10,"GPU-d":10}},
        {"uuid":"GPU-c","score":{"GPU-b":20,"GPU-d":200}},
        {"uuid":"GPU-d","score":{"GPU-b":20}}
    ]"#;
    let n = node_with(
        "n1",
        &[
            with_numa(t4("GPU-a"), 0),
            with_numa(t4("GPU-b"), 0),
            with_numa(t4("GPU-c"), 0),
            with_numa(t4("GPU-d"), 1),
        ],
        &[(ann::NODE_NVIDIA_SCORE, scores)],
    );
    let s = snapshot(&e, &[n]);
    let two = [(GPU, "2"), (MEM, "100")];
    let out = decide(&e, &s, &with("topology-aware", &two));
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-c", "GPU-d"]);
    let out = decide(&e, &s, &with("topology-aware,numa", &two));
    assert_eq!(set(out.uuids()[0].clone()), ["GPU-a", "GPU-b"]);
}
