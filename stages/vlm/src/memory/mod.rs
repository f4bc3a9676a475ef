//! Predicted memory of training and running a Qwen2.5-VL model, per rank,
//! from its config alone (no weights, no tch): what `pipeline plan` shows
//! for `sft`, `grpo` and `eval`. Every term is a documented formula over
//! the config's tensor shapes; `docs/benchmarks.md` compares them with
//! measured peaks.
//!
//! Notation: Ψ parameters (all), Ψₜ trainable parameters (the recipe's
//! `trainable` regexes over HF names), s bytes per parameter element (4 f32,
//! 2 bf16/f16), N data-parallel ranks, B micro-batch rows, L sequence
//! length, T = B·L tokens, h hidden size, I MLP width, V vocabulary, n_h
//! attention heads, n_kv key/value heads, d head dim.
//!
//! **Model states** (resident for the whole stage) follow ZeRO's accounting
//! for mixed-precision Adam (Rajbhandari et al., "ZeRO: Memory Optimizations
//! Toward Training Trillion Parameter Models", SC'20, §3.1 and Fig. 1: 2Ψ
//! fp16 weights + 2Ψ fp16 gradients + KΨ optimizer state with K = 12 = fp32
//! master copy, momentum and variance; stage 1 divides the KΨ by N_d, stage 2
//! also the gradients), with what is specific to us:
//! - only the trainable subset has gradients, moments and masters (Ψₜ, not Ψ);
//! - the weights are s·Ψ (f32 on the CPU: s = 4);
//! - AdamW moments are f32 whatever the weights are (`optim.rs`): 8Ψₜ;
//! - the f32 master copy exists only for 16-bit weights: 4Ψₜ when s < 4;
//! - GRPO's frozen KL reference copies the trainable tensors only (the
//!   frozen ones are shared with the policy): s·Ψₜ when β ≠ 0.
//!
//! **Activations** are the tensors autograd saves for the backward pass,
//! counted per decoder layer (and vision block) from which of its linears
//! are trainable and whether its input carries a gradient: libtorch saves a
//! linear's input only when the weight trains (derivatives.yaml guards
//! `mm`/`addmm` saves by `should_compute_output`), RMSNorm saves its f32
//! input, the gated MLP its four I-wide tensors, and attention the fused
//! kernel's q, k, v (n_kv heads), output, log-sum-exp and the additive mask
//! it was given (libtorch 2.11 runs our masked, grouped-query attention on
//! the CPU's flash kernel, measured, and on CUDA's memory-efficient kernel,
//! which takes masks and `enable_gqa`): O(L) per layer, plus the
//! (B, 1, L, L) mask. Activation checkpointing keeps each live layer's
//! input and recomputes one layer at a time in backward.

pub mod plan;

use std::collections::BTreeMap;

use regex::Regex;
use stage_api::{MemoryTerm, Phase};

use crate::config::{Qwen25VlConfig, TextConfig, VisionTowerConfig};
use crate::model::param_shapes;

/// The element type of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 | Precision::F16 => 2,
        }
    }

    /// The `dtype` param of the model stages on a device: `auto` is f32 on
    /// the CPU and bf16 on CUDA (as `device::device_and_kind` picks).
    pub fn from_dtype(dtype: &str, cuda: bool) -> Option<Self> {
        match dtype {
            "auto" if cuda => Some(Precision::Bf16),
            "auto" | "float32" => Some(Precision::F32),
            "bfloat16" => Some(Precision::Bf16),
            "float16" => Some(Precision::F16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// Values per ZeRO collective call (`trainer::zero::BUCKET_ELEMENTS` of the
/// sharding work: 32 Mi).
pub const ZERO_BUCKET_ELEMENTS: u64 = 1 << 25;

/// How the optimizer state and gradients are split over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shard {
    /// Every rank holds everything (plain data parallelism).
    #[default]
    None,
    /// ZeRO-1: each rank owns 1/N of the moments and f32 masters.
    Optimizer,
    /// ZeRO-2: also 1/N of the gradients between micro-batches (each
    /// micro-batch's full gradients reduce-scattered, then freed).
    Gradients,
}

/// Parameter counts of a config, per tensor (HF names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamTable {
    pub tensors: BTreeMap<String, u64>,
}

impl ParamTable {
    pub fn of(config: &Qwen25VlConfig) -> Self {
        let tensors = param_shapes(config)
            .into_iter()
            .map(|(name, shape)| (name, shape.iter().map(|&d| d.max(0) as u64).product()))
            .collect();
        Self { tensors }
    }

    /// Ψ.
    pub fn total(&self) -> u64 {
        self.tensors.values().sum()
    }

    /// Parameters whose name starts with `prefix`.
    pub fn under(&self, prefix: &str) -> u64 {
        self.tensors.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, &c)| c).sum()
    }

    /// The tensors matching `pattern` (a `trainable` regex union).
    pub fn select(&self, pattern: &Regex) -> TrainableSet {
        let names: Vec<String> = self.tensors.keys().filter(|n| pattern.is_match(n)).cloned().collect();
        TrainableSet::new(self, names)
    }
}

/// The trainable tensors, as the training stages select them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainableSet {
    pub names: Vec<String>,
    /// Ψₜ.
    pub params: u64,
    /// Elements of the largest trainable tensor (optimizer-step temporaries).
    pub largest: u64,
}

impl TrainableSet {
    pub fn new(table: &ParamTable, mut names: Vec<String>) -> Self {
        names.sort();
        let counts: Vec<u64> = names.iter().filter_map(|n| table.tensors.get(n).copied()).collect();
        Self { params: counts.iter().sum(), largest: counts.iter().copied().max().unwrap_or(0), names }
    }

