//! The vendors whose scheduling is HAMi's shared per-card rule with their
//! own units, defaults, node report and annotations: Cambricon, Hygon,
//! Iluvatar, Moore Threads, MetaX (whole cards and sGPU), Enflame GCU,
//! Kunlunxin (XPU and vXPU), AMD, Vastai and Biren. Each is one [`Spec`];
//! the facts behind every value are in docs/design/vendor-formats.md.

use std::collections::BTreeMap;
use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, Node, Pod};

use hami_api::device::decode_devices;
use hami_api::policy::NodePolicy;
use hami_api::vendor_config::{IluvatarChip, VendorConfigs};
use hami_api::{ContainerDevice, ContainerRequest, DecodeError, DeviceInfo, RequestError};

use super::shared::{
    self, CoreCheck, Selectors, Source, bad_value, capacity, card_order, card_rule, count_of,
    each_container, in_limits, index_suffix, is_mutex, no_cards, pick_first, read_quantity,
    read_whole, set_env, set_limit,
};
use super::{FitPod, FitScratch, Placed, Vendor};
use crate::admission::ContainerAdmission;
use crate::reason::{Reason, Rejection};
use crate::snapshot::{NodeDevices, NodeState, Usage};

/// Where a node reports the vendor's cards.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A register annotation in HAMi's device-list form (JSON or legacy).
    Annotation {
        key: String,
        /// Registered compute is replaced by 100 (Vastai, Biren).
        devcore_100: bool,
    },
    /// MetaX's own JSON list (`metax-tech.com/node-gpu-devices`).
    MetaxJson(String),
    /// Cards made up from node capacity.
    Capacity(CapacityCards),
}

/// How cards are made up from node capacity.
#[derive(Debug, Clone, PartialEq)]
pub enum CapacityCards {
    /// Cambricon: `ceil(C/100)` cards from the core capacity `C`, memory
    /// from the memory capacity in 256 MiB units.
    Cambricon { core: String, memory: String },
    /// Moore Threads: `ceil(K/16)` cards of 16 core groups, memory in
    /// 512 MiB units.
    Mthreads { core: String, memory: String },
    /// One card per unit of the count capacity.
    PerUnit {
        resource: String,
        count: u32,
        devmem: u64,
        devcore: u32,
        /// The upper half of the cards is NUMA node 1 (Kunlunxin).
        numa_halves: bool,
    },
}

/// What a chosen card records for the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The memory and cores asked for.
    Asked,
    /// The whole card: its memory and compute (MetaX GPU, GCU, Kunlunxin).
    WholeCard,
    /// A percentage of the card's compute units (AMD).
    ComputeUnits,
    /// A slot only, no memory or compute (Vastai, Biren).
    Slot,
}

/// How a container's cards are chosen among those that pass the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The first cards in preference order.
    First,
    /// Kunlunxin: 1, 2, 4 or 8 cards within one half of the board, or a
    /// linked cross pair or quad.
    KunlunHalves,
}

/// A vendor's own addition to the node score (HAMi's `ScoreNode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeScore {
    None,
    /// Kunlunxin: fewer half-used board halves is better.
    KunlunBubbles,
    /// MetaX: the plugin's topology losses (binpack) or scores (spread)
    /// for the number of cards taken.
    MetaxTopology,
}

/// The pod annotations a vendor's plugin reads besides the allocation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginNotes {
    None,
    /// `CAMBRICON_DSMLU_PROFILE`, `CAMBRICON_DSMLU_ASSIGNED`.
    Cambricon,
    /// `mthreads.com/gpu-index`, `-predicate-time`, `-predicate-node`.
    Mthreads,
    /// `BAIDU_COM_DEVICE_IDX`.
    Kunlun,
    /// `metax-tech.com/gpu-devices-allocated`, `-predicate-time`.
    MetaxSgpu,
}

/// The webhook's per-container rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Managed when the count is in `limits`; nothing changes.
    Plain,
    /// Iluvatar: several cards take each card's whole compute; the
    /// container's name goes into `SOL_CONTINER_NAME` (HAMi's spelling).
    Iluvatar,
    /// Moore Threads: fixed memory sizes, whole cards when several.
    Mthreads,
    /// AMD: managed when any of its resources is in `limits`; cores 1-100.
    Amd,
    /// Kunlunxin vXPU: memory rounded to a quarter, half or whole card.
    Vxpu,
    /// MetaX sGPU: the QoS policy annotation defaults to best-effort.
    MetaxSgpu,
}

/// Memory the vXPU slices come in, MiB (a card holds slices of one size).
const VXPU_SLICES: [u64; 3] = [24576, 49152, 98304];
/// Moore Threads memory values the webhook accepts, in 512 MiB units.
const MTHREADS_MEMORY: [u64; 7] = [2, 4, 8, 16, 32, 64, 96];
/// MetaX sGPU QoS policies.
const METAX_QOS: [&str; 3] = ["best-effort", "fixed-share", "burst-share"];
const METAX_QOS_KEY: &str = "metax-tech.com/sgpu-qos-policy";

