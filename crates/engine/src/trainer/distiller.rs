//! The distiller, built once from `[distill]` and the pool: the adapters that project the
//! student's feature map onto each teacher's, the KD and feature terms, per-pixel weighting and
//! the weighting strategy. Per batch it turns the student's output and the teachers' outputs
//! into named [`Terms`] that the step adds up; the step knows nothing of KD beyond them.

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::adapter::Adapter;
use mtkd_distill_core::loss;
use mtkd_distill_core::signals::{BatchSignals, PixelInputs, StudentHead};
use mtkd_distill_core::weighting::{Feedback, TeacherWeights, WeightingStrategy};
use mtkd_distill_core::ModelOutput;
use mtkd_student::Network;
use mtkd_vision_tasks::task::{SignalInputs, Task};

use super::evaluate::Sums;
use super::pool::Pool;
use crate::config::{Config, DistillConfig, FeatureLoss, PixelWeights, StrategyKind};

/// A batch's distillation, term by term.
///
/// # Shapes
/// Per-sample terms are `[B]`; `weights` are `[B, M_active]` (the active teachers, pool order).
pub(crate) struct Terms {
    /// `ce_weight * CE + kd_weight * KD + feature_weight * feature`, with gradient.
    pub(crate) total: Tensor,
    /// The teacher-weighted KD term (per image).
    pub(crate) kd: Tensor,
    /// The teacher-weighted feature term (per image; zeros without feature KD).
    pub(crate) feature: Tensor,
    /// What the strategy saw (detached).
    pub(crate) signals: BatchSignals,
    /// What the strategy gave.
    pub(crate) weights: TeacherWeights,
    /// The active teachers' outputs the terms were computed from.
    pub(crate) teachers: Vec<ModelOutput>,
}

/// The `[distill]` values a batch's terms use (copied once: no table clone per step).
#[derive(Debug, Clone, Copy)]
struct TermSettings {
    temperature: f64,
    ce_weight: f64,
    kd_weight: f64,
    feature_weight: f64,
    pixel_weights: PixelWeights,
    feature_loss: FeatureLoss,
    /// The loss a detection look-ahead credit is scored on (`[distill.agent] location_quiz`).
    location_quiz: mtkd_distill_core::signals::LocationQuiz,
}

/// Where a step is, for the strategy's errors: `(epoch, global step)`, epoch 0-based.
pub(crate) type At = (usize, u64);

/// Adapters, loss terms and the weighting strategy of a run.
pub(crate) struct Distiller {
    /// The `[distill]` table when the run distils (a pool, a strategy other than `none`).
    settings: Option<DistillConfig>,
    /// Its values the terms use.
    terms: Option<TermSettings>,
    /// Whether the teachers' feature maps are used (feature KD); without, they are dropped so
    /// that the strategy sees the same signals whatever the teacher source.
    with_features: bool,
    pub(crate) adapter_vs: VarStore,
    pub(crate) adapters: Vec<Adapter>,
    pub(crate) strategy: Box<dyn WeightingStrategy>,
}

impl Distiller {
    /// The distiller of `cfg` for `pool` and the student `student`.
    pub(crate) fn new(
        cfg: &Config,
        pool: &Pool,
        student: &Network,
        num_classes: i64,
        device: Device,
    ) -> Result<Distiller> {
        let settings = cfg
            .distill
            .clone()
            .filter(|d| d.strategy != StrategyKind::None && !pool.is_empty());
        let adapter_vs = VarStore::new(device);
        let mut adapters = Vec::new();
        if cfg
            .distill
            .as_ref()
            .is_some_and(|d| d.feature_weight > 0.0 && d.strategy != StrategyKind::None)
        {
            for (m, member) in pool.members.iter().enumerate() {
                let shape = member.teacher.feature_shape().ok_or_else(|| {
                    anyhow!(
                        "teacher `{}` gives logits only, but distill.feature_weight > 0 asks for feature KD; \
                         set distill.feature_weight = 0 or use a teacher that returns its feature map",
                        member.teacher.name()
                    )
                })?;
                adapters.push(Adapter::new(
                    &(adapter_vs.root() / m),
                    student.feature_shape(),
                    shape,
                ));
            }
        }
        let strategy = super::strategy::build(cfg, &pool.members, num_classes, device)?;
        let terms = settings.as_ref().map(|d| TermSettings {
            temperature: d.temperature,
            ce_weight: d.ce_weight,
            kd_weight: d.kd_weight,
            feature_weight: d.feature_weight,
            pixel_weights: d.pixel_weights,
            feature_loss: d.feature_loss,
            location_quiz: d
                .agent
                .as_ref()
                .map(|a| a.location_quiz)
                .unwrap_or_default(),
        });
        Ok(Distiller {
            settings,
            terms,
            with_features: crate::shared::with_features(cfg),
            adapter_vs,
            adapters,
            strategy,
        })
    }

