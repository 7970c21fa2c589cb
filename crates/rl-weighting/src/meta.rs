//! The agent's meta mode (docs/METHOD.md section 10): a policy over per-teacher features that is
//! trained by per-teacher credit from a look-ahead.
//!
//! - **Policy.** One small MLP, shared by all teachers, reads the features of teacher m for
//!   sample b, `f[b,m] = [ce_m, kl_m, entropy_m, cos_m, ce_m - mean_j ce_j, kl_m - mean_j kl_j]`
//!   (standardised with running statistics pooled over teachers, so teachers stay comparable;
//!   clipped to ±5; on an unlabelled sample the two `ce` features are held at 0, their running
//!   mean, unless `unlabelled_ce = "pseudo"`), and gives a score; a learnt bias per teacher is
//!   added and the weights are the softmax over teachers. The output layer and the biases start at zero: the policy starts
//!   at AVER's weights (each step updates it before giving the batch its weights). The same weights route the logit and the feature term, and they always
//!   sum to 1 (AVER's total KD weight).
//! - **Credit.** At every step, a virtual SGD step of the student's classifier with the current
//!   weights ([`mtkd_distill_core::mmkd::lookahead_quiz_loss`]); the credit of teacher m on
//!   sample b is `C[b,m] = -dL_quiz/dw[b,m] / lr`: how much more weight on that teacher for that
//!   sample would lower the quiz loss, per unit of the student's learning rate (so that a
//!   schedule's lr drop does not shrink it). It is centred over teachers (the softmax ignores a shift)
//!   and divided by a scale, which makes the entropy coefficient scale-free: a running RMS (EMA
//!   0.99, bias-corrected), or each sample's own RMS over the teachers (`advantage`, whose
//!   default `"auto"` is the latter on segmentation's pixels only).
//! - **Update.** Adam on `-mean_b sum_m w[b,m] A[b,m] - tau mean_b H(w[b,.])`: to first order the
//!   look-ahead meta-gradient (as MMKD), with a per-sample optimum `w ~ exp(A / tau)`, so the
//!   weights concentrate only where the credit differs between teachers.
//! - Every piece of state is checkpointed (parameters, Adam moments, normaliser, RMS, quiz
//!   batch, counters, the active teachers): resume is exact.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::mmkd::{
    lookahead_own_loss, lookahead_quiz_loss, quiz_tensors, restore_quiz, AdamMoments,
};
use mtkd_distill_core::signals::{BatchSignals, StudentHead};
use mtkd_distill_core::weighting::{
    restore_variable, sorted_variables, StrategyState, TeacherWeights, WeightingStrategy,
};
use mtkd_distill_core::{Error, Result};

use crate::agent::{update_counts, Advantage, AgentConfig, Quiz, RunningNorm, UnlabelledCe};
use crate::pixels::{pixel_batch, pixel_credit, quiz_pixels, PixelQuiz};

/// Per-teacher features of the policy.
pub const FEATURES: i64 = 6;
/// The features that read the label: `ce_m` and `ce_m - mean_j ce_j`.
const LABEL_FEATURES: [usize; 2] = [0, 4];
const RMS_DECAY: f64 = 0.99;
/// Segmentation: the labelled pixels one policy update reads at most (a stride over the
/// batch's labelled pixels whose offset moves by one every step).
pub const UPDATE_PIXELS: i64 = 8192;

/// Normalised inputs `x [N, M, F]` with the label-reading features at their running mean (0)
/// on the rows where `labelled [N]` (bool or 0/1) is false (`unlabelled_ce = "neutral"`).
pub fn neutral_where_unlabelled(x: &Tensor, labelled: &Tensor) -> Result<Tensor> {
    let f = x.size()[2];
    let mut cols = vec![0f32; f as usize];
    for c in LABEL_FEATURES {
        cols[c] = 1.0;
    }
    let cols = Tensor::from_slice(&cols)
        .to_device(x.device())
        .f_view([1, 1, f])?;
    let unlabelled = (labelled.f_to_kind(Kind::Float)?.f_neg()? + 1.0).f_view([-1, 1, 1])?;
    Ok(x * (unlabelled * cols).f_neg()?.f_add_scalar(1.0)?)
}

#[derive(Debug, Default)]
struct Stats {
    updates: u64,
    skipped: u64,
    quiz_loss: Option<Tensor>,
    /// `[entropy, max weight]` summed over batches.
    weights: Option<Tensor>,
    batches: u64,
}

