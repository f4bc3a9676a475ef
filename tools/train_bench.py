#!/usr/bin/env python3
"""Training speed and memory of the HF stack on our checkpoints, for
docs/benchmarks.md ("Training: SFT and GRPO vs transformers/TRL").

Modes:
  train_bench.py sft --model DIR --data PARQUET --steps N --batch-size B [--trainable mlp|all]
      transformers `Trainer` fine-tunes the checkpoint DIR (HF layout, loaded
      with Qwen2_5_VLForConditionalGeneration) on the Parquet split with the
      examples of our `sft` stage: think prompt + image in the user turn,
      `think_answer` target, loss on the assistant tokens only (prompt and
      image tokens get label -100), left padding, AdamW with warmup + cosine,
      gradient clipping 1.0. Trainer takes our image inputs as they are: the
      collator hands it input_ids / attention_mask / labels / pixel_values /
      image_grid_thw, and the model computes the shifted loss itself.
      Examples (images included) are encoded before training, as our stage
      does, so the timed window is forward + backward + optimizer step.
      Prints tokens/s per step (tokens = the unpadded tokens of the batch,
      prompt + image + target, as our stage counts them), peak RSS
      and trainable vs total parameters.
  train_bench.py grpo --model DIR --data PARQUET --steps N [--prompts-per-step P]
      TRL `GRPOTrainer` with num_generations = 5, the same prompts, the
      rewards format / validity / correctness (weights 1 / 1 / 2), beta 0.04,
      temperature 1.0, loss_type grpo, max_completion_length 64 (the mini
      recipe's grpo stage); prints the wall time of every step (the first is
      warm-up and left out of the summary), completion lengths and peak RSS.
  train_bench.py metrics DIR
      Summarise our stage's output DIR the same way (no venv needed): the
      step timings the stage noted in DIR/provenance.json (`notes.timing`:
      medians of the steps after the first; sft: tokens/s, grpo: seconds
      per step) and, for grpo, completion lengths and rewards from
      DIR/metrics.jsonl. Timings are not in metrics.jsonl: outputs hold
      results only, so identical training publishes identical bytes.

Both modes run on CPU with torch.set_num_threads(--threads), default 2 (the
development machine's cores), and end with one JSON line (`RESULT {...}`).

The script creates its venv under ~/.cache/medreason-pipeline/ exactly as
tools/env.sh `venv_for tools/requirements-bench.txt` does (same name, keyed
by the file's hash) and re-executes itself there.
"""

import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQS = ROOT / "tools" / "requirements-bench.txt"

# stages/data/src/vqa.rs THINK_TEMPLATE / NO_THINK_TEMPLATE.
THINK_TEMPLATE = (
    "{Question} Your task: 1. Think through the question step by step, enclose your reasoning process in "
    "<think>...</think> tags. 2. Then provide the correct single-letter choice (A, B, C, D,...) inside "
    "<answer>...</answer> tags. 3. No extra information or text outside of these tags."
)
NO_THINK_TEMPLATE = (
    "{Question} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside "
    "<answer>...</answer> tags. 2. No extra information or text outside of this tag."
)
# stages/train/src/sft.rs SftParams::think_text default.
THINK_TEXT = "The highlighted region and its magnified view show {class_name}."
# stages/eval/src/metrics.rs DEFAULT_ANSWER_REGEX / THINK_FORMAT_REGEX.
ANSWER_RE = re.compile(r"<answer>\s*(\w+)\s*</answer>")
FORMAT_RE = re.compile(r"(?s)^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$")
# The paper's trainable set (SftParams::trainable default).
MLP_RE = re.compile(r"^model\.language_model\.layers\.\d+\.mlp\.")
IGNORE = -100

