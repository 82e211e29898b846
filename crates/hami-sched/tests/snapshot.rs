//! The cluster snapshot built from Kubernetes Node and Pod objects, and its
//! incremental, exact usage accounting.

mod common;

use common::*;
use hami_api::annotations as ann;
use hami_sched::snapshot::NodeTotals;
use hami_sched::{Engine, Snapshot, Usage};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn u(slots: u32, mem: u64, cores: u32) -> Usage {
    Usage { slots, mem, cores }
}

#[test]
fn nodes_register_from_json_and_legacy_annotations() {
    let e = engine();
    let mut s = Snapshot::new();
    assert!(
        e.add_node(&mut s, &node("json", &[t4("GPU-a"), a100("GPU-b")]))
            .unwrap()
    );
    let mut legacy = node("legacy", &[]);
    legacy.metadata.annotations.as_mut().unwrap().insert(
        ann::NODE_NVIDIA_REGISTER.into(),
        "GPU-x,10,15360,100,NVIDIA-Tesla T4,1,true:GPU-y,4,8000,100,NVIDIA-Tesla T4,0,false,1,mig:"
            .into(),
    );
    assert!(e.add_node(&mut s, &legacy).unwrap());
    let n = s.node("legacy").unwrap();
    assert_eq!(n.devices.len(), 2);
    assert_eq!(n.devices[0].info.numa, 1);
    assert!(n.devices[0].usable());
    assert!(!n.devices[1].usable(), "health false");
    assert_eq!(n.devices[1].info.mode(), hami_api::DeviceMode::Mig);
    assert_eq!(
        n.totals,
        NodeTotals {
            slots: 14,
            cores: 200,
            mem: 23360,
            ..Default::default()
        }
    );
    assert_eq!(s.nodes().len(), 2);
    // A legacy card with health true is placeable.
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .ann(ann::NVIDIA_USE_GPUUUID, "GPU-x")
        .build();
    assert_eq!(decide(&e, &s, &p).node.as_deref(), Some("legacy"));
}

#[test]
fn nodes_without_devices_or_with_bad_annotations_are_left_out() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a")])]);
    let mut bare = node("bare", &[]);
    bare.metadata.annotations = None;
    assert!(!e.add_node(&mut s, &bare).unwrap());
    assert!(s.node("bare").is_none());
    // n1 re-registers with a broken value: an error naming the annotation,
    // and its cards are dropped.
    let mut broken = node("n1", &[]);
    broken
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ann::NODE_NVIDIA_REGISTER.into(), "[{\"id\":".into());
    let err = e.add_node(&mut s, &broken).unwrap_err();
    assert_eq!(err.source, ann::NODE_NVIDIA_REGISTER);
    assert!(s.node("n1").is_none());
    assert!(s.nodes().is_empty());
    // Link scores are optional: a malformed value costs topology, not the node.
    let bad_scores = node_with("n2", &[t4("GPU-a")], &[(ann::NODE_NVIDIA_SCORE, "{")]);
    assert!(e.add_node(&mut s, &bad_scores).unwrap());
    assert!(s.node("n2").unwrap().pair_scores.is_empty());
}

#[test]
fn cordon_annotation_marks_cards() {
    let e = engine();
    let s = snapshot(
        &e,
        &[node_with(
            "n1",
            &[t4("GPU-a"), t4("GPU-b")],
            &[(ann::DEVICE_CORDON, "GPU-b, GPU-zz")],
        )],
    );
    let n = s.node("n1").unwrap();
    assert!(!n.devices[0].cordoned);
    assert!(n.devices[1].cordoned);
}

fn bound_pod(name: &str, allocated: &str) -> common::PodB {
    pod(name)
        .ctr(&[(GPU, "1"), (MEM, "1000"), (CORES, "10")])
        .bound("n1", allocated)
}

