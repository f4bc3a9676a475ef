//! Where stages run.

pub mod slurm;
