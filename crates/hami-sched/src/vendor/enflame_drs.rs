//! Enflame GCUs shared as DRS slices (`gcushare`): a container takes one
//! profile (`<slices>g.<GiB>gb`) of one card, asked for by its slice count
//! or by memory and compute. Facts in docs/design/vendor-formats.md 2.9.

use std::collections::BTreeMap;
use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use serde_json::{Value, json};

use hami_api::vendor_config::EnflameConfig;
use hami_api::{ContainerRequest, DecodeError, DeviceInfo, RequestError};

use super::shared::{
    CoreCheck, Selectors, Source, bad_value, card_order, card_rule, count_of, each_container,
    in_limits, index_suffix, is_mutex, no_cards, pick_first, read_whole, set_limit,
};
use super::{FitPod, FitScratch, Placed, Vendor};
use crate::admission::ContainerAdmission;
use crate::reason::{Reason, Rejection};
use crate::snapshot::{NodeDevices, NodeState, Usage};

const WORD: &str = "Enflame";
/// Node annotation: the cards' slice capacity and the profiles offered.
pub const DRS_CAPACITY: &str = "enflame.com/gcu-drs-capacity";

/// One profile a card offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub id: String,
    pub slices: u32,
    pub gib: u64,
    /// Percent of the card: `ceil(slices x 100 / largest slices)`.
    pub percent: u32,
}

/// Enflame DRS slices.
#[derive(Debug, Clone, PartialEq)]
pub struct EnflameDrs {
    count: String,
    memory: String,
    core: String,
}

/// `<slices>g.<GiB>gb`, any case.
fn parse_profile(name: &str) -> Option<(u32, u64)> {
    let lower = name.to_ascii_lowercase();
    let (slices, rest) = lower.split_once("g.")?;
    let gib = rest.strip_suffix("gb")?;
    Some((slices.parse().ok()?, gib.parse().ok()?))
}

/// The profiles kept on a card, sorted by slices then memory.
fn profiles_of(card: &DeviceInfo) -> Vec<Profile> {
    let list = card
        .custom_info
        .as_ref()
        .and_then(|c| c.get("profiles"))
        .and_then(Value::as_array);
    list.into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Profile {
                name: p.get("name")?.as_str()?.to_string(),
                id: p.get("id")?.as_str()?.to_string(),
                slices: p.get("slices")?.as_u64()? as u32,
                gib: p.get("gib")?.as_u64()?,
                percent: p.get("percent")?.as_u64()? as u32,
            })
        })
        .collect()
}

