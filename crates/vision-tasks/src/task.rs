//! The task as a type: what the engine's loop needs to know about a vision task, and nothing
//! else. A [`Task`] names where a batch's targets are, computes the per-image task loss and KD
//! loss on its outputs, pools per-image signals for the weighting strategies, scores training
//! batches and makes the evaluation metric, whose [`MetricReport`] (a primary metric, named
//! scalars, per-class values) is what records, plots, summaries and comparison tables carry.
//!
//! [`Classification`] and [`Segmentation`] implement it; detection plugs in the same way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::classification::Accuracy;
use crate::detection::layout::{DetLayout, Targets};
use crate::detection::loss as det_loss;
use crate::detection::{percent, DetMetric};
use crate::error::{Error, Result};
use crate::loader::Batch;
use crate::segmentation::{Confusion, IGNORE};
use mtkd_distill_core::loss;
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::ModelOutput;
use mtkd_records::picture::{DrawBox, Picture};

pub use crate::kind::TaskKind;

pub use mtkd_records::metric::{metric_label, MetricReport};

/// The scalars besides the primary metric `primary` that comparison tables show.
pub fn table_scalars_for(primary: &str) -> &'static [&'static str] {
    mtkd_records::metric::metric_kind(primary).table
}

/// Accumulates a metric over evaluation batches.
pub trait Metric {
    /// Add a batch's logits.
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()>;
    fn report(&self) -> MetricReport;
    /// The file a finished run writes this metric's individual results to (detection:
    /// `detections.json`, COCO's result format); `None` when it keeps none.
    fn result_file(&self) -> Option<&'static str> {
        None
    }
    /// Write the individual results to `path`; `ids` are the data's COCO ids of the images
    /// (in set order) and of the classes, `None` to number both from 1.
    fn write_results(
        &self,
        path: &std::path::Path,
        ids: Option<&(Vec<u64>, Vec<u64>)>,
    ) -> Result<()> {
        let _ = (path, ids);
        Ok(())
    }
}

/// The KD loss on a dense task's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DenseKd {
    /// Pixel-wise `T^2 KL` over classes, averaged over the image's labelled pixels.
    #[default]
    Kl,
    /// Channel-wise distillation: per class channel, `T^2 KL` of the spatial softmaxes.
    Cwd,
}

/// What a task's per-teacher signals are computed from ([`Task::signals`]).
#[derive(Debug, Clone, Copy)]
pub struct SignalInputs<'a> {
    /// The student's logits (the task's shape).
    pub student_logits: &'a Tensor,
    /// The student's feature map adapted to each teacher's (`None` without feature KD).
    pub projected: &'a [Option<Tensor>],
    pub teachers: &'a [ModelOutput],
    /// The batch's targets ([`Task::targets`]).
    pub targets: &'a Tensor,
    /// Each image's class (what per-class records group by).
    pub image_labels: &'a Tensor,
    pub temperature: f64,
    /// Each teacher's per-image KD term, when the caller has computed them already.
    pub kl_terms: Option<&'a [Tensor]>,
}