#[test]
fn which_pods_hold_capacity() {
    let e = engine();
    let alloc = "GPU-a,NVIDIA,1000,10:;";
    for phase in ["Succeeded", "Failed"] {
        let p = bound_pod("p", alloc).phase(phase).build();
        assert_eq!(e.pod_record(&p).unwrap(), None, "{phase}");
    }
    for phase in [None, Some("Pending"), Some("Running"), Some("Unknown")] {
        let mut b = bound_pod("p", alloc);
        if let Some(ph) = phase {
            b = b.phase(ph);
        }
        let r = e.pod_record(&b.build()).unwrap().expect("holds");
        assert_eq!(r.node, "n1");
        assert_eq!(
            r.held(),
            &[("GPU-a".to_string(), u(1, 1000, 10))],
            "{phase:?}"
        );
    }
    // Terminating pods hold until they are gone.
    let mut p = bound_pod("p", alloc).phase("Running").build();
    p.metadata.deletion_timestamp = Some(Time(Default::default()));
    assert!(e.pod_record(&p).unwrap().is_some());
    // Not assigned by us, or assigned nothing: holds nothing.
    let p = pod("p").ctr(&[(GPU, "1")]).phase("Running").build();
    assert_eq!(e.pod_record(&p).unwrap(), None);
    let p = bound_pod("p", ";;").phase("Running").build();
    assert_eq!(e.pod_record(&p).unwrap(), None);
    // A bind the scheduler gave up on holds nothing, unless the pod runs anyway.
    for phase in [None, Some("Pending")] {
        let mut b = bound_pod("p", alloc).ann(ann::BIND_PHASE, "failed");
        if let Some(ph) = phase {
            b = b.phase(ph);
        }
        assert_eq!(e.pod_record(&b.build()).unwrap(), None, "{phase:?}");
    }
    let p = bound_pod("p", alloc)
        .ann(ann::BIND_PHASE, "failed")
        .phase("Running")
        .build();
    assert!(
        e.pod_record(&p).unwrap().is_some(),
        "a running pod uses its cards"
    );
    let p = bound_pod("p", alloc)
        .ann(ann::BIND_PHASE, "allocating")
        .build();
    assert!(e.pod_record(&p).unwrap().is_some());
    // The annotations alone hold nothing: a pending pod that is not bound
    // (forged annotations, or a bind that has not landed), or a pod bound
    // to another node than its allocation names.
    let forged = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "1000"), (CORES, "10")])
        .annotated("n1", alloc);
    assert_eq!(e.pod_record(&forged.clone().build()).unwrap(), None);
    assert_eq!(
        e.pod_record(&forged.clone().phase("Running").build())
            .unwrap(),
        None
    );
    assert_eq!(
        e.pod_record(&forged.node_name("n2").phase("Running").build())
            .unwrap(),
        None
    );
    // A broken allocation is an error naming the annotation.
    let p = bound_pod("p", "GPU-a,NVIDIA,lots,10:;").build();
    let err = e.pod_record(&p).unwrap_err();
    assert_eq!(err.source, ann::NVIDIA_DEVICES_ALLOCATED);
}

#[test]
fn a_pod_still_initialising_holds_the_larger_of_init_and_app_usage() {
    let e = engine();
    // init: 3000 MiB / 50 cores on a; app: 1000 + 500 MiB on a, 200 on b.
    let alloc =
        "GPU-a,NVIDIA,3000,50:;GPU-a,NVIDIA,1000,10:;GPU-a,NVIDIA,500,5:GPU-b,NVIDIA,200,0:;";
    let b = pod("p")
        .init(&[(GPU, "1")])
        .ctr(&[(GPU, "1")])
        .ctr(&[(GPU, "2")])
        .bound("n1", alloc);
    let pending = e
        .pod_record(&b.clone().phase("Pending").build())
        .unwrap()
        .unwrap();
    assert_eq!(pending.init_count, 1);
    assert_eq!(
        pending.held(),
        &[
            ("GPU-a".to_string(), u(2, 3000, 50)),
            ("GPU-b".to_string(), u(1, 200, 0)),
        ]
    );
    let running = e.pod_record(&b.phase("Running").build()).unwrap().unwrap();
    assert_eq!(
        running.held(),
        &[
            ("GPU-a".to_string(), u(2, 1500, 15)),
            ("GPU-b".to_string(), u(1, 200, 0)),
        ]
    );
    // In the snapshot.
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b")])]);
    s.add_pod("default/p", pending);
    assert_eq!(used(&s, "n1", "GPU-a"), (2, 3000, 50));
    // The pod starts running: its record is replaced, not added twice.
    s.add_pod("default/p", running);
    assert_eq!(used(&s, "n1", "GPU-a"), (2, 1500, 15));
    assert_eq!(s.node("n1").unwrap().totals.used_mem, 1700);
}

