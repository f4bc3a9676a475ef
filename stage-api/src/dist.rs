//! What a data-parallel stage needs from the engine besides its rank: the
//! rendezvous conventions shared by the launcher (engine) and the ranks'
//! collectives (stage crates), so neither reaches into the other.

use std::path::PathBuf;

/// This process's place in a data-parallel stage run: one of `world_size`
/// processes running the same stage (see [`StageKind::DISTRIBUTED`](crate::StageKind::DISTRIBUTED)).
/// The engine launches the ranks; the stage brings its own collectives and
/// meets its peers through `rendezvous`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistInfo {
    pub rank: usize,
    pub world_size: usize,
    /// A directory every rank sees (a shared filesystem across hosts), unique
    /// to this attempt at the stage: rank 0 publishes its address there.
    pub rendezvous: PathBuf,
    /// The stage's cache key: a rank refuses peers that run another stage.
    pub token: String,
}

/// Name of the file rank 0 leaves in the rendezvous directory when it will
/// not run the stage (its outputs were published meanwhile): peers started
/// next to it (`srun`) then exit instead of waiting for it.
pub const RENDEZVOUS_ABANDONED: &str = "abandoned";

/// This machine's host name (recorded in provenance; published by rank 0 in
/// the rendezvous directory so peers on other hosts can reach it).
pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}
