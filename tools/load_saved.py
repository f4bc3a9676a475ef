#!/usr/bin/env python3
"""Load a `parquet_export format = "hf_arrow"` output back with
`datasets.load_from_disk`, as a user of the released CT-RATE-VQA would, and
compare it with the Parquet export of the same rows.

Checks, for every split of dataset_dict.json:
  * `datasets.load_from_disk(SAVED)` returns a DatasetDict with those splits;
  * its `image` feature is `datasets.Image` and rows decode to PIL images;
  * every row equals the Parquet export's row, column by column (images
    compared as bytes), in the same order.
Prints a JSON summary; exits 1 with a message on the first failed check.

Usage: python tools/load_saved.py SAVED_DIR PARQUET_DIR
"""

import glob
import json
import os
import sys


def fail(msg):
    print(f"load_saved: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        fail("usage: load_saved.py SAVED_DIR PARQUET_DIR")
    saved_dir, parquet_dir = sys.argv[1], sys.argv[2]

    import datasets
    import PIL.Image

    with open(os.path.join(saved_dir, "dataset_dict.json")) as f:
        splits = json.load(f)["splits"]
    saved = datasets.load_from_disk(saved_dir)
    if not isinstance(saved, datasets.DatasetDict) or sorted(saved.keys()) != sorted(splits):
        fail(f"load_from_disk gave {type(saved).__name__} {list(saved.keys())}, expected splits {splits}")
    summary = {"datasets_version": datasets.__version__, "splits": {}}
    for split in splits:
        ds = saved[split]
        if not isinstance(ds.features["image"], datasets.Image):
            fail(f"{split}: image feature is {ds.features['image']}, expected datasets.Image")
        if len(ds) and not isinstance(ds[0]["image"], PIL.Image.Image):
            fail(f"{split}: image decodes to {type(ds[0]['image'])}, expected a PIL image")
        files = sorted(glob.glob(os.path.join(parquet_dir, split, "*.parquet")))
        pq = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        raw = datasets.Image(decode=False)
        a, b = ds.cast_column("image", raw), pq.cast_column("image", raw)
        if len(a) != len(b):
            fail(f"{split}: {len(a)} rows from disk, {len(b)} in the Parquet export")
        if a.column_names != b.column_names:
            fail(f"{split}: columns {a.column_names} vs Parquet {b.column_names}")
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                diff = [k for k in x if x[k] != y[k]]
                fail(f"{split} row {i} ({x['id']}): columns {diff} differ from the Parquet export")
        summary["splits"][split] = {"rows": len(ds), "shards": len(ds.cache_files), "columns": a.column_names}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
