//! Memory limits, enforced by libvgpu.so over the simulated driver, each
//! scenario in separate processes.

mod common;
use common::*;

const LIMIT_1000M: (&str, &str) = ("CUDA_DEVICE_MEMORY_LIMIT", "1000m");

#[test]
fn allocation_at_and_over_the_limit() {
    let s = Scratch::new("at-over");
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &[
            "init", "alloc", "1000m", "alloc", "1", "free", "0", "alloc", "1", "meminfo",
        ],
    );
    assert_eq!(out.rcs(), vec![0, 0, OOM, 0, 0, 0]);
    assert_eq!(out.field::<u64>(5, 3), 1000 * MIB, "total = the limit");
    assert_eq!(
        out.field::<u64>(5, 2),
        1000 * MIB - 1,
        "free = limit - used"
    );
    assert!(
        out.stderr.contains("[HAMI-core WARN("),
        "refusals are logged: {}",
        out.stderr
    );
}

#[test]
fn per_device_limits_win_over_the_global_one() {
    let s = Scratch::new("per-device");
    let env = [
        ("SIM_GPU_DEVICES", "4g 80 GPU-a Sim A;4g 80 GPU-b Sim B"),
        ("CUDA_DEVICE_MEMORY_LIMIT", "2g"),
        ("CUDA_DEVICE_MEMORY_LIMIT_1", "500m"),
    ];
    let out = probe(
        &s,
        &env,
        &[
            "init", "alloc", "1500m", "dev", "1", "alloc", "600m", "alloc", "500m", "totalmem",
            "0", "totalmem", "1",
        ],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0, OOM, 0, 0, 0]);
    assert_eq!(out.field::<u64>(5, 2), 2 << 30);
    assert_eq!(out.field::<u64>(6, 2), 500 * MIB);
}

/// Every allocation path is admitted against the same limit and released
/// by its own free.
#[test]
fn every_allocation_path_is_counted_and_released() {
    let s = Scratch::new("paths");
    // (allocate..., free...) with 600 MiB each against a 1000 MiB limit:
    // the second allocation of each kind must fail.
    let cases: &[(&[&str], &str)] = &[
        (&["alloc", "600m"], "free"),
        (&["managed", "600m"], "free"),
        (&["async", "600m"], "free-async"),
        (&["pool", "600m"], "free-async"),
        (&["vmm", "600m"], "vmm-release"),
        (&["pitch", "600m", "1"], "free"),
        (&["array", "150m", "1", "0"], "array-destroy"),
        (&["array3d", "150m", "1", "1"], "array-destroy"),
        (&["mipmap", "100m", "1", "2"], "mipmap-destroy"),
        (&["extmem", "600m"], "extmem-destroy"),
        (&["graph-mem", "600m"], "graph-destroy"),
    ];
    for (alloc, free) in cases {
        let mut args = vec!["init"];
        args.extend_from_slice(alloc);
        args.extend_from_slice(alloc);
        // A synchronisation lets stream-ordered pools give freed memory back.
        args.extend_from_slice(&["meminfo", free, "0", "sync", "meminfo"]);
        let out = probe(&s, &[LIMIT_1000M], &args);
        assert_eq!(
            out.rcs(),
            vec![0, 0, OOM, 0, 0, 0, 0],
            "{alloc:?}: {:?}",
            out.lines
        );
        let free_before: u64 = out.field(3, 2);
        let free_after: u64 = out.field(6, 2);
        assert!(
            free_before <= 1000 * MIB - 400 * MIB,
            "{alloc:?} counted: {free_before}"
        );
        assert_eq!(free_after, 1000 * MIB, "{alloc:?} released by {free}");
    }
}

