//! ONE format rule (`stages_task::completion`): the eval metric (a
//! prediction's `format_ok`, the report's format rate), the GRPO `format`
//! reward and the judge (which judges only completions in the think format)
//! give the same verdict on the same tricky completions, and that verdict is
//! the one the task contract documents.

use stages_eval::eval::{EvalParams, metrics_of, predict};
use stages_eval::judge::{JudgeParams, NOT_IN_FORMAT, Status, judge_all};
use stages_task::answer::option_letters;
use stages_task::dataset::VqaRow;
use stages_task::prompt::PromptVariant;
use stages_train::rewards::{Rewards, Sample, paper_weights};

/// (completion, in the think format). Every answer block that is read holds
/// the gold letter, so the only reason for the judge to skip is the format.
const THINK_CASES: &[(&str, bool)] = &[
    ("<think>bullae: emphysema</think><answer>B</answer>", true),
    // Whitespace around the completion and between the blocks.
    (" <think>bullae: emphysema</think><answer>B</answer>", true),
    ("<think>bullae: emphysema</think><answer>B</answer>\n", true),
    ("<think>bullae: emphysema</think>\n\n<answer> B </answer>", true),
    ("\n<think>\nbullae:\nemphysema\n</think>\n<answer>\nB\n</answer>\n", true),
    // Two answer tags.
    ("<think>bullae: emphysema</think><answer>B</answer><answer>A</answer>", false),
    ("<think>bullae: emphysema</think><answer>B</answer>\n<answer>B</answer>", false),
    // Text before <think>, after the answer, between the blocks.
    ("Sure! <think>bullae: emphysema</think><answer>B</answer>", false),
    ("<think>bullae: emphysema</think><answer>B</answer> Hope this helps.", false),
    ("<think>bullae: emphysema</think> so: <answer>B</answer>", false),
    // Unclosed tags.
    ("<think>bullae: emphysema<answer>B</answer>", false),
    ("<think>bullae: emphysema</think><answer>B", false),
    // Empty blocks.
    ("<think>bullae: emphysema</think><answer></answer>", false),
    ("<think> \n </think><answer>B</answer>", false),
    // Nested or repeated think, an answer rehearsed in the reasoning.
    ("<think>a <think>bullae: emphysema</think> b</think><answer>B</answer>", false),
    ("<think>a</think><think>bullae: emphysema</think><answer>B</answer>", false),
    ("<think>maybe <answer>B</answer></think><answer>B</answer>", false),
    // No reasoning block, blocks swapped, tag look-alikes, nothing.
    ("<answer>B</answer>", false),
    ("<answer>B</answer><think>bullae: emphysema</think>", false),
    ("<Think>bullae: emphysema</Think><answer>B</answer>", false),
    ("", false),
];

/// (completion, in the no-think format).
const NO_THINK_CASES: &[(&str, bool)] = &[
    ("<answer>B</answer>", true),
    ("  <answer> B </answer>\n", true),
    ("<think>bullae</think><answer>B</answer>", false),
    ("<answer>B</answer><answer>A</answer>", false),
    ("The answer is <answer>B</answer>", false),
    ("<answer> </answer>", false),
    ("<answer>B", false),
];

fn row() -> VqaRow {
    VqaRow {
        id: "case/slice".into(),
        image: None,
        problem: "Which lesion?".into(),
        answer: "B".into(),
        answers: Vec::new(),
        options: ["A. airway abnormalities", "B. emphysema", "C. ground-glass opacity"].map(String::from).to_vec(),
        class: "emphysema".into(),
        class_name: "emphysema".into(),
    }
}

/// Eval `format_ok` and the GRPO format reward of every case under `prompt`.
fn eval_and_reward(prompt: PromptVariant, cases: &[(&str, bool)]) -> Vec<(bool, bool)> {
    let params = EvalParams { prompt, ..Default::default() };
    let scorer = params.scorer().unwrap();
    let rewards = Rewards::new(&paper_weights(), prompt.response_format(), params.choice_regex()).unwrap();
    assert_eq!(rewards.names()[0], "format");
    let row = row();
    let letters = option_letters(&row.options);
    cases
        .iter()
        .map(|(completion, _)| {
            let p = predict(&scorer, &row, row.problem.clone(), completion.to_string(), 3, 7, "eos".into());
            let reward = rewards.score(&Sample { completion, gold: &row.answer, letters: &letters })[0];
            (p.format_ok, reward == 1.0)
        })
        .collect()
}

#[test]
fn eval_metric_grpo_reward_and_judge_give_one_verdict() {
    let params = EvalParams::default();
    assert_eq!(params.prompt, PromptVariant::Think);
    let scorer = params.scorer().unwrap();
    let row = row();
    let predictions: Vec<_> = THINK_CASES
        .iter()
        .map(|(c, _)| predict(&scorer, &row, row.problem.clone(), c.to_string(), 3, 7, "eos".into()))
        .collect();
    let verdicts = judge_all(&JudgeParams::default(), &predictions, None).unwrap();
    let eval_reward = eval_and_reward(PromptVariant::Think, THINK_CASES);
    for (((completion, want), v), (format_ok, reward)) in THINK_CASES.iter().zip(&verdicts).zip(eval_reward) {
        let judged = !(v.status == Status::Skipped && v.detail == NOT_IN_FORMAT);
        assert_eq!(
            [("eval format_ok", format_ok), ("GRPO format reward", reward), ("judged by the judge", judged)],
            [("eval format_ok", *want), ("GRPO format reward", *want), ("judged by the judge", *want)],
            "{completion:?}"
        );
        if *want {
            assert!(matches!(v.status, Status::Consistent), "{completion:?}: {v:?}");
        }
    }
    // The report's format column counts exactly these completions.
    let metrics = metrics_of(&predictions, Default::default());
    assert_eq!(metrics.format_rate.k as usize, THINK_CASES.iter().filter(|(_, ok)| *ok).count());
}

#[test]
fn eval_metric_and_grpo_reward_agree_under_the_no_think_prompt() {
    for ((completion, want), got) in NO_THINK_CASES.iter().zip(eval_and_reward(PromptVariant::NoThink, NO_THINK_CASES))
    {
        assert_eq!(got, (*want, *want), "{completion:?}: (eval format_ok, GRPO format reward)");
    }
}
