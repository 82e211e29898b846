//! Node device records: what the device plugin registers for each card in
//! `hami.io/node-<vendor>-register`, in the JSON form (HAMi >= 2.8) and the
//! legacy `UUID,count,devmem,devcore,type,numa,health,index,mode:` form.

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// How a card is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum DeviceMode {
    /// Shared through the interposer (the default).
    #[default]
    HamiCore,
    /// Split into MIG instances.
    Mig,
    /// Shared through NVIDIA MPS.
    Mps,
}

impl DeviceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceMode::HamiCore => "hami-core",
            DeviceMode::Mig => "mig",
            DeviceMode::Mps => "mps",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceMode> {
        match s {
            "hami-core" => Some(DeviceMode::HamiCore),
            "mig" => Some(DeviceMode::Mig),
            "mps" => Some(DeviceMode::Mps),
            _ => None,
        }
    }
}

impl Serialize for DeviceMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DeviceMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceMode::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("mode {s:?} is not one of hami-core, mig, mps"))
        })
    }
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// One physical card as the device plugin registers it.
///
/// Field order and omission rules follow the JSON the Go side writes, so
/// encoding a decoded record gives the same bytes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceInfo {
    /// The card's UUID, e.g. `GPU-8b7cc0b7-...`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The card's index on the node.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub index: u32,
    /// How many containers may share the card (deviceSplitCount).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub count: u32,
    /// Device memory in MiB, after deviceMemoryScaling.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub devmem: u64,
    /// Compute in percent of the card, after deviceCoreScaling (100 = one card).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub devcore: u32,
    /// Card model, e.g. `NVIDIA-Tesla T4`.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub device_type: String,
    /// NUMA node of the card.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub numa: i32,
    /// Sharing mode; absent means hami-core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<DeviceMode>,
    /// MIG profiles the card offers, kept as the plugin wrote them.
    #[serde(
        default,
        rename = "migProfiles",
        skip_serializing_if = "Option::is_none"
    )]
    pub mig_profiles: Option<Box<serde_json::Value>>,
    /// Vendor data the plugin attaches (Ascend `NetworkID`), kept as written.
    #[serde(
        default,
        rename = "custominfo",
        skip_serializing_if = "Option::is_none"
    )]
    pub custom_info: Option<Box<serde_json::Value>>,
    /// A record without `health` is unhealthy: Go omits `false`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub health: bool,
}

impl DeviceInfo {
    /// The sharing mode, with an absent mode meaning hami-core.
    pub fn mode(&self) -> DeviceMode {
        self.mode.unwrap_or_default()
    }
}

/// Decodes a register annotation in either form. The JSON form starts with `[`.
pub fn decode_devices(source: &str, value: &str) -> Result<Vec<DeviceInfo>, DecodeError> {
    if value.trim_start().starts_with('[') {
        decode_devices_json(source, value)
    } else {
        decode_devices_legacy(source, value)
    }
}

/// Decodes the JSON form: an array of device records.
pub fn decode_devices_json(source: &str, value: &str) -> Result<Vec<DeviceInfo>, DecodeError> {
    let devices: Vec<DeviceInfo> = serde_json::from_str(value)
        .map_err(|e| DecodeError::new(source, value, format!("not a device list: {e}")))?;
    for (i, d) in devices.iter().enumerate() {
        if d.id.is_empty() {
            return Err(DecodeError::new(
                source,
                value,
                format!("device {i} has no id"),
            ));
        }
    }
    Ok(devices)
}

/// Encodes the JSON form exactly as the Go device plugin does.
pub fn encode_devices_json(devices: &[DeviceInfo]) -> String {
    serde_json::to_string(devices).expect("device records always serialize")
}

/// Decodes the legacy string form: `UUID,count,devmem,devcore,type,numa,health[,index[,mode]]:`
/// per device. A device without an index gets its position.
pub fn decode_devices_legacy(source: &str, value: &str) -> Result<Vec<DeviceInfo>, DecodeError> {
    let mut devices = Vec::new();
    for (pos, entry) in value.split(':').enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = entry.split(',').collect();
        if !(7..=9).contains(&fields.len()) {
            return Err(DecodeError::new(
                source,
                entry,
                format!(
                    "device entry has {} fields, expected 7 to 9 (UUID,count,devmem,devcore,type,numa,health[,index[,mode]])",
                    fields.len()
                ),
            ));
        }
        let num = |i: usize, name: &str| -> Result<i64, DecodeError> {
            fields[i].trim().parse::<i64>().map_err(|_| {
                DecodeError::new(
                    source,
                    entry,
                    format!("{name} {:?} is not an integer", fields[i]),
                )
            })
        };
        let non_negative = |i: usize, name: &str| -> Result<u64, DecodeError> {
            let n = num(i, name)?;
            u64::try_from(n)
                .map_err(|_| DecodeError::new(source, entry, format!("{name} {n} is negative")))
        };
        let small = |i: usize, name: &str| -> Result<u32, DecodeError> {
            let n = non_negative(i, name)?;
            u32::try_from(n)
                .map_err(|_| DecodeError::new(source, entry, format!("{name} {n} is too large")))
        };
        let id = fields[0].trim();
        if id.is_empty() {
            return Err(DecodeError::new(source, entry, "device UUID is empty"));
        }
        let health = match fields[6].trim() {
            "true" => true,
            "false" => false,
            other => {
                return Err(DecodeError::new(
                    source,
                    entry,
                    format!("health {other:?} is not true or false"),
                ));
            }
        };
        let numa = num(5, "numa")?;
        let numa = i32::try_from(numa)
            .map_err(|_| DecodeError::new(source, entry, format!("numa {numa} is out of range")))?;
        let index = if fields.len() >= 8 {
            small(7, "index")?
        } else {
            pos as u32
        };
        let mode = if fields.len() == 9 {
            Some(DeviceMode::parse(fields[8].trim()).ok_or_else(|| {
                DecodeError::new(
                    source,
                    entry,
                    format!("mode {:?} is not one of hami-core, mig, mps", fields[8]),
                )
            })?)
        } else {
            None
        };
        devices.push(DeviceInfo {
            id: id.to_string(),
            index,
            count: small(1, "count")?,
            devmem: non_negative(2, "devmem")?,
            devcore: small(3, "devcore")?,
            device_type: fields[4].to_string(),
            numa,
            mode,
            mig_profiles: None,
            custom_info: None,
            health,
        });
    }
    Ok(devices)
}

