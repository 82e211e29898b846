//! Every non-NVIDIA vendor through the one engine: node reports, requests
//! in the vendor's units, rounding, the multi-card rule, the webhook, and
//! the exact annotations written. Inputs and expected values are the
//! examples of docs/design/vendor-formats.md section 5, which were computed
//! by running HAMi 2.10's own code.

mod common;

use std::collections::BTreeMap;

use common::*;
use hami_api::annotations::SCHEDULER_NAME;
use hami_api::device::encode_devices_json;
use hami_api::{DeviceConfig, DeviceInfo};
use hami_sched::{Admission, Engine, Mode, Policies, Snapshot};
use k8s_openapi::api::core::v1::{Node, NodeStatus, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

const NOW_NS: i128 = 1_764_547_200_123_456_789;

fn all_vendors() -> Engine {
    Engine::from_config(&DeviceConfig::default(), Policies::default())
}

/// A node with annotations and capacity.
fn vendor_node(name: &str, annotations: &[(&str, &str)], capacity: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        status: Some(NodeStatus {
            capacity: Some(
                capacity
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn npus(word: &str, n: u32, count: u32, devmem: u64, devcore: u32) -> String {
    let cards: Vec<DeviceInfo> = (0..n)
        .map(|i| DeviceInfo {
            id: format!("{}-npu-{i}", word.to_lowercase()),
            index: i,
            count,
            devmem,
            devcore,
            device_type: word.into(),
            health: true,
            ..Default::default()
        })
        .collect();
    encode_devices_json(&cards)
}

/// Admits the pod as the webhook would, then places it; returns the
/// decision's annotations (empty when it fits nowhere) and the outcome.
fn schedule(e: &Engine, s: &mut Snapshot, mut p: Pod) -> (BTreeMap<String, String>, Outcome, Pod) {
    let a = e.admit(&mut p, SCHEDULER_NAME);
    assert!(
        !matches!(a, Admission::Denied(_)),
        "admission denied: {a:?}"
    );
    let out = place(e, s, &p);
    let ann = match &out.node {
        Some(n) => {
            e.decision_annotations(n, &out.devices, Some(&request(e, &p)), s.node(n), NOW_NS)
        }
        None => BTreeMap::new(),
    };
    (ann, out, p)
}

fn denied(e: &Engine, mut p: Pod) -> String {
    match e.admit(&mut p, SCHEDULER_NAME) {
        Admission::Denied(m) => m,
        other => panic!("expected a denial, got {other:?}"),
    }
}

fn limit(p: &Pod, container: usize, resource: &str) -> Option<String> {
    p.spec.as_ref().unwrap().containers[container]
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get(resource)
        .map(|q| q.0.clone())
}

// ---- Ascend

const B3: &str = "huawei.com/Ascend910B3";
const B3_MEM: &str = "huawei.com/Ascend910B3-memory";

fn b3_node(soft: Option<&str>) -> Node {
    let reg = npus(
        "Ascend910B3",
        2,
        4,
        65536,
        if soft.is_some() { 100 } else { 20 },
    );
    let mut a = vec![("hami.io/node-register-Ascend910B3", reg.as_str())];
    if let Some(v) = soft {
        a.push(("hami-vnpu-core", v));
    }
    vendor_node("node-b3", &a, &[])
}

#[test]
fn ascend_memory_rounds_up_to_the_vnpu_template() {
    let e = all_vendors();
    for (asked, rounded, template) in [
        ("16000", "16384", Some("vir05_1c_16g")),
        ("2000", "16384", Some("vir05_1c_16g")),
        ("20000", "32768", Some("vir10_3c_32g")),
    ] {
        let mut s = snapshot(&e, &[b3_node(None)]);
        let (a, out, p) = schedule(&e, &mut s, gpu_pod("p", &[(B3, "1"), (B3_MEM, asked)]));
        assert_eq!(limit(&p, 0, B3_MEM).as_deref(), Some(rounded), "{asked}");
        let entry = format!("ascend910b3-npu-1,Ascend910B3,{rounded},0:;");
        assert_eq!(out.devices.encode(), entry);
        assert_eq!(a["hami.io/Ascend910B3-devices-to-allocate"], entry);
        assert_eq!(a["hami.io/Ascend910B3-devices-allocated"], entry);
        assert_eq!(
            a[B3],
            format!(
                r#"[{{"UUID":"ascend910b3-npu-1","memory":{rounded},"temp":"{}"}}]"#,
                template.unwrap()
            )
        );
        assert_eq!(a["predicate-time"], "1764547200");
        assert_eq!(a["hami.io/vgpu-node"], "node-b3");
    }
}

#[test]
fn ascend_without_memory_is_a_whole_chip_without_template() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[b3_node(None)]);
    let (a, out, p) = schedule(&e, &mut s, gpu_pod("p", &[(B3, "1")]));
    assert_eq!(limit(&p, 0, B3_MEM).as_deref(), Some("65536"));
    assert_eq!(
        out.devices.encode(),
        "ascend910b3-npu-1,Ascend910B3,65536,0:;"
    );
    assert_eq!(a[B3], r#"[{"UUID":"ascend910b3-npu-1","memory":65536}]"#);
}

#[test]
fn ascend_webhook_rules() {
    let e = all_vendors();
    let m = denied(&e, gpu_pod("p", &[(B3, "2"), (B3_MEM, "16000")]));
    assert!(m.contains("vNPU templates are for one NPU"), "{m}");
    let m = denied(&e, gpu_pod("p", &[(B3, "1"), (B3_MEM, "70000")]));
    assert!(m.contains("70000") && m.contains("65536"), "{m}");
    let m = denied(
        &e,
        gpu_pod("p", &[(B3, "1"), ("huawei.com/Ascend910B3-core", "10")]),
    );
    assert!(m.contains("soft split"), "{m}");
    let m = denied(&e, gpu_pod("p", &[("huawei.com/Ascend910C", "3")]));
    assert!(m.contains("pairs"), "{m}");
}

#[test]
fn ascend_pods_get_the_configured_runtime_class() {
    let (config, _) = DeviceConfig::from_yaml("f", "vnpus:\n  runtimeClassName: ascend\n").unwrap();
    let e = Engine::from_config(&config, Policies::default());
    let mut p = gpu_pod("p", &[(B3, "1"), (B3_MEM, "16000")]);
    assert_eq!(e.admit(&mut p, SCHEDULER_NAME), Admission::Mutated);
    assert_eq!(
        p.spec.as_ref().unwrap().runtime_class_name.as_deref(),
        Some("ascend")
    );
    // Pods of other vendors keep theirs.
    let mut p = gpu_pod("p", &[("cambricon.com/vmlu", "1")]);
    e.admit(&mut p, SCHEDULER_NAME);
    assert_eq!(p.spec.as_ref().unwrap().runtime_class_name, None);
    // Without the key nothing is set.
    let mut p = gpu_pod("p", &[(B3, "1"), (B3_MEM, "16000")]);
    all_vendors().admit(&mut p, SCHEDULER_NAME);
    assert_eq!(p.spec.as_ref().unwrap().runtime_class_name, None);
}

#[test]
fn ascend_overwrite_env_blanks_only_containers_without_an_npu() {
    let chip = |w: &str| {
        format!(
            "  - commonWord: {w}\n    resourceName: huawei.com/{w}\n    resourceMemoryName: huawei.com/{w}-memory\n    memoryAllocatable: 65536\n    memoryCapacity: 65536\n    overwriteEnv: true\n"
        )
    };
    let y = format!("vnpus:\n  configs:\n{}{}", chip("ChipA"), chip("ChipB"));
    let (config, _) = DeviceConfig::from_yaml("f", &y).unwrap();
    let e = Engine::from_config(&config, Policies::default());
    let mut p = pod("p")
        .ctr(&[("huawei.com/ChipB", "1")])
        .ctr(&[("cpu", "1")])
        .build();
    e.admit(&mut p, SCHEDULER_NAME);
    let env = |i: usize| {
        let c = &p.spec.as_ref().unwrap().containers[i];
        (c.env.iter().flatten())
            .filter(|v| v.name == "ASCEND_VISIBLE_DEVICES")
            .map(|v| v.value.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        env(0),
        Vec::<String>::new(),
        "ChipA's rule leaves ChipB's container"
    );
    assert_eq!(env(1), [""], "a container without an NPU sees none");
}

#[test]
fn ascend_soft_split_needs_a_node_that_offers_it() {
    let e = all_vendors();
    let soft = |p: PodB| {
        p.ann("huawei.com/vnpu-mode", "hami-core")
            .ctr(&[
                (B3, "1"),
                (B3_MEM, "10000"),
                ("huawei.com/Ascend910B3-core", "30"),
            ])
            .build()
    };
    let mut s = snapshot(&e, &[b3_node(None)]);
    let (_, out, _) = schedule(&e, &mut s, soft(pod("p")));
    assert_eq!(out.node, None);
    assert_eq!(out.reason("node-b3"), "1/2 ModeNotFit");

    let mut s = snapshot(&e, &[b3_node(Some("true"))]);
    let (a, out, p) = schedule(&e, &mut s, soft(pod("p")));
    assert_eq!(
        limit(&p, 0, B3_MEM).as_deref(),
        Some("10000"),
        "soft split keeps MiB"
    );
    assert_eq!(
        out.devices.encode(),
        "ascend910b3-npu-1,Ascend910B3,10000,30:;"
    );
    assert_eq!(
        a[B3],
        r#"[{"UUID":"ascend910b3-npu-1","core":30,"memory":10000}]"#
    );
}

#[test]
fn ascend_910c_takes_npus_in_module_pairs() {
    let e = all_vendors();
    let reg = npus("Ascend910C", 4, 4, 65536, 20);
    let node = vendor_node(
        "node-910c",
        &[("hami.io/node-register-Ascend910C", &reg)],
        &[],
    );
    let mut s = snapshot(&e, std::slice::from_ref(&node));
    let (a, out, p) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("huawei.com/Ascend910C", "1"),
                ("huawei.com/Ascend910C-memory", "16384"),
            ],
        ),
    );
    assert_eq!(limit(&p, 0, "huawei.com/Ascend910C").as_deref(), Some("2"));
    assert_eq!(
        out.devices.encode(),
        "ascend910c-npu-3,Ascend910C,16384,0:ascend910c-npu-2,Ascend910C,16384,0:;"
    );
    assert_eq!(
        a["huawei.com/Ascend910C"],
        r#"[{"UUID":"ascend910c-npu-3","memory":16384,"temp":"vir05_1c_16g"},{"UUID":"ascend910c-npu-2","memory":16384,"temp":"vir05_1c_16g"}]"#
    );
    // With NPU 2 busy, only module 0 is whole: a second pair lands there.
    let mut s = snapshot(&e, &[node]);
    hold(
        &mut s,
        "default/busy",
        "node-910c",
        "ascend910c-npu-2,Ascend910C,65536,0:;",
    );
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("q", &[("huawei.com/Ascend910C", "2")]));
    assert_eq!(out.uuids(), [["ascend910c-npu-1", "ascend910c-npu-0"]]);
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("r", &[("huawei.com/Ascend910C", "2")]));
    assert_eq!(out.node, None, "NPU 3 alone is no pair");
    assert!(
        out.reason("node-910c")
            .contains("AllocatedCardsInsufficientRequest"),
        "{out:?}"
    );
}

