//! Where a training batch's teacher outputs come from: one [`TeacherSource`] trait, chosen once
//! per run, implemented by the live pool ([`Live`]: the teachers run on the batch), the
//! in-memory cache across epochs ([`super::cache::OutputCache`], `distill.output_cache_mb`) and
//! the shared outputs on disk ([`Shared`], `mtkd train --teacher-outputs`).
//!
//! Every source hands the step the outputs of the pool's *active* teachers, in pool order, as
//! the teachers computed them for that image: the step cannot tell the sources apart (the
//! engine tests check that the three give identical runs).

use std::path::PathBuf;

use anyhow::{Context, Result};

use mtkd_distill_core::ModelOutput;
use mtkd_vision_tasks::loader::Batch;

use super::pool::Pool;
use crate::shared::{EpochOutputs, Layout};

/// A source of the active teachers' outputs for training batches.
pub(crate) trait TeacherSource {
    /// An epoch (0-based) begins; `layout` is what a record of the whole pool holds.
    fn start_epoch(&mut self, _epoch: usize, _layout: &Layout) -> Result<()> {
        Ok(())
    }
    /// The outputs of `pool`'s active teachers on `batch`, in pool order.
    fn outputs(&mut self, pool: &Pool, batch: &Batch) -> Result<Vec<ModelOutput>>;
    /// The epoch ends: a source that serves batches without running the teachers says how
    /// many it served (the record's `cached_batches`).
    fn end_epoch(&mut self, _epoch: usize) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// The teachers run on every batch.
#[derive(Debug, Default)]
pub(crate) struct Live;

impl TeacherSource for Live {
    fn outputs(&mut self, pool: &Pool, batch: &Batch) -> Result<Vec<ModelOutput>> {
        pool.run(&pool.active, &batch.images)
    }
}

/// The teachers' outputs of this run's batches, stored under a key folder
/// ([`crate::shared`]): read when another run stored them, else computed and written.
/// Records hold the whole pool; a pruned teacher's column is dropped here.
/// Data-parallel ranks (`part` = `(rank, world)`) read their rows of complete files and write
/// none.
pub(crate) struct Shared {
    dir: PathBuf,
    epoch: Option<EpochOutputs>,
    part: Option<(usize, usize)>,
}

impl Shared {
    pub(crate) fn new(dir: PathBuf, part: Option<(usize, usize)>) -> Shared {
        Shared {
            dir,
            epoch: None,
            part,
        }
    }
}

impl TeacherSource for Shared {
    fn start_epoch(&mut self, epoch: usize, layout: &Layout) -> Result<()> {
        self.epoch = Some(EpochOutputs::open(&self.dir, epoch, layout.clone())?);
        Ok(())
    }

    fn outputs(&mut self, pool: &Pool, batch: &Batch) -> Result<Vec<ModelOutput>> {
        let file = self
            .epoch
            .as_mut()
            .context("shared teacher outputs read outside an epoch")?;
        let all = match self.part {
            Some(part) => file.batch_part(&batch.indices, part, batch.images.device())?,
            None => file.batch(&batch.indices, batch.images.device(), || {
                pool.run(&pool.all(), &batch.images)
            })?,
        };
        if pool.active.len() == all.len() {
            return Ok(all);
        }
        Ok(all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| pool.active.contains(i))
            .map(|(_, o)| o)
            .collect())
    }

    fn end_epoch(&mut self, _epoch: usize) -> Result<Option<u64>> {
        if let Some(file) = self.epoch.take() {
            file.finish(self.part.map_or(1, |(_, world)| world))?;
        }
        Ok(None)
    }
}