    /// The `[distill]` table when the run distils.
    pub(crate) fn settings(&self) -> Option<&DistillConfig> {
        self.settings.as_ref()
    }

    /// The student's classifier and its input, when the strategy reads them (MMKD, the meta
    /// agent's look-ahead).
    pub(crate) fn student_head(
        &self,
        task: &dyn Task,
        student: &Network,
        out: &ModelOutput,
        lr: f64,
    ) -> Result<Option<StudentHead>> {
        if !self.strategy.wants_student_head() {
            return Ok(None);
        }
        let (weight, bias) = student.classifier();
        // Segmentation, per-pixel strategies: the classifier's input at every pixel of the
        // logits (the head's map upsampled as the logits are).
        let pixel_embedding = match (self.pixels(task), &out.features) {
            (true, Some(f)) => {
                let s = out.logits.size();
                let f = f.detach();
                Some(if f.size()[2..] == s[2..] {
                    f
                } else {
                    f.upsample_bilinear2d([s[2], s[3]], false, None, None)
                })
            }
            _ => None,
        };
        Ok(Some(StudentHead {
            embedding: out
                .embedding()
                .ok_or_else(|| anyhow!("the student gives no feature map"))?
                .detach(),
            weight: weight.detach(),
            bias: bias.as_ref().map(Tensor::detach),
            lr,
            pixel_embedding,
        }))
    }

    /// Whether the strategy weights this task's batches per pixel.
    fn pixels(&self, task: &dyn Task) -> bool {
        self.strategy.wants_pixels() && task.pixel_ignore().is_some()
    }

