// The `pipeline` binary, and the tests of every crate that uses tch (they
// point their `build` here), load libtorch at run time: bake the
// directory torch-sys linked against into the rpath, so nobody has to export
// LD_LIBRARY_PATH. (Cargo does not propagate rpaths from dependencies.)
// torch-sys declares `links = "tch"`, so its `libtorch_lib` metadata arrives
// as DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
