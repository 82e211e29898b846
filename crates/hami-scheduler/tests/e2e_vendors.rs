//! Against a real kube-apiserver, kube-scheduler and kwok: a cluster of
//! three vendors (NVIDIA, Huawei Ascend, Cambricon) scheduled by the one
//! engine. Each pod lands on its own vendor's node, through the webhook and
//! the extender, with the annotations that vendor's device plugin reads.
//! Skips when the control-plane binaries are not built (see hami-e2e).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use hami_api::device::encode_devices_json;
use hami_api::{DeviceInfo, annotations as ann};
use hami_e2e::{GpuNode, TestNs, wait_for};

const BIND: Duration = Duration::from_secs(60);
const DSMLU_LOCK: &str = "cambricon.com/dsmlu.lock";

async fn running(ns: &TestNs, name: &str, limits: serde_json::Value) -> Pod {
    ns.create_pod(ns.gpu_pod(name, limits, json!({})))
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    ns.wait_bound(name, BIND).await;
    wait_for(BIND, &format!("{name} Running"), || async {
        let p = ns.get_pod(name).await;
        (p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).then_some(p)
    })
    .await
}

#[tokio::test]
async fn each_vendors_pod_lands_on_its_own_vendors_node() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let mut ns = cluster.namespace("vendors").await;
    let nvidia = ns
        .add_node(&GpuNode::new("nv", 1, 16384, "NVIDIA-Tesla T4"))
        .await;
    let npu_prefix = format!("{}-npu", ns.name);
    let npus: Vec<DeviceInfo> = (0..2)
        .map(|i| DeviceInfo {
            id: format!("{npu_prefix}-{i}"),
            index: i,
            count: 4,
            devmem: 65536,
            devcore: 20,
            device_type: "Ascend910B3".into(),
            health: true,
            ..Default::default()
        })
        .collect();
    let ascend = ns
        .add_node(&GpuNode::other_vendor("ascend").annotation(
            "hami.io/node-register-Ascend910B3",
            &encode_devices_json(&npus),
        ))
        .await;
    // Cambricon reports through capacity; kube-scheduler itself checks the
    // memory and core resources, which HAMi leaves out of managedResources.
    let mlu = ns
        .add_node(
            &GpuNode::other_vendor("mlu")
                .resource("cambricon.com/vmlu", "200")
                .resource("cambricon.com/mlu.smlu.vcore", "200")
                .resource("cambricon.com/mlu.smlu.vmemory", "182"),
        )
        .await;

    // Created in the order that would most tempt a vendor-blind scheduler:
    // binpack puts every pod on the fullest node.
    let nv_pod = running(
        &ns,
        "nv",
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}),
    )
    .await;
    assert_eq!(TestNs::node_of(&nv_pod), nvidia);
    let nv_alloc = TestNs::annotation(&nv_pod, ann::NVIDIA_DEVICES_ALLOCATED).unwrap();
    assert_eq!(
        nv_alloc,
        format!("{},NVIDIA,1000,0:;", GpuNode::uuid(&nvidia, 0))
    );

    let npu_pod = running(
        &ns,
        "npu",
        json!({"huawei.com/Ascend910B3": "1", "huawei.com/Ascend910B3-memory": "16000"}),
    )
    .await;
    assert_eq!(TestNs::node_of(&npu_pod), ascend);
    // The webhook rounded the memory up to the vNPU template.
    assert_eq!(
        TestNs::limit(&npu_pod, "huawei.com/Ascend910B3-memory").as_deref(),
        Some("16384")
    );
    let entry = format!("{npu_prefix}-1,Ascend910B3,16384,0:;");
    for key in [
        "hami.io/Ascend910B3-devices-to-allocate",
        "hami.io/Ascend910B3-devices-allocated",
    ] {
        assert_eq!(
            TestNs::annotation(&npu_pod, key).as_deref(),
            Some(entry.as_str()),
            "{key}"
        );
    }
    assert_eq!(
        TestNs::annotation(&npu_pod, "huawei.com/Ascend910B3").as_deref(),
        Some(
            format!(r#"[{{"UUID":"{npu_prefix}-1","memory":16384,"temp":"vir05_1c_16g"}}]"#)
                .as_str()
        )
    );
    assert_eq!(
        TestNs::annotation(&npu_pod, ann::NVIDIA_DEVICES_ALLOCATED),
        None
    );

    let mlu_pod = running(
        &ns,
        "mlu",
        json!({
            "cambricon.com/vmlu": "1",
            "cambricon.com/mlu.smlu.vmemory": "20",
            "cambricon.com/mlu.smlu.vcore": "10",
        }),
    )
    .await;
    assert_eq!(TestNs::node_of(&mlu_pod), mlu);
    let entry = format!("{mlu}-cambricon-mlu-1,MLU,5120,10:;");
    assert_eq!(
        TestNs::annotation(&mlu_pod, "hami.io/cambricon-mlu-devices-allocated").as_deref(),
        Some(entry.as_str())
    );
    assert_eq!(
        TestNs::annotation(&mlu_pod, "CAMBRICON_DSMLU_PROFILE").as_deref(),
        Some("1_10_20")
    );
    assert_eq!(
        TestNs::annotation(&mlu_pod, "CAMBRICON_DSMLU_ASSIGNED").as_deref(),
        Some("false")
    );
    // Cambricon's plugin never releases HAMi's node lock, so none is taken.
    assert_eq!(ns.node_lock(&mlu).await, None);
    // Its own lock is: the bind's time, which the plugin removes once it
    // has allocated.
    let dsmlu_lock = ns
        .node_annotation(&mlu, DSMLU_LOCK)
        .await
        .expect("the bind takes cambricon.com/dsmlu.lock");
    let since: jiff::Timestamp = dsmlu_lock.parse().expect("an RFC 3339 time");
    let age = jiff::Timestamp::now().duration_since(since);
    assert!(age.as_secs() < 60, "{dsmlu_lock} is {age:?} old");
    // A whole-card pod is not the plugin's dynamic sMLU, which alone takes
    // and releases the lock: it binds beside a held lock and leaves it.
    let whole = running(&ns, "mlu-whole", json!({"cambricon.com/vmlu": "1"})).await;
    assert_eq!(TestNs::node_of(&whole), mlu);
    assert_eq!(
        ns.node_annotation(&mlu, DSMLU_LOCK).await.as_deref(),
        Some(dsmlu_lock.as_str())
    );
    // While it is held, the next dynamic sMLU bind on the node fails and
    // says why; once the plugin (here the test) removes it, the pod binds.
    let smlu = json!({
        "cambricon.com/vmlu": "1",
        "cambricon.com/mlu.smlu.vmemory": "20",
        "cambricon.com/mlu.smlu.vcore": "10",
    });
    ns.create_pod(ns.gpu_pod("mlu-2", smlu, json!({})))
        .await
        .unwrap();
    let ev = ns.wait_event("mlu-2", "BindingFailed", BIND).await;
    let why = ev.message.unwrap_or_default();
    assert!(
        why.contains(DSMLU_LOCK) && why.contains(&dsmlu_lock),
        "{why}"
    );
    assert_eq!(TestNs::node_of(&ns.get_pod("mlu-2").await), "");
    ns.set_node_annotation(&mlu, DSMLU_LOCK, None).await;
    let mlu_2 = ns.wait_bound("mlu-2", BIND).await;
    assert_eq!(TestNs::node_of(&mlu_2), mlu);
    assert!(ns.node_annotation(&mlu, DSMLU_LOCK).await.is_some());

    // An Ascend pod larger than any NPU waits with the Ascend reason on the
    // Ascend node and "no device" on the others.
    ns.create_pod(ns.gpu_pod("too-big", json!({"huawei.com/Ascend910B3": "3"}), json!({})))
        .await
        .unwrap();
    let ev = ns.wait_event("too-big", "FilteringFailed", BIND).await;
    let why = ev.message.unwrap_or_default();
    assert!(
        why.contains(&ascend) && why.contains(&nvidia) && why.contains(&mlu),
        "{why}"
    );
    assert!(why.contains("AllocatedCardsInsufficientRequest"), "{why}");
    assert!(why.contains("NodeInsufficientDevice"), "{why}");
    assert_eq!(TestNs::node_of(&ns.get_pod("too-big").await), "");
}
