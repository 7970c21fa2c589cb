//! A seeded, shuffling batch loader. A producer thread decodes, augments and normalises the next
//! batches while libtorch trains on the current one, so both cores stay busy.
//!
//! Randomness is counter-based: the epoch's order comes from `(seed, epoch)` and each sample's
//! augmentation from `(seed, epoch, sample index)`. Any batch of any epoch can therefore be
//! reproduced without stored RNG state, which is what makes an interrupted run resume exactly.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::data::{Annotations, ImageSet};
use crate::error::{Error, Result};
use crate::transform::{self, Augment, EvalResize, Normalize};

/// How batches are made.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub augment: Option<Augment>,
    pub eval_resize: Option<EvalResize>,
    pub normalize: Normalize,
    pub seed: u64,
}

/// One batch, on the requested device.
///
/// # Shapes
/// `images [B, C, H, W]` float, `labels [B]` int64; the targets as [`BatchTargets`] says.
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    /// The task's targets beyond the labels.
    pub targets: BatchTargets,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
    /// Which samples carry their label `[B]` bool; `None` when the set labels every sample.
    /// An unlabelled sample's label and targets are placeholders
    /// ([`crate::data::ImageSet::labelled`]).
    pub labelled: Option<Tensor>,
    /// The size of the global batch this batch is a rank's part of ([`BatchLoader::sharded`]);
    /// the batch's own size when the loader is not sharded.
    pub global_len: usize,
    /// How many samples of the global batch carry their label (`global_len` when the set
    /// labels every sample): the task loss of a rank's part is averaged over them.
    pub global_labelled: usize,
}

impl Batch {
    /// How many of the batch's samples carry their label.
    pub fn labelled_count(&self) -> i64 {
        match &self.labelled {
            Some(l) => l.sum(Kind::Int64).int64_value(&[]),
            None => self.indices.len() as i64,
        }
    }
}

/// A batch's targets beyond its labels: each task's own (the batch form of
/// [`crate::data::Annotations`]).
#[derive(Debug)]
pub enum BatchTargets {
    /// Classification: the labels are the targets.
    Classes,
    /// Segmentation: the masks `[B, H, W]` int64, transformed with the images
    /// (`segmentation::IGNORE` where not labelled).
    Masks(Tensor),
    /// Detection: the objects `[B, N, 6]` (`x1, y1, x2, y2, class, area`, class `-1` for
    /// padding), flipped with the images.
    Objects(Tensor),
}

impl BatchTargets {
    /// Segmentation's masks, `None` for the other tasks.
    pub fn masks(&self) -> Option<&Tensor> {
        match self {
            BatchTargets::Masks(m) => Some(m),
            _ => None,
        }
    }

    /// Detection's objects, `None` for the other tasks.
    pub fn objects(&self) -> Option<&Tensor> {
        match self {
            BatchTargets::Objects(o) => Some(o),
            _ => None,
        }
    }
}

/// [`BatchTargets`] on the loader's thread, before they go to the device.
enum CpuTargets {
    Classes,
    Masks(Vec<i64>),
    Objects(Tensor),
}

struct CpuBatch {
    pixels: Vec<f32>,
    labels: Vec<i64>,
    targets: CpuTargets,
    indices: Vec<usize>,
    labelled: Option<Vec<bool>>,
    global_len: usize,
    global_labelled: usize,
}

/// Splits a dataset into batches, epoch after epoch.
#[derive(Debug, Clone)]
pub struct BatchLoader {
    set: Arc<ImageSet>,
    cfg: LoaderConfig,
    out_hw: (usize, usize),
    /// `(rank, world)`: each batch is this rank's contiguous part of the global batch.
    shard: (usize, usize),
}

