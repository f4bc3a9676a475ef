//! The pipeline engine: recipe TOML -> typed stages -> DAG -> scheduler ->
//! content-addressed cache. It knows nothing about medicine or any stage kind.

pub mod recipe;


pub mod canonical;
pub mod cli;
pub mod dag;
pub mod env;
pub mod executor;
pub mod index;
pub mod jobspec;
pub mod key;
pub mod plan;
pub mod progress;
pub mod provenance;
pub mod ranks;
pub mod schedule;
pub mod slurm;
pub mod stage_log;
pub mod stage_run;
pub mod workspace;

pub use cli::{Command, execute, exit_code_for};
pub use env::EngineEnv;
