#!/usr/bin/env python3
"""Parity fixtures for the Rust Qwen2.5-VL / Qwen2-VL (crate stages-vlm) against HF transformers.

Modes:
  qwen_parity.py generate [--out DIR]
      Build a tiny random Qwen2.5-VL (window attention active, one full-attention
      block, tied embeddings), a tiny byte-level BPE tokenizer with the Qwen
      special tokens, two non-square images of different sizes; save the HF
      checkpoint and dump processor outputs, prefill logits and greedy
      generations into DIR (default stages/vlm/tests/fixtures/parity).
  qwen_parity.py generate-qwen2vl [--out DIR]
      The same for a tiny random Qwen2-VL (`Qwen2VLForConditionalGeneration`:
      LayerNorm + QuickGELU vision blocks, full attention, LayerNorm merger,
      mlp_ratio 1.5, untied lm_head) into DIR (default
      stages/vlm/tests/fixtures/parity_qwen2vl).
  qwen_parity.py generate-text [--out DIR]
      The same for a plain Qwen2 causal LM (`Qwen2ForCausalLM`, the judge's
      text-only model): tiny random checkpoint with untied lm_head, a
      Qwen2.5-Instruct-style chat template, two left-padded chat prompts;
      dumps prefill logits and greedy generations into DIR (default
      stages/vlm/tests/fixtures/parity_text).
  qwen_parity.py check-rust-checkpoint DIR [--fixtures DIR]
      Load a checkpoint written by the Rust side with `from_pretrained`, run the
      fixture batch and compare logits with the fixture (max abs diff). The
      default fixtures follow the checkpoint's `model_type` (parity,
      parity_text or parity_qwen2vl).
  qwen_parity.py compare-dump CKPT DUMP
      Load CKPT (weights, tokenizer, image processor) in transformers, run the
      inputs of DUMP (written by `pipeline model generate --dump-logits`) and
      compare with the Rust logits in DUMP.
  qwen_parity.py make-7b-shaped DIR [--text-layers N] [--vision-blocks N]
      Write a random bf16 checkpoint with Qwen2.5-VL-7B shapes (optionally
      fewer layers) for load-memory benchmarks; prints its size and the peak
      RSS of transformers loading it.
  qwen_parity.py bench [--threads N] [--full-layer DIR] [--new-tokens N]
      Time HF prefill and greedy generation on CPU (for docs/benchmarks.md).

The script creates its own venv under ~/.cache/medreason-pipeline/ keyed by
the hash of tools/requirements-parity.txt and re-executes itself there.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQS = ROOT / "tools" / "requirements-parity.txt"
DEFAULT_FIXTURES = ROOT / "stages" / "vlm" / "tests" / "fixtures" / "parity"
DEFAULT_TEXT_FIXTURES = ROOT / "stages" / "vlm" / "tests" / "fixtures" / "parity_text"
DEFAULT_QWEN2VL_FIXTURES = ROOT / "stages" / "vlm" / "tests" / "fixtures" / "parity_qwen2vl"


def ensure_venv():
    digest = hashlib.sha256(REQS.read_bytes()).hexdigest()[:12]
    venv = Path.home() / ".cache" / "medreason-pipeline" / f"venv-parity-{digest}"
    if Path(sys.prefix).resolve() == venv.resolve() or os.environ.get("QWEN_PARITY_SYSTEM_PYTHON") == "1":
        # The second case: a machine without network that already has torch +
        # transformers (e.g. the GPU box); versions are printed by each mode.
        return
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "-r", str(REQS)])
        stamp.write_text("ok\n")
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<think>", "</think>", "<answer>", "</answer>",
]

# The Qwen2.5-VL-Instruct chat template (chat_template.json of the release).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML in the style of the Qwen2.5-Instruct release template (its default
# system prompt and `{%- -%}` whitespace control; the tool-call branches are
# left out): what a text-only judge checkpoint renders.
TEXT_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

TEXT_CHATS = [
    [{"role": "user", "content": "Reasoning: hazy ground-glass opacity in the right lobe.\nOptions:\nA. emphysema\nB. ground-glass opacity\nWhich option? Reply with the letter."}],
    [{"role": "system", "content": "You judge radiology reasoning."}, {"role": "user", "content": "Nodule or effusion?"}],
]

CORPUS = [
    "What abnormality is visible in the lung slice? Options: A. emphysema B. nodule C. effusion D. fibrosis",
    "The chest CT shows a ground-glass opacity in the right upper lobe.",
    "Think step by step about the lesion, then answer with a single letter.",
    "Consolidation and atelectasis are present near the pleura; no pneumothorax.",
    "Describe the magnified patch in the upper-left corner of the image.",
] * 4

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 20
# (width, height): A is downscaled below max_pixels, B is upscaled to min_pixels.
IMAGE_SIZES = {"image_a.png": (173, 121), "image_b.png": (50, 40)}
PROMPTS = [
    ("image_a.png", "What is shown in this slice?"),
    ("image_b.png", "Describe the lesion and answer in <answer></answer> tags."),
]
MAX_NEW_TOKENS = 12


def build_tokenizer(out: Path, template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, AddedToken

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS[:7]])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in SPECIALS[7:]])
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 32768,
        "padding_side": "left",
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    return tok


def make_images(out: Path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    for name, (w, h) in IMAGE_SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 64) * 4], -1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(out / name)


def tiny_config(tok):
    from transformers import Qwen2_5_VLConfig

    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    return Qwen2_5_VLConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_config={
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [2],
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
    )


def tiny_qwen2vl_config(tok):
    """A tiny Qwen2-VL. Its vision keys are Qwen2VLVisionConfig's (embed_dim,
    mlp_ratio, hidden_size = the text width); mlp_ratio 1.5 makes fc1 48 wide,
    so a reader that ignored it (HF default 4) would fail on shapes; the
    untied lm_head is Qwen2-VL-7B's layout (the 2.5 fixture covers tied)."""
    from transformers import Qwen2VLConfig

    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    return Qwen2VLConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_config={
            "depth": 3,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 1.5,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
        },
    )


