//! `cargo xtask gpu-bundle`: mtkd built here for a machine whose PyTorch is another version
//! and which has no Rust (README, "A GPU machine without Rust"). tch 0.26's bindings are
//! generated for torch 2.13; against an older libtorch a few of its C++ wrappers name ops that
//! version lacks. The bundle builds torch-sys from a copy whose failing wrappers are replaced by
//! a thrown error (ops mtkd never calls), against that version's libtorch (the PyPI wheel,
//! downloaded with the set-up's pip, no dependencies), then the `mtkd` binary and the NCCL and
//! CUDA test binaries, stripped, into `gpu/` (ignored by git) beside `scripts/gpu_check.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::torch::Torch;

/// Rounds of build, read the errors, patch: one usually suffices.
const ROUNDS: usize = 4;

fn arg_value(args: &[String], name: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            return Some(v.to_owned());
        }
    }
    None
}

/// The registry's torch-sys sources (the version the lock file pins).
fn registry_torch_sys() -> Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let src = home.join("registry").join("src");
    for entry in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let d = entry?.path().join("torch-sys-0.26.0");
        if d.is_dir() {
            return Ok(d);
        }
    }
    bail!(
        "torch-sys 0.26.0's sources are not under {}: build mtkd once (cargo xtask setup && cargo \
         xtask mtkd doctor) so that cargo fetches them",
        src.display()
    )
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The line numbers of `torch_api_generated.cpp` that a failed build names as errors.
fn error_lines(log: &str) -> Vec<usize> {
    let key = "torch_api_generated.cpp:";
    let mut out: Vec<usize> = log
        .match_indices(key)
        .filter_map(|(i, _)| {
            let rest = &log[i + key.len()..];
            let line: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = &rest[line.len()..];
            let col: String = after
                .strip_prefix(':')?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            after[1 + col.len()..]
                .starts_with(": error")
                .then(|| line.parse().ok())
                .flatten()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Replace the body of each wrapper that holds an error line by a thrown error; returns the
/// wrappers' names.
fn patch_wrappers(cpp: &Path, bad: &[usize]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(cpp)?;
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let mut names = Vec::new();
    for &l in bad.iter().rev() {
        let Some(start) = (0..l.min(lines.len())).rev().find(|&i| {
            let s = &lines[i];
            !s.starts_with(' ') && s.contains("atg_") && s.contains('(')
        }) else {
            bail!("no wrapper holds line {l} of {}", cpp.display());
        };
        let name: String = lines[start][lines[start].find("atg_").unwrap_or(0)..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if names.contains(&name) {
            continue;
        }
        let open = start + 1;
        if lines.get(open).map(|s| s.trim()) != Some("PROTECT(") {
            bail!("wrapper {name} of {} has no PROTECT( body", cpp.display());
        }
        let close = (open + 1..lines.len())
            .find(|&i| lines[i] == "  )")
            .with_context(|| format!("wrapper {name} has no end"))?;
        lines.splice(
            open + 1..close,
            [format!(
                "    throw std::runtime_error(\"{name}: not in this libtorch (torch-sys patched by cargo xtask gpu-bundle)\");"
            )],
        );
        names.push(name);
    }
    std::fs::write(cpp, lines.join("\n"))?;
    Ok(names)
}

/// `cargo xtask gpu-bundle --torch-version V` (or `--libtorch DIR`): see the module doc.
pub fn bundle(torch: &Torch, args: &[String]) -> Result<()> {
    let root = std::env::current_dir()?;
    let python = torch.python().context(
        "gpu-bundle downloads the wheel with the set-up's Python: run cargo xtask setup",
    )?;
    let (version, libtorch) = match (
        arg_value(args, "--libtorch"),
        arg_value(args, "--torch-version"),
    ) {
        (Some(dir), _) => ("custom".to_owned(), PathBuf::from(dir)),
        (None, Some(v)) => {
            let dir = root.join("target").join(format!("gpu-torch-{v}"));
            let lib = dir.join("torch");
            if !lib.join("lib").join("libtorch_cpu.so").is_file() {
                std::fs::create_dir_all(&dir)?;
                crate::step(
                    &format!("pip download torch=={v} (the wheel only)"),
                    Command::new(&python)
                        .args([
                            "-m",
                            "pip",
                            "download",
                            "--no-deps",
                            "--disable-pip-version-check",
                        ])
                        .arg(format!("torch=={v}"))
                        .arg("-d")
                        .arg(&dir),
                )?;
                crate::step(
                    "unpacking the wheel's torch/lib and torch/include",
                    Command::new(&python).arg("-c").arg(format!(
                        "import glob, zipfile\nz = zipfile.ZipFile(glob.glob(r'{}/torch-*.whl')[0])\n\
                         z.extractall(r'{}', [n for n in z.namelist() if n.startswith(('torch/lib/', 'torch/include/'))])",
                        dir.display(),
                        dir.display()
                    )),
                )?;
            }
            (v, lib)
        }
        (None, None) => {
            bail!("give --torch-version V (e.g. 2.11.0, the GPU machine's) or --libtorch DIR")
        }
    };
    let work = root.join("target").join(format!("gpu-{version}"));
    let patched = work.join("torch-sys");
    let _ = std::fs::remove_dir_all(&patched);
    copy_dir(&registry_torch_sys()?, &patched)?;
    let cpp = patched.join("libtch").join("torch_api_generated.cpp");
    // The CUDA and NCCL headers of the NCCL shim: the set-up's venv's (same CUDA major).
    torch.ensure_nccl_headers()?;
    let cuda_include = match torch {
        Torch::Venv { torch_dir, .. } => torch_dir.parent().map(|site| {
            [
                "nvidia/cu13/include",
                "nvidia/cu13/include/cccl",
                "nvidia/nccl/include",
            ]
            .iter()
            .map(|s| site.join(s).display().to_string())
            .collect::<Vec<_>>()
            .join(":")
        }),
        Torch::User { .. } => std::env::var("MTKD_CUDA_INCLUDE").ok(),
    };
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
    let cargo = |extra: &[&str]| {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(extra)
            .arg("--config")
            .arg(format!(
                "patch.crates-io.torch-sys.path=\"{}\"",
                patched.display()
            ))
            .env_remove("LIBTORCH_USE_PYTORCH")
            .env_remove("VIRTUAL_ENV")
            .env("LIBTORCH", &libtorch)
            .env("LIBTORCH_BYPASS_VERSION_CHECK", "1")
            .env("CARGO_TARGET_DIR", work.join("target"))
            // libtorch_cuda's own CUDA libraries are on the GPU machine, not here.
            .env("RUSTFLAGS", "-C link-arg=-Wl,--allow-shlib-undefined");
        if let Some(inc) = &cuda_include {
            cmd.env("MTKD_CUDA_INCLUDE", inc);
        }
        cmd
    };
    let result = (|| -> Result<()> {
        let mut patched_names = Vec::new();
        for round in 0..=ROUNDS {
            let out = cargo(&["build", "--release", "-p", "torch-sys"])
                .output()
                .context("running cargo build -p torch-sys")?;
            if out.status.success() {
                break;
            }
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            let bad = error_lines(&log);
            if bad.is_empty() || round == ROUNDS {
                bail!(
                    "torch-sys does not build against {}:\n{log}",
                    libtorch.display()
                );
            }
            patched_names.extend(patch_wrappers(&cpp, &bad)?);
        }
        eprintln!(
            "xtask: torch-sys builds against {} with {} wrapper(s) replaced by an error: {}",
            libtorch.display(),
            patched_names.len(),
            patched_names.join(", ")
        );
        crate::step(
            "cargo build mtkd (nccl)",
            &mut cargo(&[
                "build",
                "--release",
                "-p",
                "mtkd-cli",
                "--bin",
                "mtkd",
                "--features",
                "mtkd-cli/nccl",
            ]),
        )?;
        let tests = cargo(&[
            "test",
            "--release",
            "--no-run",
            "-p",
            "mtkd-dist",
            "--features",
            "nccl",
            "--test",
            "nccl",
            "--message-format",
            "json",
        ])
        .output()
        .context("building the NCCL tests")?;
        if !tests.status.success() {
            bail!(
                "the NCCL tests do not build:\n{}",
                String::from_utf8_lossy(&tests.stderr)
            );
        }
        let json = String::from_utf8_lossy(&tests.stdout);
        let exe = json
            .lines()
            .filter(|l| l.contains("\"executable\":\"") && l.contains("/deps/nccl-"))
            .filter_map(|l| l.split("\"executable\":\"").nth(1))
            .filter_map(|s| s.split('"').next())
            .next_back()
            .context("cargo named no NCCL test binary")?
            .to_owned();
        let out = root.join("gpu");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out)?;
        for (from, name) in [
            (work.join("target/release/mtkd"), "mtkd"),
            (PathBuf::from(exe), "nccl-tests"),
        ] {
            let to = out.join(name);
            std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
            crate::step("strip", Command::new("strip").arg(&to))?;
        }
        std::fs::write(
            out.join("BUILT.txt"),
            format!(
                "mtkd {} built against libtorch {} ({}) with torch-sys 0.26.0 patched: {}\n",
                env!("CARGO_PKG_VERSION"),
                version,
                libtorch.display(),
                if patched_names.is_empty() {
                    "none".to_owned()
                } else {
                    patched_names.join(", ")
                }
            ),
        )?;
        println!(
            "gpu/: mtkd and nccl-tests for libtorch {version}; run scripts/gpu_check.sh there"
        );
        Ok(())
    })();
    // The patch entry must not stay in the project's lock file.
    std::fs::write(root.join("Cargo.lock"), lock)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_name_their_lines_and_wrappers_are_replaced() {
        let log = "warning: torch-sys@0.26.0: libtch/torch_api_generated.cpp:7:29: error: '_x' is not a member of 'torch'\n\
                   libtch/torch_api_generated.cpp:3:1: note: something\n\
                   libtch/torch_api_generated.cpp:7:29: error: again\n";
        assert_eq!(error_lines(log), vec![7]);
        let dir = std::env::temp_dir().join(format!("xtask-gpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cpp = dir.join("g.cpp");
        std::fs::write(
            &cpp,
            "void atg_a(tensor *out__) {\n  PROTECT(\n    auto o = torch::a();\n    out__[0] = new torch::Tensor(o);\n  )\n}\n\nvoid atg__x(tensor *out__, tensor s) {\n  PROTECT(\n    auto outputs__ = torch::_x(*s);\n    out__[0] = new torch::Tensor(outputs__);\n  )\n}\n",
        )
        .unwrap();
        assert_eq!(patch_wrappers(&cpp, &[10]).unwrap(), vec!["atg__x"]);
        let text = std::fs::read_to_string(&cpp).unwrap();
        assert!(text.contains("torch::a()"), "{text}");
        assert!(!text.contains("torch::_x"), "{text}");
        assert!(text.contains("throw std::runtime_error(\"atg__x: not in this libtorch"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
