//! Per-sample, per-teacher signals of docs/METHOD.md section 2, computed once per batch and detached.
//! Weighting strategies read them; the agent builds its state from them.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::{loss, ModelOutput};

/// The detached signals of one batch for M teachers (fixed teacher order).
///
/// # Shapes
/// Matrices are `[B, M]`; `teacher_logits[m]` is `[B, K]`, `teacher_embeddings[m]` `[B, C_m]`.
#[derive(Debug)]
pub struct BatchSignals {
    /// Cross-entropy of each teacher's logits against the labels (teacher performance).
    pub ce: Tensor,
    /// `T^2 KL(p_m || q)` between teacher and student at temperature T (student-teacher gap).
    pub kl: Tensor,
    /// Cosine similarity of the pooled projected student map and the teacher embedding;
    /// `None` when some teacher has no feature map or no projection was given.
    pub cos: Option<Tensor>,
    /// Entropy of each teacher's softmax at T = 1.
    pub entropy: Tensor,
    /// Each teacher's logits.
    pub teacher_logits: Vec<Tensor>,
    /// Each teacher's pooled embedding, when it has a feature map.
    pub teacher_embeddings: Vec<Option<Tensor>>,
    /// The student's logits (detached).
    pub student_logits: Tensor,
    /// Integer labels `[B]`.
    pub labels: Tensor,
    /// The KD temperature the KL was computed at.
    pub temperature: f64,
    /// The student's classifier, for strategies that look ahead through it (MMKD); set by the
    /// engine when [`crate::weighting::WeightingStrategy::wants_student_head`] says so.
    pub student_head: Option<StudentHead>,
    /// Which samples carry their label `[B]` bool (`None`: all of them). The signals of the
    /// others were computed against the teachers' pseudo-targets, which `labels` then holds
    /// for them; set by the engine.
    pub labelled: Option<Tensor>,
    /// A segmentation batch's per-pixel inputs, for strategies that weight each pixel
    /// ([`crate::weighting::WeightingStrategy::wants_pixels`]); set by the engine.
    pub pixels: Option<PixelInputs>,
    /// A detection batch's per-location signals and look-ahead credit, for strategies that
    /// weight each location ([`crate::weighting::WeightingStrategy::wants_locations`]); set by
    /// the engine.
    pub locations: Option<LocationSignals>,
}

/// The classification loss a detection look-ahead credit is scored on (`[distill.agent]
/// location_quiz`, docs/METHOD.md section 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocationQuiz {
    /// The task's own: sigmoid focal loss (alpha 0.25, gamma 2).
    Focal,
    /// Focal loss without the focusing factor (gamma 0, alpha 0.25): alpha-balanced binary
    /// cross-entropy, whose gradient at an easy background location is the student's score
    /// there rather than about its cube (default: measured on the detection pools,
    /// docs/AGENT.md).
    #[default]
    BalancedCe,
}

/// Per-location signals of a detection batch (detached), computed by the task.
///
/// # Shapes
/// `ce`, `kl`, `entropy` and `credit` are `[B, M, L]`; `valid` `[B, L]` float (1 where a
/// strategy may learn from the location: the locations of labelled images).
#[derive(Debug)]
pub struct LocationSignals {
    /// Each teacher's focal loss at the location against the assigned class.
    pub ce: Tensor,
    /// Each teacher's class KD term at the location.
    pub kl: Tensor,
    /// The binary entropy of each teacher's class probabilities there.
    pub entropy: Tensor,
    /// The look-ahead credit of each teacher at each location (docs/METHOD.md section 14).
    pub credit: Tensor,
    /// The quiz loss the credit was taken on (a scalar).
    pub quiz_loss: Tensor,
    pub valid: Tensor,
    /// The class of the box each location is assigned to, -1 where none `[B, L]` (int64).
    pub classes: Tensor,
}

/// A segmentation batch's per-pixel outputs and targets (detached).
///
/// # Shapes
/// `teacher_logits[m]` and `student_logits` `[B, K, H, W]`, `targets` `[B, H, W]` int64 (the
/// pseudo-targets on unlabelled images; `ignore_index` where a pixel has no label).
#[derive(Debug)]
pub struct PixelInputs {
    pub teacher_logits: Vec<Tensor>,
    pub student_logits: Tensor,
    pub targets: Tensor,
    pub ignore_index: i64,
}

/// The student's linear classifier and its input for one batch: `logits = embedding W' + bias`.
///
/// # Shapes
/// `embedding [B, D]`, `weight [K, D]`, `bias [K]`; all detached.
#[derive(Debug)]
pub struct StudentHead {
    pub embedding: Tensor,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The student's learning rate at this step.
    pub lr: f64,
    /// Segmentation, for strategies that weight each pixel: the input of the 1x1 classifier at
    /// every pixel of the logits, `[B, D, H, W]` (the head's map, upsampled as the logits are:
    /// bilinear interpolation commutes with a 1x1 convolution, so the logits at a pixel are
    /// `weight` times its column plus `bias`).
    pub pixel_embedding: Option<Tensor>,
}

