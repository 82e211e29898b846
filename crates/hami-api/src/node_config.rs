//! HAMi's per-node device plugin config, `config.json` (the
//! `hami-device-plugin` ConfigMap): `{"nodeconfig": [{"name": ..., ...}]}`.
//! The entry whose `name` is a node overrides the cluster's `nvidia`
//! device config for that node's agent. Keys are HAMi's, in lower case.
//! A wrong type is an error naming the file and field; an unknown key is a
//! warning naming it.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, ConfigWarning, NvidiaConfig, deserialize_reporting};

/// Devices a node agent leaves out of its registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FilterDevices {
    pub uuid: Vec<String>,
    pub index: Vec<u32>,
}

impl FilterDevices {
    /// Whether the card with this UUID or index is filtered out.
    pub fn excludes(&self, uuid: &str, index: u32) -> bool {
        self.uuid.iter().any(|u| u == uuid) || self.index.contains(&index)
    }
}

/// `libcudaloglevel`: HAMi writes it as a string, people write numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum LogLevel {
    Number(u32),
    Text(#[serde(deserialize_with = "log_level_text")] u32),
}

fn log_level_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    s.trim()
        .parse()
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a log level 0-4")))
}

/// One `nodeconfig[]` entry. Every override is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    pub name: String,
    /// `hami-core` (shared, the interposer), `mig` or `mps`.
    #[serde(rename = "operatingmode")]
    pub operating_mode: Option<String>,
    #[serde(rename = "devicesplitcount")]
    pub device_split_count: Option<u32>,
    #[serde(rename = "devicememoryscaling")]
    pub device_memory_scaling: Option<f64>,
    #[serde(rename = "devicecorescaling")]
    pub device_core_scaling: Option<f64>,
    /// MiB to register for a card whose memory NVML does not report
    /// (unified-memory GPUs); such a card is left out when this is 0.
    #[serde(rename = "preconfigureddevicememory")]
    pub preconfigured_device_memory: Option<u64>,
    #[serde(rename = "libcudaloglevel")]
    lib_cuda_log_level: Option<LogLevel>,
    #[serde(rename = "enablenumatopology")]
    pub enable_numa_topology: Option<bool>,
    #[serde(rename = "migstrategy")]
    pub mig_strategy: Option<String>,
    #[serde(rename = "filterdevices")]
    pub filter_devices: Option<FilterDevices>,
    #[serde(rename = "enablegetpreferredallocation")]
    pub enable_get_preferred_allocation: bool,
}

impl NodeConfig {
    pub fn lib_cuda_log_level(&self) -> Option<u32> {
        self.lib_cuda_log_level.map(|l| match l {
            LogLevel::Number(n) | LogLevel::Text(n) => n,
        })
    }

    /// The cluster's `nvidia` config with this node's overrides applied.
    pub fn apply(&self, cluster: &NvidiaConfig, file: &str) -> Result<NvidiaConfig, ConfigError> {
        let mut c = cluster.clone();
        if let Some(v) = self.device_split_count {
            c.device_split_count = v;
        }
        if let Some(v) = self.device_memory_scaling {
            c.device_memory_scaling = v;
        }
        if let Some(v) = self.device_core_scaling {
            c.device_core_scaling = v;
        }
        if let Some(v) = self.lib_cuda_log_level() {
            c.lib_cuda_log_level = v;
        }
        if let Some(v) = &self.mig_strategy {
            c.mig_strategy = v.clone();
        }
        // The same range checks as the cluster's file, named by this entry.
        c.validate(&format!("{file} (nodeconfig {:?})", self.name))?;
        Ok(c)
    }
}

/// The whole `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfigFile {
    #[serde(rename = "nodeconfig")]
    pub nodes: Vec<NodeConfig>,
}

