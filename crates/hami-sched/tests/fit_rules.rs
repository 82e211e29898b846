//! Every fit rule of spec section 6, each shown to reject a card that would
//! otherwise be taken, with the reason named and formatted as HAMi does.

mod common;

use common::*;
use hami_api::annotations as ann;
use hami_api::{DeviceMode, NvidiaConfig};
use hami_sched::{Mode, Policies};

fn one_card(d: hami_api::DeviceInfo) -> hami_sched::Snapshot {
    snapshot(&engine(), &[node("n1", &[d])])
}

#[test]
fn a_record_without_health_is_unhealthy() {
    let e = engine();
    // What the Go plugin writes for an unhealthy card: no "health" key at all.
    let unhealthy = r#"[{"id":"GPU-a","count":10,"devmem":1000,"devcore":100,"type":"NVIDIA-T4"}]"#;
    let healthy = r#"[{"id":"GPU-b","count":10,"devmem":1000,"devcore":100,"type":"NVIDIA-T4","health":true}]"#;
    let mut n1 = node("n1", &[]);
    n1.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ann::NODE_NVIDIA_REGISTER.into(), unhealthy.into());
    let s = snapshot(&e, &[n1.clone()]);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "100")]));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "1/1 CardNotHealth");
    // The same node registering the card healthy takes the pod.
    n1.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ann::NODE_NVIDIA_REGISTER.into(), healthy.into());
    let s = snapshot(&e, &[n1]);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "100")]));
    assert_eq!(out.node.as_deref(), Some("n1"));
}

#[test]
fn unhealthy_card_is_skipped_for_a_healthy_one() {
    let e = engine();
    let mut bad = t4("GPU-b");
    bad.health = false;
    // GPU-b registered last would win the tie if it were healthy.
    let s = snapshot(&e, &[node("n1", &[t4("GPU-a"), bad])]);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "100")]));
    assert_eq!(out.one(), "GPU-a");
}

#[test]
fn cordoned_cards_take_nothing_new() {
    let e = engine();
    let s = snapshot(
        &e,
        &[node_with(
            "n1",
            &[t4("GPU-a"), t4("GPU-b")],
            &[(ann::DEVICE_CORDON, "GPU-b")],
        )],
    );
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "100")]));
    assert_eq!(out.one(), "GPU-a");
    let s = snapshot(
        &e,
        &[node_with(
            "n1",
            &[t4("GPU-a"), t4("GPU-b")],
            &[(ann::DEVICE_CORDON, "GPU-a,GPU-b")],
        )],
    );
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "100")]));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "2/2 CardCordoned");
}

#[test]
fn use_gputype_is_a_case_insensitive_substring() {
    let e = engine();
    // The A100 is registered first, so without a selector the T4 wins the tie.
    let s = snapshot(&e, &[node("n1", &[a100("GPU-a"), t4("GPU-t")])]);
    let base = gpu_pod("p", &[(GPU, "1"), (MEM, "100")]);
    assert_eq!(decide(&e, &s, &base).one(), "GPU-t");
    for sel in [
        "a100",
        "A100",
        "sxm4-80",
        "nvidia-a100-SXM4-80GB",
        "h100,a100",
    ] {
        let p = pod("p")
            .ctr(&[(GPU, "1"), (MEM, "100")])
            .ann(ann::NVIDIA_USE_GPUTYPE, sel)
            .build();
        assert_eq!(decide(&e, &s, &p).one(), "GPU-a", "use-gputype={sel}");
    }
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ann(ann::NVIDIA_USE_GPUTYPE, "H100")
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "2/2 CardTypeMismatch");
}

#[test]
fn nouse_gputype_is_a_case_insensitive_substring() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[a100("GPU-a"), t4("GPU-t")])]);
    for sel in ["t4", "TESLA", "h100,Tesla T4"] {
        let p = pod("p")
            .ctr(&[(GPU, "1"), (MEM, "100")])
            .ann(ann::NVIDIA_NOUSE_GPUTYPE, sel)
            .build();
        assert_eq!(decide(&e, &s, &p).one(), "GPU-a", "nouse-gputype={sel}");
    }
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ann(ann::NVIDIA_NOUSE_GPUTYPE, "nvidia")
        .build();
    assert_eq!(decide(&e, &s, &p).reason("n1"), "2/2 CardTypeMismatch");
}

