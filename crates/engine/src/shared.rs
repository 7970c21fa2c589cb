//! Shared teacher outputs: the teachers' logits and feature maps for every training batch of a
//! run, written to disk once and read back by other runs that see exactly the same batches.
//!
//! Teachers are frozen and run in eval mode, and the loader's batches (order and augmentation)
//! depend only on the data settings, the batch size, the seed and the epoch. So every strategy of
//! a comparison with the same seed gets bit-identical teacher outputs, and computing them once
//! is exact. A folder holds one *key* per such setting (a hash of the data section, the teacher
//! pool and its files, the seed, the batch size and the device) and one file per epoch,
//! `epoch-<e>.bin`, written as `epoch-<e>.bin.partial-<pid>` and renamed when the epoch is
//! complete (a killed writer leaves its partial file behind; `mtkd compare` deletes the key
//! folder when the seed is done).
//!
//! Each batch is a record: the batch size `n` and its `n` sample indices (u64, little endian),
//! then per teacher its logits `[n, K]` and, when it has one, its feature map `[n, C, H, W]`
//! (float32, native byte order). A reader checks the indices of every batch against the batch the
//! loader gave, so a file that does not belong to the run is an error, never a silent mismatch.
//!
//! `mtkd compare` fills the folder with one teacher pass per seed (`mtkd share-teachers`) and
//! every strategy run reads it (`mtkd train --teacher-outputs DIR`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::{FeatureShape, ModelOutput};

use crate::config::Config;

/// What each record holds per teacher: the logits' shape per sample (`[K]`, or `[K, H, W]` for
/// segmentation) and the feature map's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub logits: Vec<i64>,
    pub features: Vec<Option<FeatureShape>>,
}

impl Layout {
    /// The logits' shape for a batch of `n`.
    fn batch_logits(&self, n: i64) -> Vec<i64> {
        std::iter::once(n)
            .chain(self.logits.iter().copied())
            .collect()
    }
}

/// Whether the records hold feature maps: only when the run has feature KD.
pub fn with_features(cfg: &Config) -> bool {
    cfg.distill.as_ref().is_some_and(|d| d.feature_weight > 0.0)
}

/// The key folder of a run's teacher outputs under `root`.
///
/// The key covers the data section with its resolved root, the teacher pool, each teacher's file
/// (path, size and modification time, so a retrained or replaced teacher gets a new key), the
/// seed, the batch size, the resolved device and whether feature maps are stored.
pub fn key_dir(
    root: &Path,
    cfg: &Config,
    teacher_files: &[PathBuf],
    device: Device,
) -> Result<PathBuf> {
    #[derive(Serialize)]
    struct Key<'k> {
        format: u32,
        data: &'k crate::config::DataConfig,
        data_root: String,
        teachers: &'k [crate::config::TeacherConfig],
        files: Vec<String>,
        seed: u64,
        batch_size: usize,
        device: String,
        features: bool,
        /// Absent at fp32, so the keys of stored outputs made before this field stay valid.
        #[serde(skip_serializing_if = "Option::is_none")]
        precision: Option<String>,
    }
    let mut files = Vec::new();
    for p in teacher_files {
        let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        files.push(format!("{} len={} mtime={mtime}", p.display(), meta.len()));
    }
    let data_root = crate::dataset::resolve_root(&cfg.data.root);
    let key = Key {
        format: 1,
        data: &cfg.data,
        data_root: std::fs::canonicalize(&data_root)
            .unwrap_or(data_root)
            .display()
            .to_string(),
        teachers: &cfg.teachers,
        files,
        seed: cfg.run.seed,
        batch_size: cfg.train.batch_size,
        device: format!("{device:?}"),
        features: with_features(cfg),
        precision: cfg
            .distill
            .as_ref()
            .map(|d| d.teacher_precision)
            .filter(|p| *p != mtkd_distill_core::Precision::Fp32)
            .map(|p| p.to_string()),
    };
    let text = serde_json::to_string(&key).context("serialising the teacher-output key")?;
    Ok(root.join(format!(
        "seed{}-{}",
        cfg.run.seed,
        crate::config::stable_hash(text.as_bytes())
    )))
}

/// Bytes one epoch of records takes for `samples` training samples.
pub fn epoch_bytes(layout: &Layout, samples: usize) -> u64 {
    let per_sample: i64 = 8 + layout
        .features
        .iter()
        .map(|f| {
            4 * (layout.logits.iter().product::<i64>() + f.map(|(c, h, w)| c * h * w).unwrap_or(0))
        })
        .sum::<i64>();
    per_sample as u64 * samples as u64
}

/// The teacher outputs of one epoch: read from a complete file, or computed and written.
pub enum EpochOutputs {
    Read {
        path: PathBuf,
        file: BufReader<File>,
        layout: Layout,
        batches: usize,
    },
    Write {
        partial: PathBuf,
        path: PathBuf,
        file: BufWriter<File>,
        layout: Layout,
    },
}