#[test]
fn ipc_handles_from_other_processes_are_counted() {
    let s = Scratch::new("ipc");
    let owner = probe(&s, &[], &["init", "alloc", "600m", "ipc-get", "0"]);
    let handle = owner.lines[2][2].clone();
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &["init", "alloc", "600m", "ipc-open", &handle, "meminfo"],
    );
    assert_eq!(out.rcs(), vec![0, 0, OOM, 0]);
    // Another container (its own region) with room for both.
    let s2 = Scratch::new("ipc-2g");
    let out = probe(
        &s2,
        &[("CUDA_DEVICE_MEMORY_LIMIT", "2g")],
        &[
            "init",
            "alloc",
            "600m",
            "ipc-open",
            &handle,
            "meminfo",
            "ipc-close",
            "1",
            "meminfo",
        ],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0, 0, 0, 0]);
    assert_eq!(out.field::<u64>(3, 2), (2048 - 1200) * MIB);
    assert_eq!(out.field::<u64>(5, 2), (2048 - 600) * MIB);
}

#[test]
fn unknown_frees_are_forwarded_to_the_driver() {
    let s = Scratch::new("unknown-free");
    // The simulated driver answers CUDA_ERROR_INVALID_VALUE (1) for an
    // address it never handed out: the interposer must not swallow it.
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &["init", "free", "42", "vmm-release", "42"],
    );
    assert_eq!(out.rcs(), vec![0, 1, 1]);
}

/// Every way a program finds driver entry points reaches the hooks.
#[test]
fn limits_hold_on_every_resolution_path() {
    let s = Scratch::new("resolve");
    for (mode, ptds) in [
        ("dlsym", "0"),
        ("default", "0"),
        ("procaddr", "0"),
        ("procaddr", "1"),
    ] {
        let env = [
            LIMIT_1000M,
            ("HAMI_PROBE_RESOLVE", mode),
            ("HAMI_PROBE_PTDS", ptds),
        ];
        let out = probe(
            &s,
            &env,
            &[
                "init", "alloc", "600m", "async", "600m", "async", "300m", "meminfo",
            ],
        );
        assert_eq!(
            out.rcs(),
            vec![0, 0, OOM, 0, 0],
            "{mode} ptds={ptds}: {:?}",
            out.lines
        );
        assert_eq!(
            out.field::<u64>(4, 3),
            1000 * MIB,
            "{mode}: the view is the limit"
        );
    }
}

/// A request the version table cannot vouch for (here a pretend CUDA 13
/// `cuMemAlloc_v3`) gets the driver's own function, never a hook with a
/// guessed signature, and a warning says so.
#[test]
fn unknown_entry_point_versions_are_passed_through_not_guessed() {
    let s = Scratch::new("future");
    let env = [
        LIMIT_1000M,
        ("HAMI_PROBE_RESOLVE", "procaddr"),
        ("HAMI_PROBE_CUDA_VERSION", "13000"),
    ];
    let out = probe(
        &s,
        &env,
        &["init", "alloc", "1500m", "async", "900m", "async", "200m"],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0, OOM], "{:?}", out.lines);
    assert!(
        out.stderr
            .contains("other than cuMemAlloc_v2; not intercepted"),
        "{}",
        out.stderr
    );
}

#[test]
fn disabled_mode_forwards_everything() {
    let s = Scratch::new("disabled");
    let env = [
        ("CUDA_DEVICE_MEMORY_LIMIT", "100m"),
        ("CUDA_DISABLE_CONTROL", "true"),
    ];
    for mode in ["dlsym", "procaddr", "default"] {
        let out = probe(
            &s,
            &[env[0], env[1], ("HAMI_PROBE_RESOLVE", mode)],
            &["init", "alloc", "500m", "meminfo", "nvml-mem", "0"],
        );
        assert_eq!(out.rcs(), vec![0, 0, 0, 0]);
        assert_eq!(out.field::<u64>(2, 3), 4 << 30, "{mode}: the real total");
        assert_eq!(out.field::<u64>(3, 2), 4 << 30);
    }
    assert!(
        !s.region().exists(),
        "disabled mode never touches the shared region"
    );
}