#[test]
fn use_gpuuuid_is_exact() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-ab")])]);
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ann(ann::NVIDIA_USE_GPUUUID, "GPU-a")
        .build();
    assert_eq!(decide(&e, &s, &p).one(), "GPU-a");
    // Neither a prefix nor another case matches.
    for sel in ["GPU-", "gpu-a", "GPU-a "] {
        let p = pod("p")
            .ctr(&[(GPU, "1"), (MEM, "100")])
            .ann(ann::NVIDIA_USE_GPUUUID, &format!("{sel},GPU-zz"))
            .build();
        let out = decide(&e, &s, &p);
        if sel.trim() == "GPU-a" {
            // Whitespace around list items is trimmed.
            assert_eq!(out.one(), "GPU-a");
        } else {
            assert_eq!(out.node, None, "use-gpuuuid={sel}");
            assert_eq!(out.reason("n1"), "2/2 CardUuidMismatch");
        }
    }
}

#[test]
fn nouse_gpuuuid_is_exact() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-ab")])]);
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ann(ann::NVIDIA_NOUSE_GPUUUID, "GPU-ab")
        .build();
    assert_eq!(decide(&e, &s, &p).one(), "GPU-a");
    // A prefix excludes nothing.
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ann(ann::NVIDIA_NOUSE_GPUUUID, "GPU-")
        .build();
    assert_eq!(decide(&e, &s, &p).one(), "GPU-ab");
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ann(ann::NVIDIA_NOUSE_GPUUUID, "GPU-a,GPU-ab")
        .build();
    assert_eq!(decide(&e, &s, &p).reason("n1"), "2/2 CardUuidMismatch");
}

#[test]
fn vgpu_mode_selects_the_cards_mode() {
    let e = engine();
    let s = snapshot(
        &e,
        &[node(
            "n1",
            &[with_mode(t4("GPU-mig"), DeviceMode::Mig), t4("GPU-core")],
        )],
    );
    let base = pod("p").ctr(&[(GPU, "1"), (MEM, "100")]);
    assert_eq!(decide(&e, &s, &base.clone().build()).one(), "GPU-core");
    let mig = base.clone().ann(ann::NVIDIA_VGPU_MODE, "mig").build();
    assert_eq!(decide(&e, &s, &mig).one(), "GPU-mig");
    // A card without a mode is hami-core.
    let s = snapshot(&e, &[node("n1", &[t4("GPU-core"), t4("GPU-x")])]);
    let core = base.clone().ann(ann::NVIDIA_VGPU_MODE, "hami-core").build();
    assert_eq!(decide(&e, &s, &core).one(), "GPU-x");
    let out = decide(&e, &s, &mig);
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "2/2 CardModeMismatch");
}

#[test]
fn slots_exhausted() {
    let e = engine();
    let mut s = one_card(with_count(t4("GPU-a"), 2));
    let p = |n: &str| gpu_pod(n, &[(GPU, "1"), (MEM, "100"), (CORES, "1")]);
    assert!(place(&e, &mut s, &p("a")).node.is_some());
    assert!(place(&e, &mut s, &p("b")).node.is_some());
    let out = place(&e, &mut s, &p("c"));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "1/1 CardTimeSlicingExhausted");
    assert_eq!(used(&s, "n1", "GPU-a"), (2, 200, 2));
}

#[test]
fn insufficient_memory_gpumem() {
    let e = engine();
    let mut s = one_card(card("GPU-a", "NVIDIA-T4", 1000));
    let out = decide(&e, &s, &gpu_pod("big", &[(GPU, "1"), (MEM, "1001")]));
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientMemory");
    // Exactly the free memory fits; one MiB more does not.
    assert!(
        place(&e, &mut s, &gpu_pod("a", &[(GPU, "1"), (MEM, "600")]))
            .node
            .is_some()
    );
    assert!(
        decide(&e, &s, &gpu_pod("b", &[(GPU, "1"), (MEM, "400")]))
            .node
            .is_some()
    );
    let out = decide(&e, &s, &gpu_pod("c", &[(GPU, "1"), (MEM, "401")]));
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientMemory");
}

