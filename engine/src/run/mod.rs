//! Running a plan.

pub mod progress;
pub mod ranks;
pub mod resources;
pub mod scheduler;
pub mod stage_run;