#[test]
fn ascend_310p_uses_its_own_templates() {
    let e = all_vendors();
    let reg = r#"[{"id":"310p-0","count":7,"devmem":21527,"devcore":8,"type":"Ascend310P","health":true}]"#;
    let mut s = snapshot(
        &e,
        &[vendor_node(
            "node-310p",
            &[("hami.io/node-register-Ascend310P", reg)],
            &[],
        )],
    );
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("huawei.com/Ascend310P", "1"),
                ("huawei.com/Ascend310P-memory", "1000"),
            ],
        ),
    );
    assert_eq!(out.devices.encode(), "310p-0,Ascend310P,3072,0:;");
    assert_eq!(
        a["huawei.com/Ascend310P"],
        r#"[{"UUID":"310p-0","memory":3072,"temp":"vir01"}]"#
    );
}

#[test]
fn kubecon_ascend910_example_is_not_managed() {
    let e = all_vendors();
    let p = gpu_pod(
        "p",
        &[
            ("huawei.com/Ascend910", "1"),
            ("huawei.com/Ascend910-memory", "16384"),
        ],
    );
    assert_eq!(e.prepare(&p).unwrap(), None);
}

// ---- Cambricon

const VMLU: &str = "cambricon.com/vmlu";
const VMLU_MEM: &str = "cambricon.com/mlu.smlu.vmemory";
const VMLU_CORE: &str = "cambricon.com/mlu.smlu.vcore";

fn mlu_node() -> Node {
    vendor_node("node-mlu", &[], &[(VMLU_CORE, "200"), (VMLU_MEM, "182")])
}

