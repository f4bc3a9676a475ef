//! HF safetensors checkpoints: load by parameter name (mmap, one tensor in
//! flight at a time), save sharded with `model.safetensors.index.json`.
//!
//! Names are normalised to the layout of transformers >= 4.52
//! (`model.language_model.*`, `model.visual.*`, `lm_head.*`); older
//! checkpoints (`model.layers.*`, `visual.*`) load too.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor { path: PathBuf, name: String, message: String },
    #[error("checkpoint {dir}: {message}")]
    Keys { dir: PathBuf, message: String },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// Map a checkpoint parameter name to the transformers >= 4.52 layout.
pub fn normalize_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("visual.") {
        return format!("model.visual.{rest}");
    }
    if name.starts_with("model.visual.") || name.starts_with("model.language_model.") {
        return name.to_string();
    }
    if let Some(rest) = name.strip_prefix("model.") {
        return format!("model.language_model.{rest}");
    }
    name.to_string()
}

/// The `Qwen2ForCausalLM` name of a normalised parameter name
/// (`model.language_model.X` -> `model.X`), for saving text-only models.
pub fn text_only_name(name: &str) -> String {
    match name.strip_prefix("model.language_model.") {
        Some(rest) => format!("model.{rest}"),
        None => name.to_string(),
    }
}

/// The shard files of a checkpoint directory, in a stable order.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| file_err(&index, e))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(&index, "field `weight_map`: missing (expected an object name -> shard file)"))?;
        let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(file_err(dir, format!("no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors found")));
    }
    Ok(files)
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Read every tensor of one safetensors file (mmapped) into owned tensors of
/// `float_kind` (floating tensors only) on `device`. Names are normalised.
///
/// Memory: each tensor is copied out of the mapping and its pages are then
/// dropped from the resident set, so peak RSS stays near the size of the
/// loaded tensors rather than twice it.
pub fn load_file(path: &Path, float_kind: Kind, device: Device) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let file = File::open(path).map_err(|e| file_err(path, e))?;
    // SAFETY: the mapping is read-only; a checkpoint modified while we read it
    // would give garbage values, which is the same contract as transformers.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| file_err(path, e))?;
    // Read-ahead: tensors are copied front to back.
    let _ = mmap.advise(memmap2::Advice::Sequential);
    let st = SafeTensors::deserialize(&mmap).map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let base = mmap.as_ptr() as usize;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let terr = |message: String| CheckpointError::Tensor { path: path.into(), name: name.clone(), message };
        let kind = kind_of(view.dtype()).ok_or_else(|| terr(format!("unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let data = view.data();
        let offset = data.as_ptr() as usize - base;
        let owned = copy_out(&mmap, data, offset, &shape, kind).map_err(|e| terr(e.to_string()))?;
        let target = if is_float(kind) { float_kind } else { kind };
        // `to_device`/`to_kind` return the same tensor when nothing changes.
        let t = owned.f_to_device(device)?.f_to_kind(target)?;
        out.insert(normalize_name(&name), t);
    }
    Ok(out)
}

/// Bytes copied per step when reading a tensor out of the mapping.
const COPY_CHUNK_BYTES: usize = 64 << 20;

/// Copy one tensor out of the mapping in chunks, dropping each chunk's pages
/// from the resident set once copied: peak memory stays at the loaded tensors
/// plus one chunk, even for the 1 GB embedding matrices of a 7B model.
fn copy_out(mmap: &Mmap, data: &[u8], offset: usize, shape: &[i64], kind: Kind) -> Result<Tensor, tch::TchError> {
    let dst = Tensor::f_empty(shape, (kind, Device::Cpu))?;
    let elt = kind.elt_size_in_bytes();
    let numel = data.len() / elt;
    let flat = dst.f_view([numel as i64])?;
    let chunk = (COPY_CHUNK_BYTES / elt).max(1);
    let mut start = 0;
    while start < numel {
        let n = chunk.min(numel - start);
        let bytes = &data[start * elt..(start + n) * elt];
        let src = Tensor::f_from_data_size(bytes, &[n as i64], kind)?;
        flat.f_narrow(0, start as i64, n as i64)?.f_copy_(&src)?;
        // SAFETY: DONTNEED on a read-only file mapping only drops cached
        // pages; a later read faults them back in from the file.
        unsafe {
            let page = 4096;
            let from = (offset + start * elt) / page * page;
            let to = offset + (start + n) * elt;
            let _ = mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, from, to - from);
        }
        start += n;
    }
    Ok(dst)
}