fn text_or_number(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl EnflameDrs {
    pub fn new(c: &EnflameConfig) -> EnflameDrs {
        let count = if c.resource_name_drs_gcu.is_empty() {
            c.resource_name_vgcu.clone()
        } else {
            c.resource_name_drs_gcu.clone()
        };
        EnflameDrs {
            count,
            memory: c.resource_name_gcu_memory.clone(),
            core: c.resource_name_gcu_core.clone(),
        }
    }

    /// Direct: `slices` set. By size: memory as written (GiB, or MiB when
    /// large) and compute percent. Always one card.
    fn container_request(&self, c: &Container) -> Result<Option<ContainerRequest>, RequestError> {
        let src = Source::LimitsThenRequests;
        let request = |slices: Option<u32>, mem: u64, cores: u32| ContainerRequest {
            nums: 1,
            vendor: WORD.into(),
            mem,
            mem_percentage: None,
            cores,
            priority: None,
            slices,
        };
        if let Some(n) = read_whole(c, src, &self.count)? {
            return Ok(count_of(c, &self.count, n)?.map(|n| request(Some(n), 0, 0)));
        }
        let mem = read_whole(c, src, &self.memory)?;
        let core = read_whole(c, src, &self.core)?;
        if mem.is_none() && core.is_none() {
            return Ok(None);
        }
        let core = core.unwrap_or(0);
        if core > 100 {
            return Err(bad_value(
                c,
                &self.core,
                core,
                "must be 1-100 (percent of a card)",
            ));
        }
        Ok(Some(request(None, mem.unwrap_or(0), core as u32)))
    }

    /// The profile a request takes on a card, as HAMi chooses it.
    pub fn profile_for(card: &DeviceInfo, req: &ContainerRequest) -> Option<Profile> {
        let profiles = profiles_of(card);
        if let Some(n) = req.slices {
            return profiles.into_iter().find(|p| p.slices == n);
        }
        let largest = profiles.iter().map(|p| p.gib).max()?;
        // A value above twice the largest profile is MiB, rounded up to GiB.
        let gib = if req.mem > 2 * largest {
            req.mem.div_ceil(1024)
        } else {
            req.mem
        };
        profiles
            .into_iter()
            .find(|p| p.gib >= gib && p.percent >= req.cores)
    }
}

impl Vendor for EnflameDrs {
    fn word(&self) -> &str {
        WORD
    }

    fn allocation_annotations(&self) -> (Option<&str>, &str) {
        (None, "hami.io/enflame-vgpu-devices-allocated")
    }

    fn uses_node_lock(&self) -> bool {
        false
    }

    fn register_key(&self) -> Option<&str> {
        Some(DRS_CAPACITY)
    }

    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError> {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let Some(value) = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRS_CAPACITY))
        else {
            return Ok(None);
        };
        let root: Value = serde_json::from_str(value)
            .map_err(|e| DecodeError::new(DRS_CAPACITY, value, format!("not JSON: {e}")))?;
        let mut profiles: Vec<(u32, u64, String, String)> = root
            .get("profiles")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(name, id)| {
                let (slices, gib) = parse_profile(name)?;
                let id = match id {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((slices, gib, name.clone(), id))
            })
            .collect();
        profiles.sort();
        let Some(max_slice) = profiles.iter().map(|p| p.0).max().filter(|&m| m > 0) else {
            return Ok(None);
        };
        let max_gib = profiles.iter().map(|p| p.1).max().unwrap_or(0);
        let table: Vec<Value> = profiles
            .iter()
            .map(|(slices, gib, name, id)| {
                json!({
                    "name": name, "id": id, "slices": slices, "gib": gib,
                    "percent": (slices * 100).div_ceil(max_slice),
                })
            })
            .collect();
        let mut devices = Vec::new();
        for (pos, d) in root
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let index = text_or_number(d.get("index")).unwrap_or(pos as i64).max(0);
            let minor = text_or_number(d.get("minor")).unwrap_or(index);
            let capacity = text_or_number(d.get("capacity")).unwrap_or(0);
            if capacity <= 0 {
                return Ok(None);
            }
            devices.push(DeviceInfo {
                id: format!("{name}-enflame-drs-{index}"),
                index: index as u32,
                count: capacity.min(i64::from(u32::MAX)) as u32,
                devmem: max_gib * 1024,
                devcore: 100,
                device_type: WORD.into(),
                health: true,
                custom_info: Some(Box::new(json!({
                    "minor": minor, "index": index, "profiles": table, "maxSlice": max_slice,
                }))),
                ..Default::default()
            });
        }
        if devices.is_empty() {
            return Ok(None);
        }
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
        // Every card of a node offers the same profiles.
        let Some(profile) = EnflameDrs::profile_for(&node.devices[cards.start].info, req) else {
            rejection.add(Reason::ModeNotFit, 1);
            return Err(rejection);
        };
        let keys = [(
            "enflame.com/use-gpuuuid".to_string(),
            "enflame.com/nouse-gpuuuid".to_string(),
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
        let fits = |i: usize| {
            card_rule(
                &node.devices[i],
                used[i],
                profile.gib * 1024,
                profile.percent,
                node.devices[i].info.devcore,
                CoreCheck::FreeOnly,
                &selectors,
                mutex,
            )
        };
        pick_first(scratch, rejection, 1, fits)
    }

    fn take(&self, card: &DeviceInfo, _used: Usage, req: &ContainerRequest) -> (u64, u32) {
        EnflameDrs::profile_for(card, req).map_or((0, 0), |p| (p.gib * 1024, p.percent))
    }

    fn count_resource(&self) -> &str {
        &self.count
    }

    fn admit_container(
        &self,
        c: &mut Container,
        _pod_annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAdmission, String> {
        let before = c.clone();
        let res = c.resources.as_ref();
        let names = [&self.count, &self.memory, &self.core];
        if !names.iter().any(|n| in_limits(res, n)) {
            return Ok(ContainerAdmission::default());
        }
        let Some(req) = self.container_request(c).map_err(|e| e.to_string())? else {
            return Ok(ContainerAdmission::default());
        };
        if req.slices.is_none() && req.mem == 0 {
            return Err(format!(
                "container {:?}: {} must be above 0",
                c.name, self.memory
            ));
        }
        // The plugin reads the values from both limits and requests.
        for name in names {
            if let Ok(Some(v)) = read_whole(c, Source::LimitsThenRequests, name) {
                set_limit(c, name, v, true);
            }
        }
        Ok(ContainerAdmission {
            managed: true,
            changed: *c != before,
        })
    }

    fn plugin_annotations(&self, placed: &Placed<'_>) -> Vec<(String, String)> {
        let card = |uuid: &str| {
            placed
                .state
                .and_then(|n| n.devices.iter().find(|d| d.info.id == uuid))
                .map(|d| &d.info)
        };
        let mut assigned = serde_json::Map::new();
        let mut first: Option<(u32, i64, u32)> = None;
        for (ci, container) in placed.devices.0.iter().enumerate() {
            let Some(d) = container.first() else {
                continue;
            };
            let info = card(&d.uuid);
            let profile = info.and_then(|info| {
                profiles_of(info)
                    .into_iter()
                    .find(|p| p.gib * 1024 == d.mem && p.percent == d.cores)
            });
            let index = index_suffix(&d.uuid).unwrap_or(0);
            let minor = info
                .and_then(|i| i.custom_info.as_ref())
                .and_then(|c| c.get("minor"))
                .and_then(Value::as_i64)
                .unwrap_or(i64::from(index));
            let slices = profile.as_ref().map_or(0, |p| p.slices);
            first.get_or_insert((index, minor, slices));
            if let Some(name) = placed.containers.get(ci) {
                assigned.insert(
                    name.clone(),
                    json!({
                        "allocated": false,
                        "request": slices,
                        "profileID": profile.as_ref().map(|p| p.id.clone()).unwrap_or_default(),
                        "profileName": profile.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
                    }),
                );
            }
        }
        let Some((index, minor, slices)) = first else {
            return Vec::new();
        };
        vec![
            ("enflame.com/gcu-assigned".into(), "false".into()),
            (
                "enflame.com/gcu-assigned-time".into(),
                placed.now_ns.to_string(),
            ),
            ("enflame.com/gcu-assigned-index".into(), index.to_string()),
            ("enflame.com/gcu-assigned-id".into(), index.to_string()),
            ("enflame.com/gcu-assigned-minor".into(), minor.to_string()),
            ("enflame.com/gcu-request-size".into(), slices.to_string()),
            (
                "assigned-containers".into(),
                Value::Object(assigned).to_string(),
            ),
        ]
    }

    fn plugin_annotation_keys(&self) -> Vec<String> {
        [
            "enflame.com/gcu-assigned",
            "enflame.com/gcu-assigned-time",
            "enflame.com/gcu-assigned-index",
            "enflame.com/gcu-assigned-id",
            "enflame.com/gcu-assigned-minor",
            "enflame.com/gcu-request-size",
            "assigned-containers",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect()
    }
}
