//! The node handshake and health rules (spec section 2).
//!
//! The scheduler writes `Requesting_<time>` into `hami.io/node-handshake`;
//! the device plugin answers by writing anything else (`Reported <time>`).
//! A node whose value has said Requesting for longer than [`STALE_AFTER`]
//! and whose allocatable GPU count is 0 has lost its device plugin: its
//! devices leave the cache until the plugin reports again. Every other
//! value is answered with a fresh `Requesting_<now>`.
//!
//! These are pure functions of the node and the time; the caller writes
//! the answer (leader only) and applies the verdict to its cache.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Node;

use hami_api::annotations as ann;
use hami_api::node::Handshake;
use hami_api::quantity::Quantity;

/// How long a `Requesting_` value may stand before the node counts as gone.
pub const STALE_AFTER: SignedDuration = SignedDuration::from_secs(60);

/// What to do about one node's handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the node's devices belong in the cache.
    pub healthy: bool,
    /// The handshake value to write, if any.
    pub answer: Option<String>,
}

/// Judges a node's handshake at time `now`. `count_resource` is the
/// vendor's count resource (`nvidia.com/gpu`).
pub fn judge(node: &Node, now: Timestamp, count_resource: &str) -> Verdict {
    judge_key(node, now, ann::NODE_HANDSHAKE, count_resource)
}

/// [`judge`] for the handshake annotation `key` (other vendors' plugins
/// answer `hami.io/node-handshake-<vendor>`).
pub fn judge_key(node: &Node, now: Timestamp, key: &str, count_resource: &str) -> Verdict {
    let requesting_now = || Some(Handshake::Requesting(now).encode());
    let value = node.metadata.annotations.as_ref().and_then(|a| a.get(key));
    let Some(value) = value else {
        // A node that never took part in the handshake: start it.
        return Verdict {
            healthy: true,
            answer: requesting_now(),
        };
    };
    match Handshake::decode(key, value) {
        Ok(Handshake::Requesting(since)) => {
            let stale = now.duration_since(since) > STALE_AFTER;
            let healthy = !(stale && allocatable_count(node, count_resource) == 0);
            Verdict {
                healthy,
                answer: None,
            }
        }
        // Written by a scheduler that gave the node up: it stays out until
        // the plugin reports again.
        Ok(Handshake::Deleted(_)) => Verdict {
            healthy: allocatable_count(node, count_resource) > 0,
            answer: None,
        },
        Ok(Handshake::Reported(_)) | Err(_) => Verdict {
            healthy: true,
            answer: requesting_now(),
        },
    }
}

/// The node's allocatable count of `resource` (0 when absent or malformed).
pub fn allocatable_count(node: &Node, resource: &str) -> u64 {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(resource))
        .and_then(|q| Quantity::parse(&q.0).ok())
        .map(|q| q.value().max(0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeStatus;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQ;

    fn node(handshake: Option<&str>, gpus: Option<&str>) -> Node {
        let mut n = Node::default();
        if let Some(h) = handshake {
            n.metadata.annotations =
                Some([(ann::NODE_HANDSHAKE.to_string(), h.to_string())].into());
        }
        if let Some(g) = gpus {
            n.status = Some(NodeStatus {
                allocatable: Some([("nvidia.com/gpu".to_string(), K8sQ(g.to_string()))].into()),
                ..Default::default()
            });
        }
        n
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn reported_is_answered_with_requesting_now() {
        let now = at("2026-01-02T03:04:05Z");
        let v = judge(
            &node(Some("Reported 2026-01-02 03:00:00"), Some("10")),
            now,
            "nvidia.com/gpu",
        );
        assert_eq!(
            v,
            Verdict {
                healthy: true,
                answer: Some("Requesting_2026-01-02 03:04:05".into())
            }
        );
        let v = judge(&node(None, None), now, "nvidia.com/gpu");
        assert!(v.healthy && v.answer.is_some());
    }

    #[test]
    fn stale_requesting_without_gpus_is_unhealthy() {
        let h = Some("Requesting_2026-01-02 03:00:00");
        let fresh = at("2026-01-02T03:01:00Z");
        let stale = at("2026-01-02T03:01:01Z");
        assert!(judge(&node(h, Some("0")), fresh, "nvidia.com/gpu").healthy);
        assert!(!judge(&node(h, Some("0")), stale, "nvidia.com/gpu").healthy);
        assert!(!judge(&node(h, None), stale, "nvidia.com/gpu").healthy);
        // The plugin still advertises GPUs: the kubelet thinks it is alive.
        assert!(judge(&node(h, Some("8")), stale, "nvidia.com/gpu").healthy);
        assert_eq!(
            judge(&node(h, Some("0")), stale, "nvidia.com/gpu").answer,
            None
        );
    }

    #[test]
    fn deleted_stays_out_until_reported() {
        let now = at("2026-01-02T03:04:05Z");
        let v = judge(
            &node(Some("Deleted_2026-01-02 03:00:00"), Some("0")),
            now,
            "nvidia.com/gpu",
        );
        assert_eq!(
            v,
            Verdict {
                healthy: false,
                answer: None
            }
        );
    }
}