/// What the training loop asks of a task.
pub trait Task: std::fmt::Debug + Send + Sync {
    fn kind(&self) -> TaskKind;
    /// The batch's targets: labels `[B]`, masks `[B, H, W]` or a detector's assigned
    /// locations `[B, L, 6]` ([`crate::detection::layout::Targets::pack`]).
    fn targets(&self, batch: &Batch) -> Result<Tensor>;
    /// Per-image task loss `[B]`.
    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor>;
    /// Per-image KD loss `[B]` of the student's logits against one teacher's.
    fn kd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        temperature: f64,
        targets: &Tensor,
    ) -> Result<Tensor>;
    /// The per-image signals the weighting strategies see (detached).
    #[allow(clippy::too_many_arguments)]
    fn signals(&self, i: &SignalInputs) -> Result<BatchSignals>;
    /// Per-image training score in `[0, 1]` `[B]` (top-1 correct, pixel accuracy).
    fn train_score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor>;
    /// The batch's targets ([`Task::targets`]) and image classes `[B]` with the rows of the
    /// samples that carry no label (`labelled [B]` bool false) replaced by the teachers'
    /// pseudo-targets: what the ensemble of `teachers` (their logits, averaged) predicts
    /// (docs/METHOD.md section 15). The labelled rows are kept as they are.
    fn pseudo_targets(
        &self,
        targets: &Tensor,
        image_labels: &Tensor,
        teachers: &[Tensor],
        labelled: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
    /// A fresh evaluation metric.
    fn metric(&self, num_classes: usize) -> Box<dyn Metric>;
    /// The primary metric's key.
    fn primary(&self) -> &'static str;
    /// Scalars besides the primary that comparison tables show.
    fn table_scalars(&self) -> &'static [&'static str] {
        table_scalars_for(self.primary())
    }
    /// The logits' shape per sample, given the input's `(H, W)` and `K`.
    fn logits_shape(&self, num_classes: i64, hw: (i64, i64)) -> Vec<i64>;
    /// A picture of the predictions on `batch`: for each image the truth, then what each of
    /// `logits` (the student's, then every teacher's) predicts, as a finished run draws it
    /// (`plots/overlays.png`, `plots/boxes.png`). `None`: the task draws none.
    fn picture(&self, batch: &Batch, logits: &[Tensor]) -> Result<Option<Picture>> {
        let _ = (batch, logits);
        Ok(None)
    }
    /// What a teacher's logits look like for this task, so that a loaded model can be checked:
    /// per-pixel `[B, K, H, W]` (`dense`), or a detector's `[B, K + 5, L]` over `locations`.
    fn teacher_output(&self, num_classes: i64, hw: (i64, i64)) -> TeacherOutput {
        let _ = (num_classes, hw);
        TeacherOutput::default()
    }
    /// The label of a pixel without one, when the targets are per pixel (segmentation): a
    /// strategy that weights each pixel reads it ([`mtkd_distill_core::signals::PixelInputs`]).
    fn pixel_ignore(&self) -> Option<i64> {
        None
    }
    /// Per-image KD `[B]` with a weight per teacher and pixel (`[B, M, H, W]`, segmentation) or
    /// location (`[B, M, L]`, detection) that a strategy gave ([`TeacherWeights::pixel`]).
    /// Classification has neither: the default refuses.
    ///
    /// [`TeacherWeights::pixel`]: mtkd_distill_core::weighting::TeacherWeights::pixel
    fn dense_weighted_kd(
        &self,
        _student: &Tensor,
        _teachers: &[Tensor],
        _weights: &Tensor,
        _targets: &Tensor,
        _temperature: f64,
    ) -> Result<Tensor> {
        Err(Error::Invalid {
            what: "teacher weights".into(),
            reason: format!(
                "weights per pixel or location need a dense task, not {:?}",
                self.kind()
            ),
        })
    }
    /// Detection: the per-location signals and look-ahead credit of a batch for strategies that
    /// weight each location (`labelled [B]`: which images the quiz reads; `None`: all).
    /// `None` for the other tasks.
    #[allow(clippy::too_many_arguments)]
    fn location_signals(
        &self,
        _student: &Tensor,
        _teachers: &[Tensor],
        _targets: &Tensor,
        _labelled: Option<&Tensor>,
        _temperature: f64,
        _kd_weight: f64,
        _quiz: mtkd_distill_core::signals::LocationQuiz,
    ) -> Result<Option<mtkd_distill_core::signals::LocationSignals>> {
        Ok(None)
    }
    /// Per-image KD `[B]` with each teacher's per-image weight `weights [B, M]` moved, pixel
    /// by pixel, to the teachers that are right there (`distill.pixel_weights =
    /// "confidence"`, docs/METHOD.md section 13). Dense tasks only: the default refuses.
    fn confidence_weighted_kd(
        &self,
        _student: &Tensor,
        _teachers: &[Tensor],
        _weights: &Tensor,
        _targets: &Tensor,
        _temperature: f64,
    ) -> Result<Tensor> {
        Err(Error::Invalid {
            what: "distill.pixel_weights".into(),
            reason: format!(
                "per-pixel teacher weights need a segmentation task, not {:?}",
                self.kind()
            ),
        })
    }
}

