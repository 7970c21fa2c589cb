// Shared build script (included by each crate's build.rs): embeds libtorch's folder as an rpath
// and keeps `torch_cuda` linked, so binaries and tests run without LD_LIBRARY_PATH and use a GPU
// where one exists.
//
// `DEP_TCH_LIBTORCH_LIB` is exported by torch-sys (`links = "tch"`) to crates that depend on it
// directly, which is why every crate that runs libtorch code lists `torch-sys` itself.

/// Embed libtorch's folder as an rpath and keep `torch_cuda` linked.
fn link_libtorch() -> Option<String> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return None;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Where libtorch was found, for `mtkd doctor`.
    println!("cargo:rustc-env=MTKD_LIBTORCH_LIB={lib}");
    // The linker's default --as-needed would drop libtorch_cuda (nothing references it by
    // symbol); without it libtorch never registers its CUDA backend. tch's build.rs does the same.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    Some(lib)
}
