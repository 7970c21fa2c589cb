//! An evaluation's figures as records carry them: [`MetricReport`] (the primary metric, named
//! scalars, one value per class) and how people read a metric key ([`metric_label`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
        "ap" => "AP",
        "ap50" => "AP50",
        "ap75" => "AP75",
        "ap_small" => "AP small",
        "ap_medium" => "AP medium",
        "ap_large" => "AP large",
        "ar100" => "AR@100",
        other => other,
    }
}
