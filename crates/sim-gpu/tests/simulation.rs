//! The simulated driver on its own (no interposer): bookkeeping, OOM when
//! the card is full, kernels that take their time, NVML utilisation; one
//! card shared by several processes.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::{Duration, Instant};

#[path = "../../hami-core/tests/common/mod.rs"]
mod common;
use common::*;

fn sim(env: &[(&str, &str)], args: &[&str]) -> Lines {
    // Each call its own scratch dir, so its own simulated cards.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let s = Scratch::new(&format!("sim-{n}"));
    let out = probe_cmd(&s, env, args, false).output().unwrap();
    Lines::from_output(&out)
}

#[test]
fn allocations_fill_the_card_then_fail() {
    let out = sim(
        &[("SIM_GPU_DEVICES", "1g 10 GPU-a A;2g 20 GPU-b B")],
        &[
            "init", "alloc", "700m", "alloc", "400m", "meminfo", "dev", "1", "alloc", "1500m",
            "totalmem", "1", "free", "0", "dev", "0", "meminfo",
        ],
    );
    assert_eq!(out.rcs(), vec![0, 0, OOM, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(out.field::<u64>(3, 2), 324 * MIB, "free on device 0");
    assert_eq!(out.field::<u64>(6, 2), 2 << 30, "device 1's total");
    assert_eq!(out.field::<u64>(9, 2), 1 << 30, "device 0 empty again");
}

#[test]
fn kernels_occupy_the_device_for_their_grid_size() {
    // 200 kernels of 2000 blocks = 2 ms each: 0.4 s of device time.
    let out = sim(&[], &["init", "launch", "200", "2000", "nvml-util", "0"]);
    assert_eq!(out.rcs(), vec![0, 0, 0]);
    let elapsed: f64 = out.field(1, 3);
    assert!((0.39e9..0.6e9).contains(&elapsed), "took {elapsed} ns");
    let util: u32 = out.field(2, 2);
    assert!(util >= 35, "NVML utilisation over the last second: {util}%");
}

#[test]
fn every_kind_of_allocation_is_booked_and_freed() {
    let out = sim(
        &[],
        &[
            "init",
            "vmm",
            "1g",
            "array",
            "1024",
            "1024",
            "0",
            "graph-mem",
            "1g",
            "meminfo",
            "vmm-release",
            "0",
            "array-destroy",
            "1",
            "graph-destroy",
            "2",
            "meminfo",
        ],
    );
    assert_eq!(out.rcs(), vec![0; 9]);
    assert_eq!(
        out.field::<u64>(4, 2),
        (4 << 30) - (2 << 30) - 4 * MIB,
        "on the 4 GiB test card"
    );
    assert_eq!(out.field::<u64>(8, 2), 4 << 30);
}

fn read_ready(c: &mut Child) -> Vec<String> {
    let mut lines = Vec::new();
    let mut r = BufReader::new(c.stdout.as_mut().unwrap());
    loop {
        let mut l = String::new();
        assert!(
            r.read_line(&mut l).unwrap() > 0,
            "probe ended early: {lines:?}"
        );
        if l.starts_with("ready ") {
            return lines;
        }
        lines.push(l.trim().to_owned());
    }
}

fn sim_in(s: &Scratch, env: &[(&str, &str)], args: &[&str]) -> Lines {
    Lines::from_output(&probe_cmd(s, env, args, false).output().unwrap())
}

#[test]
fn processes_share_the_card_memory_and_a_killed_one_is_reclaimed() {
    let s = Scratch::new("shared-mem");
    let mut a = probe_cmd(&s, &[], &["init", "alloc", "3g", "ready", "hold"], false)
        .spawn()
        .unwrap();
    assert_eq!(read_ready(&mut a), vec!["init 0", "alloc 0 0"]);
    let b = sim_in(
        &s,
        &[],
        &[
            "init",
            "alloc",
            "2g",
            "meminfo",
            "nvml-mem",
            "0",
            "nvml-procs",
            "0",
        ],
    );
    assert_eq!(b.rcs(), vec![0, OOM, 0, 0, 0]);
    assert_eq!(b.field::<u64>(2, 2), 1 << 30, "free on the 4 GiB card");
    assert_eq!(
        b.field::<u64>(3, 4),
        3 << 30,
        "NVML used: the other process's"
    );
    let pid = a.id().to_string();
    assert!(
        b.lines[4].contains(&pid),
        "NVML lists the other process: {:?}",
        b.lines[4]
    );
    // Another test's cards are not this one.
    let other = Scratch::new("shared-mem-other");
    assert_eq!(
        sim_in(&other, &[], &["init", "alloc", "2g"]).rcs(),
        vec![0, 0]
    );
    // SIGKILL: the driver gives a dead process's memory back.
    a.kill().unwrap();
    a.wait().unwrap();
    let b = sim_in(
        &s,
        &[],
        &["init", "alloc", "2g", "meminfo", "nvml-procs", "0"],
    );
    assert_eq!(b.rcs(), vec![0, 0, 0, 0]);
    assert_eq!(b.field::<u64>(2, 2), 2 << 30);
    assert!(!b.lines[3].contains(&pid), "{:?}", b.lines[3]);
}

/// `cmd` run as pid 1 of a new pid namespace (as a container's first
/// process), or None when this user may not make one.
fn in_pid_namespace(cmd: &std::process::Command) -> Option<std::process::Command> {
    let probe = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .output()
        .ok()?;
    if !probe.status.success() {
        return None;
    }
    let mut c = std::process::Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    Some(c)
}

#[test]
fn processes_in_different_pid_namespaces_share_the_card() {
    // Two containers' first processes are both pid 1: the card must still
    // tell them apart, and free the memory of the one that dies.
    let s = Scratch::new("shared-pidns");
    let hold = probe_cmd(&s, &[], &["init", "alloc", "3g", "ready", "hold"], false);
    let Some(mut hold) = in_pid_namespace(&hold) else {
        eprintln!("SKIP: `unshare --pid` is not permitted here (needs root)");
        return;
    };
    let mut a = hold.spawn().unwrap();
    assert_eq!(read_ready(&mut a), vec!["init 0", "alloc 0 0"]);
    let run = |args: &[&str]| {
        let c = probe_cmd(&s, &[], args, false);
        Lines::from_output(&in_pid_namespace(&c).unwrap().output().unwrap())
    };
    let b = run(&["init", "alloc", "2g", "meminfo", "alloc", "1g"]);
    assert_eq!(b.rcs(), vec![0, OOM, 0, 0], "{:?}", b.lines);
    assert_eq!(b.field::<u64>(2, 2), 1 << 30, "free beside the other pid 1");
    a.kill().unwrap();
    a.wait().unwrap();
    let b = run(&["init", "alloc", "2g", "meminfo"]);
    assert_eq!(b.rcs(), vec![0, 0, 0], "{:?}", b.lines);
    assert_eq!(
        b.field::<u64>(2, 2),
        2 << 30,
        "the dead pid 1's memory is free"
    );
}

#[test]
fn kernels_of_processes_serialise_on_the_card() {
    let s = Scratch::new("shared-time");
    // A 3 s kernel in one process ...
    let a = probe_cmd(&s, &[], &["init", "launch", "1", "3000000"], false)
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let u = sim_in(&s, &[], &["init", "nvml-util", "0"]);
        if u.field::<u32>(1, 2) > 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the kernel never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... delays a 1 ms kernel of another until it is done, as on a real
    // card (each simulating its own card, it would take 1 ms).
    let b = sim_in(&s, &[], &["init", "launch", "1", "1000", "nvml-util", "0"]);
    let a = Lines::from_output(&a.wait_with_output().unwrap());
    // On CLOCK_MONOTONIC: the 3 s kernel was launched after `a_from`, so it
    // ran until `a_from + 3 s` at least. The other process launched before
    // then (while it ran) and its kernel finished only after it.
    let a_end = a.field::<u64>(1, 4) + 3_000_000_000;
    let (b_from, b_to): (u64, u64) = (b.field(1, 4), b.field(1, 5));
    assert!(
        b_from < a_end,
        "nothing tested: the second launch came after the kernel ended: {:?} {:?}",
        a.lines,
        b.lines
    );
    assert!(
        b_to >= a_end,
        "the second process's kernel did not wait behind the first's: {:?} {:?}",
        a.lines,
        b.lines
    );
    assert!(
        b.field::<u32>(2, 2) >= 50,
        "NVML utilisation counts the other process's kernel: {:?}",
        b.lines[2]
    );
}

#[test]
fn nvml_pids_can_be_shifted_like_a_pid_namespace() {
    let s = Scratch::new("pid-offset");
    let out = sim_in(
        &s,
        &[("SIM_GPU_PID_OFFSET", "100000")],
        &["init", "alloc", "1m", "nvml-procs", "0", "ready"],
    );
    let pid: u64 = out.field(3, 2);
    let listed = &out.lines[2];
    assert!(
        listed.contains(&(pid + 100000).to_string()),
        "{listed:?} for pid {pid}"
    );
}
