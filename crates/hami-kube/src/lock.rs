//! The node bind lock, `hami.io/mutex.lock=<RFC3339>,<namespace>,<pod>`.
//!
//! Taken and released with a JSON patch whose `test` operation compares the
//! lock annotation with what the caller last saw (absent, or a given
//! value): the API server applies the patch atomically, so two binders can
//! never both believe they hold it, and writes to other fields of the node
//! (heartbeats, handshakes, other annotations) never make a lock attempt
//! fail, as a resourceVersion precondition would. A held lock may be taken
//! over when it has expired, when its pod no longer exists, or when its
//! pod is visibly past the device plugin's Allocate (bind-phase
//! `success`/`failed`, running or finished, or bound elsewhere): the plugin
//! needs the lock only to find the pod it is allocating, so holding it
//! longer would only serialize binds for nothing.

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
    /// Pause between looks at a held lock (at the cache, when there is one).
    pub poll: Duration,
    /// Pause between reads of a held lock from the API server, when a
    /// watch-fed cache is watched in between.
    pub api_poll: Duration,
    /// Conflicting writes tolerated in a row before giving up.
    pub max_conflicts: u32,
    /// A holder that took the lock but is not bound yet is left alone this
    /// long: its bind may still be running (it waits up to `wait` for
    /// locks, and kube-scheduler retries only after its httpTimeout).
    /// Taking over earlier could hand a device plugin, which finds the pod
    /// it allocates through the lock, another pod's cards. Past this, its
    /// binder is taken to have died.
    pub bind_grace: SignedDuration,
}

