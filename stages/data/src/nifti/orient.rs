//! Orientation codes (like `nibabel.aff2axcodes`) and the display-oriented
//! axial slicer.
//!
//! # Display convention
//! Axial slices are shown the radiological way, whatever the stored order:
//! - rows run anterior → posterior (anterior at the top, row 0),
//! - columns run patient right → patient left (patient right on image LEFT),
//! - slice index `k` runs inferior → superior (ascending along S).
//!
//! For the usual CT-RATE storage (LPS: x → left, y → posterior, z →
//! superior) this is the identity: display row = stored y, column = stored
//! x, `k` = stored z, and a slice is a contiguous copy.

use super::affine::nearest_rotation;
use super::error::NiftiError;

/// For each voxel axis: the RAS+ world axis (0 = x/R, 1 = y/A, 2 = z/S) it
/// runs along and whether it runs the positive way. `None` for an axis
/// that is degenerate (zero column). Mirrors `nibabel.io_orientation`.
pub fn io_orientation(affine: &[[f64; 4]; 4]) -> [Option<(usize, bool)>; 3] {
    let mut rs = [[0.0f64; 3]; 3];
    for j in 0..3 {
        let n = (0..3).map(|i| affine[i][j] * affine[i][j]).sum::<f64>().sqrt();
        let n = if n == 0.0 { 1.0 } else { n };
        for i in 0..3 {
            rs[i][j] = affine[i][j] / n;
        }
    }
    let mut r = nearest_rotation(rs);
    let mut out = [None; 3];
    for (in_ax, slot) in out.iter_mut().enumerate() {
        let col = [r[0][in_ax], r[1][in_ax], r[2][in_ax]];
        if col.iter().all(|v| v.abs() <= 1e-8) {
            continue;
        }
        let mut out_ax = 0;
        for i in 1..3 {
            if col[i].abs() > col[out_ax].abs() {
                out_ax = i;
            }
        }
        *slot = Some((out_ax, col[out_ax] > 0.0));
        r[out_ax] = [0.0; 3];
    }
    out
}

/// Axis codes of the voxel axes, e.g. `['L', 'P', 'S']`, like
/// `nibabel.aff2axcodes`; `'?'` for a degenerate axis.
pub fn orientation(affine: &[[f64; 4]; 4]) -> [char; 3] {
    const LABELS: [(char, char); 3] = [('L', 'R'), ('P', 'A'), ('I', 'S')];
    io_orientation(affine).map(|o| match o {
        Some((w, true)) => LABELS[w].1,
        Some((w, false)) => LABELS[w].0,
        None => '?',
    })
}

/// Where the channel axis of a 4D label volume sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelLayout {
    /// `[F, X, Y, Z]` (ReXGroundingCT): channel varies fastest.
    First { channels: usize },
    /// `[X, Y, Z, F]`: one whole 3D volume per channel.
    Last { channels: usize },
}

/// One display axis mapped onto a stored axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AxisMap {
    stored_axis: usize,
    /// Display index runs against the stored index.
    flip: bool,
}

/// Maps a 3D volume in stored (NIfTI, x-fastest) order to display-oriented
/// axial slices; see the module docs for the convention.
#[derive(Debug, Clone, PartialEq)]
pub struct AxialSlicer {
    dims: [usize; 3],
    row: AxisMap,
    col: AxisMap,
    slice: AxisMap,
    spacing: [f64; 3],
}

impl AxialSlicer {
    pub fn new(affine: &[[f64; 4]; 4], dims: [usize; 3]) -> Result<Self, NiftiError> {
        let ornt = io_orientation(affine);
        // world axis -> (stored axis, runs toward R/A/S)
        let mut world: [Option<(usize, bool)>; 3] = [None; 3];
        for (stored_axis, o) in ornt.iter().enumerate() {
            match o {
                Some((w, positive)) => world[*w] = Some((stored_axis, *positive)),
                None => {
                    return Err(NiftiError::Orientation(format!(
                        "voxel axis {stored_axis} has a zero direction in the affine {affine:?}"
                    )));
                }
            }
        }
        let get = |w: usize| {
            world[w].ok_or_else(|| {
                NiftiError::Orientation(format!("no voxel axis runs along world axis {w} in the affine {affine:?}"))
            })
        };
        let (cx, cpos) = get(0)?;
        let (ry, rpos) = get(1)?;
        let (sz, spos) = get(2)?;
        // Columns go toward L (negative R), rows toward P (negative A), slices toward S.
        let col = AxisMap { stored_axis: cx, flip: cpos };
        let row = AxisMap { stored_axis: ry, flip: rpos };
        let slice = AxisMap { stored_axis: sz, flip: !spos };
        let norm = |j: usize| (0..3).map(|i| affine[i][j] * affine[i][j]).sum::<f64>().sqrt();
        let spacing = [norm(row.stored_axis), norm(col.stored_axis), norm(slice.stored_axis)];
        Ok(Self { dims, row, col, slice, spacing })
    }

