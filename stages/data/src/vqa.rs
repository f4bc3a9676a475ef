//! Stage `vqa`: turns rendered lesion slices into multiple-choice questions.
//!
//! Inputs: `items` (the `render` output: `items.jsonl`) and `index` (the
//! `rexgct_index` output, for the class list and display names).
//! Output: `items.jsonl`, every input record plus
//! - `question`: the question with its options (`question_template`),
//! - `options`: `["A. airway abnormalities", ...]`, all classes labelled A..,
//!   in the index's class order (`option_order = "fixed"`) or shuffled per
//!   item with a stream seeded by the recipe seed and the item id
//!   (`"shuffled"`: independent of item order and thread count),
//! - `problem`: the question wrapped in the think / no-think prompt of domain
//!   notes §4 (`prompt`),
//! - `answer`: the correct letter, `solution`: `<answer> X </answer>`,
//! - `class_name`: the display name of the true class.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use stage_api::derive_seed;
use stage_api::{InputSpec, ParamError, StageContext, StageKind};
use stages_task::answer::option_text;
use stages_task::completion::ResponseFormat;
use stages_task::prompt::{NO_THINK_TEMPLATE, THINK_TEMPLATE};

use crate::jsonl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptionOrder {
    /// The class order of the index, the same for every question.
    Fixed,
    /// A seeded per-item permutation (reproducible from the seed and item id).
    Shuffled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct VqaParams {
    /// The question asked about every slice.
    pub question: String,
    /// Layout of the question block: `{question}` and `{options}` (one
    /// `<letter>. <class name>` per line) are substituted.
    pub question_template: String,
    /// `fixed` (index class order) or `shuffled` (seeded per item).
    pub option_order: OptionOrder,
    /// Which prompt wraps the question into `problem`: `think` or `no_think`.
    pub prompt: ResponseFormat,
    /// Think prompt; `{Question}` is replaced by the question block (domain notes §4).
    pub think_template: String,
    /// No-think prompt; `{Question}` is replaced by the question block (domain notes §4).
    pub no_think_template: String,
}

impl Default for VqaParams {
    fn default() -> Self {
        Self {
            question: "Which type of lesion is marked in this chest CT slice?".into(),
            question_template: "{question}\nOptions:\n{options}".into(),
            option_order: OptionOrder::Fixed,
            prompt: ResponseFormat::Think,
            think_template: THINK_TEMPLATE.into(),
            no_think_template: NO_THINK_TEMPLATE.into(),
        }
    }
}

/// The part of `index.json` this stage needs.
#[derive(Debug, Deserialize)]
struct ClassIndex {
    classes: Vec<String>,
    #[serde(default)]
    class_names: BTreeMap<String, String>,
}

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub question: String,
    pub options: Vec<String>,
    pub problem: String,
    pub answer: String,
}

/// Build the question for an item of `class`, with the classes presented in `order`.
pub fn build_question(
    params: &VqaParams,
    order: &[&str],
    names: &BTreeMap<String, String>,
    class: &str,
) -> Result<Question, String> {
    if order.len() > 26 {
        return Err(format!("{} classes cannot be labelled A-Z", order.len()));
    }
    let mut options = Vec::with_capacity(order.len());
    let mut answer = None;
    for (i, c) in order.iter().enumerate() {
        let letter = char::from(b'A' + i as u8);
        let name = names.get(*c).map(String::as_str).unwrap_or(c);
        options.push(option_text(letter, name));
        if *c == class {
            answer = Some(letter.to_string());
        }
    }
    let answer = answer.ok_or_else(|| format!("class `{class}` is not one of the index classes {order:?}"))?;
    let question =
        params.question_template.replace("{question}", &params.question).replace("{options}", &options.join("\n"));
    let template = match params.prompt {
        ResponseFormat::Think => &params.think_template,
        ResponseFormat::NoThink => &params.no_think_template,
    };
    let problem = template.replace("{Question}", &question);
    Ok(Question { question, options, problem, answer })
}

pub struct Vqa;

