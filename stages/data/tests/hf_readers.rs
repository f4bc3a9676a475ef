//! The HF readers on small committed fixtures written by the libraries the
//! real downloads come from (`tools/hf_fixtures.py`: `datasets` to_parquet
//! in the hub layouts of ChartQA and TextVQA, `save_to_disk` with 3 shards
//! in the layout of the released CT-RATE-VQA).

use std::path::{Path, PathBuf};

use stage_api::{StageContext, StageKind};
use stages_data::hf_disk_vqa::{DiskColumns, HfDiskVqaParams};
use stages_data::hf_vqa::{HfColumns, HfPreset, HfVqaParams};
use stages_data::{HfDiskVqa, HfVqa};
use stages_task::dataset::{VqaRow, read_split};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

fn run<K: StageKind>(params: &K::Params, out: &Path) -> anyhow::Result<()> {
    let mut ctx = StageContext::builder(K::KIND, out).recipe_dir(fixtures()).build()?;
    K::run(params, &mut ctx)
}

fn hf(preset: HfPreset, path: &str) -> HfVqaParams {
    HfVqaParams {
        preset,
        path: path.into(),
        split: None,
        limit: None,
        columns: HfColumns::default(),
        question_case: None,
    }
}

fn read(dir: &Path) -> Vec<VqaRow> {
    read_split(dir).unwrap_or_else(|e| panic!("{e}"))
}

fn decodes(r: &VqaRow) -> bool {
    r.image.as_deref().is_some_and(|b| image::load_from_memory(b).is_ok_and(|i| i.width() == 8))
}

#[test]
fn chartqa_m4_layout_reads_the_test_shards_with_labels_and_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("chartqa");
    run::<HfVqa>(&hf(HfPreset::Chartqa, "chartqa_m4"), &out).unwrap();
    assert!(out.join("test-00000-of-00001.parquet").is_file());
    let rows = read(&out);
    assert_eq!(rows.len(), 5, "both test shards, not the train shard");
    assert_eq!(rows[0].problem, "What is the value of the tallest bar?");
    assert_eq!((rows[0].answer.as_str(), rows[0].answers.as_slice()), ("12.5", &["12.5".to_string()][..]));
    assert_eq!(rows[0].id, "test/000000");
    let classes: Vec<&str> = rows.iter().map(|r| r.class.as_str()).collect();
    assert_eq!(classes, ["human", "machine", "human", "machine", "human"], "ClassLabel names from the HF metadata");
    assert!(rows.iter().all(|r| decodes(r) && r.options.is_empty()));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rows"], 5);
    assert_eq!(summary["shards"].as_array().unwrap().len(), 2);

    // `limit` reads a prefix; `split` picks other shards.
    let out = dir.path().join("train");
    run::<HfVqa>(&HfVqaParams { split: Some("train".into()), ..hf(HfPreset::Chartqa, "chartqa_m4") }, &out).unwrap();
    assert_eq!(read(&out).len(), 1);
    assert!(out.join("train-00000-of-00001.parquet").is_file());
    let out = dir.path().join("limit");
    run::<HfVqa>(&HfVqaParams { limit: Some(4), ..hf(HfPreset::Chartqa, "chartqa_m4") }, &out).unwrap();
    assert_eq!(read(&out).len(), 4, "across the shard boundary");
}

#[test]
fn lmms_chartqa_and_textvqa_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lmms");
    run::<HfVqa>(&hf(HfPreset::ChartqaLmms, "chartqa_lmms"), &out).unwrap();
    let rows = read(&out);
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[1].answer.as_str(), rows[1].class.as_str()), ("12%", "human_test"));
    assert!(rows[1].answers.is_empty() && decodes(&rows[1]));

    let out = dir.path().join("textvqa");
    run::<HfVqa>(&hf(HfPreset::Textvqa, "textvqa"), &out).unwrap();
    assert!(out.join("validation-00000-of-00001.parquet").is_file(), "the preset's default split");
    let rows = read(&out);
    assert_eq!(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["34602", "34603", "34604"]);
    assert_eq!(rows[0].problem, "What does the sign say?", "capitalised as lmms-eval's prompt does");
    assert!(rows.iter().all(|r| r.answers.len() == 10 && r.class == "all"));
    let golds: Vec<&str> = rows.iter().map(|r| r.answer.as_str()).collect();
    assert_eq!(golds, ["stop", "coke", "2"], "the most frequent human answer");
    // The gold list scores as TextVQA does: "Coca Cola" matches 5 of 10 humans after normalisation.
    let s = stages_task::Scorer::block(stages_task::ResponseFormat::NoThink, stages_task::AnswerMatch::VqaAccuracy);
    let r = s.score_answers("<answer>Coca Cola</answer>", &rows[1].answer, &rows[1].answers, &[]);
    assert_eq!(r.credit, 1.0);
    let r = s.score_answers("<answer>coke</answer>", &rows[1].answer, &rows[1].answers, &[]);
    assert!((r.credit - 0.9).abs() < 1e-12, "3 humans said coke: {}", r.credit);

    // An override maps another layout: lmms ChartQA read with its answer as the list.
    let columns = HfColumns { answers: Some("answer".into()), answer: Some(String::new()), ..Default::default() };
    let out = dir.path().join("override");
    run::<HfVqa>(&HfVqaParams { columns, ..hf(HfPreset::ChartqaLmms, "chartqa_lmms") }, &out).unwrap();
    assert_eq!(read(&out)[2].answers, ["Germany"]);
}

