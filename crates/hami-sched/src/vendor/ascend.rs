//! Huawei Ascend NPUs, one backend per chip model (`vnpus.configs`): vNPU
//! templates in hard-split mode, MiB and percent in soft-split mode
//! (hami-vnpu-core), and the 910C's NPU pairs. Facts in
//! docs/design/vendor-formats.md section 2.1.

use std::collections::BTreeMap;
use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, Node, Pod};

use hami_api::device::decode_devices;
use hami_api::policy::NodePolicy;
use hami_api::vendor_config::{AscendChip, VnpuTemplate};
use hami_api::{ContainerRequest, DecodeError, DeviceInfo, RequestError};

use super::shared::{
    CoreCheck, Selectors, Source, bad_value, card_order, card_rule, collect_fitting, count_of,
    in_limits, is_mutex, no_cards, pick_first, read_whole, set_env, set_limit,
};
use super::{FitPod, FitScratch, Placed, Vendor};
use crate::admission::ContainerAdmission;
use crate::reason::{Reason, Rejection};
use crate::snapshot::{NodeDevices, NodeState, Usage};

/// The NPU's network group (`custominfo.NetworkID`, written by HAMi's
/// Ascend plugin for 910 chips).
fn network_id(card: &DeviceInfo) -> Option<i64> {
    let id = card.custom_info.as_ref()?.get("NetworkID")?;
    id.as_i64().or_else(|| id.as_f64().map(|f| f as i64))
}

/// Pod annotation choosing soft split (`hami-core`).
pub const VNPU_MODE: &str = "huawei.com/vnpu-mode";
/// Node annotation: `"true"` when the node runs hami-vnpu-core.
pub const NODE_VNPU_CORE: &str = "hami-vnpu-core";

/// One Ascend chip model.
#[derive(Debug, Clone, PartialEq)]
pub struct Ascend {
    pub chip: AscendChip,
    /// Soft split on nodes that do not say (`vnpus.hamiVnpuCore`).
    pub soft_by_default: bool,
    /// The count resource of every configured chip: `overwriteEnv` blanks
    /// `ASCEND_VISIBLE_DEVICES` only in containers that ask for none.
    every_chip_resource: Vec<String>,
    register: String,
    handshake: String,
    to_allocate: String,
    allocated: String,
    plugin_key: String,
}

fn soft_pod(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(VNPU_MODE))
        .is_some_and(|m| m == "hami-core")
}

impl Ascend {
    pub fn new(
        mut chip: AscendChip,
        soft_by_default: bool,
        every_chip_resource: Vec<String>,
    ) -> Ascend {
        chip.templates.sort_by_key(|t| t.memory);
        let w = chip.common_word.clone();
        Ascend {
            chip,
            soft_by_default,
            every_chip_resource,
            register: format!("hami.io/node-register-{w}"),
            handshake: format!("hami.io/node-handshake-{w}"),
            to_allocate: format!("hami.io/{w}-devices-to-allocate"),
            allocated: format!("hami.io/{w}-devices-allocated"),
            plugin_key: format!("huawei.com/{w}"),
        }
    }

    /// Hard split: the smallest template holding `mib`; above the largest
    /// template, the whole chip. `None` above the chip's capacity.
    pub fn round(&self, mib: u64) -> Option<(u64, Option<&VnpuTemplate>)> {
        if mib > self.chip.memory_capacity {
            return None;
        }
        Some(match self.chip.templates.iter().find(|t| t.memory >= mib) {
            Some(t) => (t.memory, Some(t)),
            None => (self.chip.memory_allocatable, None),
        })
    }

    /// Cards a container's count asks for: 910C NPUs come in pairs.
    fn effective_count(&self, n: u32) -> u32 {
        if self.chip.super_pod && n == 1 { 2 } else { n }
    }