/// Add a batch of update pixels to the per-class credit record (`MetaAgent::class_credit`):
/// `targets` `[N]` their classes, `credit` and `weights` `[N, M]`.
fn add_class_credit(
    acc: &mut Option<Tensor>,
    targets: &Tensor,
    credit: &Tensor,
    weights: &Tensor,
    classes: i64,
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let (n, m) = (credit.size()[0], credit.size()[1]);
        let rows = Tensor::f_cat(
            &[
                Tensor::f_ones([n, 1], (Kind::Double, credit.device()))?,
                credit
                    .f_argmax(1, false)?
                    .f_one_hot(m)?
                    .f_to_kind(Kind::Double)?,
                weights.f_to_kind(Kind::Double)?,
            ],
            1,
        )?;
        let sum = match acc.take() {
            Some(a) => a,
            None => Tensor::f_zeros([classes, 1 + 2 * m], (Kind::Double, credit.device()))?,
        };
        *acc = Some(sum.f_index_add(0, &targets.f_to_kind(Kind::Int64)?, &rows)?);
        Ok(())
    })
}

#[derive(Serialize, Deserialize)]
struct Bookkeeping {
    adam_t: u64,
    calls: u64,
    norm_count: f64,
    credit_count: u64,
    has_quiz: bool,
    active: Vec<usize>,
}

/// The MTKD-RL agent in meta mode.
#[derive(Debug)]
pub struct MetaAgent {
    cfg: AgentConfig,
    vs: nn::VarStore,
    l1: nn::Linear,
    l2: nn::Linear,
    /// A learnt score per teacher of the full pool `[M0]`.
    teacher_bias: Tensor,
    /// Positions (in the full pool) of the teachers still in the pool.
    active: Vec<usize>,
    ce_weight: f64,
    kd_weight: f64,
    norm: RunningNorm,
    /// EMA of the mean square of the centred credit (scalar, double).
    credit_ms: Tensor,
    credit_count: u64,
    adam: AdamMoments,
    quiz: Option<(Tensor, Tensor)>,
    calls: u64,
    stats: Stats,
    /// Segmentation: per pixel class `k`, over the pixels the policy learnt from this epoch,
    /// `[K, 1 + 2M]` (double): the pixels, then per teacher those where it earned the highest
    /// credit, then the policy's weight there summed (before that step's update). A record, not
    /// state: an epoch replayed after a resume builds it again.
    class_credit: Option<Tensor>,
}

/// The student's classifier the look-ahead reads (the engine sets it for this strategy).
fn student_head(s: &BatchSignals) -> Result<&StudentHead> {
    s.student_head.as_ref().ok_or_else(|| Error::Invalid {
        what: "mtkd-rl meta".into(),
        reason: "the signals carry no student classifier (BatchSignals::student_head)".into(),
    })
}

/// The policy's per-teacher features of a batch, unnormalised.
///
/// # Shapes
/// -> `[B, M, FEATURES]`
pub fn features(s: &BatchSignals) -> Result<Tensor> {
    let ce = s.ce.to_kind(Kind::Float);
    let kl = s.kl.to_kind(Kind::Float);
    let cos = match &s.cos {
        Some(c) => c.to_kind(Kind::Float),
        None => ce.zeros_like(),
    };
    let rel = |t: &Tensor| t - t.mean_dim(1, true, Kind::Float);
    Ok(Tensor::f_stack(
        &[
            ce.shallow_clone(),
            kl.shallow_clone(),
            s.entropy.to_kind(Kind::Float),
            cos,
            rel(&ce),
            rel(&kl),
        ],
        2,
    )?)
}