#[test]
fn bad_layouts_and_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", run::<HfVqa>(&hf(HfPreset::Chartqa, "chartqa_bad"), &dir.path().join("a")).unwrap_err());
    assert!(
        err.contains("chartqa_bad/data/test-00000-of-00001.parquet: column `query`: missing")
            && err.contains("\"question\""),
        "{err}"
    );
    let p = HfVqaParams { split: Some("val".into()), ..hf(HfPreset::Chartqa, "chartqa_m4") };
    let err = format!("{:#}", run::<HfVqa>(&p, &dir.path().join("b")).unwrap_err());
    assert!(err.contains("no `val-*.parquet` shards") && err.contains("[\"test\", \"train\"]"), "{err}");
    let err = format!("{:#}", run::<HfVqa>(&hf(HfPreset::Textvqa, "nope"), &dir.path().join("c")).unwrap_err());
    assert!(err.contains("nope does not exist"), "{err}");
    // `plan` hashes only the split's shards (a hub download holds every split).
    let ext = HfVqa::external_inputs(&hf(HfPreset::Chartqa, "chartqa_m4"), &fixtures());
    assert_eq!(ext.len(), 2);
    assert!(ext.iter().all(|p| p.file_name().unwrap().to_str().unwrap().starts_with("test-")));
    assert_eq!(HfVqa::external_inputs(&hf(HfPreset::Chartqa, "nope"), &fixtures()), [fixtures().join("nope")]);
}

fn disk(path: &str) -> HfDiskVqaParams {
    HfDiskVqaParams { path: path.into(), split: None, name: None, columns: DiskColumns::default(), limit: None }
}

#[test]
fn released_save_to_disk_layout_maps_onto_vqa_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ctrvqa");
    run::<HfDiskVqa>(&HfDiskVqaParams { name: Some("test".into()), ..disk("ctrvqa_test") }, &out).unwrap();
    assert!(out.join("test-00000-of-00001.parquet").is_file(), "named as the split it is");
    let rows = read(&out);
    assert_eq!(rows.len(), 7, "3 shards in state.json order");
    let golds: String = rows.iter().map(|r| r.answer.as_str()).collect();
    assert_eq!(golds, "BDGAFCE");
    let r = &rows[0];
    assert_eq!(r.options.len(), 7);
    assert_eq!(
        (r.options[0].as_str(), r.options[6].as_str()),
        ("A. airway abnormalities", "G. pleural effusion/thickening")
    );
    assert_eq!((r.class.as_str(), r.class_name.as_str()), ("emphysema", "emphysema"));
    assert_eq!(r.id, "test/000000");
    assert!(r.problem.starts_with("Which type of lesion") && r.problem.contains("Your task:"), "kept as stored");
    assert!(rows.iter().all(decodes));
    // The rows are the task contract's: our eval prompt recovers the question.
    let no_think = stages_task::prompt::user_text(
        &r.problem,
        stages_task::PromptVariant::NoThink,
        stages_task::prompt::THINK_TEMPLATE,
        stages_task::prompt::NO_THINK_TEMPLATE,
    )
    .unwrap();
    assert!(no_think.ends_with("G. pleural effusion/thickening Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags. 2. No extra information or text outside of this tag."));

    let out = dir.path().join("limit");
    run::<HfDiskVqa>(&HfDiskVqaParams { limit: Some(4), ..disk("ctrvqa_test") }, &out).unwrap();
    assert!(out.join("train-00000-of-00001.parquet").is_file(), "default: the DatasetDict's split name");
    assert_eq!(read(&out).len(), 4);
}

#[test]
fn an_image_less_row_and_bad_metadata_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", run::<HfDiskVqa>(&disk("ctrvqa_bad"), &dir.path().join("a")).unwrap_err());
    assert!(err.contains("ctrvqa_bad/data-00002-of-00003.arrow: row 0: column `image`: no image"), "{err}");
    let p = HfDiskVqaParams { split: Some("test".into()), ..disk("ctrvqa_test") };
    let err = format!("{:#}", run::<HfDiskVqa>(&p, &dir.path().join("b")).unwrap_err());
    assert!(err.contains("`split` `test` is not a split") && err.contains("[\"train\"]"), "{err}");
    let columns = DiskColumns { problem: "question".into(), ..Default::default() };
    let err = format!(
        "{:#}",
        run::<HfDiskVqa>(&HfDiskVqaParams { columns, ..disk("ctrvqa_test") }, &dir.path().join("c")).unwrap_err()
    );
    assert!(err.contains("dataset_info.json: column `question`: not a column"), "{err}");

    // A copy whose state.json lists a shard that is gone, and whose features call the image a string.
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(fixtures().join("ctrvqa_bad")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let info = std::fs::read_to_string(copy.join("dataset_info.json")).unwrap();
    std::fs::write(
        copy.join("dataset_info.json"),
        info.replacen("\"_type\": \"Image\"", "\"dtype\": \"string\", \"_type\": \"Value\"", 1),
    )
    .unwrap();
    let err = format!("{:#}", run::<HfDiskVqa>(&disk(copy.to_str().unwrap()), &dir.path().join("d")).unwrap_err());
    assert!(
        err.contains("dataset_info.json: column `image`: declared as") && err.contains("expected an Image feature"),
        "{err}"
    );
    std::fs::remove_file(copy.join("data-00001-of-00003.arrow")).unwrap();
    let err = format!("{:#}", run::<HfDiskVqa>(&disk(copy.to_str().unwrap()), &dir.path().join("e")).unwrap_err());
    assert!(err.contains("state.json: `_data_files[1]`: shard `data-00001-of-00003.arrow` does not exist"), "{err}");
}
