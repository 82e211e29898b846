//! The node monitor: what every GPU container on this node uses, from the
//! shared regions under `<hook>/vgpu/containers`, as HAMi's vgpu-monitor
//! metrics (spec section 9); freeing what dead processes left behind; and
//! removing the dirs of pods that are gone.
//!
//! A scan ([`Monitor::scan`]) runs every `--monitor-period`:
//!
//! 1. Each `<podUID>_<container>` dir's `*.cache` files are read as copies
//!    ([`hami_shm::copy`]), never mapped: the container can write its dir,
//!    and a mapped file it truncates would kill the node agent with SIGBUS.
//! 2. Each process slot is judged alive or dead from the host's `/proc`: a
//!    slot's process is alive when a host process maps that region file
//!    (same inode and name) and its innermost PID (`NSpid`) and start time
//!    are the slot's. A slot's `host_pid`, when it leads to that very
//!    process, saves the walk over `/proc`. Dead slots stop counting at
//!    once; when no process maps the file any more, they are freed in the
//!    file too ([`hami_shm::copy::clear_slots`]); while some process maps
//!    it, the interposers free them themselves. Outside the host's PID
//!    namespace nothing can be judged: every slot counts, none is freed.
//! 3. Series are kept for containers whose pod the API server lists on
//!    this node, not ended, and whose container has not terminated: a pod
//!    that ends drops out at the next scan.
//! 4. A container that is the only running one on each of its cards (the
//!    `cards` files Allocate writes) gets the region's alone flag, which
//!    `GPU_CORE_UTILIZATION_POLICY=default` reads as "need not be paced";
//!    the flag goes at the first scan after another container gets one of
//!    its cards.
//! 5. Dirs (in `containers/` and `limits/`) of pods the API server no longer
//!    lists on this node are removed once they have been missing for the
//!    grace period and no process maps a region in them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hami_shm::copy::{self, RegionCopy, SlotCopy};
use hami_shm::region::{FLAG_ALONE, RegionError};

/// A pod as the monitor needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    /// Succeeded or Failed: none of its containers gets series.
    pub ended: bool,
    /// Containers whose status says terminated.
    pub terminated: HashSet<String>,
}

impl PodView {
    /// Whether `container` of this pod may still run (the pod has not
    /// ended, the container has not terminated).
    pub fn runs(&self, container: &str) -> bool {
        !self.ended && !self.terminated.contains(container)
    }

    pub fn from_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Option<(String, PodView)> {
        let uid = pod.metadata.uid.clone()?;
        let status = pod.status.as_ref();
        let ended = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| matches!(p, "Succeeded" | "Failed"));
        let terminated = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .filter(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
            .map(|c| c.name.clone())
            .collect();
        Some((
            uid,
            PodView {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                ended,
                terminated,
            },
        ))
    }
}

/// What a region says about one of its device indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUsage {
    pub device_uuid: String,
    /// Bytes held by live processes.
    pub used_bytes: u64,
    /// Bytes; 0 = no limit.
    pub limit_bytes: u64,
    /// Percent of the card the container's kernels kept busy since the
    /// previous scan.
    pub utilization: f64,
    /// Seconds since the container's last kernel launch; `None` never.
    pub last_kernel_secs: Option<f64>,
}

impl DeviceUsage {
    /// Adds another region's usage of the same device of the container.
    fn add(&mut self, o: &DeviceUsage) {
        self.used_bytes += o.used_bytes;
        self.limit_bytes = self.limit_bytes.max(o.limit_bytes);
        self.utilization = (self.utilization + o.utilization).min(100.0);
        self.last_kernel_secs = match (self.last_kernel_secs, o.last_kernel_secs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// One container device: a series of every per-container metric.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerDevice {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub vdevice_index: usize,
    pub usage: DeviceUsage,
}

/// A card as NVML sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCard {
    pub index: u32,
    pub uuid: String,
    pub device_type: String,
    pub used_bytes: u64,
    pub utilization: f64,
}

/// The host's cards, for the `hami_host_gpu_*` metrics.
pub trait HostGpus: Send + Sync {
    fn cards(&self) -> Vec<HostCard>;
}

/// NVML's view of the cards.
pub struct NvmlGpus {
    nvml: &'static nvml_wrapper::Nvml,
    /// Per card (UUID), the timestamp of the last utilization sample read.
    last_sample: std::sync::Mutex<HashMap<String, u64>>,
}

impl NvmlGpus {
    pub fn new(nvml: &'static nvml_wrapper::Nvml) -> NvmlGpus {
        NvmlGpus {
            nvml,
            last_sample: Default::default(),
        }
    }

