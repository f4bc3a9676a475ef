#!/usr/bin/env python3
"""Write small NIfTI-1 and NIfTI-2 fixtures with nibabel (an independent
writer) plus the values/orientation nibabel reads back, for the Rust reader
tests (stages/data/tests/nifti_fixtures.rs).

    tools/nifti_fixtures.py stages/data/tests/fixtures/nifti

Creates the venv-free output: *.nii / *.nii.gz files and expected.json.
Run it in a venv with tools/requirements-nifti.txt installed; the outputs are
committed so CI needs no Python. Deterministic: fixed data, gzip mtime 0.
"""
import gzip
import json
import os
import sys

import nibabel as nib
import numpy as np


def lps(sx, sy, sz, origin=(120.5, 80.25, -300.0)):
    a = np.diag([-sx, -sy, sz, 1.0])
    a[:3, 3] = origin
    return a


def rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def rot_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def display_slice(img, k):
    """Slice k in the display convention: rows anterior->posterior, columns
    patient right->left, k inferior->superior; built from nibabel's closest
    canonical (RAS) image, independently of the Rust slicer."""
    ras = nib.as_closest_canonical(img)
    vol = np.asarray(ras.dataobj)
    plane = vol[:, :, k]  # (x: L->R, y: P->A)
    return plane[::-1, ::-1].T  # rows: y descending (A first), cols: x descending (R first)


