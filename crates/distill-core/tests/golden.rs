//! Losses, signals and the adapter against values computed by PyTorch (`scripts/golden.py`).

use std::collections::HashMap;

use serde_json::Value;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::adapter::Adapter;
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::weighting::{Equal, EqualOnesWarmup, Single, WeightingStrategy};
use mtkd_distill_core::{loss, ModelOutput};

#[path = "../../../test-support/golden.rs"]
mod support;
use support::{assert_close, floats, labels, tensor};

fn golden() -> Value {
    support::golden_file("core.json")
}

struct Case {
    name: String,
    t: f64,
    zs: Tensor,
    zt: Tensor,
    y: Tensor,
    fs: Tensor,
    ft: Tensor,
    raw: Value,
}

fn cases() -> Vec<Case> {
    golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            t: c["temperature"].as_f64().unwrap(),
            zs: tensor(&c["student_logits"]),
            zt: tensor(&c["teacher_logits"]),
            y: labels(&c["labels"]),
            fs: tensor(&c["student_map"]),
            ft: tensor(&c["teacher_map"]),
            raw: c.clone(),
        })
        .collect()
}

#[test]
fn losses_match_pytorch() {
    for c in cases() {
        let e = &c.raw["expected"];
        assert_close(
            &format!("{}: cross_entropy", c.name),
            &loss::cross_entropy(&c.zs, &c.y).unwrap(),
            &floats(&e["cross_entropy"]),
            1e-5,
        );
        assert_close(
            &format!("{}: kd_kl", c.name),
            &loss::kd_kl(&c.zs, &c.zt, c.t).unwrap(),
            &floats(&e["kd_kl"]),
            1e-4,
        );
        assert_close(
            &format!("{}: entropy", c.name),
            &loss::entropy(&c.zt).unwrap(),
            &floats(&e["entropy"]),
            1e-5,
        );
        assert_close(
            &format!("{}: top1", c.name),
            &loss::topk_correct(&c.zs, &c.y, 1).unwrap(),
            &floats(&e["top1"]),
            1e-9,
        );
        assert_close(
            &format!("{}: top5", c.name),
            &loss::topk_correct(&c.zs, &c.y, 5).unwrap(),
            &floats(&e["top5"]),
            1e-9,
        );
    }
}

fn adapter_for(c: &Case) -> (VarStore, Adapter) {
    let vs = VarStore::new(Device::Cpu);
    let s = c.fs.size();
    let t = c.ft.size();
    let a = Adapter::new(&vs.root(), (s[1], s[2], s[3]), (t[1], t[2], t[3]));
    let vars: HashMap<String, Tensor> = vs.variables();
    tch::no_grad(|| {
        for (name, v) in c.raw["adapter"].as_object().unwrap() {
            let mut var = vars
                .get(name)
                .unwrap_or_else(|| panic!("adapter has no variable {name}"))
                .shallow_clone();
            var.copy_(&tensor(v));
        }
    });
    (vs, a)
}

#[test]
fn adapter_feature_mse_and_cosine_match_pytorch() {
    for c in cases() {
        let e = &c.raw["expected"];
        let (vs, a) = adapter_for(&c);
        let out = a.forward(&c.fs, true).unwrap();
        let want = &e["adapter_out"];
        assert_eq!(
            out.size(),
            tensor(want).size(),
            "{}: adapter output shape",
            c.name
        );
        assert_close(
            &format!("{}: adapter", c.name),
            &out,
            &floats(&want["data"]),
            1e-4,
        );
        let vars = vs.variables();
        assert_close(
            &format!("{}: bn running mean", c.name),
            &vars["bn.running_mean"],
            &floats(&e["bn_running_mean"]),
            1e-4,
        );
        assert_close(
            &format!("{}: bn running var", c.name),
            &vars["bn.running_var"],
            &floats(&e["bn_running_var"]),
            1e-4,
        );
        assert_close(
            &format!("{}: feature_mse", c.name),
            &loss::feature_mse(&out, &c.ft).unwrap(),
            &floats(&e["feature_mse"]),
            1e-4,
        );
        let pooled = out.mean_dim(&[2i64, 3][..], false, Kind::Float);
        let emb = c.ft.mean_dim(&[2i64, 3][..], false, Kind::Float);
        assert_close(
            &format!("{}: cosine", c.name),
            &loss::cosine(&pooled, &emb).unwrap(),
            &floats(&e["cosine"]),
            1e-4,
        );
    }
}