#[test]
fn insufficient_memory_percentage_is_of_the_card() {
    let e = engine();
    let mut s = snapshot(
        &e,
        &[node(
            "n1",
            &[
                card("GPU-small", "NVIDIA-T4", 1000),
                card("GPU-big", "NVIDIA-A100", 4000),
            ],
        )],
    );
    let out = place(&e, &mut s, &gpu_pod("a", &[(GPU, "1"), (PCT, "60")]));
    // Spread over equal (empty) cards: the card registered last, 60% of 4000.
    assert_eq!(out.devices.0[0][0].uuid, "GPU-big");
    assert_eq!(out.devices.0[0][0].mem, 2400);
    let out = place(&e, &mut s, &gpu_pod("b", &[(GPU, "1"), (PCT, "60")]));
    assert_eq!(out.devices.0[0][0].uuid, "GPU-small");
    assert_eq!(out.devices.0[0][0].mem, 600);
    let out = decide(&e, &s, &gpu_pod("c", &[(GPU, "1"), (PCT, "41")]));
    assert_eq!(out.reason("n1"), "2/2 CardInsufficientMemory");
    assert!(
        decide(&e, &s, &gpu_pod("d", &[(GPU, "1"), (PCT, "40")]))
            .node
            .is_some()
    );
}

#[test]
fn no_memory_given_takes_the_whole_card() {
    let e = engine();
    let mut s = one_card(card("GPU-a", "NVIDIA-T4", 1000));
    let out = place(&e, &mut s, &gpu_pod("a", &[(GPU, "1"), (CORES, "10")]));
    assert_eq!(out.devices.0[0][0].mem, 1000);
    let out = decide(&e, &s, &gpu_pod("b", &[(GPU, "1"), (CORES, "10")]));
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientMemory");
}

#[test]
fn default_memory_applies_when_no_memory_is_given() {
    let config = NvidiaConfig {
        default_memory: 600,
        ..Default::default()
    };
    let e = engine_with(config, Policies::default());
    let mut s = snapshot(&e, &[node("n1", &[card("GPU-a", "NVIDIA-T4", 1000)])]);
    let out = place(&e, &mut s, &gpu_pod("a", &[(GPU, "1"), (CORES, "10")]));
    assert_eq!(out.devices.0[0][0].mem, 600);
    let out = decide(&e, &s, &gpu_pod("b", &[(GPU, "1"), (CORES, "10")]));
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientMemory");
    // An explicit request still wins over the default.
    let out = decide(&e, &s, &gpu_pod("c", &[(GPU, "1"), (MEM, "400")]));
    assert_eq!(out.devices.0[0][0].mem, 400);
}

#[test]
fn memory_factor_multiplies_gpumem() {
    let config = NvidiaConfig {
        memory_factor: 1024,
        ..Default::default()
    };
    let e = engine_with(config, Policies::default());
    let mut s = snapshot(&e, &[node("n1", &[card("GPU-a", "NVIDIA-T4", 5000)])]);
    let out = place(&e, &mut s, &gpu_pod("a", &[(GPU, "1"), (MEM, "3")]));
    assert_eq!(out.devices.0[0][0].mem, 3072);
    let out = decide(&e, &s, &gpu_pod("b", &[(GPU, "1"), (MEM, "2")]));
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientMemory");
    assert!(
        decide(&e, &s, &gpu_pod("c", &[(GPU, "1"), (MEM, "1")]))
            .node
            .is_some()
    );
}

#[test]
fn insufficient_cores() {
    let e = engine();
    let mut s = one_card(t4("GPU-a"));
    assert!(
        place(
            &e,
            &mut s,
            &gpu_pod("a", &[(GPU, "1"), (MEM, "10"), (CORES, "60")])
        )
        .node
        .is_some()
    );
    assert!(
        decide(
            &e,
            &s,
            &gpu_pod("b", &[(GPU, "1"), (MEM, "10"), (CORES, "40")])
        )
        .node
        .is_some()
    );
    let out = decide(
        &e,
        &s,
        &gpu_pod("c", &[(GPU, "1"), (MEM, "10"), (CORES, "41")]),
    );
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientCore");
}

#[test]
fn cores_above_100_are_clamped_not_rejected() {
    let e = engine();
    let s = one_card(t4("GPU-a"));
    let out = decide(
        &e,
        &s,
        &gpu_pod("a", &[(GPU, "1"), (MEM, "10"), (CORES, "250")]),
    );
    assert_eq!(out.devices.0[0][0].cores, 100);
}