def image_processor(ckpt: Path):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor.from_pretrained(str(ckpt))


def build_batch(ckpt: Path, image_dir: Path):
    """What Qwen2_5_VLProcessor does for images: chat template, expand each
    <|image_pad|> to t*h*w/4 copies, tokenize, left-pad."""
    from PIL import Image
    from transformers import PreTrainedTokenizerFast
    import torch

    tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    proc = image_processor(ckpt)
    images = [Image.open(image_dir / name).convert("RGB") for name, _ in PROMPTS]
    vis = proc(images=images, return_tensors="pt")
    grid = vis["image_grid_thw"]
    texts = []
    for i, (_, question) in enumerate(PROMPTS):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        n = int(grid[i].prod()) // 4
        texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * n))
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return {
        "texts": texts,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": vis["pixel_values"].to(torch.float32),
        "image_grid_thw": grid,
    }


def with_token_types(model, batch):
    """transformers >= 5 computes 3D (mRoPE) positions only when given
    `mm_token_type_ids` (0 text, 1 image) and silently falls back to 1D
    positions otherwise; 4.x derives them from input_ids."""
    import transformers

    # Only model inputs: `texts` (kept for the fixture's meta) is not one, and
    # Qwen2-VL's `generate` rejects unknown keyword arguments.
    batch = {k: v for k, v in batch.items() if k != "texts"}
    if int(transformers.__version__.split(".")[0]) >= 5 and batch.get("pixel_values") is not None:
        batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    return batch


def run_model(model, batch):
    import torch

    b = with_token_types(model, batch)
    with torch.no_grad():
        out = model(**{k: v for k, v in b.items() if v is not None})
    return out.logits.float()