impl StageKind for Vqa {
    type Params = VqaParams;
    const KIND: &'static str = "vqa";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Multiple-choice lesion-class questions (options A-G, think/no-think prompt) per rendered slice";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::one("items", "`render` output (items.jsonl)"),
            InputSpec::one("index", "`rexgct_index` output (classes and display names)"),
        ];
        INPUTS
    }

    fn validate(p: &VqaParams) -> Result<(), ParamError> {
        for (key, tpl, holes) in [
            ("question_template", &p.question_template, &["{question}", "{options}"][..]),
            ("think_template", &p.think_template, &["{Question}"][..]),
            ("no_think_template", &p.no_think_template, &["{Question}"][..]),
        ] {
            for hole in holes {
                if !tpl.contains(hole) {
                    return Err(ParamError::new(&[key], format!("template must contain `{hole}`")));
                }
            }
        }
        Ok(())
    }

    fn run(params: &VqaParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let index_path = ctx.input("index")?.join("index.json");
        let index: ClassIndex = jsonl::read_json(&index_path).context("reading the class list")?;
        if index.classes.is_empty() {
            bail!("{}: `classes` is empty", index_path.display());
        }
        let items_path = ctx.input("items")?.join("items.jsonl");
        let items: Vec<Map<String, Value>> = jsonl::read(&items_path)?;
        ctx.progress().start("vqa", items.len() as u64);
        let mut out = Vec::with_capacity(items.len());
        for (line, mut item) in items.into_iter().enumerate() {
            let field = |name: &str| -> anyhow::Result<String> {
                item.get(name).and_then(Value::as_str).map(str::to_string).with_context(|| {
                    format!("{}:{}: field `{name}` missing or not a string", items_path.display(), line + 1)
                })
            };
            let (id, class) = (field("id")?, field("class")?);
            let mut order: Vec<&str> = index.classes.iter().map(String::as_str).collect();
            if params.option_order == OptionOrder::Shuffled {
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(ctx.seed(), &format!("vqa/options/{id}")));
                order.shuffle(&mut rng);
            }
            let q = build_question(params, &order, &index.class_names, &class)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", items_path.display(), line + 1))?;
            let class_name = index.class_names.get(&class).cloned().unwrap_or_else(|| class.clone());
            item.insert("question".into(), Value::String(q.question));
            item.insert("options".into(), Value::from(q.options));
            item.insert("problem".into(), Value::String(q.problem));
            item.insert("solution".into(), Value::String(format!("<answer> {} </answer>", q.answer)));
            item.insert("answer".into(), Value::String(q.answer));
            item.insert("class_name".into(), Value::String(class_name));
            out.push(item);
            ctx.progress().advance(1);
        }
        ctx.progress().finish();
        jsonl::write(&ctx.output_dir().join("items.jsonl"), &out)?;
        tracing::info!(items = out.len(), "vqa items written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::rexgct::CLASSES;

    fn setup(dir: &std::path::Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
        let index = dir.join("index");
        std::fs::create_dir_all(&index).unwrap();
        let names: BTreeMap<_, _> = CLASSES.iter().map(|c| (c.to_string(), format!("{c} name"))).collect();
        jsonl::write_json(&index.join("index.json"), &json!({"classes": CLASSES, "class_names": names, "cases": []}))
            .unwrap();
        let items = dir.join("items");
        std::fs::create_dir_all(&items).unwrap();
        let recs: Vec<_> = (0..n)
            .map(|i| json!({"id": format!("case_{i}/{}/001", CLASSES[i % 7]), "class": CLASSES[i % 7], "patient_id": "p"}))
            .collect();
        jsonl::write(&items.join("items.jsonl"), &recs).unwrap();
        (items, index)
    }

    fn run(dir: &std::path::Path, params: &VqaParams, seed: u64, name: &str) -> Vec<Map<String, Value>> {
        let (items, index) = setup(dir, 14);
        let out = dir.join(name);
        let mut ctx = StageContext::builder("vqa", &out)
            .input("items", "render", None, items)
            .input("index", "index", None, index)
            .seed(seed)
            .build()
            .unwrap();
        Vqa::run(params, &mut ctx).unwrap();
        jsonl::read(&out.join("items.jsonl")).unwrap()
    }

    #[test]
    fn fixed_order_labels_classes_a_to_g() {
        let dir = tempfile::tempdir().unwrap();
        let items = run(dir.path(), &VqaParams::default(), 1, "out");
        assert_eq!(items.len(), 14);
        let first = &items[0];
        assert_eq!(first["options"][0], "A. airway name");
        assert_eq!(first["options"][6], "G. effusion_thickening name");
        assert_eq!(first["answer"], "A");
        assert_eq!(items[3]["answer"], "D");
        assert_eq!(items[3]["solution"], "<answer> D </answer>");
        assert_eq!(items[3]["class_name"], "nodule_mass name");
        let problem = first["problem"].as_str().unwrap();
        assert!(
            problem.starts_with("Which type of lesion is marked in this chest CT slice?\nOptions:\nA. airway name\n")
        );
        assert!(problem.contains("<think>...</think>"));
        // Every item of the same class gets the same letter in fixed order.
        assert_eq!(items[0]["options"], items[7]["options"]);
    }

    #[test]
    fn shuffled_order_is_seeded_and_answer_follows_the_class() {
        let dir = tempfile::tempdir().unwrap();
        let p =
            VqaParams { option_order: OptionOrder::Shuffled, prompt: ResponseFormat::NoThink, ..Default::default() };
        let a = run(dir.path(), &p, 7, "a");
        let b = run(dir.path(), &p, 7, "b");
        let c = run(dir.path(), &p, 8, "c");
        assert_eq!(a, b, "same seed, same questions");
        assert_ne!(a, c, "another seed permutes differently");
        let orders: std::collections::BTreeSet<String> = a.iter().map(|i| i["options"].to_string()).collect();
        assert!(orders.len() > 1, "permutation differs between items");
        for item in &a {
            let letter = item["answer"].as_str().unwrap();
            let idx = (letter.as_bytes()[0] - b'A') as usize;
            let opt = item["options"][idx].as_str().unwrap();
            assert_eq!(opt, format!("{letter}. {} name", item["class"].as_str().unwrap()));
            assert!(!item["problem"].as_str().unwrap().contains("<think>"));
        }
    }

    #[test]
    fn unknown_class_and_bad_template_are_errors() {
        let names = BTreeMap::new();
        let err = build_question(&VqaParams::default(), &["a", "b"], &names, "c").unwrap_err();
        assert!(err.contains("class `c`"), "{err}");
        let p = VqaParams { think_template: "no placeholder".into(), ..Default::default() };
        let err = Vqa::validate(&p).unwrap_err();
        assert_eq!(err.path, vec!["think_template"]);
    }
}