#[test]
fn cambricon_cards_come_from_capacity_and_memory_is_in_256_mib_units() {
    let e = all_vendors();
    let s = snapshot(&e, &[mlu_node()]);
    let n = s.node("node-mlu").unwrap();
    assert_eq!(n.devices.len(), 2);
    assert_eq!(n.devices[1].info.id, "node-mlu-cambricon-mlu-1");
    assert_eq!(n.devices[1].info.devmem, 23296);

    let mut s = snapshot(&e, &[mlu_node()]);
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[(VMLU, "1"), (VMLU_MEM, "20"), (VMLU_CORE, "10")]),
    );
    let entry = "node-mlu-cambricon-mlu-1,MLU,5120,10:;";
    assert_eq!(out.devices.encode(), entry);
    assert_eq!(a["hami.io/cambricon-mlu-devices-to-allocate"], entry);
    assert_eq!(a["hami.io/cambricon-mlu-devices-allocated"], entry);
    assert_eq!(a["CAMBRICON_DSMLU_PROFILE"], "1_10_20");
    assert_eq!(a["CAMBRICON_DSMLU_ASSIGNED"], "false");
}

#[test]
fn cambricon_dynamic_smlu_binds_take_the_plugins_own_lock() {
    let e = all_vendors();
    let keys = |p: Pod| {
        let gpu = node("gpu-node", &[card("GPU-0", "NVIDIA-T4", 16384)]);
        let mut s = snapshot(&e, &[mlu_node(), gpu]);
        let (_, out, p) = schedule(&e, &mut s, p);
        assert!(out.node.is_some(), "placed");
        request(&e, &p).plugin_locks
    };
    let smlu = keys(gpu_pod(
        "p",
        &[(VMLU, "1"), (VMLU_MEM, "20"), (VMLU_CORE, "10")],
    ));
    assert_eq!(smlu, ["cambricon.com/dsmlu.lock"]);
    assert_eq!(
        keys(gpu_pod("p", &[(VMLU, "1"), (VMLU_CORE, "10")])).len(),
        1
    );
    // The plugin releases it only after a dynamic sMLU pod: a whole-card
    // one (or a zero vcore) takes none, nor do other vendors' pods.
    assert!(keys(gpu_pod("p", &[(VMLU, "1")])).is_empty());
    assert!(keys(gpu_pod("p", &[(VMLU, "1"), (VMLU_CORE, "0")])).is_empty());
    assert!(keys(gpu_pod("p", &[("nvidia.com/gpu", "1")])).is_empty());
}

#[test]
fn cambricon_defaults_multi_card_and_padding() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[mlu_node()]);
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[(VMLU, "1")]));
    assert_eq!(
        out.devices.encode(),
        "node-mlu-cambricon-mlu-1,MLU,23296,100:;"
    );
    assert_eq!(a["CAMBRICON_DSMLU_PROFILE"], "1_100_91");

    let mut s = snapshot(&e, &[mlu_node()]);
    let (_, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[(VMLU, "2"), (VMLU_MEM, "20"), (VMLU_CORE, "10")]),
    );
    assert_eq!(
        out.devices.encode(),
        "node-mlu-cambricon-mlu-1,MLU,5120,10:node-mlu-cambricon-mlu-0,MLU,5120,10:;"
    );

    let mut s = snapshot(&e, &[mlu_node()]);
    let p = pod("p")
        .ctr(&[])
        .ctr(&[(VMLU, "1"), (VMLU_MEM, "4"), (VMLU_CORE, "10")])
        .build();
    let (a, out, _) = schedule(&e, &mut s, p);
    assert_eq!(
        out.devices.encode(),
        ";node-mlu-cambricon-mlu-1,MLU,1024,10:;"
    );
    assert_eq!(a["CAMBRICON_DSMLU_PROFILE"], "1_10_4");

    let mut s = snapshot(&e, &[mlu_node()]);
    let (_, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[(VMLU, "1"), (VMLU_MEM, "8000"), (VMLU_CORE, "50")]),
    );
    assert_eq!(out.reason("node-mlu"), "2/2 CardInsufficientMemory");
}

// ---- Hygon

fn dcu_node() -> Node {
    vendor_node(
        "node-dcu",
        &[(
            "hami.io/node-dcu-register",
            "DCU-11111,4,65520,100,DCU-K100_AI,0,true,0,hami-core:DCU-22222,4,65520,100,DCU-K100_AI,0,true,1,hami-core:",
        )],
        &[],
    )
}

#[test]
fn hygon_reads_the_legacy_register_and_mib() {
    let e = all_vendors();
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("hygon.com/dcunum", "1"),
                ("hygon.com/dcumem", "16000"),
                ("hygon.com/dcucores", "80"),
            ],
            "DCU-22222,DCU,16000,80:;",
        ),
        (
            &[
                ("hygon.com/dcunum", "1"),
                ("hygon.com/dcumem", "2000"),
                ("hygon.com/dcucores", "60"),
            ],
            "DCU-22222,DCU,2000,60:;",
        ),
        (&[("hygon.com/dcunum", "1")], "DCU-22222,DCU,65520,100:;"),
        (
            &[
                ("hygon.com/dcunum", "2"),
                ("hygon.com/dcumem", "2000"),
                ("hygon.com/dcucores", "30"),
            ],
            "DCU-22222,DCU,2000,30:DCU-11111,DCU,2000,30:;",
        ),
    ];
    for (kv, want) in cases {
        let mut s = snapshot(&e, &[dcu_node()]);
        let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", kv));
        assert_eq!(out.devices.encode(), want, "{kv:?}");
        assert_eq!(a["hami.io/dcu-devices-to-allocate"], want);
        assert_eq!(a["hami.io/dcu-devices-allocated"], want);
    }
    // Type selector with Hygon's own keys.
    let mut s = snapshot(&e, &[dcu_node()]);
    let p = pod("p")
        .ann("hygon.com/use-dcutype", "Z100")
        .ctr(&[("hygon.com/dcunum", "1")])
        .build();
    let (_, out, _) = schedule(&e, &mut s, p);
    assert_eq!(out.reason("node-dcu"), "2/2 CardTypeMismatch");
}

// ---- Iluvatar

