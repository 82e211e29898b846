//! Card discovery: the node's GPUs from NVML, loaded at run time through
//! `nvml-wrapper` (no link-time dependency on the driver), turned into the
//! records of `hami.io/node-nvidia-register` with HAMi's rules:
//!
//! * `type`: the NVML name prefixed `NVIDIA-` unless it starts with
//!   "NVIDIA" ([`hami_api::device::nvidia_device_type`]);
//! * `devmem`: total memory in MiB x `deviceMemoryScaling`; on cards
//!   whose memory NVML does not report (unified memory: `NotSupported`)
//!   `preconfigureddevicememory` stands for the total, and without it the
//!   card is left out, as HAMi's plugin does;
//! * `devcore`: 100 x `deviceCoreScaling`; `count`: `deviceSplitCount`;
//! * `numa`: the card's NUMA node from NVML, else from sysfs by its PCI
//!   bus id as HAMi reads it (0 when neither knows);
//! * `mode`: `hami-core`; cards in `filterdevices` are left out.
//!
//! Health is checked at every scan: a card whose handle, UUID or memory
//! can no longer be read is unhealthy, and so is a card that reported a
//! critical Xid error through NVML events (where the library supports
//! them; sticky, as in HAMi's and NVIDIA's plugins).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hami_api::DeviceInfo;
use hami_api::DeviceMode;
use hami_api::NvidiaConfig;
use hami_api::device::nvidia_device_type;
use hami_api::node_config::{FilterDevices, NodeConfig, NodeConfigFile};
use hami_api::topology::DevicePairScore;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TopologyLevel;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};

/// The library NVML clients load by name.
pub const NVML_LIB: &str = "libnvidia-ml.so.1";
/// The variable naming the NVML library to load (as `--nvml-lib`).
pub const NVML_LIB_ENV: &str = "HAMI_NVML_LIB";
/// sim-gpu's library (it is both `libcuda.so.1` and `libnvidia-ml.so.1`).
pub const SIM_LIB: &str = "libsim_gpu.so";

/// Xid errors caused by applications, not the card (HAMi's and NVIDIA's
/// plugins skip them): 13 graphics engine exception, 31 memory page fault,
/// 43 GPU stopped processing, 45 preemptive cleanup, 68 video processor
/// exception, 109 context switch timeout.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// How the node's cards become register records.
#[derive(Debug, Clone, PartialEq)]
pub struct CardSettings {
    pub split_count: u32,
    pub memory_scaling: f64,
    pub core_scaling: f64,
    /// MiB standing for the total of a card whose memory NVML does not
    /// report (HAMi's `preconfigureddevicememory`; none or 0: no such card
    /// is registered).
    pub preconfigured_memory: Option<u64>,
    pub filter: FilterDevices,
    pub mode: DeviceMode,
}

impl Default for CardSettings {
    fn default() -> Self {
        CardSettings::new(&NvidiaConfig::default(), None)
    }
}

impl CardSettings {
    /// From the cluster's config with this node's `config.json` entry
    /// applied (`cfg` already has the entry's scaling and split count, see
    /// [`NodeConfig::apply`]; `node` adds what only the entry holds).
    pub fn new(cfg: &NvidiaConfig, node: Option<&NodeConfig>) -> CardSettings {
        CardSettings {
            split_count: cfg.device_split_count,
            memory_scaling: cfg.device_memory_scaling,
            core_scaling: cfg.device_core_scaling,
            preconfigured_memory: node
                .and_then(|n| n.preconfigured_device_memory)
                .filter(|m| *m > 0),
            filter: node
                .and_then(|n| n.filter_devices.clone())
                .unwrap_or_default(),
            mode: DeviceMode::HamiCore,
        }
    }
}

/// What NVML says about one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCard {
    pub index: u32,
    pub uuid: String,
    /// NVML's name, e.g. `NVIDIA A100-SXM4-40GB`, `Tesla T4`.
    pub name: String,
    /// Total memory; `None` when NVML does not report it (`NotSupported`).
    pub memory_bytes: Option<u64>,
    pub numa: Option<u32>,
    pub healthy: bool,
    /// MIG mode is on: the card is split into instances by the driver, and
    /// hami-core mode (the only one yet) cannot share it.
    pub mig: bool,
}

