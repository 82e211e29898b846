//! The Kubernetes side of Allocate (spec section 3, HAMi's
//! `GetPendingPod` and lock release): find the pod the scheduler bound to
//! this node, write back what was allocated, and end the bind with
//! `hami.io/bind-phase=success` or `failed` and the node lock released.
//!
//! [`PodStore`] is the seam: [`KubeStore`] talks to the API server; tests
//! may put an in-memory store behind the same gRPC service.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ListParams};

use hami_api::allocation::PodDevices;
use hami_api::annotations as ann;
use hami_api::node::NodeLock;
use hami_kube::Clock;
use hami_kube::events::{EventWriter, Severity};

use crate::allocate::pod_key;

/// A boxed future, for the object-safe [`PodStore`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Event reason written on a pod whose Allocate failed.
pub const ALLOCATE_FAILED: &str = "AllocateFailed";

/// What can go wrong on the Kubernetes side.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No pod on this node is waiting for its devices.
    #[error("no pod waits for Allocate on node {node}: {detail}")]
    NoPendingPod { node: String, detail: String },
    #[error(transparent)]
    Kube(#[from] hami_kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Where Allocate finds its pod and records the outcome.
pub trait PodStore: Send + Sync + 'static {
    /// The pod whose devices this node hands out next.
    fn find_pending(&self) -> BoxFuture<'_, Result<Pod, StoreError>>;
    /// Records that the served containers are allocated: the to-allocate
    /// annotation becomes `remaining`; when `done`, `bind-phase=success`
    /// and the node lock is released.
    fn finish<'a>(
        &'a self,
        pod: &'a Pod,
        remaining: &'a PodDevices,
        done: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Ends the bind as failed: `bind-phase=failed`, the node lock
    /// released, a Warning event with `reason`. Best effort: problems are
    /// logged, the caller reports `reason` anyway.
    fn fail<'a>(&'a self, pod: &'a Pod, reason: &'a str) -> BoxFuture<'a, ()>;
    /// The pod `namespace/name` as the API server has it now, if it exists
    /// (allocation without the lock: the kubelet named it).
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, StoreError>>;
    /// Records, without a node lock of our own, that a container got its
    /// limits: the to-allocate annotation becomes `remaining`; when `done`,
    /// `bind-phase=success`, and the node lock released if `release_lock`
    /// (a scheduler speaking HAMi's protocol locked the node for this pod).
    fn started<'a>(
        &'a self,
        pod: &'a Pod,
        remaining: &'a PodDevices,
        done: bool,
        release_lock: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// A Warning event on the pod (a container start refused); the bind
    /// phase stays, since the kubelet retries the start.
    fn warn<'a>(&'a self, pod: &'a Pod, reason: &'a str) -> BoxFuture<'a, ()>;
}

/// The pod's annotation `key`, if set.
pub(crate) fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Whether `pod` is bound to `node` by the scheduler and waits for its
/// devices there: Pending and not being deleted, `spec.nodeName` and
/// `hami.io/vgpu-node` both `node`, `hami.io/bind-phase` `allocating` (or
/// `success` with containers left, as HAMi accepts).
pub fn waits_on(pod: &Pod, node: &str) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if !matches!(phase, None | Some("Pending")) {
        return false;
    }
    let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if bound != Some(node) || annotation(pod, ann::VGPU_NODE) != Some(node) {
        return false;
    }
    matches!(
        annotation(pod, ann::BIND_PHASE),
        Some("allocating" | "success")
    )
}

/// Whether the pod's to-allocate annotation still holds a device.
pub fn has_devices_left(pod: &Pod) -> bool {
    annotation(pod, ann::NVIDIA_DEVICES_TO_ALLOCATE)
        .and_then(|v| PodDevices::decode(ann::NVIDIA_DEVICES_TO_ALLOCATE, v).ok())
        .is_some_and(|d| !d.is_empty())
}

/// Among pods listed on the node, the one to serve when the lock names
/// none: waiting there with devices left, the earliest `bind-time` first
/// (then by name, for a stable choice).
pub fn pick_listed<'a>(pods: &'a [Pod], node: &str) -> Option<&'a Pod> {
    pods.iter()
        .filter(|p| waits_on(p, node) && has_devices_left(p))
        .min_by_key(|p| {
            let t = annotation(p, ann::BIND_TIME)
                .and_then(|t| t.parse::<i64>().ok())
                .unwrap_or(i64::MAX);
            (t, pod_key(p))
        })
}