#[test]
fn iluvatar_units_and_webhook() {
    let e = all_vendors();
    let node = || {
        vendor_node(
            "node-ilu",
            &[(
                "hami.io/node-MR-V100-register",
                "GPU-ilu-0,10,32768,100,MR-V100,0,true:GPU-ilu-1,10,32768,100,MR-V100,0,true:",
            )],
            &[],
        )
    };
    let mut s = snapshot(&e, &[node()]);
    let (a, out, p) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("iluvatar.ai/MR-V100-vgpu", "1"),
                ("iluvatar.ai/MR-V100.vCore", "50"),
                ("iluvatar.ai/MR-V100.vMem", "64"),
            ],
        ),
    );
    let env = p.spec.as_ref().unwrap().containers[0].env.clone().unwrap();
    assert!(
        env.iter()
            .any(|v| v.name == "SOL_CONTINER_NAME" && v.value.as_deref() == Some("c0"))
    );
    assert_eq!(out.devices.encode(), "GPU-ilu-1,MR-V100,16384,50:;");
    assert_eq!(
        a["hami.io/MR-V100-devices-to-allocate"],
        "GPU-ilu-1,MR-V100,16384,50:;"
    );

    let mut s = snapshot(&e, &[node()]);
    let (_, out, p) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[("iluvatar.ai/MR-V100-vgpu", "2")]),
    );
    assert_eq!(
        limit(&p, 0, "iluvatar.ai/MR-V100.vCore").as_deref(),
        Some("200")
    );
    assert_eq!(
        out.devices.encode(),
        "GPU-ilu-1,MR-V100,32768,100:GPU-ilu-0,MR-V100,32768,100:;"
    );

    // The seeds' names are not the chart's: not managed.
    let p = gpu_pod(
        "p",
        &[
            ("iluvatar.ai/gpu", "1"),
            ("iluvatar.ai/vcuda-core", "50"),
            ("iluvatar.ai/vcuda-memory", "64"),
        ],
    );
    assert_eq!(e.prepare(&p).unwrap(), None);
}

// ---- Moore Threads

const MTH: &str = "mthreads.com/vgpu";
const MTH_MEM: &str = "mthreads.com/sgpu-memory";
const MTH_CORE: &str = "mthreads.com/sgpu-core";

fn mth_node() -> Node {
    vendor_node("node-mth", &[], &[(MTH_CORE, "32"), (MTH_MEM, "192")])
}

#[test]
fn mthreads_units_core_groups_and_annotations() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[mth_node()]);
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[(MTH, "1"), (MTH_MEM, "32"), (MTH_CORE, "8")]),
    );
    let entry = "node-mth-mthreads-1,Mthreads,16384,8:;";
    assert_eq!(out.devices.encode(), entry);
    assert_eq!(a["hami.io/mthreads-vgpu-devices-allocated"], entry);
    assert!(
        !a.keys()
            .any(|k| k.contains("mthreads-vgpu-devices-to-allocate"))
    );
    assert_eq!(a["mthreads.com/gpu-index"], "1");
    assert_eq!(a["mthreads.com/predicate-node"], "node-mth");
    assert_eq!(a["mthreads.com/predicate-time"], NOW_NS.to_string());

    let mut s = snapshot(&e, &[mth_node()]);
    let (_, out, p) = schedule(&e, &mut s, gpu_pod("p", &[(MTH, "1")]));
    assert_eq!(limit(&p, 0, MTH_MEM).as_deref(), Some("96"));
    assert_eq!(
        out.devices.encode(),
        "node-mth-mthreads-1,Mthreads,49152,16:;"
    );

    let mut s = snapshot(&e, &[mth_node()]);
    let (a, out, p) = schedule(&e, &mut s, gpu_pod("p", &[(MTH, "2")]));
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()["mthreads.com/request-gpu-num"],
        "2"
    );
    assert_eq!(
        out.devices.encode(),
        "node-mth-mthreads-1,Mthreads,49152,16:node-mth-mthreads-0,Mthreads,49152,16:;"
    );
    assert_eq!(a["mthreads.com/gpu-index"], "1,0");

    let m = denied(&e, gpu_pod("p", &[(MTH, "1"), (MTH_MEM, "3")]));
    assert!(m.contains("[2, 4, 8, 16, 32, 64, 96]"), "{m}");
}

#[test]
fn mthreads_keeps_a_pods_containers_on_one_card() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[mth_node()]);
    let kv = [(MTH, "1"), (MTH_MEM, "8"), (MTH_CORE, "4")];
    let (_, out, _) = schedule(&e, &mut s, pod("p").ctr(&kv).ctr(&kv).build());
    assert_eq!(
        out.devices.encode(),
        "node-mth-mthreads-1,Mthreads,4096,4:;node-mth-mthreads-1,Mthreads,4096,4:;"
    );
}

// ---- MetaX

#[test]
fn metax_whole_cards_one_container_per_pod() {
    let e = all_vendors();
    let node = || vendor_node("node-metax", &[], &[("metax-tech.com/gpu", "2")]);
    let mut s = snapshot(&e, &[node()]);
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[("metax-tech.com/gpu", "1")]));
    assert_eq!(
        out.devices.encode(),
        "node-metax-metax-1,Metax-GPU,65536,100:;"
    );
    assert_eq!(
        a["hami.io/metax-gpu-devices-to-allocate"],
        "node-metax-metax-1,Metax-GPU,65536,100:;"
    );

    let mut s = snapshot(&e, &[node()]);
    let kv = [("metax-tech.com/gpu", "1")];
    let (_, out, _) = schedule(&e, &mut s, pod("p").ctr(&kv).ctr(&kv).build());
    let why = out.reason("node-metax");
    assert!(why.contains("1/2 CardNotFoundCustomFilterRule"), "{why}");
    assert!(why.contains("1/2 CardTimeSlicingExhausted"), "{why}");
}

#[test]
fn metax_sgpu_gib_units_qos_and_annotations() {
    let e = all_vendors();
    let reg = r#"[{"uuid":"GPU-mx-0","totalDevCount":16,"totalCompute":100,"totalVRam":65536,"healthy":true,"qosPolicy":"best-effort","linkZone":1},{"uuid":"GPU-mx-1","totalDevCount":16,"totalCompute":100,"totalVRam":65536,"healthy":true,"linkZone":1}]"#;
    let node = || {
        vendor_node(
            "node-sgpu",
            &[("metax-tech.com/node-gpu-devices", reg)],
            &[],
        )
    };
    let mut s = snapshot(&e, &[node()]);
    let (a, out, p) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("metax-tech.com/sgpu", "1"),
                ("metax-tech.com/vcore", "60"),
                ("metax-tech.com/vmemory", "4"),
            ],
        ),
    );
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()["metax-tech.com/sgpu-qos-policy"],
        "best-effort"
    );
    assert_eq!(out.devices.encode(), "GPU-mx-1,Metax-SGPU,4096,60:;");
    assert_eq!(
        a["hami.io/metax-sgpu-devices-allocated"],
        "GPU-mx-1,Metax-SGPU,4096,60:;"
    );
    assert_eq!(
        a["metax-tech.com/gpu-devices-allocated"],
        r#"[[{"compute":60,"uuid":"GPU-mx-1","vRam":4096}]]"#
    );
    assert_eq!(a["metax-tech.com/predicate-time"], NOW_NS.to_string());

    let mut s = snapshot(&e, &[node()]);
    let (_, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("metax-tech.com/sgpu", "1"),
                ("metax-tech.com/vmemory", "2Gi"),
            ],
        ),
    );
    assert_eq!(out.devices.encode(), "GPU-mx-1,Metax-SGPU,2048,100:;");

    let m = denied(
        &e,
        pod("p")
            .ann("metax-tech.com/sgpu-qos-policy", "greedy")
            .ctr(&[("metax-tech.com/sgpu", "1")])
            .build(),
    );
    assert!(m.contains("greedy"), "{m}");
}