# Where each constant above is defined on the Rust side, verbatim (a
# benchmark of different prompts or rewards would compare nothing).
RUST_SOURCES = {
    "stages/data/src/vqa.rs": [f'"{THINK_TEMPLATE}"', f'"{NO_THINK_TEMPLATE}"'],
    "stages/train/src/sft.rs": [f'"{THINK_TEXT}"', f'r"{MLP_RE.pattern}"'],
    "stages/eval/src/metrics.rs": [f'r"{ANSWER_RE.pattern}"', f'r"{FORMAT_RE.pattern}"'],
}


def check_constants():
    for rel, needles in RUST_SOURCES.items():
        text = (ROOT / rel).read_text()
        for n in needles:
            if n not in text:
                sys.exit(f"error: {rel} no longer contains {n}: update the constants of tools/train_bench.py")


def ensure_venv():
    digest = hashlib.sha256(REQS.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("MEDREASON_CACHE", Path.home() / ".cache" / "medreason-pipeline"))
    venv = cache / f"venv-requirements-bench-{digest}"
    if Path(sys.prefix).resolve() == venv.resolve() or os.environ.get("TRAIN_BENCH_SYSTEM_PYTHON") == "1":
        return
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(REQS)])
        (venv / ".complete").touch()
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def recover_question(problem: str) -> str:
    for t in (THINK_TEMPLATE, NO_THINK_TEMPLATE):
        prefix, suffix = t.split("{Question}")
        if problem.startswith(prefix) and problem.endswith(suffix):
            return problem[len(prefix) : len(problem) - len(suffix)]
    return problem


def user_text(problem: str) -> str:
    """The `think` prompt variant of stages/eval/src/prompt.rs user_text."""
    return THINK_TEMPLATE.replace("{Question}", recover_question(problem))


