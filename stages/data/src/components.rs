//! 2D connected components of a binary slice mask and the bounding-box rules
//! of the dataset construction (paper: "bounding boxes from connected
//! components, keep only boxes larger than 1300 pixels").
//!
//! Labelling is the classic two-pass union-find over a raster scan, so the
//! cost is linear in the slice size and the scratch buffers are reused across
//! slices (one [`ComponentLabeler`] per worker thread).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pixel neighbourhood used to join foreground pixels into one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "u8", into = "u8")]
#[schemars(with = "u8")]
pub enum Connectivity {
    /// Edge neighbours only (4-connectivity).
    Four,
    /// Edge and corner neighbours (8-connectivity, `scipy.ndimage.label` with a 3x3 structure).
    Eight,
}

impl TryFrom<u8> for Connectivity {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        match v {
            4 => Ok(Connectivity::Four),
            8 => Ok(Connectivity::Eight),
            other => Err(format!("connectivity must be 4 or 8, got {other}")),
        }
    }
}

impl From<Connectivity> for u8 {
    fn from(c: Connectivity) -> u8 {
        match c {
            Connectivity::Four => 4,
            Connectivity::Eight => 8,
        }
    }
}

/// An axis-aligned box in image pixel coordinates; `x1`/`y1` are exclusive,
/// `x` is the column and `y` the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct BBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl BBox {
    pub fn width(&self) -> u32 {
        self.x1.saturating_sub(self.x0)
    }
    pub fn height(&self) -> u32 {
        self.y1.saturating_sub(self.y0)
    }
    /// Box area `w * h` (the quantity the 1300 px rule is about, not the
    /// number of foreground pixels inside).
    pub fn area(&self) -> u64 {
        u64::from(self.width()) * u64::from(self.height())
    }
    /// Smallest box containing both.
    pub fn union(&self, other: &BBox) -> BBox {
        BBox {
            x0: self.x0.min(other.x0),
            y0: self.y0.min(other.y0),
            x1: self.x1.max(other.x1),
            y1: self.y1.max(other.y1),
        }
    }
}

/// One connected component: its bounding box and its foreground pixel count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component {
    pub bbox: BBox,
    pub pixels: u64,
}

/// Reusable scratch space for labelling slices of one size after another.
#[derive(Debug, Default)]
pub struct ComponentLabeler {
    labels: Vec<u32>,
    parent: Vec<u32>,
}

