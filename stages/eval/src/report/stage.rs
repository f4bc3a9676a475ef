//! The `report` stage kind, and the files a [`Report`] is written as:
//! `report.md`, `report.html` and `plots/*.png`.

use std::path::Path;

use anyhow::{Context as _, bail};
use stage_api::{InputSpec, ParamError, StageContext, StageKind};

use super::load::{attach_judge, load_eval, load_train};
use super::model::Report;
use super::params::ReportParams;
use crate::artifacts::{PLOTS_DIR, REPORT_HTML, REPORT_MD, artifact_id};

impl Report {
    /// Write `report.md`, `plots/*.png` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let plots_dir = dir.join(PLOTS_DIR);
        std::fs::create_dir_all(&plots_dir).with_context(|| format!("creating {}", plots_dir.display()))?;
        for p in self.plots.iter().flat_map(|(_, p)| p) {
            let path = plots_dir.join(&p.file);
            std::fs::write(&path, &p.png).with_context(|| format!("writing {}", path.display()))?;
        }
        let html = self.html().context("rendering report.html")?;
        for (name, text) in [(REPORT_MD, self.markdown()), (REPORT_HTML, html)] {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

pub struct ReportStage;

impl StageKind for ReportStage {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    // v2: train-side accuracy columns, per-stage training curves with std bands.
    // v3: report.html rendered by a minijinja template (HTML autoescape: `'`
    //     and `/` in text are escaped too; the CSS is on several lines).
    // v4: each eval's headline score (VQA accuracy where partial credit),
    //     deltas only between evals of the same dataset (a "Data" column when
    //     rows differ), `prompt_tables` (Table 1) and `benchmark_tables` (Table 2).
    const VERSION: u32 = 4;
    const SUMMARY: &'static str = "report.md + self-contained report.html: accuracy/consistency tables, per-class and confusion plots, training curves, examples";

    fn inputs() -> &'static [InputSpec] {
        const INPUTS: &[InputSpec] = &[
            InputSpec::many("evals", "`eval` outputs, one table row each"),
            InputSpec {
                name: "judges",
                doc: "`judge` outputs (each matched to the eval whose predictions it judged)",
                many: true,
                optional: true,
            },
            InputSpec {
                name: "train",
                doc: "SFT/GRPO outputs with metrics.jsonl (training curves)",
                many: true,
                optional: true,
            },
        ];
        INPUTS
    }

    fn validate(p: &Self::Params) -> Result<(), ParamError> {
        if let Some(i) = p.tables.iter().position(|t| t.rows.is_empty()) {
            return Err(ParamError::new(&["tables"], format!("table {i} (\"{}\") has no rows", p.tables[i].title)));
        }
        if let Some(i) = p.prompt_tables.iter().position(|t| t.dataset.is_empty()) {
            return Err(ParamError::new(
                &["prompt_tables"],
                format!("table {i} (\"{}\"): `dataset` is empty", p.prompt_tables[i].title),
            ));
        }
        if let Some(i) = p.benchmark_tables.iter().position(|t| t.datasets.is_empty()) {
            return Err(ParamError::new(
                &["benchmark_tables"],
                format!("table {i} (\"{}\") has no `datasets`", p.benchmark_tables[i].title),
            ));
        }
        Ok(())
    }

    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()> {
        let mut evals = Vec::new();
        for a in ctx.inputs("evals") {
            evals.push(load_eval(&artifact_id(a), &a.path, params.gallery)?);
        }
        if evals.is_empty() {
            bail!("input `evals`: no eval outputs given");
        }
        for a in ctx.inputs("judges") {
            attach_judge(&mut evals, None, &a.path)?;
        }
        let mut train = Vec::new();
        for a in ctx.inputs("train") {
            train.push(load_train(&artifact_id(a), &a.path)?);
        }
        let report = Report::build(params, evals, &train)?;
        report.write(ctx.output_dir())?;
        tracing::info!(dir = %ctx.output_dir().display(), "report written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::artifacts::{CONSISTENCY_JSON, TRAIN_METRICS_JSONL};
    use crate::report::TableSpec;
    use crate::report::fixtures::write_eval;

    fn run_report(root: &Path, out: &str, params: &ReportParams) -> std::path::PathBuf {
        let out = root.join(out);
        let judge = root.join("judge");
        std::fs::create_dir_all(&judge).unwrap();
        let c = serde_json::json!({
            "eval_stage": "eval@grpo", "backend": "rules", "n": 6,
            "rate": {"k": 5, "n": 6, "value": 0.8333, "lo": 0.43, "hi": 0.97},
            "consistent": 5, "inconsistent": 1, "undetermined": 0, "skipped": 0, "errors": 0
        });
        std::fs::write(judge.join(CONSISTENCY_JSON), c.to_string()).unwrap();
        let train = root.join("grpo");
        std::fs::create_dir_all(&train).unwrap();
        std::fs::write(
            train.join(TRAIN_METRICS_JSONL),
            "{\"step\": 1, \"loss\": 0.9, \"reward\": 1.0, \"kl\": 0.0}\n{\"step\": 2, \"loss\": 0.7, \"reward\": 2.5, \"kl\": 0.01, \"note\": \"x\"}\n",
        )
        .unwrap();
        let mut ctx = StageContext::builder("report", &out)
            .input("evals", "eval@base", None, root.join("base"))
            .input("evals", "eval@grpo", None, root.join("grpo_eval"))
            .input("judges", "judge@grpo", None, &judge)
            .input("train", "grpo", None, &train)
            .build()
            .unwrap();
        ReportStage::run(params, &mut ctx).unwrap();
        out
    }

    #[test]
    fn report_has_every_table_plot_and_example_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        write_eval(&dir.path().join("base"), &[false, false, true, false, false, true]);
        write_eval(&dir.path().join("grpo_eval"), &[true, true, true, false, true, true]);
        let params = ReportParams {
            labels: BTreeMap::from([
                ("eval@base".to_string(), "Base (zero-shot)".to_string()),
                ("eval@grpo".to_string(), "GRPO <i>x</i>".to_string()),
            ]),
            tables: vec![TableSpec {
                title: "Table 4: rewards".into(),
                rows: vec!["eval@base".into(), "eval@grpo".into()],
            }],
            ..Default::default()
        };
        let out = run_report(dir.path(), "out", &params);
        let html = std::fs::read_to_string(out.join(REPORT_HTML)).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
        // Main, Table 4 and per-class tables.
        assert_eq!(html.matches("<table>").count(), 3);
        assert!(html.contains("<h2>Table 4: rewards</h2>"));
        // Per-class bars + 2 confusion matrices + 3 training curves (loss, reward, kl) + 2 gallery images.
        assert_eq!(html.matches("<img ").count(), 1 + 2 + 3 + 2);
        assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 8);
        assert!(!html.contains("src=\"http"), "self-contained");
        assert!(html.contains("<td>Base (zero-shot)</td>"));
        assert!(html.contains("<td>33.33 [9.68, 70.00]</td>"), "accuracy with Wilson CI");
        assert!(html.contains("<td>+50.00</td>"), "delta vs the first eval");
        assert!(html.contains("<td>83.33 [43.00, 97.00]</td>"), "consistency of the judged eval");
        assert!(html.contains("x &lt; y &amp; z"), "completions are escaped");
        assert!(
            html.contains("<td>GRPO &lt;i&gt;x&lt;&#x2f;i&gt;</td>") && !html.contains("<i>"),
            "labels are escaped"
        );
        let md = std::fs::read_to_string(out.join(REPORT_MD)).unwrap();
        assert!(md.contains("| Model | n | Accuracy | Macro |"), "no side-split column without a train eval");
        assert!(md.contains("![grpo: kl — grpo](plots/train_02.png)"), "{md}");
        for f in ["per_class_accuracy.png", "confusion_00.png", "confusion_01.png", "train_02.png"] {
            assert!(out.join("plots").join(f).is_file(), "{f}");
        }
        let again = run_report(dir.path(), "out2", &params);
        assert_eq!(std::fs::read(out.join(REPORT_HTML)).unwrap(), std::fs::read(again.join(REPORT_HTML)).unwrap());
    }
}
