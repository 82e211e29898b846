//! `hami run`: run a command under the interposer with GPU limits on a
//! workstation, no Kubernetes.
//!
//! It creates a private shared region (and limits-file path) for the run,
//! seeds the limits into it, starts the command with `LD_PRELOAD` pointing at
//! `libvgpu.so` and the interposer's env, waits for it, and prints one line:
//! exit status, wall time, and per device the peak memory the command's
//! processes held and the compute share they achieved.
//!
//! Ctrl-C ends the command, not the summary: `hami` waits for the command
//! and passes SIGTERM/SIGHUP on to it.
//!
//! Where `libvgpu.so` comes from, first match wins:
//! 1. `--lib <path>`;
//! 2. the `HAMI_VGPU_LIB` environment variable;
//! 3. `libvgpu.so` next to the `hami` executable;
//! 4. `../lib/hami/libvgpu.so` relative to the executable's directory;
//! 5. `/usr/local/vgpu/libvgpu.so` (where the device plugin mounts it).
//!
//! With `--sim` the command runs against `sim-gpu` instead of a real driver
//! (demos and tests on machines without a GPU); `libsim_gpu.so` is found the
//! same way (`--sim-lib`, `HAMI_SIM_GPU_LIB`, next to the executable,
//! `../lib/hami/`) and linked as `libcuda.so.1`, `libnvidia-ml.so.1` (and
//! the unversioned names) in a directory put first on `LD_LIBRARY_PATH`, so
//! an unmodified program loads it by name.
//!
//! Every path the command gets (`LD_PRELOAD`, `LD_LIBRARY_PATH`, the region,
//! the limits file, the simulation's state) is absolute: a command that
//! changes directory before it loads CUDA or NVML is still limited.

use anyhow::{Context, Result, bail};
use hami_shm::env as keys;
use hami_shm::region::SharedRegion;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Run a command with GPU memory and compute limits (the interposer, no cluster).
#[derive(clap::Args, Debug)]
#[command(after_help = "Example: hami run --gpumem 4G --gpucores 30 --device 0 -- python train.py")]
pub struct RunArgs {
    /// Device memory per visible GPU: `4G`, `3000M`, `512MiB`; a bare number is MiB
    /// (as `nvidia.com/gpumem`). Unset: no memory limit.
    #[arg(long, value_name = "SIZE")]
    pub gpumem: Option<String>,
    /// Percent of each visible GPU's time (1-100). Unset: no compute limit.
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub gpucores: Option<u32>,
    /// GPUs the command may use (`CUDA_VISIBLE_DEVICES`): indices or UUIDs, comma separated.
    #[arg(long, value_name = "LIST")]
    pub device: Option<String>,
    /// Task priority: 0 high, 1 low (`CUDA_TASK_PRIORITY`).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=1))]
    pub priority: Option<i32>,
    /// Allocations beyond the card's free memory but within the limit use managed memory.
    #[arg(long)]
    pub oversubscribe: bool,
    /// Interposer log level 0-4 (`LIBCUDA_LOG_LEVEL`).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=4))]
    pub log_level: Option<u8>,
    /// Path of libvgpu.so (else HAMI_VGPU_LIB, next to `hami`, ../lib/hami/, /usr/local/vgpu/).
    #[arg(long, value_name = "PATH")]
    pub lib: Option<PathBuf>,
    /// Run against the simulated GPU (sim-gpu) instead of the real driver.
    #[arg(long)]
    pub sim: bool,
    /// Path of libsim_gpu.so (else HAMI_SIM_GPU_LIB, next to `hami`, ../lib/hami/).
    #[arg(long, value_name = "PATH", requires = "sim")]
    pub sim_lib: Option<PathBuf>,
    /// Simulated devices, `;`-separated `<memory> <sms> <uuid> <name>` (sim-gpu's format).
    #[arg(long, value_name = "SPEC", requires = "sim")]
    pub sim_devices: Option<String>,
    /// Directory for the run's shared region and limits file (default: a fresh temp dir,
    /// removed afterwards). Edit `<dir>/hami-limits` to change limits while it runs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The command and its arguments (`--` before it is optional).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The command's exit code (128 + signal number when killed).
    pub code: i32,
    /// The one-line summary printed on exit.
    pub summary: String,
}

/// Runs the command and prints the summary to stderr; returns the exit code.
pub fn execute(args: RunArgs) -> Result<i32> {
    let outcome = run(&args)?;
    eprintln!("{}", outcome.summary);
    Ok(outcome.code)
}

/// Parses `--gpumem`: hami-shm's sizes, plus `MiB`/`GiB`/`Mi` spellings; a
/// bare number is MiB.
pub fn parse_gpumem(text: &str) -> Result<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('i'))
        .or_else(|| {
            t.strip_suffix('B')
                .filter(|r| r.ends_with(|c: char| c.is_ascii_alphabetic()))
        })
        .unwrap_or(t);
    let bytes = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().ok().and_then(|m| m.checked_mul(1 << 20))
    } else {
        hami_shm::size::parse_size(t).ok()
    };
    match bytes {
        Some(b) if b > 0 => Ok(b),
        _ => bail!(
            "--gpumem={text:?}: must be a size such as 4G, 3000M or 512MiB (a bare number is MiB), above 0"
        ),
    }
}