    /// The card's utilization since the last call: the mean of NVML's
    /// utilization samples taken since then, so that it covers the same
    /// time as the containers' busy counters between two scans (NVML's
    /// utilization rate covers its own sample period, up to a second,
    /// which after a quiet spell reads far below what the containers just
    /// measured). Where samples are not to be had, the utilization rate.
    fn utilization(&self, d: &nvml_wrapper::Device<'_>, uuid: &str) -> f64 {
        use nvml_wrapper::enum_wrappers::device::Sampling;
        use nvml_wrapper::enums::device::SampleValue;
        let mut last = self.last_sample.lock().unwrap_or_else(|e| e.into_inner());
        let since = last.get(uuid).copied();
        let samples = d
            .samples(Sampling::GpuUtilization, since)
            .unwrap_or_default();
        let values: Vec<f64> = samples
            .iter()
            .filter_map(|s| match s.value {
                SampleValue::U32(v) => Some(f64::from(v)),
                SampleValue::U64(v) => Some(v as f64),
                _ => None,
            })
            .collect();
        if let Some(t) = samples.iter().map(|s| s.timestamp).max() {
            last.insert(uuid.to_string(), t);
        }
        if values.is_empty() {
            d.utilization_rates().map_or(0.0, |u| f64::from(u.gpu))
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    }
}

impl HostGpus for NvmlGpus {
    fn cards(&self) -> Vec<HostCard> {
        let n = self.nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = self.nvml.device_by_index(i).ok()?;
                let uuid = d.uuid().ok()?;
                Some(HostCard {
                    index: d.index().unwrap_or(i),
                    utilization: self.utilization(&d, &uuid),
                    uuid,
                    device_type: d.name().unwrap_or_default(),
                    used_bytes: d.memory_info().map_or(0, |m| m.used),
                })
            })
            .collect()
    }
}

/// What one scan found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    pub containers: Vec<ContainerDevice>,
    /// Slots of dead processes freed in region files.
    pub freed_slots: usize,
    /// Dirs removed (paths).
    pub removed: Vec<PathBuf>,
    /// Every region of ours with its cards and priorities, for the
    /// priority relay ([`crate::priority`]).
    pub priority: Vec<crate::priority::PriorityRegion>,
}

/// The monitor's state between scans.
pub struct Monitor {
    vgpu_dir: PathBuf,
    proc_root: PathBuf,
    grace: Duration,
    /// Whether `/proc` shows the host's PID namespace (slots can be judged).
    host_pids: bool,
    /// Per region file and device: the busy time and the clock at the last scan.
    busy: HashMap<(PathBuf, usize), (u64, u64)>,
    /// Dir name -> when its pod was first found missing.
    missing_since: HashMap<String, Instant>,
    /// NVML's utilization of each card (percent), for the charge scale.
    card_utilization: HashMap<String, f64>,
}

/// A region read in a scan.
enum Read {
    Ours(RegionCopy),
    Upstream(Box<hami_shm::upstream::UpstreamRegion>),
}

/// A container dir in a scan: its name, and the regions read in it.
struct Dir {
    name: String,
    regions: Vec<RegionRead>,
}

/// A region file read in a scan.
struct RegionRead {
    path: PathBuf,
    read: Read,
    /// Per slot of an own region: its `host_pid` leads to its very process
    /// (so it is alive without a walk over `/proc`).
    confirmed: Vec<bool>,
}

/// `(inode, file name)`: how a region file is recognised in `/proc/*/maps`
/// whatever path the container mounted it at.
type FileKey = (u64, OsString);

fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.ino(), path.file_name()?.to_os_string()))
}

/// `<podUID>_<container>`: a container name has no `_` (DNS label), so the
/// first `_` separates.
pub fn parse_dir_name(name: &str) -> Option<(&str, &str)> {
    let (uid, container) = name.split_once('_')?;
    (!uid.is_empty() && !container.is_empty()).then_some((uid, container))
}

impl Monitor {
    pub fn new(vgpu_dir: &Path, grace: Duration) -> Monitor {
        Monitor::with_proc(vgpu_dir, grace, Path::new("/proc"))
    }

    /// With another procfs mount (tests).
    pub fn with_proc(vgpu_dir: &Path, grace: Duration, proc_root: &Path) -> Monitor {
        let host_pids = in_host_pid_namespace(proc_root);
        if !host_pids {
            tracing::warn!(
                "the node monitor does not see the host's processes (run it with hostPID): dead processes' memory is neither discounted nor freed"
            );
        }
        Monitor {
            vgpu_dir: vgpu_dir.to_path_buf(),
            proc_root: proc_root.to_path_buf(),
            grace,
            host_pids,
            busy: HashMap::new(),
            missing_since: HashMap::new(),
            card_utilization: HashMap::new(),
        }
    }

    /// The cards' utilization as NVML reports it (percent, by UUID), for
    /// the next scan's charge scales.
    pub fn set_card_utilization(&mut self, cards: &[HostCard]) {
        self.card_utilization = cards
            .iter()
            .map(|c| (c.uuid.clone(), c.utilization))
            .collect();
    }

