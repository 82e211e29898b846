//! The NVIDIA backend: HAMi's fit rules, selectors, NUMA binding, mutex and
//! topology-aware placement, and the webhook's mutations (spec sections 5-6).

use std::collections::BTreeMap;

use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;

use hami_api::annotations as ann;
use hami_api::config::{GpuCorePolicy, NvidiaConfig};
use hami_api::device::decode_devices;
use hami_api::node::decode_cordon;
use hami_api::policy::GpuPolicy;
use hami_api::request::{
    has_nvidia_resources, nvidia_container_request, nvidia_pod_requests, resource_value,
    whole_resource,
};
use hami_api::topology::{decode_pair_scores, pair_score};
use hami_api::{ContainerRequest, DecodeError, NVIDIA, RequestError};

use super::shared::{card_order, no_cards, set_env};
use super::{FitPod, FitScratch, Vendor};
use crate::admission::ContainerAdmission;
use crate::constraints::PodConstraints;
use crate::reason::{Reason, Rejection};
use crate::snapshot::{NodeDevices, NodeState, Usage};

/// Largest fitting set searched exhaustively by topology-aware placement.
const TOPOLOGY_EXACT_LIMIT: usize = 16;

/// NVIDIA cards shared through the interposer (or MIG/MPS).
#[derive(Debug, Clone, Default)]
pub struct Nvidia {
    pub config: NvidiaConfig,
}

impl Nvidia {
    pub fn new(config: NvidiaConfig) -> Nvidia {
        Nvidia { config }
    }
}

impl Vendor for Nvidia {
    fn word(&self) -> &str {
        NVIDIA
    }

    fn allocation_annotations(&self) -> (Option<&str>, &str) {
        (
            Some(ann::NVIDIA_DEVICES_TO_ALLOCATE),
            ann::NVIDIA_DEVICES_ALLOCATED,
        )
    }

    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError> {
        let Some(annotations) = node.metadata.annotations.as_ref() else {
            return Ok(None);
        };
        let Some(register) = annotations.get(ann::NODE_NVIDIA_REGISTER) else {
            return Ok(None);
        };
        let devices = decode_devices(ann::NODE_NVIDIA_REGISTER, register)?;
        let cordoned = annotations
            .get(ann::DEVICE_CORDON)
            .map(|v| decode_cordon(v))
            .unwrap_or_default();
        // Link scores only refine topology-aware placement: a malformed
        // value costs that refinement, not the node (`hami decode` shows why).
        let pair_scores = annotations
            .get(ann::NODE_NVIDIA_SCORE)
            .and_then(|v| decode_pair_scores(ann::NODE_NVIDIA_SCORE, v).ok())
            .unwrap_or_default();
        Ok(Some(NodeDevices {
            devices,
            cordoned,
            pair_scores,
            ..Default::default()
        }))
    }

    fn pod_requests(&self, pod: &Pod) -> Result<Vec<Option<ContainerRequest>>, RequestError> {
        nvidia_pod_requests(&self.config, pod)
    }

