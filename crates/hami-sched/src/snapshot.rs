//! The cluster as the engine sees it: every node's cards and what the bound
//! pods hold on them. Adding or removing a pod updates usage incrementally
//! and exactly; a node that re-registers gets its usage rebuilt from its pods.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use hami_api::allocation::PodDevices;
use hami_api::device::DeviceInfo;
use hami_api::topology::DevicePairScore;

use crate::bind::BindInFlight;

/// What is in use on one card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Slots taken (one per container device).
    pub slots: u32,
    /// MiB allocated.
    pub mem: u64,
    /// Percent of compute allocated.
    pub cores: u32,
}

impl Usage {
    fn add(&mut self, o: Usage) {
        self.slots += o.slots;
        self.mem += o.mem;
        self.cores += o.cores;
    }

    fn sub(&mut self, o: Usage) {
        // Exact by construction: a pod only ever removes what it added.
        debug_assert!(self.slots >= o.slots && self.mem >= o.mem && self.cores >= o.cores);
        self.slots = self.slots.saturating_sub(o.slots);
        self.mem = self.mem.saturating_sub(o.mem);
        self.cores = self.cores.saturating_sub(o.cores);
    }

    fn max(self, o: Usage) -> Usage {
        Usage {
            slots: self.slots.max(o.slots),
            mem: self.mem.max(o.mem),
            cores: self.cores.max(o.cores),
        }
    }
}

/// One card and what is allocated on it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    pub info: DeviceInfo,
    /// `info.device_type` in lower case, for the case-insensitive selectors.
    pub type_lower: String,
    pub cordoned: bool,
    pub used: Usage,
}

impl DeviceState {
    /// Whether new work may be placed on the card at all.
    pub fn usable(&self) -> bool {
        self.info.health && !self.cordoned
    }
}

/// Sums over a node's cards, kept current for O(1) node scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeTotals {
    pub slots: u64,
    pub used_slots: u64,
    pub cores: u64,
    pub used_cores: u64,
    pub mem: u64,
    pub used_mem: u64,
}

/// One node with GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub name: String,
    /// Every vendor's cards, each vendor's contiguous (see `vendor_cards`).
    pub devices: Vec<DeviceState>,
    /// (engine vendor index, its cards' range in `devices`); empty means
    /// every card is vendor 0's.
    pub vendor_cards: Vec<(usize, Range<usize>)>,
    pub pair_scores: Vec<DevicePairScore>,
    /// Ascend: the node runs hami-vnpu-core (soft split).
    pub soft_split: bool,
    pub totals: NodeTotals,
}

impl NodeState {
    /// The range of `devices` holding vendor `vendor`'s cards.
    pub fn cards_of(&self, vendor: usize) -> Range<usize> {
        if self.vendor_cards.is_empty() {
            return if vendor == 0 {
                0..self.devices.len()
            } else {
                0..0
            };
        }
        self.vendor_cards
            .iter()
            .find(|(v, _)| *v == vendor)
            .map_or(0..0, |(_, r)| r.clone())
    }

    fn device_index(&self, uuid: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.info.id == uuid)
    }

    fn recompute_totals(&mut self) {
        let mut t = NodeTotals::default();
        for d in &self.devices {
            // Capacity comes from node annotations: saturate rather than
            // overflow on absurd values (it is recomputed, never subtracted).
            t.slots += u64::from(d.info.count);
            t.cores += u64::from(d.info.devcore);
            t.mem = t.mem.saturating_add(d.info.devmem);
            t.used_slots += u64::from(d.used.slots);
            t.used_cores += u64::from(d.used.cores);
            t.used_mem += d.used.mem;
        }
        self.totals = t;
    }

    fn apply(&mut self, held: &[(String, Usage)], add: bool) {
        for (uuid, u) in held {
            // Usage on a card the node no longer reports is kept in the pod
            // record and comes back if the card re-registers.
            if let Some(i) = self.device_index(uuid) {
                let d = &mut self.devices[i];
                let t = &mut self.totals;
                if add {
                    d.used.add(*u);
                    t.used_slots += u64::from(u.slots);
                    t.used_cores += u64::from(u.cores);
                    t.used_mem += u.mem;
                } else {
                    d.used.sub(*u);
                    t.used_slots -= u64::from(u.slots);
                    t.used_cores -= u64::from(u.cores);
                    t.used_mem -= u.mem;
                }
            }
        }
    }
}

