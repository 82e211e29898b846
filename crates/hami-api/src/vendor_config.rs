//! The `device-config.yaml` sections of the vendors other than NVIDIA
//! (spec section 10; keys and chart defaults in docs/design/vendor-formats.md).
//!
//! A section in the file replaces only the keys it names: every other key
//! keeps the default of HAMi's chart, so a file written for HAMi gives the
//! same resource names here. Lists (`iluvatars`, `vnpus.configs`) replace
//! the default list as a whole.

use serde::{Deserialize, Serialize};

/// A vendor whose section names up to three resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceNames {
    pub resource_count_name: String,
    pub resource_memory_name: String,
    pub resource_core_name: String,
    /// Memory values are multiplied by this (Hygon).
    pub memory_factor: u64,
}

impl ResourceNames {
    fn new(count: &str, memory: &str, core: &str) -> ResourceNames {
        ResourceNames {
            resource_count_name: count.into(),
            resource_memory_name: memory.into(),
            resource_core_name: core.into(),
            memory_factor: 1,
        }
    }
}

/// `metax`: whole cards (`resourceCountName`) and shared sGPUs (`resourceV…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct MetaxConfig {
    pub resource_count_name: String,
    pub resource_v_count_name: String,
    pub resource_v_memory_name: String,
    pub resource_v_core_name: String,
    /// Written as a string by HAMi's chart (`"false"`); kept for HAMi files.
    pub sgpu_topology_aware: serde_json::Value,
}

/// `enflame`: whole GCUs and DRS slices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct EnflameConfig {
    #[serde(rename = "resourceNameGCU")]
    pub resource_name_gcu: String,
    #[serde(rename = "resourceNameDRSGCU")]
    pub resource_name_drs_gcu: String,
    #[serde(rename = "resourceNameGCUMemory")]
    pub resource_name_gcu_memory: String,
    #[serde(rename = "resourceNameGCUCore")]
    pub resource_name_gcu_core: String,
    /// Legacy count name, used for slices when `resourceNameDRSGCU` is empty.
    #[serde(rename = "resourceNameVGCU")]
    pub resource_name_vgcu: String,
    /// Legacy; HAMi 2.10 stores it and reads it nowhere.
    #[serde(rename = "resourceNameVGCUPercentage")]
    pub resource_name_vgcu_percentage: String,
}

/// `kunlun`: whole XPUs and vXPU slices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct KunlunConfig {
    pub resource_count_name: String,
    pub resource_v_count_name: String,
    pub resource_v_memory_name: String,
}

/// One `iluvatars` entry: a card model with its own resource names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct IluvatarChip {
    pub chip_name: String,
    /// The vendor word, e.g. `MR-V100`.
    pub common_word: String,
    pub resource_count_name: String,
    pub resource_memory_name: String,
    pub resource_core_name: String,
}

/// One vNPU template of an Ascend chip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct VnpuTemplate {
    pub name: String,
    /// MiB.
    pub memory: u64,
    pub ai_core: u32,
    #[serde(rename = "aiCPU")]
    pub ai_cpu: u32,
}

/// One `vnpus.configs` entry: an Ascend chip model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct AscendChip {
    pub chip_name: String,
    /// The vendor word, e.g. `Ascend910B3`.
    pub common_word: String,
    pub resource_name: String,
    pub resource_memory_name: String,
    pub resource_core_name: String,
    /// MiB a whole chip gives.
    pub memory_allocatable: u64,
    /// The largest memory request accepted, MiB.
    pub memory_capacity: u64,
    pub memory_factor: u64,
    pub ai_core: u32,
    #[serde(rename = "aiCPU")]
    pub ai_cpu: u32,
    pub runtime_class_name: String,
    pub overwrite_env: bool,
    /// 910C: NPUs come in pairs (a count of 1 becomes 2).
    pub super_pod: bool,
    pub templates: Vec<VnpuTemplate>,
}

