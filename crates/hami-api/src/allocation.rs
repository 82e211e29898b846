//! Container allocations: `hami.io/vgpu-devices-to-allocate` and
//! `hami.io/vgpu-devices-allocated`.
//!
//! Per device `UUID,Type,MemMiB,Cores` followed by `:`; after each container
//! `;`; init containers first, then regular containers; a container with no
//! device keeps an empty entry. Example:
//! `GPU-a,NVIDIA,3000,30:;GPU-b,NVIDIA,1000,0:GPU-c,NVIDIA,1000,0:;`

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// One slice of one card given to one container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContainerDevice {
    pub uuid: String,
    /// The vendor word, e.g. `NVIDIA` (not the card model).
    #[serde(rename = "type")]
    pub vendor: String,
    /// Device memory in MiB.
    pub mem: u64,
    /// Percent of the card's compute.
    pub cores: u32,
}

/// The devices of one container.
pub type ContainerDevices = Vec<ContainerDevice>;

/// The devices of every container of a pod, in annotation order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodDevices(pub Vec<ContainerDevices>);

impl PodDevices {
    /// Encodes the annotation value.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for container in &self.0 {
            for d in container {
                out.push_str(&d.uuid);
                out.push(',');
                out.push_str(&d.vendor);
                out.push(',');
                out.push_str(&d.mem.to_string());
                out.push(',');
                out.push_str(&d.cores.to_string());
                out.push(':');
            }
            out.push(';');
        }
        out
    }

    /// Decodes an annotation value. A missing final `;` is accepted.
    pub fn decode(source: &str, value: &str) -> Result<PodDevices, DecodeError> {
        let mut containers = Vec::new();
        let body = value.strip_suffix(';').unwrap_or(value);
        if value.is_empty() {
            return Ok(PodDevices::default());
        }
        for entry in body.split(';') {
            let mut devices = Vec::new();
            for dev in entry.split(':') {
                if dev.is_empty() {
                    continue;
                }
                devices.push(decode_device(source, dev)?);
            }
            containers.push(devices);
        }
        Ok(PodDevices(containers))
    }

    /// True when no container holds a device.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|c| c.is_empty())
    }

    /// Every device of every container.
    pub fn devices(&self) -> impl Iterator<Item = &ContainerDevice> {
        self.0.iter().flatten()
    }
}

fn decode_device(source: &str, dev: &str) -> Result<ContainerDevice, DecodeError> {
    let fields: Vec<&str> = dev.split(',').collect();
    if fields.len() != 4 {
        return Err(DecodeError::new(
            source,
            dev,
            format!(
                "device has {} fields, expected 4 (UUID,Type,MemMiB,Cores)",
                fields.len()
            ),
        ));
    }
    if fields[0].is_empty() {
        return Err(DecodeError::new(source, dev, "device UUID is empty"));
    }
    let mem = fields[2].parse::<u64>().map_err(|_| {
        DecodeError::new(
            source,
            dev,
            format!("memory {:?} is not a whole number of MiB", fields[2]),
        )
    })?;
    let cores = fields[3].parse::<u32>().map_err(|_| {
        DecodeError::new(
            source,
            dev,
            format!("cores {:?} is not a whole percentage", fields[3]),
        )
    })?;
    Ok(ContainerDevice {
        uuid: fields[0].to_string(),
        vendor: fields[1].to_string(),
        mem,
        cores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::NVIDIA_DEVICES_ALLOCATED as SRC;

    fn dev(uuid: &str, mem: u64, cores: u32) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.into(),
            vendor: "NVIDIA".into(),
            mem,
            cores,
        }
    }

    #[test]
    fn spec_example_byte_for_byte() {
        let pd = PodDevices(vec![
            vec![dev("GPU-a", 3000, 30)],
            vec![dev("GPU-b", 1000, 0), dev("GPU-c", 1000, 0)],
        ]);
        let s = "GPU-a,NVIDIA,3000,30:;GPU-b,NVIDIA,1000,0:GPU-c,NVIDIA,1000,0:;";
        assert_eq!(pd.encode(), s);
        assert_eq!(PodDevices::decode(SRC, s).unwrap(), pd);
    }

    #[test]
    fn empty_containers_keep_their_entry() {
        let pd = PodDevices(vec![vec![], vec![dev("GPU-a", 10, 5)], vec![]]);
        let s = ";GPU-a,NVIDIA,10,5:;;";
        assert_eq!(pd.encode(), s);
        assert_eq!(PodDevices::decode(SRC, s).unwrap(), pd);
        assert_eq!(PodDevices::decode(SRC, "").unwrap(), PodDevices::default());
        assert_eq!(
            PodDevices::decode(SRC, "GPU-a,NVIDIA,10,5:").unwrap(),
            PodDevices(vec![vec![dev("GPU-a", 10, 5)]])
        );
    }

    #[test]
    fn malformed_values_name_the_device() {
        let e = PodDevices::decode(SRC, "GPU-a,NVIDIA,lots,5:;").unwrap_err();
        assert!(e.reason.contains("memory \"lots\""), "{e}");
        assert_eq!(e.part, "GPU-a,NVIDIA,lots,5");
        let e = PodDevices::decode(SRC, "GPU-a,NVIDIA,5:;").unwrap_err();
        assert!(e.reason.contains("3 fields"), "{e}");
        let e = PodDevices::decode(SRC, "GPU-a,NVIDIA,5,-1:;").unwrap_err();
        assert!(e.reason.contains("cores"), "{e}");
    }

    fn arb_pod() -> impl proptest::strategy::Strategy<Value = PodDevices> {
        use proptest::prelude::*;
        let dev =
            ("GPU-[a-f0-9-]{1,12}", 0u64..200_000, 0u32..=100).prop_map(|(u, m, c)| dev(&u, m, c));
        proptest::collection::vec(proptest::collection::vec(dev, 0..4), 0..5).prop_map(PodDevices)
    }

    proptest::proptest! {
        #[test]
        fn decoder_is_total(s in ".{0,120}") {
            let _ = PodDevices::decode(SRC, &s);
        }

        #[test]
        fn encode_then_decode_is_identity(pd in arb_pod()) {
            proptest::prop_assume!(!pd.0.is_empty());
            proptest::prop_assert_eq!(PodDevices::decode(SRC, &pd.encode()).unwrap(), pd);
        }
    }
}