    fn fit_container(
        &self,
        node: &NodeState,
        cards: Range<usize>,
        used: &[Usage],
        req: &ContainerRequest,
        pod: &FitPod<'_>,
        scratch: &mut FitScratch,
    ) -> Result<(), Rejection> {
        if let Some(r) = no_cards(&cards) {
            return Err(r);
        }
        let c = pod.constraints;
        let FitScratch {
            keyed,
            fitting,
            picked: out,
        } = scratch;
        out.clear();
        fitting.clear();
        let nums = req.nums as usize;
        let mut rejection = Rejection::for_cards(cards.len());
        card_order(self.word(), node, cards.clone(), used, req, c, keyed);
        let collect_all = c.numa_bind || (c.gpu_policy == GpuPolicy::TopologyAware);
        for &(_, _, i) in keyed.iter().rev() {
            if let Err(reason) = card_fits(node, i, used[i], req, c) {
                rejection.add(reason, 1);
                continue;
            }
            if !collect_all {
                out.push(i);
                if out.len() == nums {
                    return Ok(());
                }
                continue;
            }
            fitting.push(i);
            if c.numa_bind && c.gpu_policy != GpuPolicy::TopologyAware {
                let numa = node.devices[i].info.numa;
                let same = |j: &&usize| node.devices[**j].info.numa == numa;
                if fitting.iter().filter(same).count() == nums {
                    out.extend(fitting.iter().filter(same));
                    return Ok(());
                }
            }
        }
        if c.gpu_policy == GpuPolicy::TopologyAware && fitting.len() >= nums {
            let groups: Vec<Vec<usize>> = if c.numa_bind {
                numa_groups(node, fitting)
            } else {
                vec![fitting.clone()]
            };
            let best = groups
                .iter()
                .filter(|g| g.len() >= nums)
                .map(|g| best_linked_set(node, cards.clone(), g, nums, used))
                .max_by(|a, b| a.0.cmp(&b.0).then(std::cmp::Ordering::Greater));
            if let Some((_, set)) = best {
                *out = set;
                return Ok(());
            }
        }
        let found = if collect_all {
            fitting.len()
        } else {
            out.len()
        };
        if c.numa_bind && found >= nums {
            rejection.add(Reason::NumaNotFit, found as u16);
        } else if found > 0 {
            rejection.add(Reason::AllocatedCardsInsufficientRequest, found as u16);
        }
        out.clear();
        Err(rejection)
    }

    fn container_fits_unordered(
        &self,
        node: &NodeState,
        cards: Range<usize>,
        req: &ContainerRequest,
        pod: &FitPod<'_>,
    ) -> Option<Result<(), Rejection>> {
        // NUMA binding and topology choose among fitting cards; only then
        // does the order matter. Otherwise a container fits when enough
        // cards pass, and a rejection counts every card either way.
        let c = pod.constraints;
        if c.numa_bind || c.gpu_policy == GpuPolicy::TopologyAware || cards.is_empty() {
            return None;
        }
        let mut rejection = Rejection::for_cards(cards.len());
        let mut passing = 0usize;
        for i in cards {
            match card_fits(node, i, node.devices[i].used, req, c) {
                Ok(()) => passing += 1,
                Err(reason) => rejection.add(reason, 1),
            }
        }
        if passing >= req.nums as usize {
            return Some(Ok(()));
        }
        if passing > 0 {
            rejection.add(Reason::AllocatedCardsInsufficientRequest, passing as u16);
        }
        Some(Err(rejection))
    }

    fn count_resource(&self) -> &str {
        &self.config.resource_count_name
    }