#[test]
fn exclusive_request_conflicts_with_any_use() {
    let e = engine();
    let mut s = one_card(t4("GPU-a"));
    // A user holding no compute at all still blocks an exclusive request.
    assert!(
        place(
            &e,
            &mut s,
            &gpu_pod("a", &[(GPU, "1"), (MEM, "10"), (CORES, "0")])
        )
        .node
        .is_some()
    );
    let out = decide(
        &e,
        &s,
        &gpu_pod("x", &[(GPU, "1"), (MEM, "10"), (CORES, "100")]),
    );
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "1/1 ExclusiveDeviceAllocateConflict");
    // On an empty card it fits.
    let s = one_card(t4("GPU-a"));
    assert!(
        decide(
            &e,
            &s,
            &gpu_pod("x", &[(GPU, "1"), (MEM, "10"), (CORES, "100")])
        )
        .node
        .is_some()
    );
}

#[test]
fn exclusive_rule_needs_a_card_of_100_cores() {
    // With deviceCoreScaling 2 a card has 200 cores: 100 is no longer the
    // whole card, so the exclusive rule does not apply.
    let e = engine();
    let mut d = t4("GPU-a");
    d.devcore = 200;
    let mut s = one_card(d);
    assert!(
        place(
            &e,
            &mut s,
            &gpu_pod("a", &[(GPU, "1"), (MEM, "10"), (CORES, "0")])
        )
        .node
        .is_some()
    );
    assert!(
        decide(
            &e,
            &s,
            &gpu_pod("x", &[(GPU, "1"), (MEM, "10"), (CORES, "100")])
        )
        .node
        .is_some()
    );
}

#[test]
fn cores_zero_on_a_fully_core_allocated_card() {
    let e = engine();
    let mut s = one_card(t4("GPU-a"));
    for (n, c) in [("a", "60"), ("b", "40")] {
        assert!(
            place(
                &e,
                &mut s,
                &gpu_pod(n, &[(GPU, "1"), (MEM, "10"), (CORES, c)])
            )
            .node
            .is_some()
        );
    }
    let out = decide(
        &e,
        &s,
        &gpu_pod("z", &[(GPU, "1"), (MEM, "10"), (CORES, "0")]),
    );
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "1/1 CardComputeUnitsExhausted");
    // One core free: cores 0 fits again.
    let mut s = one_card(t4("GPU-a"));
    place(
        &e,
        &mut s,
        &gpu_pod("a", &[(GPU, "1"), (MEM, "10"), (CORES, "99")]),
    );
    assert!(
        decide(
            &e,
            &s,
            &gpu_pod("z", &[(GPU, "1"), (MEM, "10"), (CORES, "0")])
        )
        .node
        .is_some()
    );
}

#[test]
fn an_exclusive_holder_blocks_cores_zero_requests() {
    let e = engine();
    let mut s = one_card(t4("GPU-a"));
    place(
        &e,
        &mut s,
        &gpu_pod("x", &[(GPU, "1"), (MEM, "10"), (CORES, "100")]),
    );
    let out = decide(&e, &s, &gpu_pod("z", &[(GPU, "1"), (MEM, "10")]));
    assert_eq!(out.reason("n1"), "1/1 CardComputeUnitsExhausted");
}

#[test]
fn multi_gpu_container_takes_distinct_cards() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b"), t4("GPU-c")])]);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "100")]));
    let mut got = out.uuids()[0].clone();
    assert_eq!(got.len(), 2);
    got.dedup();
    assert_eq!(got.len(), 2, "the same card twice: {got:?}");
    // Spread over empty cards: the two registered last, last first.
    assert_eq!(out.uuids(), vec![vec!["GPU-c".to_string(), "GPU-b".into()]]);
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "4"), (MEM, "100")]));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "3/3 AllocatedCardsInsufficientRequest");
}

#[test]
fn multi_gpu_needs_every_card_to_fit() {
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
    place(
        &e,
        &mut s,
        &pod("x")
            .ctr(&[(GPU, "1"), (MEM, "900")])
            .ann(ann::NVIDIA_USE_GPUUUID, "GPU-a")
            .build(),
    );
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "2"), (MEM, "500")]));
    assert_eq!(out.node, None);
    assert_eq!(
        out.reason("n1"),
        "1/2 CardInsufficientMemory, 1/2 AllocatedCardsInsufficientRequest"
    );
}

