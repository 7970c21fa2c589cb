//! Checkpoints: one folder per completed epoch (`checkpoints/epoch-NNNN/`) holding every tensor
//! of the run's state (`state.safetensors`) and its bookkeeping (`meta.json`). A checkpoint is
//! written into a temporary folder and renamed, so a kill never leaves a half checkpoint, and
//! non-finite tensors are refused so a NaN never replaces a good checkpoint. `checksums.json`
//! holds the size and CRC-32 of both files: a checkpoint whose files do not match it, or that
//! holds a non-finite tensor, is not loaded (it is moved aside and the one before it is used).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::record::EpochRecord;

/// Bookkeeping stored beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Number of completed epochs.
    pub epoch: usize,
    /// Global optimizer steps taken.
    pub step: u64,
    pub history: Vec<EpochRecord>,
    /// Wall seconds spent in training so far (over all sessions of this run).
    pub elapsed_seconds: f64,
    /// Hash of the resolved config: a resume with another config is refused.
    pub config_hash: String,
    /// The weighting strategy's bookkeeping (JSON; its tensors are in the safetensors file).
    #[serde(default)]
    pub strategy_json: String,
    /// Positions (full pool order) of the teachers still in the pool; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_teachers: Option<Vec<usize>>,
    /// Per teacher (full pool order): consecutive epochs under the pruning threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prune_counts: Vec<usize>,
}

/// The files of a checkpoint, and the file of their checksums.
const FILES: [&str; 2] = ["state.safetensors", "meta.json"];
const CHECKSUMS: &str = "checksums.json";

/// Size and CRC-32 of one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: String,
}

impl FileSum {
    fn of(path: &Path) -> Result<FileSum> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(FileSum {
            bytes: data.len() as u64,
            crc32: format!("{:08x}", crc32fast::hash(&data)),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checksums {
    files: std::collections::BTreeMap<String, FileSum>,
}

/// Whether a checkpoint folder exists for a completed epoch (readable or not).
pub fn any(root: &Path) -> bool {
    list(root).map(|l| !l.is_empty()).unwrap_or(false)
}

/// The config hash recorded by the newest checkpoint, read from its `meta.json` alone (no
/// checksums, no tensors): for refusing a resume with another configuration before any work.
/// None when there is no checkpoint or its meta cannot be read (the full load decides then).
pub fn latest_config_hash(root: &Path) -> Option<String> {
    let (_, dir) = list(root).ok()?.into_iter().max_by_key(|(n, _)| *n)?;
    let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    Some(meta.config_hash)
}

fn epoch_dir(root: &Path, epoch: usize) -> PathBuf {
    root.join(format!("epoch-{epoch:04}"))
}

/// Write the checkpoint of `meta.epoch` atomically; keep only the newest `keep` (0 = all).
pub fn save(
    root: &Path,
    tensors: &[(String, Tensor)],
    meta: &Meta,
    keep: usize,
) -> Result<PathBuf> {
    for (name, t) in tensors {
        if t.is_floating_point() {
            let ok = t.isfinite().all().int64_value(&[]) != 0;
            if !ok {
                bail!(
                    "refusing to checkpoint epoch {}: tensor `{name}` holds NaN or infinity (the \
                     run's state diverged during the epoch; with train.on_nonfinite = \"skip\" a \
                     skipped batch changes nothing, so lower train.lr)",
                    meta.epoch
                );
            }
        }
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = epoch_dir(root, meta.epoch);
    let tmp = root.join(format!(".tmp-epoch-{:04}", meta.epoch));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    // A write that fails (a full disk) leaves no half-made folder behind.
    let written = write_into(&tmp, tensors, meta);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), final_dir.display()))?;
    std::fs::File::open(root)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", root.display()))?;
    if keep > 0 {
        let mut all = list(root)?;
        all.sort();
        while all.len() > keep {
            let (_, dir) = all.remove(0);
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    Ok(final_dir)
}

/// The checkpoint's files, written into the folder `tmp`.
fn write_into(tmp: &Path, tensors: &[(String, Tensor)], meta: &Meta) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    let state = tmp.join("state.safetensors");
    crate::fsio::write_atomic_with(&state, |p| {
        Tensor::write_safetensors(&cpu, p).map_err(|e| e.to_string().into())
    })?;
    crate::fsio::write_atomic(&tmp.join("meta.json"), &serde_json::to_vec_pretty(meta)?)?;
    let sums = Checksums {
        files: FILES
            .iter()
            .map(|f| Ok(((*f).to_owned(), FileSum::of(&tmp.join(f))?)))
            .collect::<Result<_>>()?,
    };
    crate::fsio::write_json_atomic(&tmp.join(CHECKSUMS), &sums)?;
    Ok(())
}

fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_prefix("epoch-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if p.join("meta.json").is_file() && p.join("state.safetensors").is_file() {
                out.push((n, p));
            }
        }
    }
    Ok(out)
}