/// `vnpus`: the Ascend chips.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct VnpusConfig {
    /// Soft split (hami-vnpu-core) for nodes that do not say.
    pub hami_vnpu_core: bool,
    /// hami-rs's key: the `runtimeClassName` of every chip that sets none.
    /// The chart's `devices.ascend.runtimeClassName` lands here, so the
    /// default chip list need not be repeated to set it.
    pub runtime_class_name: String,
    /// hami-rs's key: `overwriteEnv` for every chip (the chart's
    /// `scheduler.overwriteEnv`, which HAMi's chart copies into each chip).
    pub overwrite_env: bool,
    pub configs: Vec<AscendChip>,
}

impl VnpusConfig {
    /// The chips, each with `runtimeClassName` filled from the section's
    /// when it sets none, and `overwriteEnv` on when the section's is.
    pub fn chips(&self) -> impl Iterator<Item = AscendChip> + '_ {
        self.configs.iter().map(|chip| {
            let mut chip = chip.clone();
            if chip.runtime_class_name.is_empty() {
                chip.runtime_class_name = self.runtime_class_name.clone();
            }
            chip.overwrite_env |= self.overwrite_env;
            chip
        })
    }
}

/// Every non-NVIDIA section, each with the chart's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorConfigs {
    pub vnpus: VnpusConfig,
    pub cambricon: ResourceNames,
    pub hygon: ResourceNames,
    pub iluvatars: Vec<IluvatarChip>,
    pub mthreads: ResourceNames,
    pub metax: MetaxConfig,
    pub enflame: EnflameConfig,
    pub kunlun: KunlunConfig,
    pub amd: ResourceNames,
    pub awsneuron: ResourceNames,
    pub vastai: ResourceNames,
    pub biren: ResourceNames,
}

/// The sections [`VendorConfigs`] reads, as YAML keys.
pub const VENDOR_SECTIONS: [&str; 12] = [
    "vnpus",
    "cambricon",
    "hygon",
    "iluvatars",
    "mthreads",
    "metax",
    "enflame",
    "kunlun",
    "amd",
    "awsneuron",
    "vastai",
    "biren",
];

fn template(name: &str, memory: u64, ai_core: u32, ai_cpu: u32) -> VnpuTemplate {
    VnpuTemplate {
        name: name.into(),
        memory,
        ai_core,
        ai_cpu,
    }
}

fn ascend(
    word: &str,
    chip: &str,
    allocatable: u64,
    capacity: u64,
    ai_core: u32,
    ai_cpu: u32,
    templates: Vec<VnpuTemplate>,
) -> AscendChip {
    let resource = format!("huawei.com/{word}");
    AscendChip {
        chip_name: chip.into(),
        common_word: word.into(),
        resource_memory_name: format!("{resource}-memory"),
        resource_core_name: format!("{resource}-core"),
        resource_name: resource,
        memory_allocatable: allocatable,
        memory_capacity: capacity,
        memory_factor: 1,
        ai_core,
        ai_cpu,
        runtime_class_name: String::new(),
        overwrite_env: false,
        super_pod: false,
        templates,
    }
}

