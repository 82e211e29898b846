//! A region read as a copy of its file's bytes, never mapped: for the node
//! monitor, which must survive whatever a container does to its own file.
//!
//! A region file lives in a directory the container can write. A process
//! that maps it can be killed with `SIGBUS` by a container that truncates
//! the file between the size check and a read; the node agent must not be.
//! So the monitor reads the file with `pread` ([`read_file`]) and decodes
//! the bytes ([`RegionCopy::decode`]), and writes back only through
//! [`clear_slots`], and only when no process maps the file.

use crate::MAX_DEVICES;
use crate::region::{
    DeviceEntry, Header, MAGIC, MAX_SLOTS, ProcSlot, REGION_SIZE, Region, RegionError, VERSION,
};
use std::mem::offset_of;
use std::path::Path;

/// Bytes a region file may have at most to be read (ours, or upstream
/// HAMi-core's, which is smaller); anything larger is refused unread.
pub const MAX_FILE: usize = 4 << 20;

/// Opens a file for reading (and writing), refusing symbolic links and
/// non-regular files (`O_NONBLOCK`: a FIFO never blocks the opener).
fn open_plain(path: &Path, write: bool) -> Result<(std::fs::File, u64), RegionError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => RegionError::Symlink,
            _ => RegionError::Io(e),
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(RegionError::NotRegular);
    }
    Ok((f, meta.len()))
}

/// Reads a region file (ours or upstream's) whole, refusing symbolic links,
/// non-regular files and files over [`MAX_FILE`] bytes.
pub fn read_file(path: &Path) -> Result<Vec<u8>, RegionError> {
    use std::io::Read as _;
    let (mut f, len) = open_plain(path, false)?;
    if len > MAX_FILE as u64 {
        return Err(RegionError::Incompatible {
            magic: 0,
            version: 0,
            size: len,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The file may shrink or grow meanwhile: never read past the cap.
    f.by_ref().take(MAX_FILE as u64).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Opens one of our region files (exactly [`REGION_SIZE`] bytes) to read
/// and write single fields with `pread`/`pwrite`, never mapped.
pub fn open_region_file(path: &Path) -> Result<std::fs::File, RegionError> {
    let (f, len) = open_plain(path, true)?;
    if len != REGION_SIZE as u64 {
        return Err(RegionError::Incompatible {
            magic: 0,
            version: 0,
            size: len,
        });
    }
    Ok(f)
}

/// The header's CLOCK_MONOTONIC ns of the last priority-0 launch; 0 when
/// none, or when the file was cut short meanwhile.
pub fn read_high_priority_launch(f: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let mut b = [0u8; 8];
    match f.read_exact_at(&mut b, offset_of!(Header, high_priority_launch_ns) as u64) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}

/// Sets (`on`) or clears a header `FLAG_*` bit. The node agent is the
/// flags' only writer; processes only read them.
pub fn set_flag(f: &std::fs::File, flag: u32, on: bool) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let off = offset_of!(Header, flags) as u64;
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off)?;
    let old = u32::from_le_bytes(b);
    let new = if on { old | flag } else { old & !flag };
    if new != old {
        f.write_all_at(&new.to_le_bytes(), off)?;
    }
    Ok(())
}

/// Sets device `dev`'s charge scale (parts per million; see
/// [`DeviceEntry::charge_scale_ppm`]).
pub fn write_charge_scale(f: &std::fs::File, dev: usize, ppm: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    if dev >= MAX_DEVICES {
        return Ok(());
    }
    let off = DEVICES + dev * DEVICE + offset_of!(DeviceEntry, charge_scale_ppm);
    f.write_all_at(&ppm.to_le_bytes(), off as u64)
}

/// Sets the header's low-priority hold lease (CLOCK_MONOTONIC ns).
pub fn write_hold_until(f: &std::fs::File, until_ns: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    f.write_all_at(
        &until_ns.to_le_bytes(),
        offset_of!(Header, low_priority_hold_until_ns) as u64,
    )
}

/// One occupied process slot of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCopy {
    pub slot: usize,
    /// The PID in the container's PID namespace (> 0).
    pub pid: i32,
    pub priority: i32,
    /// Start time in clock ticks since boot, 0 unknown.
    pub start_time: u64,
    /// The PID as the host sees it, 0 unknown (a claim, not a proof).
    pub host_pid: i32,
    /// CLOCK_MONOTONIC ns of the process's last kernel launch, 0 none.
    pub last_launch_ns: u64,
    pub used: [u64; MAX_DEVICES],
    pub busy_ns: [u64; MAX_DEVICES],
}

/// One device index of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCopy {
    /// The card's UUID; empty when no process has used this index.
    pub uuid: String,
    /// Bytes; `None` never set, `Some(0)` no limit.
    pub memory_limit: Option<u64>,
    /// Kernel busy time of processes that are gone.
    pub retired_busy_ns: u64,
    /// The pacer's charge scale (0: unscaled).
    pub charge_scale_ppm: u64,
}

