#!/usr/bin/env python3
"""nibabel reference for the NIfTI read benchmark (see
stages/data/examples/nifti_read_bench.rs, which generates DIR).

    tools/bench_nifti_read.py DIR [REPEATS]

Times nibabel loading the CT as float32 with scaling (get_fdata) and the
mask as integers (dataobj), i.e. the same work as read_f32/read_labels.
"""
import glob
import sys
import time

import nibabel as nib
import numpy as np


def main(d, repeats=3):
    ct = sorted(glob.glob(f"{d}/images/*.nii.gz"))[0]
    mask = sorted(glob.glob(f"{d}/segmentations/*.nii.gz"))[0]
    for what, path in [("ct get_fdata(float32)", ct), ("mask dataobj", mask)]:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            img = nib.load(path)
            if what.startswith("ct"):
                arr = img.get_fdata(dtype=np.float32)
            else:
                arr = np.asarray(img.dataobj)
            best = min(best, time.perf_counter() - t)
        mb = np.prod(img.shape) * img.get_data_dtype().itemsize / 1e6
        print(f"{what}: {img.shape} {img.get_data_dtype()} ({mb:.1f} MB voxels): best {best:.3f} s = {mb / best:.0f} MB/s")
        del arr


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
