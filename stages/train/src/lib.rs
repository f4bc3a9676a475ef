//! Training stages: SFT and GRPO.
