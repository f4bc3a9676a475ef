//! Hashing benchmark for the cache: throughput of `Cache::hash_path` on a
//! generated tree, and the cost of a no-op re-hash with a warm stat cache.
//!
//! ```text
//! cargo run --release -p pipeline-cache --example hash_bench -- \
//!     --dir /tmp/hash-bench --gb 10 [--small-files 10000] [--keep]
//! RAYON_NUM_THREADS=1 cargo run --release ...   # single core
//! ```
//! The tree is generated once (non-sparse pseudo-random bytes) and reused by
//! later runs with the same size; `--keep` leaves it on disk for b3sum.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pipeline_cache::{Cache, CacheOptions};

struct Args {
    dir: PathBuf,
    gb: f64,
    big_file_mb: u64,
    small_files: usize,
    keep: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::temp_dir().join("pipeline-cache-hash-bench"),
        gb: 1.0,
        big_file_mb: 256,
        small_files: 10_000,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()?),
            "--gb" => args.gb = value()?.parse().map_err(|e| format!("--gb: {e}"))?,
            "--big-file-mb" => args.big_file_mb = value()?.parse().map_err(|e| format!("--big-file-mb: {e}"))?,
            "--small-files" => args.small_files = value()?.parse().map_err(|e| format!("--small-files: {e}"))?,
            "--keep" => args.keep = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// splitmix64: fast, incompressible-enough bytes so nothing is sparse or
/// deduplicated by the filesystem.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn write_file(path: &Path, size: u64, state: &mut u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], state);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// Generates the tree unless a matching one exists; returns (files, bytes).
fn generate(args: &Args, tree: &Path) -> std::io::Result<(usize, u64)> {
    let big_size = args.big_file_mb << 20;
    let total = (args.gb * (1u64 << 30) as f64) as u64;
    let big_count = total.div_ceil(big_size) as usize;
    let small_size = 16 << 10;
    let stamp = tree.join(".complete");
    let expected = format!("{big_count} {big_size} {} {small_size}\n", args.small_files);
    let bytes = big_count as u64 * big_size + args.small_files as u64 * small_size;
    let files = big_count + args.small_files;
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == expected) {
        eprintln!("reusing tree {}", tree.display());
        return Ok((files, bytes));
    }
    if tree.exists() {
        std::fs::remove_dir_all(tree)?;
    }
    std::fs::create_dir_all(tree.join("big"))?;
    let started = Instant::now();
    let mut state = 0x5EED_u64;
    for i in 0..big_count {
        write_file(&tree.join(format!("big/{i:04}.bin")), big_size, &mut state)?;
    }
    for i in 0..args.small_files {
        let dir = tree.join(format!("small/{:03}", i / 1000));
        std::fs::create_dir_all(&dir)?;
        write_file(&dir.join(format!("{i:05}.bin")), small_size, &mut state)?;
    }
    std::fs::write(&stamp, expected)?;
    eprintln!("generated {files} files, {:.2} GiB in {:.1?}", bytes as f64 / (1u64 << 30) as f64, started.elapsed());
    Ok((files, bytes))
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e9 / d.as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let tree = args.dir.join("tree");
    let (files, bytes) = generate(&args, &tree)?;
    // Timestamps of just-written files are "racy" and not stat-cached; wait
    // them out so the warm pass measures what a later rerun would see.
    std::thread::sleep(Duration::from_millis(2100));

    let threads = rayon::current_num_threads();
    let cache_root = args.dir.join(format!("cache-{threads}t"));
    if cache_root.exists() {
        std::fs::remove_dir_all(&cache_root)?;
    }
    println!(
        "tree: {files} files, {:.2} GB ({} big files of {} MiB + {} x 16 KiB), rayon threads: {threads}",
        bytes as f64 / 1e9,
        files - args.small_files,
        args.big_file_mb,
        args.small_files
    );

    let cache = Cache::open_with(&cache_root, CacheOptions::default())?;
    let t = Instant::now();
    let manifest = cache.hash_path(&tree)?;
    let cold = t.elapsed();
    println!(
        "full hash (empty stat cache, page cache warm): {cold:.2?}  {:.2} GB/s  ({} files hashed)",
        gbps(bytes, cold),
        cache.stat_counters().hashed
    );

    let big = tree.join("big");
    let big_bytes: u64 = manifest.subtree("big").map(|m| m.total_size()).unwrap_or(0);
    let fresh = Cache::open_with(&args.dir.join(format!("cache-{threads}t-big")), CacheOptions::default())?;
    let t = Instant::now();
    fresh.hash_path(&big)?;
    let d = t.elapsed();
    println!("  big files only: {d:.2?}  {:.2} GB/s", gbps(big_bytes, d));
    let small = tree.join("small");
    if small.exists() {
        let small_bytes = bytes - big_bytes;
        let t = Instant::now();
        fresh.hash_path(&small)?;
        let d = t.elapsed();
        println!(
            "  small files only: {d:.2?}  {:.2} GB/s, {:.0} files/s",
            gbps(small_bytes, d),
            args.small_files as f64 / d.as_secs_f64()
        );
    }
    drop(fresh);
    std::fs::remove_dir_all(args.dir.join(format!("cache-{threads}t-big")))?;

    let t = Instant::now();
    let again = cache.hash_path(&tree)?;
    let warm = t.elapsed();
    assert_eq!(again, manifest, "warm re-hash must give the same manifest");
    println!(
        "no-op re-hash, warm stat cache (same process): {warm:.2?}  (hits {}, hashed {})",
        cache.stat_counters().hits,
        cache.stat_counters().hashed
    );
    let t = Instant::now();
    cache.flush()?;
    println!("stat cache flush: {:.2?}", t.elapsed());
    drop(cache);

    let t = Instant::now();
    let reopened = Cache::open_with(&cache_root, CacheOptions::default())?;
    let open_time = t.elapsed();
    let t = Instant::now();
    let third = reopened.hash_path(&tree)?;
    let warm2 = t.elapsed();
    assert_eq!(third, manifest);
    println!(
        "no-op re-hash, new process: open {open_time:.2?} + hash {warm2:.2?}  (hashed {})",
        reopened.stat_counters().hashed
    );
    drop(reopened);
    std::fs::remove_dir_all(&cache_root)?;
    if !args.keep {
        std::fs::remove_dir_all(&args.dir)?;
    }
    Ok(())
}
