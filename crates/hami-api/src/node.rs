//! Node-side annotation values: the handshake, the cordon list and the bind lock.

use jiff::{Timestamp, civil::DateTime, tz::TimeZone};

use crate::annotations::NODE_LOCK;
use crate::error::DecodeError;

/// Layout of handshake times, `YYYY-MM-DD HH:MM:SS` in UTC.
const HANDSHAKE_TIME: &str = "%Y-%m-%d %H:%M:%S";

/// The value of `hami.io/node-handshake`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Written by the scheduler: it waits for the plugin to report.
    Requesting(Timestamp),
    /// Written by the plugin, e.g. `Reported 2024-01-02 03:04:05`.
    Reported(String),
    /// Written by the scheduler when it gave up on the node.
    Deleted(String),
}

impl Handshake {
    pub fn decode(source: &str, value: &str) -> Result<Handshake, DecodeError> {
        if let Some(t) = value.strip_prefix("Requesting_") {
            let dt = DateTime::strptime(HANDSHAKE_TIME, t)
                .map_err(|_| DecodeError::new(source, value, "time is not YYYY-MM-DD HH:MM:SS"))?;
            let ts = dt
                .to_zoned(TimeZone::UTC)
                .map_err(|_| DecodeError::new(source, value, "time out of range"))?
                .timestamp();
            Ok(Handshake::Requesting(ts))
        } else if let Some(rest) = value.strip_prefix("Deleted") {
            Ok(Handshake::Deleted(rest.trim_start_matches('_').to_string()))
        } else {
            Ok(Handshake::Reported(value.to_string()))
        }
    }

    pub fn encode(&self) -> String {
        match self {
            Handshake::Requesting(ts) => format!(
                "Requesting_{}",
                ts.to_zoned(TimeZone::UTC).strftime(HANDSHAKE_TIME)
            ),
            Handshake::Reported(s) => s.clone(),
            Handshake::Deleted(s) => format!("Deleted_{s}"),
        }
    }
}

/// Decodes `hami.io/device-cordon`: a comma list of UUIDs, blanks skipped.
pub fn decode_cordon(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Encodes `hami.io/device-cordon`.
pub fn encode_cordon(uuids: &[String]) -> String {
    uuids.join(",")
}

/// The value of `hami.io/mutex.lock`: who holds a node's bind lock and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLock {
    pub since: Timestamp,
    /// Empty for locks written by old versions, which held only the time.
    pub namespace: String,
    pub pod: String,
}

impl NodeLock {
    pub fn decode(value: &str) -> Result<NodeLock, DecodeError> {
        let mut parts = value.splitn(3, ',');
        let time = parts.next().unwrap_or_default();
        let since: Timestamp = time
            .parse()
            .map_err(|_| DecodeError::new(NODE_LOCK, value, "time is not RFC 3339"))?;
        let namespace = parts.next().unwrap_or_default().to_string();
        let pod = parts.next().unwrap_or_default().to_string();
        if namespace.is_empty() != pod.is_empty() {
            return Err(DecodeError::new(
                NODE_LOCK,
                value,
                "expected <time>,<namespace>,<pod>",
            ));
        }
        Ok(NodeLock {
            since,
            namespace,
            pod,
        })
    }

    /// `2024-01-02T03:04:05Z,ns,pod` (seconds precision, UTC, as Go's RFC3339).
    pub fn encode(&self) -> String {
        let t = self
            .since
            .to_zoned(TimeZone::UTC)
            .strftime("%Y-%m-%dT%H:%M:%SZ");
        if self.namespace.is_empty() {
            t.to_string()
        } else {
            format!("{t},{},{}", self.namespace, self.pod)
        }
    }
}

/// How a node's agent learns which container got which cards, written by
/// the agent as `hami.io/node-allocation-mode`. Only [`AllocationMode::Lock`]
/// needs the scheduler to bind one pod at a time per node: HAMi's device
/// plugin finds the pod being allocated through the node lock, because the
/// kubelet's Allocate names device IDs and not the pod. The other modes
/// name the pod themselves, so binds to such nodes take no lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationMode {
    /// HAMi's protocol: the node lock held from bind until Allocate
    /// (no annotation; HAMi's device plugin writes none).
    Lock,
    /// The runtime's NRI hands the agent each container with its pod.
    Nri,
    /// The kubelet's PreStartContainer, with its PodResources API naming
    /// the container that received the device IDs.
    PodResources,
}

