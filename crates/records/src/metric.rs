//! An evaluation's figures as records carry them: [`MetricReport`] (the primary metric, named
//! scalars, one value per class), how people read a metric key ([`metric_label`]) and how
//! records and reports show each kind of primary metric ([`MetricKind`]): the one place that
//! names them, so that no view matches on metric names.

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

/// How the records and their views show one kind of primary metric: a row of data, so that
/// lines, tables and charts ask it instead of matching on names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricKind {
    /// The primary metric's key (`top1`, `miou`, `ap`).
    pub primary: &'static str,
    /// What the training score (`EpochRecord::train_metric`) measures.
    pub train_label: &'static str,
    /// The scalars shown beside the primary: in each epoch's line, in comparison tables
    /// (`table`) and as curves.
    pub epoch_line: &'static [&'static str],
    pub table: &'static [&'static str],
    pub curves: &'static [&'static str],
    /// The scalars of the run's last line; `None`: all of them.
    pub final_line: Option<&'static [&'static str]>,
    /// The title of the accuracy chart.
    pub chart_title: &'static str,
    /// The bar chart of the student's final value per class that a finished run draws, if any.
    pub per_class_chart: Option<PerClassChart>,
}

/// A finished run's bar chart of its primary metric per class (`plots/<file>`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerClassChart {
    pub file: &'static str,
    pub title: &'static str,
    pub axis: &'static str,
    /// The first class is the background (drawn apart).
    pub background: bool,
}

/// Every kind of primary metric mtkd's tasks report.
pub const METRIC_KINDS: [MetricKind; 3] = [
    MetricKind {
        primary: "top1",
        train_label: "train top-1",
        epoch_line: &["top5"],
        table: &[],
        curves: &[],
        final_line: None,
        chart_title: "Top-1 accuracy",
        per_class_chart: None,
    },
    MetricKind {
        primary: "miou",
        train_label: "train pixel acc.",
        epoch_line: &["pixel_accuracy"],
        table: &["pixel_accuracy"],
        curves: &["pixel_accuracy"],
        final_line: None,
        chart_title: "mIoU and pixel accuracy",
        per_class_chart: Some(PerClassChart {
            file: "class_iou.png",
            title: "Student: test IoU per class (last epoch)",
            axis: "IoU (%)",
            background: true,
        }),
    },
    MetricKind {
        primary: "ap",
        train_label: "train positive-location acc.",
        epoch_line: &["ap50", "ap75"],
        table: &["ap50", "ap75"],
        curves: &["ap50", "ap75"],
        // COCO's recalls and size ranges are in summary.json.
        final_line: Some(&["ap50", "ap75"]),
        chart_title: "AP, AP50, AP75 and training accuracy at positive locations",
        per_class_chart: Some(PerClassChart {
            file: "class_ap.png",
            title: "Student: test AP@[.5:.95] per class (last epoch)",
            axis: "AP (%)",
            background: false,
        }),
    },
];

/// The kind of the primary metric `primary` (top-1's for an unknown key, as records of mtkd
/// before 0.2 name it `test_top1`).
pub fn metric_kind(primary: &str) -> &'static MetricKind {
    METRIC_KINDS
        .iter()
        .find(|k| k.primary == primary)
        .unwrap_or(&METRIC_KINDS[0])
}

impl MetricReport {
    /// How this report's primary metric is shown.
    pub fn kind(&self) -> &'static MetricKind {
        metric_kind(&self.primary)
    }

    /// `test <primary> v%` and the kind's epoch-line scalars, as a run's epoch line shows them.
    pub fn epoch_line(&self) -> String {
        let mut line = format!("test {} {:.2}%", metric_label(&self.primary), self.value);
        for k in self.kind().epoch_line {
            line.push_str(&format!("  {} {:.2}%", metric_label(k), self.get(k)));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_names_its_scalars_and_unknown_keys_read_as_top1() {
        for k in &METRIC_KINDS {
            assert_eq!(metric_kind(k.primary), k);
            for s in k.epoch_line.iter().chain(k.table).chain(k.curves) {
                assert_ne!(metric_label(s), *s, "{s} has a label");
            }
        }
        assert_eq!(metric_kind("test_top1").primary, "top1");
        let r = MetricReport {
            primary: "ap".into(),
            value: 12.345,
            scalars: [("ap50".to_owned(), 30.0), ("ap75".to_owned(), 9.5)]
                .into_iter()
                .collect(),
            per_class: Vec::new(),
        };
        assert_eq!(r.epoch_line(), "test AP 12.35%  AP50 30.00%  AP75 9.50%");
    }
}
