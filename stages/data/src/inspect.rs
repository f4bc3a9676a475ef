//! `pipeline inspect FILE`: what a NIfTI file holds, for users checking
//! their data before a long run. Uses the same reader as the stages, so a
//! file that inspects cleanly also loads in `lesion_slices`.
//!
//! Prints the header (NIfTI version, datatype, shape, zooms, affine and where it came from,
//! orientation code such as `LPS`, scl slope/intercept), value statistics
//! after scaling (min, max, mean, non-zero count, NaN/Inf count), and for a
//! 4D integer volume the voxel count of every label per channel. The channel
//! axis of a 4D volume is taken to be the first when `dim[1] < dim[4]`
//! (ReXGroundingCT's `(F, X, Y, Z)`), else the last. `--json` prints the
//! same report as one JSON object.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::nifti::{self, NiftiHeader, NiftiScalar, NiftiVersion, VoxelReader, decode_chunk, dispatch_datatype};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ValueStats {
    pub count: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub nonzero: u64,
    pub nan: u64,
    pub inf: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChannelLabels {
    pub channel: usize,
    /// label → voxel count (background 0 included).
    pub labels: BTreeMap<i64, u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InspectReport {
    pub file: String,
    pub file_bytes: u64,
    pub gzip: bool,
    /// NIfTI version: 1 or 2.
    pub version: u8,
    pub endianness: &'static str,
    pub datatype: &'static str,
    pub bitpix: i16,
    pub dims: Vec<usize>,
    pub zooms: Vec<f64>,
    pub affine: [[f64; 4]; 4],
    pub affine_source: &'static str,
    pub qform_code: i32,
    pub sform_code: i32,
    pub orientation: String,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub scaling_applied: bool,
    pub vox_offset: u64,
    pub descrip: String,
    pub stats: Option<ValueStats>,
    /// `"first"` or `"last"` for 4D volumes.
    pub channel_axis: Option<&'static str>,
    pub channels: Vec<ChannelLabels>,
}

fn affine_source(h: &NiftiHeader) -> &'static str {
    if h.sform_code > 0 {
        "sform"
    } else if h.qform_code > 0 {
        "qform"
    } else {
        "pixdim"
    }
}

/// A header float for display: a NIfTI-1 field is an f32, and its widened
/// f64 would print as 0.699999988079071 where the file says 0.7, so it is
/// shown as the shortest decimal of the f32. NIfTI-2 fields are f64 already.
fn as_stored(v: f64, version: NiftiVersion) -> f64 {
    match version {
        NiftiVersion::V1 => (v as f32).to_string().parse().unwrap_or(v),
        NiftiVersion::V2 => v,
    }
}

/// Build the report (reads the whole file unless `header_only`).
pub fn inspect_file(path: &Path, header_only: bool) -> anyhow::Result<InspectReport> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mut magic = [0u8; 2];
    {
        use std::io::Read as _;
        let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let _ = f.read(&mut magic).with_context(|| format!("reading {}", path.display()))?;
    }
    let reader = VoxelReader::open(path)?;
    let h = reader.header.clone();
    let mut report = InspectReport {
        file: path.display().to_string(),
        file_bytes: meta.len(),
        gzip: magic == [0x1f, 0x8b],
        version: h.version.number(),
        endianness: if h.big_endian { "big" } else { "little" },
        datatype: h.datatype.name(),
        bitpix: h.bitpix,
        dims: h.dims.clone(),
        zooms: h.pixdim.iter().map(|&z| as_stored(z, h.version)).collect(),
        affine: h.affine,
        affine_source: affine_source(&h),
        qform_code: h.qform_code,
        sform_code: h.sform_code,
        orientation: nifti::orientation(&h.affine).iter().collect(),
        scl_slope: as_stored(h.scl_slope, h.version),
        scl_inter: as_stored(h.scl_inter, h.version),
        scaling_applied: h.has_scaling(),
        vox_offset: h.vox_offset,
        descrip: h.descrip.clone(),
        stats: None,
        channel_axis: None,
        channels: Vec::new(),
    };
    if header_only {
        return Ok(report);
    }
    let channel_first = match h.dims.as_slice() {
        [f, _, _, z] => Some(f < z),
        _ => None,
    };
    let count_labels = channel_first.is_some() && !h.datatype.is_float() && !h.has_scaling();
    let (nch, nvox3) = match h.dims.as_slice() {
        [f, x, y, z] if channel_first == Some(true) => (*f, x * y * z),
        [x, y, z, f] => (*f, x * y * z),
        _ => (1, 0),
    };
    report.channel_axis = channel_first.map(|f| if f { "first" } else { "last" });
    let mut acc = Accumulator::new(h.scaling(), h.has_scaling(), if count_labels { nch } else { 0 });
    let (dt, be) = (h.datatype, h.big_endian);
    let mut index: u64 = 0;
    reader.for_each_chunk(|bytes| {
        dispatch_datatype!(dt, S => {
            decode_chunk::<S>(bytes, be, |v: S| {
                let ch = if !count_labels {
                    0
                } else if channel_first == Some(true) {
                    (index % nch as u64) as usize
                } else {
                    (index / nvox3 as u64) as usize
                };
                acc.add(v.to_f64(), ch);
                index += 1;
            });
        });
        Ok(())
    })?;
    report.stats = Some(acc.stats());
    if count_labels {
        report.channels = acc.channel_labels();
    }
    Ok(report)
}

