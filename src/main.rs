//! `pipeline`: parse the command line, set up logging, hand over to the
//! engine (or to the model tools). Exit codes: 0 ok, 1 failure, 2 usage or
//! recipe error, 130 interrupted.

mod cli;
mod doctor;
mod registry;
mod torch_runtime;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, filter::LevelFilter};

#[derive(Debug, Parser)]
#[command(name = "pipeline", version, about = "Recipe-driven, cached pipeline reproducing MedReason-R1")]
struct Cli {
    /// More log output (-v: debug, -vv: trace). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors; no per-stage progress lines.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    #[command(flatten)]
    Engine(cli::args::Command),
    /// Model tools: generate, convert, bench (Qwen2.5-VL on tch).
    #[command(subcommand)]
    Model(cli::model::ModelCommand),
    /// Show a NIfTI-1/NIfTI-2 file's header, orientation and value statistics.
    Inspect(cli::inspect::InspectArgs),
    /// Compare runs side by side: one report.html / report.md from the evals,
    /// judges and training curves of several runs (runs/<time>-<recipe>/).
    Report(cli::report_compare::ReportArgs),
    /// Check libtorch and every CUDA device with a small forward/backward pass.
    Doctor,
}

fn init_tracing(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => LevelFilter::WARN,
        (false, 0) => LevelFilter::INFO,
        (false, 1) => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let filter = EnvFilter::builder().with_default_directive(level.into()).from_env_lossy();
    // What stages log goes to their log files; the console shows it only
    // with -v (warnings and errors always).
    let show_stage_info = verbose > 0;
    let not_stage_chatter = tracing_subscriber::filter::dynamic_filter_fn(move |meta, cx| {
        show_stage_info
            || *meta.level() <= tracing::Level::WARN
            || !cx
                .lookup_current()
                .is_some_and(|span| span.scope().any(|s| s.name() == pipeline_engine::stage_log::STAGE_SPAN))
    });
    let console = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter)
        .with_filter(not_stage_chatter);
    // Stage log files get info and above whatever the console shows.
    let stage_logs = pipeline_engine::stage_log::StageLogLayer::global().with_filter(LevelFilter::INFO);
    let _ = tracing_subscriber::registry().with(console).with(stage_logs).try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    // Before libtorch computes anything (and before the CUDA backend starts
    // its threads): the recipe's numerics mode pins the kernels it picks.
    if let Commands::Engine(cmd) = &cli.command
        && let Err(err) = cli::numerics::pin_process(cmd, &registry::registry())
    {
        eprintln!("error: {err:#}");
        return ExitCode::from(cli::exit::exit_code_for(&err));
    }
    // A CUDA libtorch on the library path makes GPUs usable by this CPU-linked binary.
    match torch_runtime::load_cuda_backend() {
        Ok(lib) => tracing::debug!("loaded CUDA backend {lib}"),
        Err(why) => tracing::debug!("no CUDA backend: {why}"),
    }
    let result = match cli.command {
        Commands::Engine(cmd) => {
            let cuda = tch::Cuda::device_count().max(0) as usize;
            let mut env = pipeline_engine::EngineEnv::detect(cuda);
            // What `plan` checks GPU stages against when the recipe declares no `gpu_memory_gb`.
            env.gpu_memory_mb = if cuda > 0 { torch_runtime::cuda_device_memory_mb() } else { None };
            cli::execute(cmd, &registry::registry(), &env, cli.quiet)
        }
        Commands::Model(cmd) => cli::model::model_main(&cmd).map(|()| ExitCode::SUCCESS),
        Commands::Inspect(args) => cli::inspect::inspect(&args).map(|()| ExitCode::SUCCESS),
        Commands::Report(args) => cli::report_compare::report_main(&args).map(|()| ExitCode::SUCCESS),
        Commands::Doctor => doctor::doctor().map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // Recipe errors render themselves rustc-style, "error:" included.
            let text = err.to_string();
            if text.starts_with("error:") {
                eprintln!("{text}");
            } else {
                eprintln!("error: {text}");
            }
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(cli::exit::exit_code_for(&err))
        }
    }
}
