//! The limits file: how the node agent (or `hami run`) changes a running
//! container's limits without touching its environment.
//!
//! Format (version 1), UTF-8 text, one `KEY=VALUE` per line, the same keys
//! and value syntax as the environment (see [`crate::env`]):
//!
//! ```text
//! # hami-rs limits v1
//! CUDA_DEVICE_MEMORY_LIMIT_0=3000m
//! CUDA_DEVICE_SM_LIMIT_0=30
//! CUDA_TASK_PRIORITY=1
//! CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/0b3c.cache
//! ```
//!
//! `CUDA_DEVICE_MEMORY_SHARED_CACHE`, written by the node agent, names the
//! container's shared region, so a process started without the
//! container's environment joins the container's accounting instead of
//! counting alone ([`shared_cache`]). `NVIDIA_VISIBLE_DEVICES`, also
//! written by the node agent, lists the container's cards in device order
//! ([`visible_devices`]): it wins over the environment's, which names every
//! card of the node when the agent allocates without the node lock.
//!
//! Blank lines and lines starting with `#` are ignored; so are unknown keys
//! (with a warning), so newer writers stay readable by older readers. A value
//! in the file wins over the same value from the environment. Writers should
//! write a temporary file and `rename` it over the old one, so a reader never
//! sees half a file.

use crate::MAX_DEVICES;
use crate::env::{
    Limits, MEMORY_LIMIT, NVIDIA_VISIBLE_DEVICES, SHARED_CACHE, SM_LIMIT, TASK_PRIORITY,
};
use crate::size::format_size;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// The limits file's name where the node agent puts it: beside the
/// interposer library in `<hook>/vgpu/` (the default path's name too).
pub const FILE_NAME: &str = "hami-limits";

/// First line written by [`encode`].
pub const HEADER: &str = "# hami-rs limits v1";

/// Parses the text of a limits file. Never fails; problems become warnings.
pub fn decode(text: &str, warnings: &mut Vec<String>) -> Limits {
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            warnings.push(format!(
                "limits file line {}: {line:?} is not KEY=VALUE",
                n + 1
            ));
            continue;
        };
        let k = k.trim();
        if !is_known_key(k) {
            warnings.push(format!(
                "limits file line {}: unknown key {k:?} ignored",
                n + 1
            ));
            continue;
        }
        map.insert(k.to_owned(), v.trim().to_owned());
    }
    Limits::from_lookup(&|k| map.get(k).cloned(), warnings)
}

fn is_known_key(k: &str) -> bool {
    if k == MEMORY_LIMIT
        || k == SM_LIMIT
        || k == TASK_PRIORITY
        || k == SHARED_CACHE
        || k == NVIDIA_VISIBLE_DEVICES
    {
        return true;
    }
    [MEMORY_LIMIT, SM_LIMIT].iter().any(|base| {
        k.strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('_'))
            .is_some_and(|i| {
                // Only canonical indices ("3", not "03") are ever looked up.
                i.parse::<usize>()
                    .is_ok_and(|n| n < MAX_DEVICES && n.to_string() == i)
            })
    })
}

/// Writes limits in the format [`decode`] reads; only set fields appear,
/// always per device index.
pub fn encode(limits: &Limits) -> String {
    let mut out = String::from(HEADER);
    out.push('\n');
    for i in 0..MAX_DEVICES {
        if let Some(m) = limits.memory[i] {
            let _ = writeln!(out, "{MEMORY_LIMIT}_{i}={}", format_size(m));
        }
        if let Some(s) = limits.sm[i] {
            let _ = writeln!(out, "{SM_LIMIT}_{i}={s}");
        }
    }
    if let Some(p) = limits.priority {
        let _ = writeln!(out, "{TASK_PRIORITY}={p}");
    }
    out
}

/// The last non-empty value of `key` in a limits file's text.
fn last_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .find(|v| !v.is_empty())
}

/// The shared region a limits file names (its last
/// `CUDA_DEVICE_MEMORY_SHARED_CACHE` line), if any.
pub fn shared_cache(text: &str) -> Option<std::path::PathBuf> {
    last_value(text, SHARED_CACHE).map(std::path::PathBuf::from)
}