#[test]
fn snapshot_from_objects_then_schedule_around_them() {
    let e = engine();
    let mut s = snapshot(
        &e,
        &[node(
            "n1",
            &[
                card("GPU-a", "NVIDIA-T4", 1000),
                card("GPU-b", "NVIDIA-T4", 1000),
            ],
        )],
    );
    let pods = [
        bound_pod("run", "GPU-b,NVIDIA,900,10:;")
            .phase("Running")
            .build(),
        bound_pod("done", "GPU-a,NVIDIA,900,10:;")
            .phase("Succeeded")
            .build(),
        bound_pod("other", "GPU-a,NVIDIA,50,10:;")
            .ns("team")
            .build(),
    ];
    for p in &pods {
        if let Some(r) = e.pod_record(p).unwrap() {
            s.add_pod(&hami_sched::pod_key(p), r);
        }
    }
    assert!(s.pod("default/run").is_some());
    assert!(s.pod("default/done").is_none());
    assert!(s.pod("team/other").is_some());
    assert_eq!(used(&s, "n1", "GPU-a"), (1, 50, 10));
    assert_eq!(used(&s, "n1", "GPU-b"), (1, 900, 10));
    // 901 MiB fits on a only (the Succeeded pod's 900 MiB is free again).
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "901")]));
    assert_eq!(out.one(), "GPU-a");
}

#[test]
fn add_then_remove_restores_usage_exactly() {
    let e = engine();
    let mut s = snapshot(
        &e,
        &[
            node("n1", &[t4("GPU-a"), t4("GPU-b")]),
            node("n2", &[a100("GPU-c")]),
        ],
    );
    hold(&mut s, "x/base", "n1", "GPU-a,NVIDIA,700,7:;");
    let before = state(&s);
    let mut placed = Vec::new();
    for i in 0..12 {
        let p = pod(&format!("p{i}"))
            .init(&[(GPU, "1"), (MEM, "300"), (CORES, "3")])
            .ctr(&[(GPU, "2"), (MEM, "100"), (CORES, "1")])
            .build();
        if place(&e, &mut s, &p).node.is_some() {
            placed.push(hami_sched::pod_key(&p));
        }
    }
    assert!(placed.len() >= 4, "{placed:?}");
    assert_ne!(state(&s), before);
    // Remove in a different order than added.
    placed.reverse();
    placed.rotate_left(1);
    for k in &placed {
        assert!(s.remove_pod(k).is_some());
        assert!(s.remove_pod(k).is_none(), "removed twice");
    }
    assert_eq!(state(&s), before);
}

#[test]
fn usage_survives_node_reregistration_and_late_registration() {
    let e = engine();
    let mut s = Snapshot::new();
    // The pod is seen before its node registers.
    let p = bound_pod("p", "GPU-a,NVIDIA,1000,10:GPU-gone,NVIDIA,5,5:;").build();
    s.add_pod("default/p", e.pod_record(&p).unwrap().unwrap());
    assert!(s.node("n1").is_none());
    e.add_node(&mut s, &node("n1", &[t4("GPU-a"), t4("GPU-b")]))
        .unwrap();
    assert_eq!(used(&s, "n1", "GPU-a"), (1, 1000, 10));
    assert_eq!(s.node("n1").unwrap().totals.used_mem, 1000);
    // Re-registration with a card added (the missing one comes back) and
    // another order.
    e.add_node(
        &mut s,
        &node("n1", &[t4("GPU-gone"), t4("GPU-b"), t4("GPU-a")]),
    )
    .unwrap();
    assert_eq!(used(&s, "n1", "GPU-a"), (1, 1000, 10));
    assert_eq!(used(&s, "n1", "GPU-gone"), (1, 5, 5));
    assert_eq!(s.node("n1").unwrap().totals.used_mem, 1005);
    // Node leaves and comes back: the pod's hold is still there.
    let mut bare = node("n1", &[]);
    bare.metadata.annotations = None;
    assert!(!e.add_node(&mut s, &bare).unwrap());
    assert!(s.node("n1").is_none());
    e.add_node(&mut s, &node("n1", &[t4("GPU-a")])).unwrap();
    assert_eq!(used(&s, "n1", "GPU-a"), (1, 1000, 10));
    s.remove_pod("default/p");
    assert_eq!(used(&s, "n1", "GPU-a"), (0, 0, 0));
    assert_eq!(s.node("n1").unwrap().totals.used_slots, 0);
}

