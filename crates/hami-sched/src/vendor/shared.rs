//! Pieces every backend uses: the card order of the GPU policy, HAMi's
//! shared per-card rule, first-N picking, request parsing with units, card
//! selectors keyed by vendor, and reading node capacity.

use std::collections::BTreeMap;
use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, EnvVar, Node, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;

use hami_api::policy::GpuPolicy;
use hami_api::quantity::Quantity;
use hami_api::request::{resource_value, whole_resource};
use hami_api::{ContainerRequest, RequestError};

use super::{FitPod, FitScratch};
use crate::constraints::{PodConstraints, list};
use crate::reason::{Reason, Rejection};
use crate::score::gpu_score;
use crate::snapshot::{DeviceState, NodeState, Usage};

/// Fills `keyed` with (score, NUMA id, card index) for `cards` in
/// preference order, best LAST: HAMi sorts the cards and takes them from
/// the end. By score (spread: emptiest last, binpack: fullest last; mutex:
/// by slots in use, least used last); among equal scores the higher NUMA
/// id, then the card registered last (HAMi's sort is not stable, so its
/// choice among full ties is not defined; ours is).
pub fn card_order(
    word: &str,
    node: &NodeState,
    cards: Range<usize>,
    used: &[Usage],
    req: &ContainerRequest,
    c: &PodConstraints,
    keyed: &mut Vec<(f64, i32, usize)>,
) {
    keyed.clear();
    let mutex = c.gpu_policy == GpuPolicy::Mutex;
    keyed.extend(cards.map(|i| {
        let d = &node.devices[i];
        let score = if mutex {
            f64::from(used[i].slots)
        } else {
            let request = Usage {
                slots: 1,
                mem: req.mem_on(d.info.devmem),
                cores: req.cores,
            };
            gpu_score(d, used[i], word, request, &c.weights)
        };
        (score, d.info.numa, i)
    }));
    let binpack = c.gpu_policy == GpuPolicy::Binpack;
    let by_score = |a: &(f64, i32, usize), b: &(f64, i32, usize)| {
        if binpack {
            a.0.total_cmp(&b.0)
        } else {
            b.0.total_cmp(&a.0)
        }
    };
    keyed.sort_unstable_by(|a, b| by_score(a, b).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
}

/// Card selectors a vendor reads from its own pod annotation keys.
#[derive(Debug, Default)]
pub struct Selectors {
    use_uuids: Vec<String>,
    nouse_uuids: Vec<String>,
    /// Lower case; a card type must contain one (when non-empty).
    use_types: Vec<String>,
    nouse_types: Vec<String>,
}

impl Selectors {
    /// Reads `(use, no-use)` UUID key pairs and an optional type key pair.
    pub fn read(
        annotations: &BTreeMap<String, String>,
        uuid_keys: &[(String, String)],
        type_keys: Option<&(String, String)>,
    ) -> Selectors {
        let mut s = Selectors::default();
        for (use_key, nouse_key) in uuid_keys {
            s.use_uuids.extend(list(annotations.get(use_key), false));
            s.nouse_uuids
                .extend(list(annotations.get(nouse_key), false));
        }
        if let Some((use_key, nouse_key)) = type_keys {
            s.use_types = list(annotations.get(use_key), true);
            s.nouse_types = list(annotations.get(nouse_key), true);
        }
        s
    }

    pub fn type_allowed(&self, type_lower: &str) -> bool {
        (self.use_types.is_empty() || self.use_types.iter().any(|t| type_lower.contains(t)))
            && !self.nouse_types.iter().any(|t| type_lower.contains(t))
    }

    pub fn uuid_allowed(&self, id: &str) -> bool {
        (self.use_uuids.is_empty() || self.use_uuids.iter().any(|u| u == id))
            && !self.nouse_uuids.iter().any(|u| u == id)
    }
}

/// How a card's compute is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreCheck {
    /// HAMi's shared rule: free compute, exclusive 100, exhausted card.
    Shared,
    /// Only free compute (AMD, whose request becomes compute units).
    FreeOnly,
    /// Compute is not accounted (whole-card and count-only vendors).
    None,
}

