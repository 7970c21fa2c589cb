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
use crate::error::{Error, Result};
use crate::loader::Batch;
use crate::segmentation::{Confusion, IGNORE};
use mtkd_distill_core::loss;
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::ModelOutput;

/// Which task a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    #[default]
    Classification,
    Segmentation,
}

/// An evaluation's figures: the primary metric (what "best epoch" and comparisons rank by),
/// named scalars (the primary among them) and one value per class; percent throughout.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricReport {
    /// Key of the primary metric in `scalars`: `top1` or `miou`.
    pub primary: String,
    #[serde(deserialize_with = "nan_f64")]
    pub value: f64,
    #[serde(default, deserialize_with = "nan_map")]
    pub scalars: BTreeMap<String, f64>,
    /// Per-class accuracy (classification) or IoU (segmentation; NaN, written `null`, for a
    /// class absent from truth and predictions).
    #[serde(default, deserialize_with = "nan_vec")]
    pub per_class: Vec<f64>,
}

fn nan_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
fn nan_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    Ok(BTreeMap::<String, Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}
fn nan_vec<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

impl MetricReport {
    /// A scalar by key (NaN when absent).
    pub fn get(&self, key: &str) -> f64 {
        self.scalars.get(key).copied().unwrap_or(f64::NAN)
    }
}

/// How people read a metric key: `top1` -> `top-1`, `miou` -> `mIoU`, ...
pub fn metric_label(key: &str) -> &str {
    match key {
        // `test_top1`: the name in summaries of mtkd before 0.2.
        "top1" | "test_top1" => "top-1",
        "top5" => "top-5",
        "miou" => "mIoU",
        "pixel_accuracy" => "pixel acc.",
        other => other,
    }
}

/// The scalars besides the primary metric `primary` that comparison tables show (what
/// [`Task::table_scalars`] says for the task whose primary metric it is).
pub fn table_scalars_for(primary: &str) -> &'static [&'static str] {
    match primary {
        "miou" => Segmentation::default().table_scalars(),
        _ => Classification.table_scalars(),
    }
}

/// Accumulates a metric over evaluation batches.
pub trait Metric {
    /// Add a batch's logits.
    fn update(&mut self, logits: &Tensor, batch: &Batch) -> Result<()>;
    fn report(&self) -> MetricReport;
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

/// What the training loop asks of a task.
pub trait Task: std::fmt::Debug + Send + Sync {
    fn kind(&self) -> TaskKind;
    /// The batch's targets: labels `[B]` or masks `[B, H, W]`.
    fn targets<'b>(&self, batch: &'b Batch) -> Result<&'b Tensor>;
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
    fn signals(
        &self,
        student_logits: &Tensor,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        targets: &Tensor,
        image_labels: &Tensor,
        temperature: f64,
        kl_terms: Option<&[Tensor]>,
    ) -> Result<BatchSignals>;
    /// Per-image training score in `[0, 1]` `[B]` (top-1 correct, pixel accuracy).
    fn train_score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor>;
    /// A fresh evaluation metric.
    fn metric(&self, num_classes: usize) -> Box<dyn Metric>;
    /// The primary metric's key.
    fn primary(&self) -> &'static str;
    /// Scalars besides the primary that comparison tables show.
    fn table_scalars(&self) -> &'static [&'static str];
    /// The logits' shape per sample, given the input's `(H, W)` and `K`.
    fn logits_shape(&self, num_classes: i64, hw: (i64, i64)) -> Vec<i64>;
}

/// Image classification: cross-entropy, logit KD, top-1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Classification;

impl Task for Classification {
    fn kind(&self) -> TaskKind {
        TaskKind::Classification
    }
    fn targets<'b>(&self, batch: &'b Batch) -> Result<&'b Tensor> {
        Ok(&batch.labels)
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
    fn signals(
        &self,
        student_logits: &Tensor,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        targets: &Tensor,
        _image_labels: &Tensor,
        temperature: f64,
        kl_terms: Option<&[Tensor]>,
    ) -> Result<BatchSignals> {
        Ok(BatchSignals::compute_with_kl(
            student_logits,
            projected,
            teachers,
            targets,
            temperature,
            kl_terms,
        )?)
    }
    fn train_score(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(loss::topk_correct(logits, targets, 1)?)
    }
    fn metric(&self, num_classes: usize) -> Box<dyn Metric> {
        Box::new(Accuracy::new(num_classes))
    }
    fn primary(&self) -> &'static str {
        "top1"
    }
    fn table_scalars(&self) -> &'static [&'static str] {
        &[]
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
        batch.masks.as_ref().ok_or_else(|| Error::Invalid {
            what: "batch".into(),
            reason: "a segmentation batch carries no masks (the dataset has none)".into(),
        })
    }
}

impl Task for Segmentation {
    fn kind(&self) -> TaskKind {
        TaskKind::Segmentation
    }
    fn targets<'b>(&self, batch: &'b Batch) -> Result<&'b Tensor> {
        Self::masks(batch)
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
    fn signals(
        &self,
        student_logits: &Tensor,
        projected: &[Option<Tensor>],
        teachers: &[ModelOutput],
        targets: &Tensor,
        image_labels: &Tensor,
        temperature: f64,
        kl_terms: Option<&[Tensor]>,
    ) -> Result<BatchSignals> {
        Ok(BatchSignals::compute_dense(
            student_logits,
            projected,
            teachers,
            targets,
            image_labels,
            i64::from(IGNORE),
            temperature,
            kl_terms,
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
    fn metric(&self, num_classes: usize) -> Box<dyn Metric> {
        Box::new(Confusion::new(num_classes))
    }
    fn primary(&self) -> &'static str {
        "miou"
    }
    fn table_scalars(&self) -> &'static [&'static str] {
        &["pixel_accuracy"]
    }
    fn logits_shape(&self, num_classes: i64, hw: (i64, i64)) -> Vec<i64> {
        vec![num_classes, hw.0, hw.1]
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

/// The task of a kind.
pub fn task_of(kind: TaskKind, dense_kd: DenseKd) -> Box<dyn Task> {
    match kind {
        TaskKind::Classification => Box::new(Classification),
        TaskKind::Segmentation => Box::new(Segmentation { kd: dense_kd }),
    }
}