/// [`PodStore`] on the API server.
pub struct KubeStore {
    client: Client,
    node: String,
    events: EventWriter,
    clock: Arc<dyn Clock>,
}

impl KubeStore {
    pub fn new(client: Client, node: &str, clock: Arc<dyn Clock>) -> KubeStore {
        KubeStore {
            events: EventWriter::new(client.clone(), "hami-node", node),
            client,
            node: node.to_string(),
            clock,
        }
    }

    async fn find(&self) -> Result<Pod, StoreError> {
        let node = &self.node;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let n = nodes.get(node).await.map_err(|source| StoreError::Api {
            what: format!("get node {node}"),
            source,
        })?;
        let lock = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ann::NODE_LOCK))
            .cloned();
        // The lock holder first, as HAMi does.
        let mut why_not_holder = match &lock {
            None => format!("{} is not set", ann::NODE_LOCK),
            Some(v) => format!("{}={v:?} names no pod waiting here", ann::NODE_LOCK),
        };
        if let Some(l) = lock.as_deref().and_then(|v| NodeLock::decode(v).ok())
            && !l.pod.is_empty()
        {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &l.namespace);
            let holder = pods
                .get_opt(&l.pod)
                .await
                .map_err(|source| StoreError::Api {
                    what: format!("get pod {}/{}", l.namespace, l.pod),
                    source,
                })?;
            match holder {
                Some(p) if waits_on(&p, node) => return Ok(p),
                Some(_) => {}
                None => {
                    why_not_holder = format!(
                        "{} names pod {}/{}, which does not exist",
                        ann::NODE_LOCK,
                        l.namespace,
                        l.pod
                    )
                }
            }
        }
        let pods: Api<Pod> = Api::all(self.client.clone());
        let listed = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|source| StoreError::Api {
                what: format!("list pods on node {node}"),
                source,
            })?;
        pick_listed(&listed.items, node)
            .cloned()
            .ok_or_else(|| StoreError::NoPendingPod {
                node: node.clone(),
                detail: format!(
                    "{why_not_holder}, and no Pending pod bound to {node} has {}=allocating with devices left in {}",
                    ann::BIND_PHASE,
                    ann::NVIDIA_DEVICES_TO_ALLOCATE
                ),
            })
    }

    async fn patch(
        &self,
        pod: &Pod,
        set: &[(&str, String)],
        labels: &[(&str, String)],
    ) -> Result<(), StoreError> {
        let some = |kv: &[(&str, String)]| -> BTreeMap<String, Option<String>> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), Some(v.clone())))
                .collect()
        };
        hami_kube::pod::patch_metadata(
            &self.client,
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or_default(),
            pod.metadata.uid.as_deref(),
            &some(set),
            &some(labels),
        )
        .await?;
        Ok(())
    }

    async fn record(
        &self,
        pod: &Pod,
        remaining: &PodDevices,
        done: bool,
        labels: &[(&str, String)],
    ) -> Result<(), StoreError> {
        let mut set = vec![(ann::NVIDIA_DEVICES_TO_ALLOCATE, remaining.encode())];
        if done {
            set.push((ann::BIND_PHASE, "success".to_string()));
        }
        self.patch(pod, &set, labels).await
    }

    async fn event(&self, pod: &Pod, reason: &str) {
        if let Err(e) = self
            .events
            .pod_event(
                pod,
                Severity::Warning,
                ALLOCATE_FAILED,
                reason,
                self.clock.as_ref(),
            )
            .await
        {
            tracing::error!(pod = %pod_key(pod), "writing the {ALLOCATE_FAILED} event: {e}");
        }
    }

    async fn release(&self, pod: &Pod) -> Result<(), StoreError> {
        hami_kube::lock::release(
            &self.client,
            &self.node,
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or_default(),
        )
        .await?;
        Ok(())
    }
}

