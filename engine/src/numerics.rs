//! `[recipe] numerics`: which floating-point code the libtorch stages of a
//! process run. In `fast` mode libtorch picks kernels for the host (its
//! instruction set, its core count); in `reproducible` mode the process pins
//! ATen, MKL and oneDNN to their AVX2 code paths and every libtorch stage
//! to `numerics_threads` intra-op threads, so CPU results are bit-identical
//! on every AVX2 + FMA Intel host (docs/numerics.md has the evidence).
//!
//! The engine knows no stage kind: a kind says it runs libtorch through
//! [`stage_api::Resources::libtorch`], and this module only deals with the
//! process (environment, CPU) and with what enters keys and provenance.
//! The environment must be set before libtorch computes anything; the
//! `pipeline` binary does that first thing in `main` ([`Numerics::process_env`]).

use serde::{Deserialize, Serialize};

/// `[recipe] numerics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NumericsMode {
    /// Kernels chosen by libtorch for the host; threads = the cores granted.
    #[default]
    Fast,
    /// Kernels and thread count pinned: the same bits on every AVX2 + FMA Intel host.
    Reproducible,
}

impl NumericsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NumericsMode::Fast => "fast",
            NumericsMode::Reproducible => "reproducible",
        }
    }
}

/// Default `numerics_threads`: the small models of mini and ci gain nothing
/// from a second OpenMP thread on a shared machine (docs/numerics.md, Cost).
pub const DEFAULT_THREADS: usize = 1;
/// Upper bound of `numerics_threads` (a typo guard, not a hardware limit).
pub const MAX_THREADS: usize = 1024;

/// The environment reproducible mode sets, overriding what the user
/// exported: ATen's CPU capability, MKL's conditional numerical
/// reproducibility branch (strict: SGEMM independent of the thread count)
/// and its instruction cap, oneDNN's ISA cap.
pub const PINNED_ENV: [(&str, &str); 4] = [
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("MKL_CBWR", "AVX2,STRICT"),
    ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
];

/// A recipe's numerics setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numerics {
    pub mode: NumericsMode,
    /// Intra-op threads of every libtorch stage in reproducible mode.
    pub threads: usize,
}

impl Default for Numerics {
    fn default() -> Self {
        Self { mode: NumericsMode::Fast, threads: DEFAULT_THREADS }
    }
}

/// Why this host cannot run a recipe in reproducible mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`[recipe] numerics = \"reproducible\"` cannot be honoured on this host: {reason}\n  \
     help: run with `--set recipe.numerics=fast` (results then depend on the host), or on an x86-64 Intel CPU with AVX2 and FMA"
)]
pub struct UnsupportedHost {
    pub reason: String,
}

impl Numerics {
    pub fn reproducible(threads: usize) -> Self {
        Self { mode: NumericsMode::Reproducible, threads }
    }

    pub fn is_reproducible(&self) -> bool {
        self.mode == NumericsMode::Reproducible
    }

    /// What a libtorch stage's key records: the mode and thread count in
    /// reproducible mode; nothing in fast mode (results depend on the host,
    /// as they always did, and existing keys stay valid).
    pub fn key_tag(&self) -> Option<Numerics> {
        self.is_reproducible().then_some(*self)
    }

    /// The environment variables this process must change (name, value)
    /// before libtorch computes anything; empty in fast mode and when they
    /// are already set (e.g. inherited from the `pipeline` that started this
    /// one). Refuses hosts whose CPUs cannot give the pinned bits.
    pub fn process_env(&self) -> Result<Vec<(&'static str, &'static str)>, UnsupportedHost> {
        if !self.is_reproducible() {
            return Ok(Vec::new());
        }
        check_host(&CpuInfo::detect())?;
        Ok(PINNED_ENV.iter().copied().filter(|(k, v)| std::env::var(k).ok().as_deref() != Some(*v)).collect())
    }
}

/// The pins must hold on the host: AVX2 and FMA (ATen runs its avx2 kernels
/// without checking the CPU, so without them it would crash), and an Intel
/// CPU (MKL's `AVX2` branch exists only there; elsewhere MKL silently takes
/// its automatic branch, and the bits would differ without a word).
pub fn check_host(cpu: &CpuInfo) -> Result<(), UnsupportedHost> {
    if !cpu.x86_64 {
        return Err(UnsupportedHost { reason: format!("it is not x86-64 ({})", std::env::consts::ARCH) });
    }
    let missing: Vec<&str> =
        [("AVX2", cpu.avx2), ("FMA", cpu.fma)].iter().filter(|(_, has)| !has).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Err(UnsupportedHost { reason: format!("the CPU lacks {}", missing.join(" and ")) });
    }
    if cpu.vendor != "GenuineIntel" {
        return Err(UnsupportedHost {
            reason: format!(
                "the CPU vendor is `{}`, and MKL's reproducible AVX2 branch (MKL_CBWR=AVX2,STRICT) exists only on Intel CPUs",
                cpu.vendor
            ),
        });
    }
    Ok(())
}

/// What provenance records about the CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub model: String,
    pub vendor: String,
    pub x86_64: bool,
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub amx: bool,
}