#[test]
fn containers_see_what_earlier_containers_took() {
    let e = engine();
    let s = snapshot(
        &e,
        &[node(
            "n1",
            &[
                card("GPU-a", "NVIDIA-T4", 1000),
                card("GPU-b", "NVIDIA-T4", 1000),
            ],
        )],
    );
    // Each container needs 60% of a card: they cannot share one.
    let p = pod("p")
        .ctr(&[(GPU, "1"), (PCT, "60")])
        .ctr(&[])
        .ctr(&[(GPU, "1"), (PCT, "60")])
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(
        out.uuids(),
        vec![vec!["GPU-b".to_string()], vec![], vec!["GPU-a".to_string()]]
    );
    assert_eq!(
        out.devices.encode(),
        "GPU-b,NVIDIA,600,0:;;GPU-a,NVIDIA,600,0:;"
    );
    let p3 = pod("p")
        .ctr(&[(GPU, "1"), (PCT, "60")])
        .ctr(&[(GPU, "1"), (PCT, "60")])
        .ctr(&[(GPU, "1"), (PCT, "60")])
        .build();
    let out = decide(&e, &s, &p3);
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "2/2 CardInsufficientMemory");
}

#[test]
fn init_containers_are_allocated_first() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[t4("GPU-a"), t4("GPU-b")])]);
    let p = pod("p")
        .init(&[(GPU, "1"), (MEM, "1000"), (CORES, "10")])
        .ctr(&[(GPU, "1"), (MEM, "2000"), (CORES, "20")])
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(out.devices.0.len(), 2);
    assert_eq!(out.devices.0[0][0].mem, 1000, "init container first");
    assert_eq!(out.devices.0[1][0].mem, 2000);
    // The init container is done before the app starts, so the app sees the
    // node as it was and takes the same (emptiest, last) card, as HAMi does.
    assert_eq!(
        out.devices.encode(),
        "GPU-b,NVIDIA,1000,10:;GPU-b,NVIDIA,2000,20:;"
    );
    let req = request(&e, &p);
    assert_eq!(req.init_count, 1);
    let d = e.filter(&s, &req, None, Mode::Explain);
    let a = e.decision_annotations(d.node.unwrap(), &d.devices, Some(&req), None, 0);
    assert_eq!(a[ann::VGPU_NODE], "n1");
    assert_eq!(a[ann::NVIDIA_DEVICES_ALLOCATED], out.devices.encode());
    assert_eq!(a[ann::NVIDIA_DEVICES_TO_ALLOCATE], out.devices.encode());
}

/// HAMi's "pod with init containers fits correctly using max resource
/// logic": a pod fits when its larger phase fits, not the sum of both.
#[test]
fn init_and_app_containers_each_fit_on_their_own() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[card("GPU-a", "NVIDIA-T4", 8000)])]);
    let p = pod("p")
        .init(&[(GPU, "1"), (MEM, "5000"), (CORES, "20")])
        .ctr(&[(GPU, "1"), (MEM, "4000"), (CORES, "20")])
        .build();
    let out = place(&e, &mut s, &p);
    assert_eq!(out.node.as_deref(), Some("n1"), "{out:?}");
    assert_eq!(
        out.devices.encode(),
        "GPU-a,NVIDIA,5000,20:;GPU-a,NVIDIA,4000,20:;"
    );
    // Reserved as what it holds while initialising: the larger phase.
    assert_eq!(used(&s, "n1", "GPU-a"), (1, 5000, 20));
    // Each init container alone: two of 5000 MiB fit 8000 MiB one at a time.
    let s = snapshot(&e, &[node("n1", &[card("GPU-a", "NVIDIA-T4", 8000)])]);
    let p = pod("p")
        .init(&[(GPU, "1"), (MEM, "5000")])
        .init(&[(GPU, "1"), (MEM, "5000")])
        .ctr(&[("cpu", "1")])
        .build();
    assert_eq!(decide(&e, &s, &p).node.as_deref(), Some("n1"));
    // App containers still add up.
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "5000")])
        .ctr(&[(GPU, "1"), (MEM, "4000")])
        .build();
    let out = decide(&e, &s, &p);
    assert_eq!(out.node, None);
    assert_eq!(out.reason("n1"), "1/1 CardInsufficientMemory");
}

/// The fast path's slot check counts the cards a pod uses at one time.
#[test]
fn a_node_with_one_slot_takes_an_init_container_and_then_the_app() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[with_count(t4("GPU-a"), 1)])]);
    let p = pod("p")
        .init(&[(GPU, "1"), (MEM, "100")])
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .build();
    assert_eq!(request(&e, &p).peak_cards(), 1);
    let out = decide(&e, &s, &p);
    assert_eq!(out.node.as_deref(), Some("n1"), "{out:?}");
}

