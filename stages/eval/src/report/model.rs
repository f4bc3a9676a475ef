//! The report model: tables, plots and gallery built once from the loaded
//! runs, then rendered as Markdown ([`super::markdown`]) and HTML
//! ([`super::html`]).

use anyhow::Context as _;

use super::figures::{self, Plot};
use super::load::{EvalRun, Example, TrainRun};
use super::params::ReportParams;
use super::tables::{self, Table};

pub struct Report {
    pub(crate) title: String,
    pub(crate) tables: Vec<Table>,
    /// Plot sections: heading and plots.
    pub(crate) plots: Vec<(String, Vec<Plot>)>,
    /// Gallery sections: heading and examples.
    pub(crate) gallery: Vec<(String, Vec<Example>)>,
}

impl Report {
    pub fn build(params: &ReportParams, evals: Vec<EvalRun>, train: &[TrainRun]) -> anyhow::Result<Self> {
        let ids = || evals.iter().map(|e| e.key()).collect::<Vec<_>>();
        let lay = tables::layout(&evals, &params.side_splits);
        let rows: Vec<&EvalRun> = lay.rows.iter().map(|&i| &evals[i]).collect();
        let baseline = match &params.baseline {
            Some(b) => Some(
                tables::find_eval(&evals, b)
                    .context("param `baseline`")?
                    .with_context(|| format!("param `baseline`: `{b}` is not one of the evals {:?}", ids()))?,
            ),
            None => rows.first().copied(),
        };
        let classes = tables::row_classes(&rows);
        let mut all_tables = vec![tables::main_table(params, &evals, &lay, baseline)];
        for spec in &params.prompt_tables {
            all_tables.push(tables::prompt_table(params, &evals, spec)?);
        }
        for spec in &params.benchmark_tables {
            all_tables.push(tables::benchmark_table(params, &evals, spec)?);
        }
        all_tables.extend(tables::ablation_tables(params, &evals)?);
        all_tables.push(tables::per_class_table(params, &rows, &classes));

        let mut plots = vec![
            ("Per-class accuracy".to_string(), vec![figures::per_class_bars(params, &rows, &classes)?]),
            ("Confusion matrices".to_string(), figures::confusions(params, &rows)?),
        ];
        let curves = figures::training_curves(params, train)?;
        if !curves.is_empty() {
            plots.push(("Training curves".to_string(), curves));
        }
        let gallery = rows.iter().map(|e| (params.full_label(e.group.as_deref(), &e.id), e.examples.clone())).collect();
        Ok(Self { title: params.title.clone(), tables: all_tables, plots, gallery })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::report::fixtures::{source, source_on, write_eval, write_eval_of, write_scored};
    use crate::report::load::{load_eval, load_train};
    use crate::report::params::{BenchmarkTableSpec, PromptTableSpec, TableSpec};

    #[test]
    fn bad_baseline_and_table_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("base"), &[true, false]);
        let e = load_eval("eval", &dir.path().join("base"), 2).unwrap();
        let p = ReportParams { baseline: Some("nope".into()), ..Default::default() };
        let err = Report::build(&p, vec![e.clone()], &[]).err().unwrap().to_string();
        assert!(err.contains("`baseline`") && err.contains("nope"), "{err}");
        let p = ReportParams {
            tables: vec![TableSpec { title: "T".into(), rows: vec!["x".into()] }],
            ..Default::default()
        };
        let err = Report::build(&p, vec![e], &[]).err().unwrap().to_string();
        assert!(err.contains("no eval named `x`"), "{err}");
    }

    /// A GRPO metrics.jsonl as TRL names it, for one variant.
    fn write_grpo_metrics(dir: &Path, scale: f64) {
        std::fs::create_dir_all(dir).unwrap();
        let rows: Vec<String> = (1..=4)
            .map(|step| {
                let s = step as f64;
                serde_json::json!({
                    "step": step, "epoch": 0.1 * s, "loss": 0.05 / s, "lr": 1e-6, "grad_norm": 0.3,
                    "reward": scale * s, "reward_std": 0.2,
                    "rewards/format/mean": 0.5 + 0.1 * s, "rewards/format/std": 0.1,
                    "rewards/validity/mean": 0.9, "rewards/validity/std": 0.05,
                    "rewards/correctness/mean": 0.1 * s * scale, "rewards/correctness/std": 0.3,
                    "kl": 0.001 * s, "entropy": 1.5, "completions/mean_length": 40.0 + s,
                    "clip_ratio/region_mean": 0.0, "frac_reward_zero_std": 0.25,
                })
                .to_string()
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), rows.join("\n") + "\n").unwrap();
    }

    #[test]
    fn grpo_curves_plot_loss_reward_components_kl_and_length_per_variant() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("e"), &[true, false]);
        write_grpo_metrics(&dir.path().join("ga"), 1.0);
        write_grpo_metrics(&dir.path().join("gb"), 0.5);
        let sft = dir.path().join("sft");
        std::fs::create_dir_all(&sft).unwrap();
        std::fs::write(sft.join("metrics.jsonl"), "{\"step\": 1, \"epoch\": 0, \"loss\": 2.0, \"lr\": 0.1}\n").unwrap();
        let train = vec![
            load_train("sft", &sft).unwrap(),
            load_train("grpo@full", &dir.path().join("ga")).unwrap(),
            load_train("grpo@no_validity", &dir.path().join("gb")).unwrap(),
        ];
        assert!(!train[1].curves.contains_key("epoch") && train[1].curves["reward"].len() == 4);
        let evals = vec![load_eval("eval", &dir.path().join("e"), 2).unwrap()];
        let report = Report::build(&ReportParams::default(), evals, &train).unwrap();
        let md = report.markdown();
        let captions: Vec<&str> = md
            .lines()
            .filter_map(|l| l.strip_prefix("![").and_then(|l| l.split_once("](plots/train_")).map(|(c, _)| c))
            .collect();
        let both = "grpo@full, grpo@no_validity";
        assert_eq!(
            captions,
            [
                "sft: loss — sft".to_string(),
                "sft: lr — sft".to_string(),
                format!("grpo: loss — {both}"),
                format!("grpo: reward (band: ± std) — {both}"),
                format!("grpo: rewards/correctness/mean (band: ± std) — {both}"),
                format!("grpo: rewards/format/mean (band: ± std) — {both}"),
                format!("grpo: rewards/validity/mean (band: ± std) — {both}"),
                format!("grpo: kl — {both}"),
                format!("grpo: completions/mean_length — {both}"),
                format!("grpo: entropy — {both}"),
                format!("grpo: clip_ratio/region_mean — {both}"),
                format!("grpo: frac_reward_zero_std — {both}"),
                format!("grpo: lr — {both}"),
                format!("grpo: grad_norm — {both}"),
            ],
            "one plot per metric, std series drawn as bands"
        );
        let html = report.html().unwrap();
        assert_eq!(html.matches("<figure>").count(), 1 + 1 + captions.len(), "bars + confusion + curves");
        // An explicit selection plots exactly those metrics (a std then gets its own plot).
        let p = ReportParams { train_metrics: vec!["kl".into(), "reward_std".into()], ..Default::default() };
        let evals = vec![load_eval("eval", &dir.path().join("e"), 2).unwrap()];
        let md = Report::build(&p, evals, &train).unwrap().markdown();
        assert!(md.contains("![grpo: kl — grpo@full, grpo@no_validity](plots/train_00.png)"), "{md}");
        assert!(md.contains("![grpo: reward_std — grpo@full, grpo@no_validity](plots/train_01.png)"), "{md}");
        assert!(!md.contains("sft:"), "sft has neither metric");
    }

    #[test]
    fn train_split_evals_become_a_column_of_their_test_eval() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_eval_of(&d.join("base"), &[false, false, true, false], source("tiny_model", "test", "think"));
        write_eval_of(&d.join("test"), &[true, true, false, true], source("sft", "test", "think"));
        write_eval_of(&d.join("train"), &[true, true, true, true, true, false], source("sft", "train", "think"));
        // Same model, other prompt: stays a row of its own.
        write_eval_of(&d.join("nothink"), &[true, false], source("sft", "train", "no_think"));
        let evals = vec![
            load_eval("eval_base", &d.join("base"), 2).unwrap(),
            load_eval("eval", &d.join("test"), 2).unwrap(),
            load_eval("eval_train", &d.join("train"), 2).unwrap(),
            load_eval("eval_train_nothink", &d.join("nothink"), 2).unwrap(),
        ];
        let report = Report::build(&ReportParams::default(), evals.clone(), &[]).unwrap();
        let md = report.markdown();
        // The nothink row is on the training split: a "Data" column appears.
        assert!(md.contains("| Model | Data | n | Accuracy | train acc | Macro |"), "{md}");
        let row = |id: &str| md.lines().find(|l| l.starts_with(&format!("| {id} | "))).unwrap_or_default().to_string();
        assert!(row("eval").contains("| 75.00 [30.06, 95.44] | 83.33 [43.65, 96.99] |"), "{}", row("eval"));
        assert!(row("eval_base").contains("| 25.00 [4.56, 69.94] | - |"), "{}", row("eval_base"));
        assert!(row("eval_train").is_empty(), "the train eval is a column, not a row");
        assert!(!row("eval_train_nothink").is_empty(), "no test eval with its prompt: a row");
        assert!(!md.contains("### eval_train\n"), "no gallery of the column eval");
        // Without side splits every eval is a row.
        let p = ReportParams { side_splits: Vec::new(), ..Default::default() };
        let md = Report::build(&p, evals, &[]).unwrap().markdown();
        assert!(md.contains("| Model | Data | n | Accuracy | Macro |"), "{md}");
        assert!(md.contains("| eval_train | export.train | 6 |"), "{md}");
    }

    /// The row of the Markdown table that starts with `label`.
    fn md_row(md: &str, table: &str, label: &str) -> Vec<String> {
        let section = md.split("## ").find(|s| s.starts_with(table)).unwrap_or_default();
        let line = section.lines().find(|l| l.starts_with(&format!("| {label} | "))).unwrap_or_default();
        line.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect()
    }

    #[test]
    fn deltas_are_only_taken_between_evals_of_the_same_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_eval_of(&d.join("sft"), &[true, false, true, true], source("sft", "test", "think"));
        write_eval_of(&d.join("grpo"), &[true, true, true, true], source("grpo", "test", "think"));
        write_scored(&d.join("gen_sft"), &[1.0, 0.0, 0.0, 0.0], source_on("sft", "general", "no_think", "relaxed"));
        write_scored(&d.join("gen_grpo"), &[1.0, 1.0, 0.0, 0.0], source_on("grpo", "general", "no_think", "relaxed"));
        let evals = ["sft", "grpo", "gen_sft", "gen_grpo"]
            .map(|id| load_eval(&format!("eval_{id}"), &d.join(id), 2).unwrap())
            .to_vec();
        let p = ReportParams {
            baseline: Some("eval_sft".into()),
            tables: vec![TableSpec { title: "Mixed".into(), rows: vec!["eval_sft".into(), "eval_gen_grpo".into()] }],
            ..Default::default()
        };
        let md = Report::build(&p, evals, &[]).unwrap().markdown();
        let main = "Accuracy (%, 95% CI) with deltas vs eval_sft (rows on other data";
        assert!(md.contains(&format!("## {main}: vs the first row on theirs)")), "{md}");
        let delta = |label: &str| md_row(&md, main, label).last().cloned().unwrap_or_default();
        assert_eq!(md_row(&md, main, "eval_grpo")[1], "export.test");
        assert_eq!(md_row(&md, main, "eval_gen_sft")[1], "general (relaxed)");
        assert_eq!(delta("eval_grpo"), "+25.00", "vs the baseline, same data");
        assert_eq!(delta("eval_gen_sft"), "+0.00", "the first general row is its own reference");
        assert_eq!(delta("eval_gen_grpo"), "+25.00", "vs the general SFT row, never vs the CT baseline");
        assert_eq!(md_row(&md, "Mixed", "eval_gen_grpo").last().map(String::as_str), Some("n/a (other data)"));
    }

    #[test]
    fn paper_tables_place_evals_by_model_prompt_and_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ct = |m: &str, p: &str| source_on(m, "export.test", p, "choice");
        write_eval_of(&d.join("base_think"), &[false, true, false, false], ct("base_model", "think"));
        write_eval_of(&d.join("base_nothink"), &[true, true, false, false], ct("base_model", "no_think"));
        write_eval_of(&d.join("grpo_think"), &[true, true, true, false], ct("grpo", "think"));
        // Table 2: ChartQA (binary) and TextVQA (partial credit) per model.
        write_scored(
            &d.join("base_chart"),
            &[1.0, 1.0, 0.0, 1.0],
            source_on("base_model", "chartqa", "no_think", "chartqa"),
        );
        write_scored(
            &d.join("base_text"),
            &[1.0, 0.9, 0.6, 0.3, 1.0, 1.0],
            source_on("base_model", "textvqa", "no_think", "vqa_accuracy"),
        );
        write_scored(&d.join("grpo_chart"), &[1.0, 0.0, 0.0, 1.0], source_on("grpo", "chartqa", "no_think", "chartqa"));
        write_scored(
            &d.join("grpo_text"),
            &[1.0, 0.9, 0.9, 0.3, 1.0, 1.0],
            source_on("grpo", "textvqa", "no_think", "vqa_accuracy"),
        );
        let ids = ["base_think", "base_nothink", "grpo_think", "base_chart", "base_text", "grpo_chart", "grpo_text"];
        let evals: Vec<EvalRun> =
            ids.iter().map(|id| load_eval(&format!("eval_{id}"), &d.join(id), 2).unwrap()).collect();
        let labels =
            [("base_model", "Qwen2.5-VL"), ("grpo", "MedReason-R1"), ("chartqa", "ChartQA"), ("textvqa", "TextVQA")];
        let p = ReportParams {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            prompt_tables: vec![PromptTableSpec { title: "T1".into(), dataset: "export.test".into(), models: vec![] }],
            benchmark_tables: vec![BenchmarkTableSpec {
                title: "T2".into(),
                datasets: vec!["chartqa".into(), "textvqa".into()],
                models: vec![],
                base: Some("base_model".into()),
                prompt: None,
            }],
            ..Default::default()
        };
        let md = Report::build(&p, evals.clone(), &[]).unwrap().markdown();
        assert!(md.contains("## T1\n\n| Model | w think | w/o think |"), "{md}");
        assert_eq!(md_row(&md, "T1", "Qwen2.5-VL"), ["Qwen2.5-VL", "25.00 [4.56, 69.94]", "50.00 [15.00, 85.00]"]);
        assert_eq!(md_row(&md, "T1", "MedReason-R1"), ["MedReason-R1", "75.00 [30.06, 95.44]", "-"]);
        assert!(
            md.contains("| Model | ChartQA (n=4) | TextVQA (n=6) | Weighted avg. | Δ vs Qwen2.5-VL (pp) |"),
            "{md}"
        );
        // Base: ChartQA 3/4, TextVQA mean(1, .9, .6, .3, 1, 1) = 0.8; weighted (3 + 4.8) / 10 = 0.78.
        // GRPO: ChartQA 2/4, TextVQA 5.1/6 = 0.85; weighted (2 + 5.1) / 10 = 0.71; Δ = -7.00 pp.
        let base = md_row(&md, "T2", "Qwen2.5-VL");
        assert_eq!((base[1].split(' ').next(), base[2].split(' ').next()), (Some("75.00"), Some("80.00")));
        assert_eq!(&base[3..], ["78.00", "+0.00"]);
        let grpo = md_row(&md, "T2", "MedReason-R1");
        assert_eq!(&grpo[3..], ["71.00", "-7.00"], "{grpo:?}");
        // The main table shows the TextVQA rows' VQA accuracy, not the full-credit fraction (3/6).
        assert!(md_row(&md, "Accuracy", "eval_base_text")[3].starts_with("80.00 "), "{md}");

        // A dataset no eval scored is named.
        let mut bad = p.clone();
        bad.benchmark_tables[0].datasets.push("docvqa".into());
        let err = format!("{:#}", Report::build(&bad, evals.clone(), &[]).err().unwrap());
        assert!(err.contains("\"T2\"") && err.contains("no eval scored dataset `docvqa`"), "{err}");
        let mut bad = p;
        bad.prompt_tables[0].models = vec!["sft".into()];
        let err = format!("{:#}", Report::build(&bad, evals, &[]).err().unwrap());
        assert!(err.contains("model `sft` has no eval here"), "{err}");
    }

    #[test]
    fn runs_are_row_groups_and_ids_are_resolved_per_run() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("a"), &[true, false]);
        write_eval(&dir.path().join("b"), &[true, true]);
        let mut evals = Vec::new();
        for (run, sub) in [("mini (run 1)", "a"), ("mini (run 2)", "b")] {
            let mut e = load_eval("eval", &dir.path().join(sub), 2).unwrap();
            e.group = Some(run.into());
            evals.push(e);
        }
        let p = ReportParams { baseline: Some("mini (run 2)/eval".into()), ..Default::default() };
        let report = Report::build(&p, evals.clone(), &[]).unwrap();
        let html = report.html().unwrap();
        assert_eq!(html.matches("<tr class=\"group\"><th colspan=\"10\">mini (run 1)</th></tr>").count(), 1);
        assert_eq!(html.matches("<tr class=\"group\">").count(), 4, "2 runs x (main + per-class tables)");
        assert!(html.contains("deltas vs mini (run 2) · eval") && html.contains("<td>-50.00</td>"));
        assert!(html.contains("<h3>mini (run 1) · eval</h3>"));
        let md = report.markdown();
        assert!(md.contains("| **mini (run 2)** | | | | | | | | | |"), "{md}");
        // A bare stage id is ambiguous across runs.
        let p = ReportParams { baseline: Some("eval".into()), ..Default::default() };
        let err = format!("{:#}", Report::build(&p, evals, &[]).err().unwrap());
        assert!(err.contains("several runs") && err.contains("mini (run 1)/eval"), "{err}");
    }
}
