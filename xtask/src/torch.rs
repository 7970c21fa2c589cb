//! libtorch set-up: find the user's `LIBTORCH`, or install the PyPI `torch` wheel that tch expects
//! into a versioned virtual environment in the cache, and give cargo the environment torch-sys needs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The torch version that `tch` (pinned in the workspace Cargo.toml) is built against.
/// The tidy test checks that this and the pin agree.
pub const TORCH_VERSION: &str = "2.13.0";
/// The `tch` version this file was written for.
pub const TCH_VERSION: &str = "0.26.0";
/// The torchvision release built against `TORCH_VERSION` (its wheel requires `torch==2.13.0`);
/// `scripts/export_teacher.py` builds teachers from it.
pub const TORCHVISION_VERSION: &str = "0.28.0";

/// ONNX and ONNX Runtime, for exporting students to ONNX and checking the export
/// (`cargo xtask export-onnx`).
pub const ONNX_VERSION: &str = "1.23.2";
pub const ONNXRUNTIME_VERSION: &str = "1.32.0";

/// Free space asked for before installing the wheel and its CUDA dependencies (~5 GB installed).
const NEEDED_BYTES: u64 = 7 * 1024 * 1024 * 1024;

/// Where libtorch is and how cargo must be told.
#[derive(Debug)]
pub enum Torch {
    /// The user's own libtorch (the `LIBTORCH` variable).
    User { libtorch: PathBuf },
    /// The virtual environment that xtask installed (or found) in the cache.
    Venv { venv: PathBuf, torch_dir: PathBuf },
}

impl Torch {
    pub fn describe(&self) -> String {
        match self {
            Torch::User { libtorch } => format!(
                "libtorch {TORCH_VERSION} (yours, from LIBTORCH): {}",
                libtorch.display()
            ),
            Torch::Venv { venv, torch_dir } => format!(
                "libtorch {TORCH_VERSION} from the PyPI torch wheel\n  virtual environment: {}\n  libraries:           {}",
                venv.display(),
                torch_dir.join("lib").display()
            ),
        }
    }

    /// The set-up's Python (with torch), when xtask installed it.
    pub fn python(&self) -> Option<PathBuf> {
        match self {
            Torch::User { .. } => std::env::var_os("MTKD_TORCH_PYTHON").map(PathBuf::from),
            Torch::Venv { venv, .. } => Some(venv.join("bin").join("python")),
        }
    }

    /// Variables for every cargo invocation. They never change between calls for one set-up, so
    /// torch-sys is not rebuilt.
    pub fn cargo_env(&self) -> Vec<(String, String)> {
        match self {
            Torch::User { libtorch } => {
                vec![("LIBTORCH".into(), libtorch.display().to_string())]
            }
            Torch::Venv { venv, .. } => {
                let bin = venv.join("bin");
                let path = match std::env::var_os("PATH") {
                    Some(p) => {
                        let mut parts = vec![bin.clone()];
                        parts.extend(std::env::split_paths(&p).filter(|x| *x != bin));
                        std::env::join_paths(parts)
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_else(|_| bin.display().to_string())
                    }
                    None => bin.display().to_string(),
                };
                vec![
                    ("LIBTORCH_USE_PYTORCH".into(), "1".into()),
                    ("VIRTUAL_ENV".into(), venv.display().to_string()),
                    ("PATH".into(), path),
                    // The same interpreter for mtkd's Python helpers (export, golden values).
                    (
                        "MTKD_TORCH_PYTHON".into(),
                        venv.join("bin").join("python").display().to_string(),
                    ),
                ]
            }
        }
    }
}

/// The pip packages of CUDA headers that the NCCL shim (`mtkd-dist`'s `nccl` feature) needs
/// beside the wheel's own (`crt/host_config.h`, CCCL's `nv/target`); versions of the CUDA 13.0
/// that torch 2.13.0+cu130 ships.
pub const NCCL_HEADER_PACKAGES: [&str; 2] =
    ["nvidia-cuda-crt==13.0.88", "nvidia-cuda-cccl==13.0.85"];

impl Torch {
    /// The folder of CUDA headers beside the torch package (`nvidia/cu13/include`).
    fn cuda_include(&self) -> Option<PathBuf> {
        match self {
            Torch::User { .. } => None,
            Torch::Venv { torch_dir, .. } => torch_dir
                .parent()
                .map(|site| site.join("nvidia").join("cu13").join("include")),
        }
    }

    /// Whether the NCCL shim can compile here: the wheel's CUDA headers with the two header
    /// packages, or `MTKD_CUDA_INCLUDE` for your own libtorch.
    pub fn has_nccl_headers(&self) -> bool {
        match self.cuda_include() {
            Some(inc) => {
                inc.join("crt").join("host_config.h").is_file()
                    && inc.join("cccl").join("nv").join("target").is_file()
            }
            None => std::env::var_os("MTKD_CUDA_INCLUDE").is_some(),
        }
    }