impl AllocationMode {
    /// The annotation value (`lock`, `nri`, `pod-resources`).
    pub fn as_str(self) -> &'static str {
        match self {
            AllocationMode::Lock => "lock",
            AllocationMode::Nri => "nri",
            AllocationMode::PodResources => "pod-resources",
        }
    }

    /// Parses an annotation or flag value.
    pub fn parse(value: &str) -> Option<AllocationMode> {
        [
            AllocationMode::Lock,
            AllocationMode::Nri,
            AllocationMode::PodResources,
        ]
        .into_iter()
        .find(|m| m.as_str() == value.trim())
    }

    /// The mode a node's annotation value announces. No value, or one this
    /// version does not know (a newer agent), means the lock: taking it is
    /// always safe, skipping it is safe only when the agent says so.
    pub fn of_node(value: Option<&str>) -> AllocationMode {
        value
            .and_then(AllocationMode::parse)
            .unwrap_or(AllocationMode::Lock)
    }

    /// Whether binds to such a node skip the node lock.
    pub fn lock_free(self) -> bool {
        self != AllocationMode::Lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_round_trip() {
        let v = "Requesting_2024-05-06 07:08:09";
        let h = Handshake::decode("k", v).unwrap();
        let Handshake::Requesting(ts) = h.clone() else {
            panic!("{h:?}")
        };
        assert_eq!(ts.as_second(), 1714979289);
        assert_eq!(h.encode(), v);
        assert_eq!(
            Handshake::decode("k", "Reported 2024-05-06 07:08:09").unwrap(),
            Handshake::Reported("Reported 2024-05-06 07:08:09".into())
        );
        assert!(Handshake::decode("k", "Requesting_yesterday").is_err());
    }

    #[test]
    fn allocation_mode_defaults_to_the_lock() {
        assert_eq!(AllocationMode::of_node(None), AllocationMode::Lock);
        assert_eq!(AllocationMode::of_node(Some("nri")), AllocationMode::Nri);
        assert_eq!(
            AllocationMode::of_node(Some("pod-resources")),
            AllocationMode::PodResources
        );
        // Unknown values (a newer agent, a typo) keep the safe protocol.
        assert_eq!(AllocationMode::of_node(Some("magic")), AllocationMode::Lock);
        assert!(!AllocationMode::of_node(Some("")).lock_free());
        assert!(AllocationMode::Nri.lock_free() && AllocationMode::PodResources.lock_free());
        for m in [
            AllocationMode::Lock,
            AllocationMode::Nri,
            AllocationMode::PodResources,
        ] {
            assert_eq!(AllocationMode::parse(m.as_str()), Some(m));
        }
    }

    #[test]
    fn cordon_list() {
        assert_eq!(decode_cordon(" GPU-a, ,GPU-b,"), vec!["GPU-a", "GPU-b"]);
        assert_eq!(encode_cordon(&decode_cordon("GPU-a,GPU-b")), "GPU-a,GPU-b");
        assert!(decode_cordon("").is_empty());
    }

    #[test]
    fn node_lock_round_trip() {
        let v = "2024-05-06T07:08:09Z,default,train-0";
        let l = NodeLock::decode(v).unwrap();
        assert_eq!(
            (l.namespace.as_str(), l.pod.as_str()),
            ("default", "train-0")
        );
        assert_eq!(l.encode(), v);
        let old = NodeLock::decode("2024-05-06T07:08:09+08:00").unwrap();
        assert_eq!(old.encode(), "2024-05-05T23:08:09Z");
        assert!(NodeLock::decode("2024-05-06T07:08:09Z,default").is_err());
        assert!(NodeLock::decode("now,a,b").is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_are_total(s in ".{0,60}") {
            let _ = Handshake::decode("k", &s);
            let _ = NodeLock::decode(&s);
            let _ = decode_cordon(&s);
        }
    }
}
