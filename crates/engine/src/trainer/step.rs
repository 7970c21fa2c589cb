//! One optimizer step ([`DistillStep`]): the student's forward pass and task loss, the teachers'
//! outputs from the run's [`TeacherSource`], the [`Distiller`]'s terms, the non-finite check,
//! the update and the strategy's feedback. The loop, `mtkd bench-steps` and, later,
//! data-parallel ranks drive this same step; what it applied comes back as a [`StepOutcome`]
//! and the loop keeps the records.

use std::time::Instant;

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::loss;
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::weighting::{Feedback, TeacherWeights};
use mtkd_student::Network;
use mtkd_vision_tasks::loader::Batch;
use mtkd_vision_tasks::task::Task;

use super::distiller::{Distiller, Terms};
use super::evaluate::Sums;
use super::pool::Pool;
use super::source::TeacherSource;
use crate::optim::Sgd;

/// What a step did.
pub(crate) enum StepOutcome {
    /// The update was applied; with distillation, what the records keep of it.
    Applied(Option<Distilled>),
    /// The loss was not finite (the message names what): nothing was applied, and BatchNorm's
    /// running statistics were put back when `restore_buffers` asked for it.
    NonFinite(String),
}

/// The teachers' part of an applied step, for the run's records.
pub(crate) struct Distilled {
    /// The weights spread over the full pool `[B, M]` (0 for a pruned teacher), detached.
    pub(crate) weights: TeacherWeights,
    pub(crate) signals: BatchSignals,
}

/// The student, its optimizer, the teacher pool with its source of outputs, and the distiller.
pub(crate) struct DistillStep {
    pub(crate) task: Box<dyn Task>,
    pub(crate) device: Device,
    pub(crate) student_vs: VarStore,
    pub(crate) student: Network,
    pub(crate) opt: Sgd,
    pub(crate) pool: Pool,
    pub(crate) distiller: Distiller,
    pub(crate) source: Box<dyn TeacherSource>,
    /// The non-trainable variables of the student and the adapters (BatchNorm's running
    /// statistics), shallow handles: put back after a skipped batch.
    pub(crate) buffers: Vec<Tensor>,
    /// Copy the buffers before each step, to put them back when the loss is not finite
    /// (`train.on_nonfinite = "skip"`).
    pub(crate) restore_buffers: bool,
}

