//! What a pod's annotations ask of the engine: policies, score weights and
//! card selectors, decoded once per pod.

use std::collections::BTreeMap;

use hami_api::DecodeError;
use hami_api::annotations as ann;
use hami_api::device::DeviceMode;
use hami_api::policy::{GpuPolicy, GpuPolicySpec, NodePolicy, ScoringWeights};

/// The cluster-wide default policies; pod annotations override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policies {
    pub node: NodePolicy,
    pub gpu: GpuPolicy,
}

/// Everything the annotations of one pod ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct PodConstraints {
    pub node_policy: NodePolicy,
    pub gpu_policy: GpuPolicy,
    /// All cards of a container from one NUMA node.
    pub numa_bind: bool,
    pub weights: ScoringWeights,
    /// Lower-cased substrings; a card type must contain one (when non-empty).
    pub use_types: Vec<String>,
    /// Lower-cased substrings; a card type must contain none.
    pub nouse_types: Vec<String>,
    pub use_uuids: Vec<String>,
    pub nouse_uuids: Vec<String>,
    pub mode: Option<DeviceMode>,
}

pub(crate) fn list(value: Option<&String>, lower: bool) -> Vec<String> {
    value
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if lower {
                        s.to_ascii_lowercase()
                    } else {
                        s.to_string()
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

impl PodConstraints {
    /// Decodes the annotations, falling back to `defaults`.
    pub fn decode(
        annotations: &BTreeMap<String, String>,
        defaults: Policies,
    ) -> Result<PodConstraints, DecodeError> {
        let get = |k: &str| annotations.get(k);
        let node_policy = match get(ann::NODE_SCHEDULER_POLICY) {
            Some(v) => v
                .parse()
                .map_err(|e| DecodeError::new(ann::NODE_SCHEDULER_POLICY, v, e))?,
            None => defaults.node,
        };
        let (gpu_policy, mut numa_bind) = match get(ann::GPU_SCHEDULER_POLICY) {
            Some(v) => {
                let s = GpuPolicySpec::decode(ann::GPU_SCHEDULER_POLICY, v)?;
                (s.policy.unwrap_or(defaults.gpu), s.numa)
            }
            None => (defaults.gpu, false),
        };
        if let Some(v) = get(ann::NVIDIA_NUMA_BIND) {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => numa_bind = true,
                "false" => {}
                _ => {
                    return Err(DecodeError::new(
                        ann::NVIDIA_NUMA_BIND,
                        v,
                        "must be \"true\" or \"false\"",
                    ));
                }
            }
        }
        let weights = match get(ann::DEVICE_SCORING_WEIGHTS) {
            Some(v) => ScoringWeights::decode(ann::DEVICE_SCORING_WEIGHTS, v)?,
            None => ScoringWeights::default(),
        };
        let mode = match get(ann::NVIDIA_VGPU_MODE) {
            Some(v) => Some(DeviceMode::parse(v.trim()).ok_or_else(|| {
                DecodeError::new(ann::NVIDIA_VGPU_MODE, v, "must be hami-core, mig or mps")
            })?),
            None => None,
        };
        Ok(PodConstraints {
            node_policy,
            gpu_policy,
            numa_bind,
            weights,
            use_types: list(get(ann::NVIDIA_USE_GPUTYPE), true),
            nouse_types: list(get(ann::NVIDIA_NOUSE_GPUTYPE), true),
            use_uuids: list(get(ann::NVIDIA_USE_GPUUUID), false),
            nouse_uuids: list(get(ann::NVIDIA_NOUSE_GPUUUID), false),
            mode,
        })
    }

    /// Whether a card of this type passes the type selectors. `type_lower`
    /// is the card type in lower case.
    pub fn type_allowed(&self, type_lower: &str) -> bool {
        if !self.use_types.is_empty() && !self.use_types.iter().any(|t| type_lower.contains(t)) {
            return false;
        }
        !self.nouse_types.iter().any(|t| type_lower.contains(t))
    }

    pub fn uuid_allowed(&self, uuid: &str) -> bool {
        if !self.use_uuids.is_empty() && !self.use_uuids.iter().any(|u| u == uuid) {
            return false;
        }
        !self.nouse_uuids.iter().any(|u| u == uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(kv: &[(&str, &str)]) -> Result<PodConstraints, DecodeError> {
        let m = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodConstraints::decode(&m, Policies::default())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = decode(&[]).unwrap();
        assert_eq!(
            (c.node_policy, c.gpu_policy, c.numa_bind),
            (NodePolicy::Binpack, GpuPolicy::Spread, false)
        );
        let c = decode(&[
            (ann::NODE_SCHEDULER_POLICY, "spread"),
            (ann::GPU_SCHEDULER_POLICY, "binpack"),
            (ann::NVIDIA_NUMA_BIND, "true"),
            (ann::NVIDIA_USE_GPUTYPE, "A100, H100"),
            (ann::NVIDIA_NOUSE_GPUUUID, "GPU-x"),
        ])
        .unwrap();
        assert_eq!(
            (c.node_policy, c.gpu_policy, c.numa_bind),
            (NodePolicy::Spread, GpuPolicy::Binpack, true)
        );
        assert!(c.type_allowed("nvidia a100-sxm4-80gb"));
        assert!(!c.type_allowed("nvidia-tesla t4"));
        assert!(c.uuid_allowed("GPU-y"));
        assert!(!c.uuid_allowed("GPU-x"));
    }

    #[test]
    fn bad_annotations_name_the_key() {
        let e = decode(&[(ann::NODE_SCHEDULER_POLICY, "fill")]).unwrap_err();
        assert_eq!(e.source, ann::NODE_SCHEDULER_POLICY);
        let e = decode(&[(ann::NVIDIA_NUMA_BIND, "yes")]).unwrap_err();
        assert_eq!(e.source, ann::NVIDIA_NUMA_BIND);
        let e = decode(&[(ann::NVIDIA_VGPU_MODE, "vgpu")]).unwrap_err();
        assert_eq!(e.source, ann::NVIDIA_VGPU_MODE);
    }
}