    fn trains(&self, name: &str) -> bool {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    fn any_under(&self, prefix: &str) -> bool {
        self.names.iter().any(|n| n.starts_with(prefix))
    }
}

/// The settings a recipe chooses for the fix hints: what to write to shrink
/// a term, in the stage's own param names. `None` = no such setting.
#[derive(Debug, Clone, Default)]
pub struct Levers {
    /// Rows per forward/backward pass (`batch_size`, `micro_batch_size`).
    pub micro_batch: Option<String>,
    /// `gradient_checkpointing = true`.
    pub checkpointing: Option<String>,
    /// `shard = "optimizer"` (moments, masters).
    pub shard_optimizer: Option<String>,
    /// `shard = "gradients"`.
    pub shard_gradients: Option<String>,
    /// Fewer trainable tensors.
    pub trainable: Option<String>,
    /// Rows decoded together (`prompts_per_step` / ranks × G, eval `batch_size`).
    pub generation_batch: Option<String>,
    /// Generation budget (`max_completion_length`, `max_new_tokens`).
    pub generation_length: Option<String>,
}

fn term(name: &str, bytes: u64, formula: String, fix: &Option<String>) -> MemoryTerm {
    MemoryTerm { name: name.into(), bytes, formula, fix: fix.clone() }
}

/// What stays alive while a model trains, per rank.
#[derive(Debug, Clone)]
pub struct TrainSetup<'a> {
    pub config: &'a Qwen25VlConfig,
    pub table: &'a ParamTable,
    pub trainable: &'a TrainableSet,
    pub precision: Precision,
    /// Runs on CUDA (NCCL all-reduce, f32 attention upcast) or the CPU.
    pub cuda: bool,
    pub ranks: u64,
    pub shard: Shard,
    pub checkpointing: bool,
}

impl TrainSetup<'_> {
    fn s(&self) -> u64 {
        self.precision.bytes()
    }

    fn n(&self) -> u64 {
        self.ranks.max(1)
    }

    /// Weights, gradients, AdamW moments, f32 masters (and GRPO's reference
    /// copy of the trainable tensors when `reference`).
    pub fn model_states(&self, reference: bool, levers: &Levers) -> Vec<MemoryTerm> {
        let (s, n, p, pt) = (self.s(), self.n(), self.table.total(), self.trainable.params);
        let dt = self.precision.name();
        let mut out = vec![term("weights", p * s, format!("Ψ {p} × {s} B ({dt})"), &None)];
        let sharded_opt = self.shard != Shard::None && n > 1;
        let share = |x: u64| if sharded_opt { x.div_ceil(n) } else { x };
        let over_n = if sharded_opt { format!(" / {n} ranks") } else { String::new() };
        let opt_fix = if sharded_opt {
            levers.trainable.clone()
        } else {
            levers.shard_optimizer.clone().or_else(|| levers.trainable.clone())
        };
        // The sharded levels (`stages/train/src/trainer/zero.rs`) keep each
        // rank's 1/N of the summed gradients in f32. tch has no backward
        // hooks, so backward still materialises every full-size gradient;
        // they are reduce-scattered and freed before the optimizer step
        // (`optimizer`: once per step, `gradients`: after every
        // micro-batch), so they are a term of the training pass
        // (`training_pass`), not resident.
        if sharded_opt {
            out.push(term(
                "gradient shard",
                pt.div_ceil(n) * 4,
                format!("Ψₜ {pt} / {n} ranks × 4 B (f32 sums)"),
                &levers.trainable,
            ));
        } else {
            let fix = if n > 1 {
                levers.shard_optimizer.clone().or_else(|| levers.trainable.clone())
            } else {
                levers.trainable.clone()
            };
            out.push(term("gradients", pt * s, format!("Ψₜ {pt} × {s} B"), &fix));
        }
        out.push(term("optimizer moments", share(pt) * 8, format!("Ψₜ {pt}{over_n} × 8 B (f32 m, v)"), &opt_fix));
        if s < 4 {
            out.push(term("f32 masters", share(pt) * 4, format!("Ψₜ {pt}{over_n} × 4 B"), &opt_fix));
        }
        if reference {
            out.push(term(
                "reference model",
                pt * s,
                format!("trainable tensors copied, frozen: Ψₜ {pt} × {s} B"),
                &levers.trainable,
            ));
        }
        out
    }

    /// The full-size gradients of a sharded level during the training pass.
    /// `optimizer` accumulates them over the step's micro-batches, so from
    /// the second one on they coexist with all of a micro-batch's saved
    /// activations. `gradients` frees them after each micro-batch: its
    /// backward makes each layer's gradients as it frees that layer's saved
    /// activations, so the pass peaks near max(activations, gradients)
    /// plus a layer's gradients (assumed evenly spread over the layers).
    fn pass_gradients(&self, activations: u64, levers: &Levers) -> MemoryTerm {
        let (s, pt) = (self.s(), self.trainable.params);
        let full = pt * s;
        if self.shard == Shard::Gradients {
            let layer = self.largest_layer_trainable() * s;
            let bytes = (full.saturating_sub(activations) + layer).min(full);
            term(
                "gradients",
                bytes,
                format!(
                    "this micro-batch's gradients beyond the activations backward frees: max(0, Ψₜ {pt} × {s} B − activations) + one layer's {layer} B"
                ),
                &levers.trainable,
            )
        } else {
            term(
                "gradients",
                full,
                format!("full-size gradients accumulated over the step's micro-batches: Ψₜ {pt} × {s} B"),
                &levers.shard_gradients.clone().or_else(|| levers.trainable.clone()),
            )
        }
    }

    /// Trainable parameters of the largest decoder layer / vision block.
    fn largest_layer_trainable(&self) -> u64 {
        let mut per: BTreeMap<String, u64> = BTreeMap::new();
        for name in &self.trainable.names {
            *per.entry(layer_key(name)).or_default() += self.table.tensors.get(name).copied().unwrap_or(0);
        }
        per.values().copied().max().unwrap_or(0)
    }

    /// After the backward pass: unsharded, the gradient all-reduce's flat
    /// buffer and AdamW's per-tensor temporaries; sharded, one
    /// reduce-scatter / all-gather bucket and AdamW on the rank's flat part.
    pub fn optimizer_step(&self) -> Phase {
        let (s, n, pt, big) = (self.s(), self.n(), self.trainable.params, self.trainable.largest);
        let mut terms = Vec::new();
        if n > 1 && self.shard == Shard::None {
            terms.push(if self.cuda {
                MemoryTerm::new(
                    "all-reduce buffer",
                    pt * s,
                    format!("NCCL flat copy of the gradients: Ψₜ {pt} × {s} B"),
                )
            } else {
                // tcp: the f32 concatenation, then a Vec copy of it.
                MemoryTerm::new(
                    "all-reduce buffer",
                    pt * 8,
                    format!("tcp: f32 flat gradients and their copy: Ψₜ {pt} × 8 B"),
                )
            });
        }
        if n > 1 && self.shard != Shard::None {
            // One bucket of every rank's chunks in and the rank's chunk out.
            let bucket = ZERO_BUCKET_ELEMENTS.min(pt.div_ceil(n) * n);
            terms.push(MemoryTerm::new(
                "collective bucket",
                bucket * 4 + bucket.div_ceil(n) * 4,
                format!("reduce-scatter / all-gather bucket: {bucket} values × 4 B + its 1/{n}"),
            ));
            // m, v, g², the denominator and the update over the flat part,
            // and the new values in the weights' dtype.
            let part = pt.div_ceil(n);
            terms.push(MemoryTerm::new(
                "optimizer step temporaries",
                part * (4 * 5 + s),
                format!("5 f32 temporaries + the {s}-byte values of the rank's part (Ψₜ {pt} / {n})"),
            ));
        } else {
            // m, v updates and the f32 update of the largest tensor: ~5 f32 copies.
            terms.push(MemoryTerm::new(
                "optimizer step temporaries",
                big * 4 * 5,
                format!("5 f32 temporaries of the largest trainable tensor ({big})"),
            ));
        }
        Phase::new("optimizer step", terms)
    }
}