/// The shape of a teacher's output a task expects ([`Task::teacher_output`]): class logits by
/// default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TeacherOutput {
    /// Per-pixel logits `[B, K, H, W]`.
    pub dense: bool,
    /// A detector's location count `L` of `[B, K + 5, L]`.
    pub locations: Option<i64>,
}

/// The mean over the teachers of `f(logits)` (detached): the ensemble the pseudo-targets read.
fn ensemble_mean(teachers: &[Tensor], f: impl Fn(Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let first = teachers.first().ok_or_else(|| Error::Invalid {
        what: "pseudo-targets".into(),
        reason: "an unlabelled sample needs at least one teacher".into(),
    })?;
    let mut sum = f(first.detach())?;
    for t in &teachers[1..] {
        sum = sum.f_add(&f(t.detach())?)?;
    }
    Ok(sum / teachers.len() as f64)
}

/// The mean of the teachers' class probabilities (softmax over dim 1), detached.
fn ensemble_probs(teachers: &[Tensor]) -> Result<Tensor> {
    ensemble_mean(teachers, |t| Ok(t.f_softmax(1, Kind::Float)?))
}

/// `labelled` `[B]` viewed to broadcast over a tensor of `dims` dimensions.
fn rows(labelled: &Tensor, dims: usize) -> Result<Tensor> {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, dims.saturating_sub(1)));
    Ok(labelled.f_view(shape.as_slice())?)
}

/// The score a detection of the teachers' ensemble needs to become a pseudo-box on an
/// unlabelled image (`sqrt(p_class * p_centerness)`, docs/METHOD.md section 15).
pub const PSEUDO_BOX_SCORE: f64 = 0.5;

/// Image classification: cross-entropy, logit KD, top-1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Classification;

impl Task for Classification {
    fn kind(&self) -> TaskKind {
        TaskKind::Classification
    }
    fn targets(&self, batch: &Batch) -> Result<Tensor> {
        Ok(batch.labels.shallow_clone())
    }
    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(loss::cross_entropy(logits, targets)?)
    }
    fn kd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        temperature: f64,
        _: &Tensor,
    ) -> Result<Tensor> {
        Ok(loss::kd_kl(student, teacher, temperature)?)
    }
    fn signals(&self, i: &SignalInputs) -> Result<BatchSignals> {
        Ok(BatchSignals::compute_with_kl(
            i.student_logits,
            i.projected,
            i.teachers,
            i.targets,
            i.temperature,
            i.kl_terms,
        )?)
    }
    fn train_score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(loss::topk_correct(logits, targets, 1)?)
    }
    fn pseudo_targets(
        &self,
        targets: &Tensor,
        _: &Tensor,
        teachers: &[Tensor],
        labelled: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let pseudo = ensemble_probs(teachers)?.f_argmax(1, false)?;
        let t = targets.f_where_self(labelled, &pseudo)?;
        Ok((t.shallow_clone(), t))
    }
    fn metric(&self, num_classes: usize) -> Box<dyn Metric> {
        Box::new(Accuracy::new(num_classes))
    }
    fn primary(&self) -> &'static str {
        "top1"
    }
    fn logits_shape(&self, num_classes: i64, _: (i64, i64)) -> Vec<i64> {
        vec![num_classes]
    }
}

impl Metric for Accuracy {
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()> {
        Accuracy::update(self, logits, &batch.labels)
    }
    fn report(&self) -> MetricReport {
        let r = Accuracy::report(self);
        MetricReport {
            primary: "top1".into(),
            value: r.top1,
            scalars: [("top1".to_owned(), r.top1), ("top5".to_owned(), r.top5)]
                .into_iter()
                .collect(),
            per_class: r.per_class,
        }
    }
}

/// Semantic segmentation: per-pixel cross-entropy with an ignore label, pixel-wise KD (or CWD),
/// signals pooled per image, mIoU.
#[derive(Debug, Clone, Copy, Default)]
pub struct Segmentation {
    pub kd: DenseKd,
}

