//! The weighting-strategy interface: per batch, a strategy turns the teachers' signals into
//! per-sample, per-teacher weights for the logit (KD) and feature losses. The simple strategies
//! live here; the MTKD-RL agent (mtkd-rl-weighting) implements the same trait.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::signals::BatchSignals;

/// Weights for one batch.
///
/// # Shapes
/// `logit` and `feature` are `[B, M]`; a row usually sums to 1 (a strategy may say otherwise).
#[derive(Debug)]
pub struct TeacherWeights {
    pub logit: Tensor,
    pub feature: Tensor,
}

impl TeacherWeights {
    /// The same weights for every sample: `row` has M entries.
    pub fn broadcast(row: &[f64], batch: i64, device: tch::Device) -> TeacherWeights {
        let w = Tensor::from_slice(row)
            .to_kind(Kind::Float)
            .to_device(device)
            .unsqueeze(0)
            .expand([batch, row.len() as i64], true)
            .contiguous();
        TeacherWeights {
            feature: w.copy(),
            logit: w,
        }
    }
}

/// A rule that weights the teachers, per sample.
pub trait WeightingStrategy {
    /// Name used in metrics, summaries and the comparison table.
    fn name(&self) -> &str;

    /// Whether the student learns from teachers at all (false only for "no distillation").
    fn uses_teachers(&self) -> bool {
        true
    }

    /// Weights for the batch whose signals are given; no gradient flows through them.
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights>;

    /// Whether [`Feedback::eval_ce`] is wanted now (costs two extra student forwards per step).
    fn wants_eval_ce(&self) -> bool {
        false
    }

    /// Whether the strategy reads [`BatchSignals::student_head`] (the engine fills it only then).
    fn wants_student_head(&self) -> bool {
        false
    }

    /// Feedback after the optimizer step: what the weights led to. Learning strategies (the
    /// agent) use it; the default ignores it.
    fn observe(
        &mut self,
        _signals: &BatchSignals,
        _weights: &TeacherWeights,
        _feedback: &Feedback,
    ) -> Result<()> {
        Ok(())
    }

    /// Called once at the end of every epoch (`epoch` counts from 0), before the checkpoint.
    fn end_epoch(&mut self, _epoch: usize) -> Result<()> {
        Ok(())
    }

    /// Called at the start of every epoch (`epoch` counts from 0; also after a resume).
    fn start_epoch(&mut self, _epoch: usize) -> Result<()> {
        Ok(())
    }

