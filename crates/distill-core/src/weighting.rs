//! The weighting-strategy interface: per batch, a strategy turns the teachers' signals into
//! per-sample, per-teacher weights for the logit (KD) and feature losses. The simple strategies
//! live here; the MTKD-RL agent (mtkd-rl-weighting) implements the same trait.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::signals::{BatchSignals, LocationSignals, PixelInputs};

/// Weights for one batch.
///
/// # Shapes
/// `logit` and `feature` are `[B, M]`; a row usually sums to 1 (a strategy may say otherwise).
/// `pixel`, when a strategy weights a segmentation batch pixel by pixel, is `[B, M, H, W]`
/// (each pixel's weights sum to 1) and replaces `logit` in the KD term; `logit` then holds its
/// mean over each image's labelled pixels, which is what the records keep. On detection it is
/// `[B, M, L]`, a weight per pyramid location (`logit`: the mean over the image's locations).
#[derive(Debug)]
pub struct TeacherWeights {
    pub logit: Tensor,
    pub feature: Tensor,
    pub pixel: Option<Tensor>,
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
            pixel: None,
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

    /// Whether the strategy weights a segmentation batch per pixel: the engine then fills
    /// [`BatchSignals::pixels`] and [`crate::signals::StudentHead::pixel_embedding`], and
    /// takes [`TeacherWeights::pixel`] when the strategy gives it.
    fn wants_pixels(&self) -> bool {
        false
    }

    /// Whether the strategy weights a detection batch per location: the engine then fills
    /// [`BatchSignals::locations`], and takes [`TeacherWeights::pixel`] (`[B, M, L]`) when the
    /// strategy gives it.
    fn wants_locations(&self) -> bool {
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

    /// Drop teachers from the pool (`[distill.prune]`): `keep` holds the positions, in the
    /// current pool and increasing, of the teachers that stay; every later batch has only their
    /// columns. Strategies whose state depends on the pool say whether they can.
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Err(Error::Invalid {
            what: format!("strategy `{}`", self.name()),
            reason: "cannot drop teachers from its pool (distill.prune)".into(),
        })
    }

    /// Called once at the end of every epoch (`epoch` counts from 0), before the checkpoint.
    fn end_epoch(&mut self, _epoch: usize) -> Result<()> {
        Ok(())
    }

    /// Called at the start of every epoch (`epoch` counts from 0; also after a resume).
    fn start_epoch(&mut self, _epoch: usize) -> Result<()> {
        Ok(())
    }

    /// Bytes of tensors the strategy holds for a later update (the agent's buffer of steps);
    /// 0 for a strategy that keeps nothing between steps.
    fn buffered_bytes(&self) -> u64 {
        0
    }

    /// Scalar diagnostics accumulated since the last call (for the epoch's metrics line),
    /// e.g. agent loss, reward statistics, mix coefficients. Draining: the strategy resets them.
    fn take_epoch_metrics(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// Per class of the samples (pixels) the strategy learnt from since the last call, and per
    /// teacher of the current pool: the share of them where that teacher earned the strategy's
    /// highest credit (NaN for a class with none). Empty when the strategy keeps no such
    /// record (all but the agent's meta mode on segmentation). Draining.
    fn take_class_credit(&mut self) -> Vec<Vec<f64>> {
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

impl StrategyState {
    /// A strategy's bookkeeping as the state's JSON; `what` names the checkpoint in errors.
    pub fn json_of<T: serde::Serialize>(what: &str, book: &T) -> Result<String> {
        serde_json::to_string(book).map_err(|e| Error::Invalid {
            what: what.into(),
            reason: e.to_string(),
        })
    }

    /// The bookkeeping read back from the state's JSON; `what` names the checkpoint in errors.
    pub fn bookkeeping<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T> {
        serde_json::from_str(&self.json).map_err(|e| Error::Invalid {
            what: what.into(),
            reason: format!("unreadable bookkeeping: {e}"),
        })
    }

    /// The tensor saved as `key`; `what` names the checkpoint in errors (a missing one is one).
    pub fn tensor(&self, what: &str, key: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Invalid {
                what: what.into(),
                reason: format!("missing tensor `{key}`"),
            })
    }
}

/// The variables of a strategy's var store, sorted by name (the order its Adam moments and
/// checkpoint tensors follow).
pub fn sorted_variables(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
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
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Ok(())
    }
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
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Ok(())
    }
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
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Ok(())
    }
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
    fn retain_teachers(&mut self, keep: &[usize]) -> Result<()> {
        self.index = keep
            .iter()
            .position(|&k| k == self.index)
            .ok_or_else(|| Error::Invalid {
                what: "single-teacher KD".into(),
                reason: "its teacher cannot leave the pool".into(),
            })?;
        Ok(())
    }
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