/// Load all shards of a checkpoint directory.
pub fn load_dir(dir: &Path, float_kind: Kind, device: Device) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let mut all = BTreeMap::new();
    for f in shard_files(dir)? {
        for (k, v) in load_file(&f, float_kind, device)? {
            if all.insert(k.clone(), v).is_some() {
                return Err(file_err(&f, format!("tensor `{k}` appears in more than one shard")));
            }
        }
    }
    Ok(all)
}

/// Check loaded names against the names the model expects.
pub fn check_keys(
    dir: &Path,
    loaded: &BTreeMap<String, Tensor>,
    expected: &BTreeMap<String, Vec<i64>>,
) -> Result<(), CheckpointError> {
    let missing: Vec<&String> = expected.keys().filter(|k| !loaded.contains_key(*k)).collect();
    let unexpected: Vec<&String> = loaded.keys().filter(|k| !expected.contains_key(*k)).collect();
    let mut wrong_shape = Vec::new();
    for (k, shape) in expected {
        if let Some(t) = loaded.get(k)
            && t.size() != *shape
        {
            wrong_shape.push(format!("{k}: expected {shape:?}, got {:?}", t.size()));
        }
    }
    if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
        return Ok(());
    }
    let show = |v: &[&String]| {
        let head: Vec<&str> = v.iter().take(8).map(|s| s.as_str()).collect();
        if v.len() > 8 { format!("{} (+{} more)", head.join(", "), v.len() - 8) } else { head.join(", ") }
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing keys: {}", missing.len(), show(&missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("{} unexpected keys: {}", unexpected.len(), show(&unexpected)));
    }
    if !wrong_shape.is_empty() {
        parts.push(format!("{} shape mismatches: {}", wrong_shape.len(), wrong_shape.join("; ")));
    }
    Err(CheckpointError::Keys { dir: dir.to_path_buf(), message: parts.join("; ") })
}

/// A CPU-contiguous tensor viewed as safetensors bytes.
struct TensorBytes {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl TensorBytes {
    fn new(name: &str, t: &Tensor, kind: Kind) -> Result<Self, CheckpointError> {
        let t = t.f_detach()?.f_to_device(Device::Cpu)?;
        let t = if is_float(t.kind()) { t.f_to_kind(kind)? } else { t };
        let t = t.f_contiguous()?;
        let dtype = dtype_of(t.kind()).ok_or_else(|| CheckpointError::Tensor {
            path: PathBuf::new(),
            name: name.to_string(),
            message: format!("cannot save kind {:?}", t.kind()),
        })?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        Ok(Self { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), bytes })
    }
}

impl View for &TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Write `tensors` into `dir` as HF does: one `model.safetensors` when it fits
/// in `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards plus
/// `model.safetensors.index.json`. Floating tensors are stored as `kind`.
/// Returns the written file names.
pub fn save_dir(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    kind: Kind,
    max_shard_bytes: u64,
) -> Result<Vec<String>, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    // Group names greedily into shards by byte size (in name order, like HF).
    let size_of = |t: &Tensor| {
        let k = if is_float(t.kind()) { kind } else { t.kind() };
        (t.numel() * k.elt_size_in_bytes()) as u64
    };
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut current = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let s = size_of(t);
        total += s;
        if current > 0 && current + s > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += s;
        if let Some(last) = shards.last_mut() {
            last.push(name);
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (i, names) in shards.iter().enumerate() {
        let file = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        // Convert one shard at a time so only one shard's bytes are in memory.
        let mut owned = Vec::with_capacity(names.len());
        for name in names {
            owned.push(((*name).clone(), TensorBytes::new(name, &tensors[*name], kind)?));
            weight_map.insert((*name).clone(), file.clone());
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(owned.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata.clone()), &path)
            .map_err(|e| file_err(&path, e))?;
        files.push(file);
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).map_err(|e| file_err(&path, e))?;
        std::fs::write(&path, text + "\n").map_err(|e| file_err(&path, e))?;
        files.push(INDEX_FILE.to_string());
    }
    Ok(files)
}

/// Files besides the weights and config that a checkpoint carries.
pub const AUX_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "added_tokens.json",
];

