//! Installing the interposer (`libvgpu.so`) that the node agent carries
//! into the host's hook dir (`<hook>/vgpu`) at start.
//!
//! The library goes to a content-addressed file,
//! `libvgpu.so.<version>-<first 12 hex digits of its SHA-256>`, written as
//! a temporary file in the same dir, synced, and renamed into place (then
//! the dir is synced), so:
//!
//! * the same build is never written twice (the file is there with the
//!   same bytes: nothing is touched);
//! * a new build gets a new file; an old version's file is left in place,
//!   byte for byte, for the containers that mounted it;
//! * a crash leaves at most a temporary file (`.libvgpu.so.tmp-<pid>`),
//!   never half a library under a final name; the next start removes it.
//!
//! Allocate mounts the returned file directly (no stable name to swap), so
//! an upgrade never changes the file under a running container.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The library's name; installed files are `libvgpu.so.<version>-<hash>`.
pub const LIBRARY_NAME: &str = "libvgpu.so";
/// Prefix of the temporary files an install writes before renaming.
pub const TEMP_PREFIX: &str = ".libvgpu.so.tmp-";

/// Why the library could not be installed. Both name the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The library to install (`--lib-source`) cannot be read.
    #[error("reading the interposer library to install, {path}: {source}")]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file or dir of the hook dir cannot be written.
    #[error("installing the interposer library: {path}: {source}")]
    Target {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The outcome of [`install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The installed file, which Allocate mounts.
    pub path: PathBuf,
    /// Whether it was written now (false: the same build was there).
    pub written: bool,
    /// Temporary files of an interrupted install, removed.
    pub removed_temps: Vec<PathBuf>,
}

/// `libvgpu.so.<version>-<first 12 hex digits of the SHA-256 of bytes>`.
pub fn versioned_name(version: &str, bytes: &[u8]) -> String {
    versioned_file_name(LIBRARY_NAME, version, bytes)
}

fn versioned_file_name(name: &str, version: &str, bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{name}.{version}-{hex}")
}

/// Installs the library at `source` into `vgpu_dir` (made if missing) as
/// [`versioned_name`]; see the module doc.
pub fn install(source: &Path, vgpu_dir: &Path, version: &str) -> Result<Installed, InstallError> {
    install_as(source, vgpu_dir, LIBRARY_NAME, version)
}

/// sim-gpu's driver library, installed beside the interposer the same way
/// (the agent's own copy is a path in its image, not on the host).
pub const SIM_LIBRARY_NAME: &str = "libsim_gpu.so";
/// sim-gpu's state dir under the hook dir (the agent's default).
pub const SIM_STATE_NAME: &str = "sim-gpu-state";

/// [`install`] of a library named `name` (`<name>.<version>-<hash>`).
pub fn install_as(
    source: &Path,
    vgpu_dir: &Path,
    name: &str,
    version: &str,
) -> Result<Installed, InstallError> {
    let bytes = std::fs::read(source).map_err(|e| InstallError::Source {
        path: source.to_path_buf(),
        source: e,
    })?;
    if bytes.is_empty() {
        return Err(InstallError::Source {
            path: source.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
        });
    }
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Target { path, source }
    };
    std::fs::create_dir_all(vgpu_dir).map_err(at(vgpu_dir))?;
    let removed_temps = remove_temps(vgpu_dir)?;
    let dest = vgpu_dir.join(versioned_file_name(name, version, &bytes));
    match std::fs::read(&dest) {
        Ok(existing) if existing == bytes => {
            return Ok(Installed {
                path: dest,
                written: false,
                removed_temps,
            });
        }
        // Damaged: a fresh file is renamed over it (a container that has
        // it mounted keeps the old inode).
        Ok(_) => tracing::warn!(
            "{} differs from its name's hash; replacing it",
            dest.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(&dest)(e)),
    }
    let tmp = vgpu_dir.join(format!("{TEMP_PREFIX}{}", std::process::id()));
    if let Err(e) = write_synced(&tmp, &bytes, 0o755) {
        let _ = std::fs::remove_file(&tmp);
        return Err(at(&tmp)(e));
    }
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(at(&dest)(e));
    }
    std::fs::File::open(vgpu_dir)
        .and_then(|d| d.sync_all())
        .map_err(at(vgpu_dir))?;
    Ok(Installed {
        path: dest,
        written: true,
        removed_temps,
    })
}

/// A new file of `mode` holding `bytes`, synced to disk.
fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()
}

/// Name of the preload list Allocate mounts as a container's
/// `/etc/ld.so.preload`.
pub const PRELOAD_NAME: &str = "ld.so.preload";

/// Writes `<vgpu_dir>/ld.so.preload`, naming the library where Allocate
/// mounts it in every container (`<vgpu_dir>/libvgpu.so`, the same path
/// as on the host, HAMi's layout), unless it already says so. Temp file,
/// sync, rename: a container never mounts half a list. Returns whether it
/// was written.
pub fn write_preload(vgpu_dir: &Path) -> Result<bool, InstallError> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Target { path, source }
    };
    let dest = vgpu_dir.join(PRELOAD_NAME);
    let want = format!("{}\n", vgpu_dir.join(LIBRARY_NAME).display());
    if std::fs::read_to_string(&dest).is_ok_and(|have| have == want) {
        return Ok(false);
    }
    std::fs::create_dir_all(vgpu_dir).map_err(at(vgpu_dir))?;
    let tmp = vgpu_dir.join(format!(".{PRELOAD_NAME}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if let Err(e) = write_synced(&tmp, want.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&tmp);
        return Err(at(&tmp)(e));
    }
    std::fs::rename(&tmp, &dest).map_err(at(&dest))?;
    Ok(true)
}

/// Removes what the agent put into `vgpu_dir` (the installed libraries,
/// the preload list, sim-gpu's state, `alloc/` and `limits/`, the empty
/// `containers/`) when no
/// container uses it any more: at the agent's exit, so uninstalling leaves
/// the host's hook dir empty. `None`: kept, because a container's dir or
/// allocation link is still there (its container may run, with the library
/// mounted). Anything else in the dir is left alone.
/// The agent calls it only after it stopped allocating.
pub fn remove_if_unused(vgpu_dir: &Path) -> Result<Option<Vec<PathBuf>>, InstallError> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Target { path, source }
    };
    // A running GPU container has its dir under containers/ (removed only
    // once its pod is gone); the allocation links and per-container limits
    // dirs belong to those containers.
    let containers = vgpu_dir.join("containers");
    match std::fs::read_dir(&containers) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Ok(None);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(&containers)(e)),
    }
    let mut removed = Vec::new();
    for sub in ["alloc", "limits", "containers"] {
        let d = vgpu_dir.join(sub);
        match std::fs::symlink_metadata(&d) {
            Ok(md) if md.is_dir() => {
                std::fs::remove_dir_all(&d).map_err(at(&d))?;
                removed.push(d);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&d)(e)),
        }
    }
    let entries = match std::fs::read_dir(vgpu_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(removed)),
        Err(e) => return Err(at(vgpu_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(at(vgpu_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name == PRELOAD_NAME
            || name.starts_with(&format!("{LIBRARY_NAME}."))
            || name.starts_with(&format!("{SIM_LIBRARY_NAME}."))
            || name.starts_with(TEMP_PREFIX);
        let kind = entry.file_type().map_err(at(vgpu_dir))?;
        let path = entry.path();
        if ours && kind.is_file() {
            std::fs::remove_file(&path).map_err(at(&path))?;
            removed.push(path);
        } else if name == SIM_STATE_NAME && kind.is_dir() {
            std::fs::remove_dir_all(&path).map_err(at(&path))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(Some(removed))
}

/// Removes the temporary files an interrupted install left in `dir`.
fn remove_temps(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Target { path, source }
    };
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(at(&path))?;
            tracing::info!("removed {} left by an interrupted install", path.display());
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn source(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Inode, mtime and ctime: a rewrite or a rename changes at least one.
    fn identity(p: &Path) -> (u64, i64, i64, i64, i64) {
        let m = std::fs::metadata(p).unwrap();
        (
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    }

    /// The hook dir holds exactly one file (no temp left, nothing doubled).
    fn assert_one_file_in(dir: &Path) {
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
    #[test]
    fn the_name_is_version_and_hash_prefix() {
        // SHA-256("abc") = ba7816bf8f01cfea...
        assert_eq!(
            versioned_name("0.1.0", b"abc"),
            "libvgpu.so.0.1.0-ba7816bf8f01"
        );
    }

    #[test]
    fn the_preload_list_names_the_mounted_library_and_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let vgpu = dir.path().join("hook/vgpu");
        assert!(write_preload(&vgpu).unwrap());
        let text = std::fs::read_to_string(vgpu.join(PRELOAD_NAME)).unwrap();
        assert_eq!(text, format!("{}\n", vgpu.join("libvgpu.so").display()));
        assert!(
            !write_preload(&vgpu).unwrap(),
            "rewritten with nothing changed"
        );
        std::fs::write(vgpu.join(PRELOAD_NAME), "/elsewhere.so\n").unwrap();
        assert!(write_preload(&vgpu).unwrap());
        assert_one_file_in(&vgpu);
    }

    #[test]
    fn installing_the_same_build_twice_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path(), "lib", b"build one");
        let vgpu = dir.path().join("hook/vgpu");
        let first = install(&src, &vgpu, "0.1.0").unwrap();
        assert!(first.written);
        assert_eq!(first.path, vgpu.join(versioned_name("0.1.0", b"build one")));
        assert_eq!(std::fs::read(&first.path).unwrap(), b"build one");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let before = identity(&first.path);
        let second = install(&src, &vgpu, "0.1.0").unwrap();
        assert!(!second.written);
        assert_eq!(second.path, first.path);
        assert_eq!(identity(&second.path), before, "the file was rewritten");
        assert_one_file_in(&vgpu);
    }

    #[test]
    fn a_new_build_gets_a_new_file_and_the_old_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let vgpu = dir.path().join("vgpu");
        let old = install(&source(dir.path(), "a", b"old build"), &vgpu, "0.1.0").unwrap();
        let old_id = identity(&old.path);
        // Same version, new bytes (a rebuild), then a new version.
        let rebuilt = install(&source(dir.path(), "b", b"new build"), &vgpu, "0.1.0").unwrap();
        let upgraded = install(&source(dir.path(), "c", b"newer build"), &vgpu, "0.2.0").unwrap();
        assert!(rebuilt.written && upgraded.written);
        assert_ne!(rebuilt.path, old.path);
        assert_ne!(upgraded.path, rebuilt.path);
        assert!(
            upgraded
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("libvgpu.so.0.2.0-")
        );
        assert_eq!(std::fs::read(&old.path).unwrap(), b"old build");
        assert_eq!(identity(&old.path), old_id, "the old file was touched");
        assert_eq!(std::fs::read(&rebuilt.path).unwrap(), b"new build");
        assert_eq!(std::fs::read(&upgraded.path).unwrap(), b"newer build");
    }

    #[test]
    fn exit_removes_what_was_installed_only_when_no_container_uses_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let vgpu = dir.join("vgpu");
        let lib = source(dir, "src.so", b"library-bytes");
        let installed = install(&lib, &vgpu, "1.0").unwrap();
        write_preload(&vgpu).unwrap();
        let sim = install_as(&lib, &vgpu, SIM_LIBRARY_NAME, "1.0").unwrap();
        std::fs::create_dir_all(vgpu.join(SIM_STATE_NAME)).unwrap();
        std::fs::write(vgpu.join(SIM_STATE_NAME).join("card0"), b"state").unwrap();
        std::fs::create_dir_all(vgpu.join("containers/uid_main")).unwrap();
        std::fs::create_dir_all(vgpu.join("alloc")).unwrap();
        std::os::unix::fs::symlink(vgpu.join("containers/uid_main"), vgpu.join("alloc/k.dir"))
            .unwrap();
        std::fs::write(vgpu.join("operator-notes"), b"not ours").unwrap();
        assert_eq!(
            remove_if_unused(&vgpu).unwrap(),
            None,
            "a container's dir is there"
        );
        assert!(installed.path.is_file());
        std::fs::create_dir_all(vgpu.join("limits/uid_main")).unwrap();
        std::fs::write(vgpu.join("limits/uid_main/limits"), b"x").unwrap();
        // Its pod gone, the monitor removed its dir: the link and the
        // limits dir are left over, and go.
        std::fs::remove_dir(vgpu.join("containers/uid_main")).unwrap();
        let removed = remove_if_unused(&vgpu).unwrap().expect("nothing uses it");
        assert_eq!(removed.len(), 7, "{removed:?}");
        assert!(!vgpu.join("limits").exists() && !vgpu.join("alloc").exists());
        assert!(!installed.path.exists());
        assert!(!sim.path.exists());
        assert!(!vgpu.join(PRELOAD_NAME).exists());
        let left: Vec<_> = std::fs::read_dir(&vgpu)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["operator-notes"]);
        // A missing dir is nothing to remove.
        assert_eq!(remove_if_unused(&dir.join("none")).unwrap(), Some(vec![]));
    }

    #[test]
    fn an_interrupted_install_leaves_no_half_file_and_is_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let vgpu = dir.path().join("vgpu");
        std::fs::create_dir_all(&vgpu).unwrap();
        let bytes = b"the whole library";
        let final_name = vgpu.join(versioned_name("0.1.0", bytes));
        // A crash between write and rename: half the bytes in a temp file.
        let stale = vgpu.join(format!("{TEMP_PREFIX}4242"));
        std::fs::write(&stale, &bytes[..5]).unwrap();
        assert!(!final_name.exists());
        let done = install(&source(dir.path(), "lib", bytes), &vgpu, "0.1.0").unwrap();
        assert_eq!(done.path, final_name);
        assert!(done.written);
        assert_eq!(done.removed_temps, vec![stale.clone()]);
        assert!(!stale.exists());
        assert_eq!(std::fs::read(&final_name).unwrap(), bytes);
        // A damaged file under the final name is replaced by a whole one.
        std::fs::write(&final_name, &bytes[..5]).unwrap();
        let again = install(&source(dir.path(), "lib", bytes), &vgpu, "0.1.0").unwrap();
        assert!(again.written);
        assert_eq!(std::fs::read(&final_name).unwrap(), bytes);
        assert_one_file_in(&vgpu);
    }

    #[test]
    fn errors_name_the_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/libvgpu.so");
        let e = install(&missing, &dir.path().join("vgpu"), "0.1.0").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "reading the interposer library to install, {}: ",
                missing.display()
            )),
            "{msg}"
        );
        let empty = source(dir.path(), "empty", b"");
        let e = install(&empty, &dir.path().join("vgpu"), "0.1.0").unwrap_err();
        assert!(e.to_string().contains("the file is empty"), "{e}");
        // The hook dir is a file: the error names it.
        let src = source(dir.path(), "lib", b"x");
        let blocked = source(dir.path(), "blocked", b"a file");
        let e = install(&src, &blocked.join("vgpu"), "0.1.0").unwrap_err();
        assert!(
            e.to_string()
                .contains(&blocked.join("vgpu").display().to_string()),
            "{e}"
        );
    }
}