/// The register records of `raw` under `s`, filtered cards left out.
pub fn cards(raw: &[RawCard], s: &CardSettings) -> Vec<DeviceInfo> {
    raw.iter()
        .filter(|c| !s.filter.excludes(&c.uuid, c.index))
        .filter_map(|c| {
            let mib = match c.memory_bytes {
                Some(b) => b >> 20,
                None => match s.preconfigured_memory {
                    Some(m) => m,
                    None => {
                        tracing::warn!(
                            uuid = c.uuid,
                            "NVML does not report the card's memory and \
                             preconfigureddevicememory is not set: card left out"
                        );
                        return None;
                    }
                },
            };
            Some((c, mib))
        })
        .map(|(c, mib)| DeviceInfo {
            id: c.uuid.clone(),
            index: c.index,
            count: s.split_count,
            devmem: (mib as f64 * s.memory_scaling) as u64,
            devcore: (100.0 * s.core_scaling) as u32,
            device_type: nvidia_device_type(&c.name),
            numa: c.numa.map_or(0, |n| i32::try_from(n).unwrap_or(0)),
            mode: Some(s.mode),
            mig_profiles: None,
            custom_info: None,
            // hami-core mode shares whole cards; a card in MIG mode is
            // registered (so operators see it) but never offered.
            health: c.healthy && !c.mig,
        })
        .collect()
}

/// Anything that yields the node's cards: NVML, a fixed list, a test's.
pub trait Scan: Send {
    /// The node's cards now, with their health.
    fn scan(&mut self) -> anyhow::Result<Vec<DeviceInfo>>;

    /// Link scores between the cards (`hami.io/node-nvidia-score`), when
    /// this source knows them and topology scoring is on.
    fn pair_scores(&mut self) -> Option<Vec<DevicePairScore>> {
        None
    }
}

/// NVML's `NVML_NVLINK_MAX_LINKS`: the link indices a card may have.
const NVLINK_MAX_LINKS: u32 = 18;

/// HAMi's score of a link between two cards: 100 per active NVLink
/// between them, else by the closest common PCIe ancestor (same board 60,
/// one switch 50, several switches 40, a host bridge 30, the same CPU 20,
/// across CPUs 10).
pub fn link_score(level: Option<TopologyLevel>, nvlinks: u32) -> i64 {
    if nvlinks > 0 {
        return 100 * i64::from(nvlinks);
    }
    match level {
        Some(TopologyLevel::Internal) => 60,
        Some(TopologyLevel::Single) => 50,
        Some(TopologyLevel::Multiple) => 40,
        Some(TopologyLevel::HostBridge) => 30,
        Some(TopologyLevel::Node) => 20,
        Some(TopologyLevel::System) => 10,
        None => 0,
    }
}

/// A fixed card list (`--cards-file`).
pub struct Fixed(pub Vec<DeviceInfo>);

impl Scan for Fixed {
    fn scan(&mut self) -> anyhow::Result<Vec<DeviceInfo>> {
        Ok(self.0.clone())
    }
}

/// NVML could not be loaded or initialised.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot load the NVML library {lib}: {error}; install the NVIDIA driver, or point --nvml-lib \
     or {NVML_LIB_ENV} at {NVML_LIB} (--sim loads sim-gpu's {SIM_LIB})"
)]
pub struct LoadError {
    pub lib: String,
    /// What NVML said (its text is part of the message).
    pub error: NvmlError,
}

/// The node's cards from NVML.
pub struct Discovery {
    nvml: &'static Nvml,
    events: Option<EventSet<'static>>,
    /// Cards that reported a critical Xid error.
    failed: BTreeSet<String>,
    settings: CardSettings,
    /// The last scan's cards.
    last: Vec<DeviceInfo>,
    /// Whether to compute link scores between the cards.
    topology_score: bool,
    /// Cards whose MIG mode was already reported.
    mig_warned: BTreeSet<String>,
}

