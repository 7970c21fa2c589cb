//! Datasets that ship in registry packages: the full Fashion-MNIST comes from the Debian package
//! `dataset-fashion-mnist`, fetched with `apt-get download` and unpacked without root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];
const SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";
const PACKAGE: &str = "dataset-fashion-mnist";

/// Folder under which configs' relative dataset roots are looked up (`MTKD_DATA_DIR`).
pub fn data_dir() -> Result<PathBuf> {
    Ok(crate::cache_dir()?.join("datasets"))
}

fn complete(dir: &Path) -> bool {
    FILES.iter().all(|f| dir.join(f).is_file())
}

/// Make `<data_dir>/fashion-mnist` hold the four gzip IDX files of the full dataset.
pub fn ensure_fashion_mnist() -> Result<PathBuf> {
    let target = data_dir()?.join("fashion-mnist");
    if complete(&target) {
        return Ok(target);
    }
    std::fs::create_dir_all(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let system = Path::new(SYSTEM_DIR);
    if complete(system) {
        for f in FILES {
            copy_atomic(&system.join(f), &target.join(f))?;
        }
        return Ok(target);
    }
    eprintln!(
        "xtask: fetching Fashion-MNIST (Debian package {PACKAGE}, 31 MB) into {}",
        target.display()
    );
    let work = fresh_download_dir(&target)?;
    let mut downloaded = apt_download(&work);
    if !downloaded && is_root() {
        // A fresh Debian image may have empty package lists: refresh them once.
        eprintln!("xtask: `apt-get download` found nothing; running `apt-get update` once");
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        downloaded = apt_download(&work);
    }
    if !downloaded {
        bail!(
            "could not fetch the Debian package {PACKAGE} with `apt-get download`. Either install it \
             (`sudo apt-get update && sudo apt-get install {PACKAGE}`, files land in {SYSTEM_DIR}), \
             or copy the four Fashion-MNIST files ({}) into {}, or run on the committed subset with \
             `cargo xtask train --config configs/quick.toml`.",
            FILES.join(", "),
            target.display()
        );
    }
    let deb = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download reported success but left no .deb file")?;
    let unpacked = work.join("root");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .context("cannot run dpkg-deb (Debian's dpkg) to unpack the dataset package")?;
    if !status.success() {
        bail!("dpkg-deb could not unpack {}", deb.display());
    }
    let src = unpacked.join(SYSTEM_DIR.trim_start_matches('/'));
    if !complete(&src) {
        bail!(
            "the package {} does not contain the expected files {} under {SYSTEM_DIR}",
            deb.display(),
            FILES.join(", ")
        );
    }
    for f in FILES {
        copy_atomic(&src.join(f), &target.join(f))?;
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(target)
}

/// Fetch what a config needs: the full Fashion-MNIST (also the source of the synthetic
/// scenes) and the nuclei tiles; other data the config names must already exist (mtkd says
/// which file is missing).
pub fn ensure_for_config(config: &Option<PathBuf>, python: Option<&Path>) -> Result<()> {
    let Some(path) = config else { return Ok(()) };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // mtkd reports the unreadable config with its own error
    };
    if text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("root") && l.contains("\"fashion-mnist\"")
    }) {
        ensure_fashion_mnist()?;
    }
    if text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("root") && (l.contains("\"nuclei-tiles\"") || l.contains("\"nuclei-det\""))
    }) {
        match python {
            Some(p) => {
                crate::nuclei::ensure(p)?;
            }
            None => bail!("the nuclei tiles need the set-up's Python (run `cargo xtask setup`)"),
        }
    }
    Ok(())
}

fn apt_download(dir: &Path) -> bool {
    Command::new("apt-get")
        .args(["download", "-q", PACKAGE])
        .current_dir(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Copy through a temporary name so that an interrupted copy never looks complete.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))?;
    Ok(())
}

/// An empty `.download` folder under `target` for a fetch to work in (what an interrupted
/// fetch left there is removed).
pub fn fresh_download_dir(target: &Path) -> Result<PathBuf> {
    let work = target.join(".download");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    Ok(work)
}