/// `model.language_model.layers.3` / `model.visual.blocks.7` / the name itself.
fn layer_key(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if (*p == "layers" || *p == "blocks") && i + 1 < parts.len() {
            return parts[..=i + 1].join(".");
        }
    }
    name.to_string()
}

/// One forward/backward pass of a micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// Rows (B).
    pub batch: u64,
    /// Padded length of the rows (L), image tokens included.
    pub seq: u64,
    /// Vision patches per row (before the 2×2 merge; 0 without an image).
    pub patches: u64,
}

impl Pass {
    fn tokens(&self) -> u64 {
        self.batch * self.seq
    }
}

/// What the loss reads from the logits.
#[derive(Debug, Clone, Copy)]
pub enum Loss {
    /// SFT: cross-entropy over every position (masked labels).
    CrossEntropy,
    /// GRPO: log-probs of the last `completion` tokens (temperature, the
    /// suppressed image tokens filled, log-sum-exp, entropy).
    TokenLogps { completion: u64 },
}

/// Per-layer dims of the text decoder.
struct TextDims {
    h: u64,
    i: u64,
    heads: u64,
    kv: u64,
    d: u64,
    vocab: u64,
    layers: u64,
}

impl TextDims {
    fn of(t: &TextConfig) -> Self {
        let u = |x: i64| x.max(0) as u64;
        Self {
            h: u(t.hidden_size),
            i: u(t.intermediate_size),
            heads: u(t.num_attention_heads),
            kv: u(t.num_key_value_heads),
            d: u(t.head_dim()),
            vocab: u(t.vocab_size),
            layers: u(t.num_hidden_layers),
        }
    }
}

/// Which tensors of one decoder layer train.
#[derive(Debug, Clone, Copy, Default)]
struct LayerTrains {
    norm1: bool,
    qkv: bool,
    o: bool,
    norm2: bool,
    gate_up: bool,
    down: bool,
}

impl LayerTrains {
    fn any(&self) -> bool {
        self.norm1 || self.qkv || self.o || self.norm2 || self.gate_up || self.down
    }
}

fn text_layer_trains(set: &TrainableSet, layer: u64) -> LayerTrains {
    let p = format!("model.language_model.layers.{layer}");
    let any = |subs: &[&str]| subs.iter().any(|s| set.any_under(&format!("{p}.{s}")));
    LayerTrains {
        norm1: any(&["input_layernorm."]),
        qkv: any(&["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."]),
        o: any(&["self_attn.o_proj."]),
        norm2: any(&["post_attention_layernorm."]),
        gate_up: any(&["mlp.gate_proj.", "mlp.up_proj."]),
        down: any(&["mlp.down_proj."]),
    }
}

fn vision_block_trains(set: &TrainableSet, block: u64) -> LayerTrains {
    let p = format!("model.visual.blocks.{block}");
    let any = |subs: &[&str]| subs.iter().any(|s| set.any_under(&format!("{p}.{s}")));
    // Qwen2.5-VL's gated MLP (gate/up/down) or Qwen2-VL's fc1/fc2.
    LayerTrains {
        norm1: any(&["norm1."]),
        qkv: any(&["attn.qkv."]),
        o: any(&["attn.proj."]),
        norm2: any(&["norm2."]),
        gate_up: any(&["mlp.gate_proj.", "mlp.up_proj.", "mlp.fc1."]),
        down: any(&["mlp.down_proj.", "mlp.fc2."]),
    }
}

/// How a pre-norm block normalises and what its MLP saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// RMSNorm (f32 input saved; the weight's grad needs the normed value)
    /// and the gated SiLU MLP (gate output, silu(gate), up: 3 × I wide).
    /// The text decoder and Qwen2.5-VL's vision blocks.
    RmsGated,
    /// LayerNorm (the input in the model dtype; mean and rstd are
    /// negligible) and `fc2(quick_gelu(fc1(x)))`: fc1's output and
    /// sigmoid(1.702 x), 2 × I wide. Qwen2-VL's vision blocks.
    LayerNormPlain,
}

impl BlockKind {
    /// What one norm saves over `t` × `h`: RMSNorm its f32 input when the
    /// input is live and the normed value when its weight trains;
    /// LayerNorm its input (in the model dtype) for either.
    fn norm_saved(self, input_live: bool, weight_trains: bool, t: u64, h: u64, s: u64) -> u64 {
        match self {
            BlockKind::RmsGated => {
                (if input_live { t * h * 4 } else { 0 }) + (if weight_trains { t * h * s } else { 0 })
            }
            BlockKind::LayerNormPlain => {
                if input_live || weight_trains {
                    t * h * s
                } else {
                    0
                }
            }
        }
    }

    /// I-wide tensors the MLP's activation saves.
    fn mlp_intermediates(self) -> u64 {
        match self {
            BlockKind::RmsGated => 3,
            BlockKind::LayerNormPlain => 2,
        }
    }
}

