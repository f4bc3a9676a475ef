//! Probe: do libtorch's kernel-selection environment variables take effect
//! when the process sets them itself (`std::env::set_var` before the first
//! tch call), and which kernels do they change? Used by
//! `tools/numerics_probe.sh`; see docs/numerics.md.
//!
//! ```text
//! cargo run --example numerics_env -- [--touch-first] [--deterministic-algorithms] [--threads N]
//!     [--set KEY=VAL]... [--set-late KEY=VAL]...
//! ```
//!
//! `--set` variables are set before libtorch computes anything (after what
//! `pipeline`'s main does first when `--touch-first` comes before them);
//! `--set-late` ones after a first round of every op (to show they are then
//! ignored).
//! Prints one line per op: `round op fnv64-of-the-output-bits`. The inputs
//! come from a fixed Rust generator, not from torch's RNG (whose own kernels
//! depend on the CPU capability).

use tch::{Kind, Tensor};

/// SplitMix64 values mapped to floats in [-1, 1).
fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// FNV-1a over the little-endian bytes of a float tensor: equal iff bit-identical.
fn fnv(t: &Tensor) -> anyhow::Result<String> {
    let v = Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.iter().flat_map(|x| x.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

fn tensor(shape: &[i64], seed: u64) -> Tensor {
    let n = shape.iter().product::<i64>() as usize;
    Tensor::from_slice(&inputs(n, seed)).view(shape)
}

/// Several shapes of `f`'s output, hashed together (one shape alone often
/// rounds to the same bits under two summation orders).
fn shapes(shapes: &[&[i64]], f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let outs: Vec<Tensor> =
        shapes.iter().enumerate().map(|(i, s)| f(&tensor(s, 100 + i as u64)).flatten(0, -1)).collect();
    Tensor::cat(&outs, 0)
}

/// The op families the SFT step uses, each sent to the library that runs it.
fn round(label: &str) -> anyhow::Result<()> {
    // Shapes of the tiny model's SFT step (tokens x hidden, patches x patch dim, ...).
    let mats: &[(&[i64], &[i64])] = &[
        (&[252, 16], &[16, 64]),
        (&[64, 2016], &[2016, 128]),
        (&[1152, 1176], &[1176, 32]),
        (&[256, 256], &[256, 256]),
    ];
    let ops: Vec<(&str, Tensor)> = vec![
        // ATen full reductions (vectorised cascade sum, split across threads): the grad norm
        (
            "sum",
            shapes(
                &[
                    &[1 << 20],
                    &[40_000],
                    &[100_000],
                    &[129_024],
                    &[262_144],
                    &[33_333],
                    &[65_537],
                    &[77_777],
                    &[2016, 65],
                ],
                |x| x.square().sum(Kind::Float).view([1]),
            ),
        ),
        // MKL sgemm
        (
            "matmul",
            Tensor::cat(
                &mats
                    .iter()
                    .enumerate()
                    .map(|(i, (a, b))| tensor(a, 10 + i as u64).matmul(&tensor(b, 20 + i as u64)).flatten(0, -1))
                    .collect::<Vec<_>>(),
                0,
            ),
        ),
        // ATen vectorised softmax / log-softmax (exp polynomial, row sums)
        ("softmax", shapes(&[&[64, 1024], &[288, 2016]], |x| x.softmax(-1, Kind::Float))),
        ("log_softmax", shapes(&[&[64, 1024], &[288, 2016]], |x| (x * 8.0).log_softmax(-1, Kind::Float))),
        // ATen vectorised SiLU (the SwiGLU MLPs)
        ("silu", shapes(&[&[252, 172], &[2016, 128]], |x| (x * 6.0).silu())),
        // oneDNN eltwise (the vision merger's GELU)
        ("gelu", shapes(&[&[288, 128], &[1000, 333]], |x| (x * 4.0).gelu("none"))),
        // ATen: RMS norm as the model writes it (pow, mean over the last dim, rsqrt)
        (
            "rmsnorm",
            shapes(&[&[252, 64], &[2016, 128]], |x| {
                x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt()
            }),
        ),
        // ATen reduction over the token dim (a bias / norm-weight gradient)
        ("sum_dim0", shapes(&[&[2016, 64], &[252, 1176], &[20_000, 16]], |x| x.sum_dim_intlist(0, false, Kind::Float))),
    ];
    for (name, t) in ops {
        println!("{label} {name} {}", fnv(&t)?);
    }
    Ok(())
}

// at::Context's switches are C++ members that tch does not wrap; libtorch_cpu
// exports them, so their Itanium-mangled names reach them without a C++ shim
// (non-virtual members take `this` first).
unsafe extern "C" {
    #[link_name = "_ZN2at13globalContextEv"]
    fn at_global_context() -> *mut std::ffi::c_void;
    #[link_name = "_ZN2at7Context26setDeterministicAlgorithmsEbb"]
    fn at_set_deterministic_algorithms(ctx: *mut std::ffi::c_void, on: bool, warn_only: bool);
    #[link_name = "_ZNK2at7Context23deterministicAlgorithmsEv"]
    fn at_deterministic_algorithms(ctx: *const std::ffi::c_void) -> bool;
}

/// `torch.use_deterministic_algorithms(true)` through the C++ API; returns
/// the flag before and after.
fn use_deterministic_algorithms() -> (bool, bool) {
    // SAFETY: globalContext() returns libtorch's process-wide Context; the
    // setter and getter take it as `this` and plain bools.
    unsafe {
        let ctx = at_global_context();
        let before = at_deterministic_algorithms(ctx);
        at_set_deterministic_algorithms(ctx, true, false);
        (before, at_deterministic_algorithms(ctx))
    }
}

fn main() -> anyhow::Result<()> {
    let mut early = Vec::new();
    let mut late = Vec::new();
    let mut threads = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--set" => early.push(value()?),
            "--set-late" => late.push(value()?),
            "--threads" => threads = Some(value()?.parse::<i32>()?),
            // What `pipeline` does before a stage computes: ask for CUDA
            // devices (main) and set the thread count (which also calls MKL).
            "--deterministic-algorithms" => {
                let (before, after) = use_deterministic_algorithms();
                println!("deterministic_algorithms {before} -> {after}");
            }
            "--touch-first" => {
                let _ = tch::Cuda::device_count();
                tch::set_num_threads(tch::get_num_threads());
            }
            other => anyhow::bail!(
                "unknown argument {other} (--touch-first, --deterministic-algorithms, --threads N, --set KEY=VAL, --set-late KEY=VAL)"
            ),
        }
    }
    let set = |pairs: &[String]| -> anyhow::Result<()> {
        for kv in pairs {
            let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("`{kv}`: expected KEY=VAL"))?;
            // SAFETY: this process runs one thread here (libtorch's OpenMP
            // pool only starts on the first parallel op, which is after
            // `--set` and, for `--set-late`, already running but not reading
            // the environment concurrently).
            unsafe { std::env::set_var(k, v) };
        }
        Ok(())
    };
    set(&early)?;
    if let Some(n) = threads {
        tch::set_num_threads(n);
    }
    round("first")?;
    set(&late)?;
    round("second")?;
    Ok(())
}
