//! Qwen2.5-VL on tch (libtorch).