impl Segmentation {
    fn masks(batch: &Batch) -> Result<&Tensor> {
        batch.targets.masks().ok_or_else(|| Error::Invalid {
            what: "batch".into(),
            reason: "a segmentation batch carries no masks (the dataset has none)".into(),
        })
    }
}

impl Task for Segmentation {
    fn kind(&self) -> TaskKind {
        TaskKind::Segmentation
    }
    fn targets(&self, batch: &Batch) -> Result<Tensor> {
        Self::masks(batch).map(Tensor::shallow_clone)
    }
    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(loss::pixel_cross_entropy(
            logits,
            targets,
            i64::from(IGNORE),
        )?)
    }
    fn kd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        temperature: f64,
        targets: &Tensor,
    ) -> Result<Tensor> {
        Ok(match self.kd {
            DenseKd::Kl => loss::masked_image_mean(
                &loss::pixel_kd_kl(student, teacher, temperature)?,
                &loss::valid_pixels(targets, i64::from(IGNORE))?,
            )?,
            DenseKd::Cwd => loss::cwd(student, teacher, temperature)?,
        })
    }
    fn signals(&self, i: &SignalInputs) -> Result<BatchSignals> {
        Ok(BatchSignals::compute_dense(
            i.student_logits,
            i.projected,
            i.teachers,
            i.targets,
            i.image_labels,
            i64::from(IGNORE),
            i.temperature,
            i.kl_terms,
        )?)
    }
    fn train_score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let right = logits
            .f_argmax(1, false)?
            .f_eq_tensor(targets)?
            .f_to_kind(Kind::Float)?;
        Ok(loss::masked_image_mean(
            &right,
            &loss::valid_pixels(targets, i64::from(IGNORE))?,
        )?)
    }
    fn pseudo_targets(
        &self,
        targets: &Tensor,
        image_labels: &Tensor,
        teachers: &[Tensor],
        labelled: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let probs = ensemble_probs(teachers)?;
        let k = probs.size()[1];
        let pseudo = probs.f_argmax(1, false)?; // [B, H, W]
        let masks = targets.f_where_self(&rows(labelled, 3)?, &pseudo)?;
        // An unlabelled image's class: its most frequent foreground class in the pseudo-mask
        // (0 when it has none), as the readers label an image from its mask.
        let counts = pseudo
            .f_flatten(1, -1)?
            .f_one_hot(k)?
            .f_sum_dim_intlist(1, false, Kind::Float)?
            .f_slice(1, 1, k, 1)?;
        let any = counts.f_amax(1, false)?.f_gt(0.0)?;
        let fg = (counts.f_argmax(1, false)? + 1i64)
            .f_where_self(&any, &Tensor::zeros_like(&any).f_to_kind(Kind::Int64)?)?;
        let labels = image_labels.f_where_self(labelled, &fg)?;
        Ok((masks, labels))
    }
    fn metric(&self, num_classes: usize) -> Box<dyn Metric> {
        Box::new(Confusion::new(num_classes))
    }
    fn primary(&self) -> &'static str {
        "miou"
    }
    fn logits_shape(&self, num_classes: i64, hw: (i64, i64)) -> Vec<i64> {
        vec![num_classes, hw.0, hw.1]
    }
    fn picture(&self, batch: &Batch, logits: &[Tensor]) -> Result<Option<Picture>> {
        let per_image = |m: &Tensor| -> Result<Vec<Vec<i64>>> {
            let m = m.f_to_device(tch::Device::Cpu)?;
            (0..m.size()[0])
                .map(|i| Ok(Vec::<i64>::try_from(&m.get(i).flatten(0, -1))?))
                .collect()
        };
        // The truth draws a pixel that is not labelled as -1.
        let masks = Self::masks(batch)?;
        let truth = masks.where_self(&masks.ne(i64::from(IGNORE)), &masks.full_like(-1));
        let mut columns = vec![per_image(&truth)?];
        for l in logits {
            columns.push(per_image(&l.f_argmax(1, false)?)?);
        }
        Ok(Some(Picture::Masks(columns)))
    }
    fn teacher_output(&self, _: i64, _: (i64, i64)) -> TeacherOutput {
        TeacherOutput {
            dense: true,
            locations: None,
        }
    }
    fn pixel_ignore(&self) -> Option<i64> {
        Some(i64::from(IGNORE))
    }
    fn dense_weighted_kd(
        &self,
        student: &Tensor,
        teachers: &[Tensor],
        weights: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        Ok(loss::per_pixel_weighted_kd(
            student,
            teachers,
            weights,
            targets,
            i64::from(IGNORE),
            temperature,
        )?)
    }
    fn confidence_weighted_kd(
        &self,
        student: &Tensor,
        teachers: &[Tensor],
        weights: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        Ok(loss::pixel_weighted_kd(
            student,
            teachers,
            weights,
            targets,
            i64::from(IGNORE),
            temperature,
        )?)
    }
}

