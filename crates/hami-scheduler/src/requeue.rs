//! Telling kube-scheduler to try unschedulable pods again after cards were
//! freed with no Kubernetes event of their own.
//!
//! kube-scheduler retries a pod an extender found unschedulable at the next
//! cluster event (any event: the extender is a wildcard rejector), else
//! only after `podMaxInUnschedulablePodsDuration` (5 minutes). Most cards
//! are freed by such an event (a pod bound elsewhere, deleted, ended), but
//! two releases happen inside hami-scheduler alone: a pod filtered again
//! whose earlier decision is dropped while nothing fits it now, and a
//! decision that expired with no bind. For those, hami-scheduler writes
//! `hami.io/node-cards-freed: <RFC 3339 time>` on the node: a node
//! annotation change is an event kube-scheduler acts on
//! (`UpdateNodeAnnotation`). At most one write per node per second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hami_api::annotations as ann;
use kube::api::{Api, Patch, PatchParams};

/// Writes at most this often per node.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The last write per node.
#[derive(Clone, Default)]
pub struct Requeue(Arc<Mutex<HashMap<String, Instant>>>);

impl Requeue {
    /// Whether a write for `node` is due now (and notes it).
    fn due(&self, node: &str) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match last.get(node) {
            Some(t) if now.duration_since(*t) < MIN_INTERVAL => false,
            _ => {
                last.insert(node.to_string(), now);
                true
            }
        }
    }

    /// Marks `node` in the background: pods kube-scheduler set aside as
    /// unschedulable are tried again.
    pub fn cards_freed(&self, client: &kube::Client, node: &str, now: jiff::Timestamp) {
        if !self.due(node) {
            return;
        }
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let node = node.to_string();
        let patch = serde_json::json!({"metadata": {"annotations": {
            ann::NODE_CARDS_FREED: now.to_string(),
        }}});
        tokio::spawn(async move {
            match nodes
                .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => tracing::info!(
                    node,
                    "cards freed with no event: marked the node so unschedulable pods are tried again"
                ),
                Err(e) => tracing::warn!(node, "marking the node after freeing cards: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_per_node_per_interval() {
        let r = Requeue::default();
        assert!(r.due("n1"));
        assert!(!r.due("n1"));
        assert!(r.due("n2"));
    }
}