#[test]
fn removing_a_node_keeps_the_others_addressable() {
    let e = engine();
    let mut s = snapshot(
        &e,
        &[
            node("a", &[t4("A")]),
            node("b", &[t4("B")]),
            node("c", &[t4("C")]),
        ],
    );
    assert!(s.remove_node("a"));
    assert!(!s.remove_node("a"));
    assert_eq!(s.node("b").unwrap().devices[0].info.id, "B");
    assert_eq!(s.node("c").unwrap().devices[0].info.id, "C");
    assert_eq!(s.node_position("c"), Some(1));
    hold(&mut s, "x/1", "c", "C,NVIDIA,10,1:;");
    assert_eq!(used(&s, "c", "C"), (1, 10, 1));
}

#[test]
fn reserve_records_the_decision_for_the_next_pod() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[card("GPU-a", "NVIDIA-T4", 1000)])]);
    let p = pod("p")
        .init(&[(GPU, "1"), (MEM, "800")])
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .build();
    let out = place(&e, &mut s, &p);
    assert_eq!(out.node.as_deref(), Some("n1"));
    // A freshly placed pod has not started: it holds its init container's share.
    // Init and app containers never run together: one slot, the larger share.
    assert_eq!(used(&s, "n1", "GPU-a"), (1, 800, 0));
    let rec = s.pod("default/p").unwrap();
    assert_eq!(rec.devices, out.devices);
    assert!(
        decide(&e, &s, &gpu_pod("q", &[(GPU, "1"), (MEM, "201")]))
            .node
            .is_none()
    );
    assert!(
        decide(&e, &s, &gpu_pod("q", &[(GPU, "1"), (MEM, "200")]))
            .node
            .is_some()
    );
}

#[test]
fn hostile_allocations_do_not_break_accounting() {
    // Pod annotations are written by users too; absurd values must not
    // panic or corrupt the totals, and removal must still be exact.
    let e = Engine::default();
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a")])]);
    let before = state(&s);
    let huge = format!("GPU-a,NVIDIA,{},{}:;", u64::MAX, u32::MAX);
    for i in 0..3 {
        let p = bound_pod(&format!("h{i}"), &huge).build();
        let r = e.pod_record(&p).unwrap().unwrap();
        s.add_pod(&format!("default/h{i}"), r);
    }
    // The card is full by any measure.
    let out = decide(
        &e,
        &s,
        &gpu_pod("p", &[(GPU, "1"), (MEM, "1"), (CORES, "0")]),
    );
    assert_eq!(out.node, None);
    for i in 0..3 {
        s.remove_pod(&format!("default/h{i}"));
    }
    assert_eq!(state(&s), before);
}

#[test]
fn absurd_registered_capacity_does_not_panic() {
    // A record may claim any u64 of memory; summing two such cards for the
    // node's totals must not overflow.
    let e = engine();
    let s = snapshot(
        &e,
        &[node(
            "n1",
            &[
                card("GPU-a", "NVIDIA-X", u64::MAX),
                card("GPU-b", "NVIDIA-X", u64::MAX),
            ],
        )],
    );
    assert_eq!(s.node("n1").unwrap().totals.mem, u64::MAX);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "1000")]));
    assert_eq!(out.node.as_deref(), Some("n1"));
}
