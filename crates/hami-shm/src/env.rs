//! The environment the device plugin gives a container (spec section 7) and
//! the interposer reads (spec section 8), parsed once, here.
//!
//! Parsing never fails: a malformed value is reported as a warning (the
//! interposer logs it) and treated as unset, because refusing to start would
//! hurt the host program more than a missing limit.

use crate::MAX_DEVICES;
use crate::size::parse_size;
use std::path::PathBuf;

pub const MEMORY_LIMIT: &str = "CUDA_DEVICE_MEMORY_LIMIT";
pub const SM_LIMIT: &str = "CUDA_DEVICE_SM_LIMIT";
pub const SHARED_CACHE: &str = "CUDA_DEVICE_MEMORY_SHARED_CACHE";
pub const TASK_PRIORITY: &str = "CUDA_TASK_PRIORITY";
pub const CORE_POLICY: &str = "GPU_CORE_UTILIZATION_POLICY";
pub const LOG_LEVEL: &str = "LIBCUDA_LOG_LEVEL";
pub const VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// The container's cards, as the device plugin lists them (UUIDs, in the
/// order of the per-device limits `CUDA_DEVICE_MEMORY_LIMIT_<i>`).
pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
pub const OVERSUBSCRIBE: &str = "CUDA_OVERSUBSCRIBE";
pub const DISABLE_CONTROL: &str = "CUDA_DISABLE_CONTROL";
/// hami-rs only: where the limits file is (default [`DEFAULT_LIMITS_FILE`]).
pub const LIMITS_FILE: &str = "HAMI_LIMITS_FILE";
/// hami-rs only: path of the real `libcuda.so.1` (default: the loader's search).
pub const REAL_CUDA: &str = "HAMI_REAL_LIBCUDA";
/// hami-rs only: path of the real `libnvidia-ml.so.1`.
pub const REAL_NVML: &str = "HAMI_REAL_LIBNVML";

/// Upstream's default shared-region path, used when the env names none.
pub const DEFAULT_SHARED_CACHE: &str = "/tmp/cudevshr.cache";
/// Where the node agent puts the limits file inside the container: the
/// per-container host dir is mounted at `<hook>/vgpu` (hook `/usr/local`).
pub const DEFAULT_LIMITS_FILE: &str = "/usr/local/vgpu/hami-limits";

/// `GPU_CORE_UTILIZATION_POLICY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorePolicy {
    /// Pace launches to `CUDA_DEVICE_SM_LIMIT` when it is below 100.
    #[default]
    Default,
    /// Pace even when the container is alone on the card.
    Force,
    /// Never pace.
    Disable,
}

/// Per-device limits: the part of the env the node agent may also set
/// through the limits file or the shared region while a program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Bytes per visible device; `Some(0)` is an explicit "no limit".
    pub memory: [Option<u64>; MAX_DEVICES],
    /// Percent of the device's time per visible device, 1..=100.
    pub sm: [Option<u32>; MAX_DEVICES],
    /// `CUDA_TASK_PRIORITY`: 0 high, 1 low.
    pub priority: Option<i32>,
}

impl Limits {
    /// Reads `CUDA_DEVICE_MEMORY_LIMIT[_i]`, `CUDA_DEVICE_SM_LIMIT[_i]` and
    /// `CUDA_TASK_PRIORITY` through `lookup`; per-index values win.
    pub fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
        warnings: &mut Vec<String>,
    ) -> Limits {
        let mut out = Limits::default();
        let mem_all = read(lookup, MEMORY_LIMIT, warnings, parse_mem);
        let sm_all = read(lookup, SM_LIMIT, warnings, parse_sm);
        for i in 0..MAX_DEVICES {
            let mem_i = read(lookup, &format!("{MEMORY_LIMIT}_{i}"), warnings, parse_mem);
            out.memory[i] = mem_i.or(mem_all);
            let sm_i = read(lookup, &format!("{SM_LIMIT}_{i}"), warnings, parse_sm);
            out.sm[i] = sm_i.or(sm_all);
        }
        out.priority = read(lookup, TASK_PRIORITY, warnings, |v| {
            v.trim()
                .parse::<i32>()
                .map_err(|_| format!("{v:?}: must be an integer (0 high, 1 low)"))
        });
        out
    }

    /// Fields set in `over` replace ours (the limits file over the env).
    pub fn overlay(&self, over: &Limits) -> Limits {
        let mut out = *self;
        for i in 0..MAX_DEVICES {
            out.memory[i] = over.memory[i].or(self.memory[i]);
            out.sm[i] = over.sm[i].or(self.sm[i]);
        }
        out.priority = over.priority.or(self.priority);
        out
    }

    /// Memory limit of device `dev` in bytes, 0 when unlimited.
    pub fn memory_limit(&self, dev: usize) -> u64 {
        self.memory.get(dev).copied().flatten().unwrap_or(0)
    }

    /// Compute share of device `dev` in percent; unset and 0 mean 100.
    pub fn sm_limit(&self, dev: usize) -> u32 {
        match self.sm.get(dev).copied().flatten() {
            None | Some(0) => 100,
            Some(p) => p.min(100),
        }
    }
}