/// HAMi chart 2.10's Ascend chips.
fn default_vnpus() -> VnpusConfig {
    let b3 = || {
        vec![
            template("vir05_1c_16g", 16384, 5, 1),
            template("vir10_3c_32g", 32768, 10, 3),
        ]
    };
    let mut c910 = ascend("Ascend910C", "Ascend910", 65536, 65536, 20, 7, b3());
    c910.super_pod = true;
    VnpusConfig {
        hami_vnpu_core: false,
        runtime_class_name: String::new(),
        overwrite_env: false,
        configs: vec![
            ascend(
                "Ascend910A",
                "910A",
                32768,
                32768,
                30,
                0,
                vec![
                    template("vir02", 2184, 2, 0),
                    template("vir04", 4369, 4, 0),
                    template("vir08", 8738, 8, 0),
                    template("vir16", 17476, 16, 0),
                ],
            ),
            ascend(
                "Ascend910B2",
                "910B2",
                65536,
                65536,
                24,
                6,
                vec![
                    template("vir03_1c_8g", 8192, 3, 1),
                    template("vir06_1c_16g", 16384, 6, 1),
                    template("vir12_3c_32g", 32768, 12, 3),
                ],
            ),
            ascend("Ascend910B3", "910B3", 65536, 65536, 20, 7, b3()),
            ascend("Ascend910B4-1", "910B4-1", 65536, 65536, 20, 7, b3()),
            ascend(
                "Ascend910B4",
                "910B4",
                32768,
                32768,
                20,
                7,
                vec![
                    template("vir05_1c_8g", 8192, 5, 1),
                    template("vir10_3c_16g", 16384, 10, 3),
                ],
            ),
            ascend(
                "Ascend310P",
                "310P3",
                21527,
                24576,
                8,
                7,
                vec![
                    template("vir01", 3072, 1, 1),
                    template("vir02", 6144, 2, 2),
                    template("vir04", 12288, 4, 4),
                ],
            ),
            c910,
        ],
    }
}

fn iluvatar(model: &str) -> IluvatarChip {
    IluvatarChip {
        chip_name: model.into(),
        common_word: model.into(),
        resource_count_name: format!("iluvatar.ai/{model}-vgpu"),
        resource_memory_name: format!("iluvatar.ai/{model}.vMem"),
        resource_core_name: format!("iluvatar.ai/{model}.vCore"),
    }
}

impl Default for VendorConfigs {
    fn default() -> Self {
        VendorConfigs {
            vnpus: default_vnpus(),
            cambricon: ResourceNames::new(
                "cambricon.com/vmlu",
                "cambricon.com/mlu.smlu.vmemory",
                "cambricon.com/mlu.smlu.vcore",
            ),
            hygon: ResourceNames::new("hygon.com/dcunum", "hygon.com/dcumem", "hygon.com/dcucores"),
            iluvatars: ["MR-V100", "MR-V50", "BI-V150", "BI-V100"]
                .into_iter()
                .map(iluvatar)
                .collect(),
            mthreads: ResourceNames::new(
                "mthreads.com/vgpu",
                "mthreads.com/sgpu-memory",
                "mthreads.com/sgpu-core",
            ),
            metax: MetaxConfig {
                resource_count_name: "metax-tech.com/gpu".into(),
                resource_v_count_name: "metax-tech.com/sgpu".into(),
                resource_v_memory_name: "metax-tech.com/vmemory".into(),
                resource_v_core_name: "metax-tech.com/vcore".into(),
                sgpu_topology_aware: serde_json::Value::String("false".into()),
            },
            enflame: EnflameConfig {
                resource_name_gcu: "enflame.com/gcu".into(),
                resource_name_drs_gcu: "enflame.com/drs-gcu".into(),
                resource_name_gcu_memory: "enflame.com/gcu-memory".into(),
                resource_name_gcu_core: "enflame.com/gcu-core".into(),
                resource_name_vgcu: "enflame.com/vgcu".into(),
                resource_name_vgcu_percentage: "enflame.com/vgcu-percentage".into(),
            },
            kunlun: KunlunConfig {
                resource_count_name: "kunlunxin.com/xpu".into(),
                resource_v_count_name: "kunlunxin.com/vxpu".into(),
                resource_v_memory_name: "kunlunxin.com/vxpu-memory".into(),
            },
            amd: ResourceNames::new("amd.com/gpu", "amd.com/gpumem", "amd.com/gpucores"),
            awsneuron: ResourceNames::new("aws.amazon.com/neuron", "", "aws.amazon.com/neuroncore"),
            vastai: ResourceNames::new("vastaitech.com/va", "", ""),
            biren: ResourceNames::new("birentech.com/gpu", "", ""),
        }
    }
}

/// `base` with the keys of `over` put over it, mapping into mapping; any
/// other value (a list included) replaces the base value whole.
pub(crate) fn overlay(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}