impl Default for LockPolicy {
    fn default() -> Self {
        LockPolicy {
            expiry: SignedDuration::from_mins(5),
            wait: Duration::from_secs(20),
            poll: Duration::from_millis(50),
            api_poll: Duration::from_secs(3),
            max_conflicts: 20,
            // lock wait (20 s) + kube-scheduler's default httpTimeout (30 s)
            bind_grace: SignedDuration::from_secs(50),
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

/// What a watch-fed cache shows of a node's lock annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachedLock {
    /// Tells one cached copy from the next; never a precondition.
    pub resource_version: Option<String>,
    /// The node has an annotations map at all.
    pub has_annotations: bool,
    /// The raw `hami.io/mutex.lock` value, if any.
    pub lock: Option<String>,
}

impl CachedLock {
    pub fn of(node: &Node) -> CachedLock {
        CachedLock::of_meta(&node.metadata)
    }

    fn of_meta(meta: &ObjectMeta) -> CachedLock {
        let annotations = meta.annotations.as_ref();
        CachedLock {
            resource_version: meta.resource_version.clone(),
            has_annotations: annotations.is_some(),
            lock: annotations.and_then(|a| a.get(ann::NODE_LOCK)).cloned(),
        }
    }

    /// Whether the lock looks free: absent, or garbage that protects nothing.
    fn free(&self) -> bool {
        self.lock
            .as_deref()
            .is_none_or(|v| NodeLock::decode(v).is_err())
    }
}

/// JSON pointer of the node annotation `key` (`/` escaped as `~1`).
fn annotation_path(key: &str) -> String {
    format!("/metadata/annotations/{}", key.replace('/', "~1"))
}

/// A JSON patch that sets the node annotation `key` to `value` only if it
/// is still `seen` (`has_annotations`: the node had an annotations map).
fn swap_patch(
    key: &str,
    has_annotations: bool,
    seen: Option<&str>,
    value: Option<&str>,
) -> json_patch::Patch {
    let ops = if !has_annotations {
        json!([
            {"op": "test", "path": "/metadata/annotations", "value": null},
            {"op": "add", "path": "/metadata/annotations", "value": {key: value}},
        ])
    } else {
        let path = annotation_path(key);
        let change = match value {
            Some(v) => json!({"op": "add", "path": path, "value": v}),
            None => json!({"op": "remove", "path": path}),
        };
        json!([{"op": "test", "path": path, "value": seen}, change])
    };
    serde_json::from_value(ops).expect("a well-formed JSON patch")
}

/// Outcome of one compare-and-swap of the lock annotation.
enum Swap {
    Done,
    /// The lock is no longer what the caller saw.
    Changed,
}

async fn swap(
    nodes: &Api<Node>,
    node: &str,
    seen: &CachedLock,
    value: Option<&str>,
) -> Result<Swap> {
    swap_annotation(
        nodes,
        node,
        ann::NODE_LOCK,
        seen.has_annotations,
        seen.lock.as_deref(),
        value,
    )
    .await
}

/// Compare-and-swap of the node annotation `key` (see [`swap_patch`]).
async fn swap_annotation(
    nodes: &Api<Node>,
    node: &str,
    key: &str,
    has_annotations: bool,
    seen: Option<&str>,
    value: Option<&str>,
) -> Result<Swap> {
    let patch: Patch<()> = Patch::Json(swap_patch(key, has_annotations, seen, value));
    match nodes.patch(node, &PatchParams::default(), &patch).await {
        Ok(_) => Ok(Swap::Done),
        Err(e) if crate::error::is_unprocessable(&e) || crate::error::is_conflict(&e) => {
            Ok(Swap::Changed)
        }
        Err(e) if is_not_found(&e) => Err(Error::NodeNotFound {
            node: node.to_string(),
        }),
        Err(e) => Err(Error::api(format!("lock node {node}"), e)),
    }
}

/// Reads the lock. `fresh: false` reads the API server's watch cache
/// (resourceVersion 0), which spares etcd but may be stale: fine for a
/// first look before a swap (staleness costs a failed swap), not after a
/// swap failed, nor to decide that a lock is not ours to release.
async fn read_lock(nodes: &Api<Node>, node: &str, fresh: bool) -> Result<CachedLock> {
    let params = if fresh {
        kube::api::GetParams::default()
    } else {
        kube::api::GetParams::any()
    };
    let found = nodes
        .get_metadata_opt_with(node, &params)
        .await
        .map_err(|e| Error::api(format!("get node {node}"), e))?;
    match found {
        Some(n) => Ok(CachedLock::of_meta(&n.metadata)),
        // The watch cache may not have seen a node created a moment ago.
        None if !fresh => Box::pin(read_lock(nodes, node, true)).await,
        None => Err(Error::NodeNotFound {
            node: node.to_string(),
        }),
    }
}

/// Takes the bind lock of `node` for pod `namespace/pod`, reading the node
/// from the API server at every look. Returns the lock value now held.
pub async fn acquire(
    client: &Client,
    node: &str,
    namespace: &str,
    pod: &str,
    clock: &dyn Clock,
    policy: &LockPolicy,
) -> Result<String> {
    acquire_cached(client, node, &|| None, namespace, pod, clock, policy).await
}

/// [`acquire`] helped by a watch-fed cache of the node. When the cache
/// shows the lock free, the swap is tried at once without reading the node
/// (a stale cache only makes the swap's test fail, and the node is read).
/// While the lock is held, the cache is looked at every `poll` and the API
/// server (node and holder pod, to judge a takeover) only every
/// `api_poll`, so a queue of waiting binds does not flood the API server.
pub async fn acquire_cached(
    client: &Client,
    node: &str,
    cache: &(dyn Fn() -> Option<CachedLock> + Send + Sync),
    namespace: &str,
    pod: &str,
    clock: &dyn Clock,
    policy: &LockPolicy,
) -> Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Instant::now();
    let mut conflicts = 0;
    // The cached copy last proven wrong (it showed the lock free while the
    // API server had it held): only a newer copy is worth trusting.
    let mut distrusted: Option<Option<String>> = None;
    let mut api_due = start;
    let mut fresh = false;
    loop {
        let current = match cache() {
            Some(c) if c.free() && distrusted.as_ref() != Some(&c.resource_version) => c,
            // Still held as far as the watch shows; not time to ask again.
            Some(_) if Instant::now() < api_due => {
                tokio::time::sleep(policy.poll).await;
                continue;
            }
            _ => read_lock(&nodes, node, fresh).await?,
        };
        let now = clock.now();
        let held = current.lock.as_deref().map(NodeLock::decode);
        // The lock that stops us, if any.
        let busy: Option<NodeLock> = match held {
            None => None,
            // Garbage in the lock annotation protects nothing.
            Some(Err(_)) => None,
            Some(Ok(l)) if l.namespace == namespace && l.pod == pod => {
                return Ok(current.lock.unwrap_or_default());
            }
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
            if let Some(c) = cache() {
                distrusted = Some(c.resource_version);
            }
            api_due = Instant::now() + policy.api_poll;
            tokio::time::sleep(policy.poll).await;
            continue;
        }
        let value = NodeLock {
            since: now,
            namespace: namespace.to_string(),
            pod: pod.to_string(),
        }
        .encode();
        match swap(&nodes, node, &current, Some(&value)).await? {
            Swap::Done => return Ok(value),
            Swap::Changed => {
                conflicts += 1;
                distrusted = cache().map(|c| c.resource_version);
                fresh = true;
                if conflicts >= policy.max_conflicts {
                    return Err(Error::LockContention {
                        node: node.to_string(),
                        attempts: conflicts,
                    });
                }
            }
        }
    }
}

/// Releases the bind lock of `node` if it is exactly `value` (what
/// [`acquire`] returned): one request. A lock that changed since (taken
/// over) is left alone.
pub async fn release_held(client: &Client, node: &str, value: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let seen = CachedLock {
        resource_version: None,
        has_annotations: true,
        lock: Some(value.to_string()),
    };
    match swap(&nodes, node, &seen, None).await {
        Ok(_) | Err(Error::NodeNotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Releases the bind lock of `node` if `namespace/pod` holds it, whatever
/// its time: reads the node, then swaps. A lock held by someone else
/// (taken over, or never ours) is left alone.
pub async fn release(client: &Client, node: &str, namespace: &str, pod: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for _ in 0..10 {
        let current = match read_lock(&nodes, node, true).await {
            Ok(c) => c,
            Err(Error::NodeNotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let ours = current
            .lock
            .as_deref()
            .and_then(|v| NodeLock::decode(v).ok())
            .is_some_and(|l| l.namespace == namespace && l.pod == pod);
        if !ours {
            return Ok(());
        }
        match swap(&nodes, node, &current, None).await {
            Ok(Swap::Done) | Err(Error::NodeNotFound { .. }) => return Ok(()),
            Ok(Swap::Changed) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::LockContention {
        node: node.to_string(),
        attempts: 10,
    })
}

/// Whether a vendor plugin's lock value (an RFC 3339 time) still holds at
/// `now`: it does until `expiry` has passed. A value that is no time
/// protects nothing.
pub fn plugin_lock_holds(value: &str, now: Timestamp, expiry: SignedDuration) -> bool {
    value
        .parse::<Timestamp>()
        .is_ok_and(|since| now.duration_since(since) <= expiry)
}

/// Takes a vendor plugin's own node lock (`key`, e.g. Cambricon's
/// `cambricon.com/dsmlu.lock`): sets it to `now` in RFC 3339 (seconds, as
/// the plugin writes and parses it) unless it holds a time younger than
/// `expiry`. The swap tests the value read, so two binders never both take
/// it. Returns the value set, for [`release_plugin_lock`] should the bind
/// fail; the plugin removes it once it has allocated.
pub async fn take_plugin_lock(
    client: &Client,
    node: &str,
    key: &str,
    now: Timestamp,
    expiry: SignedDuration,
) -> Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let value = jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", now)
        .expect("a timestamp formats as RFC 3339");
    const ATTEMPTS: u32 = 10;
    for _ in 0..ATTEMPTS {
        let meta = nodes
            .get_metadata_opt(node)
            .await
            .map_err(|e| Error::api(format!("get node {node}"), e))?
            .ok_or_else(|| Error::NodeNotFound {
                node: node.to_string(),
            })?
            .metadata;
        let annotations = meta.annotations.as_ref();
        let seen = annotations.and_then(|a| a.get(key));
        if let Some(since) = seen.filter(|v| plugin_lock_holds(v, now, expiry)) {
            return Err(Error::PluginLocked {
                node: node.to_string(),
                key: key.to_string(),
                since: since.clone(),
                expiry_secs: expiry.as_secs(),
            });
        }
        let seen = seen.map(String::as_str);
        match swap_annotation(&nodes, node, key, annotations.is_some(), seen, Some(&value)).await? {
            Swap::Done => return Ok(value),
            Swap::Changed => continue,
        }
    }
    Err(Error::LockContention {
        node: node.to_string(),
        attempts: ATTEMPTS,
    })
}

/// Removes a vendor plugin's lock taken by [`take_plugin_lock`] if it is
/// still exactly `value` (one request; one changed since is left alone).
pub async fn release_plugin_lock(
    client: &Client,
    node: &str,
    key: &str,
    value: &str,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    match swap_annotation(&nodes, node, key, true, Some(value), None).await {
        Ok(_) | Err(Error::NodeNotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
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
        // A holder still binding (slow API server, waiting for the lock
        // of... its own bind) is not taken over while kube-scheduler may
        // still be waiting for that bind: 15 s and 30 s are not enough.
        for t in [
            "2026-01-01T00:00:16Z",
            "2026-01-01T00:00:30Z",
            "2026-01-01T00:00:50Z",
        ] {
            assert!(!may_take_over(&l, HolderState::Binding, at(t), &p), "{t}");
        }
        // A binder that crashed between lock and binding is given up on.
        assert!(may_take_over(
            &l,
            HolderState::Binding,
            at("2026-01-01T00:00:51Z"),
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

    #[test]
    fn a_plugin_lock_holds_for_its_expiry_and_garbage_holds_nothing() {
        let now: Timestamp = "2026-12-01T10:02:00Z".parse().unwrap();
        let two_min = SignedDuration::from_mins(2);
        assert!(plugin_lock_holds("2026-12-01T10:00:30Z", now, two_min));
        assert!(plugin_lock_holds("2026-12-01T10:00:00Z", now, two_min));
        assert!(!plugin_lock_holds("2026-12-01T09:59:59Z", now, two_min));
        // Go's RFC 3339 with a zone offset, as HAMi writes it.
        assert!(plugin_lock_holds("2026-12-01T11:01:00+01:00", now, two_min));
        assert!(!plugin_lock_holds("not a time", now, two_min));
        assert!(!plugin_lock_holds("", now, two_min));
    }
}
