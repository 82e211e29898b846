//! Property: on random clusters of NVIDIA, Ascend, Cambricon and Hygon
//! nodes (some with two vendors), random pods of random vendors are placed
//! only on their own vendor's cards, Explain and Fast agree, and no card
//! ever holds more than it has.

mod common;

use std::collections::BTreeMap;

use common::*;
use hami_api::device::encode_devices_json;
use hami_api::{DeviceConfig, DeviceInfo};
use hami_sched::{Engine, Mode, Policies};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;

/// Which vendors a node has.
#[derive(Debug, Clone, Copy)]
struct NodeSpec {
    nvidia: u32,
    ascend: u32,
    mlu_cards: u32,
    dcu: u32,
}

fn k8s_node(i: usize, n: &NodeSpec) -> Node {
    let name = format!("n{i}");
    let mut a = BTreeMap::new();
    let mut cap = BTreeMap::new();
    if n.nvidia > 0 {
        let cards: Vec<DeviceInfo> = (0..n.nvidia)
            .map(|c| t4(&format!("GPU-{name}-{c}")))
            .collect();
        a.insert(
            "hami.io/node-nvidia-register".to_string(),
            encode_devices_json(&cards),
        );
    }
    if n.ascend > 0 {
        let cards: Vec<DeviceInfo> = (0..n.ascend)
            .map(|c| DeviceInfo {
                id: format!("{name}-npu-{c}"),
                index: c,
                count: 4,
                devmem: 65536,
                devcore: 20,
                device_type: "Ascend910B3".into(),
                health: true,
                ..Default::default()
            })
            .collect();
        a.insert(
            "hami.io/node-register-Ascend910B3".to_string(),
            encode_devices_json(&cards),
        );
    }
    if n.mlu_cards > 0 {
        let q = |v: u32| Quantity(v.to_string());
        cap.insert(
            "cambricon.com/mlu.smlu.vcore".to_string(),
            q(100 * n.mlu_cards),
        );
        cap.insert(
            "cambricon.com/mlu.smlu.vmemory".to_string(),
            q(64 * n.mlu_cards),
        );
    }
    if n.dcu > 0 {
        let v: String = (0..n.dcu)
            .map(|c| format!("DCU-{name}-{c},4,16000,100,DCU-Z100,0,true,{c},hami-core:"))
            .collect();
        a.insert("hami.io/node-dcu-register".to_string(), v);
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name),
            annotations: Some(a),
            ..Default::default()
        },
        status: Some(NodeStatus {
            capacity: Some(cap),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (0..3u32, 0..3u32, 0..3u32, 0..3u32)
        .prop_filter("a node with some card", |(a, b, c, d)| a + b + c + d > 0)
        .prop_map(|(nvidia, ascend, mlu_cards, dcu)| NodeSpec {
            nvidia,
            ascend,
            mlu_cards,
            dcu,
        })
}

/// A pod: (vendor 0-3, cards, size 1-4).
fn pod_spec() -> impl Strategy<Value = (u8, u8, u8)> {
    (0..4u8, 1..3u8, 1..5u8)
}

fn resources(vendor: u8, cards: u8, size: u8) -> Vec<(&'static str, String)> {
    let n = cards.to_string();
    match vendor {
        0 => vec![
            (GPU, n),
            (MEM, (size as u32 * 2000).to_string()),
            (CORES, (size as u32 * 10).to_string()),
        ],
        1 if cards == 1 => vec![
            ("huawei.com/Ascend910B3", n),
            (
                "huawei.com/Ascend910B3-memory",
                (size as u32 * 9000).to_string(),
            ),
        ],
        1 => vec![("huawei.com/Ascend910B3", n)],
        2 => vec![
            ("cambricon.com/vmlu", n),
            ("cambricon.com/mlu.smlu.vmemory", (size * 8).to_string()),
            ("cambricon.com/mlu.smlu.vcore", (size * 15).to_string()),
        ],
        _ => vec![
            ("hygon.com/dcunum", n),
            ("hygon.com/dcumem", (size as u32 * 3000).to_string()),
            ("hygon.com/dcucores", (size as u32 * 20).to_string()),
        ],
    }
}

/// The vendor word a pod of `vendor` must get.
fn word(vendor: u8) -> &'static str {
    ["NVIDIA", "Ascend910B3", "MLU", "DCU"][vendor as usize]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pods_get_only_their_vendors_cards_and_cards_never_overflow(
        nodes in prop::collection::vec(node_spec(), 1..5),
        pods in prop::collection::vec(pod_spec(), 1..25),
    ) {
        let e = Engine::from_config(&DeviceConfig::default(), Policies::default());
        let k8s: Vec<Node> = nodes.iter().enumerate().map(|(i, n)| k8s_node(i, n)).collect();
        let mut s = snapshot(&e, &k8s);
        for (i, &(vendor, cards, size)) in pods.iter().enumerate() {
            let kv = resources(vendor, cards, size);
            let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut p = gpu_pod(&format!("p{i}"), &kv);
            e.admit(&mut p, hami_api::annotations::SCHEDULER_NAME);
            let req = request(&e, &p);
            let explain = e.filter(&s, &req, None, Mode::Explain);
            let fast = e.filter(&s, &req, None, Mode::Fast);
            prop_assert_eq!((explain.node, &explain.devices), (fast.node, &fast.devices));
            let Some(node) = explain.node.map(str::to_string) else { continue };
            let state = s.node(&node).unwrap();
            let mut given = 0;
            for d in explain.devices.devices() {
                // The card's registered type, not the engine's bookkeeping.
                let card = state.devices.iter().find(|c| c.info.id == d.uuid).unwrap();
                prop_assert!(
                    card.info.device_type.contains(word(vendor)),
                    "{} ({}) is not a {} card", d.uuid, card.info.device_type, word(vendor)
                );
                prop_assert_eq!(&d.vendor, word(vendor));
                given += 1;
            }
            prop_assert_eq!(given, req.total_cards());
            let devices = explain.devices.clone();
            e.reserve(&mut s, &req, &node, devices);
            for n in s.nodes() {
                for c in &n.devices {
                    prop_assert!(c.used.slots <= c.info.count, "{:?}", c);
                    prop_assert!(c.used.mem <= c.info.devmem, "{:?}", c);
                    prop_assert!(c.used.cores <= c.info.devcore, "{:?}", c);
                }
            }
        }
    }
}