impl Metric for Confusion {
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()> {
        Confusion::update(self, logits, Segmentation::masks(batch)?)
    }
    fn report(&self) -> MetricReport {
        let r = Confusion::report(self);
        MetricReport {
            primary: "miou".into(),
            value: r.miou,
            scalars: [
                ("miou".to_owned(), r.miou),
                ("pixel_accuracy".to_owned(), r.pixel_accuracy),
            ]
            .into_iter()
            .collect(),
            per_class: r.per_class_iou,
        }
    }
}

/// Object detection (docs/METHOD.md, section 14): an FCOS-style output `[B, K + 5, L]` over
/// the locations of `layout`, the FCOS loss, foreground-weighted class KD plus box KD at
/// positive locations, signals pooled per image, COCO AP.
#[derive(Debug, Clone)]
pub struct Detection {
    pub layout: DetLayout,
    /// Weight of the box KD term inside a teacher's KD term (`distill.box_kd_weight`).
    pub box_kd_weight: f64,
}

impl Detection {
    fn unpack(&self, targets: &Tensor) -> Result<Targets> {
        Targets::unpack(targets)
    }
    /// The class count of an output `[B, K + 5, L]`.
    fn classes(&self, out: &Tensor) -> Result<i64> {
        self.layout.check(
            "detector output",
            out,
            out.size().get(1).copied().unwrap_or(0) - 5,
        )?;
        Ok(out.size()[1] - 5)
    }
}