/// Named tensors of a checkpoint.
pub type NamedTensors = Vec<(String, Tensor)>;

/// The newest readable checkpoint: its tensors and meta. Newer checkpoints that cannot be read
/// (cut short, corrupt) are moved aside to `epoch-NNNN.unreadable` with a warning, so a resume
/// falls back to the epoch before them and nothing is deleted; an error, and nothing moved, when
/// checkpoints exist and none is readable.
pub fn load_latest(root: &Path) -> Result<Option<(NamedTensors, Meta)>> {
    let mut all = list(root)?;
    all.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut errors: Vec<(PathBuf, String)> = Vec::new();
    for (_, dir) in &all {
        match load(dir) {
            Ok(found) => {
                for (bad, e) in &errors {
                    let mut aside = PathBuf::from(format!("{}.unreadable", bad.display()));
                    let mut n = 2;
                    while aside.exists() {
                        aside = PathBuf::from(format!("{}.unreadable-{n}", bad.display()));
                        n += 1;
                    }
                    tracing::warn!(dir = %bad.display(), error = %e, moved_to = %aside.display(), "unreadable checkpoint skipped");
                    std::fs::rename(bad, &aside).with_context(|| {
                        format!("moving the unreadable checkpoint {} aside", bad.display())
                    })?;
                }
                return Ok(Some(found));
            }
            Err(e) => errors.push((dir.clone(), format!("{e:#}"))),
        }
    }
    if errors.is_empty() {
        return Ok(None);
    }
    bail!(
        "no readable checkpoint in {}: {}",
        root.display(),
        errors
            .iter()
            .map(|(_, e)| e.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    )
}

fn load(dir: &Path) -> Result<(NamedTensors, Meta)> {
    let sums_path = dir.join(CHECKSUMS);
    let sums: Checksums = serde_json::from_slice(
        &std::fs::read(&sums_path).with_context(|| format!("reading {}", sums_path.display()))?,
    )
    .with_context(|| format!("reading {}", sums_path.display()))?;
    for f in FILES {
        let want = sums
            .files
            .get(f)
            .ok_or_else(|| anyhow::anyhow!("{} lists no checksum for {f}", sums_path.display()))?;
        let got = FileSum::of(&dir.join(f))?;
        if &got != want {
            bail!(
                "{} is corrupt: {} bytes with CRC-32 {}, but the checkpoint recorded {} bytes with CRC-32 {}",
                dir.join(f).display(),
                got.bytes,
                got.crc32,
                want.bytes,
                want.crc32
            );
        }
    }
    let meta_path = dir.join("meta.json");
    let meta: Meta = serde_json::from_slice(
        &std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?,
    )
    .with_context(|| format!("reading {}", meta_path.display()))?;
    let tensors = Tensor::read_safetensors(dir.join("state.safetensors"))
        .with_context(|| format!("reading {}", dir.join("state.safetensors").display()))?;
    for (name, t) in &tensors {
        if t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0 {
            bail!(
                "{}: tensor `{name}` holds NaN or infinity",
                dir.join("state.safetensors").display()
            );
        }
    }
    Ok((tensors, meta))
}