impl MetaAgent {
    /// A meta-mode agent for `num_teachers` teachers; the student's loss is
    /// `ce_weight CE + kd_weight sum_m w_m KL_m (+ features)`. The first layer is initialised from
    /// libtorch's global RNG.
    pub fn new(
        cfg: AgentConfig,
        num_teachers: usize,
        ce_weight: f64,
        kd_weight: f64,
        device: Device,
    ) -> Result<MetaAgent> {
        cfg.check_pool(num_teachers)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l1 = nn::linear(&root / "l1", FEATURES, cfg.hidden, Default::default());
        // No output bias: a score shared by all teachers is ignored by the softmax.
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: None,
            bias: false,
        };
        let l2 = nn::linear(&root / "l2", cfg.hidden, 1, zero);
        let teacher_bias = root.zeros("teacher_bias", &[num_teachers as i64]);
        Ok(MetaAgent {
            adam: AdamMoments::zeros(&sorted_variables(&vs)),
            cfg,
            vs,
            l1,
            l2,
            teacher_bias,
            active: (0..num_teachers).collect(),
            ce_weight,
            kd_weight,
            norm: RunningNorm::new(FEATURES, device),
            credit_ms: Tensor::zeros([], (Kind::Double, device)),
            credit_count: 0,
            quiz: None,
            calls: 0,
            stats: Stats::default(),
            class_credit: None,
        })
    }

    /// The policy's parameters by name (`l1.weight`, `l1.bias`, `l2.weight`, `teacher_bias`).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        sorted_variables(&self.vs)
    }

    /// Overwrite parameter `name` (tests and checkpoints).
    pub fn set_parameter(&mut self, name: &str, value: &Tensor) -> Result<()> {
        restore_variable(&self.vs, "mtkd-rl meta", name, value)
    }

    /// Weights `[B, M]` from normalised features `[B, M, F]`, with gradient to the parameters.
    fn policy(&self, x: &Tensor) -> Result<Tensor> {
        let score = self.l2.forward(&self.l1.forward(x).relu()).squeeze_dim(2);
        let idx = Tensor::from_slice(&self.active.iter().map(|&a| a as i64).collect::<Vec<_>>())
            .to_device(self.vs.device());
        let bias = self.teacher_bias.f_index_select(0, &idx)?;
        Ok((score + bias.unsqueeze(0)).f_softmax(1, Kind::Float)?)
    }

    /// One policy update from the look-ahead credit: on a quiz batch, or each labelled sample
    /// on its own share of the step (`None`, `quiz = "own"`; the update then reads the labelled
    /// rows, the only ones that earn credit).
    fn update(
        &mut self,
        s: &BatchSignals,
        x: &Tensor,
        quiz: Option<&(Tensor, Tensor)>,
    ) -> Result<()> {
        let head = student_head(s)?;
        let w = tch::no_grad(|| self.policy(x))?;
        let leaf = w.set_requires_grad(true);
        let (ce_w, kd_w) = (self.ce_weight, self.kd_weight);
        let quiz_loss = match quiz {
            Some(q) => lookahead_quiz_loss(s, head, &leaf, q, ce_w, kd_w)?,
            None => match lookahead_own_loss(s, head, &leaf, ce_w, kd_w)? {
                Some(l) => l,
                None => return Ok(()),
            },
        };
        let g = Tensor::f_run_backward(&[&quiz_loss], &[&leaf], false, false)?;
        // Per unit of learning rate: the look-ahead's effect is proportional to the step size,
        // so a schedule's lr drop must not shrink the advantage (while the running RMS catches
        // up, the entropy term would pull the weights back toward uniform).
        let credit = -&g[0] / head.lr.max(1e-12);
        match (quiz, &s.labelled) {
            (None, Some(l)) => {
                let rows = l.f_nonzero()?.f_squeeze_dim(1)?;
                self.update_from_credit(
                    &x.f_index_select(0, &rows)?,
                    &credit.f_index_select(0, &rows)?,
                    &quiz_loss,
                    Advantage::RunningRms,
                )
            }
            _ => self.update_from_credit(x, &credit, &quiz_loss, Advantage::RunningRms),
        }
    }
}