// ---- Enflame, Kunlunxin, AMD, Vastai, Biren

#[test]
fn enflame_gcu_whole_cards() {
    let e = all_vendors();
    let mut s = snapshot(
        &e,
        &[vendor_node("node-gcu", &[], &[("enflame.com/gcu", "2")])],
    );
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[("enflame.com/gcu", "1")]));
    assert_eq!(out.devices.encode(), "node-gcu-GCU-1,GCU,100,100:;");
    assert_eq!(
        a["hami.io/enflame-gcu-devices-allocated"],
        "node-gcu-GCU-1,GCU,100,100:;"
    );
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("q", &[("enflame.com/gcu", "2")]));
    assert_eq!(
        out.reason("node-gcu"),
        "1/2 ExclusiveDeviceAllocateConflict, 1/2 AllocatedCardsInsufficientRequest"
    );
}

#[test]
fn kunlunxin_takes_1_2_4_or_8_cards_by_board_half() {
    let e = all_vendors();
    let node = || vendor_node("node-xpu", &[], &[("kunlunxin.com/xpu", "8")]);
    for (n, want, idx) in [
        ("1", "node-xpu-kunlun-0,kunlun,98304,100:;", "0"),
        (
            "2",
            "node-xpu-kunlun-0,kunlun,98304,100:node-xpu-kunlun-1,kunlun,98304,100:;",
            "0,1",
        ),
    ] {
        let mut s = snapshot(&e, &[node()]);
        let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[("kunlunxin.com/xpu", n)]));
        assert_eq!(out.devices.encode(), want);
        assert_eq!(a["hami.io/kunlun-allocated"], want);
        assert_eq!(a["BAIDU_COM_DEVICE_IDX"], idx);
    }
    let mut s = snapshot(&e, &[node()]);
    let (a, _, _) = schedule(&e, &mut s, gpu_pod("p", &[("kunlunxin.com/xpu", "4")]));
    assert_eq!(a["BAIDU_COM_DEVICE_IDX"], "0,1,2,3");
    let mut fresh = snapshot(&e, &[node()]);
    let (_, out, _) = schedule(&e, &mut fresh, gpu_pod("q", &[("kunlunxin.com/xpu", "3")]));
    assert_eq!(out.reason("node-xpu"), "1/8 NumaNotFit");
    // Left half full: a single card goes to the right half.
    let (a, _, _) = schedule(&e, &mut s, gpu_pod("r", &[("kunlunxin.com/xpu", "1")]));
    assert_eq!(a["BAIDU_COM_DEVICE_IDX"], "4");
}

#[test]
fn kunlunxin_vxpu_slices() {
    let e = all_vendors();
    let reg = r#"[{"id":"xpu-0","index":0,"count":4,"devmem":98304,"devcore":100,"type":"XPU","health":true},{"id":"xpu-1","index":1,"count":4,"devmem":98304,"devcore":100,"type":"XPU","health":true}]"#;
    let mut s = snapshot(
        &e,
        &[vendor_node(
            "node-vxpu",
            &[("hami.io/node-register-xpu", reg)],
            &[],
        )],
    );
    let (a, out, p) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("kunlunxin.com/vxpu", "1"),
                ("kunlunxin.com/vxpu-memory", "20000"),
            ],
        ),
    );
    assert_eq!(
        limit(&p, 0, "kunlunxin.com/vxpu-memory").as_deref(),
        Some("24576")
    );
    assert_eq!(out.devices.encode(), "xpu-0,XPU,24576,25:;");
    assert_eq!(a["hami.io/xpu-devices-to-allocate"], "xpu-0,XPU,24576,25:;");
    // A card holds slices of one size: a half-card slice goes elsewhere.
    let (_, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "q",
            &[
                ("kunlunxin.com/vxpu", "1"),
                ("kunlunxin.com/vxpu-memory", "40000"),
            ],
        ),
    );
    assert_eq!(out.one(), "xpu-1");
}

#[test]
fn amd_cores_are_compute_units_and_entries_carry_the_model() {
    let e = all_vendors();
    let reg = r#"[{"id":"amd-uuid-0","index":0,"count":10,"devmem":196288,"devcore":304,"type":"AMD Instinct MI300X VF","health":true},{"id":"amd-uuid-1","index":1,"count":10,"devmem":196288,"devcore":304,"type":"AMD Instinct MI300X VF","health":true}]"#;
    let node = || {
        vendor_node(
            "node-amd",
            &[("hami.io/node-amd-register", reg)],
            &[("amd.com/gpu", "20")],
        )
    };
    let mut s = snapshot(&e, &[node()]);
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("amd.com/gpu", "1"),
                ("amd.com/gpumem", "4096"),
                ("amd.com/gpucores", "50"),
            ],
        ),
    );
    let entry = "amd-uuid-1,AMD Instinct MI300X VF,4096,152:;";
    assert_eq!(out.devices.encode(), entry);
    assert_eq!(a["hami.io/amd-devices-allocated"], entry);
    let n = s.node("node-amd").unwrap();
    assert_eq!(n.devices[1].used.cores, 152, "compute units held");

    let mut s = snapshot(&e, &[node()]);
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("p", &[("amd.com/gpu", "1")]));
    assert_eq!(
        out.devices.encode(),
        "amd-uuid-1,AMD Instinct MI300X VF,196288,304:;"
    );
    let m = denied(
        &e,
        gpu_pod("p", &[("amd.com/gpu", "1"), ("amd.com/gpucores", "150")]),
    );
    assert!(m.contains("1-100"), "{m}");
}

#[test]
fn vastai_and_biren_count_slots_only() {
    let e = all_vendors();
    for (key, res, word, id) in [
        (
            "hami.io/node-va-register",
            "vastaitech.com/va",
            "Vastai",
            "va-0",
        ),
        (
            "hami.io/node-biren-register",
            "birentech.com/gpu",
            "Biren",
            "7-0",
        ),
    ] {
        let reg = format!(
            r#"[{{"id":"{id}","count":1,"devmem":1024,"devcore":3,"type":"{word}","health":true}}]"#
        );
        let mut s = snapshot(&e, &[vendor_node("n", &[(key, &reg)], &[])]);
        let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[(res, "1")]));
        let entry = format!("{id},{word},0,0:;");
        assert_eq!(out.devices.encode(), entry);
        assert_eq!(a[&format!("hami.io/{word}-devices-to-allocate")], entry);
    }
}

