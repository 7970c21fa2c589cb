//! Classification: the task loss (cross-entropy) and its metrics (top-1, top-5, per-class).

pub mod labels;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::Result;
use mtkd_distill_core::loss;

/// Accumulates top-1 / top-5 and per-class accuracy over batches.
#[derive(Debug, Clone)]
pub struct Accuracy {
    correct1: f64,
    correct5: f64,
    total: f64,
    class_correct: Vec<f64>,
    class_total: Vec<f64>,
}

/// Final figures of an evaluation, in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyReport {
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<f64>,
    pub samples: u64,
}

impl Accuracy {
    pub fn new(num_classes: usize) -> Accuracy {
        Accuracy {
            correct1: 0.0,
            correct5: 0.0,
            total: 0.0,
            class_correct: vec![0.0; num_classes],
            class_total: vec![0.0; num_classes],
        }
    }

    /// Add a batch.
    ///
    /// # Shapes
    /// `logits [B, K]`, `labels [B]`
    pub fn update(&mut self, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let c1 = loss::topk_correct(logits, labels, 1)?;
        let c5 = loss::topk_correct(logits, labels, 5)?;
        let c1v = Vec::<f32>::try_from(&c1.to_device(tch::Device::Cpu))?;
        let lab = Vec::<i64>::try_from(&labels.to_device(tch::Device::Cpu).to_kind(Kind::Int64))?;
        self.correct1 += c1v.iter().map(|&x| f64::from(x)).sum::<f64>();
        self.correct5 += c5.sum(Kind::Double).double_value(&[]);
        self.total += lab.len() as f64;
        for (l, c) in lab.iter().zip(&c1v) {
            let l = *l as usize;
            if l < self.class_total.len() {
                self.class_total[l] += 1.0;
                self.class_correct[l] += f64::from(*c);
            }
        }
        Ok(())
    }

    pub fn report(&self) -> AccuracyReport {
        let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
        AccuracyReport {
            top1: pct(self.correct1, self.total),
            top5: pct(self.correct5, self.total),
            per_class: self
                .class_correct
                .iter()
                .zip(&self.class_total)
                .map(|(c, t)| pct(*c, *t))
                .collect(),
            samples: self.total as u64,
        }
    }
}
