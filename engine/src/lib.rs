//! The pipeline engine: recipe TOML -> typed stages -> DAG -> scheduler ->
//! content-addressed cache. It knows nothing about medicine or any stage kind.

pub mod backend;
pub mod cli;
pub mod env;
pub mod index;
pub mod jobspec;
pub mod plan;
pub mod provenance;
pub mod recipe;
pub mod run;
pub mod stage_log;
pub mod workspace;

pub use cli::{Command, execute, exit_code_for};
pub use env::EngineEnv;
