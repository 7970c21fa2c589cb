//! What a run records: one [`EpochRecord`] per epoch (a line of `metrics.jsonl`) and the
//! [`Summary`] written to `summary.json` at the end.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use crate::metric::MetricReport;

/// One epoch's numbers. Losses are means over the epoch's samples; metrics in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    #[serde(deserialize_with = "nan_null::f64")]
    pub lr: f64,
    #[serde(deserialize_with = "nan_null::f64")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_null::f64")]
    pub train_ce: f64,
    #[serde(deserialize_with = "nan_null::f64")]
    pub train_kd: f64,
    #[serde(deserialize_with = "nan_null::f64")]
    pub train_feature: f64,
    /// The task's training score over the epoch's batches (training mode, augmented): top-1
    /// for classification, the mean per-image pixel accuracy for segmentation.
    #[serde(deserialize_with = "nan_null::f64")]
    pub train_metric: f64,
    #[serde(deserialize_with = "nan_null::f64")]
    pub test_loss: f64,
    /// The task's evaluation on the test split (`test.value` is the primary metric).
    pub test: MetricReport,
    /// Mean logit weight per teacher over the epoch (pool order); empty without teachers.
    #[serde(default, deserialize_with = "nan_null::vec")]
    pub teacher_weights: Vec<f64>,
    /// The weighting strategy's diagnostics (agent loss, reward statistics, weight entropy,
    /// mix coefficients, mean feature weight per teacher, ...).
    #[serde(default, deserialize_with = "nan_null::map")]
    pub strategy_metrics: std::collections::BTreeMap<String, f64>,
    /// Batches skipped because their loss was not finite (`on_nonfinite = "skip"`).
    pub skipped_batches: usize,
    /// Wall seconds of the epoch (training and evaluation).
    #[serde(deserialize_with = "nan_null::f64")]
    pub seconds: f64,
    /// Of those, the seconds spent getting the teachers' outputs (forward passes, or reads of
    /// shared outputs).
    #[serde(default, deserialize_with = "nan_null::f64")]
    pub teacher_seconds: f64,
    /// Data-parallel runs: the ranks and rank 0's time in the step's collectives; absent for
    /// one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallel>,
    /// Mean feature weight per teacher over the epoch (full pool order, 0 for a pruned teacher);
    /// empty without teachers.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nan_null::vec"
    )]
    pub teacher_feature_weights: Vec<f64>,
    /// Mean logit weight per true class (rows, K) and teacher (columns, full pool order) over the
    /// epoch's samples; empty without teachers. A class with no samples in the epoch is NaN
    /// (written as null).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nan_null::grid"
    )]
    pub class_weights: Vec<Vec<f64>>,
    /// The same for the feature weights.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nan_null::grid"
    )]
    pub class_feature_weights: Vec<Vec<f64>>,
    /// The agent's meta mode on segmentation: per pixel class (rows, K) and teacher (columns,
    /// full pool order), the share of the class's pixels the agent learnt from this epoch where
    /// that teacher earned the highest credit (docs/METHOD.md section 10.7); NaN (null) for a
    /// class with none; empty for every other strategy and task.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nan_null::grid"
    )]
    pub class_credit: Vec<Vec<f64>>,
    /// Teachers that left the pool at the end of this epoch (`[distill.prune]`), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<String>,
    /// With `distill.output_cache_mb`: the epoch's batches whose teacher outputs were read from
    /// the cache (the others ran the teachers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_batches: Option<u64>,
    /// Teachers still in the pool during this epoch, by name (absent: the whole pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_teachers: Option<Vec<String>>,
}

/// A data-parallel epoch's figures ([`EpochRecord::data_parallel`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataParallel {
    /// How many processes trained.
    pub ranks: usize,
    /// Seconds rank 0 spent in the step's collectives: the gradient all-reduce (with the
    /// gradients' copies in and out) and the finite-loss agreement. The strategy's gathers
    /// count in its own time.
    #[serde(deserialize_with = "nan_null::f64")]
    pub allreduce_seconds: f64,
}

/// `audit.json`: what a person needs to check the teachers' trust that the metrics lines do not
/// hold: the training samples of the last epoch on which the teachers disagreed most, with the
/// image and the weights each teacher got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    /// Teacher names (full pool order).
    pub teachers: Vec<String>,
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// The epoch (1-based) the samples come from.
    pub epoch: usize,
    /// How disagreement is measured (text for the report).
    pub measure: String,
    /// Most disagreed-on first.
    pub samples: Vec<AuditSample>,
    /// Segmentation and detection: a picture of the first samples (rows, in order) with the
    /// truth and what the student and every teacher predict on them (masks or boxes), as a
    /// PNG, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlays_png_base64: Option<String>,
}

/// One training sample of [`Audit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditSample {
    /// Index in the training set.
    pub index: usize,
    pub label: usize,
    /// The un-augmented training image as a PNG, base64 (for a `data:image/png;base64,` URI).
    pub image_png_base64: String,
    /// Disagreement of the teachers on the sample (see [`Audit::measure`]).
    pub disagreement: f64,
    /// Per teacher (full pool order; a pruned teacher has none): its predicted class, its
    /// probability of the true class, and the logit and feature weight it got.
    pub teachers: Vec<Option<AuditTeacher>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditTeacher {
    pub predicted: usize,
    pub prob_true: f64,
    pub logit_weight: f64,
    pub feature_weight: f64,
}

