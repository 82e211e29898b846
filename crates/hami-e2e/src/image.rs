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
    let mut all_env = vec!["PATH=/bin:/usr/bin".to_string()];
    all_env.extend(env.iter().map(|e| e.to_string()));
    let process = Process {
        entrypoint: entrypoint.iter().map(|e| e.to_string()).collect(),
        env: all_env,
        ..Process::default()
    };
    write_oci_image(out, name, layer, &process)
}

/// An image's process settings (its OCI config's `config`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Process {
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

/// Writes `layer` as the OCI image-layout tar `out`, named `name`, running
/// `process`.
pub fn write_oci_image(
    out: &Path,
    name: &str,
    layer: &Layer,
    process: &Process,
) -> anyhow::Result<()> {
    let layer_tar = layer.tar()?;
    let layer_digest = sha256(&layer_tar);
    let mut config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": process.env},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    if !process.entrypoint.is_empty() {
        config["config"]["Entrypoint"] = json!(process.entrypoint);
    }
    if let Some(u) = &process.user {
        config["config"]["User"] = json!(u);
    }
    if let Some(w) = &process.workdir {
        config["config"]["WorkingDir"] = json!(w);
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

/// A runtime stage of `deploy/images/Dockerfile`: what goes into one of
/// hami-rs's images. The tests build the same images from it without a
/// daemon ([`Stage::layer`]), so the Dockerfile stays the one definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub base: String,
    /// `(file in the build stage's /out, path in the image)`.
    pub copies: Vec<(String, String)>,
    pub process: Process,
}

/// The marker line after which the Dockerfile's runtime stages start.
pub const RUNTIME_MARKER: &str = "# runtime stages";

/// The default PATH of the distroless and Debian bases.
const BASE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime stages of a Dockerfile (everything after [`RUNTIME_MARKER`]),
/// refusing any instruction the daemonless build could not reproduce.
pub fn runtime_stages(dockerfile: &str) -> anyhow::Result<Vec<Stage>> {
    let Some(start) = dockerfile
        .lines()
        .position(|l| l.trim_end() == RUNTIME_MARKER)
    else {
        bail!("the Dockerfile has no `{RUNTIME_MARKER}` line");
    };
    let runtime: String = dockerfile
        .lines()
        .skip(start + 1)
        .map(|l| format!("{l}\n"))
        .collect();
    let mut stages: Vec<Stage> = Vec::new();
    for (n, raw) in runtime.lines().enumerate() {
        let n = n + start + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (op, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let at = || format!("runtime stage line {}: {line}", n + 1);
        if op == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [base, as_, name] = words[..] else {
                bail!("{}: expected `FROM <base> AS <name>`", at());
            };
            anyhow::ensure!(as_.eq_ignore_ascii_case("as"), "{}: expected AS", at());
            stages.push(Stage {
                name: name.to_string(),
                base: base.to_string(),
                copies: Vec::new(),
                process: Process {
                    env: vec![BASE_PATH.to_string()],
                    ..Process::default()
                },
            });
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            bail!("{}: an instruction before the first FROM", at());
        };
        match op {
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let [from, src, dest] = words[..] else {
                    bail!("{}: expected `COPY --from=build /out/<file> <dest>`", at());
                };
                let Some(file) = src.strip_prefix("/out/").filter(|_| from == "--from=build")
                else {
                    bail!("{}: only files of the build stage's /out are copied", at());
                };
                let dest = if dest.ends_with('/') {
                    format!("{dest}{file}")
                } else {
                    dest.to_string()
                };
                stage.copies.push((file.to_string(), dest));
            }
            "USER" => stage.process.user = Some(rest.to_string()),
            "WORKDIR" => stage.process.workdir = Some(rest.to_string()),
            "ENV" => {
                let (k, v) = rest
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("{}: expected ENV KEY=value", at()))?;
                stage
                    .process
                    .env
                    .retain(|e| !e.starts_with(&format!("{k}=")));
                stage.process.env.push(format!("{k}={v}"));
            }
            "ENTRYPOINT" => {
                stage.process.entrypoint = serde_json::from_str(rest).map_err(|e| {
                    anyhow::anyhow!("{}: ENTRYPOINT must be a JSON list: {e}", at())
                })?;
            }
            "LABEL" => {}
            _ => bail!("{}: `{op}` is not reproduced by the daemonless build", at()),
        }
    }
    anyhow::ensure!(!stages.is_empty(), "the Dockerfile has no runtime stage");
    Ok(stages)
}

