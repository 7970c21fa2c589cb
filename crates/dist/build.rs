//! Build script: embed the libtorch rpath and keep torch_cuda linked (shared code); with the
//! `nccl` feature, compile the C++ shim over libtorch's c10d::ProcessGroupNCCL (shim/nccl.cpp)
//! against the torch wheel's headers and the CUDA and NCCL headers of its pip packages.
include!("../../build-support/libtorch.rs");

fn main() {
    let lib = link_libtorch();
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        nccl(lib);
    }
}

#[cfg(feature = "nccl")]
fn nccl(lib: Option<String>) {
    use std::path::{Path, PathBuf};
    println!("cargo:rerun-if-changed=shim/nccl.cpp");
    println!("cargo:rerun-if-env-changed=MTKD_CUDA_INCLUDE");
    let Some(lib) = lib else {
        panic!(
            "the nccl feature needs libtorch through torch-sys (DEP_TCH_LIBTORCH_LIB is not set)"
        );
    };
    let torch = Path::new(&lib)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut includes: Vec<PathBuf> = vec![
        torch.join("include"),
        torch.join("include/torch/csrc/api/include"),
    ];
    // The pip packages beside the torch package: CUDA's headers (with crt/ and CCCL's nv/
    // from nvidia-cuda-crt and nvidia-cuda-cccl) and NCCL's.
    if let Some(site) = torch.parent() {
        for sub in [
            "nvidia/cu13/include",
            "nvidia/cu13/include/cccl",
            "nvidia/nccl/include",
        ] {
            let d = site.join(sub);
            if d.is_dir() {
                includes.push(d);
            }
        }
    }
    // Headers elsewhere (a CUDA toolkit, a standalone libtorch): colon-separated folders.
    if let Ok(extra) = std::env::var("MTKD_CUDA_INCLUDE") {
        includes.extend(std::env::split_paths(&extra));
    }
    cc::Build::new()
        .cpp(true)
        .file("shim/nccl.cpp")
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("USE_C10D_NCCL", None)
        .includes(&includes)
        .warnings(false)
        .compile("mtkd_nccl");
    println!("cargo:rustc-link-search=native={lib}");
    for l in ["torch_cuda", "c10_cuda", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}

#[cfg(not(feature = "nccl"))]
fn nccl(_lib: Option<String>) {}
