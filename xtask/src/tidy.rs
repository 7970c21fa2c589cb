//! Repository rules, run as tests (`cargo xtask test` runs them with the rest).

use std::path::{Path, PathBuf};

use crate::torch::{TCH_VERSION, TORCH_VERSION};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The torch version that each tch release was built against (tch's README / torch-sys build.rs).
fn torch_for_tch(tch: &str) -> Option<&'static str> {
    match tch {
        "0.26.0" => Some("2.13.0"),
        "0.25.0" => Some("2.12.0"),
        "0.24.0" => Some("2.11.0"),
        _ => None,
    }
}

#[test]
fn tch_pin_and_installed_torch_agree() {
    let manifest = read("Cargo.toml");
    let pin = format!("tch = \"={TCH_VERSION}\"");
    assert!(
        manifest.contains(&pin),
        "Cargo.toml must pin {pin} (xtask/src/torch.rs says tch {TCH_VERSION})"
    );
    let sys = format!("torch-sys = \"={TCH_VERSION}\"");
    assert!(
        manifest.contains(&sys),
        "Cargo.toml must pin {sys} to the same version as tch"
    );
    assert_eq!(
        torch_for_tch(TCH_VERSION),
        Some(TORCH_VERSION),
        "xtask installs torch {TORCH_VERSION}, but tch {TCH_VERSION} expects another version"
    );
    // The lock file, when present, must hold the pinned version.
    if let Ok(lock) = std::fs::read_to_string(root().join("Cargo.lock")) {
        let entry = format!("name = \"tch\"\nversion = \"{TCH_VERSION}\"");
        assert!(
            lock.contains(&entry),
            "Cargo.lock does not resolve tch to {TCH_VERSION}"
        );
    }
    // mtkd doctor reports the same tch version.
    let doctor = read("crates/engine/src/doctor.rs");
    assert!(
        doctor.contains(&format!("TCH_VERSION: &str = \"{TCH_VERSION}\"")),
        "doctor.rs TCH_VERSION disagrees"
    );
}

fn dependency_names(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_deps = l.contains("dependencies");
            if let Some(name) = l
                .strip_prefix("[dependencies.")
                .or_else(|| l.strip_prefix("[dev-dependencies."))
            {
                out.push(name.trim_end_matches(']').to_owned());
            }
            continue;
        }
        if in_deps {
            if let Some((name, _)) = l.split_once('=') {
                let name = name.trim().split('.').next().unwrap_or_default().to_owned();
                if !name.is_empty() && !name.starts_with('#') {
                    out.push(name);
                }
            }
        }
    }
    out
}

#[test]
fn xtask_never_links_libtorch_or_workspace_crates() {
    let deps = dependency_names(&read("xtask/Cargo.toml"));
    for d in &deps {
        assert!(
            d != "tch" && d != "torch-sys" && !d.starts_with("mtkd-"),
            "xtask must build before libtorch exists, but it depends on `{d}`"
        );
    }
}

#[test]
fn library_crates_respect_the_dependency_rules() {
    // teachers, student, rl-weighting and vision-tasks depend on distill-core only (among
    // workspace crates); distill-core on none; only the engine sees them all.
    let leaves = ["teachers", "student", "rl-weighting", "vision-tasks"];
    for c in leaves {
        let deps = dependency_names(&read(&format!("crates/{c}/Cargo.toml")));
        for d in deps.iter().filter(|d| d.starts_with("mtkd-")) {
            assert_eq!(
                d, "mtkd-distill-core",
                "crates/{c} must not depend on {d} (see docs/ARCHITECTURE.md)"
            );
        }
    }
    let core = dependency_names(&read("crates/distill-core/Cargo.toml"));
    assert!(
        core.iter().all(|d| !d.starts_with("mtkd-")),
        "distill-core depends on no workspace crate"
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    rust_files(&root().join("xtask"), &mut files);
    assert!(files.len() > 10, "found only {} Rust files", files.len());
    let mut missing = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        if !text.trim_start().starts_with("//!") {
            missing.push(f.strip_prefix(root()).unwrap_or(&f).display().to_string());
        }
    }
    // build-support/link_libtorch.rs is `include!`d by build scripts, where `//!` is not allowed;
    // it is outside crates/ and xtask/ and so not checked here.
    assert!(
        missing.is_empty(),
        "files without a leading `//!` line: {missing:?}"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = read("README.md");
    let ci = read(".ci/run");
    assert!(
        readme.contains("cargo xtask test"),
        "README must give `cargo xtask test`"
    );
    assert!(
        ci.contains("cargo xtask test"),
        ".ci/run must run the README's test command"
    );
}
