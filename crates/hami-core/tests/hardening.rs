//! Hardening: usage keyed by device identity, frees racing allocations,
//! contexts destroyed or reset, threads and forks, launches that must never
//! wait for the device, and `dlsym(RTLD_NEXT, ...)` from later preloads.

mod common;
use common::*;
use hami_shm::region::SharedRegion;

const A: &str = "GPU-aaaaaaaa-1111-2222-3333-444444444444";
const B: &str = "GPU-bbbbbbbb-1111-2222-3333-444444444444";

fn two_cards() -> String {
    format!("4g 80 {A} Sim A;4g 80 {B} Sim B")
}

/// A pod with two cards whose workers each see one of them as CUDA device 0
/// (Ray, vLLM tensor parallel, torchrun): each card is held to its own
/// limit, in the region and in NVML's view.
#[test]
fn workers_seeing_different_cards_count_per_card_uuid() {
    let s = Scratch::new("per-uuid");
    let cards = two_cards();
    let list = format!("{A},{B}");
    let env = |visible| {
        [
            ("SIM_GPU_DEVICES", cards.as_str()),
            ("NVIDIA_VISIBLE_DEVICES", list.as_str()),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "1000m"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "500m"),
            ("CUDA_VISIBLE_DEVICES", visible),
        ]
    };
    let mut worker0 = spawn(&s, &env("0"), &["init", "alloc", "800m", "ready", "hold"]);
    let before = until_ready(&mut worker0);
    assert_eq!(before, vec!["init 0", "alloc 0 0"]);
    let out = probe(
        &s,
        &env("1"),
        &[
            "init",
            "alloc",
            "400m",
            "alloc",
            "200m",
            "meminfo",
            "nvml-mem",
            "0",
            "nvml-mem2",
            "1",
        ],
    );
    let region = SharedRegion::open(&s.region()).unwrap();
    let used = [region.device_used(0), region.device_used(1)];
    worker0.kill().unwrap();
    worker0.wait().unwrap();
    assert_eq!(
        out.rcs(),
        vec![0, 0, OOM, 0, 0, 0],
        "card B has its own 500m limit: {:?}",
        out.lines
    );
    assert_eq!(out.field::<u64>(3, 3), 500 * MIB, "cuMemGetInfo total");
    assert_eq!(out.field::<u64>(3, 2), 100 * MIB, "cuMemGetInfo free");
    // NVML, per card, whatever CUDA_VISIBLE_DEVICES says.
    assert_eq!(out.field::<u64>(4, 2), 1000 * MIB, "card A total");
    assert_eq!(out.field::<u64>(4, 4), 800 * MIB, "card A used");
    assert_eq!(out.field::<u64>(5, 2), 500 * MIB, "card B total");
    assert_eq!(out.field::<u64>(5, 4), 400 * MIB, "card B used");
    assert_eq!(used, [800 * MIB, 400 * MIB]);
    assert_eq!(region.uuid(0), A, "the region records the cards");
    assert_eq!(region.uuid(1), B);
}

/// Without a device list (`hami run`), workers that each see a different
/// card as CUDA device 0 still count on different cards.
#[test]
fn workers_without_a_device_list_still_count_apart() {
    let s = Scratch::new("per-uuid-nolist");
    let cards = two_cards();
    let limit = ("CUDA_DEVICE_MEMORY_LIMIT", "1000m");
    let mut worker = spawn(
        &s,
        &[
            ("SIM_GPU_DEVICES", &cards),
            limit,
            ("CUDA_VISIBLE_DEVICES", "1"),
        ],
        &["init", "alloc", "600m", "ready", "hold"],
    );
    until_ready(&mut worker);
    let out = probe(
        &s,
        &[
            ("SIM_GPU_DEVICES", &cards),
            limit,
            ("CUDA_VISIBLE_DEVICES", "0"),
        ],
        &["init", "alloc", "600m", "meminfo"],
    );
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert_eq!(out.rcs(), vec![0, 0, 0], "{:?}", out.lines);
    assert_eq!(out.field::<u64>(2, 2), 400 * MIB);
    let region = SharedRegion::open(&s.region()).unwrap();
    let a = region.find_device(A).expect("card A recorded");
    let b = region.find_device(B).expect("card B recorded");
    assert_ne!(a, b);
}

/// cuCtxDestroy and cuDevicePrimaryCtxReset free everything allocated in
/// the context: the container's count follows.
#[test]
fn context_destroy_and_reset_give_back_what_they_freed() {
    let s = Scratch::new("ctx");
    let out = probe(
        &s,
        &[("CUDA_DEVICE_MEMORY_LIMIT", "1000m")],
        &[
            "init",
            "alloc",
            "600m",
            "ctx-destroy",
            "alloc",
            "600m",
            "meminfo",
            "ctx-reset",
            "alloc",
            "300m",
            "alloc",
            "300m",
            "meminfo",
        ],
    );
    assert_eq!(
        out.rcs(),
        vec![0, 0, 0, 0, 0, 0, 0, 0, 0],
        "{:?}",
        out.lines
    );
    assert_eq!(out.field::<u64>(4, 2), 400 * MIB, "{:?}", out.lines);
    assert_eq!(out.field::<u64>(8, 2), 400 * MIB, "{:?}", out.lines);
}

/// Eight threads of one process allocate and free at once (the simulated
/// driver hands freed addresses out again at once, like the real one): at
/// the end the count is exactly what the threads hold.
#[test]
fn eight_threads_alloc_and_free_with_exact_usage() {
    let s = Scratch::new("threads");
    let out = probe(
        &s,
        &[("CUDA_DEVICE_MEMORY_LIMIT", "1000m")],
        &["init", "threads", "8", "1m", "20000", "meminfo"],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0], "{:?}", out.lines);
    assert_eq!(out.field::<u64>(1, 2), 0, "no call failed: {:?}", out.lines);
    assert_eq!(
        out.field::<u64>(2, 2),
        1000 * MIB - 8 * MIB,
        "exactly the 8 kept buffers are counted"
    );
}

/// After a fork, every thread of the child counts in the child's own slot,
/// never in the parent's (which would outlive the child).
#[test]
fn forked_child_threads_never_use_the_parents_slot() {
    let s = Scratch::new("fork-threads");
    let mut args = vec!["init", "alloc", "100m"];
    for _ in 0..50 {
        args.extend_from_slice(&["fork-threads", "1m", "8"]);
    }
    args.push("meminfo");
    let out = probe(&s, &[("CUDA_DEVICE_MEMORY_LIMIT", "1000m")], &args);
    let children: Vec<&Vec<String>> = out
        .lines
        .iter()
        .filter(|l| l[0] == "child-threads")
        .collect();
    assert_eq!(children.len(), 50, "{:?}", out.lines);
    assert!(children.iter().all(|l| l[2] == "8"), "{:?}", out.lines);
    let last = out.lines.last().unwrap();
    assert_eq!(last[0], "meminfo");
    assert_eq!(
        last[2].parse::<u64>().unwrap(),
        900 * MIB,
        "the children's memory left with them: {:?}",
        out.lines
    );
}