    pub fn num_slices(&self) -> usize {
        self.dims[self.slice.stored_axis]
    }

    /// `(rows, cols)` of a display slice.
    pub fn slice_dims(&self) -> (usize, usize) {
        (self.dims[self.row.stored_axis], self.dims[self.col.stored_axis])
    }

    /// Voxel spacing in mm along display `[row, col, slice]`.
    pub fn spacing_mm(&self) -> [f64; 3] {
        self.spacing
    }

    /// True when display order equals stored order (LPS storage): slices are
    /// contiguous copies.
    pub fn is_identity(&self) -> bool {
        self.col == AxisMap { stored_axis: 0, flip: false }
            && self.row == AxisMap { stored_axis: 1, flip: false }
            && self.slice == AxisMap { stored_axis: 2, flip: false }
    }

    /// Index along the stored axis that runs S for display slice `k`.
    pub fn stored_index(&self, k: usize) -> usize {
        flip_index(k, self.dims[self.slice.stored_axis], self.slice.flip)
    }

    /// Stored voxel coordinates `[x, y, z]` of display pixel (row, col) of slice `k`.
    pub fn stored_coords(&self, row: usize, col: usize, k: usize) -> [usize; 3] {
        let mut v = [0usize; 3];
        v[self.row.stored_axis] = flip_index(row, self.dims[self.row.stored_axis], self.row.flip);
        v[self.col.stored_axis] = flip_index(col, self.dims[self.col.stored_axis], self.col.flip);
        v[self.slice.stored_axis] = self.stored_index(k);
        v
    }

    /// Display slice `k` of a 3D volume (`data.len()` = product of dims),
    /// row-major into `out` (cleared first).
    ///
    /// Panics if `k >= num_slices()` or `data` is shorter than the volume:
    /// both are caller bugs (the reader guarantees the length).
    pub fn slice<T: Copy>(&self, data: &[T], k: usize, out: &mut Vec<T>) {
        self.slice_strided(data, k, 1, 0, out);
    }

    /// Display slice `k` of one channel of a 4D label volume.
    /// Panics under the same conditions as [`slice`](Self::slice) or if
    /// `channel` is out of range.
    pub fn slice_channel<T: Copy>(
        &self,
        data: &[T],
        layout: ChannelLayout,
        channel: usize,
        k: usize,
        out: &mut Vec<T>,
    ) {
        let nvox = self.dims.iter().product::<usize>();
        match layout {
            ChannelLayout::First { channels } => {
                assert!(channel < channels, "channel {channel} out of range {channels}");
                self.slice_strided(data, k, channels, channel, out)
            }
            ChannelLayout::Last { channels } => {
                assert!(channel < channels, "channel {channel} out of range {channels}");
                self.slice_strided(&data[channel * nvox..(channel + 1) * nvox], k, 1, 0, out)
            }
        }
    }

    /// Element of voxel v is `data[v * mult + add]`.
    fn slice_strided<T: Copy>(&self, data: &[T], k: usize, mult: usize, add: usize, out: &mut Vec<T>) {
        assert!(k < self.num_slices(), "slice {k} out of range {}", self.num_slices());
        let strides = [1usize, self.dims[0], self.dims[0] * self.dims[1]];
        let (rows, cols) = self.slice_dims();
        out.clear();
        out.reserve(rows * cols);
        let base = self.stored_index(k) * strides[self.slice.stored_axis];
        let (sr, sc) = (strides[self.row.stored_axis], strides[self.col.stored_axis]);
        if mult == 1 && !self.col.flip && sc == 1 {
            for r in 0..rows {
                let start = base + flip_index(r, rows, self.row.flip) * sr;
                out.extend_from_slice(&data[start..start + cols]);
            }
            return;
        }
        for r in 0..rows {
            let row_base = base + flip_index(r, rows, self.row.flip) * sr;
            for c in 0..cols {
                let v = row_base + flip_index(c, cols, self.col.flip) * sc;
                out.push(data[v * mult + add]);
            }
        }
    }
}

