//! `device-config.yaml`: the per-vendor configuration the scheduler reads
//! from the `hami-scheduler-device` ConfigMap (spec section 10).
//!
//! The `nvidia` section is here; the other vendors' sections are in
//! [`crate::vendor_config`]. Unknown keys are warnings that name the key; a
//! wrong type is an error that names the file, key and expected type.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::vendor_config::{VENDOR_SECTIONS, VendorConfigs, overlay};

/// How the interposer enforces compute limits (`GPU_CORE_UTILIZATION_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuCorePolicy {
    /// Pace kernels when the quota is below 100. (Upstream lets its node
    /// monitor lift the limit while a card is not shared; hami-rs does not
    /// yet, so today this behaves as `force`.)
    #[default]
    Default,
    /// Always pace to the quota.
    Force,
    /// Never limit.
    Disable,
}

impl GpuCorePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuCorePolicy::Default => "default",
            GpuCorePolicy::Force => "force",
            GpuCorePolicy::Disable => "disable",
        }
    }
}

/// The `nvidia` section. Field names are the YAML keys in camelCase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NvidiaConfig {
    pub resource_count_name: String,
    pub resource_memory_name: String,
    pub resource_memory_percentage_name: String,
    pub resource_core_name: String,
    pub resource_priority_name: String,
    /// Containers that may share one card.
    pub device_split_count: u32,
    /// Registered memory = physical MiB x this; above 1 oversubscribes.
    pub device_memory_scaling: f64,
    /// Registered compute = 100 x this.
    pub device_core_scaling: f64,
    /// MiB given to a container that names neither gpumem nor percentage; 0 = the whole card.
    #[serde(alias = "defaultMem")]
    pub default_memory: u64,
    /// gpucores given to a container that names none.
    pub default_cores: u32,
    /// gpumem is multiplied by this.
    pub memory_factor: u64,
    /// nvidia.com/gpu added when only gpumem/gpucores/percentage is set.
    #[serde(rename = "defaultGPUNum")]
    pub default_gpu_num: u32,
    pub gpu_core_policy: GpuCorePolicy,
    pub lib_cuda_log_level: u32,
    pub mig_strategy: String,
    #[serde(rename = "disablecorelimit")]
    pub disable_core_limit: bool,
    /// runtimeClassName set on GPU pods by the webhook, when not empty.
    pub runtime_class_name: String,
    /// The webhook gives every container without a GPU request
    /// `NVIDIA_VISIBLE_DEVICES=none`, so an image that sets it cannot reach
    /// the node's cards through the NVIDIA runtime.
    pub overwrite_env: bool,
    /// MIG geometries per card model, kept as written.
    pub known_mig_geometries: Option<serde_json::Value>,
}

impl Default for NvidiaConfig {
    fn default() -> Self {
        NvidiaConfig {
            resource_count_name: "nvidia.com/gpu".into(),
            resource_memory_name: "nvidia.com/gpumem".into(),
            resource_memory_percentage_name: "nvidia.com/gpumem-percentage".into(),
            resource_core_name: "nvidia.com/gpucores".into(),
            resource_priority_name: "nvidia.com/priority".into(),
            device_split_count: 10,
            device_memory_scaling: 1.0,
            device_core_scaling: 1.0,
            default_memory: 0,
            default_cores: 0,
            memory_factor: 1,
            default_gpu_num: 1,
            gpu_core_policy: GpuCorePolicy::Default,
            lib_cuda_log_level: 2,
            mig_strategy: "none".into(),
            disable_core_limit: false,
            runtime_class_name: String::new(),
            overwrite_env: false,
            known_mig_geometries: None,
        }
    }
}

impl NvidiaConfig {
    /// Every resource name this vendor manages.
    pub fn resource_names(&self) -> [&str; 5] {
        [
            &self.resource_count_name,
            &self.resource_memory_name,
            &self.resource_memory_percentage_name,
            &self.resource_core_name,
            &self.resource_priority_name,
        ]
    }

    pub(crate) fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, msg: &str| {
            Err(ConfigError {
                file: file.to_string(),
                key: format!("nvidia.{key}"),
                message: msg.to_string(),
            })
        };
        if self.device_split_count == 0 {
            return bad("deviceSplitCount", "must be at least 1");
        }
        if !(self.device_memory_scaling.is_finite() && self.device_memory_scaling > 0.0) {
            return bad("deviceMemoryScaling", "must be a number above 0");
        }
        if !(self.device_core_scaling.is_finite() && self.device_core_scaling > 0.0) {
            return bad("deviceCoreScaling", "must be a number above 0");
        }
        if self.default_cores > 100 {
            return bad("defaultCores", "must be 0-100");
        }
        if self.memory_factor == 0 {
            return bad("memoryFactor", "must be at least 1");
        }
        if self.lib_cuda_log_level > 4 {
            return bad("libCudaLogLevel", "must be 0-4");
        }
        Ok(())
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DeviceConfig {
    pub nvidia: NvidiaConfig,
    /// Every other vendor's section, with the chart's defaults where the
    /// file is silent.
    pub vendors: VendorConfigs,
}

/// A key the parser did not recognise; the file still loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub file: String,
    pub key: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: unknown key {:?} ignored", self.file, self.key)
    }
}

