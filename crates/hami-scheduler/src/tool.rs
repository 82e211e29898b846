//! The `main` of the chart's one-shot hook tools (`hami-certgen`,
//! `hami-uninstall`): one current-thread runtime, the error on stderr and
//! a failing exit code, which fails the hook Job.

use std::future::Future;
use std::process::ExitCode;

/// Runs `work` to completion; `name` prefixes the error.
pub fn main(name: &str, work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
