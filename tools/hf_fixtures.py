#!/usr/bin/env python3
"""Write the small committed fixtures of the HF readers (`hf_vqa`, `hf_disk_vqa`).

Each fixture is written by the library its real counterpart comes from, in
that counterpart's layout (column names and types as on the hub), with tiny
PNGs so the whole set stays a few KB per file:

  chartqa_m4/data/{test,train}-*.parquet   HuggingFaceM4/ChartQA: image, query,
                                           label (list), human_or_machine (ClassLabel)
  chartqa_lmms/data/test-*.parquet         lmms-lab/ChartQA: type, question, answer, image
  textvqa/data/{validation,train}-*.parquet lmms-lab/textvqa: image_id, question_id,
                                           question, image, answers (10), ocr_tokens
  chartqa_bad/data/test-*.parquet          ChartQA with `question` instead of `query`
  ctrvqa_test/                             DatasetDict.save_to_disk (one split named
                                           `train`, as the released test set), 3 shards,
                                           R1-V columns image/problem/solution
  ctrvqa_bad/                              Dataset.save_to_disk, 3 shards of 2 rows; row 4
                                           (row 0 of the third shard) has no image

Usage:
  python=$(source tools/env.sh; venv_for tools/requirements-data.txt)
  "$python" tools/hf_fixtures.py stages/data/tests/fixtures/hf
"""

import io
import os
import shutil
import sys


def png(shade):
    from PIL import Image

    img = Image.new("L", (8, 8), color=shade)
    img.putpixel((1, 1), 255 - shade)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image(shade):
    return {"bytes": png(shade), "path": None}


def main():
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

    out = sys.argv[1]
    shutil.rmtree(out, ignore_errors=True)

    def parquet(ds, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ds.to_parquet(path)

    # HuggingFaceM4/ChartQA: two test shards (hub names carry a hash suffix) and a train shard.
    m4 = Features({"image": Image(), "query": Value("string"), "label": List(Value("string")),
                   "human_or_machine": ClassLabel(names=["human", "machine"])})
    rows = [
        ("What is the value of the tallest bar?", ["12.5"], 0),
        ("How many bars are above 40?", ["3"], 1),
        ("Which year has the lowest value?", ["2019"], 0),
        ("What is the difference between A and B?", ["0.25"], 1),
        ("Is the line increasing?", ["Yes"], 0),
    ]
    ds = Dataset.from_dict({"image": [image(20 * i) for i in range(5)], "query": [r[0] for r in rows],
                            "label": [r[1] for r in rows], "human_or_machine": [r[2] for r in rows]}, features=m4)
    parquet(ds.select(range(3)), f"{out}/chartqa_m4/data/test-00000-of-00002-1a2b3c4d5e6f7a8b.parquet")
    parquet(ds.select(range(3, 5)), f"{out}/chartqa_m4/data/test-00001-of-00002-9c8d7e6f5a4b3c2d.parquet")
    parquet(ds.select([0]), f"{out}/chartqa_m4/data/train-00000-of-00001-0f1e2d3c4b5a6978.parquet")

    # lmms-lab/ChartQA (what lmms-eval evaluates).
    lmms = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"), "image": Image()})
    ds = Dataset.from_dict({"type": ["human_test", "human_test", "augmented_test"],
                            "question": ["What is the peak value?", "What percent is shown for 2020?", "Which is larger?"],
                            "answer": ["45", "12%", "Germany"],
                            "image": [image(60), image(90), image(120)]}, features=lmms)
    parquet(ds, f"{out}/chartqa_lmms/data/test-00000-of-00001.parquet")

    # lmms-lab/textvqa: 10 human answers per question.
    tv = Features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                   "image": Image(), "answers": List(Value("string")), "ocr_tokens": List(Value("string"))})
    answers = [
        ["stop"] * 7 + ["stop sign", "Stop", "halt"],
        ["coca-cola", "coca cola", "Coca Cola", "coke", "coke", "pepsi", "coca-cola", "coca cola", "cola", "coke"],
        ["two", "2", "2", "two", "2", "3", "2", "two", "2", "2"],
    ]
    ds = Dataset.from_dict({"image_id": ["a1", "b2", "c3"], "question_id": [34602, 34603, 34604],
                            "question": ["what does the sign say?", "what brand is the drink?", "how many people?"],
                            "image": [image(30), image(130), image(230)], "answers": answers,
                            "ocr_tokens": [["STOP"], ["Coca", "Cola"], []]}, features=tv)
    parquet(ds, f"{out}/textvqa/data/validation-00000-of-00001.parquet")
    parquet(ds.select([2]), f"{out}/textvqa/data/train-00000-of-00001.parquet")

    # A ChartQA download whose question column is not where the preset expects it.
    bad = Features({"image": Image(), "question": Value("string"), "label": List(Value("string")),
                    "human_or_machine": ClassLabel(names=["human", "machine"])})
    ds = Dataset.from_dict({"image": [image(5)], "question": ["q?"], "label": [["1"]], "human_or_machine": [0]},
                           features=bad)
    parquet(ds, f"{out}/chartqa_bad/data/test-00000-of-00001.parquet")

    # The released CT-RATE-VQA layout: R1-V columns, a DatasetDict with one split `train`.
    names = ["airway abnormalities", "emphysema", "fibrosis-related changes", "pulmonary nodules/masses",
             "consolidation/atelectasis", "ground-glass opacity", "pleural effusion/thickening"]
    options = "\n".join(f"{chr(65 + i)}. {n}" for i, n in enumerate(names))
    think = ("{Question} Your task: 1. Think through the question step by step, enclose your reasoning process "
             "in <think>...</think> tags. 2. Then provide the correct single-letter choice (A, B, C, D,...) inside "
             "<answer>...</answer> tags. 3. No extra information or text outside of these tags.")
    question = f"Which type of lesion is marked in this chest CT slice?\nOptions:\n{options}"
    gold = ["B", "D", "G", "A", "F", "C", "E"]
    r1v = Features({"image": Image(), "problem": Value("string"), "solution": Value("string")})
    ds = Dataset.from_dict({"image": [image(10 + 30 * i) for i in range(7)],
                            "problem": [think.replace("{Question}", question)] * 7,
                            "solution": [f"<answer> {g} </answer>" for g in gold]}, features=r1v)
    DatasetDict({"train": ds}).save_to_disk(f"{out}/ctrvqa_test", num_shards={"train": 3})

    # An image-less row: row 4 overall, row 0 of the third shard.
    imgs = [image(10 + 30 * i) for i in range(6)]
    imgs[4] = None
    ds = Dataset.from_dict({"image": imgs, "problem": [question] * 6,
                            "solution": [f"<answer> {g} </answer>" for g in gold[:6]]}, features=r1v)
    ds.save_to_disk(f"{out}/ctrvqa_bad", num_shards=3)

    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"fixtures written to {out} ({total} bytes, datasets {datasets.__version__})")


if __name__ == "__main__":
    main()
