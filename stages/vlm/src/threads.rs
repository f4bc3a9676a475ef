//! libtorch's intra-op thread count for the duration of a stage.

/// Sets libtorch's intra-op threads to the stage's share
/// ([`stage_api::StageContext::threads`]: the cores granted, or the recipe's
/// `numerics_threads` in reproducible mode) for its lifetime. Full
/// reductions and, unless MKL is strict, SGEMM sum in thread-count-dependent
/// order, so a libtorch stage must not run with libtorch's process default.
pub struct ThreadsGuard(i32);

impl ThreadsGuard {
    pub fn set(n: usize) -> Self {
        let prev = tch::get_num_threads();
        tch::set_num_threads(n.max(1) as i32);
        Self(prev)
    }
}

impl Drop for ThreadsGuard {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}
