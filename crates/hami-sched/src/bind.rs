//! Binds in flight: a node whose bind lock (`hami.io/mutex.lock`) is held
//! by a pod still waiting for its device plugin. A bind there would wait
//! for the lock, so Filter offers such nodes only when nothing else fits.
//! Time is an input: the caller says what "now" is.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;

use hami_api::annotations as ann;
use hami_api::node::NodeLock;
use hami_api::policy::NodePolicy;

/// How long a lock whose pod the caller has not seen yet counts as a bind
/// in flight (the pod's bind may simply not have reached the caller).
pub const UNSEEN_HOLDER_GRACE: SignedDuration = SignedDuration::from_secs(5);

/// Who holds a node's bind lock and whether that bind is still under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindInFlight {
    /// `namespace/name` of the pod holding the lock.
    pub holder: String,
    pub since: Timestamp,
    /// The holder's device plugin has not allocated yet: its
    /// `hami.io/bind-phase` is `allocating`, it is Pending and its
    /// `hami.io/vgpu-node` is this node (or the holder is not known yet and
    /// the lock is younger than [`UNSEEN_HOLDER_GRACE`]).
    pub waiting_for_device_plugin: bool,
}

/// What the bind rule reads of the pod holding a node's lock: its
/// `hami.io/bind-phase`, its phase and its `hami.io/vgpu-node`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockHolder<'a> {
    pub bind_phase: Option<&'a str>,
    pub phase: Option<&'a str>,
    pub vgpu_node: Option<&'a str>,
}

impl<'a> LockHolder<'a> {
    pub fn of(pod: &'a Pod) -> LockHolder<'a> {
        let annotation = |k: &str| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .map(String::as_str)
        };
        LockHolder {
            bind_phase: annotation(ann::BIND_PHASE),
            phase: pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            vgpu_node: annotation(ann::VGPU_NODE),
        }
    }
}

impl BindInFlight {
    /// The bind in flight a node's lock says, given the holder pod when it
    /// is known. `now` decides only whether an unknown holder is still new.
    pub fn from_lock(
        node: &str,
        lock: &NodeLock,
        holder: Option<LockHolder<'_>>,
        now: Timestamp,
    ) -> BindInFlight {
        let waiting = match holder {
            Some(h) => {
                h.bind_phase == Some("allocating")
                    && matches!(h.phase, None | Some("Pending"))
                    && h.vgpu_node == Some(node)
            }
            None => now.duration_since(lock.since) < UNSEEN_HOLDER_GRACE,
        };
        BindInFlight {
            holder: format!("{}/{}", lock.namespace, lock.pod),
            since: lock.since,
            waiting_for_device_plugin: waiting,
        }
    }

    /// The reason a node passed over for this bind is reported with.
    pub fn reason(&self) -> String {
        format!(
            "NodeLockBusy: bind lock held by {} since {} (its device plugin has not allocated yet)",
            self.holder, self.since
        )
    }
}

/// When a node with a bind in flight is passed over: its lock is held by
/// another pod waiting for its device plugin, for longer than `busy_after`.
/// A spread pod passes over any such node at once: spread wants another
/// node anyway, and under a burst the next-emptiest node binds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyRule {
    pub now: Timestamp,
    pub busy_after: SignedDuration,
}

impl BusyRule {
    /// Whether `bind` makes its node busy for the pod `key` under `policy`.
    pub fn is_busy(&self, bind: &BindInFlight, key: &str, policy: NodePolicy) -> bool {
        let busy_after = match policy {
            NodePolicy::Spread => SignedDuration::ZERO,
            NodePolicy::Binpack => self.busy_after,
        };
        bind.holder != key
            && bind.waiting_for_device_plugin
            && self.now.duration_since(bind.since) > busy_after
    }
}