    /// One scan at CLOCK_MONOTONIC `now_ns`. `pods` maps pod UIDs to the
    /// pods the API server lists on this node, `None` while that list is
    /// not known (nothing is labelled or removed then).
    pub fn scan(&mut self, pods: Option<&HashMap<String, PodView>>, now_ns: u64) -> Scan {
        let mut out = Scan::default();
        let containers = self.vgpu_dir.join("containers");
        let mut dirs: Vec<Dir> = Vec::new();
        for entry in read_dir_sorted(&containers) {
            let Some(name) = entry
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if parse_dir_name(&name).is_none() || !is_real_dir(&entry) {
                continue;
            }
            let mut regions = Vec::new();
            for file in read_dir_sorted(&entry) {
                if file.extension().is_none_or(|e| e != "cache") {
                    continue;
                }
                match read_region(&file) {
                    Ok(read) => {
                        let confirmed = match &read {
                            Read::Ours(c) if self.host_pids => c
                                .slots
                                .iter()
                                .map(|s| host_pid_confirms(&self.proc_root, s))
                                .collect(),
                            _ => Vec::new(),
                        };
                        regions.push(RegionRead {
                            path: file,
                            read,
                            confirmed,
                        });
                    }
                    Err(e) => tracing::debug!(file = %file.display(), "not a region: {e}"),
                }
            }
            dirs.push(Dir { name, regions });
        }

        // Which processes map which region, from /proc, only when a slot
        // cannot be confirmed through its host PID or a dir may go.
        let missing = |name: &str| {
            pods.is_some_and(|p| parse_dir_name(name).is_some_and(|(uid, _)| !p.contains_key(uid)))
        };
        let needs_walk = self.host_pids
            && dirs.iter().any(|d| {
                missing(&d.name) || d.regions.iter().any(|r| r.confirmed.contains(&false))
            });
        let mappers = if needs_walk {
            let wanted: HashSet<FileKey> = dirs
                .iter()
                .flat_map(|d| d.regions.iter().filter_map(|r| file_key(&r.path)))
                .collect();
            Some(map_walk(&self.proc_root, &wanted))
        } else {
            None
        };

        // The cards Allocate gave each container (files it cannot write),
        // read once per scan.
        let given = self.cards_by_dir();
        let sharing = pods.map(|p| containers_per_card(&given, p));
        // (region, device index, card, measured utilization, charge scale)
        // of every device of ours, for the charge scales.
        let mut measured: Vec<(PathBuf, usize, String, f64, u64)> = Vec::new();
        let mut seen_busy = HashSet::new();
        let mut series: BTreeMap<(String, usize, String), ContainerDevice> = BTreeMap::new();
        for Dir { name, regions } in &dirs {
            let (uid, container) = parse_dir_name(name).expect("filtered above");
            let cards = given.get(name).map_or(&[][..], Vec::as_slice);
            for RegionRead {
                path,
                read,
                confirmed,
            } in regions
            {
                let key = file_key(path);
                let procs = mappers
                    .as_ref()
                    .and_then(|m| key.as_ref().map(|k| m.get(k).cloned().unwrap_or_default()));
                let devices = match read {
                    Read::Ours(c) => {
                        let alive: Vec<&SlotCopy> = c
                            .slots
                            .iter()
                            .zip(confirmed.iter().chain(std::iter::repeat(&false)))
                            .filter(|(s, confirmed)| {
                                !self.host_pids
                                    || **confirmed
                                    || procs.as_ref().is_none_or(|ps| {
                                        ps.iter().any(|&(pid, start)| {
                                            pid == s.pid
                                                && (s.start_time == 0 || start == s.start_time)
                                        })
                                    })
                            })
                            .map(|(s, _)| s)
                            .collect();
                        // Nobody maps the file: free the dead slots in it.
                        if procs.as_ref().is_some_and(Vec::is_empty) && !c.slots.is_empty() {
                            let dead: Vec<(usize, i32)> =
                                c.slots.iter().map(|s| (s.slot, s.pid)).collect();
                            match copy::clear_slots(path, &dead) {
                                Ok(n) => {
                                    if n > 0 {
                                        tracing::info!(file = %path.display(), slots = n, "freed the slots of dead processes");
                                    }
                                    out.freed_slots += n;
                                }
                                Err(e) => {
                                    tracing::warn!(file = %path.display(), "freeing dead slots: {e}")
                                }
                            }
                        }
                        if let Some(sharing) = &sharing {
                            let alone = !cards.is_empty()
                                && pods
                                    .and_then(|p| p.get(uid))
                                    .is_some_and(|p| p.runs(container))
                                && cards.iter().all(|c| sharing.get(c).copied() == Some(1));
                            if alone != (c.flags & FLAG_ALONE != 0) {
                                set_alone(path, alone);
                            }
                        }
                        if !cards.is_empty() {
                            out.priority.push(crate::priority::PriorityRegion {
                                path: path.clone(),
                                cards: cards.to_vec(),
                                high: c.high_priority_launch_ns != 0
                                    || alive.iter().any(|s| s.priority == 0),
                                low: alive.is_empty() || alive.iter().any(|s| s.priority != 0),
                            });
                        }
                        let devices = self.ours(path, c, &alive, now_ns, &mut seen_busy);
                        for (i, d) in &devices {
                            measured.push((
                                path.clone(),
                                *i,
                                d.device_uuid.clone(),
                                d.utilization,
                                c.devices[*i].charge_scale_ppm,
                            ));
                        }
                        devices
                    }
                    Read::Upstream(u) => upstream_devices(u),
                };
                let Some(pod) = pods.and_then(|p| p.get(uid)) else {
                    continue;
                };
                if !pod.runs(container) {
                    continue;
                }
                // A region names its cards itself (the container writes it):
                // only cards Allocate gave the container get series, when
                // Allocate's list is there (HAMi's plugin writes none).
                for (i, d) in devices {
                    if !cards.is_empty() && !cards.contains(&d.device_uuid) {
                        tracing::debug!(
                            dir = name,
                            uuid = d.device_uuid,
                            "a region names a card the container was not given"
                        );
                        continue;
                    }
                    match series.entry((name.clone(), i, d.device_uuid.clone())) {
                        std::collections::btree_map::Entry::Occupied(mut e) => {
                            e.get_mut().usage.add(&d)
                        }
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(ContainerDevice {
                                namespace: pod.namespace.clone(),
                                pod: pod.name.clone(),
                                container: container.to_string(),
                                vdevice_index: i,
                                usage: d,
                            });
                        }
                    }
                }
            }
        }
        self.busy.retain(|k, _| seen_busy.contains(k));
        self.scale_charges(&measured);
        out.containers = series.into_values().collect();