/// Streaming statistics; labels 0..=255 counted in arrays (fast path for
/// masks), others in a map.
struct Accumulator {
    slope: f64,
    inter: f64,
    scaled: bool,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    nonzero: u64,
    nan: u64,
    inf: u64,
    small: Vec<[u64; 256]>,
    other: Vec<BTreeMap<i64, u64>>,
}

impl Accumulator {
    fn new((slope, inter): (f64, f64), scaled: bool, channels: usize) -> Self {
        Self {
            slope,
            inter,
            scaled,
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            nonzero: 0,
            nan: 0,
            inf: 0,
            small: vec![[0; 256]; channels],
            other: vec![BTreeMap::new(); channels],
        }
    }

    #[inline]
    fn add(&mut self, raw: f64, channel: usize) {
        let v = if self.scaled { raw * self.slope + self.inter } else { raw };
        self.count += 1;
        if v.is_nan() {
            self.nan += 1;
            return;
        }
        if v.is_infinite() {
            self.inf += 1;
            return;
        }
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        if v != 0.0 {
            self.nonzero += 1;
        }
        if let Some(counts) = self.small.get_mut(channel) {
            if (0.0..256.0).contains(&raw) {
                counts[raw as usize] += 1;
            } else {
                *self.other[channel].entry(raw as i64).or_default() += 1;
            }
        }
    }

    fn stats(&self) -> ValueStats {
        let finite = self.count - self.nan - self.inf;
        let some = |v: f64| (finite > 0).then_some(v);
        ValueStats {
            count: self.count,
            min: some(self.min),
            max: some(self.max),
            mean: some(self.sum / finite.max(1) as f64),
            nonzero: self.nonzero,
            nan: self.nan,
            inf: self.inf,
        }
    }

    fn channel_labels(&self) -> Vec<ChannelLabels> {
        self.small
            .iter()
            .zip(&self.other)
            .enumerate()
            .map(|(channel, (small, other))| {
                let mut labels = other.clone();
                for (l, &n) in small.iter().enumerate() {
                    if n > 0 {
                        labels.insert(l as i64, n);
                    }
                }
                ChannelLabels { channel, labels }
            })
            .collect()
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.6}") }
}