def greedy(model, batch, eos_id, max_new=MAX_NEW_TOKENS):
    import torch

    with torch.no_grad():
        seq = model.generate(
            **with_token_types(model, batch),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    L = batch["input_ids"].shape[1]
    rows = []
    for r in seq[:, L:].tolist():
        # Cut after the first eos: HF pads finished rows with pad_token_id.
        rows.append(r[: r.index(eos_id) + 1] if eos_id in r else r)
    return rows


def cmd_generate(out: Path, arch: str = "qwen2_5_vl"):
    """Fixtures of a tiny VL model: `arch` is the config's model_type."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    tok = build_tokenizer(ckpt)
    make_images(out)
    if arch == "qwen2_vl":
        cfg = tiny_qwen2vl_config(tok)
        model = Qwen2VLForConditionalGeneration(cfg).eval()
    else:
        cfg = tiny_config(tok)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    perturb(model)
    model.save_pretrained(str(ckpt), safe_serialization=True)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(str(ckpt))

    batch = build_batch(ckpt, out)
    logits = run_model(model, batch)
    eos = cfg.eos_token_id
    gen = greedy(model, batch, eos)
    save_file(
        {
            "input_ids": batch["input_ids"].contiguous(),
            "attention_mask": batch["attention_mask"].contiguous(),
            "pixel_values": batch["pixel_values"].contiguous(),
            "image_grid_thw": batch["image_grid_thw"].contiguous(),
            "logits": logits.contiguous(),
        },
        str(out / "expected.safetensors"),
    )
    meta = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "model_type": cfg.model_type,
        "prompts": [{"image": i, "question": q} for i, q in PROMPTS],
        "texts": batch["texts"],
        "greedy_tokens": gen,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": eos,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote fixtures to {out} ({total / 1e6:.2f} MB); grids {batch['image_grid_thw'].tolist()}; greedy {gen}")


def perturb(model):
    """HF init (std 0.02, norms 1, biases 0) gives near-uniform logits and a
    degenerate greedy path; larger random weights make every term matter."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.15)


def text_positions(mask):
    """What `generate` feeds Qwen2 for left-padded rows (and what HF
    `get_rope_index` gives Qwen2.5-VL for text): cumsum(mask) - 1, pads at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def model_type(ckpt: Path) -> str:
    return json.loads((ckpt / "config.json").read_text()).get("model_type", "qwen2_5_vl")


def is_text_checkpoint(ckpt: Path) -> bool:
    return model_type(ckpt) == "qwen2"


def hf_class(ckpt: Path):
    """The transformers class of a checkpoint, by its `model_type`."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration

    classes = {"qwen2": Qwen2ForCausalLM, "qwen2_vl": Qwen2VLForConditionalGeneration,
               "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    mt = model_type(ckpt)
    if mt not in classes:
        sys.exit(f"{ckpt}/config.json: unsupported model_type {mt!r}; supported: {', '.join(classes)}")
    return classes[mt]


def default_fixtures(ckpt: Path) -> Path:
    return {"qwen2": DEFAULT_TEXT_FIXTURES, "qwen2_vl": DEFAULT_QWEN2VL_FIXTURES}.get(model_type(ckpt), DEFAULT_FIXTURES)


def load_hf(ckpt: Path, dtype):
    """Qwen2ForCausalLM, Qwen2VLForConditionalGeneration or
    Qwen2_5_VLForConditionalGeneration, by `model_type`."""
    return hf_class(ckpt).from_pretrained(str(ckpt), torch_dtype=dtype).eval()


def run_text_model(model, input_ids, attention_mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=text_positions(attention_mask))
    return out.logits.float()


def cmd_generate_text(out: Path):
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    tok = build_tokenizer(ckpt, TEXT_CHAT_TEMPLATE)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    cfg = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        hidden_act="silu",
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    model = Qwen2ForCausalLM(cfg).eval()
    perturb(model)
    model.save_pretrained(str(ckpt), safe_serialization=True)

    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    texts = [hf_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in TEXT_CHATS]
    enc = hf_tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    logits = run_text_model(model, enc["input_ids"], enc["attention_mask"])
    eos = cfg.eos_token_id
    gen = greedy(model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, eos)
    save_file(
        {
            "input_ids": enc["input_ids"].contiguous(),
            "attention_mask": enc["attention_mask"].contiguous(),
            "logits": logits.contiguous(),
        },
        str(out / "expected.safetensors"),
    )
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "chats": TEXT_CHATS,
        "texts": texts,
        "greedy_tokens": gen,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": eos,
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote text fixtures to {out} ({total / 1e6:.2f} MB); greedy {gen}")


def cmd_check(rust_ckpt: Path, fixtures: Path | None):
    import torch
    from safetensors.torch import load_file

    fixtures = fixtures or default_fixtures(rust_ckpt)
    exp = load_file(str(fixtures / "expected.safetensors"))
    model = load_hf(rust_ckpt, torch.float32)
    print(f"{type(model).__name__} (model_type {model_type(rust_ckpt)!r}) vs fixtures {fixtures}")
    if is_text_checkpoint(rust_ckpt):
        logits = run_text_model(model, exp["input_ids"], exp["attention_mask"])
    else:
        batch = {k: exp[k] for k in ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]}
        logits = run_model(model, batch)
    mask = exp["attention_mask"].bool()
    diff = (logits - exp["logits"]).abs()[mask].max().item()
    print(f"checkpoint {rust_ckpt}: loaded by transformers; logits max abs diff vs fixture = {diff:.3e}")
    if diff > 1e-5:
        sys.exit(f"FAIL: max abs diff {diff} > 1e-5")
    print("OK")


def cmd_compare_dump(ckpt: Path, dump: Path, tol: float, hf_bf16_cuda: bool):
    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    d = load_file(str(dump))
    model = load_hf(ckpt, torch.float32)
    tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    batch = {k: d[k] for k in ["input_ids", "attention_mask"]}
    if is_text_checkpoint(ckpt):
        if hf_bf16_cuda:
            sys.exit("--hf-bf16-cuda is only implemented for VL checkpoints")
        logits = run_text_model(model, batch["input_ids"], batch["attention_mask"])
    else:
        image_processor(ckpt)  # must load too
        batch["pixel_values"] = d.get("pixel_values")
        batch["image_grid_thw"] = d.get("image_grid_thw")
        logits = run_model(model, batch)
    mask = d["attention_mask"].bool()
    diff = (logits - d["logits"]).abs()[mask].max().item()
    text = tok.decode(d["input_ids"][0][mask[0]].tolist())
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{ckpt}: transformers loads it; prompt {text[:80]!r}...; logits max abs diff Rust dump vs HF f32 CPU = {diff:.3e}")
    if hf_bf16_cuda:
        m16 = hf_class(ckpt).from_pretrained(str(ckpt), torch_dtype=torch.bfloat16).cuda().eval()
        b16 = {k: v.cuda() for k, v in with_token_types(m16, batch).items() if v is not None}
        b16["pixel_values"] = b16["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            l16 = m16(**b16).logits.float().cpu()
        d16 = (l16 - logits).abs()[mask].max().item()
        print(f"HF bf16 CUDA vs HF f32 CPU: logits max abs diff = {d16:.3e} (for scale: max |logit| {logits.abs().max().item():.2f})")
    if diff > tol:
        sys.exit(f"FAIL: max abs diff {diff} > {tol}")
    print("OK")


def bench_batch(fixtures: Path):
    """Row 0 of the fixture batch (image_a + its question), unpadded: the
    same prompt `pipeline model bench --image image_a.png --prompt ...` builds."""
    from safetensors.torch import load_file

    exp = load_file(str(fixtures / "expected.safetensors"))
    keep = exp["attention_mask"][0].bool()
    n0 = int(exp["image_grid_thw"][0].prod())
    return {
        "input_ids": exp["input_ids"][:1, keep],
        "attention_mask": exp["attention_mask"][:1, keep],
        "pixel_values": exp["pixel_values"][:n0],
        "image_grid_thw": exp["image_grid_thw"][:1],
    }


def full_layer_checkpoint(out: Path):
    """Qwen2.5-VL-7B shapes with 1 decoder layer and 1 vision block (window
    attention), vocab cut to 8192 so the layer, not the lm_head, dominates."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    if (out / "config.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    cfg = Qwen2_5_VLConfig(
        vocab_size=8192, hidden_size=3584, intermediate_size=18944, num_hidden_layers=1, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False,
        bos_token_id=400, eos_token_id=402, pad_token_id=400, image_token_id=405, video_token_id=406,
        vision_start_token_id=403, vision_end_token_id=404,
        vision_config={"depth": 1, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [], "tokens_per_second": 2, "hidden_act": "silu"},
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=512 * 28 * 28).save_pretrained(str(out))
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, size=(512, 512, 3), dtype=np.uint8), "RGB").save(out / "bench.png")


def cmd_make_7b(out: Path, text_layers: int, vision_blocks: int):
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
        vision_config={"depth": vision_blocks, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [i for i in (7, 15, 23, 31) if i < vision_blocks],
                       "tokens_per_second": 2, "hidden_act": "silu"},
    )
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2_5_VLForConditionalGeneration(cfg).state_dict().items()}
    shard, shard_bytes, n, weight_map, total = {}, 0, 0, {}, 0
    limit = 4 << 30

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            for k in shard:
                weight_map[k] = name
            shard, shard_bytes = {}, 0

    g = torch.Generator().manual_seed(0)
    for k, shape in sorted(shapes.items()):
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if shard_bytes + nbytes > limit:
            flush()
        shard[k] = t
        shard_bytes += nbytes
        total += nbytes
    flush()
    # Rename to HF's -of- pattern now that the count is known.
    final = {}
    for i in range(1, n + 1):
        (out / f"model-{i:05d}.safetensors").rename(out / f"model-{i:05d}-of-{n:05d}.safetensors")
    for k, v in weight_map.items():
        i = int(v[6:11])
        final[k] = f"model-{i:05d}-of-{n:05d}.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": final}))
    cfg.save_pretrained(str(out))
    build_tokenizer(out)
    print(f"wrote {out}: {total / 2**20:.0f} MiB of bf16 weights in {n} shards")
    # Measure transformers' own load in a fresh process (this one holds the
    # generated tensors). Touch every weight once (a sum) so lazily mmapped
    # tensors count as they would in a forward pass.
    probe = (
        "import json,resource,sys,time,torch\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration as M\n"
        "t0=time.perf_counter(); m=M.from_pretrained(sys.argv[1], dtype=torch.bfloat16); t=time.perf_counter()-t0\n"
        "s=sum(float(p.float().sum()) for p in m.parameters())\n"
        "print(json.dumps({'impl':'hf','load_s':t,'load_peak_rss_mb':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, check=True)
    print(res.stdout.strip().splitlines()[-1], f"(checkpoint {total / 2**20:.0f} MiB)")


def cmd_bench(threads: int, fixtures: Path, full_layer: Path | None, new: int, cuda_bf16: bool):
    import time
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    if full_layer is not None:
        full_layer_checkpoint(full_layer)
        from PIL import Image
        from transformers import PreTrainedTokenizerFast

        ckpt = full_layer
        tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
        vis = image_processor(ckpt)(images=[Image.open(ckpt / "bench.png").convert("RGB")], return_tensors="pt")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0][1]}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(vis["image_grid_thw"][0].prod()) // 4))
        enc = tok([text], return_tensors="pt", add_special_tokens=False)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}
    else:
        ckpt = fixtures / "checkpoint"
        batch = bench_batch(fixtures)
    dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt), torch_dtype=dtype).eval()
    if cuda_bf16:
        model = model.cuda()
        batch = {k: v.cuda() for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    sync = torch.cuda.synchronize if cuda_bf16 else (lambda: None)
    run_model(model, batch)
    sync()
    n = 3 if (full_layer is not None and not cuda_bf16) else 20
    t0 = time.perf_counter()
    for _ in range(n):
        run_model(model, batch)
    sync()
    fwd = (time.perf_counter() - t0) / n
    with torch.no_grad():
        t0 = time.perf_counter()
        seq = model.generate(**with_token_types(model, batch), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0)
        sync()
        dt = time.perf_counter() - t0
    toks = (seq.shape[1] - batch["input_ids"].shape[1]) * seq.shape[0]
    import transformers

    print(json.dumps({"impl": f"hf-{transformers.__version__}", "device": "cuda-bf16" if cuda_bf16 else "cpu-f32",
                      "ckpt": str(ckpt), "threads": threads, "prompt_tokens": list(batch["input_ids"].shape),
                      "prefill_ms": fwd * 1e3, "generate_tokens_per_s": toks / dt, "generate_new_tokens": toks,
                      "generate_s": dt}))


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, default=DEFAULT_FIXTURES)
    gt = sub.add_parser("generate-text")
    gt.add_argument("--out", type=Path, default=DEFAULT_TEXT_FIXTURES)
    gq = sub.add_parser("generate-qwen2vl")
    gq.add_argument("--out", type=Path, default=DEFAULT_QWEN2VL_FIXTURES)
    c = sub.add_parser("check-rust-checkpoint")
    c.add_argument("dir", type=Path)
    c.add_argument("--fixtures", type=Path, default=None, help="default: by the checkpoint's model_type")
    cd = sub.add_parser("compare-dump")
    cd.add_argument("ckpt", type=Path)
    cd.add_argument("dump", type=Path)
    cd.add_argument("--tol", type=float, default=1e-4)
    cd.add_argument("--hf-bf16-cuda", action="store_true", help="also report HF bf16-on-CUDA vs HF f32 logits")
    m7 = sub.add_parser("make-7b-shaped")
    m7.add_argument("dir", type=Path)
    m7.add_argument("--text-layers", type=int, default=28)
    m7.add_argument("--vision-blocks", type=int, default=32)
    b = sub.add_parser("bench")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    b.add_argument("--full-layer", type=Path, default=None,
                   help="benchmark a 7B-shaped 1-layer checkpoint kept in this directory (created if absent)")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--cuda-bf16", action="store_true", help="run on the GPU in bf16 instead of CPU f32")
    args = ap.parse_args()
    if args.cmd == "generate":
        cmd_generate(args.out)
    elif args.cmd == "generate-text":
        cmd_generate_text(args.out)
    elif args.cmd == "generate-qwen2vl":
        cmd_generate(args.out, "qwen2_vl")
    elif args.cmd == "check-rust-checkpoint":
        cmd_check(args.dir, args.fixtures)
    elif args.cmd == "make-7b-shaped":
        cmd_make_7b(args.dir, args.text_layers, args.vision_blocks)
    elif args.cmd == "compare-dump":
        cmd_compare_dump(args.ckpt, args.dump, args.tol, args.hf_bf16_cuda)
    else:
        cmd_bench(args.threads, args.fixtures, args.full_layer, args.new_tokens, args.cuda_bf16)


if __name__ == "__main__":
    ensure_venv()
    main()
