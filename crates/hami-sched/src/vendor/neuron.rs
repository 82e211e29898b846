//! AWS Neuron (Trainium, Inferentia): whole devices, or NeuronCores of one
//! device, from node capacity. Facts in docs/design/vendor-formats.md 2.13.
//!
//! A device's compute is a bit mask of its cores (3 for two cores); a
//! container's entry records the mask it was given. Masks given on one
//! device never overlap, so the engine's sums of them are their union.

use std::collections::BTreeMap;
use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, Node, Pod};

use hami_api::vendor_config::ResourceNames;
use hami_api::{ContainerRequest, DecodeError, DeviceInfo, RequestError};

use super::shared::{
    Selectors, Source, bad_value, capacity, card_order, count_of, each_container, in_limits,
    index_suffix, is_mutex, no_cards, read_whole,
};
use super::{FitPod, FitScratch, Placed, Vendor};
use crate::admission::ContainerAdmission;
use crate::reason::{Reason, Rejection};
use crate::snapshot::{NodeDevices, NodeState, Usage};

const WORD: &str = "AWSNeuron";
/// The node label naming the instance type.
const INSTANCE_TYPE: &str = "node.kubernetes.io/instance-type";
/// Cores a core-style request may take on one device.
const MAX_CORES_PER_DEVICE: u32 = 2;

/// AWS Neuron devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Neuron {
    pub names: ResourceNames,
}

impl Neuron {
    pub fn new(names: ResourceNames) -> Neuron {
        Neuron { names }
    }

    /// Device style: `cores` 0 (the whole device). Core style: 1 or 2
    /// cores on each of `nums` devices.
    fn container_request(&self, c: &Container) -> Result<Option<ContainerRequest>, RequestError> {
        let src = Source::LimitsThenRequests;
        let request = |nums: u32, cores: u32| ContainerRequest {
            nums,
            vendor: WORD.into(),
            mem: 0,
            mem_percentage: None,
            cores,
            priority: None,
            slices: None,
        };
        if let Some(n) = read_whole(c, src, &self.names.resource_count_name)? {
            return Ok(count_of(c, &self.names.resource_count_name, n)?.map(|n| request(n, 0)));
        }
        let core = &self.names.resource_core_name;
        let Some(n) = read_whole(c, src, core)? else {
            return Ok(None);
        };
        let Some(n) = count_of(c, core, n)? else {
            return Ok(None);
        };
        if n <= MAX_CORES_PER_DEVICE {
            return Ok(Some(request(1, n)));
        }
        if n % MAX_CORES_PER_DEVICE == 0 {
            return Ok(Some(request(
                n / MAX_CORES_PER_DEVICE,
                MAX_CORES_PER_DEVICE,
            )));
        }
        Err(bad_value(
            c,
            core,
            u64::from(n),
            "must be 1, 2 or an even number (at most two NeuronCores of each device)",
        ))
    }

    /// The mask given to a container on `card` with `used` taken: all
    /// cores for a whole device; else the free cores, or the lowest
    /// `cores` of an empty device.
    fn mask(card: &DeviceInfo, used: Usage, cores: u32) -> u32 {
        let full = card.devcore;
        if cores == 0 {
            return full;
        }
        if used.cores == 0 {
            let want = (1u32 << cores.min(31)) - 1;
            return want & full;
        }
        full & !used.cores
    }

    fn instance_allows_any_run(node: &NodeState, cards: &Range<usize>) -> bool {
        node.devices[cards.clone()].first().is_some_and(|d| {
            d.info
                .custom_info
                .as_ref()
                .and_then(|c| c.get("AWSNodeType"))
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.contains("inf") || t.contains("Inf"))
        })
    }
}

impl Vendor for Neuron {
    fn word(&self) -> &str {
        WORD
    }

    fn allocation_annotations(&self) -> (Option<&str>, &str) {
        (None, "hami.io/aws-neuron-devices-allocated")
    }