/// A weight table from the config (`[distill.fixed]`, `[distill.oracle]`): one row for every
/// sample (`weights`, per teacher) or one row per true class (`per_class`, K rows). Each row is
/// normalised to sum 1, so the total KD weight is AVER's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedWeights {
    /// Per-teacher weights, in pool order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    /// Per-class rows of per-teacher weights: row `y` weights the samples labelled `y`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<Vec<Vec<f64>>>,
}

impl FixedWeights {
    /// Checks for `m` teachers (the class count is checked when the strategy is built).
    pub fn check(&self, m: usize) -> std::result::Result<(), String> {
        let rows: Vec<&Vec<f64>> = match (&self.weights, &self.per_class) {
            (Some(w), None) => vec![w],
            (None, Some(rows)) if !rows.is_empty() => rows.iter().collect(),
            _ => return Err(
                "give exactly one of `weights` (per teacher) or `per_class` (one row per class)"
                    .into(),
            ),
        };
        for (i, r) in rows.iter().enumerate() {
            if r.len() != m {
                return Err(format!("row {i} has {} weights for {m} teachers", r.len()));
            }
            if r.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(format!(
                    "row {i}: weights must be finite and >= 0, got {r:?}"
                ));
            }
            if r.iter().sum::<f64>() <= 0.0 {
                return Err(format!("row {i}: the weights sum to 0"));
            }
        }
        Ok(())
    }
}

/// Weights from a [`FixedWeights`] table; rows normalised to sum 1.
#[derive(Debug)]
pub struct Fixed {
    /// `[R, M]`: R = 1 (per teacher) or K (per class).
    table: Tensor,
    per_class: bool,
}

impl Fixed {
    /// The strategy for `m` teachers over `num_classes` classes.
    pub fn new(
        cfg: &FixedWeights,
        m: usize,
        num_classes: usize,
        device: tch::Device,
    ) -> Result<Fixed> {
        cfg.check(m).map_err(|reason| Error::Invalid {
            what: "fixed weights".into(),
            reason,
        })?;
        let (rows, per_class) = match (&cfg.weights, &cfg.per_class) {
            (Some(w), _) => (vec![w.clone()], false),
            (None, Some(rows)) => (rows.clone(), true),
            (None, None) => unreachable!("checked above"),
        };
        if per_class && rows.len() != num_classes {
            return Err(Error::Invalid {
                what: "fixed weights per_class".into(),
                reason: format!("{} rows for {num_classes} classes", rows.len()),
            });
        }
        let flat: Vec<f64> = rows
            .iter()
            .flat_map(|r| {
                let s: f64 = r.iter().sum();
                r.iter().map(move |v| v / s)
            })
            .collect();
        let table = Tensor::from_slice(&flat)
            .to_kind(Kind::Float)
            .view([rows.len() as i64, m as i64])
            .to_device(device);
        Ok(Fixed { table, per_class })
    }

    /// Keep only the teachers at `keep` (pool pruning); rows are renormalised (a row left
    /// without weight becomes uniform over the kept teachers).
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        let idx = Tensor::from_slice(&keep.iter().map(|&k| k as i64).collect::<Vec<_>>())
            .to_device(self.table.device());
        let t = self.table.f_index_select(1, &idx)?;
        let s = t.sum_dim_intlist(1, true, Kind::Float);
        let uniform = Tensor::full_like(&t, 1.0 / keep.len() as f64);
        self.table = (&t / s.clamp_min(1e-12)).where_self(&s.gt(0.0), &uniform);
        Ok(())
    }
}