/// Finds a library by the documented search order.
fn locate(
    flag: Option<&Path>,
    env_var: &str,
    file: &str,
    fallback: Option<&str>,
) -> Result<PathBuf> {
    let mut tried = Vec::new();
    if let Some(p) = flag {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            bail!("{}: no such file", p.display())
        };
    }
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env_var}={}: no such file", p.display());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        tried.push(dir.join(file));
        tried.push(dir.join("../lib/hami").join(file));
    }
    if let Some(f) = fallback {
        tried.push(PathBuf::from(f));
    }
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
            format!(
                "{file} not found (pass --lib or set {env_var}); looked in: {}",
                list.join(", ")
            )
        })
}

/// `p` from the root, so it still names the same file for a command that
/// changes directory.
fn absolute(p: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&p).with_context(|| format!("{}: cannot make it absolute", p.display()))
}

fn prepend(var: &str, value: &Path) -> std::ffi::OsString {
    let mut v = value.as_os_str().to_owned();
    if let Some(old) = std::env::var_os(var).filter(|o| !o.is_empty()) {
        v.push(":");
        v.push(old);
    }
    v
}

/// While the command runs, `hami` outlives the signals that end it, so the
/// summary is still printed: Ctrl-C (SIGINT, SIGQUIT) already reaches the
/// whole foreground process group, so `hami` only ignores it; SIGTERM and
/// SIGHUP sent to `hami` alone are passed on to the command. Handlers are
/// reset to the defaults by `exec`, so the command is unaffected.
///
/// The handlers are installed before the command is started, with these
/// signals blocked until the command's pid is known: one that arrives
/// while the command is being started is held, then passed on, not lost.
/// The command gets the signal mask `hami` had (see [`Forwarding::restore_mask_on_exec`]).
struct Forwarding {
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
    /// The signal mask before `prepare`, restored by `start` (or on drop).
    mask: Option<libc::sigset_t>,
}