#[test]
fn reasons_are_counted_per_card_most_frequent_first() {
    let e = engine();
    let mut sick = t4("GPU-sick");
    sick.health = false;
    let s = snapshot(
        &e,
        &[node_with(
            "n1",
            &[
                card("GPU-a", "NVIDIA-T4", 1000),
                sick,
                card("GPU-b", "NVIDIA-T4", 1000),
                t4("GPU-c"),
            ],
            &[(ann::DEVICE_CORDON, "GPU-c")],
        )],
    );
    let out = decide(&e, &s, &gpu_pod("p", &[(GPU, "1"), (MEM, "5000")]));
    assert_eq!(
        out.reason("n1"),
        "2/4 CardInsufficientMemory, 1/4 CardNotHealth, 1/4 CardCordoned"
    );
}

#[test]
fn the_failing_container_is_named() {
    let e = engine();
    let s = snapshot(&e, &[node("n1", &[card("GPU-a", "NVIDIA-T4", 1000)])]);
    let p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "100")])
        .ctr(&[(GPU, "1"), (MEM, "5000")])
        .build();
    let req = request(&e, &p);
    let d = e.filter(&s, &req, None, Mode::Explain);
    assert_eq!(d.rejected.len(), 1);
    assert_eq!(d.rejected[0].1.container, 1);
}

#[test]
fn every_node_is_explained_and_unknown_candidates_too() {
    let e = engine();
    let s = snapshot(
        &e,
        &[
            node("small", &[card("GPU-s", "NVIDIA-T4", 1000)]),
            node("big", &[card("GPU-b", "NVIDIA-A100", 80000)]),
        ],
    );
    let p = gpu_pod("p", &[(GPU, "1"), (MEM, "2000")]);
    let out = decide(&e, &s, &p);
    assert_eq!(out.node.as_deref(), Some("big"));
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.reason("small"), "1/1 CardInsufficientMemory");
    let req = request(&e, &p);
    let names = vec!["ghost".to_string(), "small".to_string()];
    let d = e.filter(&s, &req, Some(&names), Mode::Explain);
    assert_eq!(d.node, None);
    let out = Outcome::from(&d);
    assert_eq!(out.reason("ghost"), "NodeInsufficientDevice");
    assert_eq!(out.reason("small"), "1/1 CardInsufficientMemory");
    // Candidates limit the choice.
    let names = vec!["big".to_string()];
    let d = e.filter(&s, &req, Some(&names), Mode::Fast);
    assert_eq!(d.node, Some("big"));
}

#[test]
fn a_pod_without_gpus_is_not_ours() {
    let e = engine();
    assert_eq!(e.prepare(&pod("p").ctr(&[]).build()).unwrap(), None);
    assert_eq!(
        e.prepare(&gpu_pod("p", &[("cpu", "1"), (GPU, "0")]))
            .unwrap(),
        None
    );
}

#[test]
fn bad_pod_annotations_are_errors_naming_the_key() {
    let e = engine();
    let p = pod("p")
        .ctr(&[(GPU, "1")])
        .ann(ann::GPU_SCHEDULER_POLICY, "roundrobin")
        .build();
    let err = e.prepare(&p).unwrap_err();
    assert!(err.to_string().contains(ann::GPU_SCHEDULER_POLICY), "{err}");
    let p = gpu_pod("p", &[(GPU, "1"), (PCT, "140")]);
    let err = e.prepare(&p).unwrap_err();
    assert!(err.to_string().contains("gpumem-percentage=140"), "{err}");
}

#[test]
fn fast_and_explain_agree_when_a_node_shrank_under_its_pods() {
    // The node re-registered with fewer slots on GPU-a than its pods hold
    // (deviceSplitCount lowered while they run). GPU-b still has room for
    // every container of the pod; the node's summed free slots do not show it.
    let e = engine();
    let mut s = snapshot(
        &e,
        &[node(
            "n1",
            &[with_count(t4("GPU-a"), 2), with_count(t4("GPU-b"), 10)],
        )],
    );
    for i in 0..5 {
        hold(&mut s, &format!("x/{i}"), "n1", "GPU-a,NVIDIA,10,0:;");
    }
    let mut b = pod("p");
    for _ in 0..8 {
        b = b.ctr(&[(GPU, "1"), (MEM, "10"), (CORES, "1")]);
    }
    // `decide` checks that both modes agree.
    let out = decide(&e, &s, &b.build());
    assert_eq!(out.node.as_deref(), Some("n1"));
    assert!(out.uuids().iter().flatten().all(|u| u == "GPU-b"));
}