impl EpochOutputs {
    /// Open epoch `epoch` (0-based) in `dir`: read it if complete, else start writing it.
    pub fn open(dir: &Path, epoch: usize, layout: Layout) -> Result<EpochOutputs> {
        let path = dir.join(format!("epoch-{epoch}.bin"));
        if path.is_file() {
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            tracing::info!(file = %path.display(), "reading shared teacher outputs");
            return Ok(EpochOutputs::Read {
                path,
                file: BufReader::with_capacity(1 << 20, file),
                layout,
                batches: 0,
            });
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // One temporary file per process: two runs writing the same key do not collide (the
        // second rename replaces identical bytes).
        let partial = dir.join(format!("epoch-{epoch}.bin.partial-{}", std::process::id()));
        let file =
            File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        tracing::info!(file = %path.display(), "writing shared teacher outputs");
        Ok(EpochOutputs::Write {
            partial,
            path,
            file: BufWriter::with_capacity(1 << 20, file),
            layout,
        })
    }

    /// Whether this epoch's outputs come from the file.
    pub fn is_read(&self) -> bool {
        matches!(self, EpochOutputs::Read { .. })
    }

    /// The teachers' outputs for the batch with these sample indices: read, or computed by
    /// `compute` and appended to the file.
    pub fn batch(
        &mut self,
        indices: &[usize],
        device: Device,
        compute: impl FnOnce() -> Result<Vec<ModelOutput>>,
    ) -> Result<Vec<ModelOutput>> {
        match self {
            EpochOutputs::Read {
                path,
                file,
                layout,
                batches,
            } => {
                let out = read_record(file, indices, layout, device).with_context(|| {
                    format!(
                        "shared teacher outputs {} (batch {}); delete the file to recompute it",
                        path.display(),
                        *batches
                    )
                })?;
                *batches += 1;
                Ok(out)
            }
            EpochOutputs::Write {
                partial,
                file,
                layout,
                ..
            } => {
                let outs = compute()?;
                write_record(file, indices, layout, &outs)
                    .with_context(|| format!("writing {}", partial.display()))?;
                Ok(outs)
            }
        }
    }

    /// Data-parallel ranks: this rank's rows of the next batch, whose whole record the file
    /// holds (`part` = `(rank, world)`, the loader's contiguous shard). `indices` are the
    /// rank's samples, checked against their place in the stored batch. Only a complete file
    /// can be read this way: ranks never write shared outputs.
    pub fn batch_part(
        &mut self,
        indices: &[usize],
        (rank, world): (usize, usize),
        device: Device,
    ) -> Result<Vec<ModelOutput>> {
        let EpochOutputs::Read {
            path,
            file,
            layout,
            batches,
        } = self
        else {
            bail!(
                "data-parallel ranks read shared teacher outputs but do not write them: this \
                 epoch's file is missing; compute them first in one process (mtkd \
                 share-teachers --config ... --into DIR), or leave --teacher-outputs out"
            );
        };
        let at = *batches;
        let context = |path: &Path| {
            format!(
                "shared teacher outputs {} (batch {at}); delete the file to recompute it",
                path.display()
            )
        };
        // The loader leaves out a global batch smaller than the world (the epoch's last).
        let (stored, outs) = loop {
            let (stored, outs) =
                read_any_record(file, layout, device).with_context(|| context(path))?;
            *batches += 1;
            if stored.len() >= world {
                break (stored, outs);
            }
        };
        let part = mtkd_dist::shard(stored.len(), rank, world);
        if stored[part.clone()] != *indices {
            return Err(anyhow!(
                "rank {rank}'s samples differ from its part of the stored batch: the file was made \
                 for other batches"
            ))
            .with_context(|| context(path));
        }
        Ok(outs
            .into_iter()
            .map(|o| ModelOutput {
                logits: o.logits.narrow(0, part.start as i64, part.len() as i64),
                features: o
                    .features
                    .map(|f| f.narrow(0, part.start as i64, part.len() as i64)),
            })
            .collect())
    }

    /// End of the epoch: a writer makes its file complete (flush, sync, rename); a reader checks
    /// that the file has no batches left over (`world` > 1: but a last batch smaller than the
    /// world, which data-parallel loaders leave out).
    pub fn finish(self, world: usize) -> Result<()> {
        match self {
            EpochOutputs::Read {
                path,
                mut file,
                layout,
                ..
            } => {
                if world > 1 {
                    let mut peek = [0u8; 8];
                    let mut got = 0;
                    while got < 8 {
                        let n = file.read(&mut peek[got..])?;
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    if got == 0 {
                        return Ok(());
                    }
                    let n = u64::from_le_bytes(peek) as usize;
                    if got == 8 && n < world {
                        // Skip that record: its indices and tensors.
                        let mut rest = (&mut file).take(8 * n as u64);
                        std::io::copy(&mut rest, &mut std::io::sink())?;
                        let n = n as i64;
                        for shape in &layout.features {
                            let mut bytes = layout.batch_logits(n).iter().product::<i64>();
                            if let Some((c, h, w)) = shape {
                                bytes += n * c * h * w;
                            }
                            let mut rest = (&mut file).take(4 * bytes as u64);
                            std::io::copy(&mut rest, &mut std::io::sink())?;
                        }
                    } else {
                        bail!(
                            "shared teacher outputs {} hold more batches than this run's epoch; \
                             delete the file to recompute it",
                            path.display()
                        );
                    }
                }
                let mut probe = [0u8; 1];
                if file.read(&mut probe)? != 0 {
                    bail!(
                        "shared teacher outputs {} hold more batches than this run's epoch; \
                         delete the file to recompute it",
                        path.display()
                    );
                }
                Ok(())
            }
            EpochOutputs::Write {
                partial,
                path,
                file,
                ..
            } => {
                let file = file
                    .into_inner()
                    .map_err(|e| anyhow!("writing {}: {}", partial.display(), e.error()))?;
                file.sync_all()
                    .with_context(|| format!("syncing {}", partial.display()))?;
                std::fs::rename(&partial, &path)
                    .with_context(|| format!("renaming {}", partial.display()))?;
                Ok(())
            }
        }
    }
}

fn write_record(
    file: &mut impl Write,
    indices: &[usize],
    layout: &Layout,
    outs: &[ModelOutput],
) -> Result<()> {
    if outs.len() != layout.features.len() {
        bail!(
            "{} teacher outputs for {} teachers",
            outs.len(),
            layout.features.len()
        );
    }
    file.write_all(&(indices.len() as u64).to_le_bytes())?;
    for &i in indices {
        file.write_all(&(i as u64).to_le_bytes())?;
    }
    let n = indices.len() as i64;
    for (m, (o, shape)) in outs.iter().zip(&layout.features).enumerate() {
        write_tensor(file, &o.logits, &layout.batch_logits(n), m)?;
        match (shape, &o.features) {
            (Some((c, h, w)), Some(f)) => write_tensor(file, f, &[n, *c, *h, *w], m)?,
            (None, _) => {}
            (Some(_), None) => bail!("teacher {m} gave no feature map"),
        }
    }
    Ok(())
}

fn write_tensor(file: &mut impl Write, t: &Tensor, shape: &[i64], m: usize) -> Result<()> {
    if t.size() != shape {
        bail!(
            "teacher {m}: output of shape {:?}, expected {shape:?}",
            t.size()
        );
    }
    if t.kind() != Kind::Float {
        bail!(
            "teacher {m}: outputs of kind {:?} cannot be shared (float32 only)",
            t.kind()
        );
    }
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * 4];
    t.f_copy_data_u8(&mut buf, numel)?;
    file.write_all(&buf)?;
    Ok(())
}

/// The next record, whatever its samples: their indices and the outputs.
fn read_any_record(
    file: &mut impl Read,
    layout: &Layout,
    device: Device,
) -> Result<(Vec<usize>, Vec<ModelOutput>)> {
    let mut word = [0u8; 8];
    file.read_exact(&mut word)
        .context("the file ends before this batch")?;
    let n = u64::from_le_bytes(word) as usize;
    let mut stored = vec![0u8; 8 * n];
    file.read_exact(&mut stored)
        .context("the file ends inside a batch")?;
    let indices: Vec<usize> = stored
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
        .collect();
    let n = n as i64;
    let mut out = Vec::with_capacity(layout.features.len());
    for shape in &layout.features {
        let logits = read_tensor(file, &layout.batch_logits(n), device)?;
        let features = match shape {
            Some((c, h, w)) => Some(read_tensor(file, &[n, *c, *h, *w], device)?),
            None => None,
        };
        out.push(ModelOutput { logits, features });
    }
    Ok((indices, out))
}

fn read_record(
    file: &mut impl Read,
    indices: &[usize],
    layout: &Layout,
    device: Device,
) -> Result<Vec<ModelOutput>> {
    let (stored, out) = read_any_record(file, layout, device)?;
    if stored.len() != indices.len() {
        bail!(
            "a batch of {} samples where this run has {}: the file was made for other batches",
            stored.len(),
            indices.len()
        );
    }
    if stored != indices {
        bail!(
            "its sample indices differ from this run's batch: the file was made for other batches"
        );
    }
    Ok(out)
}

fn read_tensor(file: &mut impl Read, shape: &[i64], device: Device) -> Result<Tensor> {
    let numel: i64 = shape.iter().product();
    let mut buf = vec![0u8; numel as usize * 4];
    file.read_exact(&mut buf)
        .context("the file ends inside a batch")?;
    Ok(Tensor::f_from_data_size(&buf, shape, Kind::Float)?.to_device(device))
}