/// One vendor described by data.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub word: String,
    pub count: String,
    pub memory: String,
    pub core: String,
    /// MiB per unit of the memory resource (1, 256, 512); 1024 with
    /// `gib_without_unit`.
    pub memory_unit: u64,
    pub memory_factor: u64,
    /// A memory value without a unit is GiB, with one it is bytes (MetaX sGPU).
    pub gib_without_unit: bool,
    /// Cores of a container that names none.
    pub default_cores: u32,
    /// Memory and cores name totals for the container, split over its cards.
    pub per_card_split: bool,
    /// vXPU: memory rounded up to a slice size, cores follow from it.
    pub vxpu_slices: bool,
    pub source: Source,
    pub report: Report,
    pub uuid_keys: Vec<(String, String)>,
    pub type_keys: Option<(String, String)>,
    pub to_allocate: Option<String>,
    pub allocated: String,
    pub core_check: CoreCheck,
    /// Any use of the card rules it out (Enflame GCU).
    pub exclusive: bool,
    /// A card only holds slices of one memory size (vXPU).
    pub one_slice_size: bool,
    /// All of a pod's containers share one card (Moore Threads, MetaX GPU).
    pub same_card: bool,
    pub take: Take,
    pub placement: Placement,
    pub notes: PluginNotes,
    pub admit: Admit,
    /// Entries carry the card's model as their type (AMD).
    pub entry_is_model: bool,
    /// `hami.io/node-handshake-<x>`, for vendors whose plugin answers one.
    pub handshake: Option<String>,
    /// Binds take `hami.io/mutex.lock` (its plugin releases it).
    pub node_lock: bool,
    /// The node annotation of the plugin's own lock, taken instead.
    pub plugin_lock: Option<String>,
    pub node_score: NodeScore,
}

impl Spec {
    fn new(word: &str, count: &str, report: Report, allocated: &str) -> Spec {
        Spec {
            word: word.into(),
            count: count.into(),
            memory: String::new(),
            core: String::new(),
            memory_unit: 1,
            memory_factor: 1,
            gib_without_unit: false,
            default_cores: 0,
            per_card_split: false,
            vxpu_slices: false,
            source: Source::LimitsThenRequests,
            report,
            uuid_keys: Vec::new(),
            type_keys: None,
            to_allocate: None,
            allocated: allocated.into(),
            core_check: CoreCheck::Shared,
            exclusive: false,
            one_slice_size: false,
            same_card: false,
            take: Take::Asked,
            placement: Placement::First,
            notes: PluginNotes::None,
            admit: Admit::Plain,
            entry_is_model: false,
            handshake: None,
            node_lock: true,
            plugin_lock: None,
            node_score: NodeScore::None,
        }
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    fn with_to_allocate(mut self, key: &str) -> Spec {
        self.to_allocate = Some(key.to_string());
        self
    }

    fn annotation(key: &str) -> Report {
        Report::Annotation {
            key: key.into(),
            devcore_100: false,
        }
    }
}

/// A vendor whose rules are a [`Spec`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generic {
    pub spec: Spec,
}

impl Generic {
    pub fn cambricon(c: &hami_api::vendor_config::ResourceNames) -> Generic {
        let mut s = Spec::new(
            "MLU",
            &c.resource_count_name,
            Report::Capacity(CapacityCards::Cambricon {
                core: c.resource_core_name.clone(),
                memory: c.resource_memory_name.clone(),
            }),
            "hami.io/cambricon-mlu-devices-allocated",
        )
        .with_to_allocate("hami.io/cambricon-mlu-devices-to-allocate");
        s.memory = c.resource_memory_name.clone();
        s.core = c.resource_core_name.clone();
        s.memory_unit = 256;
        s.default_cores = 100;
        s.uuid_keys = vec![Spec::pair(
            "cambricon.com/use-gpuuuid",
            "cambricon.com/nouse-gpuuuid",
        )];
        s.notes = PluginNotes::Cambricon;
        s.node_lock = false;
        s.plugin_lock = Some("cambricon.com/dsmlu.lock".into());
        Generic { spec: s }
    }

    pub fn hygon(c: &hami_api::vendor_config::ResourceNames) -> Generic {
        let mut s = Spec::new(
            "DCU",
            &c.resource_count_name,
            Spec::annotation("hami.io/node-dcu-register"),
            "hami.io/dcu-devices-allocated",
        )
        .with_to_allocate("hami.io/dcu-devices-to-allocate");
        s.memory = c.resource_memory_name.clone();
        s.core = c.resource_core_name.clone();
        s.memory_factor = c.memory_factor.max(1);
        s.default_cores = 100;
        s.uuid_keys = vec![Spec::pair(
            "hygon.com/use-gpuuuid",
            "hygon.com/nouse-gpuuuid",
        )];
        s.type_keys = Some(Spec::pair(
            "hygon.com/use-dcutype",
            "hygon.com/nouse-dcutype",
        ));
        s.handshake = Some("hami.io/node-handshake-dcu".into());
        Generic { spec: s }
    }

    pub fn iluvatar(c: &IluvatarChip) -> Generic {
        let w = &c.common_word;
        let mut s = Spec::new(
            w,
            &c.resource_count_name,
            Spec::annotation(&format!("hami.io/node-{w}-register")),
            &format!("hami.io/{w}-devices-allocated"),
        )
        .with_to_allocate(&format!("hami.io/{w}-devices-to-allocate"));
        s.memory = c.resource_memory_name.clone();
        s.core = c.resource_core_name.clone();
        s.memory_unit = 256;
        s.uuid_keys = vec![Spec::pair(
            &format!("hami.io/use-{w}-uuid"),
            &format!("hami.io/no-use-{w}-uuid"),
        )];
        s.admit = Admit::Iluvatar;
        s.handshake = Some(format!("hami.io/node-handshake-{w}"));
        Generic { spec: s }
    }