        if let Some(pods) = pods {
            out.removed = self.remove_gone(pods, &dirs, mappers.as_ref());
        }
        out
    }

    /// Sets each container's charge scale on each card: when the busy time
    /// the containers sharing a card measured adds up to more than NVML
    /// says the card was busy, the difference is time they spent waiting
    /// behind one another; split evenly among the busy containers, each is
    /// charged what it measured less its part; else all of it. Without
    /// NVML's numbers, nothing changes.
    fn scale_charges(&self, measured: &[(PathBuf, usize, String, f64, u64)]) {
        if self.card_utilization.is_empty() {
            return;
        }
        let mut sums: HashMap<&str, (f64, usize)> = HashMap::new();
        for (_, _, card, util, _) in measured {
            let e = sums.entry(card.as_str()).or_insert((0.0, 0));
            e.0 += util;
            e.1 += usize::from(*util > 0.0);
        }
        for (path, dev, card, util, now_ppm) in measured {
            let (sum, busy) = sums[card.as_str()];
            let ppm = match self.card_utilization.get(card) {
                Some(&card_util) if busy >= 2 && *util > 0.0 && sum > card_util + 2.0 => {
                    // The excess, split evenly: each busy container waited
                    // about as long behind the others.
                    let waited = (sum - card_util) / busy as f64;
                    (((util - waited) / util).clamp(0.3, 1.0) * 1e6) as u64
                }
                _ => 1_000_000,
            };
            let now_ppm = if *now_ppm == 0 { 1_000_000 } else { *now_ppm };
            if now_ppm.abs_diff(ppm) < 10_000 {
                continue;
            }
            let r = copy::open_region_file(path)
                .map_err(std::io::Error::other)
                .and_then(|f| copy::write_charge_scale(&f, *dev, ppm));
            match r {
                Ok(()) => tracing::debug!(region = %path.display(), card, ppm, "charge scale"),
                Err(e) => tracing::warn!(region = %path.display(), "setting the charge scale: {e}"),
            }
        }
    }

    /// The card UUIDs Allocate wrote for each container dir (the `cards`
    /// file of its limits dir), by dir name; dirs without one are left out.
    fn cards_by_dir(&self) -> HashMap<String, Vec<String>> {
        read_dir_sorted(&self.vgpu_dir.join("limits"))
            .into_iter()
            .filter_map(|dir| {
                let name = dir.file_name()?.to_str()?.to_string();
                parse_dir_name(&name)?;
                let text =
                    std::fs::read_to_string(dir.join(crate::allocate::CARDS_FILE_NAME)).ok()?;
                let cards = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect();
                Some((name, cards))
            })
            .collect()
    }

    /// Per device index of one of our regions: usage of the live slots,
    /// the limit, busy share since the last scan, last launch.
    fn ours(
        &mut self,
        path: &Path,
        c: &RegionCopy,
        alive: &[&SlotCopy],
        now_ns: u64,
        seen: &mut HashSet<(PathBuf, usize)>,
    ) -> Vec<(usize, DeviceUsage)> {
        let mut v = Vec::new();
        for (i, d) in c.devices.iter().enumerate() {
            if d.uuid.is_empty() {
                continue;
            }
            let busy = d.retired_busy_ns + c.slots.iter().map(|s| s.busy_ns[i]).sum::<u64>();
            let key = (path.to_path_buf(), i);
            seen.insert(key.clone());
            let utilization = match self.busy.insert(key, (busy, now_ns)) {
                Some((b0, t0)) if busy >= b0 && now_ns > t0 => {
                    ((busy - b0) as f64 * 100.0 / (now_ns - t0) as f64).min(100.0)
                }
                _ => 0.0,
            };
            let last = alive.iter().map(|s| s.last_launch_ns).max().unwrap_or(0);
            v.push((
                i,
                DeviceUsage {
                    device_uuid: d.uuid.clone(),
                    used_bytes: copy::used_by(alive, i),
                    limit_bytes: d.memory_limit.unwrap_or(0),
                    utilization,
                    last_kernel_secs: (last != 0).then(|| now_ns.saturating_sub(last) as f64 / 1e9),
                },
            ));
        }
        v
    }

    fn remove_gone(
        &mut self,
        pods: &HashMap<String, PodView>,
        dirs: &[Dir],
        mappers: Option<&HashMap<FileKey, Vec<(i32, u64)>>>,
    ) -> Vec<PathBuf> {
        let now = Instant::now();
        let limits = self.vgpu_dir.join("limits");
        let mut names: Vec<String> = dirs.iter().map(|d| d.name.clone()).collect();
        for p in read_dir_sorted(&limits) {
            if let Some(n) = p.file_name().and_then(|n| n.to_str())
                && parse_dir_name(n).is_some()
                && !names.iter().any(|m| m == n)
            {
                names.push(n.to_string());
            }
        }
        self.missing_since.retain(|n, _| names.contains(n));
        let mut removed = Vec::new();
        for name in names {
            let (uid, _) = parse_dir_name(&name).expect("filtered");
            if pods.contains_key(uid) {
                self.missing_since.remove(&name);
                continue;
            }
            let since = *self.missing_since.entry(name.clone()).or_insert(now);
            if now.duration_since(since) < self.grace {
                continue;
            }
            // A process still maps a region here: not gone, whatever the API says.
            let in_use = dirs
                .iter()
                .filter(|d| d.name == name)
                .flat_map(|d| d.regions.iter())
                .any(|r| {
                    !self.host_pids
                        || file_key(&r.path).is_none_or(|k| {
                            mappers.is_none_or(|m| m.get(&k).is_some_and(|v| !v.is_empty()))
                        })
                });
            if in_use {
                continue;
            }
            for base in [self.vgpu_dir.join("containers"), limits.clone()] {
                let dir = base.join(&name);
                if !dir.exists() {
                    continue;
                }
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "removed the dir of a pod that is gone");
                        removed.push(dir);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), "removing the dir of a pod that is gone: {e}")
                    }
                }
            }
            self.missing_since.remove(&name);
        }
        removed.extend(remove_dangling_links(
            &self.vgpu_dir.join(crate::lockfree::ALLOC_DIR_NAME),
        ));
        removed
    }
}