impl DistillStep {
    /// One optimizer step on `batch` (`epoch` 0-based, `step` the run's global step).
    pub(crate) fn run(
        &mut self,
        batch: &Batch,
        sums: &mut Sums,
        epoch: usize,
        step: u64,
    ) -> Result<StepOutcome> {
        // A skipped batch must leave no trace: BatchNorm's running statistics, updated by the
        // training-mode forward, are put back when the batch is skipped.
        let saved: Option<Vec<Tensor>> = self
            .restore_buffers
            .then(|| self.buffers.iter().map(Tensor::copy).collect());
        let targets = self.task.targets(batch)?;
        let out = self.student.forward_t(&batch.images, true);
        let ce = self.task.loss(&out.logits, &targets)?;
        let terms = if self.distiller.settings().is_some() {
            let t0 = Instant::now();
            let teachers = self.source.outputs(&self.pool, batch)?;
            sums.teacher_seconds += t0.elapsed().as_secs_f64();
            let head = self
                .distiller
                .student_head(&self.student, &out, self.opt.lr)?;
            Some(self.distiller.terms(
                self.task.as_ref(),
                &out,
                &ce,
                &targets,
                &batch.labels,
                teachers,
                &self.pool.active,
                head,
                sums,
                (epoch, step),
            )?)
        } else {
            None
        };
        let loss = match &terms {
            Some(t) => t.total.mean(Kind::Float),
            None => ce.mean(Kind::Float),
        };
        // One check per step; the diagnosis runs only when it fails.
        if loss::ensure_finite("loss", &loss).is_err() {
            if let Some(saved) = saved {
                tch::no_grad(|| {
                    for (var, copy) in self.buffers.iter_mut().zip(&saved) {
                        var.copy_(copy);
                    }
                });
            }
            return Ok(StepOutcome::NonFinite(self.diagnose(&ce, terms.as_ref())));
        }
        let reward = terms.is_some() && self.distiller.strategy.wants_eval_ce();
        let eval_before = if reward {
            Some(self.eval_ce(&batch.images, &targets, sums)?)
        } else {
            None
        };
        self.opt.zero_grad();
        loss.backward();
        self.opt.step();
        let correct = self
            .task
            .train_score(&out.logits.detach(), &targets)?
            .sum(Kind::Double);
        let Some(terms) = terms else {
            sums.add(
                batch.indices.len() as i64,
                &loss.detach(),
                &ce.detach(),
                None,
                &correct,
            );
            return Ok(StepOutcome::Applied(None));
        };
        let full = self.pool.to_full(&terms.weights, self.device)?;
        sums.add(
            batch.indices.len() as i64,
            &loss.detach(),
            &ce.detach(),
            Some((&terms, &full)),
            &correct,
        );
        let eval_ce = match eval_before {
            Some(before) => Some((before, self.eval_ce(&batch.images, &targets, sums)?)),
            None => None,
        };
        let t5 = Instant::now();
        let feedback = Feedback {
            per_sample_loss: terms.total.detach(),
            pre_step_ce: ce.detach(),
            eval_ce,
            step,
        };
        self.distiller.observe(&terms, &feedback, (epoch, step))?;
        sums.strategy_seconds += t5.elapsed().as_secs_f64();
        Ok(StepOutcome::Applied(Some(Distilled {
            weights: full,
            signals: terms.signals,
        })))
    }

    /// Keep only the teachers at `active` (full pool positions, increasing); the strategy
    /// drops the others from its state.
    pub(crate) fn set_active(&mut self, active: Vec<usize>) -> Result<()> {
        let pool = &mut self.pool;
        if active.is_empty() || active.iter().any(|&i| i >= pool.len()) {
            anyhow::bail!(
                "the checkpoint's active teachers {active:?} do not fit a pool of {}",
                pool.len()
            );
        }
        let keep: Vec<usize> = active
            .iter()
            .map(|i| pool.active.iter().position(|a| a == i))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("a pruned teacher cannot come back to the pool"))?;
        let strategy = &mut self.distiller.strategy;
        strategy
            .retain_teachers(&keep)
            .with_context(|| format!("strategy `{}`", strategy.name()))?;
        pool.active = active;
        Ok(())
    }

    /// The task loss of the student in eval mode (the clean and meta agents' reward).
    fn eval_ce(&self, images: &Tensor, targets: &Tensor, sums: &mut Sums) -> Result<Tensor> {
        let t = Instant::now();
        let out = tch::no_grad(|| self.student.forward_t(images, false));
        let ce = self.task.loss(&out.logits, targets)?;
        sums.reward_seconds += t.elapsed().as_secs_f64();
        Ok(ce)
    }

    /// What made the loss non-finite: a teacher's logits, the strategy's weights, or a term.
    fn diagnose(&self, ce: &Tensor, terms: Option<&Terms>) -> String {
        let bad = |t: &Tensor| loss::ensure_finite("", t).is_err();
        if let Some(terms) = terms {
            for (&i, t) in self.pool.active.iter().zip(&terms.teachers) {
                if bad(&t.logits) {
                    return format!(
                        "the logits of teacher `{}`",
                        self.pool.members[i].teacher.name()
                    );
                }
            }
            if bad(&terms.weights.logit) || bad(&terms.weights.feature) {
                return format!(
                    "the weights of strategy `{}`",
                    self.distiller.strategy.name()
                );
            }
        }
        if bad(ce) {
            "the cross-entropy term".to_owned()
        } else if terms.is_some_and(|t| bad(&t.kd)) {
            "the KD term".to_owned()
        } else {
            "the feature term".to_owned()
        }
    }
}