def read_rows(path: Path):
    """Rows of a parquet_export split (a directory of *.parquet or one file)."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        sys.exit(f"error: {path}: no *.parquet files (expected a split directory such as outputs/mini/export/train)")
    rows = []
    for f in files:
        for r in pq.read_table(f).to_pylist():
            missing = [c for c in ("id", "image", "problem", "answer", "options", "class_name") if c not in r]
            if missing:
                sys.exit(f"error: {f}: missing column(s) {missing}")
            if not r["image"] or not r["image"].get("bytes"):
                sys.exit(f"error: {f}: row `{r['id']}`: column `image.bytes` is empty")
            rows.append(r)
    if not rows:
        sys.exit(f"error: {path}: the split is empty")
    return rows


def decode_image(row):
    import io

    from PIL import Image

    try:
        return Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder error is bad input
        sys.exit(f"error: row `{row['id']}`: column `image.bytes` is not a decodable image: {e}")


def option_letters(options):
    return [o.split(".", 1)[0].strip() for o in options]


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def set_trainable(model, which: str):
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or bool(MLP_RE.search(name)))
    trainable, total = count_params(model)
    if trainable == 0:
        sys.exit(f"error: --trainable {which}: no parameter name matches {MLP_RE.pattern}")
    return trainable, total


# ---- SFT ---------------------------------------------------------------------


def encode_sft(rows, model_dir: Path):
    """Our sft stage's Encoder::encode: prompt and target tokenized apart,
    labels IGNORE on the prompt (system, image pads, question)."""
    import torch
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    proc = Qwen2VLImageProcessor.from_pretrained(str(model_dir))
    examples = []
    for r in rows:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(r["problem"])}]}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        vis = proc(images=[decode_image(r)], return_tensors="pt")
        n = int(vis["image_grid_thw"][0].prod()) // proc.merge_size**2
        prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n)
        target = f"<think>{THINK_TEXT.replace('{class_name}', r['class_name'])}</think>\n<answer> {r['answer']} </answer>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        examples.append(
            {
                "ids": p_ids + t_ids,
                "labels": [IGNORE] * len(p_ids) + t_ids,
                "pixel_values": vis["pixel_values"].to(torch.float32),
                "image_grid_thw": vis["image_grid_thw"],
            }
        )
    return examples


def collate_left(batch):
    """Left padding with id 0, as sft.rs batch_loss."""
    import torch

    n = max(len(e["ids"]) for e in batch)
    ids, mask, labels = [], [], []
    for e in batch:
        pad = n - len(e["ids"])
        ids.append([0] * pad + e["ids"])
        mask.append([0] * pad + [1] * len(e["ids"]))
        labels.append([IGNORE] * pad + e["labels"])
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
        "pixel_values": torch.cat([e["pixel_values"] for e in batch]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in batch]),
    }


def cmd_sft(args):
    torch = setup_torch(args.threads)
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    rows = read_rows(args.data)
    t0 = time.perf_counter()
    examples = encode_sft(rows, args.model)
    encode_s = time.perf_counter() - t0
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(args.model), torch_dtype=torch.float32)
    trainable, total = set_trainable(model, args.trainable)
    rss_loaded = current_rss_mib()

    step_tokens, step_secs = [], []

    class Timed(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        # on_step_begin comes after the batch is fetched; on_step_end after
        # clipping, optimizer and scheduler steps.
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_secs.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_ratio=0.1,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=17,
        )
        trainer = Timed(model=model, args=targs, train_dataset=examples, data_collator=collate_left, callbacks=[Clock()])
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    tps = [t / s for t, s in zip(step_tokens[1:], step_secs[1:])]
    res = {
        "mode": "sft",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "optim": str(targs.optim),
        "examples": len(examples),
        "steps": len(step_secs),
        "batch_size": args.batch_size,
        "trainable": args.trainable,
        "trainable_params": trainable,
        "total_params": total,
        "tokens_per_step_mean": statistics.mean(step_tokens),
        "tokens_per_s_median": statistics.median(tps),
        "tokens_per_s_overall": sum(step_tokens[1:]) / sum(step_secs[1:]),
        "step_s_median": statistics.median(step_secs[1:]),
        "encode_s": encode_s,
        "train_s": train_s,
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
        "load_avg_end": load_avg(),
    }
    print("RESULT " + json.dumps(res))


# ---- GRPO --------------------------------------------------------------------


def reward_format(completions, **kw):
    return [1.0 if FORMAT_RE.match(c[0]["content"]) else 0.0 for c in completions]


def _extract(text):
    m = ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def reward_validity(completions, letters, **kw):
    return [1.0 if _extract(c[0]["content"]) in opts else 0.0 for c, opts in zip(completions, letters)]


def reward_correctness(completions, letters, answer, **kw):
    out = []
    for c, opts, gold in zip(completions, letters, answer):
        a = _extract(c[0]["content"])
        out.append(1.0 if a is not None and a in opts and a == gold.strip() else 0.0)
    return out


def make_processor(model_dir: Path):
    """Qwen2_5_VLProcessor around the checkpoint's tokenizer.json and
    preprocessor_config.json (our checkpoints name the generic
    PreTrainedTokenizerFast, which AutoProcessor refuses for Qwen2.5-VL)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = Qwen2TokenizerFast.from_pretrained(str(model_dir))
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor.from_pretrained(str(model_dir)),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tok.chat_template,
    )