impl MetaAgent {
    /// Segmentation (docs/METHOD.md section 10.7): weights per pixel from per-pixel features,
    /// and one policy update from the per-pixel look-ahead credit on a stride of the labelled
    /// pixels.
    fn weights_per_pixel(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let px_in = signals.pixels.as_ref().ok_or_else(|| Error::Invalid {
            what: "mtkd-rl meta".into(),
            reason: "no per-pixel inputs".into(),
        })?;
        let head = student_head(signals)?;
        let m = signals.num_teachers();
        let px = pixel_batch(signals, px_in, FEATURES)?;
        let (b, h, w) = px.dims;
        // The own-pixel quiz gives credit only where it scores (pseudo-labelled pixels would
        // read a zero credit).
        let rows = match self.cfg.quiz {
            Quiz::Own => quiz_pixels(signals, &px)?,
            _ => px.valid.shallow_clone(),
        };
        let (x, sel) = self.dense_inputs(&px.features, &rows)?;
        let x = match (&signals.labelled, self.cfg.unlabelled_ce) {
            (Some(l), UnlabelledCe::Neutral) => {
                let per_pixel = l
                    .f_view([b, 1])?
                    .f_expand([b, h * w], false)?
                    .f_reshape([-1])?;
                neutral_where_unlabelled(&x, &per_pixel)?
            }
            _ => x,
        };
        if let Some(sel) = &sel {
            let xs = x.f_index_select(0, sel)?;
            // The own quiz scores each pixel alone: the policy and the credit at the update's
            // rows only. The current quiz needs every pixel for its cross terms.
            let own = self.cfg.quiz == Quiz::Own;
            let (inputs, quiz) = if own {
                (&xs, PixelQuiz::Own(sel))
            } else {
                (&x, PixelQuiz::Current)
            };
            let current = tch::no_grad(|| self.policy(inputs))?;
            let credit = pixel_credit(
                signals,
                &px,
                head,
                &current,
                self.ce_weight,
                self.kd_weight,
                quiz,
            )?;
            let credit = match credit {
                Some((c, q)) if !own => Some((c.f_index_select(0, sel)?, q)),
                other => other,
            };
            if let Some((credit, quiz_loss)) = credit {
                let before = if own {
                    current.shallow_clone()
                } else {
                    current.f_index_select(0, sel)?
                };
                add_class_credit(
                    &mut self.class_credit,
                    &px.targets.f_index_select(0, sel)?,
                    &credit,
                    &before,
                    px.teacher_soft.size()[2],
                )?;
                self.update_from_credit(&xs, &credit, &quiz_loss, Advantage::PerSample)?;
            }
        }
        let wp = tch::no_grad(|| self.policy(&x))?; // [N, M]
        let per_pixel = wp
            .f_view([b, h, w, m])?
            .f_permute([0, 3, 1, 2])?
            .f_contiguous()?;
        let per_image = self.dense_outputs(&wp, &px.valid, &per_pixel.f_view([b, m, h * w])?)?;
        Ok(TeacherWeights {
            feature: per_image.copy(),
            logit: per_image,
            pixel: Some(per_pixel),
        })
    }

    /// Detection (docs/METHOD.md section 14): weights per pyramid location from per-location
    /// features, and one policy update from the task's per-location credit.
    fn weights_per_location(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let loc = signals.locations.as_ref().ok_or_else(|| Error::Invalid {
            what: "mtkd-rl meta".into(),
            reason: "no per-location signals".into(),
        })?;
        let size = loc.ce.size();
        let (b, m, l) = (size[0], size[1], size[2]);
        let features = tch::no_grad(|| -> Result<Tensor> {
            let cos = match &signals.cos {
                Some(c) => c
                    .to_kind(Kind::Float)
                    .view([b, m, 1])
                    .expand([b, m, l], false),
                None => loc.ce.zeros_like(),
            };
            let rel = |t: &Tensor| t - t.mean_dim(1, true, Kind::Float);
            let f = Tensor::f_stack(
                &[
                    loc.ce.shallow_clone(),
                    loc.kl.shallow_clone(),
                    loc.entropy.shallow_clone(),
                    cos,
                    rel(&loc.ce),
                    rel(&loc.kl),
                ],
                2,
            )?; // [B, M, F, L]
            Ok(f.f_permute([0, 3, 1, 2])?.f_reshape([b * l, m, FEATURES])?)
        })?;
        let valid = loc.valid.to_kind(Kind::Float).reshape([-1]);
        let (x, sel) = self.dense_inputs(&features, &valid)?;
        // The update's rows (`valid`) are the labelled images' locations.
        let x = match (&signals.labelled, self.cfg.unlabelled_ce) {
            (Some(_), UnlabelledCe::Neutral) => neutral_where_unlabelled(&x, &valid)?,
            _ => x,
        };
        if let Some(sel) = &sel {
            let credit = loc.credit.permute([0, 2, 1]).reshape([b * l, m]);
            self.update_from_credit(
                &x.f_index_select(0, sel)?,
                &credit.f_index_select(0, sel)?,
                &loc.quiz_loss,
                Advantage::RunningRms,
            )?;
        }
        let wp = tch::no_grad(|| self.policy(&x))?; // [N, M]
        let per_location = wp.f_view([b, l, m])?.f_permute([0, 2, 1])?.f_contiguous()?;
        // The records' per-image weights: the mean over every location of the image.
        let every = Tensor::ones([b * l], (Kind::Float, wp.device()));
        let per_image = self.dense_outputs(&wp, &every, &per_location)?;
        Ok(TeacherWeights {
            feature: per_image.copy(),
            logit: per_image,
            pixel: Some(per_location),
        })
    }