impl Stage {
    /// The image's one layer: each copied file from `artifact(name)` (the
    /// locally built file of the build stage's `/out/<name>`), on the base.
    /// `scratch` is empty; the distroless `cc` base is stood in for by the
    /// dirs a runtime expects and the host's shared libraries that the
    /// copied files load (glibc, libgcc), as that base provides them.
    pub fn layer(&self, artifact: &dyn Fn(&str) -> Option<PathBuf>) -> anyhow::Result<Layer> {
        let mut layer = Layer::new();
        let mut loaded: Vec<PathBuf> = Vec::new();
        for (file, dest) in &self.copies {
            let host = artifact(file).ok_or_else(|| {
                anyhow::anyhow!("stage {}: no local build of /out/{file}", self.name)
            })?;
            layer = layer.file(dest, &host, 0o755)?;
            loaded.push(host);
        }
        if self.base == "scratch" {
            return Ok(layer);
        }
        anyhow::ensure!(
            self.base.starts_with("gcr.io/distroless/cc"),
            "stage {}: base {} has no daemonless stand-in",
            self.name,
            self.base
        );
        for d in ["proc", "sys", "dev", "etc", "run", "var", "home/nonroot"] {
            layer = layer.dir(d, 0o755);
        }
        layer = layer.dir("tmp", 0o1777);
        let refs: Vec<&Path> = loaded.iter().map(PathBuf::as_path).collect();
        for lib in shared_libraries(&refs)? {
            layer = layer.file(&lib.display().to_string(), &lib, 0o755)?;
        }
        Ok(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dockerfile() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/images/Dockerfile");
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_dockerfile_runtime_stages_are_what_the_chart_runs() {
        let stages = runtime_stages(&dockerfile()).unwrap();
        let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["scheduler", "node", "interposer"]);
        let scheduler = &stages[0];
        assert_eq!(scheduler.process.user.as_deref(), Some("65532:65532"));
        assert_eq!(
            scheduler.process.entrypoint,
            ["/usr/local/bin/hami-scheduler"]
        );
        for tool in ["hami-certgen", "hami-uninstall"] {
            assert!(
                scheduler
                    .copies
                    .contains(&(tool.to_string(), format!("/usr/local/bin/{tool}"))),
                "{tool}"
            );
        }
        // Every file a runtime stage copies is one the build stage puts
        // into /out (the interposer comes from build-lib.sh's output).
        let text = dockerfile();
        let build: String = text
            .lines()
            .take_while(|l| l.trim_end() != RUNTIME_MARKER)
            .collect::<Vec<_>>()
            .join("\n");
        for s in &stages {
            for (file, _) in &s.copies {
                assert!(
                    build.contains(&format!("target/release/{file}"))
                        || (file == "libvgpu.so" && build.contains("build-lib.sh")),
                    "stage {} copies /out/{file}, which the build stage does not make",
                    s.name
                );
            }
        }
        let node = &stages[1];
        assert_eq!(node.process.user, None, "the agent runs as root");
        for (file, dest) in [
            ("hami-node", "/usr/local/bin/hami-node"),
            ("libsim_gpu.so", "/usr/local/bin/libsim_gpu.so"),
            ("libvgpu.so", "/usr/local/lib/hami/libvgpu.so"),
        ] {
            assert!(
                node.copies.contains(&(file.to_string(), dest.to_string())),
                "{file}"
            );
        }
    }

    #[test]
    fn instructions_the_daemonless_build_cannot_reproduce_are_refused() {
        for bad in [
            "RUN apt-get install -y curl",
            "COPY --from=other /out/x /x",
            "COPY ./local /x",
            "ENTRYPOINT /bin/sh -c x",
        ] {
            let text = format!("{RUNTIME_MARKER}\nFROM scratch AS x\n{bad}\n");
            assert!(runtime_stages(&text).is_err(), "{bad}");
        }
        assert!(runtime_stages("FROM scratch AS x\n").is_err(), "no marker");
        let ok = format!(
            "{RUNTIME_MARKER}\nFROM scratch AS x\nCOPY --from=build /out/a /usr/bin/\nENV A=1\n"
        );
        let s = runtime_stages(&ok).unwrap();
        assert_eq!(s[0].copies, [("a".to_string(), "/usr/bin/a".to_string())]);
        assert!(s[0].process.env.contains(&"A=1".to_string()));
    }
}
