//! Segmentation metrics from one confusion matrix over all evaluated pixels (pixels labelled
//! [`super::IGNORE`] are left out), as mmsegmentation and torchmetrics compute them:
//! IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU is the mean over the classes present in the
//! ground truth or the predictions (a class absent from both has no IoU); pixel accuracy is
//! the share of labelled pixels predicted right. Checked against `scripts/golden_segmentation.py`.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// A `K x K` confusion matrix (rows: truth, columns: prediction), accumulated on the device.
#[derive(Debug)]
pub struct Confusion {
    k: i64,
    counts: Option<Tensor>,
}

/// The figures of an evaluation, in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegReport {
    pub miou: f64,
    pub pixel_accuracy: f64,
    /// IoU per class (NaN for a class absent from both truth and predictions).
    pub per_class_iou: Vec<f64>,
    pub pixels: u64,
}

impl Confusion {
    pub fn new(num_classes: usize) -> Confusion {
        Confusion {
            k: num_classes as i64,
            counts: None,
        }
    }

    /// Add a batch of logits `[B, K, H, W]` against masks `[B, H, W]`.
    pub fn update(&mut self, logits: &Tensor, masks: &Tensor) -> Result<()> {
        let s = logits.size();
        mtkd_distill_core::error::check_shape(
            "segmentation logits",
            logits,
            &[-1, self.k, -1, -1],
        )?;
        mtkd_distill_core::error::check_shape("segmentation masks", masks, &[s[0], s[2], s[3]])?;
        self.update_predictions(&logits.f_argmax(1, false)?, masks)
    }

    /// Add predicted classes `[B, H, W]` against masks `[B, H, W]`.
    pub fn update_predictions(&mut self, pred: &Tensor, masks: &Tensor) -> Result<()> {
        let t = masks.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?;
        let p = pred.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?;
        let valid = t.f_ne(i64::from(super::IGNORE))?;
        let t = t.f_masked_select(&valid)?;
        let p = p.f_masked_select(&valid)?;
        if t.numel() > 0 {
            let max = t.f_max()?.int64_value(&[]);
            if max >= self.k || t.f_min()?.int64_value(&[]) < 0 {
                return Err(Error::Invalid {
                    what: "segmentation masks".into(),
                    reason: format!(
                        "class {max} outside 0..{} (and not the ignore label {})",
                        self.k,
                        super::IGNORE
                    ),
                });
            }
        }
        let idx = t * self.k + p;
        let counts = idx.f_bincount::<&Tensor>(None, self.k * self.k)?;
        self.counts = Some(match self.counts.take() {
            Some(c) => c + counts,
            None => counts,
        });
        Ok(())
    }

    /// The `K x K` counts (rows truth, columns prediction).
    pub fn matrix(&self) -> Vec<Vec<u64>> {
        let k = self.k as usize;
        let flat: Vec<i64> = self
            .counts
            .as_ref()
            .and_then(|c| Vec::<i64>::try_from(&c.to_device(Device::Cpu)).ok())
            .unwrap_or_else(|| vec![0; k * k]);
        flat.chunks(k)
            .map(|r| r.iter().map(|&v| v as u64).collect())
            .collect()
    }

    pub fn report(&self) -> SegReport {
        let m = self.matrix();
        let k = m.len();
        let total: u64 = m.iter().flatten().sum();
        let tp: u64 = (0..k).map(|c| m[c][c]).sum();
        let per_class_iou: Vec<f64> = (0..k)
            .map(|c| {
                let row: u64 = m[c].iter().sum();
                let col: u64 = m.iter().map(|r| r[c]).sum();
                let union = row + col - m[c][c];
                if union == 0 {
                    f64::NAN
                } else {
                    100.0 * m[c][c] as f64 / union as f64
                }
            })
            .collect();
        let present: Vec<f64> = per_class_iou
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .collect();
        SegReport {
            miou: if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            },
            pixel_accuracy: if total == 0 {
                0.0
            } else {
                100.0 * tp as f64 / total as f64
            },
            per_class_iou,
            pixels: total,
        }
    }
}
