//! The decision: which node and which cards a pod gets, and for every node
//! that cannot take it, why. One function serves the extender, the CLI, the
//! simulator and the benchmarks.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};

use hami_api::allocation::{ContainerDevice, PodDevices};
use hami_api::annotations as ann;
use hami_api::policy::NodePolicy;
use hami_api::request::init_container_count;
use hami_api::{ContainerRequest, DecodeError, DeviceConfig, NvidiaConfig, RequestError};

use crate::admission::{self, AdmissionOptions};
use crate::bind::{BindInFlight, BusyRule};
use crate::constraints::{PodConstraints, Policies};
use crate::reason::{Reason, Rejection};
use crate::score::node_score;
use crate::snapshot::{NodeDevices, NodeState, PodRecord, Snapshot, Usage};
use crate::vendor::{
    Admission, Ascend, EnflameDrs, FitPod, FitScratch, Generic, Neuron, Nvidia, Placed, Vendor,
};

/// Why a pod cannot be considered at all (before looking at nodes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Annotation(#[from] DecodeError),
}

/// One container's request for one vendor's devices.
#[derive(Debug, Clone, PartialEq)]
pub struct VendorRequest {
    /// Index of the vendor in the engine ([`Engine::vendor`]).
    pub vendor: usize,
    pub request: ContainerRequest,
}

/// A pod reduced to what the engine needs, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRequest {
    /// `namespace/name`.
    pub key: String,
    /// Per container in allocation order: what it asks of each vendor
    /// (empty for containers without devices; a container may ask
    /// several vendors).
    pub containers: Vec<Vec<VendorRequest>>,
    pub init_count: usize,
    pub constraints: PodConstraints,
    /// The pod's annotations, for vendor-specific selectors and modes.
    pub annotations: BTreeMap<String, String>,
    /// Container names in allocation order (some plugins key by them).
    pub container_names: Vec<String>,
    /// The node annotations of the vendor plugins' own locks its bind
    /// takes ([`crate::vendor::Vendor::plugin_lock_key`]), each once.
    pub plugin_locks: Vec<String>,
}

impl PodRequest {
    /// Every (container, request) in allocation order.
    pub fn requests(&self) -> impl Iterator<Item = (usize, &VendorRequest)> {
        self.containers
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| c.iter().map(move |r| (ci, r)))
    }

    /// Cards asked for over all containers.
    pub fn total_cards(&self) -> u64 {
        self.requests()
            .map(|(_, r)| u64::from(r.request.nums))
            .sum()
    }

    /// Cards the pod uses at one time: the larger of any one init
    /// container's and the app containers' sum (init containers run one at
    /// a time, before the app containers).
    pub fn peak_cards(&self) -> u64 {
        let init = self.init_count.min(self.containers.len());
        let nums = |c: &[Vec<VendorRequest>]| -> Vec<u64> {
            c.iter()
                .map(|v| v.iter().map(|r| u64::from(r.request.nums)).sum())
                .collect()
        };
        let init_max = nums(&self.containers[..init]).into_iter().max();
        let app_sum: u64 = nums(&self.containers[init..]).into_iter().sum();
        init_max.unwrap_or(0).max(app_sum)
    }
}

/// `namespace/name` of a pod.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The outcome of filtering one pod. Node names borrow from the snapshot
/// or the candidate list, so explaining 10,000 rejections allocates little.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<'a> {
    pub node: Option<&'a str>,
    /// Per container in allocation order (empty for containers without GPUs).
    pub devices: PodDevices,
    /// Nodes that cannot take the pod and why (empty unless explaining).
    pub rejected: Vec<(&'a str, Rejection)>,
    /// Nodes passed over because a bind is in flight there while the pod
    /// fits elsewhere ([`Engine::filter_avoiding_busy`]); report them with
    /// [`BindInFlight::reason`].
    pub busy: Vec<(&'a str, &'a BindInFlight)>,
}

