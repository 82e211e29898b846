//! Node registration (spec section 2): the node's cards in
//! `hami.io/node-nvidia-register` (JSON form), the answer to the
//! scheduler's handshake in `hami.io/node-handshake`, a rescan every
//! period that patches only on change, and the annotations removed on a
//! clean shutdown so the scheduler drops the node at once. With topology
//! scoring on, the cards' link scores go into `hami.io/node-nvidia-score`
//! the same way (written on change, again when removed, removed at the end).
//!
//! * Every register patch also writes `Reported <now>` into the
//!   handshake, as HAMi's plugin did before its register rework.
//! * The node is watched: when the handshake says `Requesting_<t>` (or
//!   anything but `Reported ...`: `Deleted_`, a bad value, none) the loop
//!   answers `Reported <now>` at once; when the register annotation is missing or differs
//!   from what was written (someone removed it), it is written again.
//! * Each rescan sends the cards to the device plugin's watch channel
//!   when they changed, so ListAndWatch tells the kubelet.

use std::collections::BTreeMap;
use std::time::Duration;

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use hami_api::device::encode_devices_json;
use hami_api::node::{AllocationMode, Handshake};
use hami_api::topology::encode_pair_scores;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use crate::discovery::Scan;

/// HAMi's default rescan period.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(30);

/// `Reported <YYYY-MM-DD HH:MM:SS>` (UTC), the layout of the scheduler's
/// `Requesting_` time (Go's `time.DateTime`). Schedulers only look for
/// `Requesting` in the value (HAMi's `CheckHealth`, `hami_kube::handshake`):
/// HAMi's plugin wrote `Reported <Go time.String()>` until its register
/// rework (HAMi PR 1499) and writes no handshake since.
pub fn reported(now: Timestamp) -> String {
    format!(
        "Reported {}",
        now.to_zoned(TimeZone::UTC).strftime("%Y-%m-%d %H:%M:%S")
    )
}

/// What the loop has done so far, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Scans done (the first at start included).
    pub scans: u64,
    /// Patches of the register annotation.
    pub register_patches: u64,
    /// Handshakes answered (`Requesting_`, `Deleted_`, a bad value or none).
    pub handshakes: u64,
}

/// The registration loop of one node.
pub struct Registration {
    nodes: Api<Node>,
    node: String,
    period: Duration,
    cards: watch::Sender<Vec<DeviceInfo>>,
    progress: watch::Sender<Progress>,
    /// The register value last written, if the write succeeded.
    written: Option<String>,
    /// The pair-score value last written (topology scoring on).
    written_scores: Option<String>,
    /// The node's resourceVersion after our last patch: older events
    /// are not looked at.
    patched_rv: Option<u64>,
    /// Announced in `hami.io/node-allocation-mode` with the register
    /// annotation (none for HAMi's lock).
    allocation_mode: AllocationMode,
    /// The node's lock annotation as the watch last showed it.
    node_lock: watch::Sender<Option<String>>,
}

impl Registration {
    /// Registration of `node` through `client`; the scanned cards go to
    /// `cards` (the device plugin's channel).
    pub fn new(
        client: kube::Client,
        node: &str,
        cards: watch::Sender<Vec<DeviceInfo>>,
    ) -> Registration {
        Registration {
            nodes: Api::all(client),
            node: node.to_string(),
            period: DEFAULT_PERIOD,
            cards,
            progress: watch::Sender::new(Progress::default()),
            written: None,
            written_scores: None,
            patched_rv: None,
            allocation_mode: AllocationMode::Lock,
            node_lock: watch::Sender::new(None),
        }
    }

    /// The node's lock annotation (`hami.io/mutex.lock`) as the node watch
    /// shows it: without the lock of its own, the plugin still releases a
    /// lock that a scheduler speaking HAMi's protocol took for a pod.
    pub fn node_lock(&self) -> watch::Receiver<Option<String>> {
        self.node_lock.subscribe()
    }

    /// Announce how the plugin allocates (written with the register
    /// annotation, removed with it).
    pub fn with_allocation_mode(mut self, mode: AllocationMode) -> Registration {
        self.allocation_mode = mode;
        self
    }