    /// The terms of one batch: `out` is the student's training-mode output, `ce` its per-image
    /// task loss, `teachers` the active teachers' outputs (`active`: their pool positions),
    /// `labelled` which samples carry their label (`None`: all).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn terms(
        &mut self,
        task: &dyn Task,
        out: &ModelOutput,
        ce: &Tensor,
        targets: &Tensor,
        labels: &Tensor,
        labelled: Option<&Tensor>,
        teachers: Vec<ModelOutput>,
        active: &[usize],
        head: Option<StudentHead>,
        sums: &mut Sums,
        at: At,
    ) -> Result<Terms> {
        let d = self
            .terms
            .context("the distiller was asked for terms in a run without distillation")?;
        let teachers = if self.with_features {
            teachers
        } else {
            teachers
                .into_iter()
                .map(|o| ModelOutput {
                    logits: o.logits,
                    features: None,
                })
                .collect()
        };
        let features = out
            .features
            .as_ref()
            .ok_or_else(|| anyhow!("the student gives no feature map"))?;
        let projected: Vec<Option<Tensor>> = if self.adapters.is_empty() {
            (0..teachers.len()).map(|_| None).collect()
        } else {
            active
                .iter()
                .map(|&i| self.adapters[i].forward(features, true).map(Some))
                .collect::<std::result::Result<_, _>>()?
        };
        // The KL terms with gradient, once; the signals get them detached.
        let kl_terms: Vec<Tensor> = teachers
            .iter()
            .map(|t| task.kd(&out.logits, &t.logits, d.temperature, targets))
            .collect::<std::result::Result<_, _>>()?;
        let t1 = Instant::now();
        let mut signals = task.signals(&SignalInputs {
            student_logits: &out.logits,
            projected: &projected,
            teachers: &teachers,
            targets,
            image_labels: labels,
            temperature: d.temperature,
            kl_terms: Some(&kl_terms),
        })?;
        signals.student_head = head;
        signals.labelled = labelled.map(Tensor::shallow_clone);
        if let (true, Some(ignore_index)) = (self.pixels(task), task.pixel_ignore()) {
            signals.pixels = Some(PixelInputs {
                teacher_logits: teachers.iter().map(|t| t.logits.detach()).collect(),
                student_logits: out.logits.detach(),
                targets: targets.shallow_clone(),
                ignore_index,
            });
        }
        if self.strategy.wants_locations() {
            signals.locations = task.location_signals(
                &out.logits.detach(),
                &teachers
                    .iter()
                    .map(|t| t.logits.detach())
                    .collect::<Vec<_>>(),
                targets,
                labelled,
                d.temperature,
                d.kd_weight,
                d.location_quiz,
            )?;
        }
        sums.signal_seconds += t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let weights = self
            .strategy
            .weights(&signals)
            .with_context(|| self.strategy_at(at))?;
        sums.strategy_seconds += t2.elapsed().as_secs_f64();
        let b = ce.size()[0];
        let device = ce.device();
        let mut kd = Tensor::zeros([b], (Kind::Float, device));
        let mut feature = Tensor::zeros([b], (Kind::Float, device));
        // `distill.pixel_weights = "confidence"`: each teacher's per-image weight is spread
        // over the image's pixels by its confidence there (docs/METHOD.md section 13); the KD
        // term is then recomputed per pixel.
        let teacher_logits =
            || -> Vec<Tensor> { teachers.iter().map(|t| t.logits.shallow_clone()).collect() };
        let per_pixel = match (&weights.pixel, d.pixel_weights) {
            // The strategy weighted each pixel itself.
            (Some(w), _) => Some(task.dense_weighted_kd(
                &out.logits,
                &teacher_logits(),
                w,
                targets,
                d.temperature,
            )?),
            (None, PixelWeights::Image) => None,
            (None, PixelWeights::Confidence) => Some(task.confidence_weighted_kd(
                &out.logits,
                &teacher_logits(),
                &weights.logit,
                targets,
                d.temperature,
            )?),
        };
        for (m, (t, term)) in teachers.iter().zip(&kl_terms).enumerate() {
            if per_pixel.is_none() {
                kd += weights.logit.select(1, m as i64) * term;
            }
            if let (Some(p), Some(tf)) = (&projected[m], &t.features) {
                let term = match d.feature_loss {
                    FeatureLoss::Mse => loss::feature_mse(p, tf)?,
                    FeatureLoss::Cwd => loss::cwd(p, tf, d.temperature)?,
                    FeatureLoss::Pearson => loss::feature_pearson(p, tf)?,
                };
                feature += weights.feature.select(1, m as i64) * term;
            }
        }
        if let Some(k) = per_pixel {
            kd = k;
        }
        let total = ce * d.ce_weight + &kd * d.kd_weight + &feature * d.feature_weight;
        Ok(Terms {
            total,
            kd,
            feature,
            signals,
            weights,
            teachers,
        })
    }

    /// The strategy learns from what its weights led to.
    pub(crate) fn observe(&mut self, terms: &Terms, feedback: &Feedback, at: At) -> Result<()> {
        self.strategy
            .observe(&terms.signals, &terms.weights, feedback)
            .with_context(|| self.strategy_at(at))?;
        Ok(())
    }

    /// `strategy `NAME` at epoch E step S`, the context of the strategy's errors.
    fn strategy_at(&self, (epoch, step): At) -> String {
        format!(
            "strategy `{}` at epoch {} step {step}",
            self.strategy.name(),
            epoch + 1
        )
    }
}
