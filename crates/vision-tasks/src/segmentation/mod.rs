//! Semantic segmentation: per-pixel class masks, their readers (`data`: the common
//! images + index-mask folder layout; `synthetic`: seeded scenes of pasted objects with exact
//! masks) and the metrics (`metrics`: confusion matrix, IoU per class, mIoU, pixel accuracy).

pub mod data;
pub mod metrics;
pub mod synthetic;

pub use metrics::{Confusion, SegReport};

/// The mask value of a pixel without a label (defined with the ground-truth vocabulary in
/// [`crate::objects`], which the readers share without importing this module).
pub use crate::objects::IGNORE;

/// The label of a whole image from its mask: the most frequent class other than 0 (class 0 is
/// the background in every layout mtkd reads), 0 when only background or nothing is labelled.
/// Ties go to the smaller class. This is what subsets stratify by and what per-class weight
/// records group images by.
pub fn image_label(mask: ndarray::ArrayView2<u8>, num_classes: usize) -> i64 {
    let mut counts = vec![0usize; num_classes.max(1)];
    for &v in mask.iter() {
        if v != IGNORE && (v as usize) < counts.len() {
            counts[v as usize] += 1;
        }
    }
    let mut best = 0usize;
    for c in 1..counts.len() {
        if counts[c] > 0 && (best == 0 || counts[c] > counts[best]) {
            best = c;
        }
    }
    best as i64
}