/// Why a config file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// Dotted path of the offending key, empty for file-level errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Deserializes `value` (found at `prefix` in `file`): unknown keys become
/// warnings naming their path, a wrong type an error naming file and key.
pub(crate) fn deserialize_reporting<T: serde::de::DeserializeOwned>(
    file: &str,
    prefix: &str,
    value: &serde_json::Value,
) -> Result<(T, Vec<ConfigWarning>), ConfigError> {
    let mut unknown = Vec::new();
    let join = |path: String| {
        if prefix.is_empty() {
            path
        } else {
            format!("{prefix}.{path}")
        }
    };
    let mut on_unknown = |path: serde_ignored::Path| unknown.push(join(path.to_string()));
    let de = serde_ignored::Deserializer::new(value, &mut on_unknown);
    let parsed = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            prefix.to_string()
        } else {
            join(path)
        };
        ConfigError {
            file: file.to_string(),
            key,
            message: e.into_inner().to_string(),
        }
    })?;
    let warnings = unknown
        .into_iter()
        .map(|key| ConfigWarning {
            file: file.to_string(),
            key,
        })
        .collect();
    Ok((parsed, warnings))
}

impl DeviceConfig {
    /// Parses the YAML text of `device-config.yaml`. `file` names it in
    /// messages. A whole ConfigMap holding a `device-config.yaml` key is
    /// accepted too, so `kubectl get cm hami-scheduler-device -o yaml` works.
    pub fn from_yaml(
        file: &str,
        text: &str,
    ) -> Result<(DeviceConfig, Vec<ConfigWarning>), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        let root: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_saphyr::from_str(text).map_err(|e| err("", format!("not valid YAML: {e}")))?
        };
        if root.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
            let inner = root
                .pointer("/data/device-config.yaml")
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    err(
                        "data",
                        "ConfigMap has no data key \"device-config.yaml\"".into(),
                    )
                })?;
            return DeviceConfig::from_yaml(file, inner);
        }
        let serde_json::Value::Object(sections) = root else {
            return Err(err("", "expected a mapping of vendor sections".into()));
        };
        let mut config = DeviceConfig::default();
        let mut warnings = Vec::new();
        for (key, value) in sections {
            if key == "nvidia" {
                // `nvidia:` with nothing under it means the defaults.
                let value = if value.is_null() {
                    serde_json::Value::Object(Default::default())
                } else {
                    value
                };
                let (nvidia, unknown) = deserialize_reporting(file, "nvidia", &value)?;
                config.nvidia = nvidia;
                warnings.extend(unknown);
                config.nvidia.validate(file)?;
            } else if VENDOR_SECTIONS.contains(&key.as_str()) {
                let expected_list = key == "iluvatars";
                let ok = value.is_null()
                    || (expected_list && value.is_array())
                    || (!expected_list && value.is_object());
                if !ok {
                    let shape = if expected_list { "a list" } else { "a mapping" };
                    return Err(err(&key, format!("expected {shape}")));
                }
                let mut all = serde_json::to_value(&config.vendors)
                    .expect("vendor defaults always serialize");
                if !value.is_null() {
                    overlay(&mut all[key.as_str()], value);
                }
                let (vendors, unknown) = deserialize_reporting(file, "", &all)?;
                config.vendors = vendors;
                warnings.extend(unknown);
            } else {
                warnings.push(ConfigWarning {
                    file: file.to_string(),
                    key,
                });
            }
        }
        Ok((config, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let (c, w) = DeviceConfig::from_yaml("f", "").unwrap();
        assert!(w.is_empty());
        assert_eq!(c.nvidia, NvidiaConfig::default());
        assert_eq!(c.nvidia.device_split_count, 10);
        assert_eq!(c.nvidia.default_gpu_num, 1);
    }

    #[test]
    fn nvidia_section_and_aliases() {
        let y = "nvidia:\n  resourceCountName: nvidia.com/vgpu\n  deviceSplitCount: 4\n  deviceMemoryScaling: 1.5\n  defaultMem: 2000\n  defaultGPUNum: 2\n  gpuCorePolicy: force\n  disablecorelimit: true\n  overwriteEnv: true\n";
        let (c, w) = DeviceConfig::from_yaml("f", y).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.nvidia.resource_count_name, "nvidia.com/vgpu");
        assert_eq!(c.nvidia.device_split_count, 4);
        assert_eq!(c.nvidia.device_memory_scaling, 1.5);
        assert_eq!(c.nvidia.default_memory, 2000);
        assert_eq!(c.nvidia.default_gpu_num, 2);
        assert_eq!(c.nvidia.gpu_core_policy, GpuCorePolicy::Force);
        assert!(c.nvidia.disable_core_limit);
        assert!(c.nvidia.overwrite_env);
        assert_eq!(c.nvidia.resource_memory_name, "nvidia.com/gpumem");
    }

    #[test]
    fn unknown_keys_warn_with_their_path() {
        let y = "nvidia:\n  deviceSplitCont: 4\nmystery:\n  a: 1\ncambricon:\n  resourceCountName: cambricon.com/vmlu\n";
        let (c, w) = DeviceConfig::from_yaml("device-config.yaml", y).unwrap();
        let keys: Vec<_> = w.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["mystery", "nvidia.deviceSplitCont"]);
        assert!(w[1].to_string().contains("device-config.yaml"));
        assert_eq!(
            c.vendors.cambricon.resource_count_name,
            "cambricon.com/vmlu"
        );
    }

    #[test]
    fn vendor_sections_overlay_the_chart_defaults() {
        let y = "cambricon:\n  resourceMemoryName: cambricon.com/mlu370.smlu.vmemory\n  resourceCoreNme: x\nhygon:\n  memoryFactor: 2\niluvatars:\n- commonWord: BI-V150\n  resourceCountName: iluvatar.ai/gpu\nvnpus:\n  hamiVnpuCore: true\n  runtimeClassName: ascend\n  overwriteEnv: true\nascend: {}\n";
        let (c, w) = DeviceConfig::from_yaml("f", y).unwrap();
        let keys: Vec<_> = w.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["ascend", "cambricon.resourceCoreNme"]);
        let v = &c.vendors;
        assert_eq!(v.cambricon.resource_count_name, "cambricon.com/vmlu");
        assert_eq!(
            v.cambricon.resource_memory_name,
            "cambricon.com/mlu370.smlu.vmemory"
        );
        assert_eq!(v.hygon.memory_factor, 2);
        assert_eq!(v.hygon.resource_count_name, "hygon.com/dcunum");
        assert_eq!(v.iluvatars.len(), 1, "a list replaces the default list");
        assert_eq!(v.iluvatars[0].resource_count_name, "iluvatar.ai/gpu");
        assert!(v.vnpus.hami_vnpu_core);
        assert_eq!(v.vnpus.configs.len(), 7, "chips keep their defaults");
        assert!(
            v.vnpus.chips().all(|c| c.runtime_class_name == "ascend"),
            "the section's runtimeClassName fills chips that set none"
        );
        assert!(v.vnpus.chips().all(|c| c.overwrite_env));
        assert!(!v.vnpus.configs[0].overwrite_env, "the chips as written");
        let y = "vnpus:\n  runtimeClassName: ascend\n  configs:\n  - commonWord: A\n    runtimeClassName: own\n  - commonWord: B\n";
        let (c, _) = DeviceConfig::from_yaml("f", y).unwrap();
        let classes: Vec<_> = c
            .vendors
            .vnpus
            .chips()
            .map(|c| c.runtime_class_name)
            .collect();
        assert_eq!(classes, ["own", "ascend"], "a chip's own class wins");
        let e = DeviceConfig::from_yaml("f", "vnpus:\n  configs: 3\n").unwrap_err();
        assert_eq!(e.key, "vnpus.configs", "{e}");
        assert!(DeviceConfig::from_yaml("f", "iluvatars: {}\n").is_err());
    }

    #[test]
    fn wrong_types_name_file_key_and_type() {
        let e =
            DeviceConfig::from_yaml("dc.yaml", "nvidia:\n  deviceSplitCount: ten\n").unwrap_err();
        assert_eq!(e.file, "dc.yaml");
        assert_eq!(e.key, "nvidia.deviceSplitCount");
        assert!(e.message.contains("u32"), "{e}");
        let e = DeviceConfig::from_yaml("dc.yaml", "nvidia:\n  gpuCorePolicy: sometimes\n")
            .unwrap_err();
        assert_eq!(e.key, "nvidia.gpuCorePolicy");
        let e = DeviceConfig::from_yaml("dc.yaml", "nvidia:\n  deviceSplitCount: 0\n").unwrap_err();
        assert!(e.to_string().contains("must be at least 1"), "{e}");
        assert!(DeviceConfig::from_yaml("dc.yaml", "- a\n- b\n").is_err());
        assert!(DeviceConfig::from_yaml("dc.yaml", "hygon: 3\n").is_err());
    }

    #[test]
    fn empty_nvidia_section_means_defaults() {
        let (c, w) = DeviceConfig::from_yaml("f", "nvidia:\n").unwrap();
        assert!(w.is_empty());
        assert_eq!(c.nvidia, NvidiaConfig::default());
        let e = DeviceConfig::from_yaml("f", "nvidia: 3\n").unwrap_err();
        assert_eq!(e.key, "nvidia", "{e}");
    }

    #[test]
    fn whole_configmap_is_accepted() {
        let y = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hami-scheduler-device\ndata:\n  device-config.yaml: |\n    nvidia:\n      deviceSplitCount: 3\n";
        let (c, _) = DeviceConfig::from_yaml("cm.yaml", y).unwrap();
        assert_eq!(c.nvidia.device_split_count, 3);
    }

    proptest::proptest! {
        #[test]
        fn parser_is_total(s in "(?s).{0,200}") {
            let _ = DeviceConfig::from_yaml("f", &s);
        }
    }
}