/// A decoded copy of one of our regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionCopy {
    /// The header's `FLAG_*` bits.
    pub flags: u32,
    /// CLOCK_MONOTONIC ns of the last launch by a priority-0 process, 0 none.
    pub high_priority_launch_ns: u64,
    pub devices: Vec<DeviceCopy>,
    /// Occupied slots (PID > 0); slots being reclaimed are left out.
    pub slots: Vec<SlotCopy>,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

const DEVICES: usize = offset_of!(Region, devices);
const SLOTS: usize = offset_of!(Region, slots);
const DEVICE: usize = std::mem::size_of::<DeviceEntry>();
const SLOT: usize = std::mem::size_of::<ProcSlot>();
/// The device flag bit that says `memory_limit` is set (region.rs).
const DEV_MEM_SET: u32 = 1;

impl RegionCopy {
    /// Decodes the bytes of a region file; refuses another magic, version
    /// or size exactly as [`crate::region::SharedRegion::open`] does.
    pub fn decode(b: &[u8]) -> Result<RegionCopy, RegionError> {
        if b.len() >= 4 && i32::from_le_bytes([b[0], b[1], b[2], b[3]]) == crate::upstream::MAGIC {
            return Err(RegionError::Upstream);
        }
        let magic = if b.len() >= 8 { u64_at(b, 0) } else { 0 };
        let version = if b.len() >= 12 {
            u32_at(b, offset_of!(Header, version))
        } else {
            0
        };
        if b.len() != REGION_SIZE || magic != MAGIC || version != VERSION {
            if magic == 0 {
                return Err(RegionError::Uninitialised);
            }
            return Err(RegionError::Incompatible {
                magic,
                version,
                size: b.len() as u64,
            });
        }
        let devices = (0..MAX_DEVICES)
            .map(|d| {
                let base = DEVICES + d * DEVICE;
                let text = &b[base + offset_of!(DeviceEntry, uuid)..][..96];
                let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
                let flags = u32_at(b, base + offset_of!(DeviceEntry, flags));
                DeviceCopy {
                    uuid: String::from_utf8_lossy(&text[..end]).into_owned(),
                    memory_limit: (flags & DEV_MEM_SET != 0)
                        .then(|| u64_at(b, base + offset_of!(DeviceEntry, memory_limit))),
                    retired_busy_ns: u64_at(b, base + offset_of!(DeviceEntry, retired_busy_ns)),
                    charge_scale_ppm: u64_at(b, base + offset_of!(DeviceEntry, charge_scale_ppm)),
                }
            })
            .collect();
        let hwm = (u32_at(b, offset_of!(Header, slot_hwm)) as usize).min(MAX_SLOTS);
        let slots = (0..hwm)
            .filter_map(|slot| {
                let base = SLOTS + slot * SLOT;
                let pid = u32_at(b, base + offset_of!(ProcSlot, pid)) as i32;
                (pid > 0).then(|| SlotCopy {
                    slot,
                    pid,
                    priority: u32_at(b, base + offset_of!(ProcSlot, priority)) as i32,
                    start_time: u64_at(b, base + offset_of!(ProcSlot, start_time)),
                    host_pid: u32_at(b, base + offset_of!(ProcSlot, host_pid)) as i32,
                    last_launch_ns: u64_at(b, base + offset_of!(ProcSlot, last_launch_ns)),
                    used: std::array::from_fn(|d| {
                        u64_at(b, base + offset_of!(ProcSlot, used) + 8 * d)
                    }),
                    busy_ns: std::array::from_fn(|d| {
                        u64_at(b, base + offset_of!(ProcSlot, busy_ns) + 8 * d)
                    }),
                })
            })
            .collect();
        Ok(RegionCopy {
            flags: u32_at(b, offset_of!(Header, flags)),
            high_priority_launch_ns: u64_at(b, offset_of!(Header, high_priority_launch_ns)),
            devices,
            slots,
        })
    }
}

/// Frees slots of dead processes in a region file that no process maps,
/// without mapping it: for each `(slot, pid)` whose PID is still `pid`,
/// zeroes the slot's counters, then its PID. Returns how many it freed.
///
/// Only for files no process maps: a live process's atomics would race
/// these plain writes. A process that maps the file later finds the slots
/// free (PID 0 is written last).
pub fn clear_slots(path: &Path, slots: &[(usize, i32)]) -> Result<usize, RegionError> {
    use std::os::unix::fs::FileExt as _;
    let f = open_region_file(path)?;
    let mut freed = 0;
    for &(slot, pid) in slots {
        if slot >= MAX_SLOTS {
            continue;
        }
        let base = (SLOTS + slot * SLOT) as u64;
        let mut now = [0u8; 4];
        f.read_exact_at(&mut now, base + offset_of!(ProcSlot, pid) as u64)?;
        if i32::from_le_bytes(now) != pid {
            continue;
        }
        let body = vec![0u8; SLOT - offset_of!(ProcSlot, priority)];
        f.write_all_at(&body, base + offset_of!(ProcSlot, priority) as u64)?;
        f.write_all_at(&0i32.to_le_bytes(), base + offset_of!(ProcSlot, pid) as u64)?;
        freed += 1;
    }
    if freed > 0 {
        f.sync_data().map_err(RegionError::Io)?;
    }
    Ok(freed)
}

