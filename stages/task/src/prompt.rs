//! The prompts of the task. The `vqa` stage wraps each question in the think
//! or no-think instruction (domain notes §4) and stores it as `problem`; to
//! train or evaluate with another variant, the bare question is recovered by
//! matching `problem` against those templates, then re-wrapped.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::completion::ResponseFormat;

/// Think instruction; `{Question}` is replaced by the question block.
pub const THINK_TEMPLATE: &str = "{Question} Your task: 1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags. 2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags. 3. No extra information or text outside of these tags.";
/// Answer-only instruction; `{Question}` is replaced by the question block.
pub const NO_THINK_TEMPLATE: &str = "{Question} Your task: 1. Provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags. 2. No extra information or text outside of this tag.";

/// No-think prompt of the free-form general-VQA benchmarks (ChartQA,
/// TextVQA): lmms-eval's instruction for both (`post_prompt` of
/// `lmms_eval/tasks/chartqa/chartqa.yaml` and of the TextVQA task template,
/// "Answer the question using a single word or phrase."), followed by our
/// answer-tag contract, so the answer is read exactly as for CT-RATE-VQA:
/// the content of the first `<answer>` block.
pub const BENCHMARK_NO_THINK_TEMPLATE: &str = "{Question}\nAnswer the question using a single word or phrase. Put the answer inside <answer>...</answer> tags and write nothing else.";
/// Think prompt of the same benchmarks: reasoning first, then the short answer in tags.
pub const BENCHMARK_THINK_TEMPLATE: &str = "{Question}\nThink through the question step by step inside <think>...</think> tags, then answer the question using a single word or phrase inside <answer>...</answer> tags. No extra text outside of these tags.";

/// How the user turn is built from a row's `problem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptVariant {
    /// The `problem` column as stored (whatever the data stage wrapped it in).
    Dataset,
    /// Think instruction: `<think>...</think><answer>...</answer>`.
    Think,
    /// Answer-only instruction: `<answer>...</answer>`.
    NoThink,
    /// The paper's CoT forcing: the think instruction and the assistant turn
    /// pre-filled with `cot_prefill` (e.g. `<think>`), so the model must reason first.
    CotForcing,
}

impl PromptVariant {
    pub fn asks_for_reasoning(self) -> bool {
        matches!(self, PromptVariant::Think | PromptVariant::CotForcing)
    }

    /// The format a completion under this variant is held to. `dataset`
    /// counts as think: the paper's data asks for reasoning.
    pub fn response_format(self) -> ResponseFormat {
        match self {
            PromptVariant::NoThink => ResponseFormat::NoThink,
            PromptVariant::Dataset | PromptVariant::Think | PromptVariant::CotForcing => ResponseFormat::Think,
        }
    }
}

/// The bare question inside `problem` when `problem` is one of `templates`
/// with `{Question}` substituted; None when it matches none of them.
pub fn recover_question<'a>(problem: &'a str, templates: &[&str]) -> Option<&'a str> {
    templates.iter().find_map(|t| {
        let (prefix, suffix) = t.split_once("{Question}")?;
        let rest = problem.strip_prefix(prefix)?;
        rest.strip_suffix(suffix)
    })
}

/// The user text for one item under `variant`.
pub fn user_text(
    problem: &str,
    variant: PromptVariant,
    think_template: &str,
    no_think_template: &str,
) -> Result<String, String> {
    if variant == PromptVariant::Dataset {
        return Ok(problem.to_string());
    }
    // A general VQA set stores the bare question: use it whole.
    let question = recover_question(problem, &[think_template, no_think_template]).unwrap_or(problem);
    let template = if variant == PromptVariant::NoThink { no_think_template } else { think_template };
    if !template.contains("{Question}") {
        return Err(format!("template {template:?} has no `{{Question}}` placeholder"));
    }
    Ok(template.replace("{Question}", question))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewraps_a_think_problem_as_no_think_and_back() {
        let q = "Which lesion?\nOptions:\nA. x\nB. y";
        let think = THINK_TEMPLATE.replace("{Question}", q);
        let no_think = NO_THINK_TEMPLATE.replace("{Question}", q);
        assert_eq!(recover_question(&think, &[THINK_TEMPLATE, NO_THINK_TEMPLATE]), Some(q));
        assert_eq!(user_text(&think, PromptVariant::NoThink, THINK_TEMPLATE, NO_THINK_TEMPLATE).unwrap(), no_think);
        assert_eq!(user_text(&no_think, PromptVariant::Think, THINK_TEMPLATE, NO_THINK_TEMPLATE).unwrap(), think);
        assert_eq!(user_text(&no_think, PromptVariant::CotForcing, THINK_TEMPLATE, NO_THINK_TEMPLATE).unwrap(), think);
        assert_eq!(user_text(&think, PromptVariant::Dataset, THINK_TEMPLATE, NO_THINK_TEMPLATE).unwrap(), think);
    }

    #[test]
    fn bare_questions_are_wrapped_and_bad_templates_rejected() {
        let t = user_text("What is 2+2?", PromptVariant::NoThink, THINK_TEMPLATE, "Q: {Question}").unwrap();
        assert_eq!(t, "Q: What is 2+2?");
        let e = user_text("q", PromptVariant::NoThink, THINK_TEMPLATE, "no placeholder").unwrap_err();
        assert!(e.contains("{Question}"), "{e}");
    }

    #[test]
    fn only_no_think_drops_the_reasoning_block() {
        assert_eq!(PromptVariant::NoThink.response_format(), ResponseFormat::NoThink);
        for v in [PromptVariant::Dataset, PromptVariant::Think, PromptVariant::CotForcing] {
            assert_eq!(v.response_format(), ResponseFormat::Think, "{v:?}");
        }
    }
}