/// The vision tower's widths, of either architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionDims {
    pub depth: u64,
    /// ViT width.
    pub d: u64,
    /// MLP width.
    pub i: u64,
    pub heads: u64,
    pub patch_dim: u64,
    pub block: BlockKind,
}

impl VisionDims {
    pub fn of(v: &VisionTowerConfig) -> Self {
        let u = |x: i64| x.max(0) as u64;
        match v {
            VisionTowerConfig::Qwen2_5Vl(c) => Self {
                depth: u(c.depth),
                d: u(c.hidden_size),
                i: u(c.intermediate_size),
                heads: u(c.num_heads),
                patch_dim: u(c.patch_dim()),
                block: BlockKind::RmsGated,
            },
            VisionTowerConfig::Qwen2Vl(c) => Self {
                depth: u(c.depth),
                d: u(c.embed_dim),
                i: u(c.intermediate_size()),
                heads: u(c.num_heads),
                patch_dim: u(c.patch_dim()),
                block: BlockKind::LayerNormPlain,
            },
        }
    }
}

/// The widths of one layer's saved tensors: `t` tokens, width `h`, MLP
/// width `i`, element bytes `s`.
#[derive(Debug, Clone, Copy)]
struct LayerShape {
    t: u64,
    h: u64,
    i: u64,
    s: u64,
    kind: BlockKind,
}

/// Saved bytes of one pre-norm attention + MLP layer.
/// `attention` gives what the attention core saves when its input is live.
/// Returns (saved bytes, output live).
fn layer_saved(w: LayerTrains, in_live: bool, shape: LayerShape, attention: u64) -> (u64, bool) {
    let LayerShape { t, h, i, s, kind } = shape;
    let mut b = kind.norm_saved(in_live, w.norm1, t, h, s);
    if w.qkv {
        b += t * h * s; // the q/k/v projections' shared input
    }
    let attn_live = in_live || w.norm1 || w.qkv;
    if attn_live {
        b += attention;
    }
    if w.o {
        b += t * h * s;
    }
    let x2_live = attn_live || w.o;
    b += kind.norm_saved(x2_live, w.norm2, t, h, s);
    let mlp_in_live = x2_live || w.norm2;
    if w.gate_up {
        b += t * h * s;
    }
    if mlp_in_live || w.gate_up {
        // gate output (silu's input), silu(gate), up; or fc1's output and its sigmoid
        b += kind.mlp_intermediates() * t * i * s;
    }
    if w.down {
        b += t * i * s; // the activation's product, down_proj's (fc2's) input
    }
    (b, mlp_in_live || w.gate_up || w.down)
}