/// Whether to explain every rejected node (the extender, the CLI) or only
/// find the best node (the simulator). Both give the same node and cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Explain,
    Fast,
}

/// The scheduling engine: the vendor backends, the default policies and
/// the webhook's scheduler-level settings.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    /// Vendor 0.
    pub nvidia: Nvidia,
    /// Vendors 1.., in HAMi's order.
    pub others: Vec<Arc<dyn Vendor>>,
    pub policies: Policies,
    pub admission: AdmissionOptions,
}

impl Engine {
    /// An NVIDIA-only engine with HAMi's default admission settings.
    pub fn new(config: NvidiaConfig, policies: Policies) -> Engine {
        Engine {
            nvidia: Nvidia::new(config),
            others: Vec::new(),
            policies,
            admission: AdmissionOptions::default(),
        }
    }

    /// An engine for every vendor of a device config: NVIDIA, each Ascend
    /// chip of `vnpus`, the vendors of [`Generic::all`], Enflame DRS, then AWS
    /// Neuron.
    pub fn from_config(config: &DeviceConfig, policies: Policies) -> Engine {
        let mut engine = Engine::new(config.nvidia.clone(), policies);
        let v = &config.vendors;
        let chip_resources: Vec<String> = (v.vnpus.configs.iter())
            .map(|c| c.resource_name.clone())
            .filter(|r| !r.is_empty())
            .collect();
        for chip in v.vnpus.chips() {
            if !chip.resource_name.is_empty() && !chip.common_word.is_empty() {
                engine.others.push(Arc::new(Ascend::new(
                    chip,
                    v.vnpus.hami_vnpu_core,
                    chip_resources.clone(),
                )));
            }
        }
        for g in Generic::all(v) {
            engine.others.push(Arc::new(g));
        }
        let drs = EnflameDrs::new(&v.enflame);
        if !drs.count_resource().is_empty() {
            engine.others.push(Arc::new(drs));
        }
        if !v.awsneuron.resource_count_name.is_empty() {
            engine
                .others
                .push(Arc::new(Neuron::new(v.awsneuron.clone())));
        }
        engine
    }

    /// How many vendors the engine schedules.
    pub fn vendor_count(&self) -> usize {
        1 + self.others.len()
    }

    /// Vendor `i` (0 is NVIDIA).
    pub fn vendor(&self, i: usize) -> &dyn Vendor {
        match i {
            0 => &self.nvidia,
            i => &*self.others[i - 1],
        }
    }

    /// Every vendor with its index.
    pub fn vendors(&self) -> impl Iterator<Item = (usize, &dyn Vendor)> {
        (0..self.vendor_count()).map(|i| (i, self.vendor(i)))
    }

    /// Whether binding `devices` takes HAMi's node lock: when some vendor
    /// of the allocation has a plugin that releases it.
    pub fn needs_node_lock(&self, devices: &PodDevices) -> bool {
        devices.devices().any(|d| {
            self.vendor_of_entry(d)
                .is_none_or(|v| self.vendor(v).uses_node_lock())
        })
    }

    /// The vendor that wrote an allocation entry.
    pub fn vendor_of_entry(&self, entry: &ContainerDevice) -> Option<usize> {
        self.vendors().find(|(_, v)| v.owns(entry)).map(|(i, _)| i)
    }

    /// The same engine with other admission settings.
    pub fn with_admission(mut self, admission: AdmissionOptions) -> Engine {
        self.admission = admission;
        self
    }

    /// Only the scheduler-written annotations rule of [`Engine::admit`],
    /// for pods the webhook otherwise leaves alone. Returns whether any
    /// annotation was removed.
    pub fn strip_scheduler_written(&self, pod: &mut Pod) -> bool {
        admission::strip_scheduler_written(&self.vendor_list(), pod)
    }

    fn vendor_list(&self) -> Vec<&dyn Vendor> {
        self.vendors().map(|(_, v)| v).collect()
    }