/// Removes the per-allocation links (allocation without the node lock)
/// whose container dirs are gone; dirs a runtime made there are left to
/// the next Allocate of their key, which replaces them.
fn remove_dangling_links(alloc: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for p in read_dir_sorted(alloc) {
        let dangling =
            std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) && !p.exists();
        if dangling {
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) => tracing::warn!(link = %p.display(), "removing a dangling link: {e}"),
            }
        }
    }
    removed
}

/// How many running containers Allocate gave each card, from the cards
/// by container dir and the pods that run here.
fn containers_per_card(
    given: &HashMap<String, Vec<String>>,
    pods: &HashMap<String, PodView>,
) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for (name, cards) in given {
        let Some((uid, container)) = parse_dir_name(name) else {
            continue;
        };
        if pods.get(uid).is_some_and(|p| p.runs(container)) {
            for card in cards {
                *n.entry(card.clone()).or_insert(0) += 1;
            }
        }
    }
    n
}

/// Sets or clears the region's alone flag (see [`FLAG_ALONE`]).
fn set_alone(path: &Path, alone: bool) {
    let r = copy::open_region_file(path)
        .map_err(std::io::Error::other)
        .and_then(|f| copy::set_flag(&f, FLAG_ALONE, alone));
    match r {
        Ok(()) if alone => {
            tracing::info!(region = %path.display(), "the container is alone on its cards: not paced under GPU_CORE_UTILIZATION_POLICY=default")
        }
        Ok(()) => {
            tracing::info!(region = %path.display(), "the container shares a card: paced again")
        }
        Err(e) => tracing::warn!(region = %path.display(), "setting the alone flag: {e}"),
    }
}