/// A pod that holds capacity on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub node: String,
    pub devices: PodDevices,
    /// How many leading containers of `devices` are init containers.
    pub init_count: usize,
    /// Whether init containers may still run (the pod is not yet Running).
    pub init_active: bool,
    /// Per card: what the pod holds (see [`held_usage`]).
    held: Vec<(String, Usage)>,
}

impl PodRecord {
    pub fn new(node: String, devices: PodDevices, init_count: usize, init_active: bool) -> Self {
        let held = held_usage(&devices, init_count, init_active);
        PodRecord {
            node,
            devices,
            init_count,
            init_active,
            held,
        }
    }

    pub fn held(&self) -> &[(String, Usage)] {
        &self.held
    }
}

/// What a pod holds per card. Init containers run one at a time and before
/// the app containers, so while they may still run a pod holds, per card,
/// the larger of any single init container's usage and the app containers'
/// sum; once it is Running it holds the app containers' sum.
pub fn held_usage(
    devices: &PodDevices,
    init_count: usize,
    init_active: bool,
) -> Vec<(String, Usage)> {
    let init_count = init_count.min(devices.0.len());
    let mut app: BTreeMap<&str, Usage> = BTreeMap::new();
    for d in devices.0[init_count..].iter().flatten() {
        app.entry(&d.uuid).or_default().add(one(d));
    }
    if init_active {
        for container in &devices.0[..init_count] {
            let mut this: BTreeMap<&str, Usage> = BTreeMap::new();
            for d in container {
                this.entry(&d.uuid).or_default().add(one(d));
            }
            for (uuid, u) in this {
                let e = app.entry(uuid).or_default();
                *e = e.max(u);
            }
        }
    }
    app.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Allocation annotations are pod data anyone may write: values beyond any
/// real allocation (no card has 2^32 MiB or 10,000 compute units; most
/// vendors count compute in percent, AMD in compute units) are clamped, so
/// that sums over many pods cannot overflow and removal stays exact. Such a
/// value still fills the card.
const MAX_HELD_MEM: u64 = u32::MAX as u64;
const MAX_HELD_CORES: u32 = 10_000;

fn one(d: &hami_api::ContainerDevice) -> Usage {
    Usage {
        slots: 1,
        mem: d.mem.min(MAX_HELD_MEM),
        cores: d.cores.min(MAX_HELD_CORES),
    }
}

/// Every node with GPUs and every pod holding them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    nodes: Vec<NodeState>,
    by_name: HashMap<String, usize>,
    pods: HashMap<String, PodRecord>,
    /// Pods by node name, also for nodes not (or no longer) registered.
    pods_on_node: HashMap<String, Vec<String>>,
    /// Node name -> the bind holding its lock, for nodes with one.
    binds: HashMap<String, BindInFlight>,
}

/// A node's registration: its cards, the cordon list and the link scores.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeDevices {
    pub devices: Vec<DeviceInfo>,
    pub cordoned: Vec<String>,
    pub pair_scores: Vec<DevicePairScore>,
    /// Ascend: the node runs hami-vnpu-core (soft split).
    pub soft_split: bool,
    /// (engine vendor index, its cards' range in `devices`), set when the
    /// engine joins several vendors' registrations; empty = all vendor 0.
    pub vendor_cards: Vec<(usize, Range<usize>)>,
}

impl Snapshot {
    pub fn new() -> Snapshot {
        Snapshot::default()
    }