#[test]
fn nvml_shows_the_container_view() {
    let s = Scratch::new("nvml");
    let mut holder = spawn(
        &s,
        &[LIMIT_1000M],
        &["init", "alloc", "300m", "ready", "hold"],
    );
    wait_ready(&mut holder);
    // Another container (its own region) on the same card.
    let foreign_region = s.dir.join("other-container.cache");
    let foreign_region = foreign_region.to_str().unwrap();
    let mut foreign = spawn(
        &s,
        &[("CUDA_DEVICE_MEMORY_SHARED_CACHE", foreign_region)],
        &["init", "alloc", "200m", "ready", "hold"],
    );
    wait_ready(&mut foreign);
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &[
            "init",
            "alloc",
            "100m",
            "nvml-mem",
            "0",
            "nvml-mem2",
            "0",
            "nvml-procs",
            "0",
        ],
    );
    for c in [&mut holder, &mut foreign] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    for line in [2, 3] {
        assert_eq!(out.rc(line), 0);
        assert_eq!(out.field::<u64>(line, 2), 1000 * MIB, "total = limit");
        assert_eq!(
            out.field::<u64>(line, 3),
            600 * MIB,
            "free = limit - container usage"
        );
        assert_eq!(
            out.field::<u64>(line, 4),
            400 * MIB,
            "used = both processes"
        );
    }
    assert_eq!(out.rc(4), 0);
    assert_eq!(
        out.field::<u32>(4, 2),
        2,
        "the card has three processes; only the container's two are listed: {:?}",
        out.lines[4]
    );
    let listed = &out.lines[4][3];
    assert!(listed.contains(&holder.id().to_string()), "{listed}");
    assert!(!listed.contains(&foreign.id().to_string()), "{listed}");
}

#[test]
fn nvml_listing_finds_the_container_by_learned_host_pids() {
    // NVML reports host pids: the simulated NVML shifts every pid by 100000,
    // like a container's pid namespace.
    let s = Scratch::new("nvml-hostpid");
    let ns = ("SIM_GPU_PID_OFFSET", "100000");
    let mut holder = spawn(
        &s,
        &[LIMIT_1000M, ns],
        &["init", "alloc", "300m", "ready", "hold"],
    );
    wait_ready(&mut holder);
    let foreign_region = s.dir.join("other-container.cache");
    let mut foreign = spawn(
        &s,
        &[
            ns,
            (
                "CUDA_DEVICE_MEMORY_SHARED_CACHE",
                foreign_region.to_str().unwrap(),
            ),
        ],
        &["init", "alloc", "200m", "ready", "hold"],
    );
    wait_ready(&mut foreign);
    let lister = spawn(
        &s,
        &[LIMIT_1000M, ns],
        &["init", "alloc", "100m", "nvml-procs", "0"],
    );
    let lister_pid = lister.id();
    let out = Lines::from_output(&lister.wait_with_output().unwrap());
    let host = |pid: u32| (pid + 100000).to_string();
    let region = hami_shm::region::SharedRegion::open(&s.region()).unwrap();
    let learned: Vec<(i32, i32)> = region
        .processes()
        .iter()
        .map(|p| (p.pid, p.host_pid))
        .collect();
    for c in [&mut holder, &mut foreign] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    assert!(
        learned.contains(&(holder.id() as i32, holder.id() as i32 + 100000)),
        "the holder's host pid is in its slot: {learned:?}"
    );
    assert_eq!(out.rc(2), 0);
    let listed: Vec<&str> = out.lines[2]
        .get(3)
        .map_or(vec![], |l| l.split(',').collect());
    assert_eq!(out.field::<u32>(2, 2), 2, "{:?}", out.lines[2]);
    assert!(listed.contains(&host(holder.id()).as_str()), "{listed:?}");
    assert!(listed.contains(&host(lister_pid).as_str()), "{listed:?}");
    assert!(!listed.contains(&host(foreign.id()).as_str()), "{listed:?}");
}

