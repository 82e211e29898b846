//! The node bind lock, `hami.io/mutex.lock=<RFC3339>,<namespace>,<pod>`.
//!
//! Taken with a resourceVersion-guarded patch (a concurrent writer makes
//! ours fail with 409 and we look again), so two binders can never both
//! believe they hold it. A held lock may be taken over when it has expired,
//! when its pod no longer exists, or when its pod is visibly past the
//! device plugin's Allocate (bind-phase `success`/`failed`, running or
//! finished, or bound elsewhere): the plugin needs the lock only to find
//! the pod it is allocating, so holding it longer would only serialize
//! binds for nothing.

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use hami_api::annotations as ann;
use hami_api::node::NodeLock;

use crate::clock::Clock;
use crate::error::is_not_found;
use crate::{Error, Result};

/// How long to wait for and retry the lock.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    /// A lock older than this may be taken (HAMi: 5 min).
    pub expiry: SignedDuration,
    /// How long to wait for a lock held by a live pod.
    pub wait: Duration,
    /// Pause between looks at a held lock.
    pub poll: Duration,
    /// Conflicting writes tolerated in a row before giving up.
    pub max_conflicts: u32,
    /// A holder that took the lock but never wrote its bind annotations
    /// (its binder crashed in between) is given up on after this long.
    pub bind_grace: SignedDuration,
}

impl Default for LockPolicy {
    fn default() -> Self {
        LockPolicy {
            expiry: SignedDuration::from_mins(5),
            wait: Duration::from_secs(20),
            poll: Duration::from_millis(50),
            max_conflicts: 20,
            bind_grace: SignedDuration::from_secs(15),
        }
    }
}

/// The state of the pod named in a lock, as far as taking over goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderState {
    /// The pod does not exist any more.
    Gone,
    /// Locked the node but has not finished its bind yet (annotations or
    /// binding still to come).
    Binding,
    /// Still between bind and the device plugin's Allocate.
    Allocating,
    /// Past Allocate (or never going to reach it on this node).
    Done,
}

/// Whether `lock` may be taken over at `now`.
pub fn may_take_over(
    lock: &NodeLock,
    holder: HolderState,
    now: Timestamp,
    policy: &LockPolicy,
) -> bool {
    let age = now.duration_since(lock.since);
    match holder {
        HolderState::Gone | HolderState::Done => true,
        HolderState::Binding => age > policy.bind_grace || age > policy.expiry,
        HolderState::Allocating => age > policy.expiry,
    }
}

/// Classifies the pod named in a lock on `node`.
pub fn holder_state(pod: Option<&Pod>, node: &str) -> HolderState {
    let Some(pod) = pod else {
        return HolderState::Gone;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return HolderState::Done;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if !matches!(phase, None | Some("Pending")) {
        return HolderState::Done;
    }
    let annotations = pod.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    if get(ann::VGPU_NODE).is_some_and(|n| n != node) {
        return HolderState::Done;
    }
    let bound = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    match get(ann::BIND_PHASE) {
        Some("success" | "failed") => HolderState::Done,
        // Annotated but never bound: its binder failed or died before the
        // binding; the same grace as a binder that died before annotating.
        Some(_) if !bound => HolderState::Binding,
        Some(_) => HolderState::Allocating,
        None => HolderState::Binding,
    }
}

/// Takes the bind lock of `node` for pod `namespace/pod`.
pub async fn acquire(
    client: &Client,
    node: &str,
    namespace: &str,
    pod: &str,
    clock: &dyn Clock,
    policy: &LockPolicy,
) -> Result<()> {
    acquire_hinted(client, node, None, namespace, pod, clock, policy).await
}

/// [`acquire`], starting from a cached copy of the node (from a watch)
/// instead of reading it. The copy is trusted only when it shows the lock
/// free, and even then only as the resourceVersion precondition of the
/// patch: a stale copy makes the patch fail with 409 and the node is read.
pub async fn acquire_hinted(
    client: &Client,
    node: &str,
    hint: Option<Node>,
    namespace: &str,
    pod: &str,
    clock: &dyn Clock,
    policy: &LockPolicy,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Instant::now();
    let mut conflicts = 0;
    let mut hint = hint.filter(|n| {
        n.metadata.resource_version.is_some()
            && !n
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(ann::NODE_LOCK))
    });
    loop {
        let current = match hint.take() {
            Some(n) => n,
            None => nodes
                .get_opt(node)
                .await
                .map_err(|e| Error::api(format!("get node {node}"), e))?
                .ok_or_else(|| Error::NodeNotFound {
                    node: node.to_string(),
                })?,
        };
        let now = clock.now();
        let held = current
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ann::NODE_LOCK))
            .map(|v| NodeLock::decode(v));
        // The lock that stops us, if any.
        let busy: Option<NodeLock> = match held {
            None => None,
            // Garbage in the lock annotation protects nothing.
            Some(Err(_)) => None,
            Some(Ok(l)) if l.namespace == namespace && l.pod == pod => return Ok(()),
            Some(Ok(l)) if l.namespace.is_empty() => {
                (!may_take_over(&l, HolderState::Allocating, now, policy)).then_some(l)
            }
            Some(Ok(l)) => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &l.namespace);
                let p = pods
                    .get_opt(&l.pod)
                    .await
                    .map_err(|e| Error::api(format!("get pod {}/{}", l.namespace, l.pod), e))?;
                let state = holder_state(p.as_ref(), node);
                (!may_take_over(&l, state, now, policy)).then_some(l)
            }
        };
        if let Some(l) = busy {
            if start.elapsed() >= policy.wait {
                return Err(Error::Locked {
                    node: node.to_string(),
                    holder: format!("{}/{}", l.namespace, l.pod),
                    since: l.since.to_string(),
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            tokio::time::sleep(policy.poll).await;
            continue;
        }
        let value = NodeLock {
            since: now,
            namespace: namespace.to_string(),
            pod: pod.to_string(),
        }
        .encode();
        let patch = json!({"metadata": {
            "resourceVersion": current.metadata.resource_version,
            "annotations": {ann::NODE_LOCK: value},
        }});
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if crate::error::is_conflict(&e) => {
                conflicts += 1;
                if conflicts >= policy.max_conflicts {
                    return Err(Error::LockContention {
                        node: node.to_string(),
                        attempts: conflicts,
                    });
                }
            }
            Err(e) => return Err(Error::api(format!("lock node {node}"), e)),
        }
    }
}