    /// The mode annotation's value: none for the lock, so a node of ours
    /// in lock mode looks like one of HAMi's.
    fn mode_value(&self) -> Option<&'static str> {
        self.allocation_mode
            .lock_free()
            .then(|| self.allocation_mode.as_str())
    }

    /// Rescan every `period` (HAMi: 30 s).
    pub fn with_period(mut self, period: Duration) -> Registration {
        self.period = period;
        self
    }

    /// Follows what the loop does.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Runs until `shutdown` completes, then removes the node's register
    /// and handshake annotations.
    pub async fn run(
        mut self,
        mut scanner: Box<dyn Scan>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let events = watcher(self.nodes.clone(), config);
        tokio::pin!(events);
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => self.rescan(scanner.as_mut()).await,
                ev = events.next() => match ev {
                    Some(Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n))) => {
                        self.node_changed(&n).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!("watching node {}: {e}", self.node);
                        // The watcher backs off by itself on the next poll.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => {}
                },
            }
        }
        self.remove().await;
    }

    /// Scans; sends changed cards to the plugin and patches the node when
    /// the register value changed (or was never written).
    async fn rescan(&mut self, scanner: &mut dyn Scan) {
        match scanner.scan() {
            Ok(cards) => {
                let changed = self.cards.send_if_modified(|c| {
                    if *c == cards {
                        false
                    } else {
                        *c = cards.clone();
                        true
                    }
                });
                if changed {
                    tracing::info!(cards = cards.len(), "the node's cards changed");
                }
                let value = encode_devices_json(&cards);
                if self.written.as_deref() != Some(value.as_str()) {
                    self.write_register(value).await;
                } else {
                    tracing::debug!("rescan: no change");
                }
                if let Some(scores) = scanner.pair_scores() {
                    let value = encode_pair_scores(&scores);
                    if self.written_scores.as_deref() != Some(value.as_str()) {
                        self.write_scores(value).await;
                    }
                }
            }
            Err(e) => tracing::warn!("scanning the node's cards: {e:#}"),
        }
        self.progress.send_modify(|p| p.scans += 1);
    }

    async fn write_register(&mut self, value: String) {
        let patch = json!({"metadata": {"annotations": {
            ann::NODE_NVIDIA_REGISTER: value,
            ann::NODE_HANDSHAKE: reported(Timestamp::now()),
            ann::NODE_ALLOCATION_MODE: self.mode_value(),
        }}});
        match self.patch(patch).await {
            Ok(()) => {
                tracing::info!("wrote {}", ann::NODE_NVIDIA_REGISTER);
                self.written = Some(value);
                self.progress.send_modify(|p| p.register_patches += 1);
            }
            Err(e) => {
                tracing::warn!(
                    "writing {} on node {}: {e}",
                    ann::NODE_NVIDIA_REGISTER,
                    self.node
                );
                self.written = None;
            }
        }
    }

    async fn write_scores(&mut self, value: String) {
        let patch = json!({"metadata": {"annotations": {ann::NODE_NVIDIA_SCORE: value}}});
        match self.patch(patch).await {
            Ok(()) => {
                tracing::info!("wrote {}", ann::NODE_NVIDIA_SCORE);
                self.written_scores = Some(value);
            }
            Err(e) => {
                tracing::warn!(
                    "writing {} on node {}: {e}",
                    ann::NODE_NVIDIA_SCORE,
                    self.node
                );
                self.written_scores = None;
            }
        }
    }

    /// A node event: answer a `Requesting_` handshake; write the register
    /// (and pair-score) annotation again when it is not what was written.
    async fn node_changed(&mut self, node: &Node) {
        let rv = node
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(rv), Some(ours)) = (rv, self.patched_rv)
            && rv < ours
        {
            return;
        }
        let empty = BTreeMap::new();
        let a = node.metadata.annotations.as_ref().unwrap_or(&empty);
        self.node_lock.send_if_modified(|held| {
            let now = a.get(ann::NODE_LOCK);
            let changed = held.as_ref() != now;
            if changed {
                *held = now.cloned();
            }
            changed
        });
        if let Some(written) = self.written.clone()
            && (a.get(ann::NODE_NVIDIA_REGISTER) != Some(&written)
                || a.get(ann::NODE_ALLOCATION_MODE).map(String::as_str) != self.mode_value())
        {
            tracing::info!(
                "{} or {} is not what was written: writing them again",
                ann::NODE_NVIDIA_REGISTER,
                ann::NODE_ALLOCATION_MODE
            );
            self.write_register(written).await;
            return;
        }
        if let Some(scores) = self.written_scores.clone()
            && a.get(ann::NODE_NVIDIA_SCORE) != Some(&scores)
        {
            self.write_scores(scores).await;
        }
        // `Requesting_<t>`, the scheduler's `Deleted_...`, a bad value or
        // none: say Reported (HAMi's plugin overwrites whatever is there).
        let reported_already = a
            .get(ann::NODE_HANDSHAKE)
            .and_then(|v| Handshake::decode(ann::NODE_HANDSHAKE, v).ok())
            .is_some_and(|h| matches!(h, Handshake::Reported(_)));
        if !reported_already && self.written.is_some() {
            let value = reported(Timestamp::now());
            let patch = json!({"metadata": {"annotations": {ann::NODE_HANDSHAKE: value}}});
            match self.patch(patch).await {
                Ok(()) => {
                    tracing::info!("answered the scheduler's handshake: {value}");
                    self.progress.send_modify(|p| p.handshakes += 1);
                }
                Err(e) => tracing::warn!("answering the handshake on node {}: {e}", self.node),
            }
        }
    }

    async fn patch(&mut self, patch: serde_json::Value) -> Result<(), kube::Error> {
        let node = self
            .nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        self.patched_rv = node
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok());
        Ok(())
    }

    /// Removes the register and handshake annotations (a clean shutdown:
    /// the scheduler drops the node's devices at once).
    async fn remove(&mut self) {
        let mut annotations = json!({
            ann::NODE_NVIDIA_REGISTER: null,
            ann::NODE_HANDSHAKE: null,
            ann::NODE_ALLOCATION_MODE: null,
        });
        if self.written_scores.is_some() {
            annotations[ann::NODE_NVIDIA_SCORE] = serde_json::Value::Null;
        }
        let patch = json!({"metadata": {"annotations": annotations}});
        match tokio::time::timeout(Duration::from_secs(5), self.patch(patch)).await {
            Ok(Ok(())) => tracing::info!(
                "removed {} and {} from node {}",
                ann::NODE_NVIDIA_REGISTER,
                ann::NODE_HANDSHAKE,
                self.node
            ),
            Ok(Err(e)) => tracing::warn!("removing the node's annotations: {e}"),
            Err(_) => tracing::warn!("removing the node's annotations: timed out after 5 s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_is_hamis_layout_and_not_a_request() {
        let t: Timestamp = "2024-05-06T07:08:09Z".parse().unwrap();
        let v = reported(t);
        assert_eq!(v, "Reported 2024-05-06 07:08:09");
        assert_eq!(
            Handshake::decode("k", &v).unwrap(),
            Handshake::Reported(v.clone())
        );
    }
}
