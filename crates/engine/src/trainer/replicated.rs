//! Data-parallel training of a strategy that learns or reads the whole batch (the agent in
//! every mode, MMKD, CA-MKD, AEKD, EBKD): [`Replicated`] runs it on every rank on the global
//! batch. Each rank gathers the batch's signals (and, after the step, its feedback) from all
//! ranks in batch order, gives them to its copy of the strategy, and keeps its own rows of the
//! weights. Every copy sees what the one-process strategy sees, in the same order, so its
//! weights, updates and state are those of one process (up to the student's own data-parallel
//! differences) and stay equal on every rank with no gradient of its own to all-reduce; the
//! price is the strategy's compute on the global batch on every rank, and the gathers
//! (docs/ARCHITECTURE.md, "Data-parallel training").

use std::rc::Rc;

use mtkd_dist::{all_gather_rows, all_reduce_f64, shard, Collective};
use mtkd_distill_core::error::{Error, Result};
use mtkd_distill_core::signals::{BatchSignals, LocationSignals, PixelInputs, StudentHead};
use mtkd_distill_core::weighting::{Feedback, StrategyState, TeacherWeights, WeightingStrategy};
use tch::Tensor;

/// A strategy replicated on every rank and fed the global batch.
pub(crate) struct Replicated {
    inner: Box<dyn WeightingStrategy>,
    comm: Rc<dyn Collective>,
    /// The global batch's signals and weights of the last `weights` call, for `observe`.
    last: Option<(BatchSignals, TeacherWeights, Vec<i64>)>,
}

fn dist_err(e: mtkd_dist::Error) -> Error {
    Error::Invalid {
        what: "data-parallel gather".into(),
        reason: e.to_string(),
    }
}

impl Replicated {
    pub(crate) fn new(inner: Box<dyn WeightingStrategy>, comm: Rc<dyn Collective>) -> Self {
        Replicated {
            inner,
            comm,
            last: None,
        }
    }

    /// Every rank's row count for a batch of which this rank holds `b` rows.
    fn rows(&self, b: i64) -> Result<Vec<i64>> {
        let mut counts = vec![0.0; self.comm.world()];
        counts[self.comm.rank()] = b as f64;
        all_reduce_f64(self.comm.as_ref(), &mut counts).map_err(dist_err)?;
        Ok(counts.into_iter().map(|c| c as i64).collect())
    }

    fn gather(&self, t: &Tensor, rows: &[i64]) -> Result<Tensor> {
        all_gather_rows(self.comm.as_ref(), t, rows).map_err(dist_err)
    }

    fn gather_opt(&self, t: &Option<Tensor>, rows: &[i64]) -> Result<Option<Tensor>> {
        t.as_ref().map(|t| self.gather(t, rows)).transpose()
    }

    fn gather_all(&self, ts: &[Tensor], rows: &[i64]) -> Result<Vec<Tensor>> {
        ts.iter().map(|t| self.gather(t, rows)).collect()
    }

    /// The global batch's signals from every rank's part.
    fn gather_signals(&self, s: &BatchSignals, rows: &[i64]) -> Result<BatchSignals> {
        let head = match &s.student_head {
            None => None,
            Some(h) => Some(StudentHead {
                embedding: self.gather(&h.embedding, rows)?,
                // The classifier is the same on every rank.
                weight: h.weight.shallow_clone(),
                bias: h.bias.as_ref().map(Tensor::shallow_clone),
                lr: h.lr,
                pixel_embedding: self.gather_opt(&h.pixel_embedding, rows)?,
            }),
        };
        let pixels = match &s.pixels {
            None => None,
            Some(p) => Some(PixelInputs {
                teacher_logits: self.gather_all(&p.teacher_logits, rows)?,
                student_logits: self.gather(&p.student_logits, rows)?,
                targets: self.gather(&p.targets, rows)?,
                ignore_index: p.ignore_index,
            }),
        };
        let locations = match &s.locations {
            None => None,
            Some(l) => {
                // The quiz loss is a mean over a rank's images: the global one weighs the
                // ranks by their rows.
                let total: i64 = rows.iter().sum();
                let mut q = [
                    l.quiz_loss.double_value(&[]) * rows[self.comm.rank()] as f64
                        / total.max(1) as f64,
                ];
                all_reduce_f64(self.comm.as_ref(), &mut q).map_err(dist_err)?;
                Some(LocationSignals {
                    ce: self.gather(&l.ce, rows)?,
                    kl: self.gather(&l.kl, rows)?,
                    entropy: self.gather(&l.entropy, rows)?,
                    credit: self.gather(&l.credit, rows)?,
                    quiz_loss: Tensor::from(q[0] as f32).to_device(l.quiz_loss.device()),
                    valid: self.gather(&l.valid, rows)?,
                    classes: self.gather(&l.classes, rows)?,
                })
            }
        };
        Ok(BatchSignals {
            ce: self.gather(&s.ce, rows)?,
            kl: self.gather(&s.kl, rows)?,
            cos: self.gather_opt(&s.cos, rows)?,
            entropy: self.gather(&s.entropy, rows)?,
            teacher_logits: self.gather_all(&s.teacher_logits, rows)?,
            teacher_embeddings: s
                .teacher_embeddings
                .iter()
                .map(|e| self.gather_opt(e, rows))
                .collect::<Result<_>>()?,
            student_logits: self.gather(&s.student_logits, rows)?,
            labels: self.gather(&s.labels, rows)?,
            temperature: s.temperature,
            student_head: head,
            labelled: self.gather_opt(&s.labelled, rows)?,
            pixels,
            locations,
        })
    }