impl Discovery {
    /// Loads NVML from `lib` (a path, or a name the dynamic loader finds)
    /// and initialises it; registers for critical Xid events where the
    /// cards support them. NVML stays loaded for the life of the process.
    pub fn open(lib: &OsStr, settings: CardSettings) -> Result<Discovery, LoadError> {
        let nvml = Nvml::builder()
            .lib_path(lib)
            .init()
            .map_err(|error| LoadError {
                lib: lib.to_string_lossy().into_owned(),
                error,
            })?;
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let events = Self::register_events(nvml);
        if events.is_none() {
            tracing::info!("NVML events not available: health is checked at every scan only");
        }
        Ok(Discovery {
            nvml,
            events,
            failed: BTreeSet::new(),
            settings,
            last: Vec::new(),
            topology_score: false,
            mig_warned: BTreeSet::new(),
        })
    }

    fn register_events(nvml: &'static Nvml) -> Option<EventSet<'static>> {
        let mut set = nvml.create_event_set().ok()?;
        let mut any = false;
        for i in 0..nvml.device_count().ok()? {
            let Ok(d) = nvml.device_by_index(i) else {
                continue;
            };
            let supported = d.supported_event_types().unwrap_or(EventTypes::empty());
            if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
                continue;
            }
            set = match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => {
                    any = true;
                    s
                }
                Err(e) => {
                    // The set went with the failed call.
                    tracing::warn!("NVML events for card {i}: {}", e.error);
                    return None;
                }
            };
        }
        any.then_some(set)
    }

    /// Takes the Xid events waiting, marking the cards that failed.
    fn drain_events(&mut self) {
        let Some(set) = &self.events else { return };
        loop {
            match set.wait(0) {
                Ok(ev) => {
                    let xid = match ev.event_data {
                        Some(nvml_wrapper::enums::event::XidError::Value(v)) => Some(v),
                        _ => None,
                    };
                    if xid.is_some_and(|x| APPLICATION_XIDS.contains(&x)) {
                        continue;
                    }
                    if let Ok(uuid) = ev.device.uuid() {
                        tracing::warn!(uuid, ?xid, "critical Xid error: the card is unhealthy");
                        self.failed.insert(uuid);
                    }
                }
                Err(NvmlError::Timeout) => return,
                Err(e) => {
                    tracing::warn!("waiting for NVML events: {e}");
                    return;
                }
            }
        }
    }

    /// What NVML says about every card now.
    pub fn raw(&mut self) -> anyhow::Result<Vec<RawCard>> {
        self.drain_events();
        let n = self.nvml.device_count()?;
        let mut out = Vec::new();
        for i in 0..n {
            // A card NVML cannot name is lost: the scan keeps it, unhealthy
            // (see [`keep_lost`]).
            let Ok((d, uuid)) = self
                .nvml
                .device_by_index(i)
                .and_then(|d| d.uuid().map(|u| (d, u)))
                .inspect_err(|e| tracing::warn!("NVML card {i}: {e}"))
            else {
                continue;
            };
            let name = d.name().unwrap_or_default();
            // Memory that cannot be read (but is not simply unreported)
            // makes the card unhealthy; `keep_lost` keeps its last total.
            let (memory_bytes, readable) = match d.memory_info() {
                Ok(m) => (Some(m.total), true),
                Err(NvmlError::NotSupported) => (None, true),
                Err(e) => {
                    tracing::warn!(uuid, "reading the card's memory: {e}");
                    (Some(0), false)
                }
            };
            let numa = d
                .numa_node_id()
                .ok()
                .or_else(|| d.pci_info().ok().and_then(|p| sysfs_numa_node(&p.bus_id)));
            let healthy = readable && !self.failed.contains(&uuid);
            let mig = d.mig_mode().is_ok_and(|m| m.current == 1);
            if mig && self.mig_warned.insert(uuid.clone()) {
                tracing::warn!(
                    uuid,
                    "the card is in MIG mode: hami-core mode cannot share it, so it is registered unhealthy (turn MIG off on it, or leave it to another device plugin)"
                );
            }
            out.push(RawCard {
                index: d.index().unwrap_or(i),
                uuid,
                name,
                memory_bytes,
                numa,
                healthy,
                mig,
            });
        }
        Ok(out)
    }

    pub fn settings(&self) -> &CardSettings {
        &self.settings
    }

    /// Computes link scores between the cards at every scan
    /// (`hami.io/node-nvidia-score`).
    pub fn with_topology_score(mut self, on: bool) -> Discovery {
        self.topology_score = on;
        self
    }

    /// Active NVLinks from `a` to the card whose PCI bus id is `b_bus`
    /// (0 where NVML has no NVLink queries).
    fn nvlinks(a: &nvml_wrapper::Device, b_bus: &str) -> u32 {
        (0..NVLINK_MAX_LINKS)
            .filter(|&l| {
                let link = a.link_wrapper_for(l);
                link.is_active().unwrap_or(false)
                    && link
                        .remote_pci_info()
                        .is_ok_and(|p| p.bus_id.eq_ignore_ascii_case(b_bus))
            })
            .count() as u32
    }

    /// The loaded NVML (for the node monitor's host metrics).
    pub fn nvml(&self) -> &'static Nvml {
        self.nvml
    }
}

