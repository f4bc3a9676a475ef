//! The Qwen2-VL image processor (HF `Qwen2VLImageProcessor`, also used by
//! Qwen2.5-VL): `smart_resize` to multiples of 28 within min/max pixels,
//! Pillow-exact bicubic resize (both from the tch-free `stages-vlm-resize`
//! crate, re-exported here), rescale + CLIP normalisation, and patchify to
//! (t*h*w, 3*2*14*14) in transformers' element order.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::Tensor;

use stages_vlm_resize::resize_bicubic_rgb;
pub use stages_vlm_resize::{SmartResizeError, smart_resize};

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
    #[error("image {width}x{height}: {message}")]
    Image { width: usize, height: usize, message: String },
}

/// The image processor settings file of a checkpoint.
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// Settings of `preprocessor_config.json` that change the output.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessor {
    /// The Qwen2.5-VL release defaults.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

/// Processed images of one batch.
pub struct ProcessedImages {
    /// (sum of t*h*w, channels * temporal * patch * patch) f32.
    pub pixel_values: Tensor,
    /// (t, h, w) in patches, per image.
    pub grid_thw: Vec<[i64; 3]>,
}

impl ProcessedImages {
    /// Image pad tokens each image occupies in the prompt.
    pub fn tokens_per_image(&self, merge_size: usize) -> Vec<usize> {
        self.grid_thw.iter().map(|g| (g[0] * g[1] * g[2]) as usize / (merge_size * merge_size)).collect()
    }
}

impl ImageProcessor {
    /// The processor of a checkpoint directory: its `preprocessor_config.json`,
    /// or the release defaults when it has none (text-only checkpoints).
    pub fn from_checkpoint(dir: &Path) -> Result<Self, ProcessorError> {
        let path = dir.join(PREPROCESSOR_CONFIG);
        if path.exists() { Self::from_file(&path) } else { Ok(Self::default()) }
    }