/// The container's cards in device order, as the limits file lists them
/// (its last `NVIDIA_VISIBLE_DEVICES` line), if any.
pub fn visible_devices(text: &str) -> Option<String> {
    last_value(text, NVIDIA_VISIBLE_DEVICES).map(str::to_owned)
}

/// Reads a limits file; `Ok(None)` when it does not exist.
pub fn read(path: &Path, warnings: &mut Vec<String>) -> std::io::Result<Option<Limits>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(decode(&text, warnings))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the limits file atomically (write a sibling, then rename).
pub fn write(path: &Path, limits: &Limits) -> std::io::Result<()> {
    write_text(path, &encode(limits))
}

/// [`write`] for a container: also names its shared region
/// (`shared_cache`, the path the container sees).
pub fn write_for_container(
    path: &Path,
    limits: &Limits,
    shared_cache: &Path,
    cards: &[&str],
) -> std::io::Result<()> {
    let mut text = encode(limits);
    let _ = writeln!(text, "{SHARED_CACHE}={}", shared_cache.display());
    if !cards.is_empty() {
        let _ = writeln!(text, "{NVIDIA_VISIBLE_DEVICES}={}", cards.join(","));
    }
    write_text(path, &text)
}

fn write_text(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_documented_example() {
        let mut w = Vec::new();
        let l = decode(
            "# hami-rs limits v1\nCUDA_DEVICE_MEMORY_LIMIT_0=3000m\n\nCUDA_DEVICE_SM_LIMIT_0=30\nCUDA_TASK_PRIORITY=1\n",
            &mut w,
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(l.memory_limit(0), 3000 << 20);
        assert_eq!(l.sm_limit(0), 30);
        assert_eq!(l.priority, Some(1));
        assert_eq!(l.memory[1], None);
    }

    #[test]
    fn warns_on_unknown_and_malformed_lines() {
        let mut w = Vec::new();
        let l = decode(
            "FOO=1\nnot a pair\nCUDA_DEVICE_MEMORY_LIMIT_99=1g\nCUDA_DEVICE_MEMORY_LIMIT=2g\n",
            &mut w,
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert_eq!(l.memory_limit(7), 2 << 30);
    }

    #[test]
    fn write_then_read() {
        let dir = std::env::temp_dir().join(format!("hami-shm-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hami-limits");
        let mut l = Limits::default();
        l.memory[2] = Some(5 << 30);
        l.sm[2] = Some(40);
        write(&path, &l).unwrap();
        let mut w = Vec::new();
        assert_eq!(read(&path, &mut w).unwrap(), Some(l));
        assert_eq!(read(&dir.join("absent"), &mut w).unwrap(), None);
        // A container's file also names its region and cards, without a
        // warning.
        let region = Path::new("/usr/local/vgpu/0b3c.cache");
        write_for_container(&path, &l, region, &["GPU-b", "GPU-a"]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(shared_cache(&text).as_deref(), Some(region));
        assert_eq!(visible_devices(&text).as_deref(), Some("GPU-b,GPU-a"));
        assert_eq!(read(&path, &mut w).unwrap(), Some(l));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(shared_cache("CUDA_DEVICE_SM_LIMIT=3\n"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn encode_round_trips(
            mem in proptest::collection::vec(proptest::option::of(any::<u64>()), MAX_DEVICES),
            sm in proptest::collection::vec(proptest::option::of(0u32..=100), MAX_DEVICES),
            prio in proptest::option::of(0i32..=1),
        ) {
            let mut l = Limits::default();
            l.memory.copy_from_slice(&mem);
            l.sm.copy_from_slice(&sm);
            l.priority = prio;
            let mut w = Vec::new();
            prop_assert_eq!(decode(&encode(&l), &mut w), l);
            prop_assert!(w.is_empty());
        }

        #[test]
        fn decode_never_panics(text in "(?s).{0,200}") {
            let mut w = Vec::new();
            let _ = decode(&text, &mut w);
        }
    }
}
