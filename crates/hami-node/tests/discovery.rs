//! Discovery against sim-gpu's NVML through nvml-wrapper: four cards of
//! different models on two NUMA nodes become HAMi's register records;
//! HAMi's per-node `config.json` overrides split count and scaling and
//! filters cards; a missing library is a clear error of the binary.

mod sim;

use std::process::Command;

use hami_api::device::{decode_devices, encode_devices_json};
use hami_api::{DeviceInfo, DeviceMode, NvidiaConfig};
use hami_node::discovery::{CardSettings, Discovery, Scan, node_settings};
use sim::{CARDS, NUMA};

fn open(settings: CardSettings) -> Discovery {
    Discovery::open(sim::lib().as_os_str(), settings).expect("loading sim-gpu's NVML")
}

#[test]
fn discovery_reads_the_simulated_cards() {
    if sim::in_child("discovery_reads_the_simulated_cards") {
        return;
    }
    let mut d = open(CardSettings::default());
    let cards = d.scan().unwrap();
    let want: Vec<DeviceInfo> = CARDS
        .iter()
        .enumerate()
        .map(|(i, (mem, uuid, _))| DeviceInfo {
            id: uuid.to_string(),
            index: i as u32,
            count: 10,
            devmem: *mem,
            devcore: 100,
            device_type: [
                "NVIDIA H100 80GB HBM3",
                "NVIDIA A100-SXM4-40GB",
                "NVIDIA L4",
                "NVIDIA-Tesla T4",
            ][i]
                .into(),
            numa: NUMA[i],
            mode: Some(DeviceMode::HamiCore),
            mig_profiles: None,
            custom_info: None,
            health: true,
        })
        .collect();
    assert_eq!(cards, want);
    // The register annotation decodes back to the same cards.
    let value = encode_devices_json(&cards);
    assert!(value.contains(r#""type":"NVIDIA-Tesla T4""#), "{value}");
    assert_eq!(decode_devices("register", &value).unwrap(), cards);
    // A second scan: the same.
    assert_eq!(d.scan().unwrap(), cards);
}

#[test]
fn a_card_in_mig_mode_is_registered_unhealthy() {
    if sim::in_child("a_card_in_mig_mode_is_registered_unhealthy") {
        return;
    }
    // SAFETY: the child runs this one test on one thread.
    unsafe { std::env::set_var("SIM_GPU_MIG", CARDS[1].1) };
    let mut d = open(CardSettings::default());
    let cards = d.scan().unwrap();
    let health: Vec<bool> = cards.iter().map(|c| c.health).collect();
    assert_eq!(health, [true, false, true, true], "{cards:?}");
    assert_eq!(cards[1].id, CARDS[1].1);
}

#[test]
fn node_config_overrides_and_filters_the_cards() {
    if sim::in_child("node_config_overrides_and_filters_the_cards") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"nodeconfig": [
                {{"name": "other", "devicesplitcount": 99}},
                {{"name": "gpu-1", "operatingmode": "hami-core", "devicesplitcount": 4,
                  "devicememoryscaling": 2, "devicecorescaling": 1.5, "libcudaloglevel": "3",
                  "enablenumatopology": true,
                  "filterdevices": {{"uuid": ["{}"], "index": [3]}}}}
            ]}}"#,
            CARDS[1].1
        ),
    )
    .unwrap();
    let s = node_settings(NvidiaConfig::default(), Some(&file), "gpu-1").unwrap();
    assert_eq!(s.config.lib_cuda_log_level, 3);
    assert_eq!(s.numa_topology, Some(true));
    let cards = open(s.cards).scan().unwrap();
    let got: Vec<(&str, u32, u32, u64, u32, i32)> = cards
        .iter()
        .map(|c| (c.id.as_str(), c.index, c.count, c.devmem, c.devcore, c.numa))
        .collect();
    assert_eq!(
        got,
        [
            (CARDS[0].1, 0, 4, 16384, 150, 0),
            (CARDS[2].1, 2, 4, 4096, 150, 1),
        ]
    );

    // Another node: the cluster's config, every card.
    let s = node_settings(NvidiaConfig::default(), Some(&file), "gpu-2").unwrap();
    let cards = open(s.cards).scan().unwrap();
    assert_eq!(cards.len(), 4);
    assert_eq!((cards[3].count, cards[3].devmem), (10, 1024));

    // A bad file names the file and the field.
    std::fs::write(
        &file,
        r#"{"nodeconfig": [{"name": "gpu-1", "devicesplitcount": "x"}]}"#,
    )
    .unwrap();
    let e = format!(
        "{:#}",
        node_settings(NvidiaConfig::default(), Some(&file), "gpu-1").unwrap_err()
    );
    assert!(
        e.contains("config.json") && e.contains("devicesplitcount"),
        "{e}"
    );
}

/// The binary without an NVML library: a clear error naming the library
/// and the flag and variable that point at it, exit status non-zero.
#[test]
fn a_missing_nvml_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnvidia-ml.so.1");
    let run = |flag: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hami-node"));
        c.args(["--node-name", "gpu-1"])
            .arg("--device-plugin-path")
            .arg(dir.path())
            .env("KUBECONFIG", dir.path().join("nowhere"))
            .env_remove("HAMI_NVML_LIB");
        if flag {
            c.arg("--nvml-lib").arg(&missing);
        } else {
            c.env("HAMI_NVML_LIB", &missing);
        }
        c.output().unwrap()
    };
    for flag in [true, false] {
        let out = run(flag);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exited 0:\n{err}");
        assert!(
            err.contains(&missing.display().to_string())
                && err.contains("--nvml-lib")
                && err.contains("HAMI_NVML_LIB"),
            "{err}"
        );
    }
    // --sim with the library nowhere to be found (not next to the
    // executable, a copy in a dir of its own): the same kind of error.
    let exe = dir.path().join("hami-node");
    std::fs::copy(env!("CARGO_BIN_EXE_hami-node"), &exe).unwrap();
    let out = Command::new(&exe)
        .args(["--node-name", "gpu-1", "--sim"])
        .env_remove("HAMI_NVML_LIB")
        .env("LD_LIBRARY_PATH", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("libsim_gpu.so") && err.contains("--nvml-lib"),
        "{err}"
    );
}
