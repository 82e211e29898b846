//! OCI images written from local files, no registry and no daemon: one
//! uncompressed layer, a config, a manifest and an index in an OCI
//! image-layout tar that `ctr images import` takes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::json;

/// One layer's entries by path in the image (no leading slash).
#[derive(Default, Clone)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

#[derive(Clone)]
enum Entry {
    Dir(u32),
    File(Vec<u8>, u32),
    Link(String),
}

fn rel(at: &str) -> String {
    at.trim_start_matches('/').to_string()
}

impl Layer {
    pub fn new() -> Layer {
        Layer::default()
    }

    /// The host file `host` (symlinks followed) at `at`, with `mode`; its
    /// parent dirs made.
    pub fn file(mut self, at: &str, host: &Path, mode: u32) -> anyhow::Result<Layer> {
        let bytes = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.parents(at);
        self.entries.insert(rel(at), Entry::File(bytes, mode));
        Ok(self)
    }

    /// A symlink at `at` to `target`.
    pub fn link(mut self, at: &str, target: &str) -> Layer {
        self.parents(at);
        self.entries
            .insert(rel(at), Entry::Link(target.to_string()));
        self
    }

    /// A dir at `at` with `mode`.
    pub fn dir(mut self, at: &str, mode: u32) -> Layer {
        self.parents(at);
        self.entries.insert(rel(at), Entry::Dir(mode));
        self
    }

    fn parents(&mut self, at: &str) {
        let p = rel(at);
        let mut cur = String::new();
        let parts: Vec<&str> = p.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            self.entries.entry(cur.clone()).or_insert(Entry::Dir(0o755));
        }
    }

    /// The host's static busybox with the usual applets, and the dirs a
    /// container runtime expects (`tmp` 1777, `proc`, `sys`, `dev`, `etc`).
    pub fn busybox() -> anyhow::Result<Layer> {
        let mut l =
            Layer::new().file("/bin/busybox", Path::new(crate::realnode::BUSYBOX), 0o755)?;
        for a in crate::realnode::APPLETS {
            l = l.link(&format!("/bin/{a}"), "busybox");
        }
        for d in ["proc", "sys", "dev", "etc", "run"] {
            l = l.dir(d, 0o755);
        }
        Ok(l.dir("tmp", 0o1777))
    }

    /// The layer as an uncompressed tar.
    fn tar(&self) -> anyhow::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, e) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match e {
                Entry::Dir(mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Entry::File(bytes, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(bytes.len() as u64);
                    b.append_data(&mut h, path, bytes.as_slice())?;
                }
                Entry::Link(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)?;
                }
            }
        }
        Ok(b.into_inner()?)
    }
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `layer` as the OCI image-layout tar `out`, named `name`
/// (`host/repo:tag`), with `entrypoint` and `env` (`PATH=/bin` first).
pub fn write_oci(
    out: &Path,
    name: &str,
    layer: &Layer,
    entrypoint: &[&str],
    env: &[&str],
) -> anyhow::Result<()> {
    let layer_tar = layer.tar()?;
    let layer_digest = sha256(&layer_tar);
    let mut all_env = vec!["PATH=/bin:/usr/bin".to_string()];
    all_env.extend(env.iter().map(|e| e.to_string()));
    let mut config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": all_env},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    if !entrypoint.is_empty() {
        config["config"]["Entrypoint"] = json!(entrypoint);
    }
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"), "size": layer_tar.len()}],
    }))?;
    let manifest_digest = sha256(&manifest);
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag},
        }],
    }))?;
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, path, bytes)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    add(&format!("blobs/sha256/{manifest_digest}"), &manifest)?;
    add(&format!("blobs/sha256/{config_digest}"), &config)?;
    add(&format!("blobs/sha256/{layer_digest}"), &layer_tar)?;
    fs::write(out, b.into_inner()?).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The shared libraries (and the dynamic loader) that `files` load, as
/// the host's loader resolves them (`ldd`), each once.
pub fn shared_libraries(files: &[&Path]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for f in files {
        let o = Command::new("ldd")
            .arg(f)
            .output()
            .with_context(|| format!("running ldd {}", f.display()))?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            if text.contains("not a dynamic executable") {
                continue;
            }
            bail!(
                "ldd {}: {}",
                f.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        for line in text.lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; vdso has no file.
            let path = match line.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                if p.contains("not found") {
                    bail!("ldd {}: {line}", f.display());
                }
                let p = PathBuf::from(p);
                if !out.contains(&p) {
                    out.push(p);
                }
            } else if line.contains("not found") {
                bail!("ldd {}: {}", f.display(), line.trim());
            }
        }
    }
    Ok(out)
}
