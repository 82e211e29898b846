//! Which devices the simulation has.
//!
//! One device per line: `<memory> <sm count> <uuid> <name...>`, memory with
//! the interposer's size syntax (`16g`, `3000m`); `#` starts a comment.
//! `SIM_GPU_DEVICES` holds the text inline (lines separated by `;`),
//! `SIM_GPU_CONFIG` names a file; with neither, the file
//! [`CONTAINER_DEVICES`] when it exists (what `hami-node --sim` mounts into
//! a container: only the cards allocated to it, as the NVIDIA container
//! runtime exposes only those, and whatever the process's environment),
//! else [`CONTAINER_LIMITS_DEVICES`] (the same file where `hami-node`
//! writes it only when the container starts, without the node lock), else
//! one 16 GiB, 80-SM device.
//!
//! ```text
//! # memory sms uuid name
//! 16g 80 GPU-00000000-0000-0000-0000-000000000001 NVIDIA Sim 16GB
//! 80g 132 GPU-00000000-0000-0000-0000-000000000002 NVIDIA Sim H100
//! ```

/// Where a container started by `hami-node --sim` finds its simulated
/// driver's view: `devices` (its cards) and `state/` (the cards' shared
/// state, the host's directory).
pub const CONTAINER_ROOT: &str = "/run/sim-gpu";
/// The device file of [`CONTAINER_ROOT`].
pub const CONTAINER_DEVICES: &str = "/run/sim-gpu/devices";
/// The device file in the container's limits dir, mounted at
/// `<root>/limits` by `hami-node --sim` when it allocates without the node
/// lock.
pub const CONTAINER_LIMITS_DEVICES: &str = "/run/sim-gpu/limits/sim-gpu-devices";
/// The state directory of [`CONTAINER_ROOT`].
pub const CONTAINER_STATE: &str = "/run/sim-gpu/state";

/// One simulated card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub uuid: String,
    pub memory: u64,
    pub sms: u32,
}

impl DeviceSpec {
    /// CUDA compute capability `(major, minor)`, from the model number in
    /// the name (`H100`, `A100-SXM4-80GB`, `L4`, ...); 9.0 (Hopper) when
    /// the name has none of the known ones.
    pub fn compute_capability(&self) -> (u32, u32) {
        for word in self.name.split_whitespace() {
            let model = word.split('-').next().unwrap_or(word).to_ascii_uppercase();
            let cc = match model.as_str() {
                "B100" | "B200" | "GB200" | "B300" => (10, 0),
                "H100" | "H200" | "H800" | "H20" | "GH200" => (9, 0),
                "L4" | "L40" | "L40S" | "L20" => (8, 9),
                "A100" | "A800" | "A30" => (8, 0),
                "A10" | "A10G" | "A40" | "A16" | "A2" => (8, 6),
                "T4" => (7, 5),
                "V100" => (7, 0),
                "P100" => (6, 0),
                "P4" | "P40" => (6, 1),
                _ => continue,
            };
            return cc;
        }
        (9, 0)
    }
}

/// Parses the device list; errors name the line.
pub fn parse(text: &str) -> Result<Vec<DeviceSpec>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.split(['\n', ';']).enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(mem), Some(sms), Some(uuid)) = (it.next(), it.next(), it.next()) else {
            return Err(format!(
                "device line {}: {line:?}: want `<memory> <sms> <uuid> <name>`",
                n + 1
            ));
        };
        let memory =
            hami_shm::size::parse_size(mem).map_err(|e| format!("device line {}: {e}", n + 1))?;
        let sms = sms
            .parse()
            .map_err(|_| format!("device line {}: sm count {sms:?} is not a number", n + 1))?;
        let name: Vec<&str> = it.collect();
        out.push(DeviceSpec {
            name: if name.is_empty() {
                "NVIDIA Sim GPU".into()
            } else {
                name.join(" ")
            },
            uuid: uuid.to_owned(),
            memory,
            sms,
        });
    }
    Ok(out)
}

/// The devices of this process: from the env, else one default card.
pub fn from_env() -> Vec<DeviceSpec> {
    let text = match (
        std::env::var("SIM_GPU_DEVICES"),
        std::env::var("SIM_GPU_CONFIG"),
    ) {
        (Ok(t), _) => Some(t),
        (_, Ok(p)) => match std::fs::read_to_string(&p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("[sim-gpu] SIM_GPU_CONFIG={p}: {e}; using the default device");
                None
            }
        },
        _ => std::fs::read_to_string(CONTAINER_DEVICES)
            .or_else(|_| std::fs::read_to_string(CONTAINER_LIMITS_DEVICES))
            .ok(),
    };
    let parsed = text.map(|t| parse(&t)).transpose().unwrap_or_else(|e| {
        eprintln!("[sim-gpu] {e}; using the default device");
        None
    });
    match parsed {
        Some(d) if !d.is_empty() => d,
        _ => vec![DeviceSpec {
            name: "NVIDIA Sim 16GB".into(),
            uuid: "GPU-51a00000-0000-4000-8000-000000000000".into(),
            memory: 16 << 30,
            sms: 80,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_inline_lists() {
        let d = parse("# c\n16g 80 GPU-a NVIDIA Sim 16GB\n;3000m 10 GPU-b").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "NVIDIA Sim 16GB");
        assert_eq!(d[1].memory, 3000 << 20);
        assert_eq!(d[1].name, "NVIDIA Sim GPU");
        assert!(parse("16g x GPU-a").is_err());
        assert!(parse("16g").is_err());
    }

    #[test]
    fn compute_capability_comes_from_the_model_number() {
        let cc = |name: &str| {
            DeviceSpec {
                name: name.into(),
                uuid: "GPU-a".into(),
                memory: 1,
                sms: 1,
            }
            .compute_capability()
        };
        assert_eq!(cc("NVIDIA A100-SXM4-80GB"), (8, 0));
        assert_eq!(cc("NVIDIA A10"), (8, 6));
        assert_eq!(cc("NVIDIA L4"), (8, 9));
        assert_eq!(cc("Tesla T4"), (7, 5));
        assert_eq!(cc("NVIDIA Sim 16GB"), (9, 0));
    }
}
