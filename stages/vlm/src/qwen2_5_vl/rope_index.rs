//! 3D (temporal, height, width) position ids for multimodal RoPE: HF
//! `Qwen2_5_VLModel.get_rope_index`
//! ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py))
//! and `Qwen2VLModel.get_rope_index`
//! ([modeling_qwen2_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_vl/modeling_qwen2_vl.py))
//! for images (videos are not supported). The two differ only in the
//! temporal index of a grid's frames: Qwen2-VL counts them (`arange(t)`),
//! Qwen2.5-VL scales that by `second_per_grid_t * tokens_per_second`, which
//! is 0 for images. Processed images have one frame (t = 1), where both agree.

/// Position ids for one batch: `ids[axis][row][col]`, plus the per-row delta
/// (max position + 1 - padded length) that continues positions when decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    pub ids: [Vec<Vec<i64>>; 3],
    pub deltas: Vec<i64>,
}

/// Compute positions. Text tokens advance all three axes together; the
/// `t*h*w/merge^2` image pad tokens after each `<|vision_start|><|image_pad|>`
/// get (t, row, col) offsets from the position after the preceding text.
/// Padding positions (mask 0) get 1, as in HF.
///
/// `grids` are the images' (t, h, w) patch grids in order of appearance.
/// `frame_step` is the temporal position step between an image grid's
/// frames: 0 for Qwen2.5-VL, 1 for Qwen2-VL (see the module docs).
pub fn rope_index(
    input_ids: &[Vec<i64>],
    attention_mask: &[Vec<i64>],
    grids: &[[i64; 3]],
    image_token_id: i64,
    vision_start_token_id: i64,
    merge: i64,
    frame_step: i64,
) -> Result<RopeIndex, String> {
    let rows = input_ids.len();
    let mut ids: [Vec<Vec<i64>>; 3] = Default::default();
    let mut deltas = Vec::with_capacity(rows);
    let mut image = 0usize;
    for (r, (row, mask)) in input_ids.iter().zip(attention_mask).enumerate() {
        let len = row.len();
        let tokens: Vec<i64> = row.iter().zip(mask).filter(|(_, m)| **m == 1).map(|(t, _)| *t).collect();
        let n_images = tokens.windows(2).filter(|w| w[0] == vision_start_token_id && w[1] == image_token_id).count();
        let mut pos: [Vec<i64>; 3] = Default::default();
        let mut next = 0i64; // max position so far + 1
        let mut st = 0usize;
        for _ in 0..n_images {
            let ed = tokens[st..]
                .iter()
                .position(|&t| t == image_token_id)
                .map(|p| p + st)
                .ok_or_else(|| format!("row {r}: vision start without image pad"))?;
            let [t, h, w] = *grids.get(image).ok_or_else(|| {
                format!("row {r}: more images in input_ids than image_grid_thw entries ({})", grids.len())
            })?;
            image += 1;
            let (gh, gw) = (h / merge, w / merge);
            for i in 0..(ed - st) as i64 {
                for p in &mut pos {
                    p.push(next + i);
                }
            }
            let base = next + (ed - st) as i64;
            for f in 0..t {
                for y in 0..gh {
                    for x in 0..gw {
                        pos[0].push(base + f * frame_step);
                        pos[1].push(base + y);
                        pos[2].push(base + x);
                    }
                }
            }
            // HF: the next text starts at the largest position so far + 1.
            next = base + ((t - 1) * frame_step + 1).max(gh).max(gw);
            st = ed + (t * gh * gw) as usize;
        }
        if st < tokens.len() {
            for i in 0..(tokens.len() - st) as i64 {
                for p in &mut pos {
                    p.push(next + i);
                }
            }
            next += (tokens.len() - st) as i64;
        }
        if pos[0].len() != tokens.len() {
            return Err(format!(
                "row {r}: image pad tokens do not match image_grid_thw ({} positions for {} tokens)",
                pos[0].len(),
                tokens.len()
            ));
        }
        for (axis, p) in pos.iter().enumerate() {
            let mut full = vec![1i64; len];
            let mut it = p.iter();
            for (c, m) in mask.iter().enumerate() {
                if *m == 1 {
                    full[c] = *it.next().unwrap_or(&1);
                }
            }
            ids[axis].push(full);
        }
        deltas.push(next - len as i64);
    }
    if image != grids.len() {
        return Err(format!("input_ids hold {image} images but image_grid_thw has {} entries", grids.len()));
    }
    Ok(RopeIndex { ids, deltas })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_then_image_then_text_with_left_padding() {
        // pad, a, <vs>, img x (2x3 merged), <ve>, b
        let (vs, img) = (10, 11);
        let row = vec![0, 5, vs, img, img, img, img, img, img, 12, 6];
        let mask = vec![0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        for frame_step in [0, 1] {
            let r = rope_index(
                std::slice::from_ref(&row),
                std::slice::from_ref(&mask),
                &[[1, 4, 6]],
                img,
                vs,
                2,
                frame_step,
            )
            .unwrap();
            assert_eq!(r.ids[0][0], vec![1, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
            assert_eq!(r.ids[1][0], vec![1, 0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
            assert_eq!(r.ids[2][0], vec![1, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
            assert_eq!(r.deltas, vec![7 - 11]);
        }
    }

    #[test]
    fn frames_of_a_grid_advance_time_only_for_qwen2_vl() {
        // <vs>, a 3-frame 2x2-patch grid (1x1 merged per frame), b.
        let (vs, img) = (10, 11);
        let row = vec![vs, img, img, img, 6];
        let mask = vec![1; 5];
        // Qwen2-VL: t = arange(3); the text after starts at max + 1 = 1 + 2 + 1.
        let r =
            rope_index(std::slice::from_ref(&row), std::slice::from_ref(&mask), &[[3, 2, 2]], img, vs, 2, 1).unwrap();
        assert_eq!(r.ids[0][0], vec![0, 1, 2, 3, 4]);
        assert_eq!(r.ids[1][0], vec![0, 1, 1, 1, 4]);
        // Qwen2.5-VL images: no time, every frame at t = 1.
        let r = rope_index(&[row], &[mask], &[[3, 2, 2]], img, vs, 2, 0).unwrap();
        assert_eq!(r.ids[0][0], vec![0, 1, 1, 1, 2]);
    }

    #[test]
    fn mismatched_grid_is_an_error() {
        let e = rope_index(&[vec![10, 11, 11]], &[vec![1, 1, 1]], &[[1, 4, 4]], 11, 10, 2, 0).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
        let e = rope_index(&[vec![10, 11]], &[vec![1, 1]], &[], 11, 10, 2, 0).unwrap_err();
        assert!(e.contains("more images"), "{e}");
    }
}