// ---- a heterogeneous cluster

fn mixed_node() -> Node {
    let mut n = vendor_node(
        "mixed",
        &[(
            "hami.io/node-nvidia-register",
            &encode_devices_json(&[t4("GPU-t4")]),
        )],
        &[(VMLU_CORE, "100"), (VMLU_MEM, "64")],
    );
    n.metadata.name = Some("mixed".into());
    n
}

#[test]
fn one_node_two_vendors_each_pod_gets_its_own_vendors_cards() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[mixed_node(), dcu_node()]);
    let n = s.node("mixed").unwrap();
    assert_eq!(n.devices.len(), 2, "one T4 and one MLU");
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("nv", &[(GPU, "1"), (MEM, "1000")]));
    assert_eq!(out.devices.encode(), "GPU-t4,NVIDIA,1000,0:;");
    assert!(a.contains_key("hami.io/vgpu-devices-allocated"));
    assert!(!a.keys().any(|k| k.contains("cambricon")));
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("mlu", &[(VMLU, "1"), (VMLU_MEM, "4"), (VMLU_CORE, "50")]),
    );
    assert_eq!(out.devices.encode(), "mixed-cambricon-mlu-0,MLU,1024,50:;");
    assert!(!a.contains_key("hami.io/vgpu-devices-allocated"));
    assert_eq!(out.reason("node-dcu"), "NodeInsufficientDevice");
    // A container asking two vendors gets one card of each.
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "both",
            &[
                (GPU, "1"),
                (MEM, "1000"),
                (VMLU, "1"),
                (VMLU_MEM, "4"),
                (VMLU_CORE, "0"),
            ],
        ),
    );
    assert_eq!(
        out.devices.encode(),
        "GPU-t4,NVIDIA,1000,0:mixed-cambricon-mlu-0,MLU,1024,0:;"
    );
    assert_eq!(
        a["hami.io/vgpu-devices-allocated"],
        "GPU-t4,NVIDIA,1000,0:;"
    );
    assert_eq!(
        a["hami.io/cambricon-mlu-devices-allocated"],
        "mixed-cambricon-mlu-0,MLU,1024,0:;"
    );
    // The node score sums both vendors' cards.
    let t = s.node("mixed").unwrap().totals;
    assert_eq!((t.slots, t.used_slots), (110, 4));
}

#[test]
fn usage_is_rebuilt_from_every_vendors_allocated_key() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[mixed_node()]);
    let p = gpu_pod(
        "both",
        &[
            (GPU, "1"),
            (MEM, "1000"),
            (VMLU, "1"),
            (VMLU_MEM, "4"),
            (VMLU_CORE, "20"),
        ],
    );
    let (a, out, mut p) = schedule(&e, &mut s, p);
    p.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(a);
    p.spec.as_mut().unwrap().node_name = out.node.clone();
    let record = e.pod_record(&p).unwrap().expect("holds cards");
    assert_eq!(record.devices, out.devices);
    let mut fresh = snapshot(&e, &[mixed_node()]);
    fresh.add_pod("default/both", record);
    assert_eq!(
        used(&fresh, "mixed", "mixed-cambricon-mlu-0"),
        (1, 1024, 20)
    );
    assert_eq!(used(&fresh, "mixed", "GPU-t4"), (1, 1000, 0));
}

#[test]
fn a_broken_vendor_report_costs_that_vendor_only() {
    let e = all_vendors();
    let mut n = mixed_node();
    n.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("hami.io/node-dcu-register".into(), "garbage".into());
    let mut s = Snapshot::new();
    assert!(e.add_node(&mut s, &n).is_err());
    assert_eq!(
        s.node("mixed").unwrap().devices.len(),
        2,
        "NVIDIA and MLU stay"
    );
}

#[test]
fn the_webhook_strips_every_vendors_scheduler_written_annotations() {
    let e = all_vendors();
    let mut p = pod("p")
        .ann("hami.io/cambricon-mlu-devices-allocated", "x,MLU,1,1:;")
        .ann("CAMBRICON_DSMLU_PROFILE", "0_100_1")
        .ann("huawei.com/Ascend910B3", "[]")
        .ann("hami.io/kunlun-allocated", "y,kunlun,1,1:;")
        .ctr(&[(VMLU, "1")])
        .build();
    assert_eq!(e.admit(&mut p, SCHEDULER_NAME), Admission::Mutated);
    assert_eq!(p.metadata.annotations.as_ref().map(BTreeMap::len), Some(0));
    assert_eq!(
        p.spec.as_ref().unwrap().scheduler_name.as_deref(),
        Some(SCHEDULER_NAME)
    );
}

#[test]
fn fast_mode_agrees_on_a_mixed_cluster() {
    let e = all_vendors();
    let s = snapshot(&e, &[mixed_node(), dcu_node(), mlu_node(), b3_node(None)]);
    for p in [
        gpu_pod("a", &[(VMLU, "1"), (VMLU_MEM, "4")]),
        gpu_pod("b", &[("hygon.com/dcunum", "1")]),
        gpu_pod("c", &[(B3, "1"), (B3_MEM, "1")]),
        gpu_pod("d", &[(GPU, "1")]),
    ] {
        let req = request(&e, &p);
        let ex = e.filter(&s, &req, None, Mode::Explain);
        let fast = e.filter(&s, &req, None, Mode::Fast);
        assert!(ex.node.is_some());
        assert_eq!((ex.node, &ex.devices), (fast.node, &fast.devices));
    }
}

// ---- AWS Neuron

fn neuron_node(name: &str, instance: &str) -> Node {
    let mut n = vendor_node(
        name,
        &[],
        &[
            ("aws.amazon.com/neuron", "4"),
            ("aws.amazon.com/neuroncore", "8"),
        ],
    );
    n.metadata.labels = Some(BTreeMap::from([(
        "node.kubernetes.io/instance-type".to_string(),
        instance.to_string(),
    )]));
    n
}

