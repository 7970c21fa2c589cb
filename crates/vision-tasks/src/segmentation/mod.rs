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

/// The label of a whole image from its mask (defined in [`crate::objects`], so that the data
/// module can relabel masks without importing this one).
pub use crate::objects::mask_label as image_label;