/// Encodes the legacy string form with all nine fields.
pub fn encode_devices_legacy(devices: &[DeviceInfo]) -> String {
    let mut out = String::new();
    for d in devices {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}:",
            d.id,
            d.count,
            d.devmem,
            d.devcore,
            d.device_type,
            d.numa,
            d.health,
            d.index,
            d.mode().as_str()
        ));
    }
    out
}

/// The `type` a plugin registers: the NVML name prefixed `NVIDIA-` unless it
/// already starts with "NVIDIA".
pub fn nvidia_device_type(nvml_name: &str) -> String {
    if nvml_name.starts_with("NVIDIA") {
        nvml_name.to_string()
    } else {
        format!("NVIDIA-{nvml_name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::NODE_NVIDIA_REGISTER as SRC;

    const JSON: &str = r#"[{"id":"GPU-0","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true},{"id":"GPU-1","index":1,"count":10,"devmem":81920,"devcore":100,"type":"NVIDIA A100-SXM4-80GB","numa":1,"mode":"hami-core","health":true}]"#;

    #[test]
    fn json_round_trips_byte_for_byte() {
        let devices = decode_devices(SRC, JSON).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].index, 0);
        assert_eq!(devices[0].mode(), DeviceMode::HamiCore);
        assert_eq!(devices[1].numa, 1);
        assert_eq!(devices[1].device_type, "NVIDIA A100-SXM4-80GB");
        assert_eq!(encode_devices_json(&devices), JSON);
    }

    #[test]
    fn missing_health_means_unhealthy() {
        let d = decode_devices(SRC, r#"[{"id":"GPU-0","count":10}]"#).unwrap();
        assert!(!d[0].health);
        assert_eq!(encode_devices_json(&d), r#"[{"id":"GPU-0","count":10}]"#);
    }

    #[test]
    fn legacy_form_decodes_seven_eight_and_nine_fields() {
        let v = "GPU-a,10,15360,100,NVIDIA-Tesla T4,0,true:GPU-b,10,15360,100,NVIDIA-Tesla T4,1,false,3:GPU-c,4,8000,200,NVIDIA-X,0,true,2,mig:";
        let d = decode_devices(SRC, v).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!((d[0].index, d[0].mode()), (0, DeviceMode::HamiCore));
        assert_eq!((d[1].index, d[1].health, d[1].numa), (3, false, 1));
        assert_eq!((d[2].mode(), d[2].devcore), (DeviceMode::Mig, 200));
        let again = decode_devices(SRC, &encode_devices_legacy(&d)).unwrap();
        assert_eq!(
            again
                .iter()
                .map(|x| (&x.id, x.index, x.mode()))
                .collect::<Vec<_>>(),
            d.iter()
                .map(|x| (&x.id, x.index, x.mode()))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            encode_devices_legacy(&d[..1]),
            "GPU-a,10,15360,100,NVIDIA-Tesla T4,0,true,0,hami-core:"
        );
    }

    #[test]
    fn bad_records_name_the_part() {
        let e = decode_devices(SRC, "GPU-a,10,lots,100,T4,0,true:").unwrap_err();
        assert_eq!(e.source, SRC);
        assert!(e.reason.contains("devmem \"lots\""), "{e}");
        let e = decode_devices(SRC, "GPU-a,10:").unwrap_err();
        assert!(e.reason.contains("2 fields"), "{e}");
        let e = decode_devices(SRC, "GPU-a,10,1,100,T4,0,yes:").unwrap_err();
        assert!(e.reason.contains("health"), "{e}");
        let e = decode_devices(SRC, r#"[{"id":"GPU-0","count":-1}]"#).unwrap_err();
        assert!(e.reason.contains("not a device list"), "{e}");
        let e = decode_devices(SRC, r#"[{"id":"GPU-0","mode":"vgpu"}]"#).unwrap_err();
        assert!(e.reason.contains("hami-core, mig, mps"), "{e}");
    }

    #[test]
    fn type_prefix_rule() {
        assert_eq!(nvidia_device_type("Tesla T4"), "NVIDIA-Tesla T4");
        assert_eq!(
            nvidia_device_type("NVIDIA H100 80GB HBM3"),
            "NVIDIA H100 80GB HBM3"
        );
    }

    proptest::proptest! {
        #[test]
        fn decoder_is_total(s in ".{0,200}") {
            let _ = decode_devices(SRC, &s);
        }

        #[test]
        fn legacy_decoder_is_total_on_near_valid_input(
            parts in proptest::collection::vec("[A-Za-z0-9,:\\-]{0,12}", 0..12)
        ) {
            let _ = decode_devices_legacy(SRC, &parts.join(","));
        }
    }
}