    fn container_request(
        &self,
        c: &Container,
        soft: bool,
    ) -> Result<Option<ContainerRequest>, RequestError> {
        let src = Source::LimitsThenRequests;
        let Some(n) = read_whole(c, src, &self.chip.resource_name)? else {
            return Ok(None);
        };
        let Some(nums) = count_of(c, &self.chip.resource_name, n)? else {
            return Ok(None);
        };
        let factor = self.chip.memory_factor.max(1);
        let mem = match read_whole(c, src, &self.chip.resource_memory_name)? {
            None => None,
            Some(m) => {
                let m = m.checked_mul(factor).ok_or_else(|| {
                    bad_value(c, &self.chip.resource_memory_name, m, "is too large")
                })?;
                if soft {
                    Some(m)
                } else {
                    let (rounded, _) = self.round(m).ok_or_else(|| {
                        bad_value(
                            c,
                            &self.chip.resource_memory_name,
                            m,
                            &format!("is more than the chip's {} MiB", self.chip.memory_capacity),
                        )
                    })?;
                    Some(rounded)
                }
            }
        };
        let cores = read_whole(c, src, &self.chip.resource_core_name)?.unwrap_or(0);
        Ok(Some(ContainerRequest {
            nums: self.effective_count(nums),
            vendor: self.chip.common_word.clone(),
            mem: mem.unwrap_or(0),
            mem_percentage: if mem.is_none() { Some(100) } else { None },
            cores: cores.min(100) as u32,
            priority: None,
            slices: None,
        }))
    }

    /// The template a hard-split allocation of `mib` uses (none for a whole chip).
    fn template_of(&self, mib: u64) -> Option<&VnpuTemplate> {
        if mib >= self.chip.memory_allocatable {
            return None;
        }
        self.chip.templates.iter().find(|t| t.memory == mib)
    }
}

impl Vendor for Ascend {
    fn word(&self) -> &str {
        &self.chip.common_word
    }

    fn allocation_annotations(&self) -> (Option<&str>, &str) {
        (Some(&self.to_allocate), &self.allocated)
    }

    fn register_key(&self) -> Option<&str> {
        Some(&self.register)
    }

    fn handshake_key(&self) -> Option<&str> {
        Some(&self.handshake)
    }

    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError> {
        let annotations = node.metadata.annotations.as_ref();
        let Some(value) = annotations.and_then(|a| a.get(&self.register)) else {
            return Ok(None);
        };
        let devices = decode_devices(&self.register, value)?;
        if devices.is_empty() {
            return Err(DecodeError::new(&self.register, value, "lists no device"));
        }
        let soft_split = match annotations.and_then(|a| a.get(NODE_VNPU_CORE)) {
            Some(v) => v == "true",
            None => self.soft_by_default,
        };
        Ok(Some(NodeDevices {
            devices,
            soft_split,
            ..Default::default()
        }))
    }