impl TrainSetup<'_> {
    /// What the attention core of one text layer saves (see module docs).
    fn text_attention_saved(&self, p: &Pass, dims: &TextDims) -> u64 {
        let (t, s) = (p.tokens(), self.s());
        // q, output (n_h heads); k, v (n_kv heads); log-sum-exp; the additive mask (B, 1, L, L).
        2 * t * dims.h * s
            + 2 * t * dims.kv * dims.d * s
            + p.batch * dims.heads * p.seq * 4
            + p.batch * p.seq * p.seq * s
    }

    /// The extra memory of one text layer's backward beyond what it saved:
    /// the MLP's three I-wide gradients or attention's dq, dk, dv and
    /// output gradient, plus the residual stream's gradients.
    fn text_backward_transient(&self, p: &Pass, dims: &TextDims) -> u64 {
        let (t, s) = (p.tokens(), self.s());
        let mlp = 3 * t * dims.i * s;
        let attn = 4 * t * dims.h * s;
        mlp.max(attn) + 2 * t * dims.h * 4
    }

    /// Vision-tower activations (saved when a vision tensor trains) and the
    /// frozen tower's forward transient.
    fn vision_pass(&self, p: &Pass, v: &VisionDims) -> (u64, u64, u64) {
        let s = self.s();
        let n = p.batch * p.patches;
        if n == 0 {
            return (0, 0, 0);
        }
        let (d, i, heads) = (v.d, v.i, v.heads);
        let shape = LayerShape { t: n, h: d, i, s, kind: v.block };
        // Fused (flash) attention per window (Qwen2-VL: over the whole
        // image, still O(n)): q, k, v, output, log-sum-exp.
        let attention = 4 * n * d * s + heads * n * 4;
        let mut live = self.trainable.any_under("model.visual.patch_embed.");
        let mut saved = 0;
        let mut saved_blocks = 0;
        let mut largest_block = 0;
        for b in 0..v.depth {
            let w = vision_block_trains(self.trainable, b);
            let (bytes, out) = layer_saved(w, live, shape, attention);
            if bytes > 0 {
                saved_blocks += 1;
            }
            largest_block = largest_block.max(bytes);
            saved += bytes;
            live = out;
        }
        if self.checkpointing && saved_blocks > 0 {
            saved = saved_blocks * n * d * s + largest_block;
        }
        let merger_trains = self.trainable.any_under("model.visual.merger.");
        if live || merger_trains {
            // ln_q's f32 input, mlp.0's input, gelu's input, mlp.2's input (N/4 × 4d each).
            saved += n * d * 4 + 3 * n * d * s;
        }
        // The frozen tower: one block's intermediates at a time, no grad.
        let forward = n * (v.block.mlp_intermediates() * i * s + 6 * d * 4);
        (saved, forward, n * v.patch_dim * 4)
    }

    /// One micro-batch forward and backward: inputs, saved activations,
    /// logits and loss, one layer's backward.
    pub fn training_pass(&self, p: &Pass, loss: Loss, levers: &Levers) -> Phase {
        let dims = TextDims::of(&self.config.text);
        let (t, s, b, l, h, vocab) = (p.tokens(), self.s(), p.batch, p.seq, dims.h, dims.vocab);
        let mut terms = Vec::new();

        let (vision_saved, vision_forward, pixels) = match &self.config.vision {
            Some(v) => self.vision_pass(p, &VisionDims::of(v)),
            None => (0, 0, 0),
        };
        // Pixel values (f32 on the host, cast to the model dtype) and the ids.
        let inputs = pixels / 4 * s + pixels + t * 8 * 3;
        terms.push(MemoryTerm::new(
            "batch inputs",
            inputs,
            format!(
                "pixel values {} patches × 1176 (f32 + {}), ids, mask, labels",
                b * p.patches,
                self.precision.name()
            ),
        ));

        // Liveness: image features flow into the embeddings.
        let embed_trains = self.trainable.trains("model.language_model.embed_tokens.weight");
        let mut live = embed_trains || self.trainable.any_under("model.visual.");
        let attention = self.text_attention_saved(p, &dims);
        let (mut saved, mut live_layers, mut largest) = (0, 0, 0);
        for layer in 0..dims.layers {
            let w = text_layer_trains(self.trainable, layer);
            let shape = LayerShape { t, h, i: dims.i, s, kind: BlockKind::RmsGated };
            let (bytes, out) = layer_saved(w, live, shape, attention);
            if live || w.any() {
                live_layers += 1;
            }
            largest = largest.max(bytes);
            saved += bytes;
            live = out;
        }
        let final_norm = if live { t * h * 4 } else { 0 };
        let lm_head_trains =
            self.trainable.trains("lm_head.weight") || (self.config.text.tie_word_embeddings && embed_trains);
        let head_input = if lm_head_trains { t * h * s } else { 0 };
        // Checkpointed (`activation_checkpointing.rs`): each live layer's
        // input is kept, plus the chain's output and its gradient; the loss
        // head runs and finishes its backward before any layer is
        // recomputed, so the recomputed layer is counted only beyond the
        // head's logits (below).
        let act_bytes = if self.checkpointing {
            (live_layers + 2) * t * h * s + final_norm + head_input + vision_saved
        } else {
            saved + final_norm + head_input + vision_saved
        };
        if self.checkpointing {
            terms.push(term(
                "activations",
                act_bytes,
                format!(
                    "checkpointed: ({live_layers} layer inputs + the last output and its gradient) × T {t} × h {h} × {s} B + vision {vision_saved}"
                ),
                &levers.micro_batch,
            ));
        } else {
            terms.push(term(
                "activations",
                act_bytes,
                format!("{live_layers} live layers over T = {b} × {l} tokens; vision {vision_saved}"),
                &levers.checkpointing.clone().or_else(|| levers.micro_batch.clone()),
            ));
        }

        // Logits and loss (the largest transient at a large vocabulary).
        let (logits, formula) = match loss {
            Loss::CrossEntropy => {
                let n = b * l.saturating_sub(1);
                // forward: logits (s), f32 copy (s < 4), contiguous copy of the
                // shifted view (B > 1), log-softmax output; backward: the saved
                // output, its gradient and the input gradient (3 f32).
                let fwd = b * l * vocab * s + n * vocab * (4 * u64::from(s < 4) + 4 * u64::from(b > 1) + 4);
                let bwd = 3 * n * vocab * 4;
                (
                    fwd.max(bwd),
                    format!("cross-entropy over B {b} × L {l} × V {vocab}: max(forward, 3 f32 copies in backward)"),
                )
            }
            Loss::TokenLogps { completion } => {
                let c = completion.min(l);
                // logits of C + 1 positions (s), then f32: scaled, index-filled,
                // and the entropy's log-softmax, exp and product (no grad).
                let bytes = b * (c + 1) * vocab * s + 4 * b * c * vocab * 4;
                (bytes, format!("log-probs over B {b} × C {c} × V {vocab}: logits ({s} B) + 4 f32 copies"))
            }
        };
        terms.push(term("logits", logits, formula, &levers.micro_batch));
        let transient = self.text_backward_transient(p, &dims);
        if self.checkpointing {
            terms.push(term(
                "recomputed layer",
                (largest + transient).saturating_sub(logits),
                format!(
                    "one layer recomputed ({largest} B) and its backward ({transient} B), beyond the finished loss head's logits"
                ),
                &levers.micro_batch,
            ));
        } else {
            terms.push(term(
                "backward transient",
                transient,
                "one layer's gradients (MLP or attention) + residual".into(),
                &levers.micro_batch,
            ));
        }
        if self.shard != Shard::None && self.n() > 1 {
            terms.push(self.pass_gradients(act_bytes, levers));
        }
        let mut phase = Phase::new("training micro-batch", terms);
        // The frozen vision tower runs first: its transient peak is separate.
        let text_part = phase.bytes();
        if vision_forward > text_part {
            phase.terms.push(MemoryTerm::new(
                "vision forward",
                vision_forward - text_part,
                "the frozen vision tower's intermediates exceed the text part".to_string(),
            ));
        }
        phase
    }
}

/// A forward without gradients (prefill, GRPO's reference log-probs): the
/// largest layer's intermediates (no saved activations).
pub fn no_grad_layer(config: &Qwen25VlConfig, precision: Precision, rows: u64, seq: u64) -> u64 {
    let dims = TextDims::of(&config.text);
    let (s, t) = (precision.bytes(), rows * seq);
    // q, k, v, output and the additive mask, or the MLP's three I-wide tensors.
    let attention = 4 * t * dims.h * s + rows * seq * seq * s;
    let mlp = 3 * t * dims.i * s;
    attention.max(mlp) + 2 * t * dims.h * 4
}

/// Generation: the KV cache of `rows × group` sequences of `prompt + new`
/// tokens, the prefill's largest layer, and one decode step's logits.
pub fn generation(
    config: &Qwen25VlConfig,
    precision: Precision,
    prompts: u64,
    group: u64,
    prompt: u64,
    new: u64,
    levers: &Levers,
) -> Phase {
    let dims = TextDims::of(&config.text);
    let s = precision.bytes();
    let rows = prompts * group.max(1);
    let len = prompt + new;
    let per_token = dims.layers * dims.kv * dims.d * 2 * s;
    let kv = rows * len * per_token;
    let mut terms = vec![term(
        "KV cache",
        kv,
        format!(
            "{prompts} prompts × G {group} × (P {prompt} + C {new}) × {} layers × {} kv heads × d {} × 2 × {s} B",
            dims.layers, dims.kv, dims.d
        ),
        &levers.generation_batch.clone().or_else(|| levers.generation_length.clone()),
    )];
    // Each decode step concatenates a layer's cache into a new tensor.
    let step = rows * len * dims.kv * dims.d * 2 * s + rows * dims.vocab * (s + 4);
    let prefill = no_grad_layer(config, precision, prompts, prompt) + prompts * dims.vocab * s;
    terms.push(MemoryTerm::new(
        "generation transient",
        step.max(prefill),
        "max(prefill's largest layer, one layer's cache copy + a step's logits)".to_string(),
    ));
    Phase::new("generation", terms)
}