/// A teacher's figures in the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherSummary {
    pub name: String,
    pub source: String,
    /// The teacher's primary test metric (`Summary::metric`).
    #[serde(alias = "test_top1")]
    pub test_value: Option<f64>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run: String,
    pub strategy: String,
    pub student: String,
    pub student_parameters: i64,
    pub seed: u64,
    /// The task's primary metric: `top1` (classification) or `miou` (segmentation).
    pub metric: String,
    pub final_value: f64,
    pub best_value: f64,
    pub best_epoch: usize,
    /// Every figure of the last epoch's evaluation (empty in a summary of mtkd before 0.2,
    /// which held `final_top5` and `per_class_top1` instead).
    #[serde(default)]
    pub final_report: MetricReport,
    /// Every figure of the best epoch's evaluation (by the primary metric).
    #[serde(default)]
    pub best_report: MetricReport,
    pub epochs: usize,
    pub wall_seconds: f64,
    pub teachers: Vec<TeacherSummary>,
    pub mtkd_version: String,
    pub device: String,
    /// Peak resident memory of the process (Linux `VmHWM`), in MB.
    #[serde(default)]
    pub peak_rss_mb: Option<f64>,
    /// Where the student's weights started (`student.init`); absent: a random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// A run with unlabelled samples (`[data] labels`, `unlabelled`): how many training
    /// samples an epoch holds and how many of them carry their label. Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled: Option<LabelledCount>,
}

/// How many of a run's training samples carry their label ([`Summary::labelled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelledCount {
    /// Samples per epoch (labelled copies of `data.labelled_share` included).
    pub samples: usize,
    /// Of which labelled.
    pub labelled: usize,
    /// Distinct labelled samples (before `data.labelled_share`'s copies).
    pub distinct_labelled: usize,
}

/// Peak resident set size of this process in MB (Linux; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The `metrics.jsonl` sink: the whole file is rewritten atomically after each epoch (it is
/// small: one line per epoch), so it always holds exactly the checkpointed epochs' lines. A
/// resumed run starts from the history in the checkpoint, whose floats read back bit for bit
/// (serde_json's `float_roundtrip`), so its lines are the same text as before the interruption.
#[derive(Debug)]
pub struct MetricsSink {
    path: std::path::PathBuf,
    text: String,
}

impl MetricsSink {
    pub fn create(path: &Path, history: &[EpochRecord]) -> Result<MetricsSink> {
        let mut text = String::new();
        for r in history {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        crate::fsio::write_atomic(path, text.as_bytes())?;
        Ok(MetricsSink {
            path: path.to_path_buf(),
            text,
        })
    }

    pub fn append(&mut self, r: &EpochRecord) -> Result<()> {
        let mut text = self.text.clone();
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
        crate::fsio::write_atomic(&self.path, text.as_bytes())?;
        self.text = text;
        Ok(())
    }
}

pub use crate::fsio::write_json_atomic;

/// JSON has no NaN: serde_json writes a non-finite float as `null`. These read `null` back as
/// NaN, so a record with a NaN (a diverged test loss, an undefined diagnostic) stays readable.
mod nan_null {
    use serde::{Deserialize, Deserializer};

    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?
            .into_iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect())
    }

    pub fn grid<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        Ok(Vec::<Vec<Option<f64>>>::deserialize(d)?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
            .collect())
    }

    pub fn map<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<std::collections::BTreeMap<String, f64>, D::Error> {
        Ok(
            std::collections::BTreeMap::<String, Option<f64>>::deserialize(d)?
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> EpochRecord {
        EpochRecord {
            epoch: 1,
            lr: 0.1,
            train_loss: 1.593_894_808_222_850_1,
            train_ce: 0.1 + 0.2,
            train_kd: f64::NAN,
            train_feature: 0.0,
            train_metric: 55.5,
            test_loss: f64::INFINITY,
            test: MetricReport {
                primary: "miou".into(),
                value: 60.0,
                scalars: [
                    ("miou".to_owned(), 60.0),
                    ("pixel_accuracy".to_owned(), f64::NAN),
                ]
                .into_iter()
                .collect(),
                per_class: vec![f64::NAN, 0.1 + 0.2],
            },
            teacher_weights: vec![0.25, f64::NAN],
            strategy_metrics: [("reward_std".to_owned(), f64::NAN)].into_iter().collect(),
            skipped_batches: 0,
            seconds: 1.0,
            teacher_seconds: 0.5,
            data_parallel: Some(DataParallel {
                ranks: 2,
                allreduce_seconds: 0.25,
            }),
            teacher_feature_weights: vec![f64::NAN],
            class_weights: vec![vec![f64::NAN, 1.0]],
            class_feature_weights: Vec::new(),
            class_credit: Vec::new(),
            pruned: Vec::new(),
            cached_batches: None,
            active_teachers: None,
        }
    }

    #[test]
    fn records_read_back_bit_for_bit_and_nan_survives() {
        let r = record();
        let text = serde_json::to_string(&r).unwrap();
        let back: EpochRecord = serde_json::from_str(&text).unwrap();
        // The text written again is the text read: what a resumed metrics.jsonl relies on.
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        assert_eq!(back.train_loss.to_bits(), r.train_loss.to_bits());
        assert_eq!(back.train_ce.to_bits(), r.train_ce.to_bits());
        assert!(back.train_kd.is_nan() && back.test_loss.is_nan());
        assert!(back.teacher_weights[1].is_nan() && back.class_weights[0][0].is_nan());
        assert!(back.strategy_metrics["reward_std"].is_nan());
        assert!(back.test.per_class[0].is_nan() && back.test.get("pixel_accuracy").is_nan());
        assert_eq!(back.test.per_class[1].to_bits(), (0.1f64 + 0.2).to_bits());
    }

    #[test]
    fn many_floats_read_back_exactly() {
        // A float that serde_json's default (lossy) parser reads 1 ULP off.
        let mut x = 0.123_456_789_f64;
        for _ in 0..10_000 {
            x = (x * 3.987_654_321).fract() + 1.0;
            let text = serde_json::to_string(&x).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{text}");
        }
    }
}