impl Fixed {
    /// Segmentation, per class: the row of each pixel's class (its label, or the teachers'
    /// pseudo-label on an unlabelled image); an image's weights are their mean over its
    /// labelled pixels (its image label's row when it has none).
    fn per_pixel(&self, px: &PixelInputs, signals: &BatchSignals) -> Result<TeacherWeights> {
        let t = px.targets.to_device(self.table.device());
        let size = t.size();
        let m = self.table.size()[1];
        let valid = t.f_ne(px.ignore_index)?;
        let classes = t.f_where_scalarother(&valid, 0)?;
        let w = self
            .table
            .f_index_select(0, &classes.f_reshape([-1])?)?
            .f_view([size[0], size[1], size[2], m])?
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?;
        let v = valid.f_to_kind(Kind::Float)?.f_unsqueeze(1)?;
        let n = v.f_sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Float)?;
        let mean = (&w * &v).f_sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Float)?
            / n.f_clamp_min(1.0)?;
        let by_image = self
            .table
            .f_index_select(0, &signals.labels.to_device(self.table.device()))?;
        let per_image = mean.f_where_self(&n.f_gt(0.0)?, &by_image)?;
        Ok(TeacherWeights {
            feature: per_image.copy(),
            logit: per_image,
            pixel: Some(w),
        })
    }

    /// Detection, per class: the row of the class of the box each pyramid location is assigned
    /// to; a location assigned to no box takes the mean of the rows (background belongs to no
    /// class: in a class-subset pool, every owner was trained to call it background). An
    /// image's weights are their mean over its locations.
    fn per_location(&self, loc: &LocationSignals) -> Result<TeacherWeights> {
        let c = loc.classes.to_device(self.table.device());
        let size = c.size();
        let (b, l) = (size[0], size[1]);
        let m = self.table.size()[1];
        let assigned = c.f_ge(0)?.f_unsqueeze(-1)?;
        let rows = self
            .table
            .f_index_select(0, &c.f_clamp_min(0)?.f_reshape([-1])?)?
            .f_view([b, l, m])?;
        let background = self
            .table
            .f_mean_dim(0, true, Kind::Float)?
            .f_view([1, 1, m])?;
        let w = rows
            .f_where_self(&assigned, &background)?
            .f_permute([0, 2, 1])?
            .f_contiguous()?; // [B, M, L]
        let per_image = w.f_mean_dim(2, false, Kind::Float)?;
        Ok(TeacherWeights {
            feature: per_image.copy(),
            logit: per_image,
            pixel: Some(w),
        })
    }
}

impl WeightingStrategy for Fixed {
    fn retain_teachers(&mut self, keep: &[usize]) -> Result<()> {
        self.retain(keep)
    }
    fn name(&self) -> &str {
        "fixed"
    }
    /// Per class on segmentation: each pixel by its own class.
    fn wants_pixels(&self) -> bool {
        self.per_class
    }
    /// Per class on detection: each location by its box's class.
    fn wants_locations(&self) -> bool {
        self.per_class
    }
    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let m = signals.num_teachers();
        if self.table.size()[1] != m {
            return Err(Error::ShapeMismatch {
                what: "fixed weight table (teachers)".into(),
                expected: self.table.size()[1].to_string(),
                got: m.to_string(),
            });
        }
        if let (true, Some(px)) = (self.per_class, &signals.pixels) {
            return self.per_pixel(px, signals);
        }
        if let (true, Some(loc)) = (self.per_class, &signals.locations) {
            return self.per_location(loc);
        }
        let b = signals.batch_size();
        let w = if self.per_class {
            self.table
                .f_index_select(0, &signals.labels.to_device(self.table.device()))?
        } else {
            self.table.expand([b, m], true).contiguous()
        };
        Ok(TeacherWeights {
            pixel: None,
            feature: w.copy(),
            logit: w,
        })
    }
}