def cmd_grpo(args):
    torch = setup_torch(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = read_rows(args.data)
    ds = datasets.Dataset.from_list(
        [
            {
                # String content: TRL inserts the image placeholder before the
                # text, as our chat rendering does.
                "prompt": [{"role": "user", "content": user_text(r["problem"])}],
                "image": decode_image(r),
                "answer": r["answer"],
                "letters": option_letters(r["options"]),
            }
            for r in rows
        ]
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(args.model), torch_dtype=torch.float32)
    trainable, total = set_trainable(model, args.trainable)
    suppressed = [model.config.image_token_id, model.config.video_token_id]
    marks = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())

    g = 5
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out,
            num_generations=g,
            per_device_train_batch_size=g * args.prompts_per_step,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            max_prompt_length=None,
            max_completion_length=args.max_completion_length,
            temperature=1.0,
            top_p=1.0,
            beta=0.04,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            reward_weights=[1.0, 1.0, 2.0],
            # As our grpo stage: a sampled <|image_pad|> would break the
            # image-token count of the loss forward pass.
            generation_kwargs={"suppress_tokens": suppressed},
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            disable_tqdm=True,
            seed=17,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward_format, reward_validity, reward_correctness],
            args=cfg,
            train_dataset=ds,
            processing_class=make_processor(args.model),
            callbacks=[Clock()],
        )
        trainer.train()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    lengths = [h["completions/mean_length"] for h in logs]
    for i, s in enumerate(steps):
        extra = f" mean completion length {lengths[i]:.1f}" if i < len(lengths) else ""
        print(f"step {i + 1}: {s:.3f} s{extra}")
    res = {
        "mode": "grpo",
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_generations": g,
        "prompts_per_step": args.prompts_per_step,
        "max_completion_length": args.max_completion_length,
        "trainable": args.trainable,
        "trainable_params": trainable,
        "total_params": total,
        "steps": len(steps),
        "step_s": steps,
        "step_s_median_after_first": statistics.median(steps[1:]) if len(steps) > 1 else None,
        "step_s_mean_after_first": statistics.mean(steps[1:]) if len(steps) > 1 else None,
        "completion_length_mean": statistics.mean(lengths) if lengths else None,
        "reward_mean": statistics.mean(h["reward"] for h in logs) if logs else None,
        "peak_rss_mib": peak_rss_mib(),
        "load_avg_end": load_avg(),
    }
    print("RESULT " + json.dumps(res))


def cmd_metrics(out: Path):
    prov = out / "provenance.json"
    try:
        timing = json.loads(prov.read_text()).get("notes", {}).get("timing")
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {prov}: expected the provenance.json of a sft or grpo output: {e}")
    if not timing or timing.get("steps", 0) < 2:
        sys.exit(f"error: {prov}: no step timings of at least 2 steps in notes.timing (the first step is warm-up)")
    res = {"dir": str(out), "steps": timing["steps"], "first_step_s": timing["first_step_s"]}
    if "tokens_per_s_median" in timing:
        res["tokens_per_s_median"] = timing["tokens_per_s_median"]
    else:
        res["step_s_median_after_first"] = timing["step_s_median"]
        try:
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: {out / 'metrics.jsonl'}: expected one JSON object per line: {e}")
        lengths = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
        res["completion_length_mean"] = statistics.mean(lengths) if lengths else None
        rewards = [r["reward"] for r in rows if "reward" in r]
        res["reward_mean"] = statistics.mean(rewards) if rewards else None
    print("RESULT " + json.dumps(res))


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sft")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--trainable", choices=["mlp", "all"], default="all")
    s.add_argument("--lr", type=float, default=2e-3, help="the mini recipe's sft lr")
    g = sub.add_parser("grpo")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--data", type=Path, required=True)
    g.add_argument("--steps", type=int, required=True)
    g.add_argument("--prompts-per-step", type=int, default=2, help="the mini recipe's grpo prompts_per_step")
    g.add_argument("--max-completion-length", type=int, default=64)
    g.add_argument("--trainable", choices=["mlp", "all"], default="all")
    g.add_argument("--lr", type=float, default=3e-5, help="the mini recipe's grpo lr")
    for p in (s, g):
        p.add_argument("--threads", type=int, default=2)
    m = sub.add_parser("metrics")
    m.add_argument("dir", type=Path, help="an sft or grpo output directory")
    args = ap.parse_args()
    if args.cmd == "metrics":
        return cmd_metrics(args.dir)
    for p in (args.model, args.data):
        if not p.exists():
            sys.exit(f"error: {p} does not exist")
    if args.steps < 2:
        sys.exit("error: --steps must be at least 2 (the first step is warm-up and not counted)")
    check_constants()
    print(f"load average at start: {load_avg()}", flush=True)
    cmd_sft(args) if args.cmd == "sft" else cmd_grpo(args)


if __name__ == "__main__":
    if sys.argv[1:2] != ["metrics"]:
        ensure_venv()
    main()