impl Scan for Discovery {
    fn scan(&mut self) -> anyhow::Result<Vec<DeviceInfo>> {
        let raw = self.raw()?;
        let now = keep_lost(&self.last, cards(&raw, &self.settings));
        self.last = now.clone();
        Ok(now)
    }

    fn pair_scores(&mut self) -> Option<Vec<DevicePairScore>> {
        if !self.topology_score {
            return None;
        }
        // The cards the last scan registered (filtered ones left out).
        let registered: BTreeSet<&str> = self.last.iter().map(|c| c.id.as_str()).collect();
        let n = self.nvml.device_count().ok()?;
        // (index, UUID, PCI bus id) of each registered card.
        let cards: Vec<(u32, String, String)> = (0..n)
            .filter_map(|i| {
                let d = self.nvml.device_by_index(i).ok()?;
                let uuid = d.uuid().ok()?;
                let bus = d.pci_info().map(|p| p.bus_id).unwrap_or_default();
                registered.contains(uuid.as_str()).then_some((i, uuid, bus))
            })
            .collect();
        let mut out = Vec::new();
        for (ia, ua, _) in &cards {
            let a = self.nvml.device_by_index(*ia).ok()?;
            let mut score = std::collections::BTreeMap::new();
            for (ib, ub, bus_b) in &cards {
                if ia == ib {
                    continue;
                }
                let b = self.nvml.device_by_index(*ib).ok()?;
                let level = a.topology_common_ancestor(b).ok();
                score.insert(ub.clone(), link_score(level, Self::nvlinks(&a, bus_b)));
            }
            out.push(DevicePairScore {
                uuid: ua.clone(),
                score,
            });
        }
        Some(out)
    }
}

/// The NUMA node of the PCI device `bus_id` (NVML's `00000000:3B:00.0`)
/// from sysfs, as HAMi's plugin reads it: `None` when unknown or negative.
pub fn sysfs_numa_node(bus_id: &str) -> Option<u32> {
    let id = bus_id.strip_prefix("0000").unwrap_or(bus_id).to_lowercase();
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{id}/numa_node")).ok()?;
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// `now` with what `prev` knew that NVML no longer tells: a card that was
/// there and is gone stays, unhealthy (the scheduler must not place pods on
/// it, and the plugin keeps its device IDs known to the kubelet, as
/// Unhealthy); an unhealthy card whose memory cannot be read keeps its
/// memory. Ordered by index.
pub fn keep_lost(prev: &[DeviceInfo], mut now: Vec<DeviceInfo>) -> Vec<DeviceInfo> {
    for card in &mut now {
        if !card.health
            && card.devmem == 0
            && let Some(p) = prev.iter().find(|p| p.id == card.id)
        {
            card.devmem = p.devmem;
        }
    }
    for p in prev {
        if !now.iter().any(|c| c.id == p.id) {
            tracing::warn!(uuid = p.id, "card lost: unhealthy");
            now.push(DeviceInfo {
                health: false,
                ..p.clone()
            });
        }
    }
    now.sort_by_key(|c| c.index);
    now
}

/// Where sim-gpu's library is looked for with `--sim`: next to this
/// executable (cargo builds both into `target/<profile>/`), then by name
/// through the dynamic loader (`LD_LIBRARY_PATH`, the loader's cache).
pub fn sim_lib_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        out.push(dir.join(SIM_LIB));
    }
    out.push(PathBuf::from(SIM_LIB));
    out
}