fn parse_mem(v: &str) -> Result<u64, String> {
    parse_size(v).map_err(|e| e.to_string())
}

fn parse_sm(v: &str) -> Result<u32, String> {
    match v.trim().parse::<u64>() {
        // Like the scheduler, clamp rather than reject values above 100.
        Ok(p) => Ok(p.min(100) as u32),
        Err(_) => Err(format!("{v:?}: must be a percentage 0-100")),
    }
}

fn read<T>(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    warnings: &mut Vec<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<T> {
    let raw = lookup(key)?;
    if raw.trim().is_empty() {
        return None;
    }
    match parse(&raw) {
        Ok(v) => Some(v),
        Err(e) => {
            warnings.push(format!("{key}={e}; ignored"));
            None
        }
    }
}

/// Everything the interposer takes from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterposerEnv {
    pub limits: Limits,
    pub shared_cache: PathBuf,
    pub limits_file: PathBuf,
    pub core_policy: CorePolicy,
    /// 0 errors, 1 warnings, 2 default, 3 info, 4 debug.
    pub log_level: u8,
    pub oversubscribe: bool,
    pub disable_control: bool,
    pub visible_devices: Option<String>,
    /// `NVIDIA_VISIBLE_DEVICES`: the container's device list.
    pub nvidia_visible_devices: Option<String>,
    pub real_cuda: Option<PathBuf>,
    pub real_nvml: Option<PathBuf>,
}

impl InterposerEnv {
    /// Parses the process environment.
    pub fn from_process(warnings: &mut Vec<String>) -> InterposerEnv {
        Self::from_lookup(&|k| std::env::var(k).ok(), warnings)
    }