/// Copy tokenizer, chat template and processor files from `src` to `dst`.
pub fn copy_aux_files(src: &Path, dst: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut copied = Vec::new();
    for f in AUX_FILES {
        let from = src.join(f);
        if from.exists() {
            std::fs::copy(&from, dst.join(f))
                .map_err(|e| file_err(&from, format!("copying to {}: {e}", dst.display())))?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}

/// Names matching `pattern` (trainable-parameter selection for SFT).
pub fn select_names<'a>(
    names: impl IntoIterator<Item = &'a String>,
    pattern: &str,
) -> Result<Vec<String>, regex::Error> {
    let re = regex::Regex::new(pattern)?;
    Ok(names.into_iter().filter(|n| re.is_match(n)).cloned().collect())
}

/// Default SFT selection: the MLPs of the language model only (the vision
/// blocks also have `mlp` modules, hence the explicit prefix).
pub const DEFAULT_TRAINABLE: &str = r"^model\.language_model\.layers\.\d+\.mlp\.";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        m.insert(
            "model.language_model.layers.0.mlp.up_proj.weight".into(),
            Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]),
        );
        m.insert("model.language_model.norm.weight".into(), Tensor::ones([4], (Kind::Float, Device::Cpu)));
        m.insert(
            "model.visual.blocks.0.mlp.up_proj.weight".into(),
            Tensor::full([2, 2], 0.5, (Kind::Float, Device::Cpu)),
        );
        m
    }

    #[test]
    fn save_sharded_then_load_roundtrips() {
        let dir = tempfile::tempdir().unwrap();
        let files = save_dir(dir.path(), &sample(), Kind::Float, 40).unwrap();
        // 48 bytes alone (over the limit), then 16 + 16 together; plus the index.
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(dir.path().join(INDEX_FILE).exists());
        let loaded = load_dir(dir.path(), Kind::Float, Device::Cpu).unwrap();
        for (k, v) in sample() {
            assert!(loaded[&k].equal(&v), "{k}");
        }
        // Single file when it fits; bf16 storage round-trips exactly for these values.
        let dir2 = tempfile::tempdir().unwrap();
        assert_eq!(save_dir(dir2.path(), &sample(), Kind::BFloat16, 1 << 30).unwrap(), vec![SINGLE_FILE]);
        let loaded = load_dir(dir2.path(), Kind::Float, Device::Cpu).unwrap();
        assert!(loaded["model.language_model.norm.weight"].equal(&Tensor::ones([4], (Kind::Float, Device::Cpu))));
    }

    #[test]
    fn old_names_are_normalised_and_key_errors_are_listed() {
        assert_eq!(normalize_name("visual.blocks.0.attn.qkv.weight"), "model.visual.blocks.0.attn.qkv.weight");
        assert_eq!(
            normalize_name("model.layers.3.mlp.up_proj.weight"),
            "model.language_model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(normalize_name("lm_head.weight"), "lm_head.weight");
        for name in ["model.layers.3.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"] {
            assert_eq!(text_only_name(&normalize_name(name)), name, "text-only names round-trip");
        }
        let loaded = sample();
        let mut expected: BTreeMap<String, Vec<i64>> = loaded.iter().map(|(k, v)| (k.clone(), v.size())).collect();
        expected.insert("lm_head.weight".into(), vec![4, 4]);
        expected.insert("model.language_model.norm.weight".into(), vec![5]);
        expected.remove("model.visual.blocks.0.mlp.up_proj.weight");
        let e = check_keys(Path::new("/ck"), &loaded, &expected).unwrap_err().to_string();
        assert!(e.contains("1 missing keys: lm_head.weight"), "{e}");
        assert!(e.contains("1 unexpected keys: model.visual.blocks.0.mlp.up_proj.weight"), "{e}");
        assert!(e.contains("model.language_model.norm.weight: expected [5], got [4]"), "{e}");
    }

    #[test]
    fn corrupt_file_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"not a checkpoint").unwrap();
        let e = load_dir(dir.path(), Kind::Float, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("not a safetensors file"), "{e}");
    }

    #[test]
    fn default_selection_skips_vision_mlps() {
        let m = sample();
        assert_eq!(
            select_names(m.keys(), DEFAULT_TRAINABLE).unwrap(),
            vec!["model.language_model.layers.0.mlp.up_proj.weight".to_string()]
        );
    }
}
