//! Fixtures of the GRPO tests: a real Parquet split (the task contract's writer) and
//! a tiny Qwen2.5-VL from the real `init_model` stage, taught the answer
//! format by a short real `sft` run (so sampled completions earn different
//! rewards and GRPO has something to learn from), and a progress sink that
//! "kills" a training run after N steps.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use stage_api::{ProgressSink, StageContext, StageKind};
use stages_task::dataset::{VqaRow, write_rows};
use stages_task::prompt::THINK_TEMPLATE;
use stages_train::Sft;
use stages_train::sft::{SftParams, Target};
use stages_vlm::InitModel;
use stages_vlm::init_model::InitModelParams;

/// Raises the cancel flag (as Ctrl-C does) once `after` steps are done.
pub struct KillAfter {
    after: u64,
    done: AtomicU64,
    cancel: Arc<AtomicBool>,
}

impl ProgressSink for KillAfter {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, units: u64) {
        if self.done.fetch_add(units, Ordering::SeqCst) + units >= self.after {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
    fn message(&self, _: &str) {}
    fn finish(&self) {}
}

impl KillAfter {
    pub fn new(after: u64, cancel: Arc<AtomicBool>) -> Self {
        Self { after, done: AtomicU64::new(0), cancel }
    }
}

/// The context of a training stage reading `model` and the `split`,
/// restarting from `resume`; with `kill_after`, cancelled (as Ctrl-C does)
/// once that many steps are done.
pub fn training_context(
    stage: &str,
    out: &Path,
    model: &Path,
    split: &Path,
    resume: &Path,
    seed: u64,
    kill_after: Option<u64>,
) -> anyhow::Result<StageContext> {
    let cancel = Arc::new(AtomicBool::new(false));
    let mut builder = StageContext::builder(stage, out)
        .input("model", "up", None, model)
        .input("data", "export", Some("train"), split)
        .resume_dir(resume)
        .cancel_flag(cancel.clone())
        .seed(seed);
    if let Some(after) = kill_after {
        builder = builder.progress(Arc::new(KillAfter::new(after, cancel)));
    }
    builder.build()
}

/// What a training stage noted for its provenance.json.
pub type Notes = serde_json::Map<String, serde_json::Value>;

/// Where a training run of a test reads and writes.
pub struct Dirs<'a> {
    pub model: &'a Path,
    pub split: &'a Path,
    pub out: &'a Path,
    pub resume: &'a Path,
}

/// Validate `params` and run the training stage `K` in `dirs`, cancelled
/// after `kill_after` steps when given; the notes it made.
pub fn train<K: StageKind>(
    params: &K::Params,
    dirs: Dirs,
    seed: u64,
    kill_after: Option<u64>,
) -> anyhow::Result<Notes> {
    K::validate(params).unwrap();
    let Dirs { model, split, out, resume } = dirs;
    let mut ctx = training_context(K::KIND, out, model, split, resume, seed, kill_after)?;
    K::run(params, &mut ctx)?;
    Ok(ctx.notes())
}

/// Every file under `dir` (relative path -> bytes).
pub fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// `a` and `b` hold the same files with the same bytes.
pub fn assert_same_files(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>(), "{} vs {}", a.display(), b.display());
    let differ: Vec<&String> = fa.keys().filter(|k| fa[*k] != fb[*k]).collect();
    assert!(differ.is_empty(), "{} and {} differ in {differ:?}", a.display(), b.display());
}

/// Serialises the tests of one binary that train: libtorch's thread count
/// is process-global, and a run's floats depend on it.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub const OPTIONS: [&str; 3] = ["A. airway abnormalities", "B. emphysema", "C. ground-glass opacity"];
const CLASSES: [(&str, &str); 3] =
    [("airway", "airway abnormalities"), ("emphysema", "emphysema"), ("ggo", "ground-glass opacity")];

pub fn question() -> String {
    format!("What abnormality is visible in this chest CT slice? Options: {}", OPTIONS.join(" "))
}

fn png(side: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([shade, (x * 9) as u8, (y * 5) as u8]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// `n` rows in the `parquet_export` layout; the answer follows the image shade.
pub fn write_split(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let problem = THINK_TEMPLATE.replace("{Question}", &question());
    let rows: Vec<VqaRow> = (0..n)
        .map(|i| {
            let (class, class_name) = CLASSES[i % 3];
            VqaRow {
                id: format!("case{i}/slice{i}"),
                image: Some(png(56, (i % 3 * 100) as u8)),
                problem: problem.clone(),
                answer: ["A", "B", "C"][i % 3].to_string(),
                answers: Vec::new(),
                options: OPTIONS.map(String::from).to_vec(),
                class: class.to_string(),
                class_name: class_name.to_string(),
            }
        })
        .collect();
    write_rows(&dir.join("train-00000-of-00001.parquet"), &rows).unwrap();
    dir.to_path_buf()
}

/// init_model (tokenizer trained on the prompt) + a short SFT on `split`.
pub fn tiny_sft_model(root: &Path, split: &Path, sft_epochs: usize) -> PathBuf {
    let corpus = root.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let text = format!("{}\n", THINK_TEMPLATE.replace("{Question}", &question()));
    std::fs::write(corpus.join("qa.txt"), text.repeat(4)).unwrap();
    let init = root.join("init");
    let mut ctx = StageContext::builder("tiny", &init).input("corpus", "c", None, &corpus).seed(3).build().unwrap();
    InitModel::run(&InitModelParams { vocab_size: 300, ..Default::default() }, &mut ctx).unwrap();

    let sft = root.join("sft");
    let mut ctx = StageContext::builder("sft", &sft)
        .input("model", "tiny", None, &init)
        .input("data", "export", Some("train"), split)
        .seed(5)
        .build()
        .unwrap();
    let params = SftParams {
        target: Target::ThinkAnswer,
        // Short reasoning so a whole answer fits in a few dozen tokens.
        think_text: "{class_name}".into(),
        trainable: vec![".*".into()],
        lr: 1e-2,
        epochs: sft_epochs,
        batch_size: 4,
        ..Default::default()
    };
    Sft::run(&params, &mut ctx).unwrap();
    sft
}