/// The NVML library to load: `explicit` (`--nvml-lib` or
/// `HAMI_NVML_LIB`) always wins; with `sim`, sim-gpu's (see
/// [`sim_lib_candidates`]); else `libnvidia-ml.so.1` by name.
pub fn nvml_lib(explicit: Option<&Path>, sim: bool, exe: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if sim {
        let candidates = sim_lib_candidates(exe);
        return candidates
            .iter()
            .find(|p| p.is_absolute() && p.exists())
            .cloned()
            .unwrap_or_else(|| candidates.last().cloned().expect("one candidate"));
    }
    PathBuf::from(NVML_LIB)
}

/// What a node's `config.json` entry makes of the cluster's config.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The cluster's `nvidia` config with the entry's overrides.
    pub config: NvidiaConfig,
    pub cards: CardSettings,
    /// The entry's `enablenumatopology`.
    pub numa_topology: Option<bool>,
}

/// HAMi's per-node `config.json` at `file` (if any) for `node`: the
/// cluster's config with the node's entry applied, the card settings, and
/// the entry's `enablenumatopology`. A bad file is an error naming the file
/// and field; unknown keys are logged as warnings.
pub fn node_settings(
    cluster: NvidiaConfig,
    file: Option<&Path>,
    node: &str,
) -> anyhow::Result<NodeSettings> {
    let Some(path) = file else {
        return Ok(NodeSettings {
            cards: CardSettings::new(&cluster, None),
            config: cluster,
            numa_topology: None,
        });
    };
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
    let (parsed, warnings) = NodeConfigFile::from_json(&name, &text)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let Some(entry) = parsed.for_node(node) else {
        tracing::info!("{name} has no entry for node {node}: the cluster's config applies");
        return Ok(NodeSettings {
            cards: CardSettings::new(&cluster, None),
            config: cluster,
            numa_topology: None,
        });
    };
    let cfg = entry.apply(&cluster, &name)?;
    if let Some(mode) = entry.operating_mode.as_deref()
        && mode != "hami-core"
    {
        tracing::warn!(
            "{name}: operatingmode {mode:?} is not supported yet; registering hami-core"
        );
    }
    Ok(NodeSettings {
        cards: CardSettings::new(&cfg, Some(entry)),
        config: cfg,
        numa_topology: entry.enable_numa_topology,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_scores_are_hamis() {
        assert_eq!(link_score(Some(TopologyLevel::System), 0), 10);
        assert_eq!(link_score(Some(TopologyLevel::Node), 0), 20);
        assert_eq!(link_score(Some(TopologyLevel::HostBridge), 0), 30);
        assert_eq!(link_score(Some(TopologyLevel::Multiple), 0), 40);
        assert_eq!(link_score(Some(TopologyLevel::Single), 0), 50);
        assert_eq!(link_score(Some(TopologyLevel::Internal), 0), 60);
        assert_eq!(link_score(None, 0), 0);
        // NVLinks win over any PCIe path.
        assert_eq!(link_score(Some(TopologyLevel::System), 4), 400);
    }

    fn raw(index: u32, uuid: &str, name: &str, gib: u64, numa: u32) -> RawCard {
        RawCard {
            index,
            uuid: uuid.into(),
            name: name.into(),
            memory_bytes: Some(gib << 30),
            numa: Some(numa),
            healthy: true,
            mig: false,
        }
    }

    #[test]
    fn hami_rules_for_type_memory_cores_and_split() {
        let r = [
            raw(0, "GPU-a", "Tesla T4", 16, 0),
            raw(1, "GPU-b", "NVIDIA A100-SXM4-40GB", 40, 1),
        ];
        let s = CardSettings {
            memory_scaling: 1.5,
            core_scaling: 2.0,
            split_count: 7,
            ..CardSettings::default()
        };
        let c = cards(&r, &s);
        assert_eq!(c[0].device_type, "NVIDIA-Tesla T4");
        assert_eq!(c[1].device_type, "NVIDIA A100-SXM4-40GB");
        assert_eq!((c[0].devmem, c[1].devmem), (24576, 61440));
        assert_eq!((c[0].devcore, c[0].count), (200, 7));
        assert_eq!((c[0].numa, c[1].numa, c[1].index), (0, 1, 1));
        assert_eq!(c[1].mode, Some(DeviceMode::HamiCore));
        assert!(c[0].health);
    }

    #[test]
    fn defaults_preconfigured_memory_and_filters() {
        let r = [
            raw(0, "GPU-a", "Tesla T4", 16, 0),
            raw(1, "GPU-b", "Tesla T4", 16, 0),
            raw(2, "GPU-c", "Tesla T4", 16, 1),
        ];
        let c = cards(&r, &CardSettings::default());
        assert_eq!((c[0].count, c[0].devmem, c[0].devcore), (10, 16384, 100));
        let s = CardSettings {
            filter: FilterDevices {
                uuid: vec!["GPU-c".into()],
                index: vec![0],
            },
            ..CardSettings::default()
        };
        let c = cards(&r, &s);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].id.as_str(), c[0].devmem), ("GPU-b", 16384));

        // Unified memory (NVML: NotSupported): left out, unless
        // preconfigureddevicememory stands in (scaled like NVML's total);
        // a card whose memory NVML reports keeps it.
        let mut unified = raw(3, "GPU-d", "NVIDIA GB10", 0, 0);
        unified.memory_bytes = None;
        let r = [raw(0, "GPU-a", "Tesla T4", 16, 0), unified];
        let ids = |c: &[DeviceInfo]| {
            c.iter()
                .map(|c| (c.id.clone(), c.devmem))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&cards(&r, &CardSettings::default())),
            [("GPU-a".to_string(), 16384)]
        );
        let s = CardSettings {
            preconfigured_memory: Some(1000),
            memory_scaling: 2.0,
            ..CardSettings::default()
        };
        assert_eq!(
            ids(&cards(&r, &s)),
            [("GPU-a".to_string(), 32768), ("GPU-d".to_string(), 2000)]
        );
    }

    #[test]
    fn lost_cards_stay_unhealthy_with_their_memory() {
        let s = CardSettings::default();
        let prev = cards(
            &[
                raw(0, "GPU-a", "Tesla T4", 16, 0),
                raw(1, "GPU-b", "Tesla T4", 16, 0),
                raw(2, "GPU-c", "Tesla T4", 16, 1),
            ],
            &s,
        );
        // GPU-b gone from NVML; GPU-c's memory unreadable.
        let mut c = raw(2, "GPU-c", "Tesla T4", 0, 1);
        c.healthy = false;
        let now = keep_lost(&prev, cards(&[raw(0, "GPU-a", "Tesla T4", 16, 0), c], &s));
        let got: Vec<(&str, bool, u64)> = now
            .iter()
            .map(|c| (c.id.as_str(), c.health, c.devmem))
            .collect();
        assert_eq!(
            got,
            [
                ("GPU-a", true, 16384),
                ("GPU-b", false, 16384),
                ("GPU-c", false, 16384)
            ]
        );
        // Nothing known before: as NVML says.
        assert_eq!(keep_lost(&[], prev.clone()), prev);
    }

    #[test]
    fn which_library() {
        let exe = Path::new("/opt/hami/bin/hami-node");
        assert_eq!(
            nvml_lib(Some(Path::new("/x/libnvidia-ml.so.1")), true, Some(exe)),
            Path::new("/x/libnvidia-ml.so.1")
        );
        assert_eq!(nvml_lib(None, false, Some(exe)), Path::new(NVML_LIB));
        // Not next to the executable: by name.
        assert_eq!(nvml_lib(None, true, Some(exe)), Path::new(SIM_LIB));
        assert_eq!(
            sim_lib_candidates(Some(exe))[0],
            Path::new("/opt/hami/bin/libsim_gpu.so")
        );
    }

    #[test]
    fn a_missing_library_names_itself_and_the_flag() {
        let Err(e) = Discovery::open(
            OsStr::new("/nonexistent/libnvidia-ml.so.1"),
            CardSettings::default(),
        ) else {
            panic!("loaded a library that does not exist");
        };
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/libnvidia-ml.so.1"), "{msg}");
        assert!(
            msg.contains("--nvml-lib") && msg.contains(NVML_LIB_ENV),
            "{msg}"
        );
    }
}