impl Task for Detection {
    fn kind(&self) -> TaskKind {
        TaskKind::Detection
    }
    fn targets(&self, batch: &Batch) -> Result<Tensor> {
        let gt = batch.targets.objects().ok_or_else(|| Error::Invalid {
            what: "batch".into(),
            reason: "a detection batch carries no boxes (the dataset has none)".into(),
        })?;
        Ok(self.layout.assign(&gt.f_slice(2, 0, 5, 1)?)?.pack())
    }
    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        det_loss::fcos_loss(
            &self.layout,
            logits,
            &self.unpack(targets)?,
            self.classes(logits)?,
        )
    }
    fn kd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        temperature: f64,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let t = self.unpack(targets)?;
        let k = self.classes(student)?;
        if teacher.size() != student.size() {
            return Err(Error::Invalid {
                what: "detection KD".into(),
                reason: format!(
                    "teacher output {:?} and student output {:?} differ",
                    teacher.size(),
                    student.size()
                ),
            });
        }
        let class = det_loss::class_kd(student, teacher, &t, k, temperature)?;
        if self.box_kd_weight > 0.0 {
            let bx = det_loss::box_kd(&self.layout, student, teacher, &t, k)?;
            Ok(class + bx * self.box_kd_weight)
        } else {
            Ok(class)
        }
    }
    fn dense_weighted_kd(
        &self,
        student: &Tensor,
        teachers: &[Tensor],
        weights: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        let k = self.classes(student)?;
        det_loss::location_weighted_kd(
            &self.layout,
            student,
            teachers,
            weights,
            &self.unpack(targets)?,
            k,
            temperature,
            self.box_kd_weight,
        )
    }
    #[allow(clippy::too_many_arguments)]
    fn location_signals(
        &self,
        student: &Tensor,
        teachers: &[Tensor],
        targets: &Tensor,
        labelled: Option<&Tensor>,
        temperature: f64,
        kd_weight: f64,
        quiz: mtkd_distill_core::signals::LocationQuiz,
    ) -> Result<Option<mtkd_distill_core::signals::LocationSignals>> {
        let k = self.classes(student)?;
        let rows = match labelled {
            Some(l) => l.shallow_clone(),
            None => Tensor::ones([student.size()[0]], (Kind::Bool, student.device())),
        };
        Ok(Some(det_loss::location_signals(
            student,
            teachers,
            &self.unpack(targets)?,
            &rows,
            k,
            temperature,
            kd_weight,
            quiz,
        )?))
    }
    fn signals(&self, i: &SignalInputs) -> Result<BatchSignals> {
        let owned;
        let kl = match i.kl_terms {
            Some(k) => k,
            None => {
                owned = i
                    .teachers
                    .iter()
                    .map(|t| self.kd(i.student_logits, &t.logits, i.temperature, i.targets))
                    .collect::<Result<Vec<_>>>()?;
                &owned
            }
        };
        det_loss::detection_signals(
            &self.layout,
            i.student_logits,
            i.projected,
            i.teachers,
            &self.unpack(i.targets)?,
            i.image_labels,
            self.classes(i.student_logits)?,
            i.temperature,
            kl,
        )
    }
    /// The share of positive locations whose assigned class has the highest class logit and a
    /// probability above post-processing's candidate threshold, 0.05 (so that a one-class
    /// detector is not right everywhere by construction); 0 for an image without positives.
    fn train_score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let t = self.unpack(targets)?;
        let pos = t.positive();
        let cls = logits.f_slice(1, 0, self.classes(logits)?, 1)?; // [B, K, L]
        let (top, pred) = cls.f_max_dim(1, false)?;
        let right = pred
            .f_eq_tensor(&t.classes)?
            .f_logical_and(&top.f_gt((0.05f64 / 0.95).ln())?)?
            .f_to_kind(Kind::Float)?
            * &pos;
        Ok(right.f_sum_dim_intlist(1, false, Kind::Float)?
            / pos
                .f_sum_dim_intlist(1, false, Kind::Float)?
                .f_clamp_min(1.0)?)
    }
    fn pseudo_targets(
        &self,
        targets: &Tensor,
        image_labels: &Tensor,
        teachers: &[Tensor],
        labelled: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // The ensemble: the teachers' raw outputs averaged, decoded and kept above
        // PSEUDO_BOX_SCORE after NMS, then assigned to locations as ground truth is.
        let mean = ensemble_mean(teachers, Ok)?;
        let k = self.classes(&mean)?;
        let pp = crate::detection::Postprocess {
            score_threshold: PSEUDO_BOX_SCORE,
            ..Default::default()
        };
        let dets = crate::detection::postprocess(&self.layout, &mean, k, &pp)?;
        let objects: Vec<Vec<crate::objects::Object>> = dets
            .iter()
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        let [x1, y1, x2, y2] = d.bbox;
                        crate::objects::Object {
                            class: d.class,
                            bbox: d.bbox,
                            area: (x2 - x1).max(0.0) * (y2 - y1).max(0.0),
                        }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[crate::objects::Object]> = objects.iter().map(Vec::as_slice).collect();
        let gt = crate::objects::pack_objects(&refs).to_device(targets.device());
        let pseudo = self.layout.assign(&gt.f_slice(2, 0, 5, 1)?)?.pack();
        let assigned = targets.f_where_self(&rows(labelled, 3)?, &pseudo)?;
        let classes: Vec<i64> = objects
            .iter()
            .map(|o| crate::objects::image_label(o))
            .collect();
        let fg = Tensor::from_slice(&classes).to_device(image_labels.device());
        let labels = image_labels.f_where_self(labelled, &fg)?;
        Ok((assigned, labels))
    }
    fn metric(&self, num_classes: usize) -> Box<dyn Metric> {
        Box::new(DetMetric::new(self.layout.clone(), num_classes))
    }
    fn primary(&self) -> &'static str {
        "ap"
    }
    fn logits_shape(&self, num_classes: i64, _: (i64, i64)) -> Vec<i64> {
        vec![num_classes + 5, self.layout.len()]
    }
    fn picture(&self, batch: &Batch, logits: &[Tensor]) -> Result<Option<Picture>> {
        use crate::detection as det;
        let gt = batch.targets.objects().ok_or_else(|| Error::Invalid {
            what: "batch".into(),
            reason: "a detection batch carries no boxes".into(),
        })?;
        let truth = det::batch_objects(gt)?
            .into_iter()
            .map(|objs| {
                objs.into_iter()
                    .map(|o| DrawBox {
                        class: o.class,
                        bbox: o.bbox,
                        score: None,
                    })
                    .collect()
            })
            .collect();
        // What a reader can see: confident boxes, a few per image.
        let shown = det::Postprocess {
            score_threshold: 0.3,
            max_detections: 15,
            ..Default::default()
        };
        let mut columns = vec![truth];
        for l in logits {
            let found = det::postprocess(&self.layout, l, self.classes(l)?, &shown)?;
            columns.push(
                found
                    .into_iter()
                    .map(|ds| {
                        ds.into_iter()
                            .map(|d| DrawBox {
                                class: d.class,
                                bbox: d.bbox,
                                score: Some(d.score),
                            })
                            .collect()
                    })
                    .collect(),
            );
        }
        Ok(Some(Picture::Boxes(columns)))
    }
    fn teacher_output(&self, num_classes: i64, hw: (i64, i64)) -> TeacherOutput {
        TeacherOutput {
            dense: false,
            locations: Some(self.logits_shape(num_classes, hw)[1]),
        }
    }
}

