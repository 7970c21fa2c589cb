//! What a run records: one [`EpochRecord`] per epoch (a line of `metrics.jsonl`) and the
//! [`Summary`] written to `summary.json` at the end.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One epoch's numbers. Losses are means over the epoch's samples; accuracies in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_ce: f64,
    pub train_kd: f64,
    pub train_feature: f64,
    pub train_top1: f64,
    pub test_loss: f64,
    pub test_top1: f64,
    pub test_top5: f64,
    /// Mean logit weight per teacher over the epoch (pool order); empty without teachers.
    #[serde(default)]
    pub teacher_weights: Vec<f64>,
    /// The weighting strategy's diagnostics (agent loss, reward statistics, weight entropy,
    /// mix coefficients, mean feature weight per teacher, ...).
    #[serde(default)]
    pub strategy_metrics: std::collections::BTreeMap<String, f64>,
    /// Batches skipped because their loss was not finite (`on_nonfinite = "skip"`).
    pub skipped_batches: usize,
    /// Wall seconds of the epoch (training and evaluation).
    pub seconds: f64,
    /// Of those, the seconds spent getting the teachers' outputs (forward passes, or reads of
    /// shared outputs).
    #[serde(default)]
    pub teacher_seconds: f64,
    /// Mean feature weight per teacher over the epoch (full pool order, 0 for a pruned teacher);
    /// empty without teachers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teacher_feature_weights: Vec<f64>,
    /// Mean logit weight per true class (rows, K) and teacher (columns, full pool order) over the
    /// epoch's samples; empty without teachers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_weights: Vec<Vec<f64>>,
    /// The same for the feature weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_feature_weights: Vec<Vec<f64>>,
    /// Teachers that left the pool at the end of this epoch (`[distill.prune]`), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<String>,
    /// Teachers still in the pool during this epoch, by name (absent: the whole pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_teachers: Option<Vec<String>>,
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
    pub test_top1: Option<f64>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run: String,
    pub strategy: String,
    pub student: String,
    pub student_parameters: i64,
    pub seed: u64,
    pub metric: String,
    pub final_value: f64,
    pub best_value: f64,
    pub best_epoch: usize,
    pub final_top5: f64,
    pub per_class_top1: Vec<f64>,
    pub epochs: usize,
    pub wall_seconds: f64,
    pub teachers: Vec<TeacherSummary>,
    pub mtkd_version: String,
    pub device: String,
    /// Peak resident memory of the process (Linux `VmHWM`), in MB.
    #[serde(default)]
    pub peak_rss_mb: Option<f64>,
}

/// Peak resident set size of this process in MB (Linux; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The `metrics.jsonl` sink: rewritten from the history on resume, appended to after each epoch.
#[derive(Debug)]
pub struct MetricsSink {
    path: std::path::PathBuf,
}

impl MetricsSink {
    pub fn create(path: &Path, history: &[EpochRecord]) -> Result<MetricsSink> {
        let mut text = String::new();
        for r in history {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)?;
        Ok(MetricsSink {
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, r: &EpochRecord) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(r)?)?;
        Ok(())
    }
}

/// Write JSON through a temporary file.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