    /// The policy's normalised inputs for rows `features [N, M, F]`, and the rows the update
    /// reads: a stride of at most [`UPDATE_PIXELS`] of the rows where `valid [N]` is 1, whose
    /// offset moves by one every step (`None` without such rows). The normaliser reads them.
    fn dense_inputs(
        &mut self,
        features: &Tensor,
        valid: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let size = features.size();
        let (n, m) = (size[0], size[1]);
        let rows = valid.f_nonzero()?.f_squeeze_dim(1)?;
        let nv = rows.size()[0];
        let sel = if nv == 0 {
            None
        } else {
            let stride = (nv + UPDATE_PIXELS - 1) / UPDATE_PIXELS;
            let offset = (self.calls as i64) % stride;
            Some(rows.f_slice(0, offset, nv, stride)?)
        };
        let x = tch::no_grad(|| -> Result<Tensor> {
            if let Some(sel) = &sel {
                let sub = features.f_index_select(0, sel)?;
                self.norm.update(&sub.f_reshape([-1, FEATURES])?);
            }
            Ok(self
                .norm
                .apply(&features.f_reshape([n * m, FEATURES])?)
                .f_reshape([n, m, FEATURES])?)
        })?;
        Ok((x, sel))
    }

    /// Per-image weights `[B, M]` from dense weights `dense [B, M, P]` (the mean over each
    /// image's rows where `valid` is 1; AVER's row for an image without any), and the epoch
    /// statistics of the row weights `wp [N, M]` over the valid rows.
    fn dense_outputs(&mut self, wp: &Tensor, valid: &Tensor, dense: &Tensor) -> Result<Tensor> {
        let size = dense.size();
        let (b, m) = (size[0], size[1]);
        let (per_image, row) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            let v = valid.f_view([b, 1, -1])?;
            let n_b = v.f_sum_dim_intlist(2, false, Kind::Float)?;
            let mean =
                (dense.f_reshape([b, m, -1])? * &v).f_sum_dim_intlist(2, false, Kind::Float)?
                    / n_b.f_clamp_min(1.0)?;
            // An image without a valid row has no KD term there; its row reads AVER's.
            let per_image = mean.f_where_self(
                &n_b.f_gt(0.0)?,
                &Tensor::f_full([b, m], 1.0 / m as f64, (Kind::Float, mean.device()))?,
            )?;
            let vrows = valid.f_unsqueeze(1)?;
            let count = valid.f_sum(Kind::Double)?.f_clamp_min(1.0)?;
            let ent =
                (-(wp * wp.f_clamp_min(1e-12)?.f_log()?) * &vrows).f_sum(Kind::Double)? / &count;
            let max = (wp.f_amax(1, true)? * &vrows).f_sum(Kind::Double)? / &count;
            Ok((per_image, Tensor::f_stack(&[ent, max], 0)?))
        })?;
        self.stats.weights = Some(match self.stats.weights.take() {
            Some(acc) => acc + row,
            None => row,
        });
        self.stats.batches += 1;
        Ok(per_image)
    }

    /// One Adam step of the policy on inputs `x [S, M, F]` (normalised) toward the credit
    /// `credit [S, M]` (centred over teachers here, scaled by [`scaled_advantage`]), with the
    /// entropy bonus; `quiz_loss` is recorded. A non-finite credit or quiz loss skips the step.
    /// `auto` is the advantage `advantage = "auto"` stands for on this task.
    fn update_from_credit(
        &mut self,
        x: &Tensor,
        credit: &Tensor,
        quiz_loss: &Tensor,
        auto: Advantage,
    ) -> Result<()> {
        let centred = credit - credit.f_mean_dim(1, true, Kind::Float)?;
        let batch_ms = centred.f_square()?.f_mean(Kind::Double)?;
        // One device sync per step: a non-finite batch must not reach the policy.
        let finite = quiz_loss
            .f_isfinite()?
            .f_logical_and(&batch_ms.f_isfinite()?)?;
        if finite.f_int64_value(&[])? == 0 {
            tracing::warn!("mtkd-rl meta: non-finite look-ahead credit, update skipped");
            self.stats.skipped += 1;
            return Ok(());
        }
        self.credit_ms = &self.credit_ms * RMS_DECAY + batch_ms * (1.0 - RMS_DECAY);
        self.credit_count += 1;
        let correction = 1.0 - RMS_DECAY.powi(self.credit_count.min(100_000) as i32);
        let rms = (&self.credit_ms / correction).sqrt().to_kind(Kind::Float) + 1e-20;
        let advantage = match self.cfg.advantage {
            Advantage::Auto => auto,
            chosen => chosen,
        };
        let adv = scaled_advantage(&centred, &rms, advantage)?.detach();
        let w = self.policy(x)?;
        let entropy = -(&w * w.clamp_min(1e-12).log()).sum_dim_intlist(1, false, Kind::Float);
        let loss = -(&w * adv)
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float)
            - entropy.mean(Kind::Float) * self.cfg.entropy;
        let params = self.parameters();
        let tensors: Vec<&Tensor> = params.iter().map(|(_, p)| p).collect();
        let grads = Tensor::f_run_backward(&[&loss], &tensors, false, false)?;
        self.adam.step(&tensors, &grads, self.cfg.meta_lr)?;
        self.stats.updates += 1;
        let ql = quiz_loss.detach().to_kind(Kind::Double);
        self.stats.quiz_loss = Some(match self.stats.quiz_loss.take() {
            Some(sum) => sum + ql,
            None => ql,
        });
        Ok(())
    }
}