    pub fn mthreads(c: &hami_api::vendor_config::ResourceNames) -> Generic {
        let mut s = Spec::new(
            "Mthreads",
            &c.resource_count_name,
            Report::Capacity(CapacityCards::Mthreads {
                core: c.resource_core_name.clone(),
                memory: c.resource_memory_name.clone(),
            }),
            "hami.io/mthreads-vgpu-devices-allocated",
        );
        s.memory = c.resource_memory_name.clone();
        s.core = c.resource_core_name.clone();
        s.memory_unit = 512;
        s.per_card_split = true;
        s.uuid_keys = vec![Spec::pair(
            "mthreads.ai/use-gpuuuid",
            "mthreads.ai/nouse-gpuuuid",
        )];
        s.same_card = true;
        s.notes = PluginNotes::Mthreads;
        s.admit = Admit::Mthreads;
        s.node_lock = false;
        Generic { spec: s }
    }

    pub fn metax_gpu(c: &hami_api::vendor_config::MetaxConfig) -> Generic {
        let mut s = Spec::new(
            "Metax-GPU",
            &c.resource_count_name,
            Report::Capacity(CapacityCards::PerUnit {
                resource: c.resource_count_name.clone(),
                count: 1,
                devmem: 65536,
                devcore: 100,
                numa_halves: false,
            }),
            "hami.io/metax-gpu-devices-allocated",
        )
        .with_to_allocate("hami.io/metax-gpu-devices-to-allocate");
        s.same_card = true;
        s.take = Take::WholeCard;
        s.node_lock = false;
        s.node_score = NodeScore::MetaxTopology;
        Generic { spec: s }
    }

    pub fn metax_sgpu(c: &hami_api::vendor_config::MetaxConfig) -> Generic {
        let mut s = Spec::new(
            "Metax-SGPU",
            &c.resource_v_count_name,
            Report::MetaxJson("metax-tech.com/node-gpu-devices".into()),
            "hami.io/metax-sgpu-devices-allocated",
        )
        .with_to_allocate("hami.io/metax-sgpu-devices-to-allocate");
        s.memory = c.resource_v_memory_name.clone();
        s.core = c.resource_v_core_name.clone();
        s.memory_unit = 1024;
        s.gib_without_unit = true;
        s.default_cores = 100;
        s.source = Source::Limits;
        s.uuid_keys = vec![Spec::pair(
            "metax-tech.com/use-gpuuuid",
            "metax-tech.com/nouse-gpuuuid",
        )];
        s.notes = PluginNotes::MetaxSgpu;
        s.admit = Admit::MetaxSgpu;
        Generic { spec: s }
    }

    pub fn enflame_gcu(c: &hami_api::vendor_config::EnflameConfig) -> Generic {
        let mut s = Spec::new(
            "GCU",
            &c.resource_name_gcu,
            Report::Capacity(CapacityCards::PerUnit {
                resource: c.resource_name_gcu.clone(),
                count: 1,
                devmem: 100,
                devcore: 100,
                numa_halves: false,
            }),
            "hami.io/enflame-gcu-devices-allocated",
        )
        .with_to_allocate("hami.io/enflame-gcu-devices-to-allocate");
        s.exclusive = true;
        s.take = Take::WholeCard;
        s.node_lock = false;
        Generic { spec: s }
    }

    pub fn kunlun_xpu(c: &hami_api::vendor_config::KunlunConfig) -> Generic {
        let mut s = Spec::new(
            "kunlun",
            &c.resource_count_name,
            Report::Capacity(CapacityCards::PerUnit {
                resource: c.resource_count_name.clone(),
                count: 100,
                devmem: 98304,
                devcore: 100,
                numa_halves: true,
            }),
            "hami.io/kunlun-allocated",
        );
        s.uuid_keys = vec![
            Spec::pair("hami.io/use-xpu-uuid", "hami.io/no-use-xpu-uuid"),
            Spec::pair("baidu.com/use-gpuuuid", "baidu.com/nouse-gpuuuid"),
        ];
        s.exclusive = true;
        s.take = Take::WholeCard;
        s.placement = Placement::KunlunHalves;
        s.notes = PluginNotes::Kunlun;
        s.node_lock = false;
        s.node_score = NodeScore::KunlunBubbles;
        Generic { spec: s }
    }

    pub fn kunlun_vxpu(c: &hami_api::vendor_config::KunlunConfig) -> Generic {
        let mut s = Spec::new(
            "XPU",
            &c.resource_v_count_name,
            Spec::annotation("hami.io/node-register-xpu"),
            "hami.io/xpu-devices-allocated",
        )
        .with_to_allocate("hami.io/xpu-devices-to-allocate");
        s.memory = c.resource_v_memory_name.clone();
        s.vxpu_slices = true;
        s.uuid_keys = vec![
            Spec::pair("hami.io/use-xpu-uuid", "hami.io/no-use-xpu-uuid"),
            Spec::pair("baidu.com/use-gpuuuid", "baidu.com/nouse-gpuuuid"),
        ];
        s.core_check = CoreCheck::None;
        s.one_slice_size = true;
        s.placement = Placement::KunlunHalves;
        s.admit = Admit::Vxpu;
        s.handshake = Some("hami.io/node-handshake-xpu".into());
        Generic { spec: s }
    }

    pub fn amd(c: &hami_api::vendor_config::ResourceNames) -> Generic {
        let mut s = Spec::new(
            "AMD",
            &c.resource_count_name,
            Spec::annotation("hami.io/node-amd-register"),
            "hami.io/amd-devices-allocated",
        )
        .with_to_allocate("hami.io/amd-devices-to-allocate");
        s.memory = c.resource_memory_name.clone();
        s.core = c.resource_core_name.clone();
        s.default_cores = 100;
        s.source = Source::Limits;
        s.uuid_keys = vec![Spec::pair("amd.com/use-gpu-uuid", "amd.com/nouse-gpu-uuid")];
        s.type_keys = Some(Spec::pair("amd.com/use-gputype", "amd.com/nouse-gputype"));
        s.core_check = CoreCheck::FreeOnly;
        s.take = Take::ComputeUnits;
        s.admit = Admit::Amd;
        s.entry_is_model = true;
        Generic { spec: s }
    }