    fn uses_node_lock(&self) -> bool {
        false
    }

    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError> {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let devices = capacity(node, &self.names.resource_count_name).min(1024);
        let cores = capacity(node, &self.names.resource_core_name);
        if devices == 0 {
            return Ok(None);
        }
        let per_device = (cores / devices).clamp(1, 31) as u32;
        let instance = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INSTANCE_TYPE))
            .cloned()
            .unwrap_or_default();
        let custom = serde_json::json!({ "AWSNodeType": instance });
        let devices = (0..devices)
            .map(|i| DeviceInfo {
                id: format!("{name}-{WORD}-{i}"),
                index: i as u32,
                count: per_device,
                devmem: 0,
                devcore: (1u32 << per_device) - 1,
                device_type: WORD.into(),
                health: true,
                custom_info: Some(Box::new(custom.clone())),
                ..Default::default()
            })
            .collect();
        Ok(Some(NodeDevices {
            devices,
            ..Default::default()
        }))
    }

    fn pod_requests(&self, pod: &Pod) -> Result<Vec<Option<ContainerRequest>>, RequestError> {
        each_container(pod, |c| self.container_request(c))
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
        let nums = req.nums as usize;
        scratch.picked.clear();
        if nums > 1 {
            // A run of free devices by index; on Trainium only runs of 4, 8
            // or 16 that start at a multiple of their length.
            let any_run = Neuron::instance_allows_any_run(node, &cards);
            if !any_run && ![4, 8, 16].contains(&nums) {
                rejection.add(Reason::NumaNotFit, 1);
                return Err(rejection);
            }
            let mut by_index: Vec<usize> = cards.collect();
            by_index.sort_by_key(|&i| node.devices[i].info.index);
            let free = |i: usize| node.devices[i].usable() && used[i].slots == 0;
            let step = if any_run { 1 } else { nums };
            let mut start = 0;
            while start + nums <= by_index.len() {
                let run = &by_index[start..start + nums];
                if run.iter().all(|&i| free(i)) {
                    scratch.picked.extend_from_slice(run);
                    return Ok(());
                }
                start += step;
            }
            rejection.add(Reason::NumaNotFit, 1);
            return Err(rejection);
        }
        let keys = [(
            "aws.amazon.com/use-neuron-uuid".to_string(),
            "aws.amazon.com/nouse-neuron-uuid".to_string(),
        )];
        let selectors = Selectors::read(pod.annotations, &keys, None);
        card_order(
            WORD,
            node,
            cards,
            used,
            req,
            pod.constraints,
            &mut scratch.keyed,
        );
        let mutex = is_mutex(pod);
        for &(_, _, i) in scratch.keyed.iter().rev() {
            let d = &node.devices[i];
            let u = used[i];
            let free = d
                .info
                .devcore
                .count_ones()
                .saturating_sub(u.cores.count_ones());
            let want = if req.cores == 0 {
                d.info.devcore.count_ones()
            } else {
                req.cores
            };
            let reason = if !d.info.health {
                Some(Reason::CardNotHealth)
            } else if d.cordoned {
                Some(Reason::CardCordoned)
            } else if !selectors.uuid_allowed(&d.info.id) {
                Some(Reason::CardUuidMismatch)
            } else if u.slots >= d.info.count {
                Some(Reason::CardTimeSlicingExhausted)
            } else if mutex && u.slots > 0 {
                Some(Reason::CardInUseMutex)
            } else if free < want {
                Some(Reason::CardInsufficientCore)
            } else {
                None
            };
            match reason {
                Some(r) => rejection.add(r, 1),
                None => {
                    scratch.picked.push(i);
                    return Ok(());
                }
            }
        }
        Err(rejection)
    }

    fn take(&self, card: &DeviceInfo, used: Usage, req: &ContainerRequest) -> (u64, u32) {
        (0, Neuron::mask(card, used, req.cores))
    }

    fn count_resource(&self) -> &str {
        &self.names.resource_count_name
    }

    fn admit_container(
        &self,
        c: &mut Container,
        _pod_annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAdmission, String> {
        let res = c.resources.as_ref();
        let managed = in_limits(res, &self.names.resource_count_name)
            || in_limits(res, &self.names.resource_core_name);
        if !managed {
            return Ok(ContainerAdmission::default());
        }
        let asks = self.container_request(c).map_err(|e| e.to_string())?;
        Ok(ContainerAdmission {
            managed: asks.is_some(),
            changed: false,
        })
    }

    fn plugin_annotations(&self, placed: &Placed<'_>) -> Vec<(String, String)> {
        let (node, devices, asked, now_ns) =
            (placed.node, placed.devices, placed.asked, placed.now_ns);
        let mut ids = Vec::new();
        let mut core_style = false;
        for (ci, container) in devices.0.iter().enumerate() {
            // Without the request at hand, a partial mask means core style.
            let cores_asked = match asked.get(ci) {
                Some(r) => r.is_some_and(|r| r.cores > 0),
                None => container.iter().any(|d| d.cores.count_ones() < 2),
            };
            core_style |= cores_asked && !container.is_empty();
            for d in container {
                let index = index_suffix(&d.uuid).unwrap_or(0);
                if cores_asked {
                    let per_device = 2;
                    for bit in 0..31 {
                        if d.cores & (1 << bit) != 0 {
                            ids.push((per_device * index + bit).to_string());
                        }
                    }
                } else {
                    ids.push(index.to_string());
                }
            }
        }
        if ids.is_empty() {
            return Vec::new();
        }
        let mut out = vec![
            ("AWS_NEURON_IDS".to_string(), ids.join(",")),
            ("NEURON_ALLOCATED".to_string(), "false".to_string()),
            ("NEURON_ALLOC_TIME".to_string(), now_ns.to_string()),
            (
                "aws.amazon.com/predicate-node".to_string(),
                node.to_string(),
            ),
        ];
        if core_style {
            out.push((
                "NEURON_RESOURCE_TYPE".to_string(),
                self.names.resource_core_name.clone(),
            ));
        }
        out
    }

    fn plugin_annotation_keys(&self) -> Vec<String> {
        [
            "AWS_NEURON_IDS",
            "NEURON_ALLOCATED",
            "NEURON_ALLOC_TIME",
            "NEURON_RESOURCE_TYPE",
            "aws.amazon.com/predicate-node",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect()
    }
}