def save(img, path):
    # nibabel's gzip writer stamps mtime; write plain then gzip with mtime 0.
    if path.endswith(".gz"):
        raw = path[:-3]
        nib.save(img, raw)
        with open(raw, "rb") as f, open(path, "wb") as out:
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0, filename="") as g:
                g.write(f.read())
        os.remove(raw)
    else:
        nib.save(img, path)


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20240601)
    expected = {}

    def record(name, img, labels=False):
        path = os.path.join(out_dir, name)
        save(img, path)
        back = nib.load(path)
        hdr = back.header
        if labels:
            values = np.asarray(back.dataobj).astype(np.int64)
        else:
            values = back.get_fdata(dtype=np.float64)
        # nibabel moves the scaling onto the array proxy when loading
        slope, inter = back.dataobj.slope, back.dataobj.inter
        entry = {
            "shape": list(back.shape),
            "datatype": str(hdr.get_data_dtype().newbyteorder("=")),
            "zooms": [float(z) for z in hdr.get_zooms()],
            "affine": back.affine.tolist(),
            "axcodes": "".join(nib.aff2axcodes(back.affine)),
            "scl_slope": None if slope is None else float(slope),
            "scl_inter": None if inter is None else float(inter),
            "version": 2 if isinstance(back, nib.Nifti2Image) else 1,
            "big_endian": hdr.endianness == ">",
            "sform_code": int(hdr["sform_code"]),
            "qform_code": int(hdr["qform_code"]),
            "labels": labels,
            # NIfTI order (x fastest) = Fortran order.
            "values": values.ravel(order="F").tolist(),
        }
        if len(back.shape) == 3:
            k = nib.as_closest_canonical(back).shape[2] // 2
            entry["display_k"] = int(k)
            entry["display_slice"] = display_slice(back, k).astype(np.float64).ravel().tolist()
            entry["display_dims"] = list(display_slice(back, k).shape)
        expected[name] = entry

    # int16 CT with scl_slope/inter, LPS, .nii.gz and .nii
    raw = rng.integers(-2000, 3000, size=(6, 5, 4)).astype(np.int16)
    raw[0, 0, 0] = -8192 + 1024
    # nibabel picks scl_slope/scl_inter itself when float data is stored as int16
    hu = raw.astype(np.float64) * 0.37 - 1024.0
    for name in ["ct_i16_scaled.nii.gz", "ct_i16_scaled.nii"]:
        img = nib.Nifti1Image(hu, lps(0.7, 0.75, 1.5))
        img.set_data_dtype(np.int16)
        record(name, img)

    # uint8 4D instance-labelled mask (F, X, Y, Z), identity affine like ReXGroundingCT
    mask = np.zeros((3, 6, 5, 4), dtype=np.uint8)
    mask[0, 1:3, 1:4, 1:3] = 1
    mask[0, 4:6, 0:2, 0:1] = 2
    mask[2, :, :, 3] = 1  # a full plane (the corrupt-mask case)
    record("mask_u8_4d.nii.gz", nib.Nifti1Image(mask, np.eye(4)), labels=True)

    # float32, oblique + sheared affine (sform); qform gets the rigid part
    data = rng.normal(0, 100, size=(5, 4, 3)).astype(np.float32)
    a = np.eye(4)
    a[:3, :3] = rot_z(20) @ rot_x(10) @ np.diag([0.9, 1.1, 2.0])
    a[0, 1] += 0.05  # shear
    a[:3, 3] = [-10.0, 5.0, 42.0]
    record("f32_oblique.nii", nib.Nifti1Image(data, a))

    # int16 with only a qform (sform_code 0), rotated RAS-ish
    data = rng.integers(-1000, 1000, size=(4, 5, 3)).astype(np.int16)
    a = np.eye(4)
    a[:3, :3] = rot_z(-15) @ np.diag([0.8, 0.8, 2.5])
    a[:3, 3] = [1.0, 2.0, 3.0]
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(a, code=1)
    img.header.set_sform(None, code=0)
    record("i16_qform_only.nii.gz", img)

    # uint8 stored with permuted axes (x->S, y->L, z->A)
    data = np.arange(4 * 3 * 5, dtype=np.uint8).reshape(4, 3, 5)
    a = np.array([[0, -0.7, 0, 0], [0, 0, 0.9, 0], [2.0, 0, 0, 0], [0, 0, 0, 1.0]])
    record("u8_permuted.nii", nib.Nifti1Image(data, a), labels=True)

    # int16 4D channel-last, big-endian
    data = rng.integers(0, 4, size=(4, 3, 2, 2)).astype(">i2")
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(">i2")
    record("i16_4d_bigendian.nii", nib.Nifti1Image(data, lps(1, 1, 1), header=hdr), labels=True)

    # NIfTI-2 (540-byte header, f64 fields). A separate generator so the
    # NIfTI-1 fixtures above stay byte-identical. Zooms, slopes and affine
    # entries are chosen not to be float32-representable, so a reader that
    # narrows any f64 field to f32 fails the comparison.
    rng2 = np.random.default_rng(20250101)

    # int16 CT with scl_slope/inter + sform, plain and gzip. The scaling is
    # set explicitly: nibabel computes its own in float32 (arraywriters'
    # scaler_dtype), which would not exercise the f64 fields; with slope and
    # intercept set in the header, nibabel stores the int16 values as given.
    raw = rng2.integers(-2000, 3000, size=(5, 4, 3)).astype(np.int16)
    # (gzip first: save() writes the .gz through a temporary plain file of the same name)
    for name in ["n2_ct_i16_scaled.nii.gz", "n2_ct_i16_scaled.nii"]:
        img = nib.Nifti2Image(raw, lps(0.7, 0.7000000001, 1.25, origin=(120.123456789, 80.1, -300.3)))
        img.header.set_slope_inter(0.3141592653589793, -1024.1)
        record(name, img)

    # float32, big-endian, oblique + sheared sform
    data = rng2.normal(0, 100, size=(4, 5, 3)).astype(">f4")
    a = np.eye(4)
    a[:3, :3] = rot_z(25) @ rot_x(-8) @ np.diag([0.9, 1.1, 2.0])
    a[0, 1] += 0.05  # shear
    a[:3, 3] = [-10.1, 5.2, 42.3]
    hdr = nib.Nifti2Header(endianness=">")
    hdr.set_data_dtype(">f4")
    record("n2_f32_oblique_bigendian.nii", nib.Nifti2Image(data, a, header=hdr))

    # uint8 4D label volume (F, X, Y, Z), gzip
    mask = np.zeros((2, 5, 4, 3), dtype=np.uint8)
    mask[0, 1:3, 1:3, 0:2] = 1
    mask[1, 3:5, 0:2, 2] = 7
    record("n2_mask_u8_4d.nii.gz", nib.Nifti2Image(mask, np.eye(4)), labels=True)

    # int16 with only a qform (sform_code 0): rotated, left-handed (qfac -1)
    data = rng2.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int16)
    a = np.eye(4)
    a[:3, :3] = rot_z(-15) @ rot_x(5) @ np.diag([-0.8, 0.8, 2.5])
    a[:3, 3] = [1.1, 2.2, 3.3]
    img = nib.Nifti2Image(data, None)
    img.header.set_qform(a, code=1)
    img.header.set_sform(None, code=0)
    record("n2_i16_qform_only.nii", img)

    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump({"nibabel": nib.__version__, "files": expected}, f, indent=None, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "stages/data/tests/fixtures/nifti")
