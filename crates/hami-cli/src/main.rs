//! `hami`: the hami-rs command line. Everything a user needs without a
//! cluster: place pods on a cluster snapshot, simulate a workload over
//! time, explain annotation values.

mod decode;
mod input;
mod report;
mod run;
mod schedule;
mod simulate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hami", version, about = "GPU sharing for Kubernetes: the hami-rs engine on your desk", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place pods on a cluster snapshot and say why every other node was rejected.
    /// Exit 0: all placed; 1: some not placed; 2: bad input.
    Schedule(schedule::ScheduleArgs),
    /// Simulate a workload arriving and leaving over time; compare policies.
    Simulate(simulate::SimulateArgs),
    /// Explain a HAMi annotation value in words.
    Decode(decode::DecodeArgs),
    /// Run a command under GPU limits (memory, compute) on this machine, no Kubernetes.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    // `hami simulate | head` should end quietly as Unix tools do, not panic
    // on a closed pipe (Rust ignores SIGPIPE by default). Children started
    // by `hami run` get the default disposition from std either way.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Schedule(args) => report_input(schedule::execute(args)),
        Command::Simulate(args) => report_input(simulate::execute(args)),
        Command::Decode(args) => decode::execute(args),
        Command::Run(args) => match run::execute(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                2
            }
        },
    };
    ExitCode::from(code as u8)
}

/// Bad input is reported once, here, with exit code 2.
fn report_input(result: Result<i32, input::InputError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}