/// The advantage from the credit centred over the teachers `centred [S, M]` and the running RMS
/// `rms` (a scalar): `centred / rms`, or with `PerSample` each row over its own RMS across the
/// teachers, floored at `1e-3 rms` (a row whose credit is rounding noise does not vote at full
/// strength). `Auto` must be resolved before.
fn scaled_advantage(centred: &Tensor, rms: &Tensor, advantage: Advantage) -> Result<Tensor> {
    Ok(match advantage {
        Advantage::RunningRms | Advantage::Auto => centred / rms,
        Advantage::PerSample => {
            let own = centred
                .f_square()?
                .f_mean_dim(1, true, Kind::Float)?
                .f_sqrt()?;
            centred / own.f_maximum(&(rms * 1e-3))?
        }
    })
}

/// The epoch's per-class credit record (`MetaAgent::class_credit`, rows `[pixels, top.., weight..]`)
/// as one `info` event per class that had update pixels (a run's `mtkd.log`): where the
/// per-pixel credit points (the share of the class's pixels where each teacher earned the
/// highest credit, which the per-pixel optimum of the policy's objective would weight almost
/// alone) beside the policy's mean weight on the same pixels (docs/METHOD.md section 10.7).
fn log_class_credit(rows: &[Vec<f64>]) {
    for (k, r) in rows.iter().enumerate() {
        let n = r.first().copied().unwrap_or(0.0);
        if n <= 0.0 {
            continue;
        }
        let m = (r.len() - 1) / 2;
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.2}", x / n))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        tracing::info!(
            "meta credit, pixel class {k}: {n} update pixels; highest credit {}; policy weight {}",
            fmt(&r[1..1 + m]),
            fmt(&r[1 + m..])
        );
    }
}

impl WeightingStrategy for MetaAgent {
    fn name(&self) -> &str {
        "mtkd-rl-meta"
    }

    fn wants_student_head(&self) -> bool {
        true
    }

    fn wants_pixels(&self) -> bool {
        true
    }

