//! `hami run` against the simulated GPU: limits reach the command, the
//! summary reports what it used, exit codes come back.
//!
//! `run.rs` is compiled into this test directly, so the tests do not depend
//! on how `main.rs` wires the subcommand; the cdylibs and the probe are
//! built by hami-core's test helper.

#[path = "../../hami-core/tests/common/mod.rs"]
mod common;
#[path = "../src/run.rs"]
#[allow(dead_code)]
mod run;

use clap::Parser;
use std::path::Path;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: run::RunArgs,
}

/// `hami run <flags> -- sh -c '<probe> <probe args> > out'`, parsed as the CLI would.
fn hami_run(dir: &Path, flags: &[&str], probe_args: &str) -> (run::Outcome, String) {
    let a = common::artifacts();
    let out = dir.join("probe.out");
    let script = format!("{} {probe_args} > {}", a.probe.display(), out.display());
    let mut argv = vec!["hami-run".to_owned()];
    argv.extend(flags.iter().map(|s| s.to_string()));
    argv.extend([
        "--lib".into(),
        a.vgpu.display().to_string(),
        "--sim".into(),
        "--sim-lib".into(),
        a.sim.display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script,
    ]);
    let cli = Cli::try_parse_from(argv).expect("valid flags");
    let outcome = run::run(&cli.run).expect("hami run");
    (outcome, std::fs::read_to_string(out).unwrap_or_default())
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hami-run-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn memory_limit_reaches_the_command_and_peak_is_reported() {
    let d = scratch("mem");
    let (o, out) = hami_run(
        &d,
        &["--gpumem", "1G", "--sim-devices", "8g 80 GPU-x Sim"],
        "init alloc 700m alloc 400m meminfo",
    );
    assert_eq!(o.code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], "alloc 0 0");
    assert_eq!(lines[2], "alloc 2 0", "over the 1 GiB limit");
    assert_eq!(
        lines[3],
        format!("meminfo 0 {} {}", (1024 - 700) << 20, 1u64 << 30)
    );
    assert!(
        o.summary.starts_with("hami run: exit 0 after "),
        "{}",
        o.summary
    );
    assert!(
        o.summary.contains("gpu0: peak 0.68 GiB of 1.00 GiB"),
        "{}",
        o.summary
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn compute_quota_is_enforced_and_reported() {
    let d = scratch("cores");
    let (o, out) = hami_run(&d, &["--gpucores", "30"], "init busy 2000 1000");
    assert_eq!(o.code, 0);
    let f: Vec<f64> = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .skip(2)
        .map(|x| x.parse().unwrap())
        .collect();
    let share = 100.0 * f[0] * 1e6 / f[1];
    // A probe starved of CPU leaves the card idle and falls short of its
    // quota by up to quota x starved fraction (the probe measures how late
    // it wakes); pacing must never let it go over.
    let starved = f[4] / f[1];
    let allowance = 30.0 * starved;
    assert!(share <= 35.0, "share {share:.1}% is over the 30% quota");
    assert!(
        share >= 25.0 - allowance,
        "share {share:.1}% (CPU-starved {:.1}% of the run)",
        100.0 * starved
    );
    let reported: f64 = o
        .summary
        .split("compute ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no compute share in {}", o.summary));
    assert!(
        reported <= 36.0 && reported >= 24.0 - allowance,
        "{} (CPU-starved {:.1}%)",
        o.summary,
        100.0 * starved
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn exit_codes_and_signals_come_back() {
    let d = scratch("exit");
    let a = common::artifacts();
    let base = |cmd: &str| {
        vec![
            "hami-run".to_owned(),
            "--lib".into(),
            a.vgpu.display().to_string(),
            "--state-dir".into(),
            d.join("state").display().to_string(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            cmd.into(),
        ]
    };
    let o = run::run(&Cli::try_parse_from(base("exit 7")).unwrap().run).unwrap();
    assert_eq!(o.code, 7);
    let o = run::run(&Cli::try_parse_from(base("kill -9 $$")).unwrap().run).unwrap();
    assert_eq!(o.code, 128 + 9);
    assert!(
        o.summary.contains("compute unmeasured (no quota)"),
        "{}",
        o.summary
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let cli = Cli::try_parse_from(["hami-run", "--lib", "/nonexistent/libvgpu.so", "--", "true"])
        .unwrap();
    let e = run::run(&cli.run).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/libvgpu.so: no such file"), "{e}");
    assert!(Cli::try_parse_from(["hami-run", "--gpucores", "0", "--", "true"]).is_err());
    assert!(
        Cli::try_parse_from(["hami-run", "--gpumem", "1G"]).is_err(),
        "a command is required"
    );
    let cli = Cli::try_parse_from([
        "hami-run", "--gpumem", "1G", "python", "train.py", "--lr", "1",
    ])
    .unwrap();
    assert_eq!(
        cli.run.command,
        ["python", "train.py", "--lr", "1"],
        "`--` is optional"
    );
    assert_eq!(cli.run.gpumem.as_deref(), Some("1G"));
}

/// `p` relative to this test's working directory (`../..` and so on).
fn relative_to_cwd(p: &Path) -> std::path::PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let (a, b): (Vec<_>, Vec<_>) = (cwd.components().collect(), p.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut r = std::path::PathBuf::new();
    for _ in common..a.len() {
        r.push("..");
    }
    for c in &b[common..] {
        r.push(c);
    }
    r
}

#[test]
fn a_command_that_changes_directory_still_loads_the_simulation_and_is_limited() {
    // Every path given to `hami run` is relative; the command goes to `/`
    // before it loads libcuda.so.1 and libnvidia-ml.so.1 by name.
    let d = scratch("cd");
    let a = common::artifacts();
    let out = d.join("probe.out");
    let script = format!(
        "cd / && {} init alloc 700m alloc 400m nvml-mem 0 > {}",
        a.probe.display(),
        out.display()
    );
    let rel = |p: &Path| relative_to_cwd(p).display().to_string();
    let lib = rel(&a.vgpu);
    assert!(!lib.starts_with('/'), "{lib}");
    let cli = Cli::try_parse_from([
        "hami-run",
        "--gpumem",
        "1G",
        "--lib",
        &lib,
        "--sim",
        "--sim-lib",
        &rel(&a.sim),
        "--sim-devices",
        "8g 80 GPU-cd Sim",
        "--state-dir",
        &rel(&d.join("state")),
        "--",
        "sh",
        "-c",
        &script,
    ])
    .unwrap();
    let o = run::run(&cli.run).unwrap();
    let out = std::fs::read_to_string(out).unwrap_or_default();
    assert_eq!(o.code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "init 0", "{out}");
    assert_eq!(lines[1], "alloc 0 0");
    assert_eq!(lines[2], "alloc 2 0", "over the 1 GiB limit");
    assert_eq!(
        lines[3],
        format!(
            "nvml-mem 0 {} {} {}",
            1u64 << 30,
            (1024 - 700u64) << 20,
            700u64 << 20
        ),
        "NVML shows the limit as the card's total"
    );
    assert!(
        o.summary.contains("peak 0.68 GiB of 1.00 GiB"),
        "{}",
        o.summary
    );
    std::fs::remove_dir_all(&d).unwrap();
}
