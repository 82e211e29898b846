//! Test support: builds the interposer, the simulated driver and the probe
//! (once per test binary, in their own target dir so the outer `cargo test`
//! lock is never needed), and runs the probe under them.
//!
//! Set `HAMI_TEST_ARTIFACTS` to a directory holding `libvgpu.so`,
//! `libsim_gpu.so` and `cuda-probe` to skip the build (CI can prebuild them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

pub struct Artifacts {
    pub vgpu: PathBuf,
    pub sim: PathBuf,
    pub probe: PathBuf,
    /// Holds `libcuda.so.1` and `libnvidia-ml.so.1` pointing at the simulation.
    pub sim_dir: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/<name> lies two levels below the workspace")
        .to_path_buf()
}

fn build() -> PathBuf {
    if let Some(dir) = std::env::var_os("HAMI_TEST_ARTIFACTS") {
        return PathBuf::from(dir);
    }
    let root = workspace_root();
    let target = root.join("target").join("hami-cdylibs");
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "-j2",
            "--release",
            "-p",
            "hami-core",
            "-p",
            "sim-gpu",
        ])
        .status()
        .expect("run cargo to build libvgpu.so and sim-gpu");
    assert!(status.success(), "building libvgpu.so and sim-gpu failed");
    target.join("release")
}

pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let dir = build();
        let sim = dir.join("libsim_gpu.so");
        // Several test binaries may get here at once: each link is made
        // under a private name and renamed into place (atomic).
        let sim_dir = dir.join("sim-lib");
        std::fs::create_dir_all(&sim_dir).unwrap();
        for name in ["libcuda.so.1", "libnvidia-ml.so.1"] {
            let tmp = sim_dir.join(format!("{name}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&sim, &tmp).unwrap();
            std::fs::rename(&tmp, sim_dir.join(name)).unwrap();
        }
        let a = Artifacts {
            vgpu: dir.join("libvgpu.so"),
            sim,
            probe: dir.join("cuda-probe"),
            sim_dir,
        };
        for p in [&a.vgpu, &a.sim, &a.probe] {
            assert!(p.exists(), "{} was not built", p.display());
        }
        a
    })
}

/// A scratch directory for one test: its shared region and limits file.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("hami-core-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
    pub fn region(&self) -> PathBuf {
        self.dir.join("vgpu.cache")
    }
    pub fn limits(&self) -> PathBuf {
        self.dir.join("hami-limits")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The probe under the interposer (unless `preload` is false).
pub fn probe_cmd(scratch: &Scratch, env: &[(&str, &str)], args: &[&str], preload: bool) -> Command {
    let a = artifacts();
    let mut c = Command::new(&a.probe);
    c.args(args)
        .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .env_remove("CUDA_DEVICE_SM_LIMIT")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("LIBCUDA_LOG_LEVEL")
        .env("LD_LIBRARY_PATH", &a.sim_dir)
        .env(
            "SIM_GPU_DEVICES",
            "4g 80 GPU-11111111-2222-3333-4444-555555555555 NVIDIA Sim 4GB",
        )
        // Processes of one test share their simulated card; tests never
        // share one with each other.
        .env("SIM_GPU_STATE_DIR", scratch.dir.join("sim-gpu"))
        .env_remove("SIM_GPU_PID_OFFSET")
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", scratch.region())
        .env("HAMI_LIMITS_FILE", scratch.limits())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if preload {
        c.env("LD_PRELOAD", &a.vgpu);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs the probe to completion; panics with its output if it failed.
pub fn probe(scratch: &Scratch, env: &[(&str, &str)], args: &[&str]) -> Lines {
    let out = probe_cmd(scratch, env, args, true).output().unwrap();
    Lines::from_output(&out)
}

pub fn spawn(scratch: &Scratch, env: &[(&str, &str)], args: &[&str]) -> Child {
    probe_cmd(scratch, env, args, true).spawn().unwrap()
}

/// The probe's output: one `<command> <CUresult> [values]` line per command.
pub struct Lines {
    pub lines: Vec<Vec<String>>,
    pub stderr: String,
}

impl Lines {
    pub fn from_output(out: &Output) -> Lines {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "probe failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        Lines {
            lines: stdout
                .lines()
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect(),
            stderr,
        }
    }

    /// The CUresult of the `i`-th command.
    pub fn rc(&self, i: usize) -> i32 {
        self.field(i, 1)
    }

    pub fn field<T: std::str::FromStr>(&self, i: usize, f: usize) -> T
    where
        T::Err: std::fmt::Debug,
    {
        let line = self
            .lines
            .get(i)
            .unwrap_or_else(|| panic!("no line {i} in {:?}", self.lines));
        line.get(f)
            .unwrap_or_else(|| panic!("no field {f} in {line:?}"))
            .parse()
            .unwrap()
    }

    /// Return codes of all commands, for compact assertions.
    pub fn rcs(&self) -> Vec<i32> {
        (0..self.lines.len()).map(|i| self.rc(i)).collect()
    }
}

pub const MIB: u64 = 1 << 20;
pub const OOM: i32 = 2;

/// Reads a spawned probe's stdout up to and including its `ready` line;
/// returns the lines before it.
pub fn until_ready(child: &mut Child) -> Vec<String> {
    use std::io::Read;
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = out.read(&mut b).unwrap();
        assert_eq!(
            n,
            1,
            "probe ended before ready: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(b[0]);
        if b[0] == b'\n' {
            let text = String::from_utf8_lossy(&seen).into_owned();
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.last().is_some_and(|l| l.starts_with("ready ")) {
                lines.pop();
                return lines;
            }
        }
    }
}

/// Kills a child that is still running after `limit`: a watchdog against a
/// deadlock, not a timing assertion (the caller checks how it ended).
pub fn watchdog(child: &Child, limit: std::time::Duration) -> std::thread::JoinHandle<()> {
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: signal 0 only checks that our child is still there.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: our own child, wedged.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    })
}