impl CpuInfo {
    pub fn detect() -> Self {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        Self::detect_features(model)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect_features(model: String) -> Self {
        // CPUID leaf 0: the vendor string; leaf 7 EDX bit 24: AMX-TILE (its
        // feature-detection macro is still unstable).
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let amx = leaf0.eax >= 7 && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 24) != 0;
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        Self {
            model,
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            x86_64: true,
            avx2: std::arch::is_x86_feature_detected!("avx2"),
            fma: std::arch::is_x86_feature_detected!("fma"),
            avx512f: std::arch::is_x86_feature_detected!("avx512f"),
            amx,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect_features(model: String) -> Self {
        Self { model, vendor: String::new(), x86_64: false, avx2: false, fma: false, avx512f: false, amx: false }
    }
}

/// The `numerics` section of a libtorch stage's `provenance.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericsRecord {
    pub mode: NumericsMode,
    /// Intra-op threads the stage ran with.
    pub threads: usize,
    /// The four kernel-selection variables as this process saw them (unset: null).
    pub env: std::collections::BTreeMap<String, Option<String>>,
    pub cpu: CpuInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mkl_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onednn_version: Option<String>,
    /// What the mode does and does not promise for this run.
    pub note: String,
}

impl NumericsRecord {
    pub fn of_this_process(mode: NumericsMode, threads: usize, on_cuda: bool) -> Self {
        let env = PINNED_ENV.iter().map(|(k, _)| (k.to_string(), std::env::var(k).ok())).collect();
        let note = match (mode, on_cuda) {
            (_, true) => {
                "CUDA stage: results depend on the GPU model, driver and CUDA/cuBLAS versions; the pins cover CPU kernels only"
            }
            (NumericsMode::Reproducible, false) => {
                "CPU kernels pinned to AVX2 and a fixed thread count: the same bits on any AVX2 + FMA Intel host with this libtorch build"
            }
            (NumericsMode::Fast, false) => {
                "kernels chosen for this host: results depend on its instruction set and thread count"
            }
        };
        Self {
            mode,
            threads,
            env,
            cpu: CpuInfo::detect(),
            mkl_version: library_versions::mkl(),
            onednn_version: library_versions::onednn(),
            note: note.to_string(),
        }
    }
}

/// MKL and oneDNN versions from the libtorch already loaded in this process
/// (both are linked into `libtorch_cpu`), when it exports them.
mod library_versions {
    use std::ffi::{c_char, c_int};

    fn this_process() -> Option<libloading::os::unix::Library> {
        Some(libloading::os::unix::Library::this())
    }

    pub fn mkl() -> Option<String> {
        let lib = this_process()?;
        // SAFETY: MKL's documented signature `void MKL_Get_Version_String(char*, int)`.
        unsafe {
            let f = lib.get::<unsafe extern "C" fn(*mut c_char, c_int)>(b"MKL_Get_Version_String\0").ok()?;
            let mut buf = [0u8; 256];
            f(buf.as_mut_ptr().cast(), buf.len() as c_int);
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            let s = String::from_utf8_lossy(&buf[..end]).trim().to_string();
            (!s.is_empty()).then_some(s)
        }
    }

    #[repr(C)]
    struct DnnlVersion {
        major: c_int,
        minor: c_int,
        patch: c_int,
        hash: *const c_char,
    }

    pub fn onednn() -> Option<String> {
        let lib = this_process()?;
        // SAFETY: oneDNN's `const dnnl_version_t *dnnl_version(void)`, a pointer to a static.
        unsafe {
            let f = lib.get::<unsafe extern "C" fn() -> *const DnnlVersion>(b"dnnl_version\0").ok()?;
            let v = f().as_ref()?;
            Some(format!("{}.{}.{}", v.major, v.minor, v.patch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intel() -> CpuInfo {
        CpuInfo {
            model: "test".into(),
            vendor: "GenuineIntel".into(),
            x86_64: true,
            avx2: true,
            fma: true,
            avx512f: false,
            amx: false,
        }
    }

    #[test]
    fn hosts_without_avx2_fma_or_intel_are_refused_with_the_recipe_field() {
        assert!(check_host(&intel()).is_ok());
        let err = check_host(&CpuInfo { fma: false, ..intel() }).unwrap_err().to_string();
        assert!(err.contains("[recipe] numerics") && err.contains("lacks FMA"), "{err}");
        let err = check_host(&CpuInfo { vendor: "AuthenticAMD".into(), ..intel() }).unwrap_err().to_string();
        assert!(err.contains("AuthenticAMD") && err.contains("recipe.numerics=fast"), "{err}");
        let err = check_host(&CpuInfo { x86_64: false, ..intel() }).unwrap_err().to_string();
        assert!(err.contains("not x86-64"), "{err}");
    }

    #[test]
    fn fast_mode_changes_nothing_and_enters_no_key() {
        assert_eq!(Numerics::default().process_env().unwrap(), Vec::new());
        assert_eq!(Numerics::default().key_tag(), None);
        assert_eq!(Numerics::reproducible(2).key_tag(), Some(Numerics::reproducible(2)));
    }
}
