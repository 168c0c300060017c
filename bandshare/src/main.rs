//! `bandshare`: the one binary. It parses flags (`cli/mod.rs`) and calls
//! the crates' `run` functions (`cli/run.rs`; `bench.rs` with the default
//! `bench` feature); the demo (`demo.rs`) runs on `bandshare-local`.

/// `println!` that does not panic when stdout is closed early
/// (`bandshare offers … | head -1`): what cannot be written is dropped and
/// the command ends as it would have.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

#[cfg(feature = "bench")]
mod bench;
mod cli;
mod demo;
mod render;

use clap::Parser;
use std::process::ExitCode;

/// mimalloc instead of the system allocator: the coordinator allocates a
/// little per request and per state report, from every core at once, and
/// glibc's malloc spent about a quarter of its time under that load.
/// Built without transparent huge pages (feature `no_thp`): with them,
/// share requests under load were faster still but each online sharer
/// cost 24 KiB instead of 16 (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One clear line, not clap's usage block.
            let text = e.render().to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("error: bad arguments");
            eprintln!("{line} (see --help)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