    /// Vastai (`va`) and Biren (`biren`): count only, slots from the plugin.
    pub fn count_only(
        word: &str,
        short: &str,
        domain: &str,
        c: &hami_api::vendor_config::ResourceNames,
    ) -> Generic {
        let mut s = Spec::new(
            word,
            &c.resource_count_name,
            Report::Annotation {
                key: format!("hami.io/node-{short}-register"),
                devcore_100: true,
            },
            &format!("hami.io/{word}-devices-allocated"),
        )
        .with_to_allocate(&format!("hami.io/{word}-devices-to-allocate"));
        s.uuid_keys = vec![Spec::pair(
            &format!("{domain}/use-gpuuuid"),
            &format!("{domain}/nouse-gpuuuid"),
        )];
        s.core_check = CoreCheck::None;
        s.take = Take::Slot;
        s.handshake = Some(format!("hami.io/node-handshake-{short}"));
        Generic { spec: s }
    }

    /// Every generic vendor of a device config, in HAMi's order.
    pub fn all(v: &VendorConfigs) -> Vec<Generic> {
        let mut out = vec![Generic::cambricon(&v.cambricon), Generic::hygon(&v.hygon)];
        out.extend(v.iluvatars.iter().map(Generic::iluvatar));
        out.extend([
            Generic::mthreads(&v.mthreads),
            Generic::metax_gpu(&v.metax),
            Generic::metax_sgpu(&v.metax),
            Generic::enflame_gcu(&v.enflame),
            Generic::kunlun_xpu(&v.kunlun),
            Generic::kunlun_vxpu(&v.kunlun),
            Generic::amd(&v.amd),
            Generic::count_only("Vastai", "va", "vastaitech.com", &v.vastai),
            Generic::count_only("Biren", "biren", "birentech.com", &v.biren),
        ]);
        out.retain(|g| !g.spec.count.is_empty());
        out
    }

    fn container_request(&self, c: &Container) -> Result<Option<ContainerRequest>, RequestError> {
        let s = &self.spec;
        let Some(n) = read_whole(c, s.source, &s.count)? else {
            return Ok(None);
        };
        let Some(nums) = count_of(c, &s.count, n)? else {
            return Ok(None);
        };
        let mut mem = self.memory_mib(c)?;
        let mut cores = match read_whole(c, s.source, &s.core)? {
            Some(v) => u32::try_from(v).map_err(|_| bad_value(c, &s.core, v, "is too large"))?,
            None => s.default_cores,
        };
        if s.per_card_split {
            mem = mem.map(|m| m / u64::from(nums));
            cores /= nums;
        }
        if s.vxpu_slices {
            let m = mem.map_or(VXPU_SLICES[2], |m| {
                *VXPU_SLICES
                    .iter()
                    .find(|&&s| m <= s)
                    .unwrap_or(&VXPU_SLICES[2])
            });
            mem = Some(m);
            cores = (m * 100 / VXPU_SLICES[2]) as u32;
        }
        match s.take {
            Take::WholeCard => {
                mem = None;
                cores = 100;
            }
            Take::Slot => {
                mem = Some(0);
                cores = 0;
            }
            Take::Asked | Take::ComputeUnits => {}
        }
        // Compute above a whole card is a whole card, as HAMi's fit clamps it.
        if s.take != Take::ComputeUnits {
            cores = cores.min(100);
        }
        Ok(Some(ContainerRequest {
            nums,
            vendor: s.word.clone(),
            mem: mem.unwrap_or(0),
            mem_percentage: if mem.is_none() { Some(100) } else { None },
            cores,
            priority: None,
            slices: None,
        }))
    }

    /// The container's memory per card in MiB; `None` for the whole card.
    fn memory_mib(&self, c: &Container) -> Result<Option<u64>, RequestError> {
        let s = &self.spec;
        if s.memory.is_empty() {
            return Ok(None);
        }
        let mib = if s.gib_without_unit {
            let Some(q) = read_quantity(c, s.source, &s.memory)? else {
                return Ok(None);
            };
            let raw = c
                .resources
                .as_ref()
                .and_then(|r| hami_api::request::resource_value(r, &s.memory))
                .map(|q| q.0.clone())
                .unwrap_or_default();
            let bytes_given = raw.bytes().any(|b| b.is_ascii_alphabetic());
            let v = q.value();
            if v < 0 {
                return Err(bad_value(c, &s.memory, 0, "must not be negative"));
            }
            if bytes_given {
                (v as u64).div_ceil(1 << 20)
            } else {
                (v as u64).saturating_mul(1024)
            }
        } else {
            let Some(units) = read_whole(c, s.source, &s.memory)? else {
                return Ok(None);
            };
            units
                .checked_mul(s.memory_unit)
                .and_then(|m| m.checked_mul(s.memory_factor))
                .ok_or_else(|| bad_value(c, &s.memory, units, "is too large"))?
        };
        Ok(Some(mib))
    }

    fn selectors(&self, pod: &FitPod<'_>) -> Selectors {
        Selectors::read(
            pod.annotations,
            &self.spec.uuid_keys,
            self.spec.type_keys.as_ref(),
        )
    }

