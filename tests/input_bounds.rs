//! Issue 17 item 3, through the `pipeline` binary: every input the issue
//! found unbounded gives a clear, located and short error from `plan`
//! (nothing is trained or generated), naming the file, the key and what is
//! allowed.

mod engine_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine_support::{Ran, Workspace};

/// Exit code of a recipe error (`plan` / `run` before anything runs).
const RECIPE_ERROR: i32 = 2;
/// A short error: a few lines, whatever the input.
const SHORT: usize = 2048;

/// Runs `cmd`; a command that has not ended after a generous while is
/// killed and the test fails, so a hang (e.g. reading a FIFO or
/// `/dev/zero`) is a failure, not a stuck test run.
fn run_guarded(mut cmd: Command) -> Ran {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting pipeline");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("waiting for pipeline").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            let out = child.wait_with_output().expect("collecting pipeline output");
            panic!("pipeline did not finish (hangs?):\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collecting pipeline output");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `pipeline plan <recipe>` must fail as a recipe error with a short
/// message containing every one of `expected`; returns the message.
fn refused(ws: &Workspace, recipe: &str, expected: &[&str]) -> String {
    let ran = run_guarded(ws.command(&["plan", recipe]));
    let all = format!("{}{}", ran.stdout, ran.stderr);
    assert_eq!(ran.code, RECIPE_ERROR, "{}", &all[..all.len().min(4 * SHORT)]);
    assert!(all.len() < SHORT, "{} bytes of error:\n{}", all.len(), &all[..all.len().min(4 * SHORT)]);
    for e in expected {
        assert!(all.contains(e), "`{e}` missing from:\n{all}");
    }
    all
}

#[test]
fn phantom_cases_beyond_the_range_are_refused_at_the_value() {
    let ws = Workspace::new();
    ws.write("r.toml", "[stage.volumes]\nkind = \"phantom\"\ncases = 1_000_000_000_000\n");
    refused(
        &ws,
        "r.toml",
        &["r.toml:3:9", "parameter `cases` of stage `volumes` (kind `phantom`)", "expected 1..=100000"],
    );
}

/// GRPO with a model and data, so the params are what is wrong.
fn grpo(extra: &str) -> String {
    format!(
        "[stage.model]\nkind = \"init_model\"\n\n[stage.g]\nkind = \"grpo\"\nmodel = \"model\"\ndata = \"model\"\n{extra}\n"
    )
}

#[test]
fn grpo_counts_and_lengths_beyond_their_ranges_are_refused() {
    let ws = Workspace::new();
    ws.write("pps.toml", &grpo("prompts_per_step = 1_000_000_000_000_000"));
    refused(&ws, "pps.toml", &["pps.toml:8:", "`prompts_per_step`", "(kind `grpo`)", "expected 1..=4096"]);
    ws.write("mcl.toml", &grpo("max_completion_length = 1_099_511_627_776"));
    refused(&ws, "mcl.toml", &["mcl.toml:8:", "`max_completion_length`", "expected 1..=32768"]);
    ws.write("gen.toml", &grpo("num_generations = 1"));
    refused(&ws, "gen.toml", &["gen.toml:8:", "`num_generations`", "expected 2..=1024"]);
    ws.write("steps.toml", &grpo("steps = 0"));
    refused(&ws, "steps.toml", &["steps.toml:8:", "`steps`", "expected 1..=1000000"]);
    // Each count in its range, their product (completions per round) not.
    ws.write("round.toml", &grpo("prompts_per_step = 4096\nnum_generations = 1024"));
    refused(&ws, "round.toml", &["round.toml:8:", "`prompts_per_step`", "completions per round: at most 65536"]);
    // The paper's settings plan.
    ws.write(
        "paper.toml",
        &grpo("steps = 1500\nprompts_per_step = 8\nnum_generations = 5\nmax_completion_length = 256"),
    );
    let ran = run_guarded(ws.command(&["plan", "paper.toml"]));
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
}

#[test]
fn eval_and_served_backend_sizes_are_refused_beyond_their_ranges() {
    let ws = Workspace::new();
    let eval = |extra: &str| {
        format!(
            "[stage.m]\nkind = \"init_model\"\n\n[stage.e]\nkind = \"eval\"\nmodel = \"m\"\ndata = \"m\"\n{extra}\n"
        )
    };
    ws.write("tokens.toml", &eval("max_new_tokens = 1_099_511_627_776"));
    refused(&ws, "tokens.toml", &["tokens.toml:8:", "`max_new_tokens`", "expected 1..=32768"]);
    ws.write("batch.toml", &eval("batch_size = 0"));
    refused(&ws, "batch.toml", &["batch.toml:8:", "`batch_size`", "expected 1..=4096"]);
    let served = "[stage.d]\nkind = \"general_vqa\"\n\n[stage.e]\nkind = \"eval\"\ndata = \"d\"\nbackend = \"http\"\n";
    ws.write("conc.toml", &format!("{served}http = {{ model = \"m\", concurrency = 100000 }}\n"));
    refused(&ws, "conc.toml", &["conc.toml:8:", "`http.concurrency`", "expected 1..=1024"]);
    ws.write("timeout.toml", &format!("{served}http = {{ model = \"m\", timeout_s = 1e9 }}\n"));
    refused(&ws, "timeout.toml", &["timeout.toml:8:", "`http.timeout_s`", "<= 86400"]);
}

#[test]
fn extends_of_a_device_or_a_fifo_is_refused_without_reading_it() {
    let ws = Workspace::new();
    ws.write("zero.toml", "[recipe]\nextends = \"/dev/zero\"\n");
    refused(&ws, "zero.toml", &["zero.toml:2:11", "`/dev/zero`", "not a regular file"]);

    let fifo = ws.path().join("base.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    ws.write("fifo.toml", "[recipe]\nextends = \"base.fifo\"\n");
    refused(&ws, "fifo.toml", &["fifo.toml:2:11", "`base.fifo`", "a FIFO, not a regular file"]);
    // The recipe itself.
    refused(&ws, "base.fifo", &["`base.fifo`", "a FIFO, not a regular file"]);
    refused(&ws, "/dev/zero", &["`/dev/zero`", "not a regular file"]);
}

#[test]
fn recipes_above_the_size_limit_are_refused() {
    let ws = Workspace::new();
    // 5 MiB of comments: valid TOML, too large to be a recipe.
    let line = format!("# {}\n", "x".repeat(1022));
    ws.write("big.toml", &format!("[recipe]\nname = \"big\"\n{}", line.repeat(5 * 1024)));
    refused(&ws, "big.toml", &["big.toml", "4 MiB"]);
    ws.write("small.toml", "[recipe]\nextends = \"big.toml\"\n");
    refused(&ws, "small.toml", &["small.toml:2:11", "big.toml", "4 MiB"]);
}

#[test]
fn deeply_nested_arrays_give_a_short_located_error() {
    let ws = Workspace::new();
    let depth = 100_000;
    ws.write("deep.toml", &format!("[stage.a]\nkind = \"text\"\ntext = {}{}\n", "[".repeat(depth), "]".repeat(depth)));
    refused(&ws, "deep.toml", &["deep.toml:3:", "invalid TOML"]);
    ws.write(
        "tables.toml",
        &format!("[stage.a]\nkind = \"text\"\ntext = {}1{}\n", "{a=".repeat(depth), "}".repeat(depth)),
    );
    refused(&ws, "tables.toml", &["tables.toml:3:", "invalid TOML"]);
}

#[test]
fn a_megabyte_string_gives_a_short_located_error_that_still_says_what_was_expected() {
    let ws = Workspace::new();
    let big = "x".repeat(1 << 20);
    ws.write("type.toml", &format!("[stage.a]\nkind = \"text\"\nrepeat = \"{big}\"\n"));
    refused(&ws, "type.toml", &["type.toml:3:10", "parameter `repeat` of stage `a`", "expected u64"]);
    ws.write("kind.toml", &format!("[stage.a]\nkind = \"{big}\"\n"));
    refused(&ws, "kind.toml", &["kind.toml:2:8", "unknown stage kind", "registered kinds"]);
    ws.write("key.toml", &format!("[stage.a]\nkind = \"text\"\n{big} = 1\n"));
    refused(&ws, "key.toml", &["key.toml:3:1", "unknown parameter", "expected one of"]);
    // The regex error quotes the pattern again; what is wrong with it stays in view.
    ws.write(
        "regex.toml",
        &format!(
            "[stage.m]\nkind = \"init_model\"\n\n[stage.e]\nkind = \"eval\"\nmodel = \"m\"\ndata = \"m\"\nanswer_regex = \"{big}(\"\n"
        ),
    );
    refused(&ws, "regex.toml", &["regex.toml:8:1", "`answer_regex`", "unclosed group"]);
    // Unterminated: the error is at the end of the megabyte line.
    ws.write("open.toml", &format!("[stage.a]\nkind = \"text\"\ntext = \"{big}\n"));
    refused(&ws, "open.toml", &["open.toml:3:", "invalid TOML"]);
}

#[test]
fn stage_names_longer_than_the_limit_are_refused_at_the_header() {
    let ws = Workspace::new();
    let name = "a".repeat(5000);
    ws.write("name.toml", &format!("[stage.{name}]\nkind = \"text\"\n"));
    refused(&ws, "name.toml", &["name.toml:1:8", "stage name", "5000 characters long: at most 64"]);
    // The longest names run, and the log file named after the id exists.
    let (stage, variant) = ("s".repeat(64), "v".repeat(64));
    ws.write(
        "ok.toml",
        &format!(
            "[stage.{stage}]\nkind = \"text\"\n\n[sweep.w]\nstage = \"{stage}\"\nvariants = {{ {variant} = {{ repeat = 2 }} }}\n"
        ),
    );
    let ran = run_guarded(ws.command(&["run", "ok.toml"]));
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    let log = format!("{stage}@{variant}.log");
    let runs = std::fs::read_dir(ws.cache().join("logs")).unwrap();
    let logged = runs.flatten().any(|run| run.path().join(&log).is_file());
    assert!(logged, "no {log} under {}", ws.cache().join("logs").display());
    // Characters outside the allowed set.
    ws.write("chars.toml", "[stage.\"a/b\"]\nkind = \"text\"\n");
    refused(&ws, "chars.toml", &["chars.toml:1:", "invalid stage name", "letters, digits, `_` and `-`"]);
}

#[test]
fn dataset_paths_that_climb_out_of_the_root_are_refused_unless_absolute() {
    let ws = Workspace::new();
    let index = |dir: &str| format!("[stage.index]\nkind = \"rexgct_index\"\nroot = \"data\"\nct_dir = \"{dir}\"\n");
    ws.write("up.toml", &index("../outside"));
    refused(&ws, "up.toml", &["up.toml:4:", "`ct_dir`", "`../outside` leaves the dataset root", "absolute path"]);
    ws.write("inner.toml", &index("images/../../x"));
    refused(&ws, "inner.toml", &["inner.toml:4:", "`ct_dir`", "leaves the dataset root"]);
    ws.write("mask.toml", "[stage.index]\nkind = \"rexgct_index\"\nroot = \"data\"\nmask_dir = \"..\"\n");
    refused(&ws, "mask.toml", &["mask.toml:4:", "`mask_dir`", "leaves the dataset root"]);
    // An absolute directory is the user's explicit choice: it plans.
    let outside = ws.path().join("elsewhere");
    ws.write("abs.toml", &index(outside.to_str().unwrap()));
    let ran = run_guarded(ws.command(&["plan", "abs.toml"]));
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
}

#[test]
fn a_saved_dataset_whose_split_leaves_it_is_refused_at_run() {
    let ws = Workspace::new();
    let ds = ws.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    // `split` must be one of dataset_dict.json's splits; this one points out of the dataset.
    std::fs::write(ds.join("dataset_dict.json"), r#"{"splits": ["../private"]}"#).unwrap();
    ws.write("r.toml", "[stage.read]\nkind = \"hf_disk_vqa\"\npath = \"ds\"\n");
    let ran = run_guarded(ws.command(&["run", "r.toml"]));
    let all = format!("{}{}", ran.stdout, ran.stderr);
    assert_ne!(ran.code, 0, "{all}");
    assert!(all.contains("dataset_dict.json: split `../private` is not a directory name"), "{all}");
}
