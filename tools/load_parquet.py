#!/usr/bin/env python3
"""Load a `parquet_export` output back the way a Hugging Face user would.

Checks, for every split listed in dataset_info.json:
  * pyarrow reads every shard; the `image` column is struct<bytes, path>;
  * `datasets.load_dataset("parquet", data_files=...)` loads the split, and
    after `cast_column("image", datasets.Image())` rows decode to PIL images
    (of `--expect-size WxH` when given) with every box inside the image;
  * row counts match dataset_info.json; `solution` is `<answer> X </answer>`
    with X = `answer`;
  * `datasets.load_dataset(DIR)` (configs and features from the README card)
    gives the same row counts.
Prints a JSON summary; exits 1 with a message on the first failed check.

Usage: python tools/load_parquet.py DIR [--expect-size 90x60]
"""

import argparse
import glob
import json
import os
import sys


def fail(msg):
    print(f"load_parquet: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--expect-size", help="WxH every image must have")
    args = ap.parse_args()

    import datasets
    import PIL.Image
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(os.path.join(args.dir, "dataset_info.json")) as f:
        info = json.load(f)
    expect = tuple(int(v) for v in args.expect_size.split("x")) if args.expect_size else None
    summary = {"datasets_version": datasets.__version__, "pyarrow_version": pa.__version__, "splits": {}}
    data_files = {}
    for split, meta in info["splits"].items():
        files = sorted(glob.glob(os.path.join(args.dir, split, "*.parquet")))
        if len(files) != len(meta["shards"]):
            fail(f"{split}: {len(files)} shard files, dataset_info.json lists {len(meta['shards'])}")
        data_files[split] = files
        rows = 0
        for path in files:
            table = pq.read_table(path)
            image_type = table.schema.field("image").type
            want = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            if image_type != want:
                fail(f"{path}: image column is {image_type}, expected {want}")
            rows += table.num_rows
        if rows != meta["num_examples"]:
            fail(f"{split}: pyarrow read {rows} rows, dataset_info.json says {meta['num_examples']}")

        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        ds = ds.cast_column("image", datasets.Image())
        if len(ds) != rows:
            fail(f"{split}: datasets loaded {len(ds)} rows, pyarrow {rows}")
        for i, row in enumerate(ds):
            img = row["image"]
            if not isinstance(img, PIL.Image.Image):
                fail(f"{split} row {i}: image decoded to {type(img)}, expected a PIL image")
            if expect and img.size != expect:
                fail(f"{split} row {i} ({row['id']}): image size {img.size}, expected {expect}")
            for b in row["boxes"]:
                if not (0 <= b["x0"] < b["x1"] <= img.size[0] and 0 <= b["y0"] < b["y1"] <= img.size[1]):
                    fail(f"{split} row {i} ({row['id']}): box {b} outside the {img.size} image")
            if row["solution"] != f"<answer> {row['answer']} </answer>":
                fail(f"{split} row {i}: solution {row['solution']!r} does not hold answer {row['answer']!r}")
            if row["split"] != split:
                fail(f"{split} row {i}: split column is {row['split']!r}")
        summary["splits"][split] = {
            "rows": len(ds),
            "shards": len(files),
            "first_image_size": list(ds[0]["image"].size) if len(ds) else None,
            "features": sorted(ds.features.keys()),
        }

    # The README card (configs + dataset_info) must describe the same data.
    card = datasets.load_dataset(args.dir)
    for split, meta in summary["splits"].items():
        if card[split].num_rows != meta["rows"]:
            fail(f"load_dataset(DIR)[{split}] has {card[split].num_rows} rows, expected {meta['rows']}")
        if len(card[split]) and not isinstance(card[split][0]["image"], PIL.Image.Image):
            fail(f"load_dataset(DIR)[{split}]: image is not decoded as datasets.Image from the card")
    summary["card_load"] = "ok"
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
