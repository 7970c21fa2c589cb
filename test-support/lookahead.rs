//! The golden batches of the look-ahead strategies, MMKD (`scripts/golden_mmkd.py`) and the
//! agent's meta mode (`scripts/golden_meta.py`), which store them alike: the signals a batch
//! gives, and the batch-by-batch check against PyTorch. Shared by the test binaries of
//! distill-core and rl-weighting through `#[path]`; the including binary also includes
//! `golden.rs` as `mod support` (dev-only, never in a library).
#![allow(dead_code)]

use serde_json::Value;
use tch::{Kind, Tensor};

use mtkd_distill_core::signals::{BatchSignals, StudentHead};
use mtkd_distill_core::weighting::{TeacherWeights, WeightingStrategy};
use mtkd_distill_core::ModelOutput;

use crate::support::{assert_close_to_stored, labels, tensor, values};

/// The signals of golden batch `b` (logits only), with the student's classifier attached.
pub fn signals(g: &Value, b: &Value) -> BatchSignals {
    let zt = tensor(&b["teacher_logits"]);
    let h = tensor(&b["embedding"]);
    let w = tensor(&b["weight"]);
    let bias = tensor(&b["bias"]);
    let y = labels(&b["labels"]);
    let zs = h.matmul(&w.tr()) + &bias;
    let teachers: Vec<ModelOutput> = (0..zt.size()[0])
        .map(|m| ModelOutput {
            logits: zt.get(m),
            features: None,
        })
        .collect();
    let none: Vec<Option<Tensor>> = teachers.iter().map(|_| None).collect();
    let mut s = BatchSignals::compute(
        &zs,
        &none,
        &teachers,
        &y,
        g["temperature"].as_f64().unwrap(),
    )
    .unwrap();
    s.student_head = Some(StudentHead {
        embedding: h,
        weight: w,
        bias: Some(bias),
        lr: g["inner_lr"].as_f64().unwrap(),
        pixel_embedding: None,
    });
    s
}

/// The golden batches through `strategy` in order: after each batch's meta-update (where
/// PyTorch made one) its parameters, read by `parameters`, and then its weights (logit and
/// feature alike) are PyTorch's to 1e-4; every weight row sums to 1. `what` prefixes the
/// messages. Returns the number of meta-updates PyTorch made and the mean of its quiz losses.
pub fn check_batches<S: WeightingStrategy>(
    g: &Value,
    what: &str,
    strategy: &mut S,
    parameters: impl Fn(&S) -> Vec<(String, Tensor)>,
) -> (usize, f64) {
    for (i, b) in g["batches"].as_array().unwrap().iter().enumerate() {
        let w: TeacherWeights = strategy.weights(&signals(g, b)).unwrap();
        if let Some(after) = b.get("params_after") {
            for (name, p) in parameters(strategy) {
                assert_close_to_stored(&format!("{what}batch {i} {name}"), &p, &after[&name], 1e-4);
            }
        }
        assert_close_to_stored(
            &format!("{what}batch {i} weights"),
            &w.logit,
            &b["weights"],
            1e-4,
        );
        assert_close_to_stored(
            &format!("{what}batch {i} feature weights"),
            &w.feature,
            &b["weights"],
            1e-4,
        );
        let rows = w.logit.sum_dim_intlist(1i64, false, Kind::Float);
        assert!(values(&rows).iter().all(|r| (r - 1.0).abs() < 1e-5));
    }
    let quiz: Vec<f64> = g["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["quiz_loss"].as_f64())
        .collect();
    (quiz.len(), quiz.iter().sum::<f64>() / quiz.len() as f64)
}

/// The value of the epoch metric `name` (which must be there).
pub fn metric(metrics: &[(String, f64)], name: &str) -> f64 {
    metrics.iter().find(|(n, _)| n == name).unwrap().1
}