    /// Install the header packages into the set-up's venv (`cargo xtask setup --nccl`).
    pub fn ensure_nccl_headers(&self) -> Result<()> {
        if self.has_nccl_headers() {
            return Ok(());
        }
        let Torch::Venv { venv, .. } = self else {
            bail!(
                "the NCCL backend compiles against CUDA's and NCCL's headers: with your own \
                 libtorch, set MTKD_CUDA_INCLUDE to their folders (colon-separated)"
            );
        };
        let python = venv.join("bin").join("python");
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-deps",
            ])
            .args(NCCL_HEADER_PACKAGES)
            .status()
            .with_context(|| format!("cannot run {} -m pip", python.display()))?;
        if !status.success() || !self.has_nccl_headers() {
            bail!(
                "pip could not install {} into {}",
                NCCL_HEADER_PACKAGES.join(" "),
                venv.display()
            );
        }
        Ok(())
    }
}

/// Find or install libtorch. Idempotent and quick when it is already there.
pub fn ensure() -> Result<Torch> {
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        return check_user_libtorch(PathBuf::from(libtorch));
    }
    let venv = crate::cache_dir()?.join(format!("torch-{TORCH_VERSION}"));
    let python = venv.join("bin").join("python");
    if python.exists() {
        if let Ok((version, dir)) = probe(&python) {
            if version == TORCH_VERSION {
                ensure_torchvision(&venv)?;
                ensure_onnx(&venv)?;
                return Ok(Torch::Venv {
                    venv,
                    torch_dir: dir,
                });
            }
            eprintln!(
                "xtask: {} holds torch {version}, not {TORCH_VERSION}; reinstalling",
                venv.display()
            );
        }
    }
    install(&venv)?;
    ensure_onnx(&venv)?;
    match probe(&python) {
        Ok((version, dir)) if version == TORCH_VERSION => Ok(Torch::Venv { venv, torch_dir: dir }),
        Ok((version, _)) => bail!(
            "the torch installed in {} reports version {version}, but tch {TCH_VERSION} needs {TORCH_VERSION}. \
             Remove that folder and run `cargo xtask setup` again, or point LIBTORCH at a libtorch {TORCH_VERSION}.",
            venv.display()
        ),
        Err(e) => Err(e.context(format!(
            "torch was installed in {} but cannot be imported",
            venv.display()
        ))),
    }
}

/// Add torchvision to a venv that has the right torch but predates the torchvision pin. torch is
/// left alone (`--no-deps`); numpy and pillow are named because `import torchvision` needs them.
fn ensure_torchvision(venv: &Path) -> Result<()> {
    let pin = format!("torchvision=={TORCHVISION_VERSION}");
    ensure_package(
        venv,
        &format!("torchvision-{TORCHVISION_VERSION}"),
        "import torchvision",
        &["--no-deps", &pin, "numpy", "pillow"],
    )
}

/// ONNX export of students (`scripts/export_onnx.py`) and its check with ONNX Runtime; neither
/// depends on torch, so pip leaves torch alone.
fn ensure_onnx(venv: &Path) -> Result<()> {
    let onnx = format!("onnx=={ONNX_VERSION}");
    let ort = format!("onnxruntime=={ONNXRUNTIME_VERSION}");
    ensure_package(
        venv,
        &format!("onnx-{ONNX_VERSION}-ort-{ONNXRUNTIME_VERSION}"),
        "import onnx, onnxruntime",
        &[&onnx, &ort],
    )
}

/// Make `import` work in the venv by `pip install <pip_args>`; checked once per environment
/// (a marker file), since importing costs a second or two per command.
fn ensure_package(venv: &Path, marker: &str, import: &str, pip_args: &[&str]) -> Result<()> {
    let marker = venv.join(format!(".mtkd-{marker}"));
    if marker.is_file() {
        return Ok(());
    }
    let python = venv.join("bin").join("python");
    let ok = Command::new(&python)
        .args(["-c", import])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "xtask: `{import}` fails in {}; installing {}",
            venv.display(),
            pip_args.join(" ")
        );
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(pip_args)
            .status()
            .with_context(|| format!("cannot run {} -m pip", python.display()))?;
        if !status.success() {
            bail!(
                "pip could not install {} into {} (see pip's message above). Check that PyPI is \
                 reachable and the disk is not full, then run `cargo xtask setup` again, or remove \
                 that folder so that setup reinstalls everything.",
                pip_args.join(" "),
                venv.display()
            );
        }
    }
    // Best effort: without the marker the check just runs again next time.
    let _ = std::fs::write(&marker, b"");
    Ok(())
}