    fn pod_requests(&self, pod: &Pod) -> Result<Vec<Option<ContainerRequest>>, RequestError> {
        let soft = soft_pod(pod.metadata.annotations.as_ref());
        super::shared::each_container(pod, |c| self.container_request(c, soft))
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
        let mut rejection = Rejection::for_cards(cards.len());
        let soft = soft_pod(Some(pod.annotations));
        if soft && !node.soft_split {
            rejection.add(Reason::ModeNotFit, 1);
            return Err(rejection);
        }
        let w = &self.chip.common_word;
        let keys = [(
            format!("hami.io/use-{w}-uuid"),
            format!("hami.io/no-use-{w}-uuid"),
        )];
        let selectors = Selectors::read(pod.annotations, &keys, None);
        card_order(
            w,
            node,
            cards.clone(),
            used,
            req,
            pod.constraints,
            &mut scratch.keyed,
        );
        let mutex = is_mutex(pod);
        let fits = |i: usize| {
            let d = &node.devices[i];
            let core_total = if soft { 100 } else { d.info.devcore };
            card_rule(
                d,
                used[i],
                req.mem_on(d.info.devmem),
                req.cores,
                core_total,
                CoreCheck::Shared,
                &selectors,
                mutex,
            )
        };
        let nums = req.nums as usize;
        let topology = self.chip.common_word.starts_with("Ascend910")
            && node.devices[cards.clone()]
                .iter()
                .all(|d| network_id(&d.info).is_some());
        if topology && !(self.chip.super_pod && nums > 1) {
            // NPUs of one network group first: the largest groups, in
            // preference order, filled in preference order.
            collect_fitting(scratch, &mut rejection, None, fits);
            scratch.picked.clear();
            if scratch.fitting.len() < nums {
                if !scratch.fitting.is_empty() {
                    rejection.add(
                        Reason::AllocatedCardsInsufficientRequest,
                        scratch.fitting.len() as u16,
                    );
                }
                return Err(rejection);
            }
            let mut groups: Vec<(i64, Vec<usize>)> = Vec::new();
            for &i in &scratch.fitting {
                let id = network_id(&node.devices[i].info).unwrap_or_default();
                match groups.iter_mut().find(|g| g.0 == id) {
                    Some(g) => g.1.push(i),
                    None => groups.push((id, vec![i])),
                }
            }
            if nums > 1 {
                groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
            }
            scratch
                .picked
                .extend(groups.iter().flat_map(|g| g.1.iter().copied()).take(nums));
            return Ok(());
        }
        if !(self.chip.super_pod && nums > 1) {
            return pick_first(scratch, rejection, nums, fits);
        }
        // 910C: whole modules (NPUs 2k and 2k+1) only, best module first.
        collect_fitting(scratch, &mut rejection, None, fits);
        let module = |i: usize| node.devices[i].info.index / 2;
        scratch.picked.clear();
        for &i in &scratch.fitting {
            if scratch.picked.len() == nums {
                break;
            }
            if scratch.picked.contains(&i) {
                continue;
            }
            let partner = scratch
                .fitting
                .iter()
                .copied()
                .find(|&j| j != i && module(j) == module(i));
            if let Some(j) = partner {
                scratch.picked.extend([i, j]);
            }
        }
        if scratch.picked.len() == nums {
            return Ok(());
        }
        rejection.add(
            Reason::AllocatedCardsInsufficientRequest,
            scratch.fitting.len().max(1) as u16,
        );
        scratch.picked.clear();
        Err(rejection)
    }

    fn count_resource(&self) -> &str {
        &self.chip.resource_name
    }

    fn scores_nodes(&self) -> bool {
        self.chip.common_word.starts_with("Ascend910")
    }

    /// Per container, the share of its NPUs in its largest network group,
    /// summed, times 10; 0 when an NPU has no network group.
    fn node_score(&self, node: &NodeState, cards: &[Vec<usize>], _policy: NodePolicy) -> f64 {
        let mut total = 0.0;
        for container in cards.iter().filter(|c| !c.is_empty()) {
            let ids: Option<Vec<i64>> = container
                .iter()
                .map(|&i| network_id(&node.devices[i].info))
                .collect();
            let Some(ids) = ids else {
                return 0.0;
            };
            let largest = ids
                .iter()
                .map(|id| ids.iter().filter(|x| *x == id).count())
                .max()
                .unwrap_or(0);
            total += largest as f64 / ids.len() as f64;
        }
        total * 10.0
    }

