//! Bicubic resize of 8-bit RGB images, bit-exact with Pillow's
//! `Image.resize(size, Image.BICUBIC)` (libImaging/Resample.c), which is what
//! transformers' `Qwen2VLImageProcessor` uses. Separable: a horizontal pass
//! into an 8-bit buffer, then a vertical pass, each with fixed-point weights
//! (22 fractional bits) and the support widened by the scale when shrinking.

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, tap count, fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C truncation toward zero, then clamping, as in Pillow.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resize packed RGB (`width * height * 3` bytes) to `out_w x out_h`.
pub fn resize_bicubic_rgb(src: &[u8], width: usize, height: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    if width == out_w && height == out_h {
        return src.to_vec();
    }
    let vert = coeffs(height, out_h);
    // Only the input rows the vertical pass reads are resampled horizontally.
    let first = vert.bounds.first().map(|b| b.0).unwrap_or(0);
    let last = vert.bounds.last().map(|b| b.0 + b.1).unwrap_or(height);
    let (tmp, tmp_w, tmp_rows, row0) = if width != out_w {
        let horiz = coeffs(width, out_w);
        let rows = last - first;
        let mut tmp = vec![0u8; out_w * rows * 3];
        for y in 0..rows {
            let row = &src[(y + first) * width * 3..(y + first + 1) * width * 3];
            for xx in 0..out_w {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &w) in k.iter().enumerate() {
                    let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        ss[c] += p[c] as i32 * w;
                    }
                }
                for c in 0..3 {
                    tmp[(y * out_w + xx) * 3 + c] = clip8(ss[c]);
                }
            }
        }
        (tmp, out_w, rows, first)
    } else {
        (src.to_vec(), width, height, 0)
    };
    if height == out_h {
        return tmp;
    }
    let _ = tmp_rows;
    let mut out = vec![0u8; out_w * out_h * 3];
    for yy in 0..out_h {
        let (ymin, n) = vert.bounds[yy];
        let ymin = ymin - row0;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        for xx in 0..tmp_w {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &w) in k.iter().enumerate() {
                let p = &tmp[((ymin + y) * tmp_w + xx) * 3..((ymin + y) * tmp_w + xx) * 3 + 3];
                for c in 0..3 {
                    ss[c] += p[c] as i32 * w;
                }
            }
            for c in 0..3 {
                out[(yy * out_w + xx) * 3 + c] = clip8(ss[c]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant_and_weights_sum_to_one() {
        let src = vec![77u8; 13 * 9 * 3];
        for (w, h) in [(5, 4), (28, 20), (13, 30)] {
            let out = resize_bicubic_rgb(&src, 13, 9, w, h);
            assert_eq!(out.len(), w * h * 3);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
        let c = coeffs(100, 28);
        for (i, (_, n)) in c.bounds.iter().enumerate() {
            let s: i64 = c.weights[i * c.ksize..i * c.ksize + n].iter().map(|&w| w as i64).sum();
            assert!((s - (1 << PRECISION_BITS)).abs() <= *n as i64, "row {i}: {s}");
        }
    }

    #[test]
    fn known_pillow_values() {
        // Pillow 12: Image.frombytes("RGB", (4, 1), bytes([0,0,0, 255,255,255]*2)).resize((2, 1), BICUBIC)
        // gives [(107, 107, 107), (148, 148, 148)] (run once with Pillow 12.0).
        let src: Vec<u8> = [0u8, 0, 0, 255, 255, 255].repeat(2);
        let out = resize_bicubic_rgb(&src, 4, 1, 2, 1);
        assert_eq!(out, vec![107, 107, 107, 148, 148, 148]);
    }
}