/// HAMi's shared per-card rule (docs/design/vendor-formats.md 1.5) for a
/// container taking `mem` MiB and `cores` on the card; `core_total`
/// replaces the card's registered compute where a mode says so.
#[allow(clippy::too_many_arguments)]
pub fn card_rule(
    d: &DeviceState,
    used: Usage,
    mem: u64,
    cores: u32,
    core_total: u32,
    check: CoreCheck,
    selectors: &Selectors,
    mutex: bool,
) -> Result<(), Reason> {
    let info = &d.info;
    if !info.health {
        return Err(Reason::CardNotHealth);
    }
    if d.cordoned {
        return Err(Reason::CardCordoned);
    }
    if !selectors.type_allowed(&d.type_lower) {
        return Err(Reason::CardTypeMismatch);
    }
    if !selectors.uuid_allowed(&info.id) {
        return Err(Reason::CardUuidMismatch);
    }
    if used.slots >= info.count {
        return Err(Reason::CardTimeSlicingExhausted);
    }
    if mutex && used.slots > 0 {
        return Err(Reason::CardInUseMutex);
    }
    if check == CoreCheck::None {
        return Ok(());
    }
    if info.devmem.saturating_sub(used.mem) < mem {
        return Err(Reason::CardInsufficientMemory);
    }
    if core_total.saturating_sub(used.cores) < cores {
        return Err(Reason::CardInsufficientCore);
    }
    if check == CoreCheck::Shared {
        if core_total == 100 && cores == 100 && used.slots > 0 {
            return Err(Reason::ExclusiveDeviceAllocateConflict);
        }
        if core_total != 0 && used.cores >= core_total && cores == 0 {
            return Err(Reason::CardComputeUnitsExhausted);
        }
    }
    Ok(())
}

/// Walks `scratch.keyed` from the end (best card last) and collects every
/// card `fits` accepts into `scratch.fitting`, counting the others'
/// reasons. With `first` set it stops at `first` cards.
pub fn collect_fitting(
    scratch: &mut FitScratch,
    rejection: &mut Rejection,
    first: Option<usize>,
    mut fits: impl FnMut(usize) -> Result<(), Reason>,
) {
    scratch.fitting.clear();
    for &(_, _, i) in scratch.keyed.iter().rev() {
        match fits(i) {
            Ok(()) => {
                scratch.fitting.push(i);
                if first == Some(scratch.fitting.len()) {
                    return;
                }
            }
            Err(reason) => rejection.add(reason, 1),
        }
    }
}

/// The usual multi-card rule: the first `nums` fitting cards in
/// preference order, or the rejection with HAMi's counts.
pub fn pick_first(
    scratch: &mut FitScratch,
    mut rejection: Rejection,
    nums: usize,
    fits: impl FnMut(usize) -> Result<(), Reason>,
) -> Result<(), Rejection> {
    collect_fitting(scratch, &mut rejection, Some(nums), fits);
    scratch.picked.clear();
    if scratch.fitting.len() == nums {
        scratch.picked.extend_from_slice(&scratch.fitting);
        return Ok(());
    }
    if !scratch.fitting.is_empty() {
        rejection.add(
            Reason::AllocatedCardsInsufficientRequest,
            scratch.fitting.len() as u16,
        );
    }
    Err(rejection)
}

/// A rejection for a node without cards of this vendor, or `None`.
pub fn no_cards(cards: &Range<usize>) -> Option<Rejection> {
    cards.is_empty().then(|| {
        let mut r = Rejection::for_cards(0);
        r.add(Reason::NodeInsufficientDevice, 1);
        r
    })
}

/// The constraints-level mutex policy flag.
pub fn is_mutex(pod: &FitPod<'_>) -> bool {
    pod.constraints.gpu_policy == GpuPolicy::Mutex
}

/// Where a vendor reads a container's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `limits`, falling back to `requests` (most vendors).
    LimitsThenRequests,
    /// `limits` only (AMD, MetaX sGPU).
    Limits,
}

