//! The scheduler's view of the cluster: the engine's [`Snapshot`] fed by
//! the node and pod watches, plus the decisions Filter has made that the
//! API server does not show yet (reservations).
//!
//! Everything here is synchronous and takes the time as an argument, so the
//! rules (handshake health, reservation expiry, stuck binds) are unit-tested
//! without a cluster. Callers hold the one mutex around [`Cluster`] only
//! for the duration of a call, never across I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use hami_api::allocation::PodDevices;
use hami_api::annotations as ann;
use hami_kube::cache::Inventory;
use hami_kube::handshake;
use hami_sched::{BindInFlight, BusyRule, Engine, LockHolder, Mode, PodRequest, Snapshot, pod_key};

/// A Filter decision not yet visible in the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub uid: Option<String>,
    pub node: String,
    pub devices: PodDevices,
    /// What the pod asked for (some vendors' plugin notes depend on it).
    pub request: Option<PodRequest>,
    pub at: Timestamp,
    /// Bind has started: the sweeper leaves it to the bind's own outcome.
    pub binding: bool,
}

/// What Filter answers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FilterOutcome {
    pub node: Option<String>,
    /// Rejected node -> reason in HAMi's words.
    pub failed: BTreeMap<String, String>,
    /// A node whose cards this Filter freed with no Kubernetes event to
    /// follow: the pod's earlier decision was there and nothing fits now.
    /// Pods kube-scheduler found unschedulable meanwhile wait for an event
    /// before they are tried again ([`crate::requeue`]).
    pub freed: Option<String>,
}

impl FilterOutcome {
    /// The answer for a pod that can only be on `node` (its bind is running
    /// or done): that node if it is a candidate, else every candidate
    /// rejected with `why`.
    fn pinned(node: String, candidates: &[String], why: String) -> FilterOutcome {
        if candidates.contains(&node) {
            return FilterOutcome {
                node: Some(node),
                failed: BTreeMap::new(),
                freed: None,
            };
        }
        FilterOutcome {
            node: None,
            failed: candidates
                .iter()
                .map(|n| (n.clone(), why.clone()))
                .collect(),
            freed: None,
        }
    }
}

/// A pod past its bind whose device plugin never answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub node: String,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    node: Node,
    /// The NVIDIA handshake's verdict.
    healthy: bool,
    /// Other vendors (engine indices) whose plugin stopped answering its
    /// handshake on this node.
    stale_vendors: Vec<usize>,
}

/// The handshakes of the other vendors registered on `node` (those whose
/// plugin writes `hami.io/node-handshake-<vendor>`): (vendor, key, verdict).
fn vendor_verdicts(
    engine: &Engine,
    node: &Node,
    now: Timestamp,
) -> Vec<(usize, String, handshake::Verdict)> {
    let Some(annotations) = node.metadata.annotations.as_ref() else {
        return Vec::new();
    };
    engine
        .vendors()
        .filter_map(|(i, v)| {
            let key = v.handshake_key()?;
            annotations.contains_key(v.register_key()?).then(|| {
                let verdict = handshake::judge_key(node, now, key, v.count_resource());
                (i, key.to_string(), verdict)
            })
        })
        .collect()
}

fn stale_of(verdicts: &[(usize, String, handshake::Verdict)]) -> Vec<usize> {
    verdicts
        .iter()
        .filter(|(_, _, v)| !v.healthy)
        .map(|(i, _, _)| *i)
        .collect()
}

#[derive(Debug, Clone)]
struct PodEntry {
    uid: Option<String>,
    node: Option<String>,
    bind_phase: Option<String>,
    bind_time: Option<i64>,
    phase: Option<String>,
}

impl PodEntry {
    /// The pod as a bind lock's holder ([`BindInFlight::from_lock`]).
    fn as_holder(&self) -> LockHolder<'_> {
        LockHolder {
            bind_phase: self.bind_phase.as_deref(),
            phase: self.phase.as_deref(),
            vgpu_node: self.node.as_deref(),
        }
    }
}

/// Cluster state shared by the watches and the handlers.
#[derive(Debug, Default)]
pub struct Cluster {
    snapshot: Snapshot,
    nodes: HashMap<String, NodeEntry>,
    node_inventory: Inventory,
    pods: HashMap<String, PodEntry>,
    pod_inventory: Inventory,
    reservations: HashMap<String, Reservation>,
    /// GPU pods not bound yet, for the dashboard.
    pending: HashMap<String, Pending>,
}

/// A GPU pod waiting for a node, and what the last Filter said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub scheduler_name: String,
    pub since: Option<Timestamp>,
    /// What it asks for, in words.
    pub request: String,
    /// How many candidate nodes each rejection reason word
    /// ([`reason_words`]) turned away in the last Filter.
    pub rejections: BTreeMap<String, usize>,
    /// One full reason of the last Filter, for reading.
    pub reason: Option<String>,
}

/// A node as the dashboard shows it (its cards come from the snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub healthy: bool,
    pub handshake: Option<String>,
    pub mode: hami_api::node::AllocationMode,
}