#[inline]
fn flip_index(i: usize, n: usize, flip: bool) -> usize {
    if flip { n - 1 - i } else { i }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(x: f64, y: f64, z: f64) -> [[f64; 4]; 4] {
        [[x, 0.0, 0.0, 0.0], [0.0, y, 0.0, 0.0], [0.0, 0.0, z, 0.0], [0.0, 0.0, 0.0, 1.0]]
    }

    #[test]
    fn axis_codes_match_nibabel_conventions() {
        assert_eq!(orientation(&diag(1.0, 1.0, 1.0)), ['R', 'A', 'S']);
        assert_eq!(orientation(&diag(-0.7, -0.7, 1.5)), ['L', 'P', 'S']);
        // Stored as (y, z, x)-like permutation: columns are [0,0,2],[−1,0,0],[0,1,0].
        let perm = [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
        assert_eq!(orientation(&perm), ['S', 'L', 'A']);
    }

    #[test]
    fn lps_is_identity_and_ras_flips_rows_and_cols() {
        // 3 x 2 x 2 volume, value = linear stored index
        let dims = [3, 2, 2];
        let data: Vec<u32> = (0..12).collect();
        let lps = AxialSlicer::new(&diag(-1.0, -1.0, 1.0), dims).unwrap();
        assert!(lps.is_identity());
        let mut out = Vec::new();
        lps.slice(&data, 1, &mut out);
        assert_eq!(out, vec![6, 7, 8, 9, 10, 11]);

        let ras = AxialSlicer::new(&diag(1.0, 1.0, 1.0), dims).unwrap();
        ras.slice(&data, 0, &mut out);
        // row 0 = most anterior = stored y=1; col 0 = patient right = stored x=2
        assert_eq!(out, vec![5, 4, 3, 2, 1, 0]);
        assert_eq!(ras.stored_coords(0, 0, 0), [2, 1, 0]);

        // LPI: slices count from the top of the stored z axis
        let lpi = AxialSlicer::new(&diag(-1.0, -1.0, -1.0), dims).unwrap();
        assert_eq!(lpi.stored_index(0), 1);
        lpi.slice(&data, 0, &mut out);
        assert_eq!(out, vec![6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn channel_first_and_last_give_the_same_slices() {
        let dims = [2, 2, 2];
        let slicer = AxialSlicer::new(&diag(-1.0, -1.0, 1.0), dims).unwrap();
        let ch0: Vec<u16> = (0..8).collect();
        let ch1: Vec<u16> = (100..108).collect();
        let last: Vec<u16> = ch0.iter().chain(ch1.iter()).copied().collect();
        let first: Vec<u16> = (0..8).flat_map(|v| [ch0[v], ch1[v]]).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        slicer.slice_channel(&first, ChannelLayout::First { channels: 2 }, 1, 1, &mut a);
        slicer.slice_channel(&last, ChannelLayout::Last { channels: 2 }, 1, 1, &mut b);
        assert_eq!(a, vec![104, 105, 106, 107]);
        assert_eq!(a, b);
    }

    #[test]
    fn degenerate_affine_is_an_error() {
        let err = AxialSlicer::new(&diag(1.0, 0.0, 1.0), [2, 2, 2]).unwrap_err();
        assert!(err.to_string().contains("zero direction"), "{err}");
    }

    #[test]
    fn spacing_follows_display_axes() {
        let s = AxialSlicer::new(&diag(-0.7, -0.8, 1.5), [4, 4, 4]).unwrap();
        let sp = s.spacing_mm();
        assert!((sp[0] - 0.8).abs() < 1e-12 && (sp[1] - 0.7).abs() < 1e-12 && (sp[2] - 1.5).abs() < 1e-12);
    }
}