impl BatchSignals {
    /// A look-ahead's quiz from this batch: the rows of `embedding` `[B, D]` and the labels of
    /// the samples that carry their label (detached; `None` when none does).
    pub fn quiz(&self, embedding: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let emb = embedding.detach().f_to_kind(Kind::Float)?;
        match &self.labelled {
            None => Ok(Some((emb, self.labels.detach()))),
            Some(l) => {
                let idx = l.f_nonzero()?.f_squeeze_dim(1)?;
                if idx.size()[0] == 0 {
                    return Ok(None);
                }
                Ok(Some((
                    emb.f_index_select(0, &idx)?,
                    self.labels.detach().f_index_select(0, &idx)?,
                )))
            }
        }
    }

    /// Each sample's share of the cross-entropy term `[B]` float: 1 everywhere when every
    /// sample is labelled, else `B / n_labelled` on the labelled ones and 0 on the others (the
    /// training step's task loss, averaged over the labelled samples).
    pub fn ce_share(&self) -> Result<Option<Tensor>> {
        let Some(l) = &self.labelled else {
            return Ok(None);
        };
        let f = l.f_to_kind(Kind::Float)?;
        let n = f.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
        Ok(Some(f * self.batch_size() as f64 / n))
    }

    /// Compute all signals without gradient.
    ///
    /// `projected[m]` is adapter m's output for the student's map (`None` when feature KD is off).
    pub fn compute(
        student_logits: &Tensor,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        labels: &Tensor,
        temperature: f64,
    ) -> Result<BatchSignals> {
        Self::compute_with_kl(
            student_logits,
            projected,
            teachers,
            labels,
            temperature,
            None,
        )
    }

    /// As [`BatchSignals::compute`], reusing per-teacher KL terms `[B]` that the caller already
    /// computed (the training step computes them with gradient; they are detached here).
    pub fn compute_with_kl(
        student_logits: &Tensor,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        labels: &Tensor,
        temperature: f64,
        kl_terms: Option<&[Tensor]>,
    ) -> Result<BatchSignals> {
        with_columns(student_logits, teachers, kl_terms, |s, mut c| {
            for (m, t) in teachers.iter().enumerate() {
                c.ce.push(loss::cross_entropy(&t.logits, labels)?);
                c.kl.push(match kl_terms {
                    Some(k) => k[m].detach(),
                    None => loss::kd_kl(&s, &t.logits, temperature)?,
                });
                c.entropy.push(loss::entropy(&t.logits)?);
                c.logits.push(t.logits.detach());
            }
            c.into_signals(projected, teachers, s, labels, temperature)
        })
    }

    /// The signals of a dense (per-pixel) task, pooled per image (docs/METHOD.md section 9):
    /// `ce`, `kl` and `entropy` are each teacher's per-pixel values averaged over the image's
    /// valid pixels (`targets != ignore_index`); `teacher_logits` and `student_logits` are the
    /// logits averaged over the same pixels `[B, K]`; `labels` are the per-image labels
    /// `image_labels [B]` (the engine's: the most frequent foreground class of the mask).
    /// Every strategy written for classification therefore runs unchanged.
    ///
    /// `kl_terms[m]`, when given, are the per-image pooled KD terms `[B]` the step computed.
    ///
    /// # Shapes
    /// `student_logits [B, K, H, W]`, teachers' logits the same, `targets [B, H, W]` (int64),
    /// `image_labels [B]`.
    #[allow(clippy::too_many_arguments)]
    pub fn compute_dense(
        student_logits: &Tensor,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        targets: &Tensor,
        image_labels: &Tensor,
        ignore_index: i64,
        temperature: f64,
        kl_terms: Option<&[Tensor]>,
    ) -> Result<BatchSignals> {
        with_columns(student_logits, teachers, kl_terms, |s, mut c| {
            let valid = loss::valid_pixels(targets, ignore_index)?;
            for (m, t) in teachers.iter().enumerate() {
                c.ce.push(loss::pixel_cross_entropy(&t.logits, targets, ignore_index)?);
                c.kl.push(match kl_terms {
                    Some(k) => k[m].detach(),
                    None => loss::masked_image_mean(
                        &loss::pixel_kd_kl(&s, &t.logits, temperature)?,
                        &valid,
                    )?,
                });
                c.entropy.push(loss::masked_image_mean(
                    &loss::pixel_entropy(&t.logits)?,
                    &valid,
                )?);
                c.logits.push(loss::pooled_logits(&t.logits, &valid)?);
            }
            let student = loss::pooled_logits(&s, &valid)?;
            c.into_signals(projected, teachers, student, image_labels, temperature)
        })
    }

