#!/usr/bin/env python3
"""Independent Python reference of `lesion_slices` + `render` (benchmark and parity).

nibabel reads the NIfTI files, scipy.ndimage.label finds connected
components, Pillow resizes, draws and encodes PNG: the same rules as the Rust
stages with their default params (8-connectivity, box area > box_min_area,
boxes <= 50% of the slice, round(linspace) cap of 20 per case and class,
clip [-1000, 1000], smart_resize to <= 401,408 px, zoom patch of the largest
box at the upper-left with a 3 px green border, 3 px red ring around the box).
Display orientation: rows anterior->posterior, columns patient right->left,
slices inferior->superior (nibabel axcodes L, P, S).

Usage: python tools/reference_slices.py INDEX_DIR DATASET_DIR OUT_DIR [--box-min-area 1300]
Writes OUT_DIR/items.jsonl (same records and ids as `lesion_slices`) and
OUT_DIR/images/*.png; prints timing as JSON. Single process = one core.
"""

import argparse
import io
import json
import math
import os
import time

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from PIL import Image
from scipy import ndimage

EIGHT = np.ones((3, 3), dtype=bool)


def smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=401408):
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def to_display(arr3, affine):
    """Reorient the first three axes to L, P, S; return the array and the stored-S mapping."""
    t = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
    s_in = int(np.where(t[:, 0] == 2)[0][0])
    return apply_orientation(arr3, t), bool(t[s_in, 1] == -1)


def slices_of_case(case, root, box_min_area, max_frac=0.5, cap=20):
    ct = nib.load(os.path.join(root, case["ct"]))
    mask = np.asarray(nib.load(os.path.join(root, case["mask"])).dataobj)
    ct_shape = ct.shape[:3]
    if mask.ndim == 4 and mask.shape[1:] == ct_shape:
        mask = np.moveaxis(mask, 0, -1)  # (F, X, Y, Z) -> (X, Y, Z, F)
    elif mask.ndim == 3:
        mask = mask[..., None]
    disp, s_flipped = to_display(mask, ct.affine)  # (cols, rows, k, F)
    zooms = np.sqrt((ct.affine[:3, :3] ** 2).sum(axis=0))
    t = ornt_transform(io_orientation(ct.affine), axcodes2ornt(("L", "P", "S")))
    spacing = [0.0, 0.0, 0.0]
    for i in range(3):
        spacing[[1, 0, 2][int(t[i, 0])]] = float(zooms[i])
    cols, rows, nk = disp.shape[:3]
    classes = {}
    for f in case["findings"]:
        if f.get("class"):
            classes.setdefault(f["class"], []).append(f["channel"])
    items = []
    for cls in sorted(classes):
        vol = (disp[..., classes[cls]] != 0).any(axis=-1)
        kept = []
        for k in np.nonzero(vol.any(axis=(0, 1)))[0]:
            lab, n = ndimage.label(vol[:, :, k].T, structure=EIGHT)
            boxes = []
            for sl in ndimage.find_objects(lab):
                y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
                area = (x1 - x0) * (y1 - y0)
                if area > box_min_area and area <= max_frac * rows * cols:
                    boxes.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1})
            if boxes:
                kept.append((int(k), boxes))
        for i in np.round(np.linspace(0, len(kept) - 1, min(len(kept), cap))).astype(int) if kept else []:
            k, boxes = kept[i]
            items.append({
                "id": f"{case['name']}/{cls}/{k:03d}", "case": case["name"], "patient_id": case["patient_id"],
                "split": case["split"], "class": cls, "slice": k, "stored_slice": nk - 1 - k if s_flipped else k,
                "rows": rows, "cols": cols, "boxes": boxes, "spacing_mm": spacing,
            })
    return items


def ring(img, b, width, color):
    a = np.asarray(img).copy()
    h, w = a.shape[:2]
    y0, y1, x0, x1 = max(b[1] - width, 0), min(b[3] + width, h), max(b[0] - width, 0), min(b[2] + width, w)
    inside = a[b[1]:b[3], b[0]:b[2]].copy()
    a[y0:y1, x0:x1] = color
    a[b[1]:b[3], b[0]:b[2]] = inside
    return Image.fromarray(a)


def render_case(items, ct_path, out_dir):
    ct = nib.load(ct_path)
    hu, _ = to_display(ct.get_fdata(dtype=np.float32), ct.affine)
    for it in items:
        sl = hu[:, :, it["slice"]].T
        g = np.floor((np.clip(sl, -1000, 1000) + 1000) * np.float32(255 / 2000) + 0.5).astype(np.uint8)
        native = Image.fromarray(g)
        r, c = g.shape
        h, w = smart_resize(r, c)
        img = native.resize((w, h), Image.BILINEAR).convert("RGB") if (h, w) != (r, c) else native.convert("RGB")
        sx, sy = w / c, h / r
        zb = max(reversed(it["boxes"]), key=lambda b: (b["x1"] - b["x0"]) * (b["y1"] - b["y0"]))
        scaled = (math.floor(zb["x0"] * sx), math.floor(zb["y0"] * sy), min(math.ceil(zb["x1"] * sx), w),
                  min(math.ceil(zb["y1"] * sy), h))
        img = ring(img, scaled, 3, (255, 0, 0))
        side = min(max(math.ceil(max(zb["x1"] - zb["x0"], zb["y1"] - zb["y0"]) * 1.2), 1), r, c)
        cx0 = min(max((zb["x0"] + zb["x1"] - side) // 2, 0), c - side)
        cy0 = min(max((zb["y0"] + zb["y1"] - side) // 2, 0), r - side)
        ps = min(max(round(min(h, w) / 3), 1), min(h, w))
        patch = native.crop((cx0, cy0, cx0 + side, cy0 + side)).resize((ps, ps), Image.BILINEAR).convert("RGB")
        pa = np.asarray(patch).copy()
        pa[:3, :] = pa[-3:, :] = pa[:, :3] = pa[:, -3:] = (0, 255, 0)
        img.paste(Image.fromarray(pa), (0, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        with open(os.path.join(out_dir, "images", it["id"].replace("/", "__") + ".png"), "wb") as f:
            f.write(buf.getvalue())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("index_dir")
    ap.add_argument("dataset_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--box-min-area", type=int, default=1300)
    args = ap.parse_args()
    with open(os.path.join(args.index_dir, "index.json")) as f:
        index = json.load(f)
    os.makedirs(os.path.join(args.out_dir, "images"), exist_ok=True)
    t0 = time.perf_counter()
    items = []
    for case in index["cases"]:
        items += slices_of_case(case, args.dataset_dir, args.box_min_area)
    t1 = time.perf_counter()
    by_case = {}
    for it in items:
        by_case.setdefault(it["case"], []).append(it)
    cases = {c["name"]: c for c in index["cases"]}
    for name, its in by_case.items():
        render_case(its, os.path.join(args.dataset_dir, cases[name]["ct"]), args.out_dir)
    t2 = time.perf_counter()
    items.sort(key=lambda i: (i["case"], i["class"], i["slice"]))
    with open(os.path.join(args.out_dir, "items.jsonl"), "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    n = len(index["cases"])
    print(json.dumps({"threads": 1, "cases": n, "items": len(items), "lesion_slices_s": t1 - t0,
                      "render_s": t2 - t1, "total_s": t2 - t0, "s_per_case": (t2 - t0) / n}))


if __name__ == "__main__":
    main()