    /// Parses an environment given as a lookup function (tests, `hami run`).
    pub fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
        warnings: &mut Vec<String>,
    ) -> InterposerEnv {
        let path = |key: &str, default: &str| {
            PathBuf::from(
                lookup(key)
                    .filter(|v| !v.trim().is_empty())
                    .unwrap_or_else(|| default.to_owned()),
            )
        };
        let core_policy = match lookup(CORE_POLICY).as_deref().map(str::trim) {
            None | Some("") => CorePolicy::Default,
            Some(v) if v.eq_ignore_ascii_case("default") => CorePolicy::Default,
            Some(v) if v.eq_ignore_ascii_case("force") => CorePolicy::Force,
            Some(v) if v.eq_ignore_ascii_case("disable") => CorePolicy::Disable,
            Some(v) => {
                warnings.push(format!(
                    "{CORE_POLICY}={v:?}: must be default, force or disable; using default"
                ));
                CorePolicy::Default
            }
        };
        let log_level = read(lookup, LOG_LEVEL, warnings, |v| {
            match v.trim().parse::<u8>() {
                Ok(n) if n <= 4 => Ok(n),
                _ => Err(format!("{v:?}: must be 0-4")),
            }
        })
        .unwrap_or(2);
        InterposerEnv {
            limits: Limits::from_lookup(lookup, warnings),
            shared_cache: path(SHARED_CACHE, DEFAULT_SHARED_CACHE),
            limits_file: path(LIMITS_FILE, DEFAULT_LIMITS_FILE),
            core_policy,
            log_level,
            oversubscribe: flag(lookup, OVERSUBSCRIBE),
            disable_control: flag(lookup, DISABLE_CONTROL),
            visible_devices: lookup(VISIBLE_DEVICES),
            nvidia_visible_devices: lookup(NVIDIA_VISIBLE_DEVICES),
            real_cuda: lookup(REAL_CUDA)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            real_nvml: lookup(REAL_NVML)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    /// Priority of this process: `CUDA_TASK_PRIORITY`, default 1 (low).
    pub fn priority(&self) -> i32 {
        self.limits.priority.unwrap_or(1)
    }
}

fn flag(lookup: &dyn Fn(&str) -> Option<String>, key: &str) -> bool {
    lookup(key).is_some_and(|v| {
        let v = v.trim();
        v.eq_ignore_ascii_case("true") || v == "1" || v.eq_ignore_ascii_case("yes")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> (InterposerEnv, Vec<String>) {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut w = Vec::new();
        let e = InterposerEnv::from_lookup(&|k| map.get(k).cloned(), &mut w);
        (e, w)
    }

    #[test]
    fn per_index_limit_wins_over_global() {
        let (e, w) = env(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "3000m"),
            ("CUDA_DEVICE_MEMORY_LIMIT_2", "0"),
        ]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(e.limits.memory_limit(0), 1 << 30);
        assert_eq!(e.limits.memory_limit(1), 3000 << 20);
        assert_eq!(e.limits.memory_limit(2), 0, "per-index 0 means no limit");
        assert_eq!(e.limits.memory_limit(15), 1 << 30);
        assert_eq!(e.limits.memory_limit(16), 0);
    }

    #[test]
    fn sm_limit_defaults_and_clamps() {
        let (e, _) = env(&[
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("CUDA_DEVICE_SM_LIMIT_3", "0"),
        ]);
        assert_eq!(e.limits.sm_limit(0), 30);
        assert_eq!(e.limits.sm_limit(3), 100);
        let (e, _) = env(&[("CUDA_DEVICE_SM_LIMIT_0", "140")]);
        assert_eq!(e.limits.sm_limit(0), 100);
        assert_eq!(e.limits.sm_limit(1), 100);
    }

    #[test]
    fn defaults() {
        let (e, w) = env(&[]);
        assert!(w.is_empty());
        assert_eq!(e.shared_cache, PathBuf::from(DEFAULT_SHARED_CACHE));
        assert_eq!(e.limits_file, PathBuf::from(DEFAULT_LIMITS_FILE));
        assert_eq!(e.core_policy, CorePolicy::Default);
        assert_eq!(e.log_level, 2);
        assert_eq!(e.priority(), 1);
        assert!(!e.oversubscribe && !e.disable_control);
    }

    #[test]
    fn flags_policy_and_warnings() {
        let (e, w) = env(&[
            ("CUDA_DISABLE_CONTROL", "true"),
            ("CUDA_OVERSUBSCRIBE", "TRUE"),
            ("GPU_CORE_UTILIZATION_POLICY", "FORCE"),
            ("LIBCUDA_LOG_LEVEL", "9"),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "lots"),
            ("CUDA_TASK_PRIORITY", "0"),
        ]);
        assert!(e.disable_control && e.oversubscribe);
        assert_eq!(e.core_policy, CorePolicy::Force);
        assert_eq!(e.log_level, 2);
        assert_eq!(e.priority(), 0);
        assert_eq!(e.limits.memory_limit(0), 0);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w.iter()
                .any(|m| m.starts_with("CUDA_DEVICE_MEMORY_LIMIT_0="))
        );
    }

    #[test]
    fn overlay_prefers_the_file() {
        let (a, _) = env(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("CUDA_DEVICE_SM_LIMIT", "50"),
        ]);
        let (b, _) = env(&[("CUDA_DEVICE_MEMORY_LIMIT_1", "2g")]);
        let m = a.limits.overlay(&b.limits);
        assert_eq!(m.memory_limit(0), 1 << 30);
        assert_eq!(m.memory_limit(1), 2 << 30);
        assert_eq!(m.sm_limit(1), 50);
    }
}
