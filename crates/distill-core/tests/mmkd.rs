//! MMKD against PyTorch (`scripts/golden_mmkd.py`): the reference takes a real virtual SGD step
//! of the classifier with autograd (`create_graph=True`) and moves the weight network with
//! `torch.optim.Adam`; the Rust side uses the closed-form logit gradient and its own Adam.
//! Also: the checkpointed state continues exactly, and bad inputs are errors.

use serde_json::Value;
use tch::{Device, Tensor};

use mtkd_distill_core::mmkd::{Mmkd, MmkdConfig};
use mtkd_distill_core::weighting::WeightingStrategy;

#[path = "../../../test-support/golden.rs"]
mod support;
use support::{tensor, values};
#[path = "../../../test-support/lookahead.rs"]
mod lookahead;
use lookahead::{check_batches, metric, signals};

fn golden() -> Value {
    support::golden_file("mmkd.json")
}

fn mmkd(g: &Value) -> Mmkd {
    let cfg = MmkdConfig {
        hidden: g["hidden"].as_i64().unwrap(),
        lr: g["lr"].as_f64().unwrap(),
        every: 1,
    };
    let mut s = Mmkd::new(
        cfg,
        g["M"].as_i64().unwrap(),
        g["K"].as_i64().unwrap(),
        g["ce_weight"].as_f64().unwrap(),
        g["kd_weight"].as_f64().unwrap(),
        Device::Cpu,
    )
    .unwrap();
    for (name, v) in g["init"].as_object().unwrap() {
        s.set_parameter(name, &tensor(v)).unwrap();
    }
    s
}

#[test]
fn weights_and_meta_updates_match_pytorch() {
    let g = golden();
    let mut s = mmkd(&g);
    let (updates, mean) = check_batches(&g, "", &mut s, Mmkd::parameters);
    let metrics = s.take_epoch_metrics();
    assert_eq!(metric(&metrics, "mmkd_meta_updates"), updates as f64);
    assert!((metric(&metrics, "mmkd_quiz_loss") - mean).abs() < 1e-4 * (1.0 + mean));
}

#[test]
fn starts_as_equal_weights() {
    let g = golden();
    let mut s = Mmkd::new(MmkdConfig::default(), 3, 5, 1.0, 1.0, Device::Cpu).unwrap();
    let w = s.weights(&signals(&g, &g["batches"][0])).unwrap();
    for v in values(&w.logit) {
        assert!((v - 1.0 / 3.0).abs() < 1e-6, "{v}");
    }
}

#[test]
fn resumed_state_continues_exactly() {
    let g = golden();
    let batches = g["batches"].as_array().unwrap();
    let mut a = mmkd(&g);
    a.weights(&signals(&g, &batches[0])).unwrap();
    a.weights(&signals(&g, &batches[1])).unwrap();
    let state = a.save_state().unwrap();
    let mut b = Mmkd::new(
        MmkdConfig {
            hidden: 8,
            lr: 0.01,
            every: 1,
        },
        3,
        5,
        1.0,
        0.7,
        Device::Cpu,
    )
    .unwrap();
    b.load_state(&state).unwrap();
    let wa = a.weights(&signals(&g, &batches[2])).unwrap();
    let wb = b.weights(&signals(&g, &batches[2])).unwrap();
    assert_eq!(values(&wa.logit), values(&wb.logit));
    for ((n, pa), (_, pb)) in a.parameters().iter().zip(b.parameters()) {
        assert_eq!(values(pa), values(&pb), "{n}");
    }
}

#[test]
fn every_skips_meta_updates() {
    let g = golden();
    let batches = g["batches"].as_array().unwrap();
    let cfg = MmkdConfig {
        hidden: 8,
        lr: 0.01,
        every: 2,
    };
    let mut s = Mmkd::new(cfg, 3, 5, 1.0, 0.7, Device::Cpu).unwrap();
    for (name, v) in g["init"].as_object().unwrap() {
        s.set_parameter(name, &tensor(v)).unwrap();
    }
    let before: Vec<(String, Tensor)> = s
        .parameters()
        .into_iter()
        .map(|(n, p)| (n, p.copy()))
        .collect();
    s.weights(&signals(&g, &batches[0])).unwrap();
    s.weights(&signals(&g, &batches[1])).unwrap(); // call 1: not due
    for ((n, p0), (_, p1)) in before.iter().zip(s.parameters()) {
        assert_eq!(values(p0), values(&p1), "{n} moved on a skipped step");
    }
    s.weights(&signals(&g, &batches[2])).unwrap(); // call 2: due
    let moved = before
        .iter()
        .zip(s.parameters())
        .any(|((_, p0), (_, p1))| values(p0) != values(&p1));
    assert!(moved, "no meta-update on a due step");
}

#[test]
fn bad_inputs_are_errors() {
    let g = golden();
    let b = &g["batches"][0];
    let mut s = mmkd(&g);
    let mut sig = signals(&g, b);
    sig.student_head = None;
    let e = s.weights(&sig).unwrap_err().to_string();
    assert!(e.contains("student_head"), "{e}");
    let mut two = Mmkd::new(MmkdConfig::default(), 2, 5, 1.0, 1.0, Device::Cpu).unwrap();
    let e = two.weights(&signals(&g, b)).unwrap_err().to_string();
    assert!(e.contains("built for 2 teachers"), "{e}");
    let bad = MmkdConfig {
        every: 0,
        ..MmkdConfig::default()
    };
    let e = Mmkd::new(bad, 3, 5, 1.0, 1.0, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("every"), "{e}");
}

#[test]
fn a_non_finite_batch_does_not_poison_the_network() {
    let g = golden();
    let batches = g["batches"].as_array().unwrap();
    let mut s = mmkd(&g);
    s.weights(&signals(&g, &batches[0])).unwrap();
    let before: Vec<Vec<f64>> = s.parameters().iter().map(|(_, p)| values(p)).collect();
    // A NaN in a teacher's logits: its weights are NaN (the trainer's loss check sees it), but
    // the meta-update is skipped and the parameters stay finite and unchanged.
    let bad = signals(&g, &batches[1]);
    let _ = bad.teacher_logits[0].get(0).get(0).fill_(f64::NAN);
    let w = s.weights(&bad).unwrap();
    assert!(values(&w.logit).iter().any(|v| v.is_nan()));
    let after: Vec<Vec<f64>> = s.parameters().iter().map(|(_, p)| values(p)).collect();
    assert_eq!(before, after);
    // The next batch updates again (its quiz is the bad batch's finite embeddings).
    s.weights(&signals(&g, &batches[2])).unwrap();
    for (_, p) in s.parameters() {
        assert!(values(&p).iter().all(|v| v.is_finite()));
    }
    let metrics = s.take_epoch_metrics();
    assert_eq!(metrics[0], ("mmkd_meta_updates".to_owned(), 1.0));
}
