//! Small, general stage kinds: importing files, concatenating and
//! checksumming artifacts, and writing text. They carry no domain logic and
//! exercise the engine (DAG, sweeps, cache keys, cancellation, failures) in
//! its integration tests, and are handy glue in real recipes.

mod checksum;
mod concat;
mod files;
mod text;
mod tree;

pub use checksum::{Checksum, ChecksumParams};
pub use concat::{Concat, ConcatParams};
pub use files::{Files, FilesParams};
pub use text::{Text, TextParams};