    fn card_fits(
        &self,
        node: &NodeState,
        i: usize,
        used: Usage,
        req: &ContainerRequest,
        pod: &FitPod<'_>,
        selectors: &Selectors,
    ) -> Result<(), Reason> {
        let s = &self.spec;
        let d = &node.devices[i];
        if s.exclusive {
            if !d.usable() {
                return Err(if d.info.health {
                    Reason::CardCordoned
                } else {
                    Reason::CardNotHealth
                });
            }
            if !selectors.uuid_allowed(&d.info.id) {
                return Err(Reason::CardUuidMismatch);
            }
            if used.slots > 0 {
                return Err(Reason::ExclusiveDeviceAllocateConflict);
            }
            return Ok(());
        }
        let (mem, cores) = self.take(&d.info, used, req);
        card_rule(
            d,
            used,
            mem,
            cores,
            d.info.devcore,
            s.core_check,
            selectors,
            is_mutex(pod),
        )?;
        if s.one_slice_size && used.slots > 0 && used.mem / u64::from(used.slots) != mem {
            return Err(Reason::CardInsufficientMemory);
        }
        if s.vxpu_slices && d.info.devmem.saturating_sub(used.mem) < mem {
            return Err(Reason::CardInsufficientMemory);
        }
        if s.same_card && pod.earlier.iter().any(|&e| e != i) {
            return Err(Reason::CardNotFoundCustomFilterRule);
        }
        if s.notes == PluginNotes::MetaxSgpu && !metax_qos_fits(d, used, req, pod) {
            return Err(Reason::CardQosPolicyMismatch);
        }
        Ok(())
    }
}

/// MetaX sGPU: a card in use keeps the QoS policy its plugin reports; a
/// shared (not whole-card) request of another policy does not go there.
/// Online pods (`metax-tech.com/sgpu-app-class: online`) are not checked.
fn metax_qos_fits(
    d: &crate::snapshot::DeviceState,
    used: Usage,
    req: &ContainerRequest,
    pod: &FitPod<'_>,
) -> bool {
    let online = pod
        .annotations
        .get("metax-tech.com/sgpu-app-class")
        .is_some_and(|c| c == "online");
    if online || used.slots == 0 || req.cores >= 100 {
        return true;
    }
    let card = d
        .info
        .custom_info
        .as_ref()
        .and_then(|c| c.get("qosPolicy"))
        .and_then(|q| q.as_str())
        .unwrap_or_default();
    let wanted = pod
        .annotations
        .get(METAX_QOS_KEY)
        .map_or("best-effort", String::as_str);
    card.is_empty() || card == wanted
}

/// Half-used board halves of a set of card indexes, as HAMi weighs them:
/// per half (0-3, 4-7), 0 when full, 2 for a single card, else 1; an empty
/// set counts 1.
fn kunlun_bubbles(indexes: &[u32]) -> i32 {
    if indexes.is_empty() {
        return 1;
    }
    (0..2)
        .map(|h| match indexes.iter().filter(|&&i| i / 4 == h).count() {
            4 => 0,
            1 => 2,
            _ => 1,
        })
        .sum()
}

/// Kunlunxin's board: cards 0-3 and 4-7 are two halves; the cross pairs and
/// quads that HAMi accepts when no half has room.
const KUNLUN_PAIRS: [[u32; 2]; 4] = [[0, 4], [1, 5], [2, 6], [3, 7]];
const KUNLUN_QUADS: [[u32; 4]; 6] = [
    [0, 1, 4, 5],
    [2, 3, 6, 7],
    [0, 2, 4, 6],
    [1, 3, 5, 7],
    [0, 3, 4, 7],
    [1, 2, 5, 6],
];