#[test]
fn aws_neuron_devices_and_cores() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[neuron_node("node-neuron", "trn1.32xlarge")]);
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[("aws.amazon.com/neuron", "1")]));
    let entry = "node-neuron-AWSNeuron-3,AWSNeuron,0,3:;";
    assert_eq!(out.devices.encode(), entry);
    assert_eq!(a["hami.io/aws-neuron-devices-allocated"], entry);
    assert_eq!(a["AWS_NEURON_IDS"], "3");
    assert_eq!(a["NEURON_ALLOCATED"], "false");
    assert_eq!(a["NEURON_ALLOC_TIME"], NOW_NS.to_string());
    assert_eq!(a["aws.amazon.com/predicate-node"], "node-neuron");
    assert!(!a.contains_key("NEURON_RESOURCE_TYPE"));

    let mut s = snapshot(&e, &[neuron_node("node-neuron", "trn1.32xlarge")]);
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[("aws.amazon.com/neuroncore", "1")]),
    );
    assert_eq!(
        out.devices.encode(),
        "node-neuron-AWSNeuron-3,AWSNeuron,0,1:;"
    );
    assert_eq!(a["AWS_NEURON_IDS"], "6");
    assert_eq!(a["NEURON_RESOURCE_TYPE"], "aws.amazon.com/neuroncore");
    // The other core of that device is next, by its mask.
    let (a, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("q", &[("aws.amazon.com/neuroncore", "1")]),
    );
    assert_eq!(
        out.devices.encode(),
        "node-neuron-AWSNeuron-3,AWSNeuron,0,2:;"
    );
    assert_eq!(a["AWS_NEURON_IDS"], "7");
    // A whole device no longer fits there.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("r", &[("aws.amazon.com/neuron", "1")]));
    assert_eq!(out.one(), "node-neuron-AWSNeuron-2");

    // Trainium takes runs of 4, 8 or 16 devices only.
    let mut s = snapshot(&e, &[neuron_node("node-neuron", "trn1.32xlarge")]);
    let (_, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod("p", &[("aws.amazon.com/neuroncore", "4")]),
    );
    assert_eq!(out.reason("node-neuron"), "1/4 NumaNotFit");
    // Inferentia takes any run of free devices.
    let mut s = snapshot(&e, &[neuron_node("node-inf", "inf2.48xlarge")]);
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[("aws.amazon.com/neuron", "2")]));
    assert_eq!(
        out.devices.encode(),
        "node-inf-AWSNeuron-0,AWSNeuron,0,3:node-inf-AWSNeuron-1,AWSNeuron,0,3:;"
    );
    assert_eq!(a["AWS_NEURON_IDS"], "0,1");

    let m = denied(&e, gpu_pod("p", &[("aws.amazon.com/neuroncore", "3")]));
    assert!(m.contains("even"), "{m}");
}

#[test]
fn binds_take_the_node_lock_only_for_vendors_whose_plugin_releases_it() {
    let e = all_vendors();
    let lock = |entry: &str| e.needs_node_lock(&hami_api::PodDevices::decode("t", entry).unwrap());
    assert!(lock("GPU-a,NVIDIA,1000,0:;"));
    assert!(lock("a,Ascend910B3,16384,0:;"));
    assert!(lock("DCU-a,DCU,1000,10:;"));
    assert!(lock("x,AMD Instinct MI300X VF,1,1:;"));
    assert!(
        !lock("n-cambricon-mlu-0,MLU,1024,10:;"),
        "Cambricon's lock is its own"
    );
    assert!(!lock("n-mthreads-0,Mthreads,1024,1:;"));
    assert!(!lock("n-kunlun-0,kunlun,98304,100:;"));
    assert!(!lock("n-AWSNeuron-0,AWSNeuron,0,3:;"));
    assert!(
        lock(";n-cambricon-mlu-0,MLU,1024,10:;GPU-a,NVIDIA,1000,0:;"),
        "any vendor that uses it"
    );
}

// ---- vendor node scores and topology

fn npus_with_network(word: &str, ids: &[i64]) -> String {
    let cards: Vec<DeviceInfo> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| DeviceInfo {
            id: format!("{}-npu-{i}", word.to_lowercase()),
            index: i as u32,
            count: 4,
            devmem: 65536,
            devcore: 20,
            device_type: word.into(),
            health: true,
            custom_info: Some(Box::new(serde_json::json!({ "NetworkID": id }))),
            ..Default::default()
        })
        .collect();
    encode_devices_json(&cards)
}

#[test]
fn ascend_910_npus_of_one_network_group_go_together() {
    let e = all_vendors();
    let reg = npus_with_network("Ascend910B3", &[0, 0, 0, 0, 1, 1, 1, 1]);
    let node = vendor_node(
        "node-b3x8",
        &[("hami.io/node-register-Ascend910B3", &reg)],
        &[],
    );
    let mut s = snapshot(&e, std::slice::from_ref(&node));
    let (a, out, _) = schedule(&e, &mut s, gpu_pod("p", &[(B3, "2")]));
    assert_eq!(
        out.devices.encode(),
        "ascend910b3-npu-7,Ascend910B3,65536,0:ascend910b3-npu-6,Ascend910B3,65536,0:;"
    );
    assert_eq!(
        a[B3],
        r#"[{"UUID":"ascend910b3-npu-7","memory":65536},{"UUID":"ascend910b3-npu-6","memory":65536}]"#
    );
    // Group 1 has two NPUs left, group 0 four: a pair comes from group 0.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("q", &[(B3, "2")]));
    assert_eq!(out.uuids(), [["ascend910b3-npu-3", "ascend910b3-npu-2"]]);
    // Two groups of two: the first fills, the rest comes from the next.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("r", &[(B3, "3")]));
    assert_eq!(
        out.uuids(),
        [[
            "ascend910b3-npu-5",
            "ascend910b3-npu-4",
            "ascend910b3-npu-1"
        ]]
    );
}

#[test]
fn ascend_network_score_prefers_the_node_that_keeps_a_pair_together() {
    let e = all_vendors();
    let split = npus_with_network("Ascend910B3", &[0, 1]);
    let together = npus_with_network("Ascend910B3", &[0, 0]);
    let key = "hami.io/node-register-Ascend910B3";
    // Equal nodes but for their groups; without the score the first wins.
    let s = snapshot(
        &e,
        &[
            vendor_node("split", &[(key, &split)], &[]),
            vendor_node("together", &[(key, &together)], &[]),
        ],
    );
    let out = decide(&e, &s, &gpu_pod("p", &[(B3, "2")]));
    assert_eq!(out.node.as_deref(), Some("together"));
    let out = decide(&e, &s, &gpu_pod("p", &[(B3, "1")]));
    assert_eq!(
        out.node.as_deref(),
        Some("split"),
        "one NPU scores the same"
    );
}