    /// This rank's rows of the global batch's weights.
    fn mine(&self, w: &TeacherWeights, rows: &[i64]) -> TeacherWeights {
        let start: i64 = rows[..self.comm.rank()].iter().sum();
        let n = rows[self.comm.rank()];
        let take = |t: &Tensor| t.narrow(0, start, n);
        TeacherWeights {
            logit: take(&w.logit),
            feature: take(&w.feature),
            pixel: w.pixel.as_ref().map(take),
        }
    }
}

impl WeightingStrategy for Replicated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn uses_teachers(&self) -> bool {
        self.inner.uses_teachers()
    }
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let rows = self.rows(signals.batch_size())?;
        debug_assert_eq!(
            {
                let total: i64 = rows.iter().sum();
                let part = shard(total as usize, self.comm.rank(), self.comm.world());
                part.len() as i64
            },
            rows[self.comm.rank()]
        );
        let global = self.gather_signals(signals, &rows)?;
        let w = self.inner.weights(&global)?;
        let mine = self.mine(&w, &rows);
        self.last = Some((global, w, rows));
        Ok(mine)
    }
    fn wants_eval_ce(&self) -> bool {
        self.inner.wants_eval_ce()
    }
    fn wants_student_head(&self) -> bool {
        self.inner.wants_student_head()
    }
    fn wants_pixels(&self) -> bool {
        self.inner.wants_pixels()
    }
    fn wants_locations(&self) -> bool {
        self.inner.wants_locations()
    }
    fn observe(
        &mut self,
        _signals: &BatchSignals,
        _weights: &TeacherWeights,
        feedback: &Feedback,
    ) -> Result<()> {
        let Some((signals, weights, rows)) = self.last.take() else {
            return Ok(());
        };
        let eval_ce = match &feedback.eval_ce {
            None => None,
            Some((before, after)) => {
                Some((self.gather(before, &rows)?, self.gather(after, &rows)?))
            }
        };
        let global = Feedback {
            per_sample_loss: self.gather(&feedback.per_sample_loss, &rows)?,
            pre_step_ce: self.gather(&feedback.pre_step_ce, &rows)?,
            eval_ce,
            step: feedback.step,
        };
        self.inner.observe(&signals, &weights, &global)
    }
    fn retain_teachers(&mut self, keep: &[usize]) -> Result<()> {
        self.inner.retain_teachers(keep)
    }
    fn end_epoch(&mut self, epoch: usize) -> Result<()> {
        self.inner.end_epoch(epoch)
    }
    fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        self.inner.start_epoch(epoch)
    }
    fn buffered_bytes(&self) -> u64 {
        self.inner.buffered_bytes()
    }
    fn take_epoch_metrics(&mut self) -> Vec<(String, f64)> {
        self.inner.take_epoch_metrics()
    }
    fn save_state(&self) -> Result<StrategyState> {
        self.inner.save_state()
    }
    fn load_state(&mut self, state: &StrategyState) -> Result<()> {
        self.inner.load_state(state)
    }
}
