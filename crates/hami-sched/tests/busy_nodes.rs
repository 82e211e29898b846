//! Binds in flight as an engine input: a node whose bind lock is held by a
//! pod still waiting for its device plugin is offered only when nothing
//! else fits (the extender's rule, so `hami schedule` reproduces it).

mod common;

use common::*;
use hami_api::annotations as ann;
use hami_api::node::NodeLock;
use hami_sched::{BindInFlight, BusyRule, LockHolder, Mode, Snapshot};
use jiff::{SignedDuration, Timestamp};

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

const SMALL: &[(&str, &str)] = &[(GPU, "1"), (MEM, "100")];

fn rule(now: &str) -> BusyRule {
    BusyRule {
        now: t(now),
        busy_after: SignedDuration::from_secs(5),
    }
}

fn waiting(holder: &str, since: &str) -> BindInFlight {
    BindInFlight {
        holder: holder.into(),
        since: t(since),
        waiting_for_device_plugin: true,
    }
}

/// n1 holds one pod (binpack prefers it), n2 is empty; n1's lock is held.
fn two_nodes(bind: BindInFlight) -> (hami_sched::Engine, Snapshot) {
    let e = engine();
    let mut s = snapshot(
        &e,
        &[node("n1", &[t4("GPU-1")]), node("n2", &[t4("GPU-2")])],
    );
    hold(&mut s, "ns/holder", "n1", "GPU-1,NVIDIA,100,0:;");
    s.set_bind_in_flight("n1", bind);
    (e, s)
}

fn decide_busy(
    e: &hami_sched::Engine,
    s: &Snapshot,
    pod: &k8s_openapi::api::core::v1::Pod,
    rule: BusyRule,
) -> (Option<String>, Vec<(String, String)>) {
    let req = request(e, pod);
    let d = e.filter_avoiding_busy(s, &req, None, Mode::Explain, rule);
    let fast = e.filter_avoiding_busy(s, &req, None, Mode::Fast, rule);
    assert_eq!((d.node, &d.devices), (fast.node, &fast.devices));
    let busy = d
        .busy
        .iter()
        .map(|(n, b)| (n.to_string(), b.reason()))
        .collect();
    (d.node.map(str::to_string), busy)
}

#[test]
fn a_node_with_a_long_held_lock_is_offered_last() {
    let (e, mut s) = two_nodes(waiting("ns/holder", "2026-01-01T00:09:00Z"));
    let p = gpu_pod("p", SMALL);
    // Without the rule binpack takes n1, the fuller node.
    assert_eq!(decide(&e, &s, &p).node.as_deref(), Some("n1"));
    let (node, busy) = decide_busy(&e, &s, &p, rule("2026-01-01T00:10:00Z"));
    assert_eq!(node.as_deref(), Some("n2"));
    assert_eq!(
        busy,
        [(
            "n1".to_string(),
            "NodeLockBusy: bind lock held by ns/holder since 2026-01-01T00:09:00Z (its device plugin has not allocated yet)".to_string()
        )]
    );
    // A fresh lock does not count for binpack.
    let (node, busy) = decide_busy(&e, &s, &p, rule("2026-01-01T00:09:03Z"));
    assert_eq!((node.as_deref(), busy.len()), (Some("n1"), 0));
    // Nor a lock the pod itself holds (a retried bind).
    let own = pod("holder").ns("ns").ctr(SMALL).build();
    let (node, _) = decide_busy(&e, &s, &own, rule("2026-01-01T00:10:00Z"));
    assert_eq!(node.as_deref(), Some("n1"));
    // Once the holder's device plugin allocated, the lock no longer counts.
    s.set_bind_in_flight(
        "n1",
        BindInFlight {
            waiting_for_device_plugin: false,
            ..waiting("ns/holder", "2026-01-01T00:09:00Z")
        },
    );
    assert_eq!(
        decide_busy(&e, &s, &p, rule("2026-01-01T00:10:00Z"))
            .0
            .as_deref(),
        Some("n1")
    );
    s.clear_bind_in_flight("n1");
    assert_eq!(
        decide_busy(&e, &s, &p, rule("2026-01-01T00:10:00Z"))
            .0
            .as_deref(),
        Some("n1")
    );
}