impl ComponentLabeler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connected components of the non-zero pixels of a row-major
    /// `rows x cols` mask, in raster order of their first pixel.
    /// A mask whose length is not `rows * cols` is reported as an error.
    pub fn components<T: Copy + Default + PartialEq>(
        &mut self,
        mask: &[T],
        rows: usize,
        cols: usize,
        connectivity: Connectivity,
    ) -> Result<Vec<Component>, ComponentsError> {
        let n = rows.checked_mul(cols).ok_or(ComponentsError::Shape { len: mask.len(), rows, cols })?;
        if mask.len() != n {
            return Err(ComponentsError::Shape { len: mask.len(), rows, cols });
        }
        let zero = T::default();
        self.labels.clear();
        self.labels.resize(n, 0);
        self.parent.clear();
        self.parent.push(0); // label 0 = background
        let eight = connectivity == Connectivity::Eight;

        // Pass 1: provisional labels, recording equivalences.
        for y in 0..rows {
            let row = y * cols;
            for x in 0..cols {
                if mask[row + x] == zero {
                    continue;
                }
                let mut label = 0u32;
                let join = |other: u32, label: &mut u32, parent: &mut Vec<u32>| {
                    if other == 0 {
                        return;
                    }
                    if *label == 0 {
                        *label = other;
                    } else {
                        union(parent, *label, other);
                    }
                };
                if x > 0 {
                    join(self.labels[row + x - 1], &mut label, &mut self.parent);
                }
                if y > 0 {
                    let up = row - cols;
                    join(self.labels[up + x], &mut label, &mut self.parent);
                    if eight {
                        if x > 0 {
                            join(self.labels[up + x - 1], &mut label, &mut self.parent);
                        }
                        if x + 1 < cols {
                            join(self.labels[up + x + 1], &mut label, &mut self.parent);
                        }
                    }
                }
                if label == 0 {
                    label = u32::try_from(self.parent.len()).map_err(|_| ComponentsError::TooManyLabels)?;
                    self.parent.push(label);
                }
                self.labels[row + x] = label;
            }
        }

        // Pass 2: accumulate boxes per root, numbered in raster order.
        let mut slot_of_root: Vec<u32> = vec![u32::MAX; self.parent.len()];
        let mut out: Vec<Component> = Vec::new();
        for y in 0..rows {
            let row = y * cols;
            for x in 0..cols {
                let l = self.labels[row + x];
                if l == 0 {
                    continue;
                }
                let root = find(&mut self.parent, l) as usize;
                let (xu, yu) = (x as u32, y as u32);
                if slot_of_root[root] == u32::MAX {
                    slot_of_root[root] = out.len() as u32;
                    out.push(Component { bbox: BBox { x0: xu, y0: yu, x1: xu + 1, y1: yu + 1 }, pixels: 0 });
                }
                let c = &mut out[slot_of_root[root] as usize];
                c.pixels += 1;
                c.bbox.x0 = c.bbox.x0.min(xu);
                c.bbox.x1 = c.bbox.x1.max(xu + 1);
                c.bbox.y1 = c.bbox.y1.max(yu + 1);
            }
        }
        Ok(out)
    }
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        // Path halving keeps the trees flat without recursion.
        let grand = parent[parent[x as usize] as usize];
        parent[x as usize] = grand;
        x = grand;
    }
    x
}

fn union(parent: &mut [u32], a: u32, b: u32) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        // Smaller root wins so roots stay the earliest label.
        let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
        parent[hi as usize] = lo;
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComponentsError {
    #[error("mask has {len} pixels, expected rows x cols = {rows} x {cols}")]
    Shape { len: usize, rows: usize, cols: usize },
    #[error("more than u32::MAX provisional labels in one slice")]
    TooManyLabels,
}

/// The box rules applied to every component box of a slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxRules {
    /// Keep boxes with `w * h > min_area` (strict, as the paper's "larger than 1300").
    pub min_area: u64,
    /// Drop boxes covering more than this fraction of the slice (corrupt masks).
    pub max_fraction: f64,
}

/// Boxes surviving [`BoxRules`] plus how many each rule removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilteredBoxes {
    pub kept: Vec<BBox>,
    pub dropped_small: u64,
    pub dropped_large: u64,
}