    /// Parses a pod. `Ok(None)` when it asks for no managed device.
    pub fn prepare(&self, pod: &Pod) -> Result<Option<PodRequest>, PodError> {
        let mut containers: Vec<Vec<VendorRequest>> = Vec::new();
        let mut plugin_locks: Vec<String> = Vec::new();
        for (vendor, backend) in self.vendors() {
            let asks = backend.pod_requests(pod)?;
            if asks.iter().any(Option::is_some)
                && let Some(key) = backend.plugin_lock_key(pod)
                && !plugin_locks.iter().any(|k| k == key)
            {
                plugin_locks.push(key.to_string());
            }
            if containers.len() < asks.len() {
                containers.resize_with(asks.len(), Vec::new);
            }
            for (ci, request) in asks.into_iter().enumerate() {
                if let Some(request) = request {
                    containers[ci].push(VendorRequest { vendor, request });
                }
            }
        }
        if containers.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        Ok(Some(PodRequest {
            key: pod_key(pod),
            containers,
            init_count: init_container_count(pod),
            constraints: PodConstraints::decode(&annotations, self.policies)?,
            annotations,
            container_names: crate::vendor::shared::containers(pod)
                .map(|c| c.name.clone())
                .collect(),
            plugin_locks,
        }))
    }

    /// The pod annotations the scheduler writes for `devices` on `node` at
    /// `now_ns` (unix nanoseconds): `hami.io/vgpu-node`, and per vendor its
    /// allocation pair and what its device plugin reads. `request` and
    /// `state` (the node's cards) are passed when at hand: some vendors'
    /// plugin notes depend on how a container asked or on the card.
    /// (The shell adds the bind times.)
    pub fn decision_annotations(
        &self,
        node: &str,
        devices: &PodDevices,
        request: Option<&PodRequest>,
        state: Option<&NodeState>,
        now_ns: i128,
    ) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(ann::VGPU_NODE.to_string(), node.to_string());
        for (v, vendor) in self.vendors() {
            let asked: Vec<Option<&ContainerRequest>> = request
                .map(|r| {
                    r.containers
                        .iter()
                        .map(|c| c.iter().find(|x| x.vendor == v).map(|x| &x.request))
                        .collect()
                })
                .unwrap_or_default();
            let mine = PodDevices(
                devices
                    .0
                    .iter()
                    .map(|c| c.iter().filter(|d| vendor.owns(d)).cloned().collect())
                    .collect(),
            );
            if mine.is_empty() {
                continue;
            }
            let encoded = mine.encode();
            let (to_allocate, allocated) = vendor.allocation_annotations();
            if let Some(key) = to_allocate {
                m.insert(key.to_string(), encoded.clone());
            }
            m.insert(allocated.to_string(), encoded);
            m.extend(vendor.plugin_annotations(&Placed {
                node,
                state,
                devices: &mine,
                asked: &asked,
                containers: request.map_or(&[][..], |r| &r.container_names),
                now_ns,
            }));
        }
        m
    }

    /// The admission webhook's rules for a pod being created (mutates it
    /// in place), under [`Engine::admission`]. GPU pods of the default
    /// scheduler go to `scheduler_name` (HAMi's is
    /// [`hami_api::annotations::SCHEDULER_NAME`]).
    pub fn admit(&self, pod: &mut Pod, scheduler_name: &str) -> Admission {
        admission::admit(&self.vendor_list(), &self.admission, pod, scheduler_name)
    }

    /// Registers a Kubernetes Node's devices, of every vendor, in the
    /// snapshot. Returns whether it has any. A vendor whose registration is
    /// malformed is left out (the node keeps the other vendors' cards) and
    /// its error is returned after the node is registered.
    pub fn add_node(&self, snapshot: &mut Snapshot, node: &Node) -> Result<bool, DecodeError> {
        self.add_node_vendors(snapshot, node, &|_| true)
    }

    /// [`Engine::add_node`] with only the vendors `include` names (the
    /// shell leaves out vendors whose device plugin stopped reporting).
    pub fn add_node_vendors(
        &self,
        snapshot: &mut Snapshot,
        node: &Node,
        include: &dyn Fn(usize) -> bool,
    ) -> Result<bool, DecodeError> {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let mut joined = NodeDevices::default();
        let mut error = None;
        for (i, vendor) in self.vendors().filter(|(i, _)| include(*i)) {
            match vendor.decode_node(node) {
                Ok(Some(reg)) => {
                    let start = joined.devices.len();
                    joined.devices.extend(reg.devices);
                    joined.vendor_cards.push((i, start..joined.devices.len()));
                    joined.cordoned.extend(reg.cordoned);
                    joined.pair_scores.extend(reg.pair_scores);
                    joined.soft_split |= reg.soft_split;
                }
                Ok(None) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        let any = !joined.devices.is_empty();
        if any {
            snapshot.upsert_node(name, joined);
        } else {
            snapshot.remove_node(name);
        }
        match error {
            Some(e) => Err(e),
            None => Ok(any),
        }
    }

    /// What a Kubernetes Pod holds, if anything: pods bound to the node
    /// their allocation names (`spec.nodeName` equal to `hami.io/vgpu-node`)
    /// that are not Succeeded or Failed (pending, bound-but-not-running and
    /// terminating pods still hold their capacity). Annotations alone are
    /// pod data anyone may write, so a pod that is not bound there holds
    /// nothing; the shell counts its own decisions until their binds land.
    /// A bind the scheduler gave up on (`hami.io/bind-phase=failed`) holds
    /// nothing unless the pod runs anyway: then its devices are in use,
    /// whatever the annotation says.
    pub fn pod_record(&self, pod: &Pod) -> Result<Option<PodRecord>, DecodeError> {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Ok(None);
        }
        let Some(annotations) = pod.metadata.annotations.as_ref() else {
            return Ok(None);
        };
        let given_up = annotations.get(ann::BIND_PHASE).map(String::as_str) == Some("failed");
        if given_up && phase != Some("Running") {
            return Ok(None);
        }
        let Some(node) = annotations.get(ann::VGPU_NODE) else {
            return Ok(None);
        };
        let bound_to = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if bound_to != Some(node.as_str()) {
            return Ok(None);
        }
        // Every vendor's allocated key, joined container by container.
        let mut devices = PodDevices::default();
        for (_, vendor) in self.vendors() {
            let key = vendor.allocation_annotations().1;
            let Some(value) = annotations.get(key) else {
                continue;
            };
            let mine = PodDevices::decode(key, value)?;
            if devices.0.len() < mine.0.len() {
                devices.0.resize_with(mine.0.len(), Vec::new);
            }
            for (ci, c) in mine.0.into_iter().enumerate() {
                devices.0[ci].extend(c.into_iter().filter(|d| vendor.owns(d)));
            }
        }
        if devices.is_empty() {
            return Ok(None);
        }
        let init_active = !matches!(phase, Some("Running"));
        Ok(Some(PodRecord::new(
            node.clone(),
            devices,
            init_container_count(pod),
            init_active,
        )))
    }

    /// Finds the node and cards for `pod` among `candidates` (all nodes of
    /// the snapshot when `None`). Pure: the snapshot is not changed. Binds
    /// in flight are not looked at; see [`Engine::filter_avoiding_busy`].
    pub fn filter<'a>(
        &self,
        snapshot: &'a Snapshot,
        pod: &PodRequest,
        candidates: Option<&'a [String]>,
        mode: Mode,
    ) -> Decision<'a> {
        self.filter_except(snapshot, pod, candidates, mode, &|_| false)
    }

    /// [`Engine::filter`] that passes over nodes with a bind in flight
    /// (the snapshot's [`Snapshot::bind_in_flight`]) that `rule` finds
    /// busy, as long as another candidate fits: a bind there would wait
    /// for the node's lock. When every candidate is busy, or the pod fits
    /// only on busy nodes, it is the plain filter. The busy nodes passed
    /// over are listed in [`Decision::busy`].
    pub fn filter_avoiding_busy<'a>(
        &self,
        snapshot: &'a Snapshot,
        pod: &PodRequest,
        candidates: Option<&'a [String]>,
        mode: Mode,
        rule: BusyRule,
    ) -> Decision<'a> {
        let policy = pod.constraints.node_policy;
        let busy_bind = |name: &str| {
            snapshot
                .bind_in_flight(name)
                .filter(|b| rule.is_busy(b, &pod.key, policy))
        };
        let names: Vec<&'a str> = match candidates {
            Some(c) => c.iter().map(String::as_str).collect(),
            None => snapshot.nodes().iter().map(|n| n.name.as_str()).collect(),
        };
        let busy: Vec<(&'a str, &'a BindInFlight)> = names
            .iter()
            .filter_map(|&n| busy_bind(n).map(|b| (n, b)))
            .collect();
        if busy.is_empty() || busy.len() == names.len() {
            return self.filter(snapshot, pod, candidates, mode);
        }
        let mut decision =
            self.filter_except(snapshot, pod, candidates, mode, &|n| busy_bind(n).is_some());
        if decision.node.is_none() {
            // Nothing fits elsewhere: a busy node is still better than none.
            return self.filter(snapshot, pod, candidates, mode);
        }
        decision.busy = busy;
        decision
    }

    /// [`Engine::filter`] over the candidates that `skip` does not name
    /// (skipped nodes are neither considered nor rejected).
    fn filter_except<'a>(
        &self,
        snapshot: &'a Snapshot,
        pod: &PodRequest,
        candidates: Option<&'a [String]>,
        mode: Mode,
        skip: &dyn Fn(&str) -> bool,
    ) -> Decision<'a> {
        let nodes = snapshot.nodes();
        let mut scratch = PodScratch::default();
        let mut rejected = Vec::new();
        // (position among candidates, node index) of the nodes we know.
        let known: Vec<(usize, usize)> = match candidates {
            None => (0..nodes.len())
                .filter(|&i| !skip(&nodes[i].name))
                .map(|i| (i, i))
                .collect(),
            Some(names) => names
                .iter()
                .enumerate()
                .filter(|(_, name)| !skip(name))
                .filter_map(|(pos, name)| match snapshot.node_position(name) {
                    Some(i) => Some((pos, i)),
                    None => {
                        if mode == Mode::Explain {
                            rejected.push((
                                name.as_str(),
                                Rejection::node(Reason::NodeInsufficientDevice),
                            ));
                        }
                        None
                    }
                })
                .collect(),
        };
        let policy = pod.constraints.node_policy;
        let peak_cards = pod.peak_cards();
        let mut best: Option<Ranked> = None;
        // With one GPU container the node's own usage is all it sees, so the
        // backend may answer without ranking cards.
        let single = match pod.requests().collect::<Vec<_>>()[..] {
            [(ci, only)] => Some((ci, only)),
            _ => None,
        };
        let alone = FitPod {
            constraints: &pod.constraints,
            annotations: &pod.annotations,
            earlier: &[],
        };
        // Vendor node scores depend on the cards chosen, so with them every
        // node is fitted, also in Fast mode (same answer, no explanations).
        let scored = pod
            .requests()
            .any(|(_, r)| self.vendor(r.vendor).scores_nodes());
        let single = if scored { None } else { single };
        match mode {
            _ if mode == Mode::Explain || scored => {
                for &(pos, i) in &known {
                    let node = &nodes[i];
                    let fits = match single.and_then(|(ci, r)| {
                        self.vendor(r.vendor)
                            .container_fits_unordered(
                                node,
                                node.cards_of(r.vendor),
                                &r.request,
                                &alone,
                            )
                            .map(|answer| (ci, answer))
                    }) {
                        Some((ci, answer)) => answer.map_err(|mut r| {
                            r.container = ci as u16;
                            r
                        }),
                        None => self.fit_pod_cards(node, pod, &mut scratch),
                    };
                    match fits {
                        Ok(()) => {
                            let mut score = node_score(&node.totals);
                            if scored {
                                score += self.vendor_scores(node, pod, &scratch, policy);
                            }
                            let r = Ranked::new(score, pos, i, policy);
                            if best.as_ref().is_none_or(|b| r > *b) {
                                best = Some(r);
                            }
                        }
                        Err(rej) if mode == Mode::Explain => {
                            rejected.push((node.name.as_str(), rej))
                        }
                        Err(_) => {}
                    }
                }
            }
            _ => {
                // Rank every node in O(1) from its totals, then fit the best
                // first; the first that fits is the answer Explain would give.
                let mut heap: BinaryHeap<Ranked> = known
                    .iter()
                    .filter(|&&(_, i)| has_free_slots(&nodes[i], peak_cards))
                    .map(|&(pos, i)| Ranked::new(node_score(&nodes[i].totals), pos, i, policy))
                    .collect();
                while let Some(r) = heap.pop() {
                    if self
                        .fit_pod_cards(&nodes[r.node], pod, &mut scratch)
                        .is_ok()
                    {
                        best = Some(r);
                        break;
                    }
                }
            }
        }
        // Devices are built for the winner only; fitting is deterministic,
        // so fitting it again gives the cards the search saw.
        let devices = match best {
            Some(b) => {
                self.fit_pod_cards(&nodes[b.node], pod, &mut scratch)
                    .expect("the chosen node fits");
                scratch.devices(self, &nodes[b.node], pod)
            }
            None => PodDevices::default(),
        };
        Decision {
            node: best.map(|b| nodes[b.node].name.as_str()),
            devices,
            rejected,
            busy: Vec::new(),
        }
    }

    /// Fits every container of the pod on one node and returns the devices
    /// per container. As HAMi does, each init container is fitted on the
    /// node as it is, and then the app containers, each seeing what the
    /// previous app containers took: init containers run one at a time and
    /// are done before the app starts, so the pod holds the larger of the
    /// two (see [`crate::snapshot::held_usage`]).
    pub fn fit_pod(
        &self,
        node: &NodeState,
        pod: &PodRequest,
        scratch: &mut PodScratch,
    ) -> Result<PodDevices, Rejection> {
        self.fit_pod_cards(node, pod, scratch)?;
        Ok(scratch.devices(self, node, pod))
    }

    /// [`Engine::fit_pod`] without building the result: the chosen cards
    /// stay in `scratch.picks`. The hot path of filtering.
    fn fit_pod_cards(
        &self,
        node: &NodeState,
        pod: &PodRequest,
        scratch: &mut PodScratch,
    ) -> Result<(), Rejection> {
        let PodScratch {
            used,
            picks,
            earlier,
            fit,
        } = scratch;
        picks.clear();
        for (ci, requests) in pod.containers.iter().enumerate() {
            // Every init container, and then the app containers together,
            // start from the node's own usage.
            if ci <= pod.init_count {
                used.clear();
                used.extend(node.devices.iter().map(|d| d.used));
            }
            for VendorRequest {
                vendor: v,
                request: req,
            } in requests
            {
                let vendor = self.vendor(*v);
                earlier.clear();
                earlier.extend(picks.iter().filter(|p| p.1 == *v).map(|p| p.2));
                let fit_pod = FitPod {
                    constraints: &pod.constraints,
                    annotations: &pod.annotations,
                    earlier,
                };
                vendor
                    .fit_container(node, node.cards_of(*v), used, req, &fit_pod, fit)
                    .map_err(|mut r| {
                        r.container = ci as u16;
                        r
                    })?;
                for &i in &fit.picked {
                    let (mem, cores) = vendor.take(&node.devices[i].info, used[i], req);
                    used[i].slots += 1;
                    used[i].mem += mem;
                    used[i].cores += cores;
                    picks.push((ci, *v, i, mem, cores));
                }
            }
        }
        Ok(())
    }

    /// The vendors' own node scores for the cards just fitted (in
    /// `scratch`), added to the shared score as HAMi adds them.
    fn vendor_scores(
        &self,
        node: &NodeState,
        pod: &PodRequest,
        scratch: &PodScratch,
        policy: NodePolicy,
    ) -> f64 {
        let mut total = 0.0;
        for (v, vendor) in self.vendors().filter(|(_, v)| v.scores_nodes()) {
            let mut per_container: Vec<Vec<usize>> = vec![Vec::new(); pod.containers.len()];
            for &(ci, pv, i, _, _) in &scratch.picks {
                if pv == v {
                    per_container[ci].push(i);
                }
            }
            if per_container.iter().any(|c| !c.is_empty()) {
                total += vendor.node_score(node, &per_container, policy);
            }
        }
        total
    }

    /// Records a decision in the snapshot so the next pod sees it.
    pub fn reserve(
        &self,
        snapshot: &mut Snapshot,
        pod: &PodRequest,
        node: &str,
        devices: PodDevices,
    ) {
        snapshot.add_pod(
            &pod.key,
            PodRecord::new(node.to_string(), devices, pod.init_count, true),
        );
    }
}