/// Releases the bind lock of `node` if `namespace/pod` holds it. A lock
/// held by someone else (taken over, or never ours) is left alone.
pub async fn release(client: &Client, node: &str, namespace: &str, pod: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for _ in 0..10 {
        let current = match nodes.get(node).await {
            Ok(n) => n,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(Error::api(format!("get node {node}"), e)),
        };
        let ours = current
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ann::NODE_LOCK))
            .and_then(|v| NodeLock::decode(v).ok())
            .is_some_and(|l| l.namespace == namespace && l.pod == pod);
        if !ours {
            return Ok(());
        }
        let patch = json!({"metadata": {
            "resourceVersion": current.metadata.resource_version,
            "annotations": {ann::NODE_LOCK: null},
        }});
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if crate::error::is_conflict(&e) => continue,
            Err(e) => return Err(Error::api(format!("unlock node {node}"), e)),
        }
    }
    Err(Error::LockContention {
        node: node.to_string(),
        attempts: 10,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;

    fn lock_at(t: &str) -> NodeLock {
        NodeLock {
            since: t.parse().unwrap(),
            namespace: "ns".into(),
            pod: "p".into(),
        }
    }

    fn pod(phase: &str, bind_phase: Option<&str>, node: &str) -> Pod {
        let mut p = Pod::default();
        let mut a = std::collections::BTreeMap::new();
        a.insert(ann::VGPU_NODE.to_string(), node.to_string());
        if let Some(b) = bind_phase {
            a.insert(ann::BIND_PHASE.to_string(), b.to_string());
        }
        p.metadata.annotations = Some(a);
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        p
    }

    #[test]
    fn expiry_and_takeover() {
        let l = lock_at("2026-01-01T00:00:00Z");
        let p = LockPolicy::default();
        let at = |t: &str| -> Timestamp { t.parse().unwrap() };
        let soon = at("2026-01-01T00:04:59Z");
        let late = at("2026-01-01T00:05:01Z");
        assert!(!may_take_over(&l, HolderState::Allocating, soon, &p));
        assert!(may_take_over(&l, HolderState::Allocating, late, &p));
        assert!(may_take_over(&l, HolderState::Gone, soon, &p));
        assert!(may_take_over(&l, HolderState::Done, soon, &p));
        // A binder that crashed between lock and annotations.
        assert!(!may_take_over(
            &l,
            HolderState::Binding,
            at("2026-01-01T00:00:15Z"),
            &p
        ));
        assert!(may_take_over(
            &l,
            HolderState::Binding,
            at("2026-01-01T00:00:16Z"),
            &p
        ));
    }

    #[test]
    fn holder_states() {
        assert_eq!(holder_state(None, "n"), HolderState::Gone);
        let mut p = pod("Pending", Some("allocating"), "n");
        assert_eq!(holder_state(Some(&p), "n"), HolderState::Binding);
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("n".into()),
            ..Default::default()
        });
        assert_eq!(holder_state(Some(&p), "n"), HolderState::Allocating);
        assert_eq!(holder_state(Some(&p), "other"), HolderState::Done);
        let p = pod("Pending", Some("success"), "n");
        assert_eq!(holder_state(Some(&p), "n"), HolderState::Done);
        let p = pod("Running", Some("allocating"), "n");
        assert_eq!(holder_state(Some(&p), "n"), HolderState::Done);
        let p = pod("Pending", None, "n");
        assert_eq!(holder_state(Some(&p), "n"), HolderState::Binding);
    }
}
