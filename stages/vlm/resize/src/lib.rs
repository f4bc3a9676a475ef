//! How the Qwen2-VL image processor (HF `Qwen2VLImageProcessor`, also used
//! by Qwen2.5-VL) resizes an image: [`smart_resize`] picks the size,
//! [`resize_bicubic_rgb`] the pixels.
//!
//! Part of `stages-vlm` (whose `processor` module re-exports it), in a crate
//! of its own because it needs no tch: the `render` data stage sizes its
//! images with the same [`smart_resize`] without linking libtorch into every
//! data test binary.

mod bicubic;
mod smart_resize;

pub use bicubic::resize_bicubic_rgb;
pub use smart_resize::{SmartResizeError, smart_resize};