    fn wants_locations(&self) -> bool {
        true
    }

    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let b = signals.batch_size();
        let m = signals.num_teachers();
        if m as usize != self.active.len() {
            return Err(Error::ShapeMismatch {
                what: "mtkd-rl meta teachers".into(),
                expected: self.active.len().to_string(),
                got: m.to_string(),
            });
        }
        self.calls += 1;
        let device = signals.ce.device();
        if m == 1 {
            return Ok(TeacherWeights::broadcast(&[1.0], b, device));
        }
        if signals.pixels.is_some() {
            return self.weights_per_pixel(signals);
        }
        if signals.locations.is_some() {
            return self.weights_per_location(signals);
        }
        let x = tch::no_grad(|| -> Result<Tensor> {
            let f = features(signals)?;
            Ok(match (&signals.labelled, self.cfg.unlabelled_ce) {
                // Neutral: nothing of an unlabelled sample's label-reading features is read,
                // not even by the normaliser (it reads the labelled rows, as the dense paths' does
                // under the default own quiz).
                (Some(l), UnlabelledCe::Neutral) => {
                    let rows = l.f_nonzero()?.f_squeeze_dim(1)?;
                    if rows.size()[0] > 0 {
                        self.norm
                            .update(&f.f_index_select(0, &rows)?.f_reshape([-1, FEATURES])?);
                    }
                    let x = self
                        .norm
                        .apply(&f.f_reshape([b * m, FEATURES])?)
                        .f_view([b, m, FEATURES])?;
                    neutral_where_unlabelled(&x, l)?
                }
                _ => self
                    .norm
                    .update_and_apply(&f.view([b * m, FEATURES]))
                    .view([b, m, FEATURES]),
            })
        })?;
        let head = student_head(signals)?;
        // The quiz: the labelled samples of a batch (a batch without any keeps the last); the
        // own quiz scores the batch's samples themselves, so no quiz batch is made.
        let quiz = match self.cfg.quiz {
            Quiz::Own => None,
            Quiz::Current => signals.quiz(&head.embedding)?,
            Quiz::Previous => match signals.quiz(&head.embedding)? {
                Some(c) => self.quiz.replace(c),
                None => self
                    .quiz
                    .as_ref()
                    .map(|(h, y)| (h.shallow_clone(), y.shallow_clone())),
            },
        };
        match (self.cfg.quiz, &quiz) {
            (Quiz::Own, _) => self.update(signals, &x, None)?,
            (_, Some(q)) => self.update(signals, &x, Some(q))?,
            (_, None) => {}
        }
        let w = tch::no_grad(|| self.policy(&x))?;
        let row = tch::no_grad(|| {
            let ent = -(&w * w.clamp_min(1e-12).log())
                .sum_dim_intlist(1, false, Kind::Double)
                .mean(Kind::Double);
            let max = w.amax(1, false).mean(Kind::Double);
            Tensor::stack(&[ent, max], 0)
        });
        self.stats.weights = Some(match self.stats.weights.take() {
            Some(acc) => acc + row,
            None => row,
        });
        self.stats.batches += 1;
        Ok(TeacherWeights {
            pixel: None,
            feature: w.copy(),
            logit: w,
        })
    }

    fn retain_teachers(&mut self, keep: &[usize]) -> Result<()> {
        let active: Vec<usize> = keep
            .iter()
            .map(|&k| {
                self.active.get(k).copied().ok_or_else(|| Error::Invalid {
                    what: "mtkd-rl meta pruning".into(),
                    reason: format!("teacher {k} is not in the pool of {}", self.active.len()),
                })
            })
            .collect::<Result<_>>()?;
        self.active = active;
        Ok(())
    }

    fn take_epoch_metrics(&mut self) -> Vec<(String, f64)> {
        let s = std::mem::take(&mut self.stats);
        let mut out = update_counts(s.updates as f64, s.skipped as f64);
        if let Some(q) = s.quiz_loss {
            out.push((
                "agent_quiz_loss".to_owned(),
                q.double_value(&[]) / s.updates.max(1) as f64,
            ));
        }
        if let Some(w) = s.weights {
            let v = Vec::<f64>::try_from(&w.to_device(Device::Cpu)).unwrap_or_default();
            let n = s.batches.max(1) as f64;
            if v.len() == 2 {
                out.push(("weight_entropy_logit".to_owned(), v[0] / n));
                out.push(("weight_max".to_owned(), v[1] / n));
            }
        }
        if self.credit_count > 0 {
            let correction = 1.0 - RMS_DECAY.powi(self.credit_count.min(100_000) as i32);
            out.push((
                "credit_rms".to_owned(),
                (self.credit_ms.double_value(&[]) / correction).sqrt(),
            ));
        }
        out
    }

    fn take_class_credit(&mut self) -> Vec<Vec<f64>> {
        let Some(c) = self.class_credit.take() else {
            return Vec::new();
        };
        let rows = Vec::<Vec<f64>>::try_from(&c.to_device(Device::Cpu)).unwrap_or_default();
        log_class_credit(&rows);
        rows.iter()
            .map(|r| {
                let n = r.first().copied().unwrap_or(0.0);
                let m = r.len().saturating_sub(1) / 2;
                r[1..1 + m]
                    .iter()
                    .map(|&x| if n > 0.0 { x / n } else { f64::NAN })
                    .collect()
            })
            .collect()
    }

    fn save_state(&self) -> Result<StrategyState> {
        let mut tensors = self.adam.checkpoint_tensors(self.parameters());
        tensors.push(("norm.mean".into(), self.norm.mean.shallow_clone()));
        tensors.push(("norm.var".into(), self.norm.var.shallow_clone()));
        tensors.push(("credit_ms".into(), self.credit_ms.shallow_clone()));
        tensors.extend(quiz_tensors(self.quiz.as_ref()));
        let json = StrategyState::json_of(
            "mtkd-rl meta checkpoint",
            &Bookkeeping {
                adam_t: self.adam.t,
                calls: self.calls,
                norm_count: self.norm.count,
                credit_count: self.credit_count,
                has_quiz: self.quiz.is_some(),
                active: self.active.clone(),
            },
        )?;
        Ok(StrategyState { tensors, json })
    }

    fn load_state(&mut self, state: &StrategyState) -> Result<()> {
        const WHAT: &str = "mtkd-rl meta checkpoint";
        let book: Bookkeeping = state.bookkeeping(WHAT)?;
        let device = self.vs.device();
        self.adam.restore(state, &self.vs, "mtkd-rl meta")?;
        self.norm.mean = state.tensor(WHAT, "norm.mean")?.to_device(device).copy();
        self.norm.var = state.tensor(WHAT, "norm.var")?.to_device(device).copy();
        self.norm.count = book.norm_count;
        self.credit_ms = state.tensor(WHAT, "credit_ms")?.to_device(device).copy();
        self.quiz = restore_quiz(state, WHAT, book.has_quiz, device)?;
        self.adam.t = book.adam_t;
        self.calls = book.calls;
        self.credit_count = book.credit_count;
        self.active = book.active;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_class_credit_record_counts_each_class_top_teacher_and_weights() {
        // Two batches; pixel classes 0, 2, 2 then 2; two teachers.
        let mut acc = None;
        let credit = Tensor::from_slice(&[1.0f32, -1.0, -0.5, 0.5, -2.0, 3.0]).view([3, 2]);
        let weights = Tensor::from_slice(&[0.9f32, 0.1, 0.3, 0.7, 0.2, 0.8]).view([3, 2]);
        let targets = Tensor::from_slice(&[0i64, 2, 2]);
        add_class_credit(&mut acc, &targets, &credit, &weights, 3).unwrap();
        let credit = Tensor::from_slice(&[4.0f32, 1.0]).view([1, 2]);
        let weights = Tensor::from_slice(&[0.6f32, 0.4]).view([1, 2]);
        add_class_credit(&mut acc, &Tensor::from_slice(&[2i64]), &credit, &weights, 3).unwrap();
        let rows = Vec::<Vec<f64>>::try_from(&acc.unwrap()).unwrap();
        // [pixels, top teacher 0, top teacher 1, weight 0, weight 1]
        let want = [
            [1.0, 1.0, 0.0, 0.9, 0.1],
            [0.0; 5],
            [3.0, 1.0, 2.0, 1.1, 1.9],
        ];
        for (r, w) in rows.iter().zip(want) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{rows:?}");
            }
        }
    }

    #[test]
    fn per_sample_advantage_gives_each_row_unit_rms_above_the_floor() {
        // Rows: a large credit, a small one, one under a thousandth of the running RMS, zeros.
        let centred = Tensor::from_slice(&[
            2.0f32, -1.0, -1.0, 0.02, -0.01, -0.01, 2e-6, -1e-6, -1e-6, 0.0, 0.0, 0.0,
        ])
        .view([4, 3]);
        let rms = Tensor::from(1.0f32);
        let at = |t: &Tensor, r: i64, c: i64| t.double_value(&[r, c]);
        let run = scaled_advantage(&centred, &rms, Advantage::RunningRms).unwrap();
        assert!((at(&run, 0, 0) - 2.0).abs() < 1e-6 && (at(&run, 1, 0) - 0.02).abs() < 1e-7);
        let own = scaled_advantage(&centred, &rms, Advantage::PerSample).unwrap();
        // Rows 0 and 1 point the same way at different scales: the same per-sample advantage.
        let unit = 2.0 / (2.0f64).sqrt();
        for r in 0..2 {
            assert!((at(&own, r, 0) - unit).abs() < 1e-5, "row {r}: {own}");
            assert!((at(&own, r, 1) + unit / 2.0).abs() < 1e-5, "row {r}: {own}");
        }
        // Row 2's own RMS (1.4e-6) is under the floor (1e-3): divided by the floor instead.
        assert!((at(&own, 2, 0) - 2e-3).abs() < 1e-7, "{own}");
        assert!(own.isfinite().all().int64_value(&[]) == 1);
        assert_eq!(at(&own, 3, 0), 0.0);
    }
}