#[test]
fn limits_file_changes_limits_while_running() {
    let s = Scratch::new("limits-file");
    let mut child = Running::spawn(
        &s,
        &[LIMIT_1000M],
        &[
            "init",
            "alloc",
            "600m",
            "alloc",
            "600m",
            "await",
            "alloc-until",
            "600m",
            "20000",
            "meminfo",
        ],
    );
    // The old limit holds; then the file is replaced and the program let go.
    child.wait_for(false, |l| l.starts_with("alloc 2 "));
    let mut l = hami_shm::env::Limits::default();
    l.memory[0] = Some(2 << 30);
    hami_shm::limits::write(&s.limits(), &l).unwrap();
    child.go();
    // The interposer re-reads the file at an allocation, at most every
    // 250 ms: `alloc-until` retries (every 10 ms, for up to 20 s) until an
    // allocation has seen the new limit.
    let out = child.finish();
    assert_eq!(out.rcs(), vec![0, 0, OOM, 0, 0, 0], "{:?}", out.lines);
    assert_eq!(
        out.field::<u64>(5, 3),
        2 << 30,
        "the new limit is the new total"
    );
}

#[test]
fn a_foreign_region_file_falls_back_to_process_local_limits() {
    let s = Scratch::new("foreign");
    let mut upstream = vec![0u8; 4096];
    upstream[..4].copy_from_slice(&19920718i32.to_le_bytes());
    std::fs::write(s.region(), &upstream).unwrap();
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &["init", "alloc", "600m", "alloc", "600m"],
    );
    assert_eq!(out.rcs(), vec![0, 0, OOM]);
    assert!(out.stderr.contains("upstream HAMi-core"), "{}", out.stderr);
    assert_eq!(
        std::fs::read(s.region()).unwrap(),
        upstream,
        "never written"
    );
}

#[test]
fn log_level_zero_silences_warnings() {
    let s = Scratch::new("quiet");
    let out = probe(
        &s,
        &[LIMIT_1000M, ("LIBCUDA_LOG_LEVEL", "0")],
        &["init", "alloc", "2g"],
    );
    assert_eq!(out.rcs(), vec![0, OOM]);
    assert!(!out.stderr.contains("HAMI-core"), "{}", out.stderr);
}

#[test]
fn fork_gives_the_child_its_own_slot_under_the_same_limit() {
    let s = Scratch::new("fork");
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &[
            "init", "alloc", "100m", "fork", "950m", "fork", "800m", "meminfo",
        ],
    );
    let text: Vec<String> = out.lines.iter().map(|l| l.join(" ")).collect();
    assert_eq!(
        text[2],
        format!("child {OOM} {} {}", 900 * MIB, 1000 * MIB),
        "{text:?}"
    );
    assert_eq!(
        text[4],
        format!("child 0 {} {}", 100 * MIB, 1000 * MIB),
        "{text:?}"
    );
    // The child exited holding 800 MiB; the parent's view reclaims it.
    assert_eq!(
        text[6],
        format!("meminfo 0 {} {}", 900 * MIB, 1000 * MIB),
        "{text:?}"
    );
}

