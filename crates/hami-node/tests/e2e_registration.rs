//! Node registration against a real API server (hami-e2e's control
//! plane, no hami-scheduler) with the cards of sim-gpu's NVML: the
//! register annotation decodes back to the same cards, a `Requesting_`
//! handshake is answered with `Reported <time>`, a rescan with nothing
//! changed writes nothing, a card turning unhealthy is written again (and
//! sent to the device plugin's channel), and a clean shutdown removes both
//! annotations. Once in process (the loop, with the health of a card
//! injected into its discovery input), once through the `hami-node` binary
//! (`--sim-devices`, SIGTERM).
//!
//! Skips when the control-plane binaries are missing, unless
//! HAMI_E2E_REQUIRE=1.

mod sim;

use std::collections::BTreeMap;
use std::future::Future;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use hami_api::device::decode_devices;
use hami_api::node::Handshake;
use hami_api::topology::{decode_pair_scores, pair_score};
use hami_e2e::TestNs;
use hami_node::discovery::{CardSettings, Discovery, Scan};
use hami_node::registration::{Progress, Registration};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sim::{CARDS, NUMA};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A plain Node object (no kwok, no kubelet): only annotations matter.
async fn plain_node(ns: &TestNs, suffix: &str) -> String {
    let name = ns.node_name(suffix);
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"hami-e2e/test": ns.name}},
    }))
    .unwrap();
    Api::<Node>::all(ns.client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("creating node {name}: {e}"));
    name
}

async fn delete_node(ns: &TestNs, name: &str) {
    let _ = Api::<Node>::all(ns.client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

async fn get_node(ns: &TestNs, name: &str) -> Node {
    Api::<Node>::all(ns.client.clone()).get(name).await.unwrap()
}

fn annotations(n: &Node) -> BTreeMap<String, String> {
    n.metadata.annotations.clone().unwrap_or_default()
}

async fn request_handshake(ns: &TestNs, node: &str) {
    let value = Handshake::Requesting(jiff::Timestamp::now()).encode();
    set_handshake(ns, node, &value).await;
}

async fn set_handshake(ns: &TestNs, node: &str, value: &str) {
    Api::<Node>::all(ns.client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ann::NODE_HANDSHAKE: value}}})),
        )
        .await
        .unwrap();
}