    fn admit_container(
        &self,
        c: &mut Container,
        pod_annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAdmission, String> {
        let chip = &self.chip;
        let before = c.clone();
        let res = c.resources.as_ref();
        if !in_limits(res, &chip.resource_name) {
            // HAMi blanks it also in containers of another Ascend chip,
            // which would hide the NPUs their plugin hands them.
            if chip.overwrite_env && !self.every_chip_resource.iter().any(|r| in_limits(res, r)) {
                set_env(c, "ASCEND_VISIBLE_DEVICES", String::new());
            }
            return Ok(ContainerAdmission {
                managed: false,
                changed: *c != before,
            });
        }
        let soft = soft_pod(Some(pod_annotations));
        let err = |e: RequestError| e.to_string();
        let asked = read_whole(c, Source::Limits, &chip.resource_name)
            .map_err(err)?
            .unwrap_or(0);
        if asked == 0 {
            return Ok(ContainerAdmission::default());
        }
        if chip.super_pod {
            if asked == 1 {
                let in_requests = c
                    .resources
                    .as_ref()
                    .and_then(|r| r.requests.as_ref())
                    .is_some_and(|r| r.contains_key(&chip.resource_name));
                set_limit(c, &chip.resource_name, 2, in_requests);
            } else if asked % 2 == 1 {
                return Err(format!(
                    "container {:?}: {}={asked}: {} NPUs come in pairs, ask for 1 or an even number",
                    c.name, chip.resource_name, chip.common_word
                ));
            }
        }
        let cores = read_whole(c, Source::LimitsThenRequests, &chip.resource_core_name)
            .map_err(err)?
            .unwrap_or(0);
        if !soft && cores > 0 {
            return Err(format!(
                "container {:?}: {}={cores}: compute shares need soft split (pod annotation {VNPU_MODE}: hami-core)",
                c.name, chip.resource_core_name
            ));
        }
        let memory = match read_whole(c, Source::LimitsThenRequests, &chip.resource_memory_name)
            .map_err(err)?
        {
            None => chip.memory_allocatable,
            Some(m) if soft && m <= chip.memory_capacity => m,
            Some(m) => match self.round(m) {
                Some((rounded, _)) if !soft => rounded,
                _ => {
                    return Err(format!(
                        "container {:?}: {}={m}: more than the chip's {} MiB",
                        c.name, chip.resource_memory_name, chip.memory_capacity
                    ));
                }
            },
        };
        if !soft && asked > 1 && memory != chip.memory_allocatable {
            return Err(format!(
                "container {:?}: {}={asked} with {}={memory}: vNPU templates are for one NPU; several NPUs are whole NPUs (leave the memory out)",
                c.name, chip.resource_name, chip.resource_memory_name
            ));
        }
        set_limit(c, &chip.resource_memory_name, memory, true);
        self.container_request(c, soft).map_err(err)?;
        Ok(ContainerAdmission {
            managed: true,
            changed: *c != before,
        })
    }

    fn admit_gpu_pod(&self, pod: &mut Pod) -> Result<(), String> {
        let asks = super::shared::containers(pod)
            .any(|c| in_limits(c.resources.as_ref(), &self.chip.resource_name));
        if let Some(spec) = pod.spec.as_mut()
            && asks
            && !self.chip.runtime_class_name.is_empty()
            && spec.runtime_class_name.is_none()
        {
            spec.runtime_class_name = Some(self.chip.runtime_class_name.clone());
        }
        Ok(())
    }

    fn plugin_annotations(&self, placed: &Placed<'_>) -> Vec<(String, String)> {
        let (devices, now_ns) = (placed.devices, placed.now_ns);
        let cards: Vec<serde_json::Value> = devices
            .devices()
            .map(|d| {
                let mut o = serde_json::Map::new();
                o.insert("UUID".into(), d.uuid.clone().into());
                // Hard split records template sizes and no compute.
                if d.cores == 0
                    && let Some(t) = self.template_of(d.mem)
                {
                    o.insert("temp".into(), t.name.clone().into());
                }
                if d.mem > 0 {
                    o.insert("memory".into(), d.mem.into());
                }
                if d.cores > 0 {
                    o.insert("core".into(), d.cores.into());
                }
                serde_json::Value::Object(o)
            })
            .collect();
        vec![
            (
                self.plugin_key.clone(),
                serde_json::Value::Array(cards).to_string(),
            ),
            (
                "predicate-time".into(),
                (now_ns / 1_000_000_000).to_string(),
            ),
        ]
    }

    fn plugin_annotation_keys(&self) -> Vec<String> {
        vec![self.plugin_key.clone(), "predicate-time".into()]
    }
}