/// Reads the child's stdout until its `ready` line; returns what came before.
pub fn wait_ready(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("ready 0") {
        assert_eq!(
            out.read(&mut b).unwrap(),
            1,
            "probe ended before ready: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(b[0]);
    }
    // The rest of the ready line.
    while b[0] != b'\n' {
        assert_eq!(out.read(&mut b).unwrap(), 1);
        seen.push(b[0]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn oversubscription_falls_back_to_managed_memory_within_the_limit() {
    let s = Scratch::new("oversub");
    let card = ("SIM_GPU_DEVICES", "1g 10 GPU-small Sim 1GB");
    let limit = ("CUDA_DEVICE_MEMORY_LIMIT", "2g");
    let out = probe(&s, &[card, limit], &["init", "alloc", "1500m"]);
    assert_eq!(
        out.rcs(),
        vec![0, OOM],
        "without oversubscription the card is the limit"
    );
    let s = Scratch::new("oversub-on");
    let on = ("CUDA_OVERSUBSCRIBE", "true");
    let out = probe(
        &s,
        &[card, limit, on],
        &[
            "init", "alloc", "1500m", "alloc", "600m", "alloc", "500m", "meminfo",
        ],
    );
    assert_eq!(
        out.rcs(),
        vec![0, 0, OOM, 0, 0],
        "beyond the card but within the limit"
    );
    assert_eq!(out.field::<u64>(4, 3), 2 << 30);
}

/// NVML devices map to CUDA ordinals through CUDA_VISIBLE_DEVICES: the
/// container's device 0 is NVML device 1 here, and only it shows the limit.
#[test]
fn nvml_devices_map_through_cuda_visible_devices() {
    let s = Scratch::new("nvml-map");
    let env = [
        (
            "SIM_GPU_DEVICES",
            "4g 80 GPU-aaaa-0 Sim A;2g 40 GPU-bbbb-1 Sim B",
        ),
        ("CUDA_VISIBLE_DEVICES", "1"),
        ("CUDA_DEVICE_MEMORY_LIMIT_0", "500m"),
    ];
    let out = probe(&s, &env, &["init", "nvml-mem", "0", "nvml-mem", "1"]);
    assert_eq!(out.rcs(), vec![0, 0, 0]);
    assert_eq!(
        out.field::<u64>(1, 2),
        4 << 30,
        "not visible to CUDA: untouched"
    );
    assert_eq!(
        out.field::<u64>(2, 2),
        500 * MIB,
        "CUDA device 0 = NVML device 1"
    );
    let uuid = [env[0], ("CUDA_VISIBLE_DEVICES", "GPU-bbbb"), env[2]];
    let out = probe(
        &Scratch::new("nvml-map-uuid"),
        &uuid,
        &["init", "nvml-mem", "1"],
    );
    assert_eq!(out.field::<u64>(1, 2), 500 * MIB, "UUID prefixes work too");
}

/// A pool that keeps freed memory still holds it on the card: it stays
/// counted until trimmed; reuse from the pool's cache is not counted twice.
#[test]
fn pool_memory_is_counted_until_trimmed() {
    let s = Scratch::new("pool-keep");
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &[
            "init",
            "pool-keep",
            "async",
            "600m",
            "free-async",
            "0",
            "alloc",
            "600m",
            "async",
            "600m",
            "meminfo",
            "free-async",
            "1",
            "trim",
            "0",
            "alloc",
            "600m",
            "meminfo",
        ],
    );
    let rcs = out.rcs();
    assert_eq!(
        rcs[..6],
        [0, 0, 0, 0, OOM, 0],
        "the pool keeps 600m: {:?}",
        out.lines
    );
    assert_eq!(
        out.field::<u64>(6, 2),
        400 * MIB,
        "reused from the cache, counted once"
    );
    assert_eq!(rcs[7..], [0, 0, 0, 0], "{:?}", out.lines);
    assert_eq!(
        out.field::<u64>(10, 2),
        400 * MIB,
        "after the trim only the new 600m"
    );
}

/// A pool that gives memory back at synchronisation (the default release
/// threshold 0) is noticed when the next allocation would be refused.
#[test]
fn pool_memory_released_at_sync_is_noticed() {
    let s = Scratch::new("pool-sync");
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &[
            "init",
            "async",
            "600m",
            "free-async",
            "0",
            "sync",
            "alloc",
            "600m",
            "meminfo",
        ],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0, 0, 0, 0], "{:?}", out.lines);
    assert_eq!(out.field::<u64>(5, 2), 400 * MIB);
}

/// A CUDA process that execs another program keeps its pid: the new image
/// must not be charged for the old one's memory.
#[test]
fn exec_drops_the_previous_images_usage() {
    let s = Scratch::new("exec");
    let out = probe(
        &s,
        &[LIMIT_1000M],
        &[
            "init", "alloc", "600m", "exec", "init", "meminfo", "alloc", "900m",
        ],
    );
    assert_eq!(out.rcs(), vec![0, 0, 0, 0, 0], "{:?}", out.lines);
    assert_eq!(out.field::<u64>(3, 2), 1000 * MIB);
}