    /// Scalar diagnostics accumulated since the last call (for the epoch's metrics line),
    /// e.g. agent loss, reward statistics, mix coefficients. Draining: the strategy resets them.
    fn take_epoch_metrics(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// The strategy's learnable and bookkeeping state, for checkpoints.
    fn save_state(&self) -> Result<StrategyState> {
        Ok(StrategyState::default())
    }

    /// Restore what [`WeightingStrategy::save_state`] returned.
    fn load_state(&mut self, _state: &StrategyState) -> Result<()> {
        Ok(())
    }
}

/// What a step's weights led to.
///
/// # Shapes
/// all `[B]`, detached
#[derive(Debug)]
pub struct Feedback {
    /// The student's per-sample training loss of the step (before the update).
    pub per_sample_loss: Tensor,
    /// The student's per-sample cross-entropy before the update (training-mode forward).
    pub pre_step_ce: Tensor,
    /// `(before, after)`: the student's per-sample cross-entropy on the same batch just before
    /// and just after the update, both from eval-mode forwards (so BatchNorm's mode does not
    /// differ between them), when the strategy asked for it.
    pub eval_ce: Option<(Tensor, Tensor)>,
    /// Global optimizer step (0-based) of this batch.
    pub step: u64,
}

/// A strategy's checkpointed state: named tensors and a JSON string for the rest (counters,
/// RNG positions, settings).
#[derive(Debug, Default)]
pub struct StrategyState {
    pub tensors: Vec<(String, Tensor)>,
    pub json: String,
}

/// Copy `value` into the variable `name` of a strategy's var store (checkpoint restore; `owner`
/// names the strategy in errors: an unknown name or another shape is an error).
pub fn restore_variable(
    vs: &tch::nn::VarStore,
    owner: &str,
    name: &str,
    value: &Tensor,
) -> Result<()> {
    let mut v = vs
        .variables()
        .get(name)
        .ok_or_else(|| Error::Invalid {
            what: format!("{owner} checkpoint"),
            reason: format!("unknown parameter `{name}`"),
        })?
        .shallow_clone();
    if v.size() != value.size() {
        return Err(Error::ShapeMismatch {
            what: format!("{owner} parameter `{name}`"),
            expected: format!("{:?}", v.size()),
            got: format!("{:?}", value.size()),
        });
    }
    tch::no_grad(|| v.f_copy_(&value.to_device(v.device())))?;
    Ok(())
}

/// No distillation: the student trains on labels alone.
#[derive(Debug, Default)]
pub struct NoKd;

impl WeightingStrategy for NoKd {
    fn name(&self) -> &str {
        "no-kd"
    }
    fn uses_teachers(&self) -> bool {
        false
    }
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let m = signals.num_teachers() as usize;
        Ok(TeacherWeights::broadcast(
            &vec![0.0; m],
            signals.batch_size(),
            signals.ce.device(),
        ))
    }
}

/// Equal weights 1/M for every teacher and sample ("AVER").
#[derive(Debug, Default)]
pub struct Equal;

impl WeightingStrategy for Equal {
    fn name(&self) -> &str {
        "equal"
    }
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let m = signals.num_teachers() as usize;
        Ok(TeacherWeights::broadcast(
            &vec![1.0 / m as f64; m],
            signals.batch_size(),
            signals.ce.device(),
        ))
    }
}

/// Equal weights with the MTKD-RL parity agent's warm-up: weight 1 for every teacher during the
/// first `ones_epochs` epochs (the published epoch-0 rule, M times AVER's KD scale), then 1/M.
/// A control: with it, AVER differs from the parity agent only in the learnt weights.
#[derive(Debug)]
pub struct EqualOnesWarmup {
    ones_epochs: usize,
    epoch: usize,
    name: String,
}

impl EqualOnesWarmup {
    pub fn new(ones_epochs: usize) -> EqualOnesWarmup {
        EqualOnesWarmup {
            ones_epochs,
            epoch: 0,
            name: format!("equal-ones{ones_epochs}"),
        }
    }
}

impl WeightingStrategy for EqualOnesWarmup {
    fn name(&self) -> &str {
        &self.name
    }
    fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let m = signals.num_teachers() as usize;
        let w = if self.epoch < self.ones_epochs {
            1.0
        } else {
            1.0 / m as f64
        };
        Ok(TeacherWeights::broadcast(
            &vec![w; m],
            signals.batch_size(),
            signals.ce.device(),
        ))
    }
}

/// Only teacher `index` teaches (single-teacher KD inside a multi-teacher pool).
#[derive(Debug)]
pub struct Single {
    pub index: usize,
    name: String,
}

impl Single {
    pub fn new(index: usize) -> Single {
        Single {
            index,
            name: format!("single-{index}"),
        }
    }
}

impl WeightingStrategy for Single {
    fn name(&self) -> &str {
        &self.name
    }
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let m = signals.num_teachers() as usize;
        if self.index >= m {
            return Err(Error::Invalid {
                what: "single-teacher index".into(),
                reason: format!("teacher {} requested but the pool has {m}", self.index),
            });
        }
        let mut row = vec![0.0; m];
        row[self.index] = 1.0;
        Ok(TeacherWeights::broadcast(
            &row,
            signals.batch_size(),
            signals.ce.device(),
        ))
    }
}
