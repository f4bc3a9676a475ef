//! 3D (temporal, height, width) position ids for multimodal RoPE: HF
//! `Qwen2_5_VLModel.get_rope_index`
//! ([modeling_qwen2_5_vl.py](https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py))
//! for images (videos are not supported).

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
pub fn rope_index(
    input_ids: &[Vec<i64>],
    attention_mask: &[Vec<i64>],
    grids: &[[i64; 3]],
    image_token_id: i64,
    vision_start_token_id: i64,
    merge: i64,
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
            // Images have no time axis: the temporal offset is 0 for every frame.
            for _ in 0..t {
                for y in 0..gh {
                    for x in 0..gw {
                        pos[0].push(base);
                        pos[1].push(base + y);
                        pos[2].push(base + x);
                    }
                }
            }
            next = base + gh.max(gw).max(1);
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
        let r = rope_index(&[row], &[mask], &[[1, 4, 6]], img, vs, 2).unwrap();
        assert_eq!(r.ids[0][0], vec![1, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(r.ids[1][0], vec![1, 0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(r.ids[2][0], vec![1, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(r.deltas, vec![7 - 11]);
    }

    #[test]
    fn mismatched_grid_is_an_error() {
        let e = rope_index(&[vec![10, 11, 11]], &[vec![1, 1, 1]], &[[1, 4, 4]], 11, 10, 2).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
        let e = rope_index(&[vec![10, 11]], &[vec![1, 1]], &[], 11, 10, 2).unwrap_err();
        assert!(e.contains("more images"), "{e}");
    }
}
