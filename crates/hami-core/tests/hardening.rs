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

/// A kernel whose completion depends on a later launch (a consumer waiting
/// for a producer's flag) completes under a compute quota: the pacer never
/// waits for the device before a launch.
#[test]
fn a_kernel_waiting_for_a_later_launch_completes_under_a_quota() {
    let s = Scratch::new("wait-flag");
    for resolve in ["dlsym", "procaddr"] {
        let child = spawn(
            &s,
            &[
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                ("HAMI_PROBE_RESOLVE", resolve),
            ],
            &["init", "wait-flag", "launch", "20", "1000"],
        );
        let dog = watchdog(&child, std::time::Duration::from_secs(60));
        let out = child.wait_with_output().unwrap();
        dog.disarm();
        let out = Lines::from_output(&out);
        assert_eq!(out.rcs(), vec![0, 0, 0], "{resolve}: {:?}", out.lines);
    }
}

/// A library preloaded after libvgpu.so that asks `dlsym(RTLD_NEXT, name)`
/// (a malloc wrapper, a profiler) gets the definition after *itself*, not
/// after libvgpu.so (which would be its own: endless recursion).
#[test]
fn dlsym_rtld_next_from_a_later_preload_resolves_after_the_caller() {
    let s = Scratch::new("rtld-next");
    let first = build_cdylib(
        &s,
        "first",
        r#"
        use std::ffi::{c_char, c_int, c_void};
        unsafe extern "C" {
            fn dlsym(h: *mut c_void, name: *const c_char) -> *mut c_void;
        }
        /// Wraps the next definition: 1 + what it returns.
        #[unsafe(no_mangle)]
        pub extern "C" fn hami_layered() -> c_int {
            let next = unsafe { dlsym(-1isize as *mut c_void, c"hami_layered".as_ptr()) };
            if next.is_null() {
                return -2;
            }
            if next == hami_layered as *mut c_void {
                return -1; // ourselves: the lookup started at the wrong object
            }
            let f: extern "C" fn() -> c_int = unsafe { std::mem::transmute(next) };
            f() + 1
        }
        "#,
    );
    let second = build_cdylib(
        &s,
        "second",
        r#"
        #[unsafe(no_mangle)]
        pub extern "C" fn hami_layered() -> std::ffi::c_int { 41 }
        "#,
    );
    let preload = format!(
        "{}:{}:{}",
        artifacts().vgpu.display(),
        first.display(),
        second.display()
    );
    let out = probe(
        &s,
        &[("LD_PRELOAD", &preload)],
        &["init", "dlsym-next", "hami_layered", "alloc", "1m"],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0], "{:?}", out.lines);
    assert_eq!(
        out.field::<i32>(1, 2),
        42,
        "-1: RTLD_NEXT resolved relative to libvgpu.so, not the caller"
    );
}

/// Compiles `src` into `lib<name>.so` in the scratch dir with the rustc
/// next to the cargo running the tests.
fn build_cdylib(s: &Scratch, name: &str, src: &str) -> std::path::PathBuf {
    let file = s.dir.join(format!("{name}.rs"));
    std::fs::write(&file, src).unwrap();
    let out = s.dir.join(format!("lib{name}.so"));
    let cargo = std::path::PathBuf::from(env!("CARGO"));
    let rustc = std::env::var_os("RUSTC")
        .map(std::path::PathBuf::from)
        .or_else(|| Some(cargo.with_file_name("rustc")).filter(|p| p.exists()))
        .unwrap_or_else(|| "rustc".into());
    let status = std::process::Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "cdylib",
            "-C",
            "panic=abort",
        ])
        .args(["-C", "link-arg=-ldl", "-o"])
        .arg(&out)
        .arg(&file)
        .status()
        .expect("run rustc");
    assert!(status.success(), "building {name}");
    out
}

/// A limits file the container's own uid can write is logged as a warning
/// (the node agent should mount it read-only); its limits still apply.
#[test]
fn a_writable_limits_file_is_warned_about() {
    let s = Scratch::new("limits-writable");
    let mut l = hami_shm::env::Limits::default();
    l.memory[0] = Some(500 * MIB);
    hami_shm::limits::write(&s.limits(), &l).unwrap();
    let out = probe(&s, &[], &["init", "alloc", "600m"]);
    assert_eq!(out.rcs(), vec![0, OOM]);
    assert!(
        out.stderr.contains("is writable by this process"),
        "{}",
        out.stderr
    );
}

/// Fail closed: where the node agent mounted a limits dir beside the
/// library (`<hook>/vgpu/limits`) but never wrote the limits file in it
/// (allocation without the node lock, and neither PreStartContainer nor
/// NRI reached the container), device memory is refused with a reason;
/// once the file is there, its limits apply.
#[test]
fn without_the_limits_the_agent_owes_no_device_memory_is_given() {
    let s = Scratch::new("limits-owed");
    let vgpu = s.dir.join("vgpu");
    let limits_dir = vgpu.join("limits");
    std::fs::create_dir_all(&limits_dir).unwrap();
    let lib = vgpu.join("libvgpu.so");
    std::fs::copy(&common::artifacts().vgpu, &lib).unwrap();
    let file = limits_dir.join("hami-limits");
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("HAMI_LIMITS_FILE", file.to_str().unwrap()),
    ];
    let out = probe(&s, &env, &["init", "alloc", "100m"]);
    assert_eq!(out.rcs(), vec![0, OOM], "{}", out.stderr);
    assert!(
        out.stderr.contains("never wrote its limits"),
        "{}",
        out.stderr
    );
    // Without the variable (a process started with `env -i`), the same.
    let out = probe(&s, &env[..1], &["init", "alloc", "100m"]);
    assert_eq!(out.rcs(), vec![0, OOM], "{}", out.stderr);

    let mut l = hami_shm::env::Limits::default();
    l.memory[0] = Some(500 * MIB);
    hami_shm::limits::write(&file, &l).unwrap();
    let out = probe(&s, &env, &["init", "alloc", "100m", "alloc", "500m"]);
    assert_eq!(out.rcs(), vec![0, 0, OOM], "{}", out.stderr);
    assert!(!out.stderr.contains("never wrote its limits"));
    // Without a limits dir beside the library (HAMi's layout, `hami run`)
    // a missing file changes nothing.
    let out = probe(
        &Scratch::new("limits-none"),
        &[],
        &["init", "alloc", "100m"],
    );
    assert_eq!(out.rcs(), vec![0, 0], "{}", out.stderr);
}
