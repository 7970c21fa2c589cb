//! What a run keeps of the teachers' weights ([`WeightRecords`]: per-class means, the audit's
//! candidates, `weights.csv`) and who leaves the pool under `[distill.prune]`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use mtkd_vision_tasks::loader::Batch;

use super::pool::Pool;
use super::step::Distilled;
use crate::config::PruneConfig;
use crate::record::EpochRecord;

/// The weight records of a run, filled step by step.
#[derive(Default)]
pub(super) struct WeightRecords {
    /// Sums of logit and feature weights `[K, M]` (full pool order) and their counts `[K]`
    /// per class over the current epoch (logit: samples, or pixels or boxes when the strategy
    /// weights each; feature: samples).
    per_class: Option<(Tensor, Tensor, Tensor, Tensor)>,
    /// The last epoch's most disagreed-on training samples (for `audit.json`).
    pub(super) audit: Vec<crate::audit::Candidate>,
    /// `weights.csv` when `run.weight_log` is on.
    pub(super) weight_log: Option<std::io::BufWriter<std::fs::File>>,
}

impl WeightRecords {
    /// An epoch begins: the per-class sums and the audit start over.
    pub(super) fn start_epoch(&mut self) {
        self.per_class = None;
        self.audit.clear();
    }

    /// Record a distilled step: per-class sums, the audit's candidates in the last epoch
    /// (`at.2`), `weights.csv`. `at` is (epoch, global step, last epoch).
    pub(super) fn add(
        &mut self,
        d: &Distilled,
        batch: &Batch,
        num_classes: i64,
        active: &[usize],
        at: (usize, u64, bool),
    ) -> Result<()> {
        let (epoch, step, last) = at;
        // The signals' labels: the batch's, with the teachers' pseudo-classes for unlabelled
        // samples.
        // Segmentation: each pixel's class; detection: each location's box class (-1: none).
        let dense_classes = match (&d.signals.pixels, &d.signals.locations) {
            (Some(px), _) => Some(
                px.targets
                    .where_scalarother(&px.targets.ne(px.ignore_index), -1),
            ),
            (None, Some(loc)) => Some(loc.classes.shallow_clone()),
            _ => None,
        };
        self.per_class_and_log(
            &d.weights,
            &d.signals.labels,
            dense_classes.as_ref(),
            &batch.indices,
            num_classes,
            epoch,
            step,
        )?;
        if last {
            crate::audit::collect(
                &mut self.audit,
                &d.signals,
                &d.weights,
                active,
                &batch.indices,
            )?;
        }
        Ok(())
    }

    /// Per-class mean logit weights (for the heatmap) and the optional per-sample CSV log.
    #[allow(clippy::too_many_arguments)]
    fn per_class_and_log(
        &mut self,
        w: &mtkd_distill_core::weighting::TeacherWeights,
        labels: &Tensor,
        dense_classes: Option<&Tensor>,
        indices: &[usize],
        k: i64,
        epoch: usize,
        step: u64,
    ) -> Result<()> {
        let onehot = labels.onehot(k).to_kind(Kind::Double); // [B, K]
                                                             // Weights per pixel or location: the logit weights by the class of each pixel or box
                                                             // (its label, or the teachers' pseudo-label), not by the image's class.
        let (sums, counts) = match (&w.pixel, dense_classes) {
            (Some(px), Some(classes)) => {
                let m = px.size()[1];
                // [B, M, ...] -> [B, ..., M] -> [N, M], in the classes' order.
                let mut perm: Vec<i64> = vec![0];
                perm.extend(2..px.dim() as i64);
                perm.push(1);
                let rows = px
                    .permute(perm.as_slice())
                    .reshape([-1, m])
                    .to_kind(Kind::Double);
                let c = classes.reshape([-1]);
                let keep = c.ge(0).logical_and(&c.lt(k));
                let hot = c.clamp(0, k - 1).onehot(k).to_kind(Kind::Double)
                    * keep.to_kind(Kind::Double).unsqueeze(1); // [N, K]
                (
                    hot.transpose(0, 1).matmul(&rows),
                    hot.sum_dim_intlist(0, false, Kind::Double),
                )
            }
            _ => (
                onehot
                    .transpose(0, 1)
                    .matmul(&w.logit.to_kind(Kind::Double)), // [K, M]
                onehot.sum_dim_intlist(0, false, Kind::Double), // [K]
            ),
        };
        let fsums = onehot
            .transpose(0, 1)
            .matmul(&w.feature.to_kind(Kind::Double)); // [K, M]
        let fcounts = onehot.sum_dim_intlist(0, false, Kind::Double); // [K]
        match &mut self.per_class {
            Some((s, f, c, fc)) => {
                *s += sums;
                *f += fsums;
                *c += counts;
                *fc += fcounts;
            }
            None => self.per_class = Some((sums, fsums, counts, fcounts)),
        }
        if let Some(log) = &mut self.weight_log {
            let m = w.logit.size()[1] as usize;
            let wl = Vec::<f32>::try_from(&w.logit.to_device(Device::Cpu).flatten(0, -1))?;
            let wf = Vec::<f32>::try_from(&w.feature.to_device(Device::Cpu).flatten(0, -1))?;
            let lab = Vec::<i64>::try_from(&labels.to_device(Device::Cpu))?;
            for (b, idx) in indices.iter().enumerate() {
                let mut line = format!("{},{step},{idx},{}", epoch + 1, lab[b]);
                for v in wl[b * m..(b + 1) * m].iter().chain(&wf[b * m..(b + 1) * m]) {
                    line.push_str(&format!(",{v:.6}"));
                }
                writeln!(log, "{line}").context("writing weights.csv")?;
            }
        }
        Ok(())
    }

