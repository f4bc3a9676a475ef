//! The output size of the Qwen2-VL image processor.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SmartResizeError {
    #[error("image has zero size")]
    ZeroSize,
    #[error("aspect ratio must be at most 200, got {0}")]
    AspectRatio(f64),
}

/// transformers' `smart_resize`
/// ([image_processing_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/image_processing_qwen2_vl.py)):
/// `(height, width)` rounded to the nearest multiples of `factor` (Python
/// banker's rounding), then scaled down/up, aspect ratio kept, to stay within
/// [`min_pixels`, `max_pixels`]. Aspect ratios over 200 are errors, as in HF.
///
/// Not qwen-vl-utils' variant, which first raises a side that rounds to 0
/// (at most `factor / 2`) to `factor`: for 14 x 500 it gives 28 x 504 where
/// transformers gives 28 x 336.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), SmartResizeError> {
    if height == 0 || width == 0 {
        return Err(SmartResizeError::ZeroSize);
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(SmartResizeError::AspectRatio(h.max(w) / h.min(w)));
    }
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as usize, wb as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        // Values from transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize.
        assert_eq!(smart_resize(121, 173, 28, 3136, 15680), Ok((84, 140)));
        assert_eq!(smart_resize(40, 50, 28, 3136, 15680), Ok((56, 84)));
        // 70 / 28 = 2.5 rounds to even (2), like Python's round().
        assert_eq!(smart_resize(70, 126, 28, 56, 1_000_000), Ok((56, 112)));
        assert_eq!(smart_resize(1, 300, 28, 56, 1000), Err(SmartResizeError::AspectRatio(300.0)));
        assert_eq!(smart_resize(0, 30, 28, 56, 1000), Err(SmartResizeError::ZeroSize));
        // The render stage's bounds (3136..=401,408 pixels).
        for ((h, w), want) in [
            ((512, 512), (504, 504)),
            ((1000, 1000), (616, 616)),
            ((160, 160), (168, 168)),
            ((10, 10), (56, 56)),
            ((100, 100), (112, 112)),
            ((96, 128), (84, 140)),
            ((512, 700), (504, 700)),
            ((42, 42), (56, 56)), // 1.5 rounds half to even -> 2
            // A side <= 14 rounds to 0 before the area check (qwen-vl-utils'
            // variant would give (28, 504) and (28, 1988)).
            ((14, 500), (28, 336)),
            ((10, 2000), (28, 812)),
        ] {
            assert_eq!(smart_resize(h, w, 28, 3136, 401_408), Ok(want), "{h}x{w}");
        }
    }
}