/// SplitMix64 finaliser: decorrelates the counters that seed per-sample generators.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl BatchLoader {
    pub fn new(set: Arc<ImageSet>, cfg: LoaderConfig) -> Result<BatchLoader> {
        if cfg.batch_size == 0 {
            return Err(Error::Invalid {
                what: "batch_size".into(),
                reason: "must be at least 1".into(),
            });
        }
        if set.is_empty() {
            return Err(Error::Invalid {
                what: "dataset".into(),
                reason: "has no samples".into(),
            });
        }
        let (c, h, w) = set.image_shape();
        cfg.normalize.check(c).map_err(|reason| Error::Invalid {
            what: "normalisation".into(),
            reason,
        })?;
        let out_hw = transform::output_size((h, w), cfg.augment.as_ref(), cfg.eval_resize.as_ref());
        // The task's rules (config::check applies the same ones to the [data] section).
        if let Err((what, reason)) = set
            .annotations
            .task()
            .check_transforms(cfg.augment.as_ref(), cfg.eval_resize.as_ref())
        {
            return Err(Error::Invalid {
                what: what.into(),
                reason,
            });
        }
        Ok(BatchLoader {
            set,
            cfg,
            out_hw,
            shard: (0, 1),
        })
    }

    /// Data-parallel loading: every batch becomes rank `rank`'s contiguous part of the global
    /// batch of `batch_size` samples ([`mtkd_dist::shard`]), so that the ranks' parts, in rank
    /// order, are the one-process batch with the same augmentation. A global batch with fewer
    /// samples than ranks (an epoch's last) is left out on every rank.
    pub fn sharded(mut self, rank: usize, world: usize) -> BatchLoader {
        self.shard = (rank, world.max(1));
        self
    }

    pub fn dataset(&self) -> &ImageSet {
        &self.set
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.set.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// `(C, H, W)` of the batches' images.
    pub fn output_shape(&self) -> (usize, usize, usize) {
        (self.set.image_shape().0, self.out_hw.0, self.out_hw.1)
    }

    /// The sample order of an epoch.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.set.len()).collect();
        if self.cfg.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(self.cfg.seed ^ mix(epoch)));
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// Iterate over the batches of `epoch`, starting at batch `start` (for resuming).
    pub fn epoch(&self, epoch: u64, start: usize, device: Device) -> EpochIter {
        let order = self.order(epoch);
        let bs = self.cfg.batch_size;
        let total = self.num_batches();
        let (tx, rx) = sync_channel::<CpuBatch>(3);
        let set = Arc::clone(&self.set);
        let cfg = self.cfg.clone();
        let (oh, ow) = self.out_hw;
        let (rank, world) = self.shard;
        let handle = std::thread::spawn(move || {
            let c = set.image_shape().0;
            let per = c * oh * ow;
            for b in start..total {
                let global = &order[b * bs..((b + 1) * bs).min(order.len())];
                if global.len() < world {
                    continue;
                }
                let idx: Vec<usize> = global[mtkd_dist::shard(global.len(), rank, world)].to_vec();
                let global_len = global.len();
                let global_labelled = set
                    .labelled
                    .as_ref()
                    .map_or(global_len, |l| global.iter().filter(|&&i| l[i]).count());
                let mut pixels = vec![0f32; idx.len() * per];
                let mut labels = Vec::with_capacity(idx.len());
                let mut masks = match set.annotations {
                    Annotations::Masks(_) => vec![0i64; idx.len() * oh * ow],
                    _ => Vec::new(),
                };
                let mut objects: Vec<Vec<crate::objects::Object>> = Vec::new();
                for (k, &i) in idx.iter().enumerate() {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(mix(cfg.seed ^ mix(epoch ^ mix(i as u64))));
                    let dst = &mut pixels[k * per..(k + 1) * per];
                    let image = set.images.index_axis(ndarray::Axis(0), i);
                    match &set.annotations {
                        Annotations::Objects(all) => {
                            // Detection: the image as it is, or flipped with its boxes.
                            let flip =
                                cfg.augment.as_ref().is_some_and(|a| a.hflip) && rng.gen_bool(0.5);
                            transform::apply(image, None, None, &mut rng, dst);
                            let mut objs = all[i].clone();
                            if flip {
                                for row in dst.chunks_mut(ow) {
                                    row.reverse();
                                }
                                for o in &mut objs {
                                    let [x1, y1, x2, y2] = o.bbox;
                                    o.bbox = [ow as f32 - x2, y1, ow as f32 - x1, y2];
                                }
                            }
                            objects.push(objs);
                        }
                        Annotations::Masks(m) => transform::apply_joint(
                            image,
                            m.index_axis(ndarray::Axis(0), i),
                            cfg.augment.as_ref(),
                            crate::segmentation::IGNORE,
                            &mut rng,
                            dst,
                            &mut masks[k * oh * ow..(k + 1) * oh * ow],
                        ),
                        Annotations::Classes => transform::apply(
                            image,
                            cfg.augment.as_ref(),
                            cfg.eval_resize.as_ref(),
                            &mut rng,
                            dst,
                        ),
                    }
                    transform::normalize(dst, &cfg.normalize, oh * ow);
                    labels.push(set.labels[i]);
                }
                let targets = match set.annotations {
                    Annotations::Classes => CpuTargets::Classes,
                    Annotations::Masks(_) => CpuTargets::Masks(masks),
                    Annotations::Objects(_) => {
                        let refs: Vec<&[crate::objects::Object]> =
                            objects.iter().map(Vec::as_slice).collect();
                        CpuTargets::Objects(crate::objects::pack_objects(&refs))
                    }
                };
                let labelled = set
                    .labelled
                    .as_ref()
                    .map(|l| idx.iter().map(|&i| l[i]).collect());
                if tx
                    .send(CpuBatch {
                        pixels,
                        labels,
                        targets,
                        indices: idx,
                        labelled,
                        global_len,
                        global_labelled,
                    })
                    .is_err()
                {
                    return; // the consumer stopped early
                }
            }
        });
        EpochIter {
            rx: Some(rx),
            handle: Some(handle),
            shape: (self.set.image_shape().0 as i64, oh as i64, ow as i64),
            device,
        }
    }
}

/// Batches of one epoch; dropping it stops the producer.
pub struct EpochIter {
    rx: Option<Receiver<CpuBatch>>,
    handle: Option<JoinHandle<()>>,
    shape: (i64, i64, i64),
    device: Device,
}

impl std::fmt::Debug for EpochIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochIter")
            .field("shape", &self.shape)
            .finish()
    }
}

impl Iterator for EpochIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        let cpu = self.rx.as_ref()?.recv().ok()?;
        let b = cpu.labels.len() as i64;
        let (c, h, w) = self.shape;
        let images = Tensor::from_slice(&cpu.pixels)
            .view([b, c, h, w])
            .to_device(self.device);
        let labels = Tensor::from_slice(&cpu.labels)
            .to_kind(Kind::Int64)
            .to_device(self.device);
        let targets = match cpu.targets {
            CpuTargets::Classes => BatchTargets::Classes,
            CpuTargets::Masks(m) => BatchTargets::Masks(
                Tensor::from_slice(&m)
                    .view([b, h, w])
                    .to_device(self.device),
            ),
            CpuTargets::Objects(o) => BatchTargets::Objects(o.to_device(self.device)),
        };
        let labelled = cpu
            .labelled
            .map(|l| Tensor::from_slice(&l).to_device(self.device));
        Some(Batch {
            images,
            labels,
            targets,
            indices: cpu.indices,
            labelled,
            global_len: cpu.global_len,
            global_labelled: cpu.global_labelled,
        })
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