/// Image tokens and vision patches per image at most: the data's pixel bound
/// (when known) within the processor's `max_pixels`, in 28×28 blocks.
pub fn image_tokens(max_pixels_data: Option<u64>, processor_max: u64, patch: u64, merge: u64) -> (u64, u64) {
    let px = max_pixels_data.map_or(processor_max, |d| d.min(processor_max));
    let unit = patch * patch * merge * merge;
    let tokens = (px / unit.max(1)).max(1);
    (tokens, tokens * merge * merge)
}

/// Text tokens of a prompt, estimated from characters (English BPE averages
/// ~4 characters per token; 3 leaves room): the chat template's framing
/// (~30 tokens), the prompt template and a question of `question_chars`.
pub fn prompt_text_tokens(template_chars: u64, question_chars: u64) -> u64 {
    30 + (template_chars + question_chars).div_ceil(3)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A config small enough to count by hand.
    /// One f32 rank on the CPU, nothing sharded or checkpointed.
    fn plain_setup<'a>(cfg: &'a Qwen25VlConfig, table: &'a ParamTable, trainable: &'a TrainableSet) -> TrainSetup<'a> {
        TrainSetup {
            config: cfg,
            table,
            trainable,
            precision: Precision::F32,
            cuda: false,
            ranks: 1,
            shard: Shard::None,
            checkpointing: false,
        }
    }

    fn hand_config() -> Qwen25VlConfig {
        let json = serde_json::json!({
            "model_type": "qwen2_5_vl",
            "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 0, 0]},
            "tie_word_embeddings": false,
            "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 7, "vision_end_token_id": 8,
            "vision_config": {"depth": 1, "hidden_size": 2, "intermediate_size": 3, "num_heads": 1,
                "in_chans": 3, "out_hidden_size": 4, "patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [0]}
        });
        Qwen25VlConfig::from_value(json, Path::new("config.json")).unwrap()
    }

    fn mlp_regex() -> Regex {
        Regex::new(r"^model\.language_model\.layers\.\d+\.mlp\.").unwrap()
    }

    #[test]
    fn parameters_of_a_hand_sized_config() {
        let t = ParamTable::of(&hand_config());
        // Text: embed 10·4, final norm 4; layer: 2 norms 2·4, q 4·4+4,
        // k 2·4+2, v 2·4+2 (1 kv head × d 2), o 4·4, MLP 3·6·4; lm_head 10·4.
        let layer = 8 + 20 + 10 + 10 + 16 + 72;
        assert_eq!(t.under("model.language_model."), 40 + 4 + layer);
        assert_eq!(t.tensors["lm_head.weight"], 40);
        // Vision: patch 2·3·2·14·14; block: 2 norms 2·2, qkv 6·2+6, proj 2·2+2,
        // MLP 3·(3·2) + biases 3+3+2; merger: ln 2, mlp.0 8·8+8, mlp.2 4·8+4.
        let block = 4 + 18 + 6 + 18 + 8;
        assert_eq!(t.under("model.visual."), 2352 + block + 2 + 72 + 36);
        assert_eq!(t.total(), 40 + 4 + layer + 40 + 2352 + block + 110);
        let mlp = t.select(&mlp_regex());
        assert_eq!((mlp.names.len(), mlp.params, mlp.largest), (3, 72, 24));
    }

    #[test]
    fn model_states_follow_the_zero_accounting_for_the_trainable_subset() {
        let cfg = hand_config();
        let table = ParamTable::of(&cfg);
        let trainable = table.select(&mlp_regex());
        let mut setup =
            TrainSetup { precision: Precision::Bf16, cuda: true, ranks: 4, ..plain_setup(&cfg, &table, &trainable) };
        let bytes = |terms: &[MemoryTerm]| terms.iter().map(|t| (t.name.clone(), t.bytes)).collect::<Vec<_>>();
        let psi = table.total();
        let plain = setup.model_states(true, &Levers::default());
        assert_eq!(
            bytes(&plain),
            vec![
                ("weights".into(), 2 * psi),
                ("gradients".into(), 2 * 72),
                ("optimizer moments".into(), 8 * 72),
                ("f32 masters".into(), 4 * 72),
                ("reference model".into(), 2 * 72),
            ]
        );
        setup.shard = Shard::Optimizer;
        let zero1 = bytes(&setup.model_states(false, &Levers::default()));
        assert_eq!(zero1[1], ("gradient shard".into(), 4 * 18), "the f32 sums of its quarter");
        assert_eq!(zero1[2], ("optimizer moments".into(), 8 * 18));
        assert_eq!(zero1[3], ("f32 masters".into(), 4 * 18));
        assert!(zero1.iter().all(|(n, _)| n != "gradients"), "full gradients are freed before the step");
        // ... and belong to the training pass: ZeRO-1 keeps all of them
        // across micro-batches.
        let pass = Pass { batch: 1, seq: 3, patches: 0 };
        let grads = |setup: &TrainSetup| {
            let phase = setup.training_pass(&pass, Loss::CrossEntropy, &Levers::default());
            let act = phase.terms.iter().find(|t| t.name == "activations").map(|t| t.bytes).unwrap();
            (phase.terms.iter().find(|t| t.name == "gradients").map(|t| t.bytes), act)
        };
        assert_eq!(grads(&setup).0, Some(2 * 72));
        // ZeRO-2 here: the one layer's gradients (144 B) are smaller than
        // its activations, so all of them are counted (the cap).
        setup.shard = Shard::Gradients;
        let (g, act) = grads(&setup);
        assert!(act > 144);
        assert_eq!(g, Some(144));
        let zero2 = bytes(&setup.model_states(false, &Levers::default()));
        assert_eq!(zero2, zero1, "the same resident states as ZeRO-1");
        setup.shard = Shard::None;
        assert_eq!(grads(&setup).0, None, "unsharded gradients are resident");
        setup.shard = Shard::Optimizer;
        // The step: ZeRO-1 runs AdamW on the flat quarter (18 values: 5 f32
        // temporaries + the bf16 values) and one bucket (all 72 padded values
        // + a quarter of them, f32); unsharded, the NCCL flat copy and the
        // largest tensor's temporaries.
        let step = |setup: &TrainSetup| bytes(&setup.optimizer_step().terms);
        assert_eq!(
            step(&setup),
            vec![("collective bucket".into(), 72 * 4 + 18 * 4), ("optimizer step temporaries".into(), 18 * (20 + 2))]
        );
        setup.shard = Shard::None;
        assert_eq!(
            step(&setup),
            vec![("all-reduce buffer".into(), 72 * 2), ("optimizer step temporaries".into(), 24 * 20)]
        );
        // f32 weights need no master copy.
        setup.precision = Precision::F32;
        setup.shard = Shard::None;
        assert!(setup.model_states(false, &Levers::default()).iter().all(|t| t.name != "f32 masters"));
    }

    /// `hand_config` with a Qwen2-VL tower: ViT width 4, fc1 width 4 × 1.5 = 6.
    fn hand_qwen2_vl() -> Qwen25VlConfig {
        let json = serde_json::json!({
            "model_type": "qwen2_vl",
            "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 0, 0]},
            "tie_word_embeddings": false,
            "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 7, "vision_end_token_id": 8,
            "vision_config": {"depth": 1, "embed_dim": 4, "hidden_size": 4, "mlp_ratio": 1.5, "num_heads": 1,
                "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        });
        Qwen25VlConfig::from_value(json, Path::new("config.json")).unwrap()
    }

    #[test]
    fn a_qwen2_vl_tower_saves_layer_norm_inputs_and_two_fc1_wide_tensors() {
        let cfg = hand_qwen2_vl();
        let table = ParamTable::of(&cfg);
        // Block: norm1/norm2 (w, b) 4·4, qkv 12·4+12, proj 4·4+4, fc1 6·4+6,
        // fc2 4·6+4; merger: ln_q 2·4, mlp.0 16·16+16, mlp.2 4·16+4.
        let block = 16 + 60 + 20 + 30 + 28;
        assert_eq!(table.under("model.visual.blocks.0."), block);
        assert_eq!(table.under("model.visual.merger."), 8 + 272 + 68);
        // Only the vision block trains (f32): its input is not live (the
        // patch embedding is frozen), every linear and norm trains.
        let trainable = table.select(&Regex::new(r"^model\.visual\.blocks\.").unwrap());
        let setup = plain_setup(&cfg, &table, &trainable);
        // 8 patches, no text beyond them matters for the vision term.
        let (n, d, i) = (8_u64, 4_u64, 6_u64);
        let (saved, forward, pixels) =
            setup.vision_pass(&Pass { batch: 1, seq: 4, patches: n }, &VisionDims::of(cfg.vision.as_ref().unwrap()));
        // norm1's input (its weight trains) n·d·4; qkv input; attention q,
        // k, v, out 4·n·d·4 + lse n·4; proj input; norm2's input (the
        // residual); fc1 input; its output and sigmoid 2·n·i·4; fc2 input
        // n·i·4. The merger then sees a live input: ln_q's input n·d·4 and
        // three n·d-sized inputs.
        let attention = 4 * n * d * 4 + n * 4;
        let block_saved =
            n * d * 4 + n * d * 4 + attention + n * d * 4 + n * d * 4 + n * d * 4 + 2 * n * i * 4 + n * i * 4;
        assert_eq!(saved, block_saved + n * d * 4 + 3 * n * d * 4);
        // The frozen-tower transient: two fc1-wide tensors and six d-wide f32.
        assert_eq!(forward, n * (2 * i * 4 + 6 * d * 4));
        assert_eq!(pixels, n * 1176 * 4);
    }

    #[test]
    fn activations_of_a_hand_sized_layer() {
        let cfg = hand_config();
        let table = ParamTable::of(&cfg);
        let trainable = table.select(&mlp_regex());
        let setup = plain_setup(&cfg, &table, &trainable);
        // One layer, MLP trainable, input not live (frozen embeddings and
        // vision): gate/up input T·h·4, gate out, silu, up, product T·I·4 each.
        let p = Pass { batch: 2, seq: 3, patches: 0 };
        let phase = setup.training_pass(&p, Loss::CrossEntropy, &Levers::default());
        let act = phase.terms.iter().find(|t| t.name == "activations").unwrap();
        let (t, h, i) = (6, 4, 6);
        assert_eq!(act.bytes, t * h * 4 + 4 * t * i * 4 + t * h * 4, "MLP + final norm");
        // Cross-entropy: the forward holds logits 2·3·10·4, the reshaped copy
        // and the log-softmax 2·2·10·4 each (560 B), more than the backward's
        // three f32 copies (480 B).
        let logits = phase.terms.iter().find(|t| t.name == "logits").unwrap();
        assert_eq!(logits.bytes, 240 + 160 + 160);
        // Everything trainable: the layer's input is live from the embeddings on.
        let all = table.select(&Regex::new(".").unwrap());
        let setup = TrainSetup { trainable: &all, ..setup };
        let a2 = setup.training_pass(&p, Loss::CrossEntropy, &Levers::default());
        let act2 = a2.terms.iter().find(|t| t.name == "activations").unwrap();
        // norm1 f32 + normed + qkv input, attention (q, out: T·h; k, v: T·1·2;
        // lse B·n_h·L; mask B·L²), o input, norm2 f32 + normed, MLP input +
        // 4·T·I, final norm, lm_head input.
        let attention = 2 * t * h * 4 + 2 * t * 2 * 4 + 2 * 2 * 3 * 4 + 2 * 9 * 4;
        let layer = t * h * 4 * 3 + attention + t * h * 4 + t * h * 4 * 2 + t * h * 4 + 4 * t * i * 4;
        assert_eq!(act2.bytes, layer + t * h * 4 + t * h * 4, "{}", act2.formula);
    }

    #[test]
    fn checkpointing_keeps_layer_inputs_and_one_recomputed_layer() {
        let mut cfg = hand_config();
        cfg.text.num_hidden_layers = 4;
        let table = ParamTable::of(&cfg);
        let trainable = table.select(&mlp_regex());
        let base = plain_setup(&cfg, &table, &trainable);
        let p = Pass { batch: 2, seq: 8, patches: 0 };
        let act = |s: &TrainSetup| {
            let phase = s.training_pass(&p, Loss::CrossEntropy, &Levers::default());
            phase.terms.iter().find(|t| t.name == "activations").unwrap().bytes
        };
        let full = act(&base);
        let checkpointed = TrainSetup { checkpointing: true, ..base.clone() };
        let ck = act(&checkpointed);
        assert!(ck < full, "{ck} < {full}");
        let (t, h) = (16, 4);
        // 4 live layers' inputs + the chain's output and its gradient + final norm.
        assert_eq!(ck, 4 * t * h * 4 + 2 * t * h * 4 + t * h * 4);
        // One (fully live) layer recomputed with its backward, counted only
        // beyond the loss head's logits, which are freed by then: B 2 × L 8
        // × V 10 f32 logits + the shifted copy and log-softmax of 14
        // positions.
        let live_layer = {
            let w = text_layer_trains(&trainable, 1);
            let shape = LayerShape { t, h, i: 6, s: 4, kind: BlockKind::RmsGated };
            layer_saved(w, true, shape, base.text_attention_saved(&p, &TextDims::of(&cfg.text))).0
        };
        let phase = checkpointed.training_pass(&p, Loss::CrossEntropy, &Levers::default());
        let find = |n: &str| phase.terms.iter().find(|t| t.name == n).map(|t| t.bytes);
        let logits = 2 * 8 * 10 * 4 + 14 * 10 * 8;
        assert_eq!(find("logits"), Some(logits));
        let transient = base.text_backward_transient(&p, &TextDims::of(&cfg.text));
        assert_eq!(find("recomputed layer"), Some((live_layer + transient).saturating_sub(logits)));
        assert_eq!(find("backward transient"), None);
    }

    #[test]
    fn kv_cache_is_rows_times_length_times_layers_times_kv_heads() {
        let cfg = hand_config();
        let g = generation(&cfg, Precision::Bf16, 3, 5, 10, 6, &Levers::default());
        let kv = g.terms.iter().find(|t| t.name == "KV cache").unwrap();
        // 3 × 5 rows × 16 tokens × 1 layer × 1 kv head × d 2 × 2 (k, v) × 2 B.
        assert_eq!(kv.bytes, 15 * 16 * 2 * 2 * 2);
    }

    #[test]
    fn image_tokens_take_the_tighter_pixel_bound() {
        // render's bound 401,408 px in 28×28 blocks: 512 tokens, 2048 patches.
        assert_eq!(image_tokens(Some(401_408), 12_845_056, 14, 2), (512, 2048));
        assert_eq!(image_tokens(None, 28 * 28 * 64, 14, 2), (64, 256));
    }

    /// Qwen2.5-VL-7B-Instruct's config.json as published (fixture shared
    /// with the CLI test).
    fn qwen_7b() -> Qwen25VlConfig {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_5_vl_7b");
        Qwen25VlConfig::from_file(&dir.join("config.json")).unwrap()
    }

    #[test]
    fn the_7b_config_has_qwen_s_published_parameter_count() {
        let t = ParamTable::of(&qwen_7b());
        // The model card: 8.29 B parameters (BF16 safetensors).
        assert_eq!(t.total(), 8_292_166_656);
        let vision = t.under("model.visual.");
        let text = t.total() - vision;
        // Language model 7.62 B with embeddings and lm_head (6.53 B without),
        // vision tower incl. merger 0.68 B.
        assert_eq!((vision, text), (676_550_144, 7_615_616_512));
        assert_eq!(t.tensors["lm_head.weight"], 152_064 * 3584);
        let mlp = t.select(&mlp_regex());
        assert_eq!(mlp.params, 28 * 3 * 3584 * 18944);
        assert_eq!(mlp.params, 5_703_204_864, "docs/scaling.md's trainable count");
    }

    #[test]
    fn the_7b_model_states_match_docs_scaling() {
        let cfg = qwen_7b();
        let table = ParamTable::of(&cfg);
        let trainable = table.select(&mlp_regex());
        let setup =
            TrainSetup { precision: Precision::Bf16, cuda: true, ranks: 8, ..plain_setup(&cfg, &table, &trainable) };
        let total = |terms: Vec<MemoryTerm>| terms.iter().map(|t| t.bytes).sum::<u64>();
        // 16.6 + 11.4 + 45.6 + 22.8 GB = 96.4 GB; GRPO + 11.4 GB reference.
        let sft = total(setup.model_states(false, &Levers::default()));
        assert_eq!(sft, 2 * 8_292_166_656 + 14 * 5_703_204_864);
        assert!((sft as f64 / 1e9 - 96.4).abs() < 0.05, "{sft}");
        let grpo = total(setup.model_states(true, &Levers::default()));
        assert!((grpo as f64 / 1e9 - 107.8).abs() < 0.05, "{grpo}");
        let zero1 = total(TrainSetup { shard: Shard::Optimizer, ..setup }.model_states(false, &Levers::default()));
        // ZeRO-1 over 8 ranks: 16.6 + (45.6 + 22.8 + 22.8 f32 gradient sums) / 8 GB
        // (the bf16 gradients, 11.4 GB, are a term of the training pass).
        assert_eq!(zero1, 2 * 8_292_166_656 + 16 * 5_703_204_864_u64.div_ceil(8));

        // The training pass of one 100-token row (text only): ZeRO-1 holds
        // all 11.4 GB of bf16 MLP gradients next to the activations; ZeRO-2
        // only what backward makes beyond the activations it frees, plus one
        // layer's MLP gradients (3 × 3584 × 18944 × 2 B).
        let pass = Pass { batch: 1, seq: 100, patches: 0 };
        let grads_of = |shard| {
            let phase =
                TrainSetup { shard, ..setup.clone() }.training_pass(&pass, Loss::CrossEntropy, &Levers::default());
            let find = |n: &str| phase.terms.iter().find(|t| t.name == n).map(|t| t.bytes);
            (find("gradients"), find("activations").unwrap_or(0))
        };
        let (layer, all) = (3 * 3584 * 18944 * 2_u64, 28 * 3 * 3584 * 18944 * 2_u64);
        let (g1, act) = grads_of(Shard::Optimizer);
        assert_eq!(g1, Some(all));
        assert!(act < all / 10, "{act}");
        assert_eq!(grads_of(Shard::Gradients).0, Some(all - act + layer));
    }
}