/// The human-readable report.
pub fn render_text(r: &InspectReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "file         {} ({} bytes{})", r.file, r.file_bytes, if r.gzip { ", gzip" } else { "" });
    let _ = writeln!(s, "format       NIfTI-{}", r.version);
    let _ = writeln!(s, "datatype     {} (bitpix {}, {}-endian)", r.datatype, r.bitpix, r.endianness);
    let dims: Vec<String> = r.dims.iter().map(|d| d.to_string()).collect();
    let _ = writeln!(s, "shape        {}", dims.join(" x "));
    let zooms: Vec<String> = r.zooms.iter().map(|z| format!("{z}")).collect();
    let _ = writeln!(s, "zooms        {}", zooms.join(" "));
    let _ = writeln!(
        s,
        "orientation  {} (affine from {}; qform_code {}, sform_code {})",
        r.orientation, r.affine_source, r.qform_code, r.sform_code
    );
    let _ = writeln!(s, "affine");
    for row in &r.affine {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>11.4}")).collect();
        let _ = writeln!(s, "  [{} ]", cells.join(""));
    }
    let _ = writeln!(
        s,
        "scl          slope {} inter {} ({})",
        r.scl_slope,
        r.scl_inter,
        if r.scaling_applied { "applied to values" } else { "no scaling" }
    );
    if !r.descrip.is_empty() {
        let _ = writeln!(s, "descrip      {}", r.descrip);
    }
    if let Some(st) = &r.stats {
        match (st.min, st.max, st.mean) {
            (Some(min), Some(max), Some(mean)) => {
                let _ = writeln!(
                    s,
                    "values       min {} max {} mean {:.4} nonzero {} of {}",
                    fmt_num(min),
                    fmt_num(max),
                    mean,
                    st.nonzero,
                    st.count
                );
            }
            _ => {
                let _ = writeln!(s, "values       no finite values among {}", st.count);
            }
        }
        if st.nan > 0 || st.inf > 0 {
            let _ = writeln!(s, "WARNING      {} NaN and {} infinite values", st.nan, st.inf);
        }
    }
    if let Some(axis) = r.channel_axis {
        let _ = writeln!(s, "channels     axis {axis}, {} label channel(s)", r.channels.len());
        for c in &r.channels {
            let labels: Vec<String> =
                c.labels.iter().filter(|(l, _)| **l != 0).map(|(l, n)| format!("{l}: {n}")).collect();
            let labels = if labels.is_empty() { "empty".to_string() } else { labels.join(", ") };
            let _ = writeln!(s, "  channel {:<3} {labels}", c.channel);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_header_stats_and_channel_labels() {
        let dir = tempfile::tempdir().unwrap();
        // (F=2, X=3, Y=2, Z=4) mask: channel 0 has label 1 ×3 and 2 ×1, channel 1 label 300 ×2.
        let mut data = vec![0u16; 2 * 3 * 2 * 4];
        for v in [0, 2, 4] {
            data[v * 2] = 1;
        }
        data[6 * 2] = 2;
        data[7 * 2 + 1] = 300;
        data[9 * 2 + 1] = 300;
        let p = dir.path().join("mask.nii.gz");
        nifti::write(&p, &[2, 3, 2, 4], &data, &nifti::identity(), None).unwrap();
        let r = inspect_file(&p, false).unwrap();
        assert!(r.gzip);
        assert_eq!(r.datatype, "uint16");
        assert_eq!(r.orientation, "RAS");
        assert_eq!(r.channel_axis, Some("first"));
        let st = r.stats.as_ref().unwrap();
        assert_eq!((st.count, st.nonzero, st.min, st.max), (48, 6, Some(0.0), Some(300.0)));
        assert_eq!(r.channels[0].labels, BTreeMap::from([(0, 20), (1, 3), (2, 1)]));
        assert_eq!(r.channels[1].labels, BTreeMap::from([(0, 22), (300, 2)]));
        let text = render_text(&r);
        assert!(text.contains("channel 1   300: 2"), "{text}");
    }

    #[test]
    fn scaled_ct_stats_and_nan_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ct.nii");
        let lps = [[-0.7, 0.0, 0.0, 0.0], [0.0, -0.7, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 1.0]];
        nifti::write(&p, &[2, 2, 1], &[0i16, 1024, 2048, 24], &lps, Some((1.0, -1024.0))).unwrap();
        let r = inspect_file(&p, false).unwrap();
        assert_eq!(r.orientation, "LPS");
        assert!(r.scaling_applied);
        // NIfTI-1 zooms are f32 in the file and shown as such, not as 0.699999988079071.
        assert_eq!((r.version, r.zooms.as_slice()), (1, &[0.7, 0.7, 1.5][..]));
        assert!(render_text(&r).contains("format       NIfTI-1\n"));
        let st = r.stats.unwrap();
        assert_eq!((st.min, st.max, st.nonzero), (Some(-1024.0), Some(1024.0), 3));
        assert_eq!(st.mean, Some(-250.0));
        assert!(r.channels.is_empty());

        let p = dir.path().join("nan.nii");
        nifti::write(&p, &[3], &[1.0f32, f32::NAN, 3.0], &nifti::identity(), None).unwrap();
        let r = inspect_file(&p, false).unwrap();
        assert_eq!(r.stats.as_ref().unwrap().nan, 1);
        assert!(render_text(&r).contains("1 NaN"));
    }

    #[test]
    fn reports_the_nifti2_version_and_f64_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ct2.nii.gz");
        let a = [[-0.7000000001, 0.0, 0.0, 1.0], [0.0, -0.7, 0.0, 2.0], [0.0, 0.0, 1.25, 3.0], [0.0, 0.0, 0.0, 1.0]];
        let options = nifti::WriteOptions { version: NiftiVersion::V2, ..Default::default() };
        nifti::write_with(&p, &[2, 2, 1], &[0i16, 10, 20, 30], &a, Some((0.1, -1024.0)), options).unwrap();
        let r = inspect_file(&p, false).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.zooms, vec![0.7000000001, 0.7, 1.25]);
        assert_eq!((r.scl_slope, r.scl_inter), (0.1, -1024.0));
        assert_eq!(r.affine[0][0], -0.7000000001);
        assert_eq!(r.stats.as_ref().unwrap().max, Some(30.0 * 0.1 - 1024.0));
        assert!(render_text(&r).contains("format       NIfTI-2\n"), "{}", render_text(&r));
        assert_eq!(serde_json::to_value(&r).unwrap()["version"], 2);
    }

    #[test]
    fn bad_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.nii");
        std::fs::write(&p, b"not a nifti file").unwrap();
        let e = format!("{:#}", inspect_file(&p, true).unwrap_err());
        assert!(e.contains("bad.nii"), "{e}");
    }
}
