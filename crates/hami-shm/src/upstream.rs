//! Read-only view of upstream HAMi-core's shared cache file (layout 1.x,
//! magic 19920718), so the node monitor can report containers still running
//! upstream's library during a migration. Never writes to such a file.
//!
//! Layout assumed (x86_64 C ABI, little-endian):
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `int32 initialized_flag` (= 19920718 once initialised) |
//! | 4, 8 | `uint32 major_version` (1), `minor_version` |
//! | 12 | `int32 sm_init_flag` |
//! | 16 | `size_t owner_pid` |
//! | 24 | `sem_t` (32 bytes) |
//! | 56 | `uint64 device_num` |
//! | 64 | `char uuids[16][96]` |
//! | 1600 | `uint64 limit[16]` |
//! | 1728 | `uint64 sm_limit[16]` |
//! | 1856 | 1024 process slots of 1960 bytes |
//! | 2008896 | `int32 proc_num, utilization_switch, recent_kernel, priority` |
//! | 2008912 | `uint64 last_kernel_time` |
//!
//! A process slot: `int32 pid, hostpid`; 16 per-device memory records of
//! eight `uint64` (`context, module, data, offset, total`, 3 unused); 16
//! `uint64 monitorused`; 16 utilisation records of six `uint64`
//! (`dec, enc, sm`, 3 unused); `int32 status`; 3 unused `uint64`.

use crate::MAX_DEVICES;

/// `initialized_flag` of an initialised upstream region.
pub const MAGIC: i32 = 19920718;
const SLOTS: usize = 1024;
const SLOT_SIZE: usize = 1960;
const OFF_DEVICE_NUM: usize = 56;
const OFF_UUIDS: usize = 64;
const OFF_LIMIT: usize = 1600;
const OFF_SM_LIMIT: usize = 1728;
const OFF_PROCS: usize = 1856;
const OFF_TAIL: usize = OFF_PROCS + SLOTS * SLOT_SIZE;
/// Smallest file that holds the whole layout.
pub const MIN_SIZE: usize = OFF_TAIL + 24;

/// Memory a process holds on one device, as upstream records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamMemory {
    pub context: u64,
    pub module: u64,
    pub data: u64,
    pub total: u64,
}

/// One occupied process slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamProc {
    pub pid: i32,
    pub host_pid: i32,
    pub used: [UpstreamMemory; MAX_DEVICES],
    pub sm_util: [u64; MAX_DEVICES],
    pub status: i32,
}

/// A decoded upstream region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRegion {
    pub major: u32,
    pub minor: u32,
    pub device_count: u64,
    pub uuids: Vec<String>,
    pub limit: [u64; MAX_DEVICES],
    pub sm_limit: [u64; MAX_DEVICES],
    pub procs: Vec<UpstreamProc>,
    pub proc_num: i32,
    pub utilization_switch: i32,
    pub recent_kernel: i32,
    pub priority: i32,
    pub last_kernel_time: u64,
}

/// Why bytes are not an upstream region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    TooShort { len: usize },
    NotInitialised { flag: i32 },
    UnknownMajor { major: u32 },
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::TooShort { len } => {
                write!(f, "upstream cache: {len} bytes, need at least {MIN_SIZE}")
            }
            UpstreamError::NotInitialised { flag } => {
                write!(
                    f,
                    "upstream cache: initialized flag {flag}, expected {MAGIC}"
                )
            }
            UpstreamError::UnknownMajor { major } => {
                write!(
                    f,
                    "upstream cache: major version {major}, only 1 is understood"
                )
            }
        }
    }
}