impl PodStore for KubeStore {
    fn find_pending(&self) -> BoxFuture<'_, Result<Pod, StoreError>> {
        Box::pin(self.find())
    }

    fn finish<'a>(
        &'a self,
        pod: &'a Pod,
        remaining: &'a PodDevices,
        done: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.record(pod, remaining, done, &[]).await?;
            if done && let Err(e) = self.release(pod).await {
                // The pod has its devices; a lock left behind expires or
                // is taken over (its holder is past Allocate).
                tracing::warn!(pod = %pod_key(pod), "allocated, but releasing the node lock failed: {e}");
            }
            Ok(())
        })
    }

    fn fail<'a>(&'a self, pod: &'a Pod, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = pod_key(pod);
            tracing::warn!(pod = %key, "Allocate failed: {reason}");
            if let Err(e) = self
                .patch(pod, &[(ann::BIND_PHASE, "failed".to_string())], &[])
                .await
            {
                tracing::error!(pod = %key, "setting {}=failed: {e}", ann::BIND_PHASE);
            }
            if let Err(e) = self.release(pod).await {
                tracing::error!(pod = %key, "releasing the node lock of {}: {e}", self.node);
            }
            self.event(pod, reason).await;
        })
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, StoreError>> {
        Box::pin(async move {
            Api::<Pod>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(|source| StoreError::Api {
                    what: format!("get pod {namespace}/{name}"),
                    source,
                })
        })
    }

    fn started<'a>(
        &'a self,
        pod: &'a Pod,
        remaining: &'a PodDevices,
        done: bool,
        release_lock: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // The node's label too (HAMi's scheduler writes it at bind;
            // hami-scheduler leaves it to this one write for nodes that
            // allocate without the lock).
            self.record(pod, remaining, done, &[(ann::VGPU_NODE, self.node.clone())])
                .await?;
            if done
                && release_lock
                && let Err(e) = self.release(pod).await
            {
                tracing::warn!(pod = %pod_key(pod), "allocated, but releasing the node lock failed: {e}");
            }
            Ok(())
        })
    }

    fn warn<'a>(&'a self, pod: &'a Pod, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            tracing::warn!(pod = %pod_key(pod), "container start refused: {reason}");
            self.event(pod, reason).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: &str, phase: &str, bind: &str, time: &str, left: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": {
                ann::VGPU_NODE: node, ann::BIND_PHASE: bind, ann::BIND_TIME: time,
                ann::NVIDIA_DEVICES_TO_ALLOCATE: left,
            }},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn only_pods_bound_here_and_allocating_wait() {
        let ok = pod(
            "a",
            "n1",
            "Pending",
            "allocating",
            "10",
            "GPU-a,NVIDIA,1,1:;",
        );
        assert!(waits_on(&ok, "n1"));
        assert!(!waits_on(&ok, "n2"));
        assert!(waits_on(
            &pod("a", "n1", "Pending", "success", "1", ";"),
            "n1"
        ));
        assert!(!waits_on(
            &pod("a", "n1", "Running", "allocating", "1", ""),
            "n1"
        ));
        assert!(!waits_on(
            &pod("a", "n1", "Pending", "failed", "1", ""),
            "n1"
        ));
        let mut elsewhere = ok.clone();
        elsewhere
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::VGPU_NODE.into(), "n2".into());
        assert!(!waits_on(&elsewhere, "n1"), "vgpu-node must be this node");
        let mut deleting = ok.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert!(!waits_on(&deleting, "n1"));
    }

    #[test]
    fn listed_pods_earliest_bind_first_with_devices_left() {
        let pods = [
            pod(
                "late",
                "n",
                "Pending",
                "allocating",
                "20",
                "GPU-a,NVIDIA,1,1:;",
            ),
            pod("done", "n", "Pending", "success", "5", ";"),
            pod(
                "early",
                "n",
                "Pending",
                "allocating",
                "10",
                "GPU-a,NVIDIA,1,1:;",
            ),
            pod("bad", "n", "Pending", "allocating", "1", "garbage"),
        ];
        assert_eq!(
            pick_listed(&pods, "n").unwrap().metadata.name.as_deref(),
            Some("early")
        );
        assert!(pick_listed(&pods[1..2], "n").is_none());
    }
}