#[test]
fn signals_stack_per_teacher_values() {
    let c = &cases()[0];
    let (_vs, a) = adapter_for(c);
    let proj = a.forward(&c.fs, true).unwrap();
    // Two teachers: the golden teacher and the student itself (KL 0, same CE as the student).
    let teachers = vec![
        ModelOutput {
            logits: c.zt.shallow_clone(),
            features: Some(c.ft.shallow_clone()),
        },
        ModelOutput {
            logits: c.zs.shallow_clone(),
            features: Some(c.ft.shallow_clone()),
        },
    ];
    let s = BatchSignals::compute(
        &c.zs,
        &[Some(proj.shallow_clone()), Some(proj)],
        &teachers,
        &c.y,
        c.t,
    )
    .unwrap();
    assert_eq!(s.ce.size(), vec![c.zs.size()[0], 2]);
    let e = &c.raw["expected"];
    let cos = s.cos.as_ref().expect("both teachers have maps");
    // (signal, its [B, M] matrix, teacher column, PyTorch's values, tolerance)
    for (what, matrix, m, want, tol) in [
        ("kl", &s.kl, 0, floats(&e["kd_kl"]), 1e-4),
        ("kl", &s.kl, 1, vec![0.0; c.zs.size()[0] as usize], 1e-5),
        ("ce", &s.ce, 1, floats(&e["cross_entropy"]), 1e-5),
        ("entropy", &s.entropy, 0, floats(&e["entropy"]), 1e-5),
        ("cos", cos, 0, floats(&e["cosine"]), 1e-4),
    ] {
        assert_close(
            &format!("signals {what}[:,{m}]"),
            &matrix.select(1, m),
            &want,
            tol,
        );
    }
    assert!(
        !s.kl.requires_grad() && !s.ce.requires_grad(),
        "signals must be detached"
    );

    let w = Equal.weights(&s).unwrap();
    assert_close(
        "equal weights",
        &w.logit,
        &vec![0.5; 2 * c.zs.size()[0] as usize],
        1e-9,
    );
    let mut warm = EqualOnesWarmup::new(1);
    warm.start_epoch(0).unwrap();
    let b = c.zs.size()[0] as usize;
    let w = warm.weights(&s).unwrap();
    assert_close("ones warm-up, epoch 0", &w.feature, &vec![1.0; 2 * b], 1e-9);
    warm.start_epoch(1).unwrap();
    let w = warm.weights(&s).unwrap();
    assert_close("ones warm-up, epoch 1", &w.logit, &vec![0.5; 2 * b], 1e-9);
    let w = Single::new(1).weights(&s).unwrap();
    assert_close(
        "single weights col 1",
        &w.feature.select(1, 1),
        &vec![1.0; c.zs.size()[0] as usize],
        1e-9,
    );
    assert!(
        Single::new(2).weights(&s).is_err(),
        "an out-of-range teacher index is an error"
    );
}

#[test]
fn bad_shapes_and_values_are_errors() {
    let z = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
    let y_bad = Tensor::zeros([5], (Kind::Int64, Device::Cpu));
    let err = loss::cross_entropy(&z, &y_bad).unwrap_err().to_string();
    assert!(
        err.contains("cross_entropy targets") && err.contains("[5]"),
        "{err}"
    );
    let err = loss::kd_kl(&z, &Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)), 4.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("teacher logits"), "{err}");
    assert!(
        loss::kd_kl(&z, &z, 0.0).is_err(),
        "temperature 0 is rejected"
    );
    let nan = Tensor::from_slice(&[1.0f32, f32::NAN]);
    let err = loss::ensure_finite("KD term of teacher `a`", &nan)
        .unwrap_err()
        .to_string();
    assert!(err.contains("teacher `a`"), "{err}");
    let vs = VarStore::new(Device::Cpu);
    let a = Adapter::new(&(vs.root() / "x"), (4, 8, 8), (6, 4, 4));
    let err = a
        .forward(
            &Tensor::zeros([2, 3, 8, 8], (Kind::Float, Device::Cpu)),
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter input"), "{err}");
    let _ = nn::Path::device; // the adapter lives on the var store's device
}