const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP];

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 && (sig == libc::SIGTERM || sig == libc::SIGHUP) {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

impl Forwarding {
    /// Blocks the forwarded signals and installs the handlers; call before
    /// starting the command.
    fn prepare() -> Forwarding {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset.
        let mut block: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to sigset_t values we own.
        unsafe {
            libc::sigemptyset(&mut block);
            for sig in FORWARDED {
                libc::sigaddset(&mut block, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        }
        let handler = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
        let previous = FORWARDED
            .into_iter()
            // SAFETY: installing an async-signal-safe handler.
            .map(|sig| (sig, unsafe { libc::signal(sig, handler) }))
            .collect();
        Forwarding {
            previous,
            mask: Some(old),
        }
    }

    /// Makes `cmd` start with the signal mask from before `prepare`: a
    /// child inherits the mask, and one started with SIGTERM blocked would
    /// never see the SIGTERM passed on to it.
    fn restore_mask_on_exec(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let Some(mask) = self.mask else {
            return;
        };
        // SAFETY: pthread_sigmask is async-signal-safe and `mask` is copied
        // into the closure, so nothing is allocated or locked after fork.
        unsafe {
            cmd.pre_exec(move || {
                libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
                Ok(())
            });
        }
    }

    /// The command runs as `child`: signals held since `prepare` and from
    /// now on reach it.
    fn start(&mut self, child: i32) {
        CHILD.store(child, std::sync::atomic::Ordering::Relaxed);
        self.unblock();
    }

    fn unblock(&mut self) {
        if let Some(old) = self.mask.take() {
            // SAFETY: restoring the mask saved by `prepare`.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        // Not started (the command did not start): nothing to forward to.
        self.unblock();
        for &(sig, h) in &self.previous {
            // SAFETY: restoring what was there before.
            unsafe { libc::signal(sig, h) };
        }
        CHILD.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Removes the run's temp dir on every exit path.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs the command; the summary is returned, not printed.
pub fn run(args: &RunArgs) -> Result<Outcome> {
    let mem = args.gpumem.as_deref().map(parse_gpumem).transpose()?;
    let lib = absolute(locate(
        args.lib.as_deref(),
        "HAMI_VGPU_LIB",
        "libvgpu.so",
        Some("/usr/local/vgpu/libvgpu.so"),
    )?)?;
    let (dir, _cleanup) = match &args.state_dir {
        Some(d) => (d.clone(), TempDir(None)),
        None => {
            let d = std::env::temp_dir().join(format!("hami-run-{}", std::process::id()));
            (d.clone(), TempDir(Some(d)))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Every path handed to the command is absolute: it may change directory.
    let dir = absolute(dir)?;
    let cache = dir.join("vgpu.cache");
    let limits_file = dir.join(hami_shm::limits::FILE_NAME);

    // The region holds the limits from the start, so processes that do not
    // inherit the environment are held to them too.
    let region = SharedRegion::open(&cache).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut limits = hami_shm::env::Limits::default();
    for i in 0..hami_shm::MAX_DEVICES {
        limits.memory[i] = mem;
        limits.sm[i] = args.gpucores;
    }
    limits.priority = args.priority;
    region.apply_limits(&limits, true);

    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("LD_PRELOAD", prepend("LD_PRELOAD", &lib))
        .env(keys::SHARED_CACHE, &cache)
        .env(keys::LIMITS_FILE, &limits_file);
    if let Some(m) = mem {
        cmd.env(keys::MEMORY_LIMIT, hami_shm::size::format_size(m));
    }
    if let Some(c) = args.gpucores {
        cmd.env(keys::SM_LIMIT, c.to_string());
    }
    if let Some(d) = &args.device {
        cmd.env(keys::VISIBLE_DEVICES, d);
    }
    if let Some(p) = args.priority {
        cmd.env(keys::TASK_PRIORITY, p.to_string());
    }
    if args.oversubscribe {
        cmd.env(keys::OVERSUBSCRIBE, "true");
    }
    if let Some(l) = args.log_level {
        cmd.env(keys::LOG_LEVEL, l.to_string());
    }
    if args.sim {
        let sim = absolute(locate(
            args.sim_lib.as_deref(),
            "HAMI_SIM_GPU_LIB",
            "libsim_gpu.so",
            None,
        )?)?;
        // The simulation under the names programs load: the sonames, and
        // the development names some (older nvml-wrapper) ask for.
        let sim_dir = dir.join("sim-lib");
        std::fs::create_dir_all(&sim_dir)?;
        for name in [
            "libcuda.so.1",
            "libnvidia-ml.so.1",
            "libcuda.so",
            "libnvidia-ml.so",
        ] {
            let link = sim_dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&sim, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        cmd.env("LD_LIBRARY_PATH", prepend("LD_LIBRARY_PATH", &sim_dir));
        if let Some(d) = &args.sim_devices {
            cmd.env("SIM_GPU_DEVICES", d);
        }
        // The simulated cards are this run's own unless the caller shares them.
        if std::env::var_os("SIM_GPU_STATE_DIR").is_none() {
            cmd.env("SIM_GPU_STATE_DIR", dir.join("sim-gpu"));
        }
    }

    let started = Instant::now();
    let status = {
        let mut signals = Forwarding::prepare();
        signals.restore_mask_on_exec(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", args.command[0]))?;
        signals.start(child.id() as i32);
        child.wait().context("waiting for the command")?
    };
    let wall = started.elapsed();
    let code = {
        use std::os::unix::process::ExitStatusExt;
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
    };
    // Every process of the run is gone: fold their slots into the totals.
    region.reclaim_dead(std::process::id() as i32, &hami_shm::region::process_alive);
    let devices = args.device.as_deref().map_or(1, |d| d.split(',').count());
    Ok(Outcome {
        code,
        summary: summary(&region, code, wall, devices, args.gpucores),
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `hami run: exit 0 after 3.2 s; gpu0: peak 1.50 GiB of 4.00 GiB, compute 29.8% (quota 30%)`
fn summary(
    region: &SharedRegion,
    code: i32,
    wall: Duration,
    devices: usize,
    quota: Option<u32>,
) -> String {
    let mut parts = Vec::new();
    for d in 0..hami_shm::MAX_DEVICES {
        let peak = region.devices[d]
            .peak_used
            .load(std::sync::atomic::Ordering::Relaxed);
        let busy = region.device_busy_ns(d);
        if d >= devices && peak == 0 && busy == 0 {
            continue;
        }
        let limit = match region.memory_limit(d) {
            Some(l) if l > 0 => format!(" of {}", gib(l)),
            _ => String::new(),
        };
        let compute = match quota {
            Some(q) if busy > 0 => format!(
                "compute {:.1}% (quota {q}%)",
                100.0 * busy as f64 / wall.as_nanos().max(1) as f64
            ),
            Some(q) => format!("compute unmeasured (quota {q}%, no kernels)"),
            None => "compute unmeasured (no quota)".to_owned(),
        };
        parts.push(format!("gpu{d}: peak {}{limit}, {compute}", gib(peak)));
    }
    format!(
        "hami run: exit {code} after {:.1} s; {}",
        wall.as_secs_f64(),
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpumem_spellings() {
        assert_eq!(parse_gpumem("4G").unwrap(), 4 << 30);
        assert_eq!(parse_gpumem("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_gpumem("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_gpumem("3000").unwrap(), 3000 << 20);
        assert_eq!(parse_gpumem("3000m").unwrap(), 3000 << 20);
        assert!(parse_gpumem("0").is_err());
        assert!(parse_gpumem("lots").is_err());
        assert!(parse_gpumem("4 GB").is_err());
    }
}