    /// The epoch's per-class mean weights into its record (`m` teachers in the pool).
    pub(super) fn class_weights_into(&self, rec: &mut EpochRecord, m: usize) -> Result<()> {
        if let Some((sums, fsums, counts, fcounts)) = &self.per_class {
            let m = m.max(1);
            // A class with no samples (no pixel, box or image of it this epoch; e.g. background
            // for the per-image feature weights of a segmentation run) has no mean: NaN, which
            // the records write as null and the report shows as n/a.
            let grid = |t: &Tensor, counts: &Tensor| -> Result<Vec<Vec<f64>>> {
                let c = counts.unsqueeze(1);
                let mean = (t / c.clamp_min(1.0)).where_self(&c.gt(0.0), &t.full_like(f64::NAN));
                let v: Vec<f64> = Vec::try_from(&mean.to_device(Device::Cpu).flatten(0, -1))?;
                Ok(v.chunks(m).map(<[f64]>::to_vec).collect())
            };
            rec.class_weights = grid(sums, counts)?;
            rec.class_feature_weights = grid(fsums, fcounts)?;
        }
        Ok(())
    }

    /// Flush and sync `weights.csv` (at each checkpoint and at the end).
    pub(super) fn sync_weight_log(&mut self) -> Result<()> {
        if let Some(log) = &mut self.weight_log {
            log.flush()
                .and_then(|()| log.get_ref().sync_data())
                .context("writing weights.csv")?;
        }
        Ok(())
    }
}

/// Open `weights.csv` in `dir` for appending, keeping only the lines of the `done` completed
/// epochs (a resumed run replays the interrupted epoch, so its partial lines go).
pub(super) fn open_weight_log(
    dir: &Path,
    pool: &Pool,
    done: usize,
) -> Result<std::io::BufWriter<std::fs::File>> {
    let path = dir.join("weights.csv");
    let mut header = "epoch,step,index,label".to_owned();
    for kind in ["logit", "feature"] {
        for name in pool.names() {
            header.push_str(&format!(",{kind}:{name}"));
        }
    }
    let mut kept = header + "\n";
    if let Ok(old) = std::fs::read_to_string(&path) {
        for line in old.lines().skip(1) {
            let epoch: usize = line
                .split(',')
                .next()
                .and_then(|e| e.parse().ok())
                .unwrap_or(usize::MAX);
            if epoch <= done {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    crate::fsio::write_atomic(&path, kept.as_bytes())?;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(std::io::BufWriter::new(f))
}

/// `[distill.prune]` after an epoch: count the epochs each active teacher spent under the
/// threshold and return those past their patience as (mean weight, pool position), lowest
/// weight first, never leaving fewer than `min_teachers`.
pub(super) fn leaving(pool: &mut Pool, p: &PruneConfig, rec: &EpochRecord) -> Vec<(f64, usize)> {
    let mut leaving = Vec::new();
    for &i in &pool.active {
        let w = rec.teacher_weights.get(i).copied().unwrap_or(f64::NAN);
        if w < p.threshold {
            pool.prune_counts[i] += 1;
        } else {
            pool.prune_counts[i] = 0;
        }
        if pool.prune_counts[i] >= p.patience {
            leaving.push((w, i));
        }
    }
    leaving.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let room = pool.active.len().saturating_sub(p.min_teachers);
    leaving.truncate(room);
    leaving
}
