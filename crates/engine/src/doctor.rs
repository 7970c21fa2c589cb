//! `mtkd doctor`: what libtorch this binary runs on and what hardware it sees.

use std::path::PathBuf;

/// The tch version this workspace pins (checked against Cargo.toml by the tidy test).
pub const TCH_VERSION: &str = "0.26.0";

/// Lines of `(what, value)` describing the libtorch set-up.
pub fn report() -> Vec<(String, String)> {
    let lib = PathBuf::from(env!("MTKD_LIBTORCH_LIB"));
    let version = libtorch_version(&lib).unwrap_or_else(|| "unknown".into());
    let mut out = vec![
        ("mtkd".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("tch".to_owned(), TCH_VERSION.to_owned()),
        ("libtorch".to_owned(), version),
        ("libtorch folder".to_owned(), lib.display().to_string()),
        (
            "intra-op threads".to_owned(),
            tch::get_num_threads().to_string(),
        ),
        (
            "inter-op threads".to_owned(),
            tch::get_num_interop_threads().to_string(),
        ),
        ("MKL-DNN".to_owned(), tch::utils::has_mkldnn().to_string()),
        (
            "CUDA build".to_owned(),
            lib.join("libtorch_cuda.so").exists().to_string(),
        ),
        (
            "CUDA available".to_owned(),
            tch::Cuda::is_available().to_string(),
        ),
        (
            "CUDA devices".to_owned(),
            tch::Cuda::device_count().to_string(),
        ),
        (
            "cuDNN available".to_owned(),
            tch::Cuda::cudnn_is_available().to_string(),
        ),
    ];
    if tch::Cuda::is_available() {
        out.push(("default device".to_owned(), "cuda:0".to_owned()));
    } else {
        out.push(("default device".to_owned(), "cpu".to_owned()));
    }
    out
}

/// The version of the libtorch in `lib`'s parent: `build-version` (libtorch zips) or
/// `version.py` (the PyPI wheel).
pub fn libtorch_version(lib: &std::path::Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        return Some(v.trim().to_owned());
    }
    let text = std::fs::read_to_string(root.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
}