    pub fn nodes(&self) -> &[NodeState] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.by_name.get(name).map(|&i| &self.nodes[i])
    }

    pub fn node_position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn pods(&self) -> impl Iterator<Item = (&str, &PodRecord)> {
        self.pods.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn pod(&self, key: &str) -> Option<&PodRecord> {
        self.pods.get(key)
    }

    /// Adds a node or replaces its registration; its usage is rebuilt from
    /// the pods bound to it, so a re-registering node loses nothing.
    pub fn upsert_node(&mut self, name: &str, reg: NodeDevices) {
        let devices = reg
            .devices
            .into_iter()
            .map(|info| DeviceState {
                type_lower: info.device_type.to_ascii_lowercase(),
                cordoned: reg.cordoned.contains(&info.id),
                info,
                used: Usage::default(),
            })
            .collect();
        let mut state = NodeState {
            name: name.to_string(),
            devices,
            vendor_cards: reg.vendor_cards,
            pair_scores: reg.pair_scores,
            soft_split: reg.soft_split,
            totals: NodeTotals::default(),
        };
        state.recompute_totals();
        if let Some(keys) = self.pods_on_node.get(name) {
            for k in keys {
                state.apply(&self.pods[k].held, true);
            }
        }
        match self.by_name.get(name) {
            Some(&i) => self.nodes[i] = state,
            None => {
                self.by_name.insert(name.to_string(), self.nodes.len());
                self.nodes.push(state);
            }
        }
    }

    /// Forgets a node's cards (its pods stay recorded).
    pub fn remove_node(&mut self, name: &str) -> bool {
        let Some(i) = self.by_name.remove(name) else {
            return false;
        };
        self.nodes.remove(i);
        for (j, n) in self.nodes.iter().enumerate().skip(i) {
            self.by_name.insert(n.name.clone(), j);
        }
        true
    }

    /// Records a pod's hold; replaces an earlier record of the same pod.
    pub fn add_pod(&mut self, key: &str, record: PodRecord) {
        self.remove_pod(key);
        if let Some(&i) = self.by_name.get(&record.node) {
            self.nodes[i].apply(&record.held, true);
        }
        self.pods_on_node
            .entry(record.node.clone())
            .or_default()
            .push(key.to_string());
        self.pods.insert(key.to_string(), record);
    }

    /// Records that a bind holds `node`'s lock (replacing an earlier one).
    pub fn set_bind_in_flight(&mut self, node: &str, bind: BindInFlight) {
        self.binds.insert(node.to_string(), bind);
    }

    /// Forgets `node`'s bind in flight (its lock was released).
    pub fn clear_bind_in_flight(&mut self, node: &str) -> Option<BindInFlight> {
        self.binds.remove(node)
    }

    pub fn bind_in_flight(&self, node: &str) -> Option<&BindInFlight> {
        self.binds.get(node)
    }

    /// Releases everything a pod holds.
    pub fn remove_pod(&mut self, key: &str) -> Option<PodRecord> {
        let record = self.pods.remove(key)?;
        if let Some(&i) = self.by_name.get(&record.node) {
            self.nodes[i].apply(&record.held, false);
        }
        if let Some(keys) = self.pods_on_node.get_mut(&record.node) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.pods_on_node.remove(&record.node);
            }
        }
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hami_api::ContainerDevice;

    fn dev(uuid: &str, mem: u64, cores: u32) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.into(),
            vendor: "NVIDIA".into(),
            mem,
            cores,
        }
    }

    fn card(id: &str) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            count: 10,
            devmem: 1000,
            devcore: 100,
            device_type: "NVIDIA-T4".into(),
            health: true,
            ..Default::default()
        }
    }

    #[test]
    fn init_containers_hold_the_larger_share_until_running() {
        let pd = PodDevices(vec![
            vec![dev("a", 500, 50)],
            vec![dev("a", 100, 10)],
            vec![dev("a", 100, 10), dev("b", 7, 1)],
        ]);
        let pending = held_usage(&pd, 1, true);
        assert_eq!(
            pending,
            vec![
                (
                    "a".to_string(),
                    Usage {
                        slots: 2,
                        mem: 500,
                        cores: 50
                    }
                ),
                (
                    "b".to_string(),
                    Usage {
                        slots: 1,
                        mem: 7,
                        cores: 1
                    }
                ),
            ]
        );
        let running = held_usage(&pd, 1, false);
        assert_eq!(
            running[0].1,
            Usage {
                slots: 2,
                mem: 200,
                cores: 20
            }
        );
    }

    #[test]
    fn pods_survive_node_reregistration() {
        let mut s = Snapshot::new();
        s.add_pod(
            "ns/p",
            PodRecord::new(
                "n1".into(),
                PodDevices(vec![vec![dev("a", 300, 30)]]),
                0,
                false,
            ),
        );
        // The node registers after the pod was seen.
        s.upsert_node(
            "n1",
            NodeDevices {
                devices: vec![card("a"), card("b")],
                ..Default::default()
            },
        );
        assert_eq!(s.node("n1").unwrap().devices[0].used.mem, 300);
        assert_eq!(s.node("n1").unwrap().totals.used_mem, 300);
        s.upsert_node(
            "n1",
            NodeDevices {
                devices: vec![card("b"), card("a")],
                ..Default::default()
            },
        );
        assert_eq!(s.node("n1").unwrap().devices[1].used.mem, 300);
        s.remove_pod("ns/p");
        assert_eq!(
            s.node("n1").unwrap().totals,
            NodeTotals {
                slots: 20,
                cores: 200,
                mem: 2000,
                ..Default::default()
            }
        );
        assert!(s.remove_node("n1"));
        assert!(s.node("n1").is_none());
    }
}
