//! What a container asks for, parsed from its resource limits (falling back
//! to requests) with the defaults of spec section 6.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use serde::{Deserialize, Serialize};

use crate::config::NvidiaConfig;
use crate::quantity::Quantity;

/// The largest `nvidia.com/priority` the interposer can read (`i32::MAX`).
pub const MAX_PRIORITY: u64 = i32::MAX as u64;

/// One container's request for devices of one vendor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerRequest {
    /// Number of cards, each with the amounts below.
    pub nums: u32,
    /// Vendor word, e.g. `NVIDIA`.
    pub vendor: String,
    /// MiB per card (gpumem x memoryFactor, or defaultMemory); 0 = use `mem_percentage`.
    pub mem: u64,
    /// Percent of each card's memory, used when `mem` is 0.
    pub mem_percentage: Option<u32>,
    /// Percent of each card's compute, 0-100 (100 = exclusive).
    pub cores: u32,
    /// Task priority as given: 0 is high, any other value low (see
    /// docs/annotations.md); `None` when not given.
    pub priority: Option<u32>,
    /// Enflame DRS: a slice count asked for directly (`enflame.com/drs-gcu`);
    /// `None` for every other request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slices: Option<u32>,
}

impl ContainerRequest {
    /// MiB this request takes on a card with `total_mem` MiB.
    pub fn mem_on(&self, total_mem: u64) -> u64 {
        match (self.mem, self.mem_percentage) {
            // u128: a registered size is pod-controlled data, never trusted not to overflow.
            (0, Some(p)) => (u128::from(total_mem) * u128::from(p) / 100) as u64,
            (m, _) => m,
        }
    }
}

/// A resource value that breaks a rule. Names the container, the resource,
/// the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub container: String,
    pub resource: String,
    pub value: String,
    pub rule: String,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "container {:?}: {}={}: {}",
            self.container, self.resource, self.value, self.rule
        )
    }
}

impl std::error::Error for RequestError {}

/// Looks a resource up in limits, then requests, as HAMi does.
pub fn resource_value<'a>(res: &'a ResourceRequirements, name: &str) -> Option<&'a K8sQuantity> {
    let find = |m: &'a Option<BTreeMap<String, K8sQuantity>>| m.as_ref().and_then(|m| m.get(name));
    find(&res.limits).or_else(|| find(&res.requests))
}

/// Parses a whole, non-negative resource value. Kubernetes rejects
/// fractional extended resources, so we do too, with the reason.
pub fn whole_resource(container: &str, name: &str, q: &K8sQuantity) -> Result<u64, RequestError> {
    let err = |rule: String| RequestError {
        container: container.to_string(),
        resource: name.to_string(),
        value: q.0.clone(),
        rule,
    };
    let parsed = Quantity::parse(&q.0).map_err(|e| err(e.reason.to_string()))?;
    if !parsed.is_integer() {
        return Err(err("must be a whole number".into()));
    }
    u64::try_from(parsed.value()).map_err(|_| err("must not be negative".into()))
}

/// True when the container names any resource of this vendor.
pub fn has_nvidia_resources(config: &NvidiaConfig, res: &ResourceRequirements) -> bool {
    config
        .resource_names()
        .iter()
        .any(|n| resource_value(res, n).is_some())
}