impl Metric for DetMetric {
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()> {
        self.update_batch(logits, batch)
    }
    fn result_file(&self) -> Option<&'static str> {
        Some("detections.json")
    }
    fn write_results(
        &self,
        path: &std::path::Path,
        ids: Option<&(Vec<u64>, Vec<u64>)>,
    ) -> Result<()> {
        let (images, classes) = ids.map_or((&[][..], &[][..]), |(i, c)| (&i[..], &c[..]));
        crate::detection::coco::write_results(path, self.detections(), images, classes)
    }
    fn report(&self) -> MetricReport {
        let st = self.stats();
        let keys = [
            "ap",
            "ap50",
            "ap75",
            "ap_small",
            "ap_medium",
            "ap_large",
            "ar1",
            "ar10",
            "ar100",
            "ar_small",
            "ar_medium",
            "ar_large",
        ];
        let scalars: BTreeMap<String, f64> = keys
            .iter()
            .zip(st.stats)
            .map(|(k, v)| ((*k).to_owned(), percent(v)))
            .collect();
        MetricReport {
            primary: "ap".into(),
            // No ground truth at all: AP is 0 rather than undefined, so that ranking works.
            value: percent(st.stats[0]).max(0.0),
            scalars,
            per_class: st.per_category.iter().map(|&v| percent(v)).collect(),
        }
    }
}

/// What a task needs besides its kind.
#[derive(Debug, Clone, Default)]
pub struct TaskParams {
    /// Segmentation's KD loss.
    pub dense_kd: DenseKd,
    /// Detection: the input `(H, W)` (sets the layout) and the box KD weight.
    pub image: (i64, i64),
    pub box_kd_weight: f64,
}

/// The task of a kind.
pub fn task_of(kind: TaskKind, p: &TaskParams) -> Box<dyn Task> {
    match kind {
        TaskKind::Classification => Box::new(Classification),
        TaskKind::Segmentation => Box::new(Segmentation { kd: p.dense_kd }),
        TaskKind::Detection => Box::new(Detection {
            layout: DetLayout::standard(p.image),
            box_kd_weight: p.box_kd_weight,
        }),
    }
}