/// Sum of `used` over `slots` for device `dev`.
pub fn used_by(slots: &[&SlotCopy], dev: usize) -> u64 {
    slots
        .iter()
        .map(|s| s.used.get(dev).copied().unwrap_or(0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::SharedRegion;
    use std::sync::atomic::Ordering::SeqCst;

    fn region_file() -> (tempfile::TempDir, std::path::PathBuf, SharedRegion) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.cache");
        let r = SharedRegion::open(&path).unwrap();
        (dir, path, r)
    }

    #[test]
    fn a_copy_reads_what_the_mapped_region_holds() {
        let (_d, path, r) = region_file();
        r.set_uuid(1, "GPU-abc");
        r.set_memory_limit(1, 3000 << 20);
        let a = r.claim_slot(4242, 77, 0).unwrap();
        let b = r.claim_slot(4243, 0, 1).unwrap();
        r.add_used(a, 1, 100 << 20);
        r.add_used(b, 1, 50 << 20);
        r.add_busy(a, 1, 5_000);
        let c = RegionCopy::decode(&read_file(&path).unwrap()).unwrap();
        assert_eq!(c.devices[1].uuid, "GPU-abc");
        assert_eq!(c.devices[1].memory_limit, Some(3000 << 20));
        assert_eq!(c.devices[0].memory_limit, None);
        assert_eq!(c.slots.len(), 2);
        assert_eq!((c.slots[0].pid, c.slots[0].start_time), (4242, 77));
        assert_eq!((c.slots[1].pid, c.slots[1].priority), (4243, 1));
        assert_eq!(c.slots[0].busy_ns[1], 5_000);
        let all: Vec<&SlotCopy> = c.slots.iter().collect();
        assert_eq!(used_by(&all, 1), r.device_used(1));
    }

    #[test]
    fn clearing_frees_only_the_named_slots_of_the_named_pids() {
        let (_d, path, r) = region_file();
        let a = r.claim_slot(10, 0, 0).unwrap();
        let b = r.claim_slot(11, 0, 0).unwrap();
        r.add_used(a, 0, 7);
        r.add_used(b, 0, 9);
        // Slot b's PID is not 99: left alone.
        assert_eq!(clear_slots(&path, &[(a, 10), (b, 99)]).unwrap(), 1);
        assert_eq!(r.device_used(0), 9);
        assert_eq!(r.processes().len(), 1);
        // The freed slot can be claimed again.
        assert!(r.claim_slot(12, 0, 0).is_some());
    }

    #[test]
    fn the_priority_fields_are_read_and_written_without_mapping() {
        let (_d, path, r) = region_file();
        let f = open_region_file(&path).unwrap();
        assert_eq!(read_high_priority_launch(&f), 0);
        r.header.high_priority_launch_ns.store(1234, SeqCst);
        assert_eq!(read_high_priority_launch(&f), 1234);
        let now = crate::region::monotonic_ns();
        write_hold_until(&f, now + 1_000_000_000).unwrap();
        assert!(r.low_priority_held(now));
        write_hold_until(&f, 0).unwrap();
        assert!(!r.low_priority_held(now));
        set_flag(&f, crate::region::FLAG_ALONE, true).unwrap();
        assert!(r.alone());
        let c = RegionCopy::decode(&read_file(&path).unwrap()).unwrap();
        assert_eq!(c.high_priority_launch_ns, 1234);
        assert_eq!(c.flags, crate::region::FLAG_ALONE);
        set_flag(&f, crate::region::FLAG_ALONE, false).unwrap();
        assert!(!r.alone());
        assert_eq!(r.charge_scale_ppm(2), 1_000_000);
        write_charge_scale(&f, 2, 800_000).unwrap();
        assert_eq!(r.charge_scale_ppm(2), 800_000);
        assert_eq!(r.charge_scale_ppm(1), 1_000_000);
    }

    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"HAMIRS\x01\0abc").unwrap();
        assert!(matches!(
            RegionCopy::decode(&read_file(&short).unwrap()),
            Err(RegionError::Incompatible { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&short, &link).unwrap();
        assert!(matches!(read_file(&link), Err(RegionError::Symlink)));
        assert!(matches!(
            clear_slots(&link, &[(0, 1)]),
            Err(RegionError::Symlink)
        ));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read_file(&fifo), Err(RegionError::NotRegular)));
        let mut up = vec![0u8; 64];
        up[..4].copy_from_slice(&crate::upstream::MAGIC.to_le_bytes());
        assert!(matches!(
            RegionCopy::decode(&up),
            Err(RegionError::Upstream)
        ));
        assert!(matches!(
            RegionCopy::decode(&[0u8; 16]),
            Err(RegionError::Uninitialised)
        ));
    }
}