/// Parses one container's NVIDIA request. `Ok(None)` when it asks for no
/// cards (no `nvidia.com/gpu`, or 0).
pub fn nvidia_container_request(
    config: &NvidiaConfig,
    container: &Container,
) -> Result<Option<ContainerRequest>, RequestError> {
    let name = container.name.as_str();
    let Some(res) = container.resources.as_ref() else {
        return Ok(None);
    };
    let get = |resource: &str| -> Result<Option<u64>, RequestError> {
        resource_value(res, resource)
            .map(|q| whole_resource(name, resource, q))
            .transpose()
    };
    let err = |resource: &str, value: u64, rule: &str| RequestError {
        container: name.to_string(),
        resource: resource.to_string(),
        value: value.to_string(),
        rule: rule.to_string(),
    };
    let percentage = get(&config.resource_memory_percentage_name)?;
    if let Some(p) = percentage
        && p > 100
    {
        return Err(err(
            &config.resource_memory_percentage_name,
            p,
            "must be 0-100",
        ));
    }
    // HAMi passes any integer on; the interposer reads it as an i32.
    let priority = get(&config.resource_priority_name)?;
    if let Some(p) = priority
        && p > MAX_PRIORITY
    {
        return Err(err(
            &config.resource_priority_name,
            p,
            "must be at most 2147483647 (0 is the highest priority)",
        ));
    }
    let mem = get(&config.resource_memory_name)?;
    let cores = get(&config.resource_core_name)?;
    let nums = match get(&config.resource_count_name)? {
        None | Some(0) => return Ok(None),
        Some(n) => {
            u32::try_from(n).map_err(|_| err(&config.resource_count_name, n, "is too large"))?
        }
    };
    let mut mem = mem
        .unwrap_or(0)
        .checked_mul(config.memory_factor)
        .ok_or_else(|| {
            err(
                &config.resource_memory_name,
                mem.unwrap_or(0),
                "is too large",
            )
        })?;
    // A 0 % request is taken as unset: a 0 MiB limit would mean "no limit"
    // to the interposer, the opposite of what was asked.
    let mut mem_percentage = percentage.filter(|&p| p > 0).map(|p| p as u32);
    if mem == 0 && mem_percentage.is_none() {
        if config.default_memory != 0 {
            mem = config.default_memory;
        } else {
            mem_percentage = Some(100);
        }
    }
    // HAMi clamps rather than rejects: gpucores above 100 means the whole card.
    let cores = cores.map_or(config.default_cores, |c| c.min(100) as u32);
    Ok(Some(ContainerRequest {
        nums,
        vendor: crate::NVIDIA.to_string(),
        mem,
        mem_percentage,
        cores,
        priority: priority.map(|p| p as u32),
        slices: None,
    }))
}

/// The containers of a pod in allocation order: init containers first, then
/// regular containers (the order of `hami.io/vgpu-devices-allocated`).
pub fn containers_in_allocation_order(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    let init = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let main = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    init.iter().chain(main)
}

/// How many of the pod's containers (allocation order) are init containers.
pub fn init_container_count(pod: &Pod) -> usize {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map_or(0, Vec::len)
}