/// Chooses Kunlunxin cards from the fitting ones (by card index; HAMi uses
/// positions in its sorted list, which equal indexes when cards tie):
/// within one half, preferring the half whose free cards match the request
/// exactly, else a linked cross pair or quad.
fn kunlun_pick(node: &NodeState, fitting: &[usize], nums: usize) -> Option<Vec<usize>> {
    let index = |i: usize| node.devices[i].info.index;
    let half = |h: u32| -> Vec<usize> {
        let mut v: Vec<usize> = fitting
            .iter()
            .copied()
            .filter(|&i| index(i) / 4 == h)
            .collect();
        v.sort_by_key(|&i| index(i));
        v
    };
    let halves = [half(0), half(1)];
    match nums {
        8 => (fitting.len() >= 8).then(|| {
            let mut all: Vec<usize> = fitting.to_vec();
            all.sort_by_key(|&i| index(i));
            all.truncate(8);
            all
        }),
        1 | 2 | 4 => {
            if halves.iter().any(|h| h.len() >= nums) {
                let sizes: Vec<usize> = if nums == 1 {
                    vec![1, 3, 2, 4]
                } else {
                    (nums..=4).collect()
                };
                for size in sizes {
                    if let Some(h) = halves.iter().find(|h| h.len() == size) {
                        return Some(h[..nums].to_vec());
                    }
                }
                return None;
            }
            let by_index = |want: &[u32]| -> Option<Vec<usize>> {
                want.iter()
                    .map(|&w| fitting.iter().copied().find(|&i| index(i) == w))
                    .collect()
            };
            match nums {
                2 => KUNLUN_PAIRS.iter().find_map(|p| by_index(p)),
                4 => KUNLUN_QUADS.iter().find_map(|q| by_index(q)),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Vendor for Generic {
    fn word(&self) -> &str {
        &self.spec.word
    }

    fn allocation_annotations(&self) -> (Option<&str>, &str) {
        (self.spec.to_allocate.as_deref(), &self.spec.allocated)
    }

    fn register_key(&self) -> Option<&str> {
        match &self.spec.report {
            Report::Annotation { key, .. } | Report::MetaxJson(key) => Some(key),
            Report::Capacity(_) => None,
        }
    }

    fn handshake_key(&self) -> Option<&str> {
        self.spec.handshake.as_deref()
    }

    fn uses_node_lock(&self) -> bool {
        self.spec.node_lock
    }

    fn plugin_lock_key(&self, pod: &Pod) -> Option<&str> {
        let key = self.spec.plugin_lock.as_deref()?;
        // Cambricon's plugin releases its lock only after allocating a
        // dynamic-sMLU pod (one whose limits name a `cambricon.com/*.vcore`
        // or `*.vmemory` above 0, its own test): a lock taken for another
        // pod would hold the node's binds for the full expiry.
        let app_containers = pod.spec.iter().flat_map(|s| &s.containers);
        let dynamic_smlu = app_containers
            .flat_map(|c| c.resources.as_ref().and_then(|r| r.limits.as_ref()))
            .flatten()
            .any(|(name, q)| {
                name.starts_with("cambricon.com/")
                    && (name.ends_with(".vcore") || name.ends_with(".vmemory"))
                    && hami_api::quantity::Quantity::parse(&q.0).is_ok_and(|v| v.value() > 0)
            });
        dynamic_smlu.then_some(key)
    }

    fn scores_nodes(&self) -> bool {
        self.spec.node_score != NodeScore::None
    }

    fn node_score(&self, node: &NodeState, cards: &[Vec<usize>], policy: NodePolicy) -> f64 {
        let taken: Vec<usize> = cards.iter().flatten().copied().collect();
        match self.spec.node_score {
            NodeScore::None => 0.0,
            NodeScore::KunlunBubbles => {
                let index = |i: usize| node.devices[i].info.index;
                let before: Vec<u32> = node
                    .devices
                    .iter()
                    .filter(|d| d.used.slots > 0 && d.info.device_type == self.spec.word)
                    .map(|d| d.info.index)
                    .collect();
                let mut after = before.clone();
                after.extend(taken.iter().map(|&i| index(i)));
                match kunlun_bubbles(&after) - kunlun_bubbles(&before) {
                    -1 => 3000.0,
                    0 => 2000.0,
                    2 => 0.0,
                    _ => 1000.0,
                }
            }
            NodeScore::MetaxTopology => {
                let key = match policy {
                    NodePolicy::Binpack => "losses",
                    NodePolicy::Spread => "scores",
                };
                taken
                    .first()
                    .and_then(|&i| node.devices[i].info.custom_info.as_ref())
                    .and_then(|c| c.get(key))
                    .and_then(|m| m.get(taken.len().to_string()))
                    .and_then(|v| v.as_f64())
                    .map_or(0.0, |v| 2000.0 - v)
            }
        }
    }

    fn owns(&self, entry: &ContainerDevice) -> bool {
        if self.spec.entry_is_model {
            entry
                .vendor
                .to_ascii_lowercase()
                .contains(&self.spec.word.to_ascii_lowercase())
        } else {
            entry.vendor == self.spec.word
        }
    }

    fn entry_type<'a>(&'a self, card: &'a DeviceInfo) -> &'a str {
        if self.spec.entry_is_model {
            &card.device_type
        } else {
            &self.spec.word
        }
    }

    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError> {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let annotation = |key: &str| {
            node.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .cloned()
        };
        let devices = match &self.spec.report {
            Report::Annotation { key, devcore_100 } => {
                let Some(value) = annotation(key) else {
                    return Ok(None);
                };
                let mut devices = decode_devices(key, &value)?;
                if devices.is_empty() {
                    return Err(DecodeError::new(key, &value, "lists no device"));
                }
                if *devcore_100 {
                    devices.iter_mut().for_each(|d| d.devcore = 100);
                }
                devices
            }
            Report::MetaxJson(key) => {
                let Some(value) = annotation(key) else {
                    return Ok(None);
                };
                decode_metax(key, &value, &self.spec.word)?
            }
            Report::Capacity(cards) => capacity_cards(node, name, cards),
        };
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
        let rejection = Rejection::for_cards(cards.len());
        let selectors = self.selectors(pod);
        card_order(
            &self.spec.word,
            node,
            cards,
            used,
            req,
            pod.constraints,
            &mut scratch.keyed,
        );
        let nums = req.nums as usize;
        let fits = |i: usize| self.card_fits(node, i, used[i], req, pod, &selectors);
        match self.spec.placement {
            Placement::First => pick_first(scratch, rejection, nums, fits),
            Placement::KunlunHalves => {
                let mut rejection = rejection;
                shared::collect_fitting(scratch, &mut rejection, None, fits);
                scratch.picked.clear();
                match kunlun_pick(node, &scratch.fitting, nums) {
                    Some(p) => {
                        scratch.picked = p;
                        Ok(())
                    }
                    None => {
                        rejection.add(Reason::NumaNotFit, 1);
                        Err(rejection)
                    }
                }
            }
        }
    }

    fn take(&self, card: &DeviceInfo, _used: Usage, req: &ContainerRequest) -> (u64, u32) {
        match self.spec.take {
            Take::Asked | Take::Slot => (req.mem_on(card.devmem), req.cores),
            Take::WholeCard => (card.devmem, card.devcore),
            Take::ComputeUnits => {
                let cus = (u64::from(card.devcore) * u64::from(req.cores) / 100).max(1);
                (
                    req.mem_on(card.devmem),
                    cus.min(u64::from(card.devcore)) as u32,
                )
            }
        }
    }

    fn count_resource(&self) -> &str {
        &self.spec.count
    }

    fn admit_container(
        &self,
        c: &mut Container,
        _pod_annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAdmission, String> {
        let s = &self.spec;
        let before = c.clone();
        let res = c.resources.as_ref();
        let managed = match s.admit {
            Admit::Amd => [&s.count, &s.memory, &s.core]
                .iter()
                .any(|n| in_limits(res, n)),
            _ => in_limits(res, &s.count),
        };
        if !managed {
            return Ok(ContainerAdmission::default());
        }
        let count = read_whole(c, Source::Limits, &s.count).map_err(|e| e.to_string())?;
        match s.admit {
            Admit::Plain => {}
            Admit::Iluvatar => {
                if let Some(n) = count.filter(|&n| n > 1) {
                    set_limit(c, &s.core, n.saturating_mul(100), false);
                }
                if !c.name.is_empty()
                    && !c
                        .env
                        .iter()
                        .flatten()
                        .any(|e| e.name == "SOL_CONTINER_NAME")
                {
                    let name = c.name.clone();
                    set_env(c, "SOL_CONTINER_NAME", name);
                }
            }
            Admit::Mthreads => {
                let n = count.unwrap_or(0);
                if n == 0 {
                    return Err(format!(
                        "container {:?}: {} must be greater than 0",
                        c.name, s.count
                    ));
                }
                let memory = read_whole(c, Source::Limits, &s.memory).map_err(|e| e.to_string())?;
                if n > 1 || memory.is_none() {
                    set_limit(c, &s.core, 16 * n, false);
                    set_limit(c, &s.memory, 96 * n, false);
                } else if let Some(m) = memory
                    && !MTHREADS_MEMORY.contains(&m)
                {
                    return Err(format!(
                        "container {:?}: {}={m}: sGPU memory must be one of {MTHREADS_MEMORY:?} (units of 512 MiB)",
                        c.name, s.memory
                    ));
                }
            }
            Admit::Amd => {
                if count.is_some()
                    && let Some(cores) =
                        read_whole(c, Source::Limits, &s.core).map_err(|e| e.to_string())?
                    && !(1..=100).contains(&cores)
                {
                    return Err(format!(
                        "container {:?}: {}={cores}: must be 1-100 (percent of the card's compute units)",
                        c.name, s.core
                    ));
                }
            }
            Admit::Vxpu => {
                if let Some(m) =
                    read_whole(c, Source::Limits, &s.memory).map_err(|e| e.to_string())?
                {
                    let slice = *VXPU_SLICES
                        .iter()
                        .find(|&&v| m <= v)
                        .unwrap_or(&VXPU_SLICES[2]);
                    set_limit(c, &s.memory, slice, true);
                }
            }
            Admit::MetaxSgpu => {}
        }
        // Every value must parse the way the scheduler will read it.
        self.container_request(c).map_err(|e| e.to_string())?;
        Ok(ContainerAdmission {
            managed: true,
            changed: *c != before,
        })
    }

    fn admit_gpu_pod(&self, pod: &mut Pod) -> Result<(), String> {
        let s = &self.spec;
        let counts: Vec<u64> = shared::containers(pod)
            .filter_map(|c| read_whole(c, Source::Limits, &s.count).ok().flatten())
            .collect();
        if counts.is_empty() {
            return Ok(());
        }
        let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match s.admit {
            Admit::Mthreads => {
                if let Some(&n) = counts.iter().rev().find(|&&n| n > 1) {
                    annotations.insert("mthreads.com/request-gpu-num".into(), n.to_string());
                }
            }
            Admit::MetaxSgpu => match annotations.get(METAX_QOS_KEY) {
                None => {
                    annotations.insert(METAX_QOS_KEY.into(), "best-effort".into());
                }
                Some(q) if !METAX_QOS.contains(&q.as_str()) => {
                    return Err(format!(
                        "pod annotation {METAX_QOS_KEY}={q:?}: must be one of {METAX_QOS:?}"
                    ));
                }
                Some(_) => {}
            },
            _ => {}
        }
        Ok(())
    }

    fn plugin_annotations(&self, placed: &Placed<'_>) -> Vec<(String, String)> {
        let (node, devices, now_ns) = (placed.node, placed.devices, placed.now_ns);
        let with_cards = || devices.0.iter().filter(|c| !c.is_empty());
        let indexes = |c: &Vec<ContainerDevice>| {
            c.iter()
                .map(|d| index_suffix(&d.uuid).map_or_else(|| d.uuid.clone(), |i| i.to_string()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self.spec.notes {
            PluginNotes::None => Vec::new(),
            PluginNotes::Cambricon => {
                let Some(d) = with_cards().next().and_then(|c| c.first()) else {
                    return Vec::new();
                };
                let index = index_suffix(&d.uuid).unwrap_or(0);
                vec![
                    (
                        "CAMBRICON_DSMLU_PROFILE".into(),
                        format!("{index}_{}_{}", d.cores, d.mem / 256),
                    ),
                    ("CAMBRICON_DSMLU_ASSIGNED".into(), "false".into()),
                ]
            }
            PluginNotes::Mthreads => {
                let Some(last) = with_cards().next_back() else {
                    return Vec::new();
                };
                vec![
                    ("mthreads.com/gpu-index".into(), indexes(last)),
                    ("mthreads.com/predicate-node".into(), node.to_string()),
                    ("mthreads.com/predicate-time".into(), now_ns.to_string()),
                ]
            }
            PluginNotes::Kunlun => match with_cards().next_back() {
                Some(last) => vec![("BAIDU_COM_DEVICE_IDX".into(), indexes(last))],
                None => Vec::new(),
            },
            PluginNotes::MetaxSgpu => {
                let per_container: Vec<serde_json::Value> = with_cards()
                    .map(|c| {
                        c.iter()
                            .map(|d| {
                                let mut o = serde_json::Map::new();
                                o.insert("uuid".into(), d.uuid.clone().into());
                                if d.cores > 0 {
                                    o.insert("compute".into(), d.cores.into());
                                }
                                if d.mem > 0 {
                                    o.insert("vRam".into(), d.mem.into());
                                }
                                serde_json::Value::Object(o)
                            })
                            .collect()
                    })
                    .collect();
                vec![
                    (
                        "metax-tech.com/gpu-devices-allocated".into(),
                        serde_json::Value::Array(per_container).to_string(),
                    ),
                    ("metax-tech.com/predicate-time".into(), now_ns.to_string()),
                ]
            }
        }
    }

    fn plugin_annotation_keys(&self) -> Vec<String> {
        let keys: &[&str] = match self.spec.notes {
            PluginNotes::None => &[],
            PluginNotes::Cambricon => &["CAMBRICON_DSMLU_PROFILE", "CAMBRICON_DSMLU_ASSIGNED"],
            PluginNotes::Mthreads => &[
                "mthreads.com/gpu-index",
                "mthreads.com/predicate-node",
                "mthreads.com/predicate-time",
            ],
            PluginNotes::Kunlun => &["BAIDU_COM_DEVICE_IDX"],
            PluginNotes::MetaxSgpu => &[
                "metax-tech.com/gpu-devices-allocated",
                "metax-tech.com/predicate-time",
            ],
        };
        keys.iter().map(|k| k.to_string()).collect()
    }
}

/// Cards made up from node capacity, ids `<node>-<infix>-<i>` as HAMi names them.
fn capacity_cards(node: &Node, name: &str, cards: &CapacityCards) -> Vec<DeviceInfo> {
    let card = |infix: &str, i: u64, count: u32, devmem: u64, devcore: u32, ty: &str| DeviceInfo {
        id: format!("{name}-{infix}-{i}"),
        index: i as u32,
        count,
        devmem,
        devcore,
        device_type: ty.to_string(),
        health: true,
        ..Default::default()
    };
    match cards {
        CapacityCards::Cambricon { core, memory } => {
            let c = capacity(node, core);
            let m = capacity(node, memory);
            if c == 0 {
                return Vec::new();
            }
            let mem = m.saturating_mul(256).saturating_mul(100) / c;
            (0..c.div_ceil(100))
                .map(|i| card("cambricon-mlu", i, 100, mem, 100, "MLU"))
                .collect()
        }
        CapacityCards::Mthreads { core, memory } => {
            let k = capacity(node, core);
            let m = capacity(node, memory);
            if k == 0 {
                return Vec::new();
            }
            let mem = m.saturating_mul(512).saturating_mul(16) / k;
            (0..k.div_ceil(16))
                .map(|i| card("mthreads", i, 100, mem, 16, "Mthreads"))
                .collect()
        }
        CapacityCards::PerUnit {
            resource,
            count,
            devmem,
            devcore,
            numa_halves,
        } => {
            let n = capacity(node, resource).min(1024);
            let (infix, ty) = match resource.as_str() {
                r if r.starts_with("metax") => ("metax", "Metax-GPU"),
                r if r.starts_with("enflame") => ("GCU", "GCU"),
                _ => ("kunlun", "kunlun"),
            };
            let topology = metax_topology(node).filter(|_| infix == "metax");
            (0..n)
                .map(|i| {
                    let mut d = card(infix, i, *count, *devmem, *devcore, ty);
                    if *numa_halves && i >= n / 2 {
                        d.numa = 1;
                    }
                    d.custom_info = topology.clone();
                    d
                })
                .collect()
        }
    }
}

/// MetaX's plugin's topology tables (`metax-tech.com/gpu.topology.losses`
/// and `.scores`: card count to value), kept on each card for scoring.
fn metax_topology(node: &Node) -> Option<Box<serde_json::Value>> {
    let a = node.metadata.annotations.as_ref()?;
    let table = |key: &str| {
        a.get(key)
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .filter(serde_json::Value::is_object)
    };
    let losses = table("metax-tech.com/gpu.topology.losses");
    let scores = table("metax-tech.com/gpu.topology.scores");
    if losses.is_none() && scores.is_none() {
        return None;
    }
    Some(Box::new(
        serde_json::json!({"losses": losses, "scores": scores}),
    ))
}

/// One card of MetaX's own node report.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaxCard {
    uuid: String,
    #[serde(default)]
    total_dev_count: u32,
    #[serde(default)]
    total_compute: u32,
    #[serde(default)]
    total_v_ram: u64,
    #[serde(default)]
    numa: i32,
    #[serde(default)]
    healthy: bool,
    #[serde(default)]
    qos_policy: String,
}

fn decode_metax(key: &str, value: &str, word: &str) -> Result<Vec<DeviceInfo>, DecodeError> {
    let cards: Vec<MetaxCard> = serde_json::from_str(value)
        .map_err(|e| DecodeError::new(key, value, format!("not a MetaX device list: {e}")))?;
    if cards.is_empty() {
        return Err(DecodeError::new(key, value, "lists no device"));
    }
    Ok(cards
        .into_iter()
        .enumerate()
        .map(|(i, c)| DeviceInfo {
            id: c.uuid,
            index: i as u32,
            count: c.total_dev_count,
            devmem: c.total_v_ram,
            devcore: c.total_compute,
            device_type: word.to_string(),
            numa: c.numa,
            health: c.healthy,
            custom_info: Some(Box::new(serde_json::json!({ "qosPolicy": c.qos_policy }))),
            ..Default::default()
        })
        .collect())
}
