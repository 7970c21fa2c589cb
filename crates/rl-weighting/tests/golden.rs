//! The MTKD-RL weight components against PyTorch (`scripts/golden.py`).

use serde_json::Value;
use tch::{Kind, Tensor};

fn mat(c: &Value, key: &str) -> Tensor {
    let shape: Vec<i64> = c["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let data: Vec<f32> = c[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Tensor::from_slice(&data).view(shape.as_slice())
}

fn assert_close(what: &str, got: &Tensor, want: &Value) {
    let got = Vec::<f64>::try_from(&got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let want: Vec<f64> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-5, "{what}[{i}]: got {g}, PyTorch {w}");
    }
}

#[test]
fn components_match_pytorch() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/components.json"
    ))
    .unwrap();
    let g: Value = serde_json::from_str(&text).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let e = &c["expected"];
        let conf = mtkd_rl_weighting::confidence(&mat(c, "ce")).unwrap();
        assert_close(&format!("{name}: confidence"), &conf, &e["confidence"]);
        let dl = mtkd_rl_weighting::logit_gap(&mat(c, "kl")).unwrap();
        assert_close(&format!("{name}: logit gap"), &dl, &e["logit_gap"]);
        assert_close(
            &format!("{name}: feature gap"),
            &mtkd_rl_weighting::feature_gap(&mat(c, "cos")).unwrap(),
            &e["feature_gap"],
        );
        let mix = mtkd_rl_weighting::fixed_mix(&mat(c, "agent"), &conf, &dl).unwrap();
        assert_close(&format!("{name}: fixed mix"), &mix, &e["fixed_mix_logit"]);
        // Each component is a distribution over teachers.
        let sums = Vec::<f64>::try_from(&mix.sum_dim_intlist(1, false, Kind::Double)).unwrap();
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "{name}: rows of the mix sum to 1: {sums:?}"
        );
    }
}