/// Every container's NVIDIA request, in allocation order.
pub fn nvidia_pod_requests(
    config: &NvidiaConfig,
    pod: &Pod,
) -> Result<Vec<Option<ContainerRequest>>, RequestError> {
    containers_in_allocation_order(pod)
        .map(|c| nvidia_container_request(config, c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(limits: &[(&str, &str)], requests: &[(&str, &str)]) -> Container {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), K8sQuantity(v.to_string())))
                    .collect()
            })
        };
        Container {
            name: "main".into(),
            resources: Some(ResourceRequirements {
                limits: map(limits),
                requests: map(requests),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn parse(limits: &[(&str, &str)]) -> Result<Option<ContainerRequest>, RequestError> {
        nvidia_container_request(&NvidiaConfig::default(), &container(limits, &[]))
    }

    #[test]
    fn full_request() {
        let r = parse(&[
            ("nvidia.com/gpu", "2"),
            ("nvidia.com/gpumem", "3000"),
            ("nvidia.com/gpucores", "30"),
            ("nvidia.com/priority", "0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.nums, r.mem, r.mem_percentage, r.cores, r.priority),
            (2, 3000, None, 30, Some(0))
        );
        assert_eq!(r.vendor, "NVIDIA");
    }

    #[test]
    fn defaults_when_memory_not_given() {
        let r = parse(&[("nvidia.com/gpu", "1")]).unwrap().unwrap();
        assert_eq!((r.mem, r.mem_percentage, r.cores), (0, Some(100), 0));
        assert_eq!(r.mem_on(16000), 16000);
        let cfg = NvidiaConfig {
            default_memory: 2000,
            default_cores: 10,
            ..Default::default()
        };
        let r = nvidia_container_request(&cfg, &container(&[("nvidia.com/gpu", "1")], &[]))
            .unwrap()
            .unwrap();
        assert_eq!((r.mem, r.mem_percentage, r.cores), (2000, None, 10));
        let r = parse(&[
            ("nvidia.com/gpu", "1"),
            ("nvidia.com/gpumem-percentage", "25"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((r.mem, r.mem_percentage), (0, Some(25)));
        assert_eq!(r.mem_on(16000), 4000);
    }

    #[test]
    fn memory_factor_and_quantity_forms() {
        let cfg = NvidiaConfig {
            memory_factor: 1024,
            ..Default::default()
        };
        let r = nvidia_container_request(
            &cfg,
            &container(&[("nvidia.com/gpu", "1"), ("nvidia.com/gpumem", "3")], &[]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.mem, 3072);
        let r = parse(&[("nvidia.com/gpu", "1"), ("nvidia.com/gpumem", "3k")])
            .unwrap()
            .unwrap();
        assert_eq!(r.mem, 3000);
    }

    #[test]
    fn limits_win_over_requests() {
        let c = container(
            &[("nvidia.com/gpumem", "2000")],
            &[("nvidia.com/gpu", "1"), ("nvidia.com/gpumem", "9000")],
        );
        let r = nvidia_container_request(&NvidiaConfig::default(), &c)
            .unwrap()
            .unwrap();
        assert_eq!((r.nums, r.mem), (1, 2000));
    }

    #[test]
    fn no_gpu_means_no_request() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&[("nvidia.com/gpumem", "3000")]).unwrap(), None);
        assert_eq!(parse(&[("nvidia.com/gpu", "0")]).unwrap(), None);
        let bare = Container::default();
        assert_eq!(
            nvidia_container_request(&NvidiaConfig::default(), &bare).unwrap(),
            None
        );
    }

    #[test]
    fn any_priority_the_interposer_can_read_is_taken() {
        for p in [0u32, 1, 5, i32::MAX as u32] {
            let r = parse(&[
                ("nvidia.com/gpu", "1"),
                ("nvidia.com/priority", &p.to_string()),
            ])
            .unwrap()
            .unwrap();
            assert_eq!(r.priority, Some(p));
        }
    }

    #[test]
    fn cores_above_100_are_clamped() {
        let r = parse(&[("nvidia.com/gpu", "1"), ("nvidia.com/gpucores", "150")])
            .unwrap()
            .unwrap();
        assert_eq!(r.cores, 100);
    }

    #[test]
    fn bad_values_name_resource_value_and_rule() {
        let e = parse(&[
            ("nvidia.com/gpu", "1"),
            ("nvidia.com/gpumem-percentage", "140"),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "container \"main\": nvidia.com/gpumem-percentage=140: must be 0-100"
        );
        let e = parse(&[("nvidia.com/gpu", "1.5")]).unwrap_err();
        assert_eq!(e.rule, "must be a whole number");
        let e = parse(&[("nvidia.com/gpu", "-1")]).unwrap_err();
        assert_eq!(e.rule, "must not be negative");
        let e = parse(&[
            ("nvidia.com/gpu", "1"),
            ("nvidia.com/priority", "2147483648"),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "container \"main\": nvidia.com/priority=2147483648: must be at most 2147483647 (0 is the highest priority)"
        );
        let e = parse(&[("nvidia.com/gpu", "lots")]).unwrap_err();
        assert_eq!(e.resource, "nvidia.com/gpu");
    }

    proptest::proptest! {
        #[test]
        fn parser_is_total(gpu in ".{0,12}", mem in ".{0,12}", pct in ".{0,8}", cores in ".{0,8}") {
            let _ = parse(&[
                ("nvidia.com/gpu", &gpu),
                ("nvidia.com/gpumem", &mem),
                ("nvidia.com/gpumem-percentage", &pct),
                ("nvidia.com/gpucores", &cores),
            ]);
        }
    }
}
