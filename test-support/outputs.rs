//! Checks of what a teacher gives, shared by the test binaries of the teachers and student
//! crates through `#[path]` (dev-only, never in a library).
#![allow(dead_code)]

use tch::Kind;

use mtkd_distill_core::ModelOutput;

/// The logits of `out`, flattened, as f64, once it is checked that its logits and feature map
/// reach the losses as float32 (whatever the teacher computes in).
pub fn float32_logits(out: &ModelOutput) -> Vec<f64> {
    assert_eq!(
        out.logits.kind(),
        Kind::Float,
        "outputs reach the losses as float32"
    );
    assert_eq!(out.features.as_ref().unwrap().kind(), Kind::Float);
    Vec::try_from(&out.logits.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// The largest absolute difference between two equally long lists.
pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
