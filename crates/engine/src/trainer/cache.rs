//! The teachers' outputs kept across epochs (`distill.output_cache_mb`).
//!
//! Teachers are frozen and run in eval mode, so a sample whose image is the same every epoch
//! (`data.augment` off, checked with the config) gets the same outputs every epoch. The cache
//! holds, per pool teacher, a `[N, ...]` tensor of logits and, with feature KD, one of feature
//! maps, for the `N` training samples, filled by the first epoch's forward passes and read by
//! index from then on. A batch with any sample not yet stored runs the teachers on the whole
//! batch (and stores it), so what the step sees is always what the teachers computed for that
//! image. The cache lives in memory only: a resumed run fills it again in its first epoch.

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::ModelOutput;
use mtkd_vision_tasks::loader::Batch;

use super::pool::Pool;
use super::source::TeacherSource;
use crate::shared::Layout;

/// Per-teacher stored outputs of every training sample.
pub(super) struct OutputCache {
    /// Per pool teacher: logits `[N, ...]`.
    logits: Vec<Tensor>,
    /// Per pool teacher: feature maps `[N, C, H, W]` when the run uses them.
    features: Vec<Option<Tensor>>,
    /// Per pool teacher, per sample: stored yet.
    filled: Vec<Vec<bool>>,
    /// Batches served from the cache and batches that ran the teachers, this epoch.
    hits: u64,
    misses: u64,
}

impl OutputCache {
    /// Bytes the cache needs for `samples` samples of `layout` (float32).
    pub(super) fn bytes_needed(samples: usize, layout: &Layout) -> u64 {
        let logits: i64 = layout.logits.iter().product();
        let per_sample: i64 = layout
            .features
            .iter()
            .map(|f| logits + f.map(|(c, h, w)| c * h * w).unwrap_or(0))
            .sum();
        samples as u64 * per_sample as u64 * 4
    }

    /// A cache for `samples` samples, refused with a message naming the setting when it needs
    /// more than `limit_mb`.
    pub(super) fn new(
        samples: usize,
        layout: &Layout,
        limit_mb: usize,
        device: Device,
    ) -> Result<OutputCache> {
        let need = Self::bytes_needed(samples, layout);
        let need_mb = need.div_ceil(1 << 20);
        if need_mb > limit_mb as u64 {
            bail!(
                "distill.output_cache_mb = {limit_mb} is too small: the teachers' outputs for the \
                 {samples} training samples take {need_mb} MB (logits{}); raise it or set it to 0",
                if layout.features.iter().any(Option::is_some) {
                    " and feature maps"
                } else {
                    ""
                }
            );
        }
        let n = samples as i64;
        let opts = (Kind::Float, device);
        let logits = layout
            .features
            .iter()
            .map(|_| {
                let shape: Vec<i64> = std::iter::once(n)
                    .chain(layout.logits.iter().copied())
                    .collect();
                Tensor::f_empty(shape, opts)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| format!("allocating the teacher output cache ({need_mb} MB)"))?;
        let features = layout
            .features
            .iter()
            .map(|f| {
                f.map(|(c, h, w)| Tensor::f_empty([n, c, h, w], opts))
                    .transpose()
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| format!("allocating the teacher output cache ({need_mb} MB)"))?;
        tracing::info!(
            samples,
            mb = need_mb,
            "teacher outputs are kept across epochs"
        );
        Ok(OutputCache {
            filled: vec![vec![false; samples]; logits.len()],
            logits,
            features,
            hits: 0,
            misses: 0,
        })
    }

    /// The outputs of the teachers at `active` (pool positions, in that order) for the samples
    /// `indices`: read from the cache when every sample is stored for every one of them, else
    /// computed by `compute` (given the teachers to run) and stored.
    pub(super) fn outputs(
        &mut self,
        active: &[usize],
        indices: &[usize],
        compute: impl FnOnce(&[usize]) -> Result<Vec<ModelOutput>>,
    ) -> Result<Vec<ModelOutput>> {
        let n = self.filled.first().map(Vec::len).unwrap_or(0);
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            bail!("teacher output cache: sample index {bad} is outside the {n} training samples");
        }
        let missing: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&t| indices.iter().any(|&i| !self.filled[t][i]))
            .collect();
        let device = self
            .logits
            .first()
            .map(Tensor::device)
            .unwrap_or(Device::Cpu);
        let index = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(device);
        let mut computed: Vec<Option<ModelOutput>> = (0..self.logits.len()).map(|_| None).collect();
        if !missing.is_empty() {
            self.misses += 1;
            let outs = compute(&missing)?;
            for (&t, o) in missing.iter().zip(outs) {
                let _ = self.logits[t].f_index_copy_(0, &index, &o.logits.to_kind(Kind::Float))?;
                if let (Some(store), Some(f)) = (&mut self.features[t], &o.features) {
                    let _ = store.f_index_copy_(0, &index, &f.to_kind(Kind::Float))?;
                }
                for &i in indices {
                    self.filled[t][i] = true;
                }
                computed[t] = Some(o);
            }
        } else {
            self.hits += 1;
        }
        active
            .iter()
            .map(|&t| match computed[t].take() {
                Some(o) => Ok(o),
                None => Ok(ModelOutput {
                    logits: self.logits[t].f_index_select(0, &index)?,
                    features: self.features[t]
                        .as_ref()
                        .map(|f| f.f_index_select(0, &index))
                        .transpose()?,
                }),
            })
            .collect()
    }

    /// This epoch's counts, then zero.
    pub(super) fn take_counts(&mut self) -> (u64, u64) {
        let c = (self.hits, self.misses);
        self.hits = 0;
        self.misses = 0;
        c
    }
}

impl TeacherSource for OutputCache {
    fn outputs(&mut self, pool: &Pool, batch: &Batch) -> Result<Vec<ModelOutput>> {
        OutputCache::outputs(self, &pool.active, &batch.indices, |which| {
            pool.run(which, &batch.images)
        })
    }

    fn end_epoch(&mut self, epoch: usize) -> Result<Option<u64>> {
        let (hits, misses) = self.take_counts();
        tracing::info!(
            epoch = epoch + 1,
            hits,
            misses,
            "teacher output cache (batches)"
        );
        Ok(Some(hits))
    }
}