fn upstream_devices(u: &hami_shm::upstream::UpstreamRegion) -> Vec<(usize, DeviceUsage)> {
    let now = jiff::Timestamp::now().as_second().max(0) as u64;
    u.uuids
        .iter()
        .enumerate()
        .filter(|(_, id)| !id.is_empty())
        .map(|(i, id)| {
            let util: u64 = u
                .procs
                .iter()
                .map(|p| p.sm_util.get(i).copied().unwrap_or(0))
                .sum();
            (
                i,
                DeviceUsage {
                    device_uuid: id.clone(),
                    used_bytes: u.device_used(i),
                    limit_bytes: u.limit.get(i).copied().unwrap_or(0),
                    utilization: (util as f64).min(100.0),
                    last_kernel_secs: (u.last_kernel_time != 0)
                        .then(|| now.saturating_sub(u.last_kernel_time) as f64),
                },
            )
        })
        .collect()
}

fn read_region(path: &Path) -> Result<Read, RegionError> {
    let bytes = copy::read_file(path)?;
    match RegionCopy::decode(&bytes) {
        Ok(c) => Ok(Read::Ours(c)),
        Err(RegionError::Upstream) => hami_shm::upstream::decode(&bytes)
            .map(|u| Read::Upstream(Box::new(u)))
            .map_err(|e| RegionError::Io(std::io::Error::other(e.to_string()))),
        Err(e) => Err(e),
    }
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    v
}

fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// The `NSpid` line of a process: its PID in each namespace, outermost first.
fn ns_pids(proc_root: &Path, pid: &str) -> Option<Vec<i32>> {
    let text = std::fs::read_to_string(proc_root.join(pid).join("status")).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// Start time (clock ticks since boot) from `<proc>/<pid>/stat`.
fn start_time(proc_root: &Path, pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join(pid).join("stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    if matches!(f.next()?, "Z" | "X") {
        return None;
    }
    f.nth(18)?.parse().ok()
}

/// Whether this process sees the host's PID namespace (its own `NSpid` has
/// one entry).
pub fn in_host_pid_namespace(proc_root: &Path) -> bool {
    ns_pids(proc_root, "self").is_some_and(|v| v.len() == 1)
}

/// Whether the slot's `host_pid` is a live host process whose innermost
/// PID and start time are the slot's (a known start time is required: a
/// host PID from a simulated NVML may be a container PID).
fn host_pid_confirms(proc_root: &Path, s: &SlotCopy) -> bool {
    if s.host_pid <= 0 || s.start_time == 0 {
        return false;
    }
    let pid = s.host_pid.to_string();
    ns_pids(proc_root, &pid).and_then(|v| v.last().copied()) == Some(s.pid)
        && start_time(proc_root, &pid) == Some(s.start_time)
}

/// For each wanted region file, the `(innermost PID, start time)` of every
/// live process that maps it.
fn map_walk(proc_root: &Path, wanted: &HashSet<FileKey>) -> HashMap<FileKey, Vec<(i32, u64)>> {
    let mut out: HashMap<FileKey, Vec<(i32, u64)>> =
        wanted.iter().map(|k| (k.clone(), Vec::new())).collect();
    if wanted.is_empty() {
        return out;
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(maps) = std::fs::read_to_string(e.path().join("maps")) else {
            continue;
        };
        let mut found: Vec<FileKey> = Vec::new();
        for line in maps.lines() {
            // range perms offset dev inode path
            let mut f = line.split_whitespace();
            let (Some(ino), Some(path)) = (f.nth(4), f.next()) else {
                continue;
            };
            if !path.ends_with(".cache") {
                continue;
            }
            let Ok(ino) = ino.parse::<u64>() else {
                continue;
            };
            let Some(file) = Path::new(path).file_name() else {
                continue;
            };
            let key = (ino, file.to_os_string());
            if wanted.contains(&key) && !found.contains(&key) {
                found.push(key);
            }
        }
        if found.is_empty() {
            continue;
        }
        let (Some(ns), Some(start)) = (ns_pids(proc_root, pid), start_time(proc_root, pid)) else {
            continue;
        };
        let Some(&inner) = ns.last() else { continue };
        for k in found {
            out.entry(k).or_default().push((inner, start));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hami_shm::region::SharedRegion;

    fn pod(ns: &str, name: &str) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            ended: false,
            terminated: HashSet::new(),
        }
    }

    /// A container dir with a region this process maps, one live slot (us)
    /// and one of a process that has exited.
    fn container(vgpu: &Path, dir: &str) -> (SharedRegion, PathBuf) {
        let d = vgpu.join("containers").join(dir);
        std::fs::create_dir_all(&d).unwrap();
        let limits = vgpu.join("limits").join(dir);
        std::fs::create_dir_all(&limits).unwrap();
        std::fs::write(limits.join(crate::allocate::CARDS_FILE_NAME), "GPU-aaaa\n").unwrap();
        let path = d.join("0b3c.cache");
        let r = SharedRegion::open(&path).unwrap();
        r.set_uuid(0, "GPU-aaaa");
        r.set_memory_limit(0, 3000 << 20);
        let me = std::process::id() as i32;
        let mine = r
            .claim_slot(me, hami_shm::region::process_start_time(me), 1)
            .unwrap();
        r.add_used(mine, 0, 100 << 20);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id() as i32;
        child.wait().unwrap();
        let dead = r
            .claim_slot(gone, hami_shm::region::process_start_time(me) + 1, 1)
            .unwrap();
        r.add_used(dead, 0, 900 << 20);
        r.add_busy(mine, 0, 50_000_000);
        (r, path)
    }

    #[test]
    fn dir_names_split_at_the_first_underscore() {
        assert_eq!(
            parse_dir_name("7c1e-aa_main-2"),
            Some(("7c1e-aa", "main-2"))
        );
        assert_eq!(parse_dir_name("nounderscore"), None);
        assert_eq!(parse_dir_name("_x"), None);
    }

    #[test]
    fn usage_counts_live_processes_only_and_labels_come_from_the_pod() {
        let tmp = tempfile::tempdir().unwrap();
        let (r, _path) = container(tmp.path(), "uid-1_main");
        assert!(
            in_host_pid_namespace(Path::new("/proc")),
            "tests run in the host PID namespace"
        );
        let mut m = Monitor::new(tmp.path(), Duration::from_secs(60));
        let pods: HashMap<String, PodView> = [("uid-1".to_string(), pod("team", "train"))].into();
        let t0 = hami_shm::region::monotonic_ns();
        let s = m.scan(Some(&pods), t0);
        assert_eq!(s.containers.len(), 1, "{s:?}");
        let c = &s.containers[0];
        assert_eq!(
            (c.namespace.as_str(), c.pod.as_str(), c.container.as_str()),
            ("team", "train", "main")
        );
        assert_eq!(
            (c.vdevice_index, c.usage.device_uuid.as_str()),
            (0, "GPU-aaaa")
        );
        // The dead slot's 900 MiB do not count; ours does.
        assert_eq!(c.usage.used_bytes, 100 << 20);
        assert_eq!(c.usage.limit_bytes, 3000 << 20);
        // Alone on its card: flagged, so `default` does not pace it.
        assert!(r.alone());
        // Another running container gets the card: paced again.
        let other = tmp.path().join("limits/uid-9_side");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join(crate::allocate::CARDS_FILE_NAME), "GPU-aaaa\n").unwrap();
        let mut two = pods.clone();
        two.insert("uid-9".into(), pod("team", "side"));
        m.scan(Some(&two), t0);
        assert!(!r.alone());
        // It ends: alone again.
        two.get_mut("uid-9").unwrap().ended = true;
        m.scan(Some(&two), t0);
        assert!(r.alone());
        std::fs::remove_dir_all(&other).unwrap();
        // A card the container was not given gets no series.
        r.set_uuid(1, "GPU-elsewhere");
        r.add_used(r.processes()[0].slot, 1, 1 << 20);
        let s = m.scan(Some(&pods), t0);
        assert_eq!(s.containers.len(), 1, "{s:?}");
        // The relay's view: one card, a low-priority process alive.
        assert_eq!(s.priority.len(), 1);
        assert_eq!(s.priority[0].cards, vec!["GPU-aaaa".to_string()]);
        assert!(s.priority[0].low && !s.priority[0].high);
        // Someone (us) maps the file: its dead slot is left to the interposers.
        assert_eq!(s.freed_slots, 0);
        assert_eq!(r.processes().len(), 2);
        // Busy time since the last scan, over the time since it.
        let slot = r.processes()[0].slot;
        r.add_busy(slot, 0, 250_000_000);
        let s = m.scan(Some(&pods), t0 + 1_000_000_000);
        assert!(
            (s.containers[0].usage.utilization - 25.0).abs() < 1e-9,
            "{s:?}"
        );
        // An ended pod has no series; an unknown one neither.
        let mut ended = pods.clone();
        ended.get_mut("uid-1").unwrap().ended = true;
        assert!(m.scan(Some(&ended), t0 + 2).containers.is_empty());
        let mut term = pods.clone();
        term.get_mut("uid-1")
            .unwrap()
            .terminated
            .insert("main".into());
        assert!(m.scan(Some(&term), t0 + 3).containers.is_empty());
        assert!(m.scan(None, t0 + 4).containers.is_empty());
    }

    #[test]
    fn containers_sharing_a_card_are_charged_less_their_waits() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, _) = container(tmp.path(), "uid-a_main");
        let (b, _) = container(tmp.path(), "uid-b_main");
        let pods: HashMap<String, PodView> = [
            ("uid-a".to_string(), pod("t", "a")),
            ("uid-b".to_string(), pod("t", "b")),
        ]
        .into();
        let mut m = Monitor::new(tmp.path(), Duration::from_secs(60));
        let card = |utilization: f64| HostCard {
            index: 0,
            uuid: "GPU-aaaa".into(),
            device_type: "sim".into(),
            used_bytes: 0,
            utilization,
        };
        let t0 = hami_shm::region::monotonic_ns();
        m.set_card_utilization(&[card(75.0)]);
        m.scan(Some(&pods), t0);
        // Over one second A measured 300 ms of kernels and B 600 ms, but
        // the card was busy 750 ms: 150 ms were waits, 75 ms each.
        a.add_busy(a.processes()[0].slot, 0, 300_000_000);
        b.add_busy(b.processes()[0].slot, 0, 600_000_000);
        m.scan(Some(&pods), t0 + 1_000_000_000);
        assert_eq!(a.charge_scale_ppm(0), 750_000);
        assert_eq!(b.charge_scale_ppm(0), 875_000);
        // The card as busy as they measured: charged in full again.
        a.add_busy(a.processes()[0].slot, 0, 300_000_000);
        b.add_busy(b.processes()[0].slot, 0, 600_000_000);
        m.set_card_utilization(&[card(90.0)]);
        m.scan(Some(&pods), t0 + 2_000_000_000);
        assert_eq!(a.charge_scale_ppm(0), 1_000_000);
        assert_eq!(b.charge_scale_ppm(0), 1_000_000);
    }

    #[test]
    fn a_region_nobody_maps_has_its_slots_freed() {
        let tmp = tempfile::tempdir().unwrap();
        let (r, path) = container(tmp.path(), "uid-2_main");
        drop(r);
        let mut m = Monitor::new(tmp.path(), Duration::from_secs(60));
        let pods: HashMap<String, PodView> = [("uid-2".to_string(), pod("a", "b"))].into();
        let s = m.scan(Some(&pods), 1);
        // Our own slot counts as dead too: we no longer map the file.
        assert_eq!(s.freed_slots, 2, "{s:?}");
        assert_eq!(s.containers[0].usage.used_bytes, 0);
        let c = RegionCopy::decode(&copy::read_file(&path).unwrap()).unwrap();
        assert!(c.slots.is_empty());
    }

    #[test]
    fn dirs_of_pods_gone_go_after_the_grace_period_unless_mapped() {
        let tmp = tempfile::tempdir().unwrap();
        let (r, _) = container(tmp.path(), "uid-3_main");
        std::fs::create_dir_all(tmp.path().join("limits/uid-4_side")).unwrap();
        let mut m = Monitor::new(tmp.path(), Duration::ZERO);
        let none = HashMap::new();
        // Not known yet: nothing removed.
        assert!(m.scan(None, 1).removed.is_empty());
        // uid-3's region is mapped (by us): kept; uid-4's lone limits dir goes.
        let s = m.scan(Some(&none), 2);
        assert_eq!(s.removed, vec![tmp.path().join("limits/uid-4_side")]);
        assert!(tmp.path().join("containers/uid-3_main").exists());
        // Its links (allocation without the lock) go with its dirs; a
        // link to a live dir and a dir the runtime made stay.
        let alloc = tmp.path().join("alloc");
        std::fs::create_dir_all(alloc.join("k2.limits")).unwrap();
        std::os::unix::fs::symlink(
            tmp.path().join("limits/uid-3_main"),
            alloc.join("k1.limits"),
        )
        .unwrap();
        std::os::unix::fs::symlink(tmp.path().join("containers"), alloc.join("k3.dir")).unwrap();
        drop(r);
        let s = m.scan(Some(&none), 3);
        assert_eq!(s.removed.len(), 3, "{s:?}");
        assert!(!tmp.path().join("containers/uid-3_main").exists());
        assert!(!tmp.path().join("limits/uid-3_main").exists());
        assert!(std::fs::symlink_metadata(alloc.join("k1.limits")).is_err());
        assert!(alloc.join("k2.limits").is_dir() && alloc.join("k3.dir").exists());
        // A grace period: first seen missing now, kept.
        std::fs::create_dir_all(tmp.path().join("limits/uid-5_x")).unwrap();
        let mut m = Monitor::new(tmp.path(), Duration::from_secs(3600));
        assert!(m.scan(Some(&none), 4).removed.is_empty());
        assert!(m.scan(Some(&none), 5).removed.is_empty());
    }
}