impl std::error::Error for UpstreamError {}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn i32_at(b: &[u8], off: usize) -> i32 {
    i32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// Decodes the bytes of an upstream cache file.
pub fn decode(b: &[u8]) -> Result<UpstreamRegion, UpstreamError> {
    if b.len() < MIN_SIZE {
        return Err(UpstreamError::TooShort { len: b.len() });
    }
    let flag = i32_at(b, 0);
    if flag != MAGIC {
        return Err(UpstreamError::NotInitialised { flag });
    }
    let major = i32_at(b, 4) as u32;
    if major != 1 {
        return Err(UpstreamError::UnknownMajor { major });
    }
    let uuids = (0..MAX_DEVICES)
        .map(|i| {
            let raw = &b[OFF_UUIDS + i * 96..OFF_UUIDS + (i + 1) * 96];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(96);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        })
        .collect();
    let procs = (0..SLOTS)
        .filter_map(|i| {
            let s = OFF_PROCS + i * SLOT_SIZE;
            let pid = i32_at(b, s);
            (pid != 0).then(|| UpstreamProc {
                pid,
                host_pid: i32_at(b, s + 4),
                used: std::array::from_fn(|d| {
                    let m = s + 8 + d * 64;
                    UpstreamMemory {
                        context: u64_at(b, m),
                        module: u64_at(b, m + 8),
                        data: u64_at(b, m + 16),
                        total: u64_at(b, m + 32),
                    }
                }),
                sm_util: std::array::from_fn(|d| u64_at(b, s + 8 + 1024 + 128 + d * 48 + 16)),
                status: i32_at(b, s + 1928),
            })
        })
        .collect();
    Ok(UpstreamRegion {
        major,
        minor: i32_at(b, 8) as u32,
        device_count: u64_at(b, OFF_DEVICE_NUM),
        uuids,
        limit: std::array::from_fn(|i| u64_at(b, OFF_LIMIT + i * 8)),
        sm_limit: std::array::from_fn(|i| u64_at(b, OFF_SM_LIMIT + i * 8)),
        procs,
        proc_num: i32_at(b, OFF_TAIL),
        utilization_switch: i32_at(b, OFF_TAIL + 4),
        recent_kernel: i32_at(b, OFF_TAIL + 8),
        priority: i32_at(b, OFF_TAIL + 12),
        last_kernel_time: u64_at(b, OFF_TAIL + 16),
    })
}

/// Reads and decodes an upstream cache file.
pub fn read(path: &std::path::Path) -> std::io::Result<Result<UpstreamRegion, UpstreamError>> {
    Ok(decode(&std::fs::read(path)?))
}

impl UpstreamRegion {
    /// Container usage of `dev`: the sum of the live slots' totals.
    pub fn device_used(&self, dev: usize) -> u64 {
        self.procs
            .iter()
            .map(|p| p.used.get(dev).map_or(0, |m| m.total))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], off: usize, v: i32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Bytes laid out as the table in the module docs says.
    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; MIN_SIZE + 32];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 1);
        put32(&mut b, 8, 2);
        put64(&mut b, 56, 2);
        b[64..64 + 8].copy_from_slice(b"GPU-abcd");
        put64(&mut b, 1600, 3000 << 20);
        put64(&mut b, 1728 + 8, 30);
        let s = 1856 + 5 * 1960;
        put32(&mut b, s, 77);
        put32(&mut b, s + 4, 4077);
        put64(&mut b, s + 8 + 64 + 16, 1000); // device 1: data
        put64(&mut b, s + 8 + 64 + 32, 1500); // device 1: total
        put64(&mut b, s + 8 + 1024 + 128 + 48 + 16, 42); // device 1: sm util
        put32(&mut b, s + 1928, 1);
        put32(&mut b, 2008896, 1);
        put32(&mut b, 2008896 + 8, -1);
        put64(&mut b, 2008912, 99);
        b
    }

    #[test]
    fn decodes_the_documented_layout() {
        let r = decode(&sample()).unwrap();
        assert_eq!((r.major, r.minor, r.device_count), (1, 2, 2));
        assert_eq!(r.uuids[0], "GPU-abcd");
        assert_eq!(r.limit[0], 3000 << 20);
        assert_eq!(r.sm_limit[1], 30);
        assert_eq!(r.procs.len(), 1);
        let p = &r.procs[0];
        assert_eq!((p.pid, p.host_pid, p.status), (77, 4077, 1));
        assert_eq!(p.used[1].data, 1000);
        assert_eq!(r.device_used(1), 1500);
        assert_eq!(p.sm_util[1], 42);
        assert_eq!(
            (r.proc_num, r.recent_kernel, r.last_kernel_time),
            (1, -1, 99)
        );
    }

    #[test]
    fn rejects_other_files() {
        assert!(matches!(
            decode(&[0; 10]),
            Err(UpstreamError::TooShort { .. })
        ));
        let mut b = sample();
        put32(&mut b, 0, 1);
        assert!(matches!(
            decode(&b),
            Err(UpstreamError::NotInitialised { .. })
        ));
        let mut b = sample();
        put32(&mut b, 4, 2);
        assert!(matches!(
            decode(&b),
            Err(UpstreamError::UnknownMajor { major: 2 })
        ));
    }

    proptest! {
        #[test]
        fn never_panics_on_noise(seed in any::<u64>(), flip in 0usize..MIN_SIZE) {
            let mut b = sample();
            b[flip] ^= (seed & 0xff) as u8;
            let _ = decode(&b);
        }
    }
}
