//! Evaluation, consistency judge and report stages.
