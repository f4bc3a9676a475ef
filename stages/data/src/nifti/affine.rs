//! Affine arithmetic shared by the header (qform <-> affine) and the
//! orientation code: 3x3 determinants and inverses, the nearest rotation,
//! quaternion conversions. Plain f64 math, no NIfTI types.

pub fn identity() -> [[f64; 4]; 4] {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}

/// The qform affine (NIfTI "method 2"), computed in f64 like nibabel.
/// `w2_thresh`: |1 − (b² + c² + d²)| below this means the quaternion's `a`
/// is 0 (see `NiftiVersion::quaternion_threshold`), so that unit quaternions
/// rounded to the stored precision do not produce NaN.
pub fn quatern_to_affine(q: [f64; 3], offset: [f64; 3], zooms: [f64; 3], qfac: f64, w2_thresh: f64) -> [[f64; 4]; 4] {
    let [mut b, mut c, mut d] = q;
    let w2 = 1.0 - (b * b + c * c + d * d);
    let a = if w2 < -w2_thresh {
        // Not a unit quaternion: normalise it (as nifti1_io does).
        let n = (b * b + c * c + d * d).sqrt();
        b /= n;
        c /= n;
        d /= n;
        0.0
    } else if w2 < w2_thresh {
        0.0
    } else {
        w2.sqrt()
    };
    let r = [
        [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
        [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
        [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ];
    let z = [zooms[0], zooms[1], zooms[2] * if qfac < 0.0 { -1.0 } else { 1.0 }];
    let mut out = identity();
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = r[i][j] * z[j];
        }
        out[i][3] = offset[i];
    }
    out
}

/// Decompose an affine into zooms, quaternion (b, c, d), offset and qfac for
/// the qform; the rotation is the nearest orthonormal matrix (polar
/// decomposition), so shears are dropped there (the sform keeps them).
pub fn affine_to_quatern(affine: &[[f64; 4]; 4]) -> ([f64; 3], [f64; 3], [f64; 3], f64) {
    let mut m = [[0.0f64; 3]; 3];
    let mut zooms = [1.0f64; 3];
    for j in 0..3 {
        let n = (0..3).map(|i| affine[i][j] * affine[i][j]).sum::<f64>().sqrt();
        zooms[j] = if n > 0.0 { n } else { 1.0 };
        for i in 0..3 {
            m[i][j] = if n > 0.0 {
                affine[i][j] / n
            } else if i == j {
                1.0
            } else {
                0.0
            };
        }
    }
    let mut r = nearest_rotation(m);
    let mut qfac = 1.0f64;
    if det3(&r) < 0.0 {
        qfac = -1.0;
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    // Quaternion from a proper rotation (Shepperd's method, as in nifti1_io).
    let (xx, yy, zz) = (r[0][0], r[1][1], r[2][2]);
    let trace = xx + yy + zz + 1.0;
    let (mut a, mut b, mut c, mut d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + xx - (yy + zz);
        let yd = 1.0 + yy - (xx + zz);
        let zd = 1.0 + zz - (xx + yy);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
        if a < 0.0 {
            a = -a;
            b = -b;
            c = -c;
            d = -d;
        }
    }
    let _ = a;
    let offset = [affine[0][3], affine[1][3], affine[2][3]];
    (zooms, [b, c, d], offset, qfac)
}

pub fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// The orthonormal matrix nearest to `m` (its polar factor `U·Vᵀ`, the same
/// `R` nibabel builds from an SVD), by Newton iteration
/// `X ← (X + X⁻ᵀ)/2`. Returns `m` unchanged when it is singular.
pub fn nearest_rotation(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut x = m;
    for _ in 0..100 {
        let Some(inv) = inverse3(&x) else { return m };
        let mut next = [[0.0; 3]; 3];
        let mut delta = 0.0f64;
        for i in 0..3 {
            for j in 0..3 {
                // X⁻ᵀ[i][j] = X⁻¹[j][i]
                next[i][j] = 0.5 * (x[i][j] + inv[j][i]);
                delta = delta.max((next[i][j] - x[i][j]).abs());
            }
        }
        x = next;
        if delta < 1e-15 {
            break;
        }
    }
    x
}

fn inverse3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let det = det3(m);
    let scale = m.iter().flatten().fold(0.0f64, |a, v| a.max(v.abs()));
    if !det.is_finite() || det.abs() <= 1e-12 * scale.powi(3) || scale == 0.0 {
        return None;
    }
    let c = |r0: usize, c0: usize, r1: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let adj = [
        [c(1, 1, 2, 2), -c(0, 1, 2, 2), c(0, 1, 1, 2)],
        [-c(1, 0, 2, 2), c(0, 0, 2, 2), -c(0, 0, 1, 2)],
        [c(1, 0, 2, 1), -c(0, 0, 2, 1), c(0, 0, 1, 1)],
    ];
    Some(adj.map(|row| row.map(|v| v / det)))
}
