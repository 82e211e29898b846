//! Compute quotas: the share of simulated device time a container gets
//! converges to CUDA_DEVICE_SM_LIMIT, on every launch path; low-priority
//! launches pause while the node agent says so.

mod common;
use common::*;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Timing tests run one at a time: on a small CI machine, parallel tests
/// would starve each other of CPU and the device of work.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `busy` launches of `us`-microsecond kernels for `ms` and returns the
/// achieved share of device time in percent.
fn share(s: &Scratch, env: &[(&str, &str)], cmd: &str, ms: &str, us: &str) -> f64 {
    let out = probe(s, env, &["init", cmd, ms, us]);
    assert_eq!(out.rc(1), 0, "{:?}", out.lines);
    let (n, elapsed): (f64, f64) = (out.field(1, 2), out.field(1, 3));
    let kernel_ns = if cmd == "graph-launch" {
        1e6
    } else {
        us.parse::<f64>().unwrap() * 1e3
    };
    100.0 * n * kernel_ns / elapsed
}

fn assert_near(got: f64, want: f64, what: &str) {
    eprintln!("{what}: {got:.1}% (quota {want}%)");
    assert!(
        (got - want).abs() <= 5.0,
        "{what}: {got:.1}% is not within 5 points of {want}%"
    );
}

#[test]
fn thirty_and_sixty_percent() {
    let _serial = serial();
    for q in ["30", "60"] {
        let s = Scratch::new(&format!("pace-{q}"));
        let got = share(&s, &[("CUDA_DEVICE_SM_LIMIT", q)], "busy", "3000", "1000");
        assert_near(got, q.parse().unwrap(), &format!("cuLaunchKernel at {q}%"));
    }
}

#[test]
fn unlimited_is_not_paced() {
    let _serial = serial();
    let s = Scratch::new("pace-none");
    let got = share(&s, &[], "busy", "1000", "1000");
    assert!(got > 80.0, "unpaced share {got:.1}% (quota would give 30%)");
    let s = Scratch::new("pace-disabled");
    let got = share(
        &s,
        &[
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("GPU_CORE_UTILIZATION_POLICY", "disable"),
        ],
        "busy",
        "1000",
        "1000",
    );
    assert!(got > 80.0, "policy=disable still paced: {got:.1}%");
}

#[test]
fn launches_into_a_capturing_stream_are_not_paced() {
    let _serial = serial();
    let s = Scratch::new("pace-capture");
    let env = [("CUDA_DEVICE_SM_LIMIT", "30"), ("SIM_GPU_CAPTURING", "1")];
    let got = share(&s, &env, "busy", "1000", "1000");
    assert!(got > 80.0, "captured launches were paced: {got:.1}%");
    let region = hami_shm::region::SharedRegion::open(&s.region()).unwrap();
    assert_eq!(
        region.device_busy_ns(0),
        0,
        "no events were recorded into the capture"
    );
}

#[test]
fn every_launch_path_is_paced() {
    let _serial = serial();
    // A fixed number of launches; the share is measured over the run.
    for (cmd, n, resolve, ptds) in [
        ("launch-ex", "600", "dlsym", "0"),
        ("launch-coop", "600", "dlsym", "0"),
        ("graph-launch", "600", "dlsym", "0"),
        ("launch", "600", "procaddr", "1"),
        ("launch", "600", "default", "0"),
    ] {
        let s = Scratch::new(&format!("path-{cmd}-{resolve}"));
        let env = [
            ("CUDA_DEVICE_SM_LIMIT", "40"),
            ("HAMI_PROBE_RESOLVE", resolve),
            ("HAMI_PROBE_PTDS", ptds),
        ];
        let out = probe(&s, &env, &["init", cmd, n, "1000"]);
        assert_eq!(out.rc(1), 0, "{:?}", out.lines);
        let (k, elapsed): (f64, f64) = (out.field(1, 2), out.field(1, 3));
        assert_near(
            100.0 * k * 1e6 / elapsed,
            40.0,
            &format!("{cmd} via {resolve} ptds={ptds}"),
        );
    }
}

#[test]
fn two_processes_share_one_quota() {
    let _serial = serial();
    let s = Scratch::new("pace-two");
    let env = [("CUDA_DEVICE_SM_LIMIT", "50")];
    let kids: Vec<_> = (0..2)
        .map(|_| spawn(&s, &env, &["init", "busy", "3000", "1000"]))
        .collect();
    let total: f64 = kids
        .into_iter()
        .map(|k| {
            let out = Lines::from_output(&k.wait_with_output().unwrap());
            let (n, elapsed): (f64, f64) = (out.field(1, 2), out.field(1, 3));
            100.0 * n * 1e6 / elapsed
        })
        .sum();
    // Each process simulates its own card, so the shares simply add up.
    assert_near(total, 50.0, "two processes together at 50%");
}

#[test]
fn low_priority_pauses_while_suspended_and_resumes() {
    let _serial = serial();
    let s = Scratch::new("priority");
    let region = hami_shm::region::SharedRegion::open(&s.region()).unwrap();
    region.set_low_priority_suspended(true);
    let mut child = spawn(
        &s,
        &[("CUDA_TASK_PRIORITY", "1")],
        &["init", "launch", "5", "1000"],
    );
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a suspended low-priority process launched"
    );
    let t = Instant::now();
    region.set_low_priority_suspended(false);
    let out = Lines::from_output(&child.wait_with_output().unwrap());
    assert_eq!(out.rcs(), vec![0, 0]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "resumed late: {:?}",
        t.elapsed()
    );
    // A high-priority process is never held.
    region.set_low_priority_suspended(true);
    let out = probe(
        &s,
        &[("CUDA_TASK_PRIORITY", "0")],
        &["init", "launch", "5", "1000"],
    );
    assert_eq!(out.rcs(), vec![0, 0]);
    assert!(
        region
            .header
            .high_priority_launch_ns
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn quota_changes_while_running() {
    let _serial = serial();
    let s = Scratch::new("pace-live");
    let child = spawn(
        &s,
        &[("CUDA_DEVICE_SM_LIMIT", "20")],
        &["init", "busy", "1500", "1000", "busy", "3000", "1000"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let region = hami_shm::region::SharedRegion::open(&s.region()).unwrap();
    // The node agent raises the quota while the program runs.
    std::thread::sleep(Duration::from_millis(1300));
    region.set_sm_limit(0, 70);
    let out = Lines::from_output(&child.wait_with_output().unwrap());
    let (n, e): (f64, f64) = (out.field(2, 2), out.field(2, 3));
    assert_near(100.0 * n * 1e6 / e, 70.0, "after raising the quota to 70%");
}
