//! libtorch smoke test through the binary: `pipeline doctor` creates tensors,
//! runs a backward pass and checks the gradient on every device it finds.

use std::process::Command;

#[test]
fn doctor_runs_autograd_on_the_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline")).arg("doctor").output().expect("running pipeline doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Cpu: ok (autograd"), "{stdout}");
}