    /// Number of samples B.
    pub fn batch_size(&self) -> i64 {
        self.ce.size()[0]
    }

    /// Number of teachers M.
    pub fn num_teachers(&self) -> i64 {
        self.ce.size()[1]
    }

    /// Per-teacher mean of a `[B, M]` matrix as plain numbers (for metrics).
    pub fn column_means(t: &Tensor) -> Vec<f64> {
        let means = t.mean_dim(0, false, Kind::Double);
        Vec::<f64>::try_from(&means).unwrap_or_default()
    }
}

/// A batch's signals per teacher before they are stacked: each entry is one teacher's `[B]`
/// column (pooled logits `[B, K]`), in pool order.
#[derive(Debug, Default)]
pub struct TeacherColumns {
    pub ce: Vec<Tensor>,
    pub kl: Vec<Tensor>,
    pub entropy: Vec<Tensor>,
    pub logits: Vec<Tensor>,
}

impl TeacherColumns {
    /// Empty columns for `m` teachers.
    pub fn with_capacity(m: usize) -> TeacherColumns {
        TeacherColumns {
            ce: Vec::with_capacity(m),
            kl: Vec::with_capacity(m),
            entropy: Vec::with_capacity(m),
            logits: Vec::with_capacity(m),
        }
    }

    /// The [`BatchSignals`]: columns stacked to `[B, M]`, with the cosines of `projected` to
    /// the teachers' embeddings, the student's (pooled) logits and the per-image labels.
    pub fn into_signals(
        self,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        student_logits: Tensor,
        labels: &Tensor,
        temperature: f64,
    ) -> Result<BatchSignals> {
        let (cos, embeddings) = cosines(projected, teachers)?;
        Ok(BatchSignals {
            ce: Tensor::f_stack(&self.ce, 1)?,
            kl: Tensor::f_stack(&self.kl, 1)?,
            cos,
            entropy: Tensor::f_stack(&self.entropy, 1)?,
            teacher_logits: self.logits,
            teacher_embeddings: embeddings,
            student_logits,
            labels: labels.shallow_clone(),
            temperature,
            student_head: None,
            labelled: None,
            pixels: None,
            locations: None,
        })
    }
}

/// The inputs every signal computation refuses: no teacher, or precomputed KL terms that do
/// not match the teachers.
pub fn check_teachers(teachers: &[ModelOutput], kl_terms: Option<&[Tensor]>) -> Result<()> {
    if teachers.is_empty() {
        return Err(Error::Invalid {
            what: "teachers".into(),
            reason: "signals need at least one teacher".into(),
        });
    }
    if let Some(k) = kl_terms {
        if k.len() != teachers.len() {
            return Err(Error::Invalid {
                what: "precomputed KL terms".into(),
                reason: format!("{} terms for {} teachers", k.len(), teachers.len()),
            });
        }
    }
    Ok(())
}

/// The frame of a signal computation: the inputs checked ([`check_teachers`]), then, without
/// gradient, `fill` given the detached student logits and empty columns for the teachers, from
/// which it makes the [`BatchSignals`].
pub fn with_columns(
    student_logits: &Tensor,
    teachers: &[ModelOutput],
    kl_terms: Option<&[Tensor]>,
    fill: impl FnOnce(Tensor, TeacherColumns) -> Result<BatchSignals>,
) -> Result<BatchSignals> {
    check_teachers(teachers, kl_terms)?;
    tch::no_grad(|| {
        fill(
            student_logits.detach(),
            TeacherColumns::with_capacity(teachers.len()),
        )
    })
}

/// Cosine of each teacher's embedding and the pooled projected student map `[B, M]` (`None`
/// when some teacher has no feature map or no projection was given), and the embeddings.
#[allow(clippy::type_complexity)]
pub fn cosines(
    projected: &[Option<Tensor>],
    teachers: &[ModelOutput],
) -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
    let mut cos = Vec::with_capacity(teachers.len());
    let mut embeddings = Vec::with_capacity(teachers.len());
    for (m, t) in teachers.iter().enumerate() {
        let emb = t.embedding();
        let proj = projected.get(m).and_then(Option::as_ref);
        match (proj, emb.as_ref()) {
            (Some(p), Some(e)) => {
                let pooled = p.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
                cos.push(Some(loss::cosine(&pooled, e)?));
            }
            _ => cos.push(None),
        }
        embeddings.push(emb);
    }
    let cos = if cos.iter().all(Option::is_some) {
        let cols: Vec<Tensor> = cos.into_iter().flatten().collect();
        Some(Tensor::f_stack(&cols, 1)?)
    } else {
        None
    };
    Ok((cos, embeddings))
}