    /// Read `preprocessor_config.json`; absent keys keep the release defaults.
    pub fn from_file(path: &Path) -> Result<Self, ProcessorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProcessorError::File { path: path.into(), message: e.to_string() })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ProcessorError::File { path: path.into(), message: format!("not valid JSON: {e}") })?;
        let field = |f: &str, m: &str| ProcessorError::Field { path: path.into(), field: f.into(), message: m.into() };
        let uint = |f: &str, default: usize| -> Result<usize, ProcessorError> {
            match v.get(f) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| field(f, "expected a non-negative integer")),
            }
        };
        let triple = |f: &str, default: [f32; 3]| -> Result<[f32; 3], ProcessorError> {
            match v.get(f) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(|| field(f, "expected 3 numbers"))? as f32;
                    }
                    Ok(out)
                }
                Some(_) => Err(field(f, "expected 3 numbers")),
            }
        };
        let d = Self::default();
        if let Some(r) = v.get("resample").and_then(Value::as_i64)
            && r != 3
        {
            return Err(field("resample", "only 3 (bicubic) is supported"));
        }
        for flag in ["do_resize", "do_rescale", "do_normalize", "do_convert_rgb"] {
            if v.get(flag).and_then(Value::as_bool) == Some(false) {
                return Err(field(flag, "only true is supported"));
            }
        }
        // `size.shortest_edge/longest_edge` is the newer spelling of min/max pixels.
        let size = v.get("size");
        let min_default = size.and_then(|s| s.get("shortest_edge")).and_then(Value::as_u64).map(|x| x as usize);
        let max_default = size.and_then(|s| s.get("longest_edge")).and_then(Value::as_u64).map(|x| x as usize);
        let p = Self {
            min_pixels: uint("min_pixels", min_default.unwrap_or(d.min_pixels))?,
            max_pixels: uint("max_pixels", max_default.unwrap_or(d.max_pixels))?,
            patch_size: uint("patch_size", d.patch_size)?,
            merge_size: uint("merge_size", d.merge_size)?,
            temporal_patch_size: uint("temporal_patch_size", d.temporal_patch_size)?,
            rescale_factor: match v.get("rescale_factor") {
                None | Some(Value::Null) => d.rescale_factor,
                Some(x) => x.as_f64().ok_or_else(|| field("rescale_factor", "expected a number"))?,
            },
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
        };
        if p.patch_size == 0 || p.merge_size == 0 || p.temporal_patch_size == 0 {
            return Err(field("patch_size", "patch_size, merge_size and temporal_patch_size must be positive"));
        }
        if p.min_pixels > p.max_pixels {
            return Err(field("min_pixels", "must not exceed max_pixels"));
        }
        Ok(p)
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": self.image_mean, "image_std": self.image_std,
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "merge_size": self.merge_size, "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "resample": 3, "rescale_factor": self.rescale_factor,
        })
    }

    /// Patchify one RGB image: returns rows of `3 * temporal * patch^2` values.
    pub fn process_rgb(&self, rgb: &[u8], width: usize, height: usize) -> Result<(Vec<f32>, [i64; 3]), ProcessorError> {
        let img_err = |m: String| ProcessorError::Image { width, height, message: m };
        if rgb.len() != width * height * 3 {
            return Err(img_err(format!("expected {} RGB bytes, got {}", width * height * 3, rgb.len())));
        }
        let factor = self.patch_size * self.merge_size;
        let (rh, rw) = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
            .map_err(|e| img_err(e.to_string()))?;
        let resized = resize_bicubic_rgb(rgb, width, height, rw, rh);
        // rescale in f64 then cast (numpy `astype(float64) * scale`), normalise in f32.
        let norm: Vec<f32> = resized
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = i % 3;
                let x = (v as f64 * self.rescale_factor) as f32;
                (x - self.image_mean[c]) / self.image_std[c]
            })
            .collect();
        let (ps, ms, tps) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (rh / ps, rw / ps);
        let row_len = 3 * tps * ps * ps;
        let mut out = Vec::with_capacity(gh * gw * row_len);
        // Row order (block row, block col, row in block, col in block);
        // within a row: channel, temporal copy (a still image is repeated), y, x.
        for bh in 0..gh / ms {
            for bw in 0..gw / ms {
                for mh in 0..ms {
                    for mw in 0..ms {
                        let (y0, x0) = ((bh * ms + mh) * ps, (bw * ms + mw) * ps);
                        for c in 0..3 {
                            for _ in 0..tps {
                                for py in 0..ps {
                                    for px in 0..ps {
                                        out.push(norm[((y0 + py) * rw + x0 + px) * 3 + c]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok((out, [1, gh as i64, gw as i64]))
    }

    /// Process decoded images (any colour type; converted to RGB like PIL).
    pub fn process(&self, images: &[image::DynamicImage]) -> Result<ProcessedImages, ProcessorError> {
        let mut values = Vec::new();
        let mut grid_thw = Vec::new();
        for img in images {
            let rgb = img.to_rgb8();
            let (w, h) = rgb.dimensions();
            let (v, g) = self.process_rgb(rgb.as_raw(), w as usize, h as usize)?;
            values.extend(v);
            grid_thw.push(g);
        }
        let row_len = (3 * self.temporal_patch_size * self.patch_size * self.patch_size) as i64;
        let pixel_values = Tensor::from_slice(&values).view([-1, row_len]);
        Ok(ProcessedImages { pixel_values, grid_thw })
    }
}

/// Decode an image file (PNG or JPEG).
pub fn open_image(path: &Path) -> Result<image::DynamicImage, ProcessorError> {
    image::open(path)
        .map_err(|e| ProcessorError::File { path: path.into(), message: format!("cannot decode image: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_rows_follow_hf_order() {
        let p = ImageProcessor {
            min_pixels: 1,
            max_pixels: 1 << 30,
            rescale_factor: 1.0,
            image_mean: [0.0; 3],
            image_std: [1.0; 3],
            ..Default::default()
        };
        // 56x28 image whose red channel encodes x, green encodes y.
        let (w, h) = (56usize, 28usize);
        let mut rgb = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                rgb[(y * w + x) * 3] = x as u8;
                rgb[(y * w + x) * 3 + 1] = y as u8;
            }
        }
        let (v, g) = p.process_rgb(&rgb, w, h).unwrap();
        assert_eq!(g, [1, 2, 4]);
        assert_eq!(v.len(), 8 * 1176);
        // Row 1 = block (0,0), in-block (0,1): patch at x 14..28, y 0..14.
        let row1 = &v[1176..2 * 1176];
        assert_eq!(row1[0], 14.0); // red, t0, py0, px0
        assert_eq!(row1[196], 14.0); // red, t1 (repeated frame)
        assert_eq!(row1[392 + 15], 1.0); // green, t0, py1, px1
        // Row 4 = block (0,1), in-block (0,0): x starts at 28.
        assert_eq!(v[4 * 1176], 28.0);
    }

    #[test]
    fn preprocessor_config_reads_size_and_rejects_unsupported_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");
        std::fs::write(&path, r#"{"size": {"shortest_edge": 3136, "longest_edge": 401408}, "resample": 3}"#).unwrap();
        let p = ImageProcessor::from_file(&path).unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (3136, 401_408));
        std::fs::write(&path, r#"{"resample": 2}"#).unwrap();
        let e = ImageProcessor::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("preprocessor_config.json") && e.contains("`resample`"), "{e}");
        std::fs::write(&path, r#"{"image_mean": [0.5, 0.5]}"#).unwrap();
        let e = ImageProcessor::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("`image_mean`") && e.contains("3 numbers"), "{e}");
    }
}
