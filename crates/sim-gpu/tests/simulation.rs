//! The simulated driver on its own (no interposer): bookkeeping, OOM when
//! the card is full, kernels that take their time, NVML utilisation.

#[path = "../../hami-core/tests/common/mod.rs"]
mod common;
use common::*;

fn sim(env: &[(&str, &str)], args: &[&str]) -> Lines {
    let s = Scratch::new("sim");
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
