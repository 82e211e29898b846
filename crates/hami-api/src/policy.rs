//! Scheduling policies and score weights, as configured and as overridden by
//! pod annotations (`hami.io/node-scheduler-policy`,
//! `hami.io/gpu-scheduler-policy`, `hami.io/device-scoring-weights`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// How nodes are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodePolicy {
    /// Fill the fullest node first.
    #[default]
    Binpack,
    /// Prefer the emptiest node.
    Spread,
}

/// How cards within a node are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuPolicy {
    /// Fill the fullest card first.
    Binpack,
    /// Prefer the emptiest card.
    #[default]
    Spread,
    /// For multi-GPU containers, the set of cards with the best links.
    TopologyAware,
    /// Only cards nobody else uses.
    Mutex,
}

impl NodePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NodePolicy::Binpack => "binpack",
            NodePolicy::Spread => "spread",
        }
    }
}

impl GpuPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuPolicy::Binpack => "binpack",
            GpuPolicy::Spread => "spread",
            GpuPolicy::TopologyAware => "topology-aware",
            GpuPolicy::Mutex => "mutex",
        }
    }
}

impl fmt::Display for NodePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for GpuPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(NodePolicy::Binpack),
            "spread" => Ok(NodePolicy::Spread),
            other => Err(format!("node policy {other:?} is not binpack or spread")),
        }
    }
}

impl FromStr for GpuPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(GpuPolicy::Binpack),
            "spread" => Ok(GpuPolicy::Spread),
            "topology-aware" => Ok(GpuPolicy::TopologyAware),
            "mutex" => Ok(GpuPolicy::Mutex),
            other => Err(format!(
                "GPU policy {other:?} is not binpack, spread, topology-aware or mutex"
            )),
        }
    }
}

/// A GPU policy annotation: the policy plus an optional chained `numa`
/// (`binpack,numa`), which asks for all cards of a container on one NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuPolicySpec {
    /// `None` when only `numa` was given: the configured default applies.
    pub policy: Option<GpuPolicy>,
    pub numa: bool,
}

impl GpuPolicySpec {
    pub fn decode(source: &str, value: &str) -> Result<GpuPolicySpec, DecodeError> {
        let mut policy = None;
        let mut numa = false;
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.eq_ignore_ascii_case("numa") {
                numa = true;
            } else if policy.is_some() {
                return Err(DecodeError::new(source, value, "more than one GPU policy"));
            } else {
                policy = Some(
                    part.parse::<GpuPolicy>()
                        .map_err(|e| DecodeError::new(source, part, e))?,
                );
            }
        }
        if policy.is_none() && !numa {
            return Err(DecodeError::new(source, value, "no GPU policy given"));
        }
        Ok(GpuPolicySpec { policy, numa })
    }
}

/// Weights of the three GPU score terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoringWeights {
    pub slot: f64,
    pub core: f64,
    pub memory: f64,
}

impl Default for ScoringWeights {
    fn default() -> Self {
        ScoringWeights {
            slot: 1.0,
            core: 1.0,
            memory: 1.0,
        }
    }
}

impl ScoringWeights {
    /// Decodes `slot=1,core=1,memory=3`; terms not named keep weight 1.
    pub fn decode(source: &str, value: &str) -> Result<ScoringWeights, DecodeError> {
        let mut w = ScoringWeights::default();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, num)) = part.split_once('=') else {
                return Err(DecodeError::new(source, part, "expected <term>=<weight>"));
            };
            let num: f64 = num.trim().parse().map_err(|_| {
                DecodeError::new(source, part, format!("weight {num:?} is not a number"))
            })?;
            if !num.is_finite() || num < 0.0 {
                return Err(DecodeError::new(
                    source,
                    part,
                    "weight must be a finite number >= 0",
                ));
            }
            match key.trim() {
                "slot" => w.slot = num,
                "core" => w.core = num,
                "memory" | "mem" => w.memory = num,
                other => {
                    return Err(DecodeError::new(
                        source,
                        part,
                        format!("term {other:?} is not slot, core or memory"),
                    ));
                }
            }
        }
        Ok(w)
    }

    pub fn encode(&self) -> String {
        format!(
            "slot={},core={},memory={}",
            self.slot, self.core, self.memory
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse() {
        assert_eq!("Spread".parse::<NodePolicy>(), Ok(NodePolicy::Spread));
        assert!(
            "fill"
                .parse::<NodePolicy>()
                .unwrap_err()
                .contains("\"fill\"")
        );
        let s = GpuPolicySpec::decode("k", "binpack,numa").unwrap();
        assert_eq!((s.policy, s.numa), (Some(GpuPolicy::Binpack), true));
        let s = GpuPolicySpec::decode("k", "topology-aware").unwrap();
        assert_eq!((s.policy, s.numa), (Some(GpuPolicy::TopologyAware), false));
        let s = GpuPolicySpec::decode("k", "numa").unwrap();
        assert_eq!((s.policy, s.numa), (None, true));
        assert!(GpuPolicySpec::decode("k", "binpack,spread").is_err());
        assert!(GpuPolicySpec::decode("k", "").is_err());
    }

    #[test]
    fn weights_parse() {
        let w = ScoringWeights::decode("k", "slot=1,core=1,memory=3").unwrap();
        assert_eq!((w.slot, w.core, w.memory), (1.0, 1.0, 3.0));
        let w = ScoringWeights::decode("k", "memory=0.5").unwrap();
        assert_eq!((w.slot, w.core, w.memory), (1.0, 1.0, 0.5));
        assert!(ScoringWeights::decode("k", "gpu=2").is_err());
        assert!(ScoringWeights::decode("k", "slot=-1").is_err());
        assert!(ScoringWeights::decode("k", "slot").is_err());
        assert_eq!(w.encode(), "slot=1,core=1,memory=0.5");
    }

    proptest::proptest! {
        #[test]
        fn decoders_are_total(s in ".{0,60}") {
            let _ = GpuPolicySpec::decode("k", &s);
            let _ = ScoringWeights::decode("k", &s);
        }
    }
}