/// `(version without local suffix, torch package dir)` as the venv's Python reports them.
fn probe(python: &Path) -> Result<(String, PathBuf)> {
    let out = Command::new(python)
        .args([
            "-c",
            "import torch, os; print(torch.__version__.split('+')[0]); print(os.path.dirname(torch.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("`import torch` failed with {}", python.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default().trim().to_owned();
    let dir = PathBuf::from(lines.next().unwrap_or_default().trim());
    Ok((version, dir))
}

fn install(venv: &Path) -> Result<()> {
    let python = std::env::var("MTKD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import sys; assert sys.version_info >= (3, 10)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match ok {
        Err(_) => bail!(
            "libtorch is not installed and `{python}` was not found. mtkd gets libtorch {TORCH_VERSION} from the PyPI \
             `torch` wheel, which needs Python 3.10 or newer with pip and venv: install them (Debian: \
             `apt-get install python3 python3-venv python3-pip`) or set MTKD_PYTHON to an interpreter, \
             or point LIBTORCH at an existing libtorch {TORCH_VERSION}."
        ),
        Ok(s) if !s.success() => bail!(
            "`{python}` is older than Python 3.10; the torch {TORCH_VERSION} wheel needs 3.10 or newer. \
             Set MTKD_PYTHON to a newer interpreter or point LIBTORCH at an existing libtorch {TORCH_VERSION}."
        ),
        Ok(_) => {}
    }
    let parent = venv.parent().context("cache folder has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the cache folder {}", parent.display()))?;
    if let Some(free) = free_bytes(parent) {
        if free < NEEDED_BYTES {
            bail!(
                "only {:.1} GiB free in {}; the torch {TORCH_VERSION} wheel with its CUDA libraries needs about 7 GiB. \
                 Free some space, or set MTKD_CACHE_DIR to a folder on a larger disk.",
                free as f64 / (1u64 << 30) as f64,
                parent.display()
            );
        }
    }
    eprintln!(
        "xtask: installing torch=={TORCH_VERSION} (libtorch for tch {TCH_VERSION}) and \
         torchvision=={TORCHVISION_VERSION} into {}\n\
         xtask: this downloads about 3 GB once and takes a few minutes; later runs reuse it",
        venv.display()
    );
    let tmp = venv.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    let status = Command::new(&python)
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .with_context(|| format!("cannot run `{python} -m venv`"))?;
    if !status.success() {
        bail!(
            "`{python} -m venv {}` failed. On Debian/Ubuntu install the venv module with \
             `apt-get install python3-venv`, or set MTKD_PYTHON to an interpreter that has it.",
            tmp.display()
        );
    }
    let pip = tmp.join("bin").join("pip");
    let status = Command::new(&pip)
        .args([
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
        ])
        .arg(format!("torch=={TORCH_VERSION}"))
        .arg(format!("torchvision=={TORCHVISION_VERSION}"))
        .status()
        .with_context(|| format!("cannot run {}", pip.display()))?;
    if !status.success() {
        bail!(
            "pip could not install torch=={TORCH_VERSION} and torchvision=={TORCHVISION_VERSION} into {} \
             (see pip's message above). \
             Check that PyPI is reachable (or that pip is configured for your mirror) and that the \
             disk is not full, then run `cargo xtask setup` again. Alternatively point LIBTORCH \
             at an existing libtorch {TORCH_VERSION}.",
            tmp.display()
        );
    }
    // The venv's scripts hold absolute paths, so the venv is made at its final place's sibling
    // and renamed: python's venv tolerates the rename because we call bin/python by path.
    // (pip's console scripts keep the .partial path in their shebang; xtask never uses them.)
    // The old environment (another torch version, or half-made by an interrupted install) goes
    // only now that the new one is complete: a failed install leaves a working one in place.
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .with_context(|| format!("cannot remove the old {}", venv.display()))?;
    }
    std::fs::rename(&tmp, venv)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), venv.display()))?;
    Ok(())
}

fn check_user_libtorch(libtorch: PathBuf) -> Result<Torch> {
    let lib = libtorch.join("lib");
    if !lib.join("libtorch.so").exists() && !lib.join("libtorch.dylib").exists() {
        bail!(
            "LIBTORCH is set to {} but {} has no libtorch library. Point LIBTORCH at the folder \
             that holds lib/ and include/ of libtorch {TORCH_VERSION} (for a pip install: the \
             `torch` package folder), or unset it and let `cargo xtask setup` install one.",
            libtorch.display(),
            lib.display()
        );
    }
    // libtorch zips have build-version; a pip-installed torch has version.py.
    let version = std::fs::read_to_string(libtorch.join("build-version"))
        .ok()
        .or_else(|| {
            std::fs::read_to_string(libtorch.join("version.py"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("__version__ = "))
                        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_owned())
                })
        });
    if let Some(v) = version {
        let v = v.trim().split('+').next().unwrap_or_default().to_owned();
        if v != TORCH_VERSION && std::env::var_os("LIBTORCH_BYPASS_VERSION_CHECK").is_none() {
            bail!(
                "LIBTORCH points at libtorch {v} ({}), but tch {TCH_VERSION} needs {TORCH_VERSION}. \
                 Point LIBTORCH at libtorch {TORCH_VERSION}, or unset it and let `cargo xtask setup` install it.",
                libtorch.display()
            );
        }
    }
    Ok(Torch::User { libtorch })
}

/// Free bytes on the file system holding `dir`, from POSIX `df` (no libc binding needed).
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}
