//! `--device-config` end to end: a hami-scheduler started with a device
//! config (the ConfigMap form) applies its defaults in the webhook and in
//! placement, as seen on real pods.

use std::time::Duration;

use serde_json::json;

use hami_e2e::{GpuNode, TestNs};

/// The whole `hami-scheduler-device` ConfigMap, as an operator mounts it.
const DEVICE_CONFIG: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: hami-scheduler-device
data:
  device-config.yaml: |
    nvidia:
      defaultGPUNum: 2
      defaultMemory: 3000
      defaultCores: 20
";

#[tokio::test]
async fn device_config_defaults_reach_the_webhook_and_the_allocation() {
    let path = std::env::temp_dir().join(format!(
        "hami-e2e-device-config-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, DEVICE_CONFIG).expect("writing the device config");
    let flag = format!("--device-config={}", path.display());
    let Some(cluster) = hami_e2e::cluster_with(env!("CARGO_BIN_EXE_hami-scheduler"), &[&flag])
    else {
        return;
    };
    let mut ns = cluster.namespace("devcfg").await;
    let node = ns
        .add_node(&GpuNode::new("n", 4, 16000, "NVIDIA-Tesla T4"))
        .await;

    // Only a core share asked for: the webhook adds defaultGPUNum cards,
    // and each card gets defaultMemory.
    let created = ns
        .create_pod(ns.gpu_pod("p", json!({"nvidia.com/gpucores": "30"}), json!({})))
        .await
        .expect("created");
    let limits = created.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("2"),
        "{limits:?}"
    );
    let p = ns.wait_bound("p", Duration::from_secs(60)).await;
    assert_eq!(
        p.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node.as_str())
    );
    let devices = TestNs::allocation(&p);
    let got: Vec<(u64, u32)> = devices.devices().map(|d| (d.mem, d.cores)).collect();
    assert_eq!(got, vec![(3000, 30), (3000, 30)], "{devices:?}");

    // Nothing asked but a card: defaultMemory and defaultCores apply.
    ns.create_pod(ns.gpu_pod("q", json!({"nvidia.com/gpu": "1"}), json!({})))
        .await
        .expect("created");
    let q = ns.wait_bound("q", Duration::from_secs(60)).await;
    let devices = TestNs::allocation(&q);
    let got: Vec<(u64, u32)> = devices.devices().map(|d| (d.mem, d.cores)).collect();
    assert_eq!(got.len(), 1, "{devices:?}");
    assert_eq!(got[0].0, 3000, "{devices:?}");
    let _ = std::fs::remove_file(&path);
}