/// `Reported <YYYY-MM-DD HH:MM:SS>` with a time within a minute of now.
fn assert_reported(value: &str) {
    let t = value
        .strip_prefix("Reported ")
        .unwrap_or_else(|| panic!("handshake {value:?} is not Reported"));
    let t = jiff::civil::DateTime::strptime("%Y-%m-%d %H:%M:%S", t)
        .unwrap_or_else(|e| panic!("handshake {value:?}: {e}"))
        .to_zoned(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp();
    let off = jiff::Timestamp::now().duration_since(t).abs();
    assert!(off < jiff::SignedDuration::from_secs(60), "{value:?}");
    assert!(matches!(
        Handshake::decode(ann::NODE_HANDSHAKE, value),
        Ok(Handshake::Reported(_))
    ));
}

/// The register annotation of the device file's cards, decoded.
fn assert_sim_cards(cards: &[DeviceInfo], unhealthy: Option<usize>) {
    let got: Vec<(&str, u32, u64, &str, i32, bool)> = cards
        .iter()
        .map(|c| {
            (
                c.id.as_str(),
                c.index,
                c.devmem,
                c.device_type.as_str(),
                c.numa,
                c.health,
            )
        })
        .collect();
    let types = [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-40GB",
        "NVIDIA L4",
        "NVIDIA-Tesla T4",
    ];
    let want: Vec<(&str, u32, u64, &str, i32, bool)> = CARDS
        .iter()
        .enumerate()
        .map(|(i, (mem, uuid, _))| {
            (
                *uuid,
                i as u32,
                *mem,
                types[i],
                NUMA[i],
                unhealthy != Some(i),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert!(cards.iter().all(|c| c.count == 10 && c.devcore == 100));
}

fn register_of(n: &Node) -> Vec<DeviceInfo> {
    let a = annotations(n);
    let v = a
        .get(ann::NODE_NVIDIA_REGISTER)
        .unwrap_or_else(|| panic!("no {} in {a:?}", ann::NODE_NVIDIA_REGISTER));
    decode_devices(ann::NODE_NVIDIA_REGISTER, v).unwrap()
}

/// Discovery with some cards' health forced off: how the test turns a
/// card unhealthy (sim-gpu reads its device file once per process).
struct Injected {
    inner: Discovery,
    unhealthy: Arc<Mutex<Vec<String>>>,
}

impl Scan for Injected {
    fn scan(&mut self) -> anyhow::Result<Vec<DeviceInfo>> {
        let mut cards = self.inner.scan()?;
        let bad = self.unhealthy.lock().unwrap();
        for c in &mut cards {
            if bad.contains(&c.id) {
                c.health = false;
            }
        }
        Ok(cards)
    }

    fn pair_scores(&mut self) -> Option<Vec<hami_api::topology::DevicePairScore>> {
        self.inner.pair_scores()
    }
}

async fn progress_reaches(
    rx: &mut watch::Receiver<Progress>,
    what: &str,
    f: impl FnMut(&Progress) -> bool,
) -> Progress {
    within(what, rx.wait_for(f)).await.unwrap().clone()
}

#[test]
fn registration_loop_registers_answers_rescans_and_removes() {
    if sim::in_child("registration_loop_registers_answers_rescans_and_removes") {
        return;
    }
    let Some(cluster) = hami_e2e::control_plane() else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let ns = cluster.namespace("node-reg").await;
            let node = plain_node(&ns, "reg").await;
            let unhealthy = Arc::new(Mutex::new(Vec::new()));
            let scan = Injected {
                inner: Discovery::open(sim::lib().as_os_str(), CardSettings::default())
                    .unwrap()
                    .with_topology_score(true),
                unhealthy: unhealthy.clone(),
            };
            let (cards_tx, mut cards_rx) = watch::channel(Vec::new());
            let reg = Registration::new(ns.client.clone(), &node, cards_tx)
                .with_period(Duration::from_millis(300));
            let mut progress = reg.progress();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(reg.run(Box::new(scan), async {
                let _ = stop_rx.await;
            }));

            // Registered: the same cards, and Reported in the handshake.
            progress_reaches(&mut progress, "the first register patch", |p| {
                p.register_patches >= 1
            })
            .await;
            let n = get_node(&ns, &node).await;
            assert_sim_cards(&register_of(&n), None);
            assert_reported(&annotations(&n)[ann::NODE_HANDSHAKE]);
            assert_sim_cards(&cards_rx.borrow_and_update(), None);

            // The scheduler's handshake is answered.
            request_handshake(&ns, &node).await;
            progress_reaches(&mut progress, "the handshake answer", |p| p.handshakes >= 1).await;
            let n = get_node(&ns, &node).await;
            assert_reported(&annotations(&n)[ann::NODE_HANDSHAKE]);
            // A scheduler that gave the node up (`Deleted_`) is answered too.
            set_handshake(&ns, &node, "Deleted_2024-05-06 07:08:09").await;
            progress_reaches(&mut progress, "the answer to Deleted_", |p| {
                p.handshakes >= 2
            })
            .await;
            let n = get_node(&ns, &node).await;
            assert_reported(&annotations(&n)[ann::NODE_HANDSHAKE]);

            // Rescans with nothing changed write nothing.
            let before = progress.borrow().clone();
            let rv = n.metadata.resource_version.clone();
            let after = progress_reaches(&mut progress, "two more rescans", |p| {
                p.scans >= before.scans + 2
            })
            .await;
            assert_eq!(after.register_patches, before.register_patches);
            let n = get_node(&ns, &node).await;
            assert_eq!(n.metadata.resource_version, rv, "a rescan patched the node");

            // A card turns unhealthy: written again, and sent to the plugin.
            unhealthy.lock().unwrap().push(CARDS[2].1.to_string());
            progress_reaches(
                &mut progress,
                "the register patch of the health change",
                |p| p.register_patches > before.register_patches,
            )
            .await;
            assert_sim_cards(&register_of(&get_node(&ns, &node).await), Some(2));
            within(
                "the plugin's card list",
                cards_rx.wait_for(|c| c.len() == 4 && !c[2].health),
            )
            .await
            .unwrap();

            // The link scores, from sim-gpu's topology (cards 0 and 1 share
            // a PCIe switch, so do 2 and 3; the pairs are on two CPUs).
            let scores = hami_e2e::wait_for(WAIT, "the pair scores", || async {
                annotations(&get_node(&ns, &node).await)
                    .get(ann::NODE_NVIDIA_SCORE)
                    .cloned()
            })
            .await;
            let scores = decode_pair_scores(ann::NODE_NVIDIA_SCORE, &scores).unwrap();
            assert_eq!(scores.len(), CARDS.len(), "{scores:?}");
            for (i, (_, a, _)) in CARDS.iter().enumerate() {
                for (j, (_, b, _)) in CARDS.iter().enumerate().filter(|(j, _)| *j != i) {
                    let want = if i / 2 == j / 2 { 50 } else { 10 };
                    assert_eq!(pair_score(&scores, a, b), want, "{a} - {b}: {scores:?}");
                }
            }

            // Someone removes the annotations: they are written again.
            let before = progress.borrow().clone();
            Api::<Node>::all(ns.client.clone())
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {
                        ann::NODE_NVIDIA_REGISTER: null, ann::NODE_HANDSHAKE: null,
                        ann::NODE_NVIDIA_SCORE: null,
                    }}})),
                )
                .await
                .unwrap();
            progress_reaches(
                &mut progress,
                "the register annotation written again",
                |p| p.register_patches > before.register_patches,
            )
            .await;
            let n = hami_e2e::wait_for(WAIT, "Reported and scored again", || async {
                let n = get_node(&ns, &node).await;
                let a = annotations(&n);
                (a.contains_key(ann::NODE_HANDSHAKE) && a.contains_key(ann::NODE_NVIDIA_SCORE))
                    .then_some(n)
            })
            .await;
            assert_sim_cards(&register_of(&n), Some(2));
            assert_reported(&annotations(&n)[ann::NODE_HANDSHAKE]);

            // A clean shutdown removes both annotations.
            stop_tx.send(()).unwrap();
            within("the loop to stop", task).await.unwrap();
            let a = annotations(&get_node(&ns, &node).await);
            assert!(!a.contains_key(ann::NODE_NVIDIA_REGISTER), "{a:?}");
            assert!(!a.contains_key(ann::NODE_HANDSHAKE), "{a:?}");
            assert!(!a.contains_key(ann::NODE_NVIDIA_SCORE), "{a:?}");
            delete_node(&ns, &node).await;
        });
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with `--sim-devices`, sim-gpu's library found next to it:
/// registers, answers the handshake, and removes its annotations on
/// SIGTERM, exiting 0.
#[tokio::test(flavor = "multi_thread")]
async fn hami_node_binary_registers_with_sim_and_cleans_up_on_sigterm() {
    let Some(cluster) = hami_e2e::control_plane() else {
        return;
    };
    let ns = cluster.namespace("node-bin").await;
    let node = plain_node(&ns, "bin").await;
    let dir = tempfile::tempdir().unwrap();
    // hami-node and sim-gpu's library side by side, as `--sim` looks.
    let exe = dir.path().join("hami-node");
    std::fs::copy(env!("CARGO_BIN_EXE_hami-node"), &exe).unwrap();
    std::fs::copy(sim::sim_lib(), dir.path().join("libsim_gpu.so")).unwrap();
    let devices = sim::write_device_file(dir.path());
    let plugins = dir.path().join("device-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let log = std::fs::File::create(dir.path().join("hami-node.log")).unwrap();
    let child = Child(
        Command::new(&exe)
            .arg("--node-name")
            .arg(&node)
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .arg("--sim-devices")
            .arg(&devices)
            .arg("--device-plugin-path")
            .arg(&plugins)
            .args(["--rescan-period", "1s"])
            .arg("--monitor-address=127.0.0.1:0")
            .env_remove("HAMI_NVML_LIB")
            .env_remove("LD_LIBRARY_PATH")
            .env("SIM_GPU_STATE_DIR", dir.path().join("sim-gpu"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let logs = || std::fs::read_to_string(dir.path().join("hami-node.log")).unwrap_or_default();
    let mut child = child;

    let n = hami_e2e::wait_for(WAIT, "the register annotation", || {
        if let Some(s) = child.0.try_wait().unwrap() {
            panic!("hami-node exited ({s}):\n{}", logs());
        }
        async {
            let n = get_node(&ns, &node).await;
            annotations(&n)
                .contains_key(ann::NODE_NVIDIA_REGISTER)
                .then_some(n)
        }
    })
    .await;
    assert_sim_cards(&register_of(&n), None);

    request_handshake(&ns, &node).await;
    let value = hami_e2e::wait_for(WAIT, "Reported", || async {
        let a = annotations(&get_node(&ns, &node).await);
        a.get(ann::NODE_HANDSHAKE)
            .filter(|v| v.starts_with("Reported"))
            .cloned()
    })
    .await;
    assert_reported(&value);

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = hami_e2e::wait_for(WAIT, "hami-node to exit", || {
        let s = child.0.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{status:?}\n{}", logs());
    let a = annotations(&get_node(&ns, &node).await);
    assert!(
        !a.contains_key(ann::NODE_NVIDIA_REGISTER) && !a.contains_key(ann::NODE_HANDSHAKE),
        "{a:?}\n{}",
        logs()
    );
    delete_node(&ns, &node).await;
}