impl NodeConfigFile {
    /// Parses `config.json`; `file` names it in messages.
    pub fn from_json(
        file: &str,
        text: &str,
    ) -> Result<(NodeConfigFile, Vec<ConfigWarning>), ConfigError> {
        let value: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(text).map_err(|e| ConfigError {
                file: file.to_string(),
                key: String::new(),
                message: format!("not valid JSON: {e}"),
            })?
        };
        let (parsed, warnings): (NodeConfigFile, _) =
            deserialize_reporting(file, "config", &value)?;
        for (i, n) in parsed.nodes.iter().enumerate() {
            if n.name.is_empty() {
                return Err(ConfigError {
                    file: file.to_string(),
                    key: format!("config.nodeconfig.{i}.name"),
                    message: "every entry needs the name of its node".into(),
                });
            }
        }
        Ok((parsed, warnings))
    }

    /// The entry for `node`, if any (the first, as HAMi takes it).
    pub fn for_node(&self, node: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of HAMi's chart values (`devicePlugin.nodeConfiguration`).
    const CHART_EXAMPLE: &str = r#"{
        "nodeconfig": [
          {
            "name": "your-node-name",
            "operatingmode": "hami-core",
            "devicememoryscaling": 1,
            "devicesplitcount": 10,
            "preconfigureddevicememory": 0,
            "enablenumatopology": false,
            "migstrategy": "none",
            "filterdevices": {"uuid": [], "index": []},
            "enablegetpreferredallocation": false
          }
        ]
      }"#;

    #[test]
    fn the_chart_example_loads_without_warnings() {
        let (f, w) = NodeConfigFile::from_json("config.json", CHART_EXAMPLE).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let n = f.for_node("your-node-name").unwrap();
        assert_eq!(n.operating_mode.as_deref(), Some("hami-core"));
        assert_eq!(n.device_split_count, Some(10));
        assert_eq!(n.filter_devices, Some(FilterDevices::default()));
        assert!(f.for_node("other").is_none());
    }

    #[test]
    fn a_node_entry_overrides_the_cluster_config() {
        let text = r#"{"nodeconfig": [
            {"name": "a", "devicesplitcount": 4, "devicememoryscaling": 1.5,
             "devicecorescaling": 2, "libcudaloglevel": "3", "migstrategy": "single",
             "filterdevices": {"uuid": ["GPU-x"], "index": [2]}},
            {"name": "b", "libcudaloglevel": 1}]}"#;
        let (f, _) = NodeConfigFile::from_json("config.json", text).unwrap();
        let cluster = NvidiaConfig::default();
        let a = f
            .for_node("a")
            .unwrap()
            .apply(&cluster, "config.json")
            .unwrap();
        assert_eq!(a.device_split_count, 4);
        assert_eq!(a.device_memory_scaling, 1.5);
        assert_eq!(a.device_core_scaling, 2.0);
        assert_eq!(a.lib_cuda_log_level, 3);
        assert_eq!(a.mig_strategy, "single");
        // Untouched keys keep the cluster's values.
        assert_eq!(a.resource_count_name, cluster.resource_count_name);
        let filter = f.for_node("a").unwrap().filter_devices.clone().unwrap();
        assert!(filter.excludes("GPU-x", 0) && filter.excludes("GPU-y", 2));
        assert!(!filter.excludes("GPU-y", 1));
        let b = f
            .for_node("b")
            .unwrap()
            .apply(&cluster, "config.json")
            .unwrap();
        assert_eq!((b.lib_cuda_log_level, b.device_split_count), (1, 10));
    }

    #[test]
    fn bad_files_name_the_file_and_field_and_unknown_keys_warn() {
        let e = NodeConfigFile::from_json(
            "cm/config.json",
            r#"{"nodeconfig": [{"name": "a", "devicesplitcount": "ten"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.file, "cm/config.json");
        assert!(e.key.contains("devicesplitcount"), "{e}");
        let e = NodeConfigFile::from_json("c.json", "{not json").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = NodeConfigFile::from_json("c.json", r#"{"nodeconfig": [{"devicesplitcount": 2}]}"#)
            .unwrap_err();
        assert!(e.key.ends_with(".name"), "{e}");
        let (_, w) = NodeConfigFile::from_json(
            "c.json",
            r#"{"nodeconfig": [{"name": "a", "devicesplitcnt": 2}], "extra": 1}"#,
        )
        .unwrap();
        let keys: Vec<&str> = w.iter().map(|w| w.key.as_str()).collect();
        assert!(
            keys.iter().any(|k| k.contains("devicesplitcnt")),
            "{keys:?}"
        );
        assert!(keys.iter().any(|k| k.contains("extra")), "{keys:?}");
        // Out-of-range overrides are refused by the same rules as the
        // cluster's file.
        let (f, _) = NodeConfigFile::from_json(
            "c.json",
            r#"{"nodeconfig": [{"name": "a", "devicesplitcount": 0}]}"#,
        )
        .unwrap();
        let e = f.nodes[0]
            .apply(&NvidiaConfig::default(), "c.json")
            .unwrap_err();
        assert!(
            e.to_string().contains("deviceSplitCount") && e.to_string().contains("\"a\""),
            "{e}"
        );
    }
}