    fn admit_container(
        &self,
        container: &mut Container,
        _pod_annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAdmission, String> {
        let before = container.clone();
        let managed = admit_container(&self.config, container)?;
        if !managed && self.config.overwrite_env {
            set_env(container, "NVIDIA_VISIBLE_DEVICES", "none".into());
        }
        Ok(ContainerAdmission {
            managed,
            changed: *container != before,
        })
    }

    fn admit_gpu_pod(&self, pod: &mut Pod) -> Result<(), String> {
        let asks = super::shared::containers(pod).any(|c| {
            c.resources
                .as_ref()
                .is_some_and(|r| has_nvidia_resources(&self.config, r))
        });
        // A runtime class the user chose is kept, as upstream does.
        if let Some(spec) = pod.spec.as_mut()
            && asks
            && !self.config.runtime_class_name.is_empty()
            && spec.runtime_class_name.is_none()
        {
            spec.runtime_class_name = Some(self.config.runtime_class_name.clone());
        }
        Ok(())
    }

    fn admission_env(&self) -> Vec<(&'static str, String)> {
        core_policy_env(&self.config).into_iter().collect()
    }
}

/// The rules of spec section 6 for one card, in HAMi's order.
fn card_fits(
    node: &NodeState,
    i: usize,
    used: Usage,
    req: &ContainerRequest,
    c: &PodConstraints,
) -> Result<(), Reason> {
    let d = &node.devices[i];
    let info = &d.info;
    if !info.health {
        return Err(Reason::CardNotHealth);
    }
    if d.cordoned {
        return Err(Reason::CardCordoned);
    }
    if !c.type_allowed(&d.type_lower) {
        return Err(Reason::CardTypeMismatch);
    }
    if let Some(mode) = c.mode
        && info.mode() != mode
    {
        return Err(Reason::CardModeMismatch);
    }
    if !c.uuid_allowed(&info.id) {
        return Err(Reason::CardUuidMismatch);
    }
    if used.slots >= info.count {
        return Err(Reason::CardTimeSlicingExhausted);
    }
    if info.devmem.saturating_sub(used.mem) < req.mem_on(info.devmem) {
        return Err(Reason::CardInsufficientMemory);
    }
    if info.devcore.saturating_sub(used.cores) < req.cores {
        return Err(Reason::CardInsufficientCore);
    }
    if info.devcore == 100 && req.cores == 100 && used.slots > 0 {
        return Err(Reason::ExclusiveDeviceAllocateConflict);
    }
    if info.devcore != 0 && used.cores >= info.devcore && req.cores == 0 {
        return Err(Reason::CardComputeUnitsExhausted);
    }
    if c.gpu_policy == GpuPolicy::Mutex && used.slots > 0 {
        return Err(Reason::CardInUseMutex);
    }
    Ok(())
}

/// Splits fitting cards by NUMA node, keeping their preference order.
fn numa_groups(node: &NodeState, fitting: &[usize]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(i32, Vec<usize>)> = Vec::new();
    for &i in fitting {
        let numa = node.devices[i].info.numa;
        match groups.iter_mut().find(|g| g.0 == numa) {
            Some(g) => g.1.push(i),
            None => groups.push((numa, vec![i])),
        }
    }
    groups.into_iter().map(|g| g.1).collect()
}

/// The `nums` cards of `candidates` (preference order) with the highest sum
/// of pair scores; for one card, the card with the weakest links to the
/// other free cards, which keeps well-linked sets whole for later pods.
/// Ties go to the set that comes first in preference order. Returns (links, set).
fn best_linked_set(
    node: &NodeState,
    cards: Range<usize>,
    candidates: &[usize],
    nums: usize,
    used: &[Usage],
) -> (i64, Vec<usize>) {
    let link = |a: usize, b: usize| {
        pair_score(
            &node.pair_scores,
            &node.devices[a].info.id,
            &node.devices[b].info.id,
        )
    };
    if nums == 1 {
        let free: Vec<usize> = cards
            .filter(|&j| used[j].slots == 0 && node.devices[j].usable())
            .collect();
        let mut best: Option<(i64, usize)> = None;
        for &i in candidates {
            let links: i64 = free.iter().filter(|&&j| j != i).map(|&j| link(i, j)).sum();
            if best.is_none_or(|(b, _)| links < b) {
                best = Some((links, i));
            }
        }
        let (links, i) = best.expect("candidates is not empty");
        return (-links, vec![i]);
    }
    let n = candidates.len();
    let matrix: Vec<Vec<i64>> = (0..n)
        .map(|a| {
            (0..n)
                .map(|b| {
                    if a == b {
                        0
                    } else {
                        link(candidates[a], candidates[b])
                    }
                })
                .collect()
        })
        .collect();
    let set_score = |set: &[usize]| -> i64 {
        let mut s = 0;
        for (x, &a) in set.iter().enumerate() {
            for &b in &set[x + 1..] {
                s += matrix[a][b];
            }
        }
        s
    };
    let chosen: Vec<usize> = if n <= TOPOLOGY_EXACT_LIMIT {
        let mut best: Option<(i64, Vec<usize>)> = None;
        let mut comb: Vec<usize> = (0..nums).collect();
        loop {
            let s = set_score(&comb);
            if best.as_ref().is_none_or(|(b, _)| s > *b) {
                best = Some((s, comb.clone()));
            }
            // Next combination in lexicographic order.
            let Some(k) = (0..nums).rev().find(|&k| comb[k] < n - nums + k) else {
                break;
            };
            comb[k] += 1;
            for j in k + 1..nums {
                comb[j] = comb[j - 1] + 1;
            }
        }
        best.expect("at least one combination").1
    } else {
        // Greedy: grow from the preferred card by the strongest total link.
        let mut set = vec![0];
        while set.len() < nums {
            let next = (0..n)
                .filter(|x| !set.contains(x))
                .max_by(|&a, &b| {
                    let la: i64 = set.iter().map(|&s| matrix[s][a]).sum();
                    let lb: i64 = set.iter().map(|&s| matrix[s][b]).sum();
                    la.cmp(&lb).then(b.cmp(&a))
                })
                .expect("enough candidates");
            set.push(next);
        }
        set
    };
    let score = set_score(&chosen);
    (score, chosen.into_iter().map(|x| candidates[x]).collect())
}

/// `GPU_CORE_UTILIZATION_POLICY` as the webhook sets it, when the
/// configured policy is not the default.
fn core_policy_env(config: &NvidiaConfig) -> Option<(&'static str, String)> {
    (config.gpu_core_policy != GpuCorePolicy::Default).then(|| {
        (
            "GPU_CORE_UTILIZATION_POLICY",
            config.gpu_core_policy.as_str().to_string(),
        )
    })
}

/// Returns whether the container asks for NVIDIA resources; `Err` denies the pod.
fn admit_container(config: &NvidiaConfig, c: &mut Container) -> Result<bool, String> {
    let Some(res) = c.resources.as_ref() else {
        return Ok(false);
    };
    if !has_nvidia_resources(config, res) {
        return Ok(false);
    }
    let has = |name: &str| resource_value(res, name).is_some();
    let has_count = has(&config.resource_count_name);
    let has_mem = has(&config.resource_memory_name);
    let has_pct = has(&config.resource_memory_percentage_name);
    let has_cores = has(&config.resource_core_name);
    let pct_is_100 = match resource_value(res, &config.resource_memory_percentage_name) {
        Some(q) => {
            whole_resource(&c.name, &config.resource_memory_percentage_name, q)
                .map_err(|e| e.to_string())?
                == 100
        }
        None => false,
    };
    let mut added: Vec<(String, String)> = Vec::new();
    // defaultGPUNum 0 turns the default off: no `nvidia.com/gpu: 0` is added.
    if !has_count && config.default_gpu_num > 0 && (has_mem || has_pct || has_cores) {
        added.push((
            config.resource_count_name.clone(),
            config.default_gpu_num.to_string(),
        ));
    }
    let gets_count = has_count || !added.is_empty();
    if gets_count && !has_cores && (pct_is_100 || (!has_mem && !has_pct)) {
        added.push((config.resource_core_name.clone(), "100".to_string()));
    }
    if !added.is_empty() {
        let limits = c
            .resources
            .get_or_insert_with(Default::default)
            .limits
            .get_or_insert_with(BTreeMap::new);
        for (k, v) in added {
            limits.insert(k, K8sQuantity(v));
        }
    }
    // Validates every value (whole numbers, ranges) with the one parser.
    let Some(request) = nvidia_container_request(config, c).map_err(|e| e.to_string())? else {
        // Names a vendor resource but asks for no card (e.g. `nvidia.com/gpu: 0`):
        // nothing for us to schedule, as upstream decides.
        return Ok(false);
    };
    if let Some(p) = request.priority {
        set_env(c, "CUDA_TASK_PRIORITY", p.to_string());
    }
    if let Some((name, value)) = core_policy_env(config) {
        set_env(c, name, value);
    }
    Ok(true)
}