/// The reason words of one node's rejection: HAMi's `1/2 CardInsufficientMemory,
/// 1/2 CardUuidMismatch` gives both words; `NodeNotReporting: ...` its word.
fn reason_words(why: &str) -> BTreeSet<String> {
    let head = why.split(':').next().unwrap_or(why);
    head.split(',')
        .filter_map(|part| part.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

/// A pod's request in words: `2 × NVIDIA, 3000 MiB, 30% cores`, one part
/// per GPU container.
fn request_words(req: &PodRequest) -> String {
    let mut parts = Vec::new();
    for (_, r) in req.requests() {
        let c = &r.request;
        let mem = match (c.mem, c.mem_percentage) {
            (0, Some(p)) => format!("{p}% memory"),
            (0, None) => "all memory".to_string(),
            (m, _) => format!("{m} MiB"),
        };
        parts.push(format!(
            "{} × {}, {mem}, {}% cores",
            c.nums, c.vendor, c.cores
        ));
    }
    parts.join("; ")
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

impl Cluster {
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The bind lock of a node as the watch last delivered it.
    pub fn cached_lock(&self, name: &str) -> Option<hami_kube::lock::CachedLock> {
        self.nodes
            .get(name)
            .map(|e| hami_kube::lock::CachedLock::of(&e.node))
    }

    /// How `node`'s agent allocates, as its annotation says (the lock when
    /// the node is not known).
    pub fn allocation_mode(&self, node: &str) -> hami_api::node::AllocationMode {
        let value = self
            .nodes
            .get(node)
            .and_then(|e| e.node.metadata.annotations.as_ref())
            .and_then(|a| a.get(ann::NODE_ALLOCATION_MODE))
            .map(String::as_str);
        hami_api::node::AllocationMode::of_node(value)
    }

    pub fn reservation(&self, key: &str) -> Option<&Reservation> {
        self.reservations.get(key)
    }

    /// Names of nodes currently judged unhealthy by the handshake rules.
    pub fn unhealthy_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| !e.healthy)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Every node that registered cards (healthy or not), by name.
    pub fn node_views(&self) -> Vec<NodeView> {
        let mut v: Vec<NodeView> = self
            .nodes
            .iter()
            .filter_map(|(name, e)| {
                let a = e.node.metadata.annotations.as_ref();
                let registered = a.is_some_and(|a| a.contains_key(ann::NODE_NVIDIA_REGISTER));
                (registered || self.snapshot.node(name).is_some()).then(|| NodeView {
                    name: name.clone(),
                    healthy: e.healthy,
                    handshake: a.and_then(|a| a.get(ann::NODE_HANDSHAKE)).cloned(),
                    mode: self.allocation_mode(name),
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A node's handshake annotation `key` as the watch last delivered it.
    pub fn handshake_of(&self, node: &str, key: &str) -> Option<String> {
        self.nodes
            .get(node)?
            .node
            .metadata
            .annotations
            .as_ref()?
            .get(key)
            .cloned()
    }

    /// GPU pods waiting for a node, by `namespace/name`.
    pub fn pending(&self) -> impl Iterator<Item = (&str, &Pending)> {
        self.pending.iter().map(|(k, p)| (k.as_str(), p))
    }

    // ---- nodes

    pub fn nodes_restart(&mut self) {
        self.node_inventory.restart();
    }

    /// Applies a node from the watch. Returns the handshake value to write
    /// back, if any.
    pub fn upsert_node(&mut self, engine: &Engine, node: Node, now: Timestamp) -> Option<String> {
        let name = node.name_any();
        self.node_inventory.upsert(&name);
        let verdict = handshake::judge(&node, now, &engine.nvidia.config.resource_count_name);
        let stale_vendors = stale_of(&vendor_verdicts(engine, &node, now));
        self.apply_node(engine, &name, &node, verdict.healthy, &stale_vendors);
        let mode = hami_api::node::AllocationMode::of_node(
            node.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ann::NODE_ALLOCATION_MODE))
                .map(String::as_str),
        );
        if self.nodes.contains_key(&name) && self.allocation_mode(&name) != mode
            || !self.nodes.contains_key(&name) && mode.lock_free()
        {
            tracing::info!(
                node = name,
                mode = mode.as_str(),
                lock = !mode.lock_free(),
                "node allocation mode"
            );
        }
        self.nodes.insert(
            name,
            NodeEntry {
                node,
                healthy: verdict.healthy,
                stale_vendors,
            },
        );
        verdict.answer
    }

    /// `healthy` is the NVIDIA handshake's verdict: it decides about the
    /// NVIDIA cards only, so a node of another vendor (whose plugin never
    /// answers hami.io/node-handshake) keeps its cards. The vendors in
    /// `stale` lost their own handshake: their cards are left out.
    fn apply_node(
        &mut self,
        engine: &Engine,
        name: &str,
        node: &Node,
        healthy: bool,
        stale: &[usize],
    ) {
        let include = |vendor: usize| {
            if vendor == 0 {
                healthy
            } else {
                !stale.contains(&vendor)
            }
        };
        if let Err(e) = engine.add_node_vendors(&mut self.snapshot, node, &include) {
            tracing::warn!(node = name, error = %e, "a vendor's node registration is not understood; that vendor's cards are left out");
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        self.node_inventory.delete(name);
        self.forget_node(name);
    }

    pub fn nodes_synced(&mut self) {
        for name in self.node_inventory.synced() {
            self.forget_node(&name);
        }
    }

    fn forget_node(&mut self, name: &str) {
        self.nodes.remove(name);
        self.snapshot.remove_node(name);
    }

    /// Re-judges every node's handshakes at `now` (staleness is a matter of
    /// time, not only of events). Returns `(node, annotation, value to
    /// write)` triples.
    pub fn rejudge_nodes(
        &mut self,
        engine: &Engine,
        now: Timestamp,
    ) -> Vec<(String, String, String)> {
        let mut answers = Vec::new();
        let mut flips = Vec::new();
        for (name, entry) in &self.nodes {
            let v = handshake::judge(&entry.node, now, &engine.nvidia.config.resource_count_name);
            let verdicts = vendor_verdicts(engine, &entry.node, now);
            let stale = stale_of(&verdicts);
            if v.healthy != entry.healthy || stale != entry.stale_vendors {
                flips.push((name.clone(), v.healthy, stale));
            }
            if let Some(a) = v.answer {
                answers.push((name.clone(), ann::NODE_HANDSHAKE.to_string(), a));
            }
            for (_, key, verdict) in verdicts {
                if let Some(a) = verdict.answer {
                    answers.push((name.clone(), key, a));
                }
            }
        }
        for (name, healthy, stale) in flips {
            let node = match self.nodes.get_mut(&name) {
                Some(e) => {
                    if e.healthy && !healthy {
                        tracing::warn!(
                            node = name,
                            "NVIDIA device plugin stopped reporting (handshake stale); its cards leave the cache"
                        );
                    }
                    for v in stale.iter().filter(|v| !e.stale_vendors.contains(v)) {
                        tracing::warn!(
                            node = name,
                            vendor = engine.vendor(*v).word(),
                            "device plugin stopped reporting (handshake stale); its cards leave the cache"
                        );
                    }
                    e.healthy = healthy;
                    e.stale_vendors = stale.clone();
                    e.node.clone()
                }
                None => continue,
            };
            self.apply_node(engine, &name, &node, healthy, &stale);
        }
        answers
    }

    // ---- pods

    pub fn pods_restart(&mut self) {
        self.pod_inventory.restart();
    }

    /// Applies a pod from the watch.
    pub fn upsert_pod(&mut self, engine: &Engine, pod: &Pod) {
        let key = pod_key(pod);
        self.pod_inventory.upsert(&key);
        self.track_pending(engine, &key, pod);
        let bind_phase = annotation(pod, ann::BIND_PHASE);
        // The engine decides what a pod holds (a given-up bind holds nothing).
        let record = match engine.pod_record(pod) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(pod = key, error = %e, "allocation annotation not understood; pod holds nothing");
                None
            }
        };
        match record {
            Some(r) => {
                self.reservations.remove(&key);
                self.snapshot.add_pod(&key, r);
            }
            None => {
                let keep = self
                    .reservations
                    .get(&key)
                    .is_some_and(|r| r.uid.is_none() || r.uid == pod.metadata.uid)
                    && !matches!(phase(pod), Some("Succeeded" | "Failed"))
                    && pod.metadata.deletion_timestamp.is_none();
                if !keep {
                    self.reservations.remove(&key);
                    self.snapshot.remove_pod(&key);
                }
            }
        }
        if bind_phase.is_some() || annotation(pod, ann::VGPU_NODE).is_some() {
            self.pods.insert(
                key,
                PodEntry {
                    uid: pod.metadata.uid.clone(),
                    node: annotation(pod, ann::VGPU_NODE).map(str::to_string),
                    bind_phase: bind_phase.map(str::to_string),
                    bind_time: annotation(pod, ann::BIND_TIME).and_then(|t| t.parse().ok()),
                    phase: phase(pod).map(str::to_string),
                },
            );
        } else {
            self.pods.remove(&key);
        }
    }

    pub fn delete_pod(&mut self, key: &str) {
        self.pod_inventory.delete(key);
        self.forget_pod(key);
    }

    pub fn pods_synced(&mut self) {
        for key in self.pod_inventory.synced() {
            self.forget_pod(&key);
        }
    }

    /// Keeps [`Cluster::pending`] to the GPU pods without a node. A pod's
    /// requests, scheduler name and creation time cannot change, so it is
    /// parsed once, when it first shows up unbound.
    fn track_pending(&mut self, engine: &Engine, key: &str, pod: &Pod) {
        let unbound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_none())
            && pod.metadata.deletion_timestamp.is_none()
            && !matches!(phase(pod), Some("Succeeded" | "Failed"));
        if !unbound {
            self.pending.remove(key);
            return;
        }
        if self.pending.contains_key(key) {
            return;
        }
        let Ok(Some(request)) = engine.prepare(pod) else {
            return;
        };
        self.pending.insert(
            key.to_string(),
            Pending {
                scheduler_name: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.scheduler_name.clone())
                    .unwrap_or_else(|| "default-scheduler".into()),
                since: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
                request: request_words(&request),
                rejections: BTreeMap::new(),
                reason: None,
            },
        );
    }

    fn forget_pod(&mut self, key: &str) {
        self.pending.remove(key);
        self.pods.remove(key);
        self.reservations.remove(key);
        self.snapshot.remove_pod(key);
    }

    // ---- decisions

    /// Why a node was rejected, in operator terms: a node left out of the
    /// snapshot because its device plugin stopped answering the handshake
    /// says so, rather than that it has no devices.
    fn rejection_reason(&self, node: &str, engine_reason: String) -> String {
        match self.nodes.get(node) {
            Some(e) if !e.healthy => {
                let handshake = e
                    .node
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ann::NODE_HANDSHAKE))
                    .map_or("none", String::as_str);
                format!(
                    "NodeNotReporting: the device plugin has not answered the handshake ({handshake}); devices withheld until it reports"
                )
            }
            _ => engine_reason,
        }
    }

    /// Tells the snapshot which candidates have a bind in flight (their
    /// lock and its holder as the watches show them), judged at `now`: the
    /// engine passes over busy nodes by the same rule in the extender and
    /// in `hami schedule`.
    fn refresh_binds_in_flight(&mut self, candidates: &[String], now: Timestamp) {
        for name in candidates {
            let lock = self
                .nodes
                .get(name)
                .and_then(|e| e.node.metadata.annotations.as_ref())
                .and_then(|a| a.get(ann::NODE_LOCK))
                .and_then(|v| hami_api::node::NodeLock::decode(v).ok());
            match lock {
                Some(lock) => {
                    let holder = self
                        .pods
                        .get(&format!("{}/{}", lock.namespace, lock.pod))
                        .map(PodEntry::as_holder);
                    let bind = BindInFlight::from_lock(name, &lock, holder, now);
                    self.snapshot.set_bind_in_flight(name, bind);
                }
                None => {
                    self.snapshot.clear_bind_in_flight(name);
                }
            }
        }
    }

    /// [`Cluster::filter`] that offers nodes with a long-held bind lock
    /// only when no other candidate fits ([`Engine::filter_avoiding_busy`]).
    pub fn filter_avoiding_busy(
        &mut self,
        engine: &Engine,
        req: &PodRequest,
        uid: Option<&str>,
        candidates: &[String],
        now: Timestamp,
        busy_after: SignedDuration,
    ) -> FilterOutcome {
        self.refresh_binds_in_flight(candidates, now);
        let rule = BusyRule { now, busy_after };
        self.decide(engine, req, uid, candidates, now, Some(rule))
    }

    /// Filter: the best node among `candidates` and why the others were
    /// rejected. A fitting decision is reserved at once, so the next pod
    /// filtered sees it.
    pub fn filter(
        &mut self,
        engine: &Engine,
        req: &PodRequest,
        uid: Option<&str>,
        candidates: &[String],
        now: Timestamp,
    ) -> FilterOutcome {
        self.decide(engine, req, uid, candidates, now, None)
    }

    fn decide(
        &mut self,
        engine: &Engine,
        req: &PodRequest,
        uid: Option<&str>,
        candidates: &[String],
        now: Timestamp,
        busy: Option<BusyRule>,
    ) -> FilterOutcome {
        if let Some(r) = self
            .reservations
            .get(&req.key)
            .filter(|r| r.binding && (r.uid.is_none() || r.uid.as_deref() == uid))
        {
            // A bind of this pod is still running (binds can outlive
            // kube-scheduler's httpTimeout, which then filters again). Its
            // cards are being written: keep them, and give no other answer.
            let node = r.node.clone();
            let why = format!("BindInFlight: a bind of this pod to node {node} is still running");
            return FilterOutcome::pinned(node, candidates, why);
        }
        if !self.reservations.contains_key(&req.key)
            && let Some(held) = self.snapshot.pod(&req.key)
        {
            // The watch shows it bound and holding cards (kube-scheduler's
            // informer lags ours): those cards are not to be freed.
            let node = held.node.clone();
            let why = format!("AlreadyBound: the pod is bound to node {node}");
            return FilterOutcome::pinned(node, candidates, why);
        }
        // An earlier decision for this pod no longer counts.
        let earlier = self.reservations.remove(&req.key).map(|r| r.node);
        self.snapshot.remove_pod(&req.key);
        let decision = match busy {
            Some(rule) => engine.filter_avoiding_busy(
                &self.snapshot,
                req,
                Some(candidates),
                Mode::Explain,
                rule,
            ),
            None => engine.filter(&self.snapshot, req, Some(candidates), Mode::Explain),
        };
        let mut failed: BTreeMap<String, String> = decision
            .rejected
            .iter()
            .map(|(n, r)| (n.to_string(), self.rejection_reason(n, r.to_string())))
            .collect();
        failed.extend(
            decision
                .busy
                .iter()
                .map(|(n, b)| (n.to_string(), b.reason())),
        );
        let node = decision.node.map(str::to_string);
        if let Some(p) = self.pending.get_mut(&req.key) {
            p.rejections = BTreeMap::new();
            for why in failed.values() {
                for word in reason_words(why) {
                    *p.rejections.entry(word).or_default() += 1;
                }
            }
            p.reason = failed.iter().next().map(|(n, why)| format!("{n}: {why}"));
        }
        let outcome = FilterOutcome {
            freed: earlier.filter(|_| node.is_none()),
            node,
            failed,
        };
        if let Some(node) = &outcome.node {
            let devices = decision.devices.clone();
            engine.reserve(&mut self.snapshot, req, node, devices.clone());
            self.reservations.insert(
                req.key.clone(),
                Reservation {
                    uid: uid.map(str::to_string),
                    node: node.clone(),
                    devices,
                    request: Some(req.clone()),
                    at: now,
                    binding: false,
                },
            );
        }
        outcome
    }

    /// The devices to bind `key` with on `node`: the reservation Filter
    /// made, else (a restarted scheduler, a pod filtered elsewhere) a fresh
    /// decision restricted to that node. Marks the reservation as binding.
    pub fn claim_for_bind(
        &mut self,
        engine: &Engine,
        req: &PodRequest,
        uid: Option<&str>,
        node: &str,
        now: Timestamp,
    ) -> Result<PodDevices, String> {
        if let Some(d) = self.claim_reserved(&req.key, uid, node) {
            return Ok(d);
        }
        let candidates = [node.to_string()];
        let outcome = self.filter(engine, req, uid, &candidates, now);
        match outcome.node {
            Some(_) => {
                let r = self
                    .reservations
                    .get_mut(&req.key)
                    .expect("filter reserved the decision");
                r.binding = true;
                Ok(r.devices.clone())
            }
            None => Err(outcome
                .failed
                .get(node)
                .cloned()
                .unwrap_or_else(|| "node unknown to the scheduler".into())),
        }
    }

    /// The devices Filter reserved for `key` on `node` (same pod uid), if
    /// any; marks the reservation as binding.
    pub fn claim_reserved(
        &mut self,
        key: &str,
        uid: Option<&str>,
        node: &str,
    ) -> Option<PodDevices> {
        let r = self.reservations.get_mut(key)?;
        if r.node != node || !(r.uid.is_none() || r.uid.as_deref() == uid) {
            return None;
        }
        r.binding = true;
        Some(r.devices.clone())
    }

    /// The request behind a reservation, if the pod has one.
    pub fn reserved_request(&self, key: &str) -> Option<PodRequest> {
        self.reservations.get(key)?.request.clone()
    }

    /// Why the cards `devices` on `node` can no longer be bound: one of them
    /// holds more than it has (another pod got part of the same slice, e.g.
    /// from a new leader while this bind waited for the node lock).
    pub fn overbooked(&self, node: &str, devices: &PodDevices) -> Option<String> {
        let state = self.snapshot.node(node)?;
        devices.devices().find_map(|d| {
            let card = state.devices.iter().find(|c| c.info.id == d.uuid)?;
            let (u, i) = (&card.used, &card.info);
            (u.mem > i.devmem || u.slots > i.count || u.cores > i.devcore).then(|| {
                format!(
                    "card {} on node {node} is over-booked ({} of {} MiB, {} of {} slots, {} of {}% cores); filter again",
                    d.uuid, u.mem, i.devmem, u.slots, i.count, u.cores, i.devcore
                )
            })
        })
    }

    /// Forgets a reservation (a failed bind, an expired decision).
    pub fn release(&mut self, key: &str) {
        if self.reservations.remove(key).is_some() {
            self.snapshot.remove_pod(key);
        }
    }

    /// Releases decisions Filter made that no bind followed within `ttl`
    /// (kube-scheduler chose no node, or the pod went elsewhere).
    /// Returns `(pod, node)` of each.
    pub fn expire_reservations(
        &mut self,
        now: Timestamp,
        ttl: SignedDuration,
    ) -> Vec<(String, String)> {
        let old: Vec<(String, String)> = self
            .reservations
            .iter()
            .filter(|(_, r)| !r.binding && now.duration_since(r.at) > ttl)
            .map(|(k, r)| (k.clone(), r.node.clone()))
            .collect();
        for (k, _) in &old {
            self.release(k);
        }
        old
    }

    /// Pods still Pending in `bind-phase=allocating` longer than `timeout`
    /// on nodes in HAMi's lock mode. On a node that allocates without the
    /// lock, `allocating` lasts until the container starts (after its image
    /// is pulled, however long that takes) and nothing waits on it: such a
    /// pod holds its cards while it exists, as the kubelet will start it.
    pub fn stuck_allocating(&self, now: Timestamp, timeout: SignedDuration) -> Vec<StuckPod> {
        let mut v: Vec<StuckPod> = self
            .pods
            .iter()
            .filter(|(_, p)| {
                p.bind_phase.as_deref() == Some("allocating")
                    && matches!(p.phase.as_deref(), None | Some("Pending"))
                    && p.bind_time
                        .is_some_and(|t| now.as_second() - t > timeout.as_secs())
                    && !p
                        .node
                        .as_deref()
                        .is_some_and(|n| self.allocation_mode(n).lock_free())
            })
            .filter_map(|(k, p)| {
                let (ns, name) = k.split_once('/')?;
                Some(StuckPod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    uid: p.uid.clone(),
                    node: p.node.clone().unwrap_or_default(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    /// A stuck pod was marked failed: it holds nothing from now on.
    pub fn give_up(&mut self, key: &str) {
        self.reservations.remove(key);
        self.snapshot.remove_pod(key);
        if let Some(p) = self.pods.get_mut(key) {
            p.bind_phase = Some("failed".into());
        }
    }
}

/// The annotations Bind writes for a decision (node, devices, times, phase).
pub fn bind_annotations(
    engine: &Engine,
    node: &str,
    devices: &PodDevices,
    request: Option<&PodRequest>,
    state: Option<&hami_sched::NodeState>,
    now: Timestamp,
) -> BTreeMap<String, String> {
    let mut m = engine.decision_annotations(node, devices, request, state, now.as_nanosecond());
    let secs = now.as_second().to_string();
    m.insert(ann::VGPU_TIME.into(), secs.clone());
    m.insert(ann::BIND_PHASE.into(), "allocating".into());
    m.insert(ann::BIND_TIME.into(), secs);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use hami_api::DeviceInfo;
    use hami_api::device::encode_devices_json;
    use serde_json::json;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn node(name: &str, handshake: &str, gpus_allocatable: &str) -> Node {
        let devices: Vec<DeviceInfo> = (0..2)
            .map(|i| DeviceInfo {
                id: format!("GPU-{name}-{i}"),
                index: i,
                count: 10,
                devmem: 1000,
                devcore: 100,
                device_type: "NVIDIA-T4".into(),
                health: true,
                ..Default::default()
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {
                ann::NODE_NVIDIA_REGISTER: encode_devices_json(&devices),
                ann::NODE_HANDSHAKE: handshake,
            }},
            "status": {"allocatable": {"nvidia.com/gpu": gpus_allocatable}},
        }))
        .unwrap()
    }

    fn pod(name: &str, uid: &str, mem: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {
                "nvidia.com/gpu": "1", "nvidia.com/gpumem": mem}}}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap()
    }

    /// An engine and a cluster of healthy two-card nodes, at a fixed time.
    fn reporting_nodes(names: &[&str]) -> (Engine, Cluster, Timestamp) {
        let engine = Engine::default();
        let mut c = Cluster::default();
        let now = t("2026-01-01T00:00:00Z");
        for n in names {
            c.upsert_node(&engine, node(n, "Reported x", "20"), now);
        }
        (engine, c, now)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn free_mem(c: &Cluster, node: &str) -> u64 {
        let n = c.snapshot().node(node).unwrap();
        n.totals.mem - n.totals.used_mem
    }

    #[test]
    fn filter_reserves_so_back_to_back_pods_never_share_a_full_card() {
        let (engine, mut c, now) = reporting_nodes(&["n1"]);
        let cands = names(&["n1"]);
        let req = |p: &Pod| engine.prepare(p).unwrap().unwrap();
        let a = pod("a", "ua", "1000");
        let b = pod("b", "ub", "1000");
        let x = pod("x", "ux", "1000");
        let oa = c.filter(&engine, &req(&a), Some("ua"), &cands, now);
        let ob = c.filter(&engine, &req(&b), Some("ub"), &cands, now);
        assert_eq!(
            (oa.node.as_deref(), ob.node.as_deref()),
            (Some("n1"), Some("n1"))
        );
        assert_eq!(free_mem(&c, "n1"), 0);
        let ox = c.filter(&engine, &req(&x), Some("ux"), &cands, now);
        assert_eq!(ox.node, None);
        assert!(
            ox.failed["n1"].contains("CardInsufficientMemory"),
            "{:?}",
            ox.failed
        );
        // Filtering a pod again replaces its own reservation, not adds one.
        let oa2 = c.filter(&engine, &req(&a), Some("ua"), &cands, now);
        assert_eq!(oa2.node.as_deref(), Some("n1"));
        assert_eq!(free_mem(&c, "n1"), 0);
        // Watch events without annotations keep the reservation; deletion frees it.
        c.upsert_pod(&engine, &a);
        assert_eq!(free_mem(&c, "n1"), 0);
        c.delete_pod("ns/a");
        assert_eq!(free_mem(&c, "n1"), 1000);
    }

    #[test]
    fn rejection_reasons_are_counted_by_word() {
        let words = |w: &str| reason_words(w).into_iter().collect::<Vec<_>>();
        assert_eq!(
            words("1/2 CardInsufficientMemory, 1/2 CardUuidMismatch"),
            ["CardInsufficientMemory", "CardUuidMismatch"]
        );
        assert_eq!(
            words("NodeNotReporting: the device plugin has not answered"),
            ["NodeNotReporting"]
        );
    }

    #[test]
    fn the_dashboard_shows_cards_their_pods_and_why_a_pod_waits() {
        use crate::dashboard;
        let (engine, mut c, now) = reporting_nodes(&["n1", "n2"]);
        c.upsert_node(
            &engine,
            node("n3", "Requesting_2026-01-01 00:00:00", "0"),
            now,
        );
        // n3's plugin never answers: a minute on, its cards are withheld.
        c.rejudge_nodes(&engine, now + SignedDuration::from_secs(61));
        let cands = names(&["n1", "n2"]);
        let req = |p: &Pod| engine.prepare(p).unwrap().unwrap();
        let mut a = pod("a", "ua", "600");
        a.spec.as_mut().unwrap().scheduler_name = Some("hami-scheduler".into());
        let mut big = pod("big", "ub", "5000");
        big.spec.as_mut().unwrap().scheduler_name = Some("hami-scheduler".into());
        c.upsert_pod(&engine, &a);
        c.upsert_pod(&engine, &big);
        let placed = c.filter(&engine, &req(&a), Some("ua"), &cands, now);
        let a_node = placed.node.expect("a fits");
        assert!(
            c.filter(&engine, &req(&big), Some("ub"), &cands, now)
                .node
                .is_none()
        );

        let (totals, models) = dashboard::totals(&c);
        assert_eq!(
            (totals.nodes, totals.healthy_nodes, totals.cards),
            (3, 2, 4)
        );
        assert_eq!(
            totals.capacity.memory_mi_b,
            dashboard::Amount {
                used: 600,
                total: 4000
            }
        );
        assert_eq!(
            totals.capacity.slots,
            dashboard::Amount { used: 1, total: 40 }
        );
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].model, "NVIDIA-T4");

        let nodes = dashboard::node_list(&c, &|_| None).nodes;
        let names_seen: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names_seen, ["n1", "n2", "n3"]);
        let n3 = &nodes[2];
        assert!(!n3.healthy && n3.cards.is_empty());
        assert!(n3.reason.as_deref().unwrap().contains("Requesting_"));
        let shared: Vec<_> = nodes
            .iter()
            .flat_map(|n| n.cards.iter().map(move |card| (n.name.as_str(), card)))
            .filter(|(_, card)| !card.pods.is_empty())
            .collect();
        assert_eq!(shared.len(), 1, "a holds one card");
        let (on, card) = shared[0];
        assert_eq!(on, a_node);
        assert_eq!(card.pods[0].name, "a");
        assert_eq!(card.pods[0].memory_mi_b, 600);
        assert_eq!(card.capacity.memory_mi_b.used, 600);

        let pending = dashboard::pending_list(&c, "hami-scheduler").pods;
        let waiting: Vec<&str> = pending.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(waiting, ["a", "big"], "neither is bound yet");
        let big_row = &pending[1];
        assert_eq!(big_row.request, "1 × NVIDIA, 5000 MiB, 0% cores");
        assert_eq!(big_row.rejections.len(), 1);
        assert_eq!(big_row.rejections[0].nodes, 2);
        assert_eq!(big_row.rejections[0].reason, "CardInsufficientMemory");
        assert!(big_row.reason.as_deref().unwrap().starts_with("n1: "));
        assert!(dashboard::pending_list(&c, "other").pods.is_empty());

        // Bound: no longer pending; deleted: gone.
        let mut bound = a.clone();
        bound.spec.as_mut().unwrap().node_name = Some(a_node.clone());
        c.upsert_pod(&engine, &bound);
        c.delete_pod("ns/big");
        assert!(
            dashboard::pending_list(&c, "hami-scheduler")
                .pods
                .is_empty()
        );
    }

    #[test]
    fn reservations_without_a_bind_expire() {
        let (engine, mut c, now) = reporting_nodes(&["n1"]);
        let a = pod("a", "ua", "600");
        let req = engine.prepare(&a).unwrap().unwrap();
        c.filter(&engine, &req, Some("ua"), &names(&["n1"]), now);
        let ttl = SignedDuration::from_mins(2);
        assert!(
            c.expire_reservations(now + SignedDuration::from_secs(60), ttl)
                .is_empty()
        );
        assert_eq!(
            c.expire_reservations(now + SignedDuration::from_secs(121), ttl),
            vec![("ns/a".to_string(), "n1".to_string())]
        );
        assert_eq!(free_mem(&c, "n1"), 2000);
        // A reservation whose bind started is left to the bind.
        c.filter(&engine, &req, Some("ua"), &names(&["n1"]), now);
        c.claim_for_bind(&engine, &req, Some("ua"), "n1", now)
            .unwrap();
        assert!(
            c.expire_reservations(now + SignedDuration::from_mins(10), ttl)
                .is_empty()
        );
    }

    #[test]
    fn a_filter_that_drops_an_earlier_decision_and_finds_nothing_says_what_it_freed() {
        let (engine, mut c, now) = reporting_nodes(&["n1"]);
        let a = pod("a", "ua", "600");
        let req = engine.prepare(&a).unwrap().unwrap();
        let first = c.filter(&engine, &req, Some("ua"), &names(&["n1"]), now);
        assert_eq!((first.node.as_deref(), first.freed), (Some("n1"), None));
        // Filtered again, with no candidate that fits: the decision on n1
        // is gone, and the outcome names n1 (no pod event will say so).
        let again = c.filter(&engine, &req, Some("ua"), &names(&["n9"]), now);
        assert_eq!(again.node, None);
        assert_eq!(again.freed.as_deref(), Some("n1"));
        assert_eq!(free_mem(&c, "n1"), 2000);
        // A new decision elsewhere frees nothing worth saying: its bind is
        // an event.
        let third = c.filter(&engine, &req, Some("ua"), &names(&["n1"]), now);
        assert_eq!((third.node.as_deref(), third.freed), (Some("n1"), None));
    }

    #[test]
    fn bind_without_a_reservation_decides_on_that_node_only() {
        let (engine, mut c, now) = reporting_nodes(&["n1"]);
        let big = pod("big", "u", "5000");
        let req = engine.prepare(&big).unwrap().unwrap();
        let err = c
            .claim_for_bind(&engine, &req, Some("u"), "n1", now)
            .unwrap_err();
        assert!(err.contains("CardInsufficientMemory"), "{err}");
        let err = c
            .claim_for_bind(&engine, &req, Some("u"), "nowhere", now)
            .unwrap_err();
        assert!(err.contains("NodeInsufficientDevice"), "{err}");
        let ok = pod("ok", "u2", "500");
        let req = engine.prepare(&ok).unwrap().unwrap();
        let devices = c
            .claim_for_bind(&engine, &req, Some("u2"), "n1", now)
            .unwrap();
        assert_eq!(devices.devices().count(), 1);
    }

    #[test]
    fn each_vendors_handshake_decides_about_its_own_cards() {
        let engine = Engine::from_config(&Default::default(), hami_sched::Policies::default());
        let mut c = Cluster::default();
        let t0 = t("2026-01-01T00:00:00Z");
        let dcu = "DCU-a,4,65520,100,DCU-K100_AI,0,true,0,hami-core:";
        let mut n = node("n1", "Reported x", "20");
        let a = n.metadata.annotations.as_mut().unwrap();
        a.insert("hami.io/node-dcu-register".into(), dcu.into());
        a.insert(
            "hami.io/node-handshake-dcu".into(),
            "Requesting_2026-01-01 00:00:00".into(),
        );
        c.upsert_node(&engine, n.clone(), t0);
        assert_eq!(c.snapshot().node("n1").unwrap().devices.len(), 3);
        // The DCU plugin never answers: after a minute its card leaves,
        // the NVIDIA cards stay, and both handshakes are answered.
        let answers = c.rejudge_nodes(&engine, t0 + SignedDuration::from_secs(61));
        let ids: Vec<_> = c
            .snapshot()
            .node("n1")
            .unwrap()
            .devices
            .iter()
            .map(|d| d.info.id.clone())
            .collect();
        assert_eq!(ids, ["GPU-n1-0", "GPU-n1-1"]);
        let keys: Vec<_> = answers.iter().map(|a| a.1.as_str()).collect();
        assert_eq!(
            keys,
            [ann::NODE_HANDSHAKE],
            "a stale Requesting is not answered again"
        );
        // The plugin reports again: the card is back and is asked anew.
        n.metadata.annotations.as_mut().unwrap().insert(
            "hami.io/node-handshake-dcu".into(),
            "Reported 2026-01-01 00:01:05".into(),
        );
        let t1 = t0 + SignedDuration::from_secs(66);
        c.upsert_node(&engine, n, t1);
        assert_eq!(c.snapshot().node("n1").unwrap().devices.len(), 3);
        let answers = c.rejudge_nodes(&engine, t1);
        assert!(
            answers
                .iter()
                .any(|a| a.1 == "hami.io/node-handshake-dcu" && a.2.starts_with("Requesting_")),
            "{answers:?}"
        );
    }

    #[test]
    fn stale_handshake_drops_devices_and_a_report_brings_them_back() {
        let engine = Engine::default();
        let mut c = Cluster::default();
        let t0 = t("2026-01-01T00:00:00Z");
        let answer = c.upsert_node(
            &engine,
            node("n1", "Requesting_2026-01-01 00:00:00", "0"),
            t0,
        );
        assert_eq!(answer, None);
        assert!(c.snapshot().node("n1").is_some());
        // Nothing changes but time.
        c.rejudge_nodes(&engine, t0 + SignedDuration::from_secs(61));
        assert!(c.snapshot().node("n1").is_none());
        assert_eq!(c.unhealthy_nodes(), vec!["n1".to_string()]);
        // Filter says why the node is out.
        let p = pod("p", "u", "100");
        let req = engine.prepare(&p).unwrap().unwrap();
        let o = c.filter(&engine, &req, Some("u"), &names(&["n1"]), t0);
        assert_eq!(o.node, None);
        assert!(
            o.failed["n1"].starts_with("NodeNotReporting")
                && o.failed["n1"].contains("Requesting_"),
            "{:?}",
            o.failed
        );
        let answer = c.upsert_node(
            &engine,
            node("n1", "Reported 2026-01-01 00:01:10", "20"),
            t0 + SignedDuration::from_secs(70),
        );
        assert_eq!(answer.as_deref(), Some("Requesting_2026-01-01 00:01:10"));
        assert!(c.snapshot().node("n1").is_some());
    }

    #[test]
    fn stuck_allocating_pods_are_found_and_given_up() {
        let engine = Engine::default();
        let mut c = Cluster::default();
        let now = t("2026-01-01T00:10:00Z");
        c.upsert_node(&engine, node("n1", "Reported x", "20"), now);
        let mut p = pod("p", "u", "400");
        let secs = (now.as_second() - 200).to_string();
        let devices = PodDevices::decode("x", "GPU-n1-0,NVIDIA,400,0:;").unwrap();
        let mut annotations = bind_annotations(&engine, "n1", &devices, None, None, now);
        annotations.insert(ann::BIND_TIME.into(), secs);
        p.metadata.annotations = Some(annotations);
        p.spec.as_mut().unwrap().node_name = Some("n1".into());
        c.upsert_pod(&engine, &p);
        assert_eq!(free_mem(&c, "n1"), 1600);
        let timeout = SignedDuration::from_mins(2);
        let stuck = c.stuck_allocating(now, timeout);
        assert_eq!(
            stuck,
            vec![StuckPod {
                namespace: "ns".into(),
                name: "p".into(),
                uid: Some("u".into()),
                node: "n1".into()
            }]
        );
        assert!(
            c.stuck_allocating(now - SignedDuration::from_secs(100), timeout)
                .is_empty()
        );
        // The same pod on a node that allocates without the lock is not
        // stuck: it starts once its image is pulled, whenever that is.
        let mut free = node("n1", "Reported x", "20");
        free.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::NODE_ALLOCATION_MODE.into(), "pod-resources".into());
        c.upsert_node(&engine, free, now);
        assert!(c.stuck_allocating(now, timeout).is_empty());
        c.upsert_node(&engine, node("n1", "Reported x", "20"), now);
        assert_eq!(c.stuck_allocating(now, timeout).len(), 1);
        c.give_up("ns/p");
        assert_eq!(free_mem(&c, "n1"), 2000);
        // The watch then shows bind-phase=failed: still nothing held...
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::BIND_PHASE.into(), "failed".into());
        c.upsert_pod(&engine, &p);
        assert_eq!(free_mem(&c, "n1"), 2000);
        assert!(c.stuck_allocating(now, timeout).is_empty());
        // ...unless the pod runs anyway: then its devices are in use.
        p.status.as_mut().unwrap().phase = Some("Running".into());
        c.upsert_pod(&engine, &p);
        assert_eq!(free_mem(&c, "n1"), 1600);
    }

    /// Healthy nodes n1 (bind lock `lock`) and n2.
    fn two_nodes_first_locked(engine: &Engine, c: &mut Cluster, lock: &str, now: Timestamp) {
        let mut n1 = node("n1", "Reported x", "20");
        n1.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::NODE_LOCK.into(), lock.into());
        c.upsert_node(engine, n1, now);
        c.upsert_node(engine, node("n2", "Reported x", "20"), now);
    }

    #[test]
    fn a_node_allocates_by_lock_unless_its_agent_says_otherwise() {
        use hami_api::node::AllocationMode;
        let (engine, mut c, now) = reporting_nodes(&["plain"]);
        let mut nri = node("nri", "Reported x", "20");
        nri.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::NODE_ALLOCATION_MODE.into(), "nri".into());
        c.upsert_node(&engine, nri.clone(), now);
        assert_eq!(c.allocation_mode("plain"), AllocationMode::Lock);
        assert_eq!(c.allocation_mode("nri"), AllocationMode::Nri);
        assert_eq!(c.allocation_mode("unknown"), AllocationMode::Lock);
        // The agent going back to HAMi's protocol (annotation removed) is
        // seen at the next node event.
        nri.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(ann::NODE_ALLOCATION_MODE);
        c.upsert_node(&engine, nri, now);
        assert_eq!(c.allocation_mode("nri"), AllocationMode::Lock);
    }

    #[test]
    fn nodes_with_a_long_held_lock_are_offered_last() {
        let engine = Engine::default();
        let mut c = Cluster::default();
        let now = t("2026-01-01T00:10:00Z");
        two_nodes_first_locked(&engine, &mut c, "2026-01-01T00:09:00Z,ns,holder", now);
        // The holder is bound to n1 and waits for its device plugin.
        let mut holder = pod("holder", "uh", "100");
        let devices = PodDevices::decode("x", "GPU-n1-0,NVIDIA,100,0:;").unwrap();
        holder.metadata.annotations =
            Some(bind_annotations(&engine, "n1", &devices, None, None, now));
        holder.spec.as_mut().unwrap().node_name = Some("n1".into());
        c.upsert_pod(&engine, &holder);
        let busy_after = SignedDuration::from_secs(5);
        let cands = names(&["n1", "n2"]);
        // Binpack prefers n1 (it holds the only pod), but its lock is stuck.
        let p = pod("p", "u", "100");
        let req = engine.prepare(&p).unwrap().unwrap();
        let o = c.filter_avoiding_busy(&engine, &req, Some("u"), &cands, now, busy_after);
        assert_eq!(o.node.as_deref(), Some("n2"));
        assert!(o.failed["n1"].starts_with("NodeLockBusy"), "{:?}", o.failed);
        // A fresh lock does not count.
        let o = c.filter_avoiding_busy(
            &engine,
            &req,
            Some("u"),
            &cands,
            t("2026-01-01T00:09:03Z"),
            busy_after,
        );
        assert_eq!(o.node.as_deref(), Some("n1"));
        // Once the holder is allocated, the lock no longer counts either.
        holder
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::BIND_PHASE.into(), "success".into());
        c.upsert_pod(&engine, &holder);
        let o = c.filter_avoiding_busy(&engine, &req, Some("u"), &cands, now, busy_after);
        assert_eq!(o.node.as_deref(), Some("n1"));
        // If only the busy node fits, it is still offered.
        holder
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ann::BIND_PHASE.into(), "allocating".into());
        c.upsert_pod(&engine, &holder);
        let o = c.filter_avoiding_busy(&engine, &req, Some("u"), &names(&["n1"]), now, busy_after);
        assert_eq!(o.node.as_deref(), Some("n1"));
        let big = pod("big", "ub", "1000");
        let req = engine.prepare(&big).unwrap().unwrap();
        let o = c.filter_avoiding_busy(&engine, &req, Some("ub"), &cands, now, busy_after);
        assert_eq!(o.node.as_deref(), Some("n2"));
    }

    #[test]
    fn spread_pods_avoid_any_node_with_a_bind_in_flight() {
        let engine = Engine::default();
        let mut c = Cluster::default();
        let now = t("2026-01-01T00:10:00Z");
        // Both nodes empty: spread would take n1 (first among equals), but
        // n1 was locked a second ago by a pod whose bind the watch has not
        // shown yet.
        two_nodes_first_locked(&engine, &mut c, "2026-01-01T00:09:59Z,ns,inflight", now);
        let cands = names(&["n1", "n2"]);
        let busy_after = SignedDuration::from_secs(5);
        let mut p = pod("p", "u", "100");
        p.metadata.annotations =
            Some([(ann::NODE_SCHEDULER_POLICY.to_string(), "spread".to_string())].into());
        let req = engine.prepare(&p).unwrap().unwrap();
        let o = c.filter_avoiding_busy(&engine, &req, Some("u"), &cands, now, busy_after);
        assert_eq!(o.node.as_deref(), Some("n2"));
        assert!(o.failed["n1"].starts_with("NodeLockBusy"), "{:?}", o.failed);
        // A binpack pod waits for the lock to look stuck before avoiding it.
        c.release("ns/p");
        let b = pod("b", "ub", "100");
        let req = engine.prepare(&b).unwrap().unwrap();
        let o = c.filter_avoiding_busy(&engine, &req, Some("ub"), &cands, now, busy_after);
        assert_eq!(o.node.as_deref(), Some("n1"));
        // An unseen holder stops counting once the lock is old: it is more
        // likely gone than binding.
        c.release("ns/b");
        let later = t("2026-01-01T00:10:10Z");
        let req = engine.prepare(&p).unwrap().unwrap();
        let o = c.filter_avoiding_busy(&engine, &req, Some("u"), &cands, later, busy_after);
        assert_eq!(o.node.as_deref(), Some("n1"), "{:?}", o.failed);
    }

    #[test]
    fn relist_forgets_what_vanished_while_disconnected() {
        let engine = Engine::default();
        let mut c = Cluster::default();
        let now = t("2026-01-01T00:00:00Z");
        c.nodes_restart();
        c.upsert_node(&engine, node("n1", "Reported x", "20"), now);
        c.upsert_node(&engine, node("n2", "Reported x", "20"), now);
        c.nodes_synced();
        c.nodes_restart();
        c.upsert_node(&engine, node("n2", "Reported x", "20"), now);
        c.nodes_synced();
        assert!(c.snapshot().node("n1").is_none());
        assert!(c.snapshot().node("n2").is_some());
    }

    #[test]
    fn a_filter_retried_during_a_slow_bind_keeps_its_cards() {
        let (engine, mut c, now) = reporting_nodes(&["n1", "n2"]);
        let a = pod("a", "ua", "1000");
        let req_a = engine.prepare(&a).unwrap().unwrap();
        let first = c.filter(&engine, &req_a, Some("ua"), &names(&["n1", "n2"]), now);
        let bound_to = first.node.clone().unwrap();
        let other = if bound_to == "n1" { "n2" } else { "n1" };
        let devices = c
            .claim_for_bind(&engine, &req_a, Some("ua"), &bound_to, now)
            .unwrap();
        // kube-scheduler timed out on the bind and filters the pod again,
        // this time offering only the other node.
        let retry = c.filter(&engine, &req_a, Some("ua"), &names(&[other]), now);
        assert_eq!(retry.node, None, "{retry:?}");
        assert!(retry.failed[other].starts_with("BindInFlight"), "{retry:?}");
        // Offered its node again, it gets the same answer and cards.
        let again = c.filter(&engine, &req_a, Some("ua"), &names(&["n1", "n2"]), now);
        assert_eq!(again.node.as_deref(), Some(bound_to.as_str()));
        assert_eq!(c.reservation("ns/a").unwrap().devices, devices);
        // The card the bind is writing stays taken: filling both cards of
        // that node needs one more 1000 MiB pod, not two.
        let b = pod("b", "ub", "1000");
        let req_b = engine.prepare(&b).unwrap().unwrap();
        let ob = c.filter(&engine, &req_b, Some("ub"), &names(&[&bound_to]), now);
        assert_eq!(ob.node.as_deref(), Some(bound_to.as_str()));
        let x = pod("x", "ux", "1000");
        let req_x = engine.prepare(&x).unwrap().unwrap();
        let ox = c.filter(&engine, &req_x, Some("ux"), &names(&[&bound_to]), now);
        assert_eq!(
            ox.node, None,
            "a third 1000 MiB pod on a two-card node: {ox:?}"
        );
        assert_eq!(free_mem(&c, &bound_to), 0);
    }

    #[test]
    fn a_filter_never_frees_the_cards_of_a_bound_pod() {
        let (engine, mut c, now) = reporting_nodes(&["n1", "n2"]);
        let mut p = pod("p", "u", "1000");
        let devices = PodDevices::decode("x", "GPU-n1-0,NVIDIA,1000,0:;").unwrap();
        p.metadata.annotations = Some(bind_annotations(&engine, "n1", &devices, None, None, now));
        p.spec.as_mut().unwrap().node_name = Some("n1".into());
        c.upsert_pod(&engine, &p);
        assert_eq!(free_mem(&c, "n1"), 1000);
        // kube-scheduler has not seen the binding yet and filters again.
        let req = engine.prepare(&p).unwrap().unwrap();
        let o = c.filter(&engine, &req, Some("u"), &names(&["n2"]), now);
        assert_eq!(o.node, None);
        assert!(o.failed["n2"].starts_with("AlreadyBound"), "{o:?}");
        let o = c.filter(&engine, &req, Some("u"), &names(&["n1", "n2"]), now);
        assert_eq!(o.node.as_deref(), Some("n1"));
        assert_eq!(free_mem(&c, "n1"), 1000, "the bound pod's card was freed");
    }

    #[test]
    fn cards_booked_twice_are_found_before_binding() {
        let (engine, mut c, now) = reporting_nodes(&["n1"]);
        let a = pod("a", "ua", "1000");
        let req = engine.prepare(&a).unwrap().unwrap();
        c.filter(&engine, &req, Some("ua"), &names(&["n1"]), now);
        let mine = c
            .claim_for_bind(&engine, &req, Some("ua"), "n1", now)
            .unwrap();
        assert_eq!(c.overbooked("n1", &mine), None);
        // Another leader bound a pod to the very same card meanwhile.
        let mut other = pod("other", "uo", "1000");
        other.metadata.annotations = Some(bind_annotations(&engine, "n1", &mine, None, None, now));
        other.spec.as_mut().unwrap().node_name = Some("n1".into());
        c.upsert_pod(&engine, &other);
        let why = c.overbooked("n1", &mine).expect("over-booked");
        assert!(why.contains("over-booked"), "{why}");
    }
}