#[test]
fn kunlunxin_and_metax_node_scores() {
    let e = all_vendors();
    let kunlun = (0..e.vendor_count())
        .find(|&i| e.vendor(i).word() == "kunlun")
        .unwrap();
    let metax = (0..e.vendor_count())
        .find(|&i| e.vendor(i).word() == "Metax-GPU")
        .unwrap();
    let mut s = snapshot(
        &e,
        &[vendor_node("xpu", &[], &[("kunlunxin.com/xpu", "8")])],
    );
    let n = s.node("xpu").unwrap().clone();
    let bin = hami_api::policy::NodePolicy::Binpack;
    // A fresh board: one card opens a half (+2 bubbles) scores 0.
    assert_eq!(e.vendor(kunlun).node_score(&n, &[vec![0]], bin), 0.0);
    hold(
        &mut s,
        "default/busy",
        "xpu",
        "xpu-kunlun-1,kunlun,98304,100:xpu-kunlun-2,kunlun,98304,100:xpu-kunlun-3,kunlun,98304,100:;",
    );
    let n = s.node("xpu").unwrap().clone();
    // Closing the left half removes a bubble; opening the right adds one.
    assert_eq!(e.vendor(kunlun).node_score(&n, &[vec![0]], bin), 3000.0);
    assert_eq!(e.vendor(kunlun).node_score(&n, &[vec![4]], bin), 1000.0);

    let mx = vendor_node(
        "mx",
        &[
            ("metax-tech.com/gpu.topology.losses", r#"{"1":0,"2":300}"#),
            ("metax-tech.com/gpu.topology.scores", r#"{"1":10,"2":50}"#),
        ],
        &[("metax-tech.com/gpu", "2")],
    );
    let s = snapshot(&e, &[mx]);
    let n = s.node("mx").unwrap();
    let spread = hami_api::policy::NodePolicy::Spread;
    assert_eq!(e.vendor(metax).node_score(n, &[vec![0, 1]], bin), 1700.0);
    assert_eq!(e.vendor(metax).node_score(n, &[vec![0, 1]], spread), 1950.0);
    assert_eq!(e.vendor(metax).node_score(n, &[vec![0]], bin), 2000.0);
}

// ---- Enflame DRS

fn drs_node() -> Node {
    vendor_node(
        "node-drs",
        &[(
            "enflame.com/gcu-drs-capacity",
            r#"{"devices":[{"index":"0","minor":"0","capacity":6},{"index":"1","minor":"1","capacity":6}],"profiles":{"1g.6gb":"0","3g.20gb":"1","6g.40gb":"2"}}"#,
        )],
        &[],
    )
}

#[test]
fn enflame_drs_profiles_by_slices_or_by_size() {
    let e = all_vendors();
    let mut s = snapshot(&e, &[drs_node()]);
    let (a, out, p) = schedule(&e, &mut s, gpu_pod("p", &[("enflame.com/drs-gcu", "3")]));
    let req = p.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap();
    assert_eq!(
        req.requests.as_ref().unwrap()["enflame.com/drs-gcu"].0,
        "3",
        "copied to requests"
    );
    let entry = "node-drs-enflame-drs-1,Enflame,20480,50:;";
    assert_eq!(out.devices.encode(), entry);
    assert_eq!(a["hami.io/enflame-vgpu-devices-allocated"], entry);
    assert!(
        !a.keys()
            .any(|k| k.contains("enflame-vgpu-devices-to-allocate"))
    );
    assert_eq!(
        a["assigned-containers"],
        r#"{"c0":{"allocated":false,"profileID":"1","profileName":"3g.20gb","request":3}}"#
    );
    assert_eq!(a["enflame.com/gcu-assigned"], "false");
    assert_eq!(a["enflame.com/gcu-assigned-index"], "1");
    assert_eq!(a["enflame.com/gcu-assigned-id"], "1");
    assert_eq!(a["enflame.com/gcu-assigned-minor"], "1");
    assert_eq!(a["enflame.com/gcu-request-size"], "3");
    assert_eq!(a["enflame.com/gcu-assigned-time"], NOW_NS.to_string());

    // By size: 20480 is MiB (above twice the largest profile's 40 GiB).
    let mut s = snapshot(&e, &[drs_node()]);
    let (_, out, _) = schedule(
        &e,
        &mut s,
        gpu_pod(
            "p",
            &[
                ("enflame.com/gcu-memory", "20480"),
                ("enflame.com/gcu-core", "40"),
            ],
        ),
    );
    assert_eq!(out.devices.encode(), entry);
    // 6 is GiB: the smallest profile.
    let mut fresh = snapshot(&e, &[drs_node()]);
    let (a, out, _) = schedule(
        &e,
        &mut fresh,
        gpu_pod("q", &[("enflame.com/gcu-memory", "6")]),
    );
    assert_eq!(
        out.devices.encode(),
        "node-drs-enflame-drs-1,Enflame,6144,17:;"
    );
    assert!(a["assigned-containers"].contains(r#""profileName":"1g.6gb""#));
    // No profile of 4 slices: the node cannot take it.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("r", &[("enflame.com/drs-gcu", "4")]));
    assert_eq!(out.reason("node-drs"), "1/2 ModeNotFit");
    // A whole card (6 slices, 100 %) fits only the card still empty.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("w", &[("enflame.com/drs-gcu", "6")]));
    assert_eq!(out.one(), "node-drs-enflame-drs-0");
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("v", &[("enflame.com/drs-gcu", "6")]));
    assert_eq!(out.node, None);
    let m = denied(&e, gpu_pod("x", &[("enflame.com/gcu-core", "150")]));
    assert!(m.contains("1-100"), "{m}");
}

#[test]
fn metax_sgpu_shared_cards_keep_one_qos_policy() {
    let e = all_vendors();
    let reg = r#"[{"uuid":"GPU-mx-0","totalDevCount":16,"totalCompute":100,"totalVRam":65536,"healthy":true,"qosPolicy":"fixed-share"}]"#;
    let mut s = snapshot(
        &e,
        &[vendor_node(
            "sg",
            &[("metax-tech.com/node-gpu-devices", reg)],
            &[],
        )],
    );
    let shared = [
        ("metax-tech.com/sgpu", "1"),
        ("metax-tech.com/vcore", "20"),
        ("metax-tech.com/vmemory", "4"),
    ];
    // An empty card takes any policy.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("a", &shared));
    assert_eq!(out.node.as_deref(), Some("sg"));
    // In use under fixed-share: best-effort (the default) waits, fixed-share fits.
    let (_, out, _) = schedule(&e, &mut s, gpu_pod("b", &shared));
    assert_eq!(out.reason("sg"), "1/1 CardQosPolicyMismatch");
    let p = pod("c")
        .ann("metax-tech.com/sgpu-qos-policy", "fixed-share")
        .ctr(&shared)
        .build();
    let (_, out, _) = schedule(&e, &mut s, p);
    assert_eq!(out.node.as_deref(), Some("sg"));
}
