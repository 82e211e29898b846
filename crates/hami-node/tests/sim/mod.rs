//! sim-gpu's NVML for hami-node's tests: the cdylib (built as hami-core's
//! tests build it, or from `HAMI_TEST_ARTIFACTS`), a device file of four
//! cards of different models (NUMA nodes 0, 0, 1, 1 as sim-gpu lays out
//! four cards), and tests run in a child process of the test binary so
//! that the simulation reads this env (it reads it once per process).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

#[path = "../../../hami-core/tests/common/mod.rs"]
mod common;

/// `(memory MiB, uuid, NVML name)` of the device file.
pub const CARDS: [(u64, &str, &str); 4] = [
    (
        8192,
        "GPU-c0000000-0000-4000-8000-000000000000",
        "NVIDIA H100 80GB HBM3",
    ),
    (
        4096,
        "GPU-c0000000-0000-4000-8000-000000000001",
        "NVIDIA A100-SXM4-40GB",
    ),
    (
        2048,
        "GPU-c0000000-0000-4000-8000-000000000002",
        "NVIDIA L4",
    ),
    (1024, "GPU-c0000000-0000-4000-8000-000000000003", "Tesla T4"),
];

/// NUMA node of each card of [`CARDS`].
pub const NUMA: [i32; 4] = [0, 0, 1, 1];

pub fn device_file() -> String {
    CARDS
        .iter()
        .map(|(m, u, n)| format!("{m}m 40 {u} {n}\n"))
        .collect()
}

const CHILD: &str = "HAMI_NODE_SIM_CHILD";
const LIB: &str = "HAMI_NODE_SIM_LIB";

/// sim-gpu's cdylib.
pub fn sim_lib() -> PathBuf {
    common::artifacts().sim.clone()
}

/// Writes the device file into `dir`; returns its path.
pub fn write_device_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("devices");
    std::fs::write(&path, device_file()).unwrap();
    path
}

/// In the test process: runs `test` again in a child process with the
/// simulation's env, checks that it passed and returns true. In that
/// child: returns false, and the test body runs.
pub fn in_child(test: &str) -> bool {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return false;
    }
    let lib = sim_lib();
    let dir = tempfile::tempdir().unwrap();
    let devices = write_device_file(dir.path());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .env(LIB, &lib)
        .env("SIM_GPU_CONFIG", &devices)
        .env_remove("SIM_GPU_DEVICES")
        .env("SIM_GPU_STATE_DIR", dir.path().join("sim-gpu"))
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{test} failed in its child:\n{text}");
    assert!(text.contains("1 passed"), "{test} did not run:\n{text}");
    true
}

/// In the child: the library to load.
pub fn lib() -> PathBuf {
    PathBuf::from(std::env::var_os(LIB).expect("set by in_child"))
}