impl BoxRules {
    pub fn apply(&self, components: &[Component], rows: usize, cols: usize) -> FilteredBoxes {
        let slice_area = (rows as f64) * (cols as f64);
        let mut out = FilteredBoxes::default();
        for c in components {
            let area = c.bbox.area();
            if area <= self.min_area {
                out.dropped_small += 1;
            } else if area as f64 > self.max_fraction * slice_area {
                out.dropped_large += 1;
            } else {
                out.kept.push(c.bbox);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse a picture: `#` foreground, `.` background.
    fn mask(pic: &str) -> (Vec<u8>, usize, usize) {
        let lines: Vec<&str> = pic.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let cols = lines[0].len();
        let data = lines.iter().flat_map(|l| l.bytes().map(|b| u8::from(b == b'#'))).collect();
        (data, lines.len(), cols)
    }

    fn boxes(pic: &str, conn: Connectivity) -> Vec<(u32, u32, u32, u32, u64)> {
        let (m, r, c) = mask(pic);
        ComponentLabeler::new()
            .components(&m, r, c, conn)
            .unwrap()
            .iter()
            .map(|c| (c.bbox.x0, c.bbox.y0, c.bbox.x1, c.bbox.y1, c.pixels))
            .collect()
    }

    #[test]
    fn diagonal_pixels_join_only_with_eight_connectivity() {
        let pic = "
            #...
            .#..
            ..#.
            ....";
        assert_eq!(boxes(pic, Connectivity::Eight), vec![(0, 0, 3, 3, 3)]);
        assert_eq!(boxes(pic, Connectivity::Four), vec![(0, 0, 1, 1, 1), (1, 1, 2, 2, 1), (2, 2, 3, 3, 1)]);
    }

    #[test]
    fn u_shape_merges_labels_found_separately() {
        // Two arms get different provisional labels and meet at the bottom.
        let pic = "
            #...#
            #...#
            #####
            .....
            ..##.";
        let b = boxes(pic, Connectivity::Four);
        assert_eq!(b, vec![(0, 0, 5, 3, 9), (2, 4, 4, 5, 2)]);
        assert_eq!(boxes(pic, Connectivity::Eight), b);
    }

    #[test]
    fn anti_diagonal_and_spiral() {
        // Up-right neighbour: joined only with 8-connectivity.
        let pic = "
            ..#
            .#.
            #..";
        assert_eq!(boxes(pic, Connectivity::Eight), vec![(0, 0, 3, 3, 3)]);
        assert_eq!(boxes(pic, Connectivity::Four).len(), 3);
        let spiral = "
            #####
            ....#
            ###.#
            #...#
            #####";
        assert_eq!(boxes(spiral, Connectivity::Four), vec![(0, 0, 5, 5, 17)]);
    }

    #[test]
    fn empty_and_full_masks() {
        assert!(boxes("...\n...", Connectivity::Eight).is_empty());
        assert_eq!(boxes("###\n###", Connectivity::Four), vec![(0, 0, 3, 2, 6)]);
    }

    #[test]
    fn wrong_shape_is_an_error() {
        let err = ComponentLabeler::new().components(&[1u8; 5], 2, 3, Connectivity::Eight).unwrap_err();
        assert_eq!(err, ComponentsError::Shape { len: 5, rows: 2, cols: 3 });
    }

    #[test]
    fn connectivity_parses_from_4_or_8_only() {
        #[derive(Deserialize)]
        struct P {
            c: Connectivity,
        }
        let p: P = toml::from_str("c = 4").unwrap();
        assert_eq!(p.c, Connectivity::Four);
        let err = toml::from_str::<P>("c = 6").err().unwrap().to_string();
        assert!(err.contains("connectivity must be 4 or 8"), "{err}");
    }

    fn comp(x0: u32, y0: u32, w: u32, h: u32) -> Component {
        Component { bbox: BBox { x0, y0, x1: x0 + w, y1: y0 + h }, pixels: 1 }
    }

    #[test]
    fn box_area_rule_is_strict_at_1300() {
        let rules = BoxRules { min_area: 1300, max_fraction: 0.5 };
        // 26 x 50 = 1300 (dropped), 1301 = 1301 x 1 (kept), 1 px wide but the
        // rule is about box area.
        let cs = [comp(0, 0, 26, 50), comp(0, 100, 1301, 1), comp(0, 200, 37, 36)];
        let f = rules.apply(&cs, 512, 2048);
        assert_eq!(f.kept, vec![cs[1].bbox, cs[2].bbox]);
        assert_eq!(f.dropped_small, 1);
        assert_eq!(f.dropped_large, 0);
    }

    #[test]
    fn boxes_over_max_fraction_are_dropped() {
        let rules = BoxRules { min_area: 10, max_fraction: 0.5 };
        // 100 x 100 slice: 50 x 100 = exactly half (kept), 51 x 100 dropped.
        let cs = [comp(0, 0, 50, 100), comp(0, 0, 51, 100), comp(0, 0, 100, 100)];
        let f = rules.apply(&cs, 100, 100);
        assert_eq!(f.kept, vec![cs[0].bbox]);
        assert_eq!(f.dropped_large, 2);
    }
}