/// Reads a whole, non-negative resource value of a container.
pub fn read_whole(
    container: &Container,
    source: Source,
    name: &str,
) -> Result<Option<u64>, RequestError> {
    if name.is_empty() {
        return Ok(None);
    }
    let Some(res) = container.resources.as_ref() else {
        return Ok(None);
    };
    let q = match source {
        Source::LimitsThenRequests => resource_value(res, name),
        Source::Limits => res.limits.as_ref().and_then(|l| l.get(name)),
    };
    q.map(|q| whole_resource(&container.name, name, q))
        .transpose()
}

/// Reads a quantity in bytes-or-units form (`4` or `2Gi`) of a container.
pub fn read_quantity(
    container: &Container,
    source: Source,
    name: &str,
) -> Result<Option<Quantity>, RequestError> {
    let Some(res) = container.resources.as_ref() else {
        return Ok(None);
    };
    let q = match source {
        Source::LimitsThenRequests => resource_value(res, name),
        Source::Limits => res.limits.as_ref().and_then(|l| l.get(name)),
    };
    q.map(|q| {
        Quantity::parse(&q.0).map_err(|e| RequestError {
            container: container.name.clone(),
            resource: name.to_string(),
            value: q.0.clone(),
            rule: e.reason.to_string(),
        })
    })
    .transpose()
}

/// A request error for one container's value.
pub fn bad_value(container: &Container, resource: &str, value: u64, rule: &str) -> RequestError {
    RequestError {
        container: container.name.clone(),
        resource: resource.to_string(),
        value: value.to_string(),
        rule: rule.to_string(),
    }
}

/// A count value as HAMi takes it: 1 to 2^31-1; `None` for 0.
pub fn count_of(
    container: &Container,
    resource: &str,
    n: u64,
) -> Result<Option<u32>, RequestError> {
    match n {
        0 => Ok(None),
        n if n > i32::MAX as u64 => Err(bad_value(
            container,
            resource,
            n,
            "must be at most 2147483647",
        )),
        n => Ok(Some(n as u32)),
    }
}

/// Every container of a pod in allocation order (init containers first).
pub fn containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .chain(spec.map(|s| s.containers.as_slice()).unwrap_or_default())
}

/// Parses every container with `one`.
pub fn each_container(
    pod: &Pod,
    mut one: impl FnMut(&Container) -> Result<Option<ContainerRequest>, RequestError>,
) -> Result<Vec<Option<ContainerRequest>>, RequestError> {
    containers(pod).map(&mut one).collect()
}

/// A node's capacity of `resource`, 0 when absent or malformed.
pub fn capacity(node: &Node, resource: &str) -> u64 {
    node.status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get(resource))
        .and_then(|q| Quantity::parse(&q.0).ok())
        .map(|q| q.value().max(0) as u64)
        .unwrap_or(0)
}

/// Whether `limits` names `resource`.
pub fn in_limits(res: Option<&ResourceRequirements>, resource: &str) -> bool {
    !resource.is_empty()
        && res
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key(resource))
}

/// Sets a limit (and the request, when the container has one) to `value`.
pub fn set_limit(container: &mut Container, resource: &str, value: u64, also_requests: bool) {
    let res = container.resources.get_or_insert_with(Default::default);
    res.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(resource.to_string(), K8sQuantity(value.to_string()));
    if also_requests {
        res.requests
            .get_or_insert_with(BTreeMap::new)
            .insert(resource.to_string(), K8sQuantity(value.to_string()));
    }
}

/// Sets one variable, replacing the container's own value (no duplicates).
pub fn set_env(c: &mut Container, name: &str, value: String) {
    let vars = c.env.get_or_insert_with(Vec::new);
    match vars.iter_mut().find(|e| e.name == name) {
        Some(e) => {
            e.value = Some(value);
            e.value_from = None;
        }
        None => vars.push(EnvVar {
            name: name.to_string(),
            value: Some(value),
            value_from: None,
        }),
    }
}

/// The card index at the end of a synthesised id (`<node>-<infix>-<i>`).
pub fn index_suffix(id: &str) -> Option<u32> {
    id.rsplit('-').next()?.parse().ok()
}
