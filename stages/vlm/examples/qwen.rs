//! `pipeline model ...` without the whole pipeline binary (benchmarks, quick
//! checks): `cargo run --release -p stages-vlm --example qwen -- generate ...`,
//! plus `init --out DIR [--corpus DIR]` to run the `init_model` stage once.

use std::path::PathBuf;

use clap::Parser;
use pipeline_engine::{StageContext, StageKind};
use stages_vlm::init_model::{InitModel, InitModelParams};

#[derive(Parser)]
enum Cli {
    #[command(flatten)]
    Model(stages_vlm::ModelCommand),
    /// Run the init_model stage with default params into DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        corpus: Option<PathBuf>,
        #[arg(long, default_value_t = 17)]
        seed: u64,
    },
}

/// Make CUDA kernels available when a CUDA libtorch of the same version is on
/// LD_LIBRARY_PATH (as the `pipeline` binary does; see src/torch_runtime.rs).
fn load_cuda_backend() {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: only registers CUDA kernels with the already-loaded libtorch.
    if let Ok(lib) = unsafe { Library::open(Some("libtorch_cuda.so"), RTLD_NOW | RTLD_GLOBAL) } {
        std::mem::forget(lib);
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    load_cuda_backend();
    match Cli::parse() {
        Cli::Model(cmd) => stages_vlm::model_main(&cmd),
        Cli::Init { out, corpus, seed } => {
            let mut b = StageContext::builder("init_model", &out).seed(seed);
            if let Some(c) = &corpus {
                b = b.input("corpus", "corpus", None, c);
            }
            InitModel::run(&InitModelParams::default(), &mut b.build()?)
        }
    }
}