#[test]
fn a_busy_node_is_still_better_than_none() {
    let (e, s) = two_nodes(waiting("ns/holder", "2026-01-01T00:09:00Z"));
    let now = rule("2026-01-01T00:10:00Z");
    // Only n1 is a candidate: it is offered.
    let req = request(&e, &gpu_pod("p", SMALL));
    let only = ["n1".to_string()];
    let d = e.filter_avoiding_busy(&s, &req, Some(&only), Mode::Explain, now);
    assert_eq!((d.node, d.busy.len()), (Some("n1"), 0));
    // The pod fits only on n1 (GPU-1 is the only card with room for it).
    let mut s = s;
    hold(&mut s, "ns/big", "n2", "GPU-2,NVIDIA,15000,0:;");
    let (node, busy) = decide_busy(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "1000")]), now);
    assert_eq!((node.as_deref(), busy.len()), (Some("n1"), 0));
}

#[test]
fn spread_pods_avoid_any_node_with_a_bind_in_flight() {
    // Both nodes empty: spread would take n1 (first among equals).
    let e = engine();
    let mut s = snapshot(
        &e,
        &[node("n1", &[t4("GPU-1")]), node("n2", &[t4("GPU-2")])],
    );
    s.set_bind_in_flight("n1", waiting("ns/inflight", "2026-01-01T00:09:59Z"));
    let now = rule("2026-01-01T00:10:00Z");
    let spread = pod("p")
        .ctr(SMALL)
        .ann(ann::NODE_SCHEDULER_POLICY, "spread")
        .build();
    assert_eq!(decide(&e, &s, &spread).node.as_deref(), Some("n1"));
    let (node, busy) = decide_busy(&e, &s, &spread, now);
    assert_eq!(node.as_deref(), Some("n2"));
    assert_eq!(busy[0].0, "n1");
    // A binpack pod waits for the lock to look stuck before avoiding it.
    let (node, _) = decide_busy(&e, &s, &gpu_pod("b", SMALL), now);
    assert_eq!(node.as_deref(), Some("n1"));
}

#[test]
fn a_bind_in_flight_is_read_from_the_lock_and_its_holder() {
    let lock = NodeLock::decode("2026-01-01T00:09:00Z,ns,holder").unwrap();
    let now = t("2026-01-01T00:10:00Z");
    let holder = |phase: &str, bind_phase: &str, node: &str| {
        pod("holder")
            .ns("ns")
            .ctr(SMALL)
            .bound(node, "GPU-1,NVIDIA,100,0:;")
            .ann(ann::BIND_PHASE, bind_phase)
            .phase(phase)
            .build()
    };
    let b = BindInFlight::from_lock(
        "n1",
        &lock,
        Some(LockHolder::of(&holder("Pending", "allocating", "n1"))),
        now,
    );
    assert_eq!(b, waiting("ns/holder", "2026-01-01T00:09:00Z"));
    for p in [
        holder("Pending", "success", "n1"),
        holder("Running", "allocating", "n1"),
        holder("Pending", "allocating", "n2"),
    ] {
        assert!(
            !BindInFlight::from_lock("n1", &lock, Some(LockHolder::of(&p)), now)
                .waiting_for_device_plugin
        );
    }
    // A holder not seen yet counts only while the lock is new.
    assert!(!BindInFlight::from_lock("n1", &lock, None, now).waiting_for_device_plugin);
    let young = t("2026-01-01T00:09:03Z");
    assert!(BindInFlight::from_lock("n1", &lock, None, young).waiting_for_device_plugin);
}