/// Whether the node has at least `cards` free slots, a necessary condition
/// for fitting. The totals answer in O(1) almost always; a card holding more
/// than its count (the node re-registered with fewer slots under running
/// pods) makes them undercount the other cards' room, so then count per card.
fn has_free_slots(node: &NodeState, cards: u64) -> bool {
    let t = &node.totals;
    t.slots.saturating_sub(t.used_slots) >= cards
        || node
            .devices
            .iter()
            .map(|d| u64::from(d.info.count.saturating_sub(d.used.slots)))
            .sum::<u64>()
            >= cards
}

/// Buffers reused while fitting one pod on node after node.
#[derive(Debug, Default)]
pub struct PodScratch {
    /// Per card of the node being fitted: usage including earlier containers.
    used: Vec<Usage>,
    /// (container, vendor, card, MiB, cores) in allocation order.
    picks: Vec<(usize, usize, usize, u64, u32)>,
    /// Cards one vendor gave earlier containers of the pod.
    earlier: Vec<usize>,
    fit: FitScratch,
}

impl PodScratch {
    /// The devices of the last successful fit, per container.
    fn devices(&self, engine: &Engine, node: &NodeState, pod: &PodRequest) -> PodDevices {
        let mut out: Vec<Vec<ContainerDevice>> = vec![Vec::new(); pod.containers.len()];
        for &(ci, v, i, mem, cores) in &self.picks {
            let info = &node.devices[i].info;
            out[ci].push(ContainerDevice {
                uuid: info.id.clone(),
                vendor: engine.vendor(v).entry_type(info).to_string(),
                mem,
                cores,
            });
        }
        PodDevices(out)
    }
}

/// A node's rank: higher is better. Binpack prefers the fullest node,
/// spread the emptiest; ties go to the earlier candidate.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    score: f64,
    pos: usize,
    node: usize,
    policy: NodePolicy,
}

impl Ranked {
    fn new(score: f64, pos: usize, node: usize, policy: NodePolicy) -> Ranked {
        Ranked {
            score,
            pos,
            node,
            policy,
        }
    }
}

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> Ordering {
        let by_score = match self.policy {
            NodePolicy::Binpack => self.score.total_cmp(&o.score),
            NodePolicy::Spread => o.score.total_cmp(&self.score),
        };
        by_score.then(o.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Ranked {}
