//! Every student architecture against its PyTorch twin (`scripts/student_zoo.py`): parameter
//! names and shapes, feature-map shape, trainable parameter count, and a forward pass; and the
//! dense heads (fcn, aspp, fcos) on a few backbones the same way (`head_cases`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use mtkd_student::arch::parameter_count;
use mtkd_student::{Arch, HeadKind, Network};

#[path = "../../../test-support/golden.rs"]
mod support;
use support::ints;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/state_dicts.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("cannot read {path} ({e}); run scripts/student_zoo.py to write it")
    });
    serde_json::from_str(&text).unwrap()
}

/// Compare one golden case with the Rust network; returns the problems found.
fn check_case(case: &Value) -> Vec<String> {
    let name = case["arch"].as_str().unwrap();
    let in_shape = ints(&case["in_shape"]);
    let (c, h, w) = (in_shape[0], in_shape[1], in_shape[2]);
    let classes = case["num_classes"].as_i64().unwrap();
    let head_name = case["head"].as_str().unwrap_or("classifier");
    let tag = format!("{name} ({head_name}) {in_shape:?}/{classes}");
    let mut problems = Vec::new();

    let arch: Arch = match name.parse() {
        Ok(a) => a,
        Err(e) => return vec![format!("{tag}: {e}")],
    };
    let head: HeadKind = match head_name.parse() {
        Ok(h) => h,
        Err(e) => return vec![format!("{tag}: {e}")],
    };
    let vs = VarStore::new(Device::Cpu);
    let net = Network::with_head(&vs.root(), arch, head, (c, h, w), classes).unwrap();

    // Parameter names and shapes.
    let want: BTreeMap<String, Vec<i64>> = case["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_owned(), ints(&e[1])))
        .collect();
    let got: BTreeMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    let got_names: BTreeSet<&String> = got.keys().collect();
    let missing: Vec<&&String> = want_names.difference(&got_names).collect();
    let extra: Vec<&&String> = got_names.difference(&want_names).collect();
    if !missing.is_empty() {
        problems.push(format!("{tag}: missing in Rust: {missing:?}"));
    }
    if !extra.is_empty() {
        problems.push(format!("{tag}: extra in Rust: {extra:?}"));
    }
    for (k, shape) in &want {
        if let Some(g) = got.get(k) {
            if g != shape {
                problems.push(format!("{tag}: {k} has shape {g:?}, PyTorch {shape:?}"));
            }
        }
    }

    // Feature map and parameter count.
    let fs = ints(&case["feature_shape"]);
    let want_fs = (fs[0], fs[1], fs[2]);
    if net.feature_shape() != want_fs {
        problems.push(format!(
            "{tag}: feature shape {:?}, PyTorch {want_fs:?}",
            net.feature_shape()
        ));
    }
    let count = case["parameter_count"].as_i64().unwrap();
    if parameter_count(&vs) != count {
        problems.push(format!(
            "{tag}: {} trainable parameters, PyTorch {count}",
            parameter_count(&vs)
        ));
    }

    // One forward pass of two images.
    let out = tch::no_grad(|| {
        net.forward_t(
            &Tensor::zeros([2, c, h, w], (Kind::Float, Device::Cpu)),
            false,
        )
    });
    let want_logits: Vec<i64> = match case.get("logits_shape") {
        Some(s) => std::iter::once(2).chain(ints(s)).collect(),
        None => vec![2, classes],
    };
    if out.logits.size() != want_logits {
        problems.push(format!(
            "{tag}: logits {:?}, PyTorch {want_logits:?}",
            out.logits.size()
        ));
    }
    let features = out.features.as_ref().map(Tensor::size);
    if features != Some(vec![2, fs[0], fs[1], fs[2]]) {
        problems.push(format!("{tag}: features {features:?}, PyTorch [2, {fs:?}]"));
    }
    problems
}

#[test]
fn every_architecture_matches_its_pytorch_twin() {
    let golden = golden();
    let cases = golden["cases"].as_array().unwrap();
    let mut problems = Vec::new();
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    for case in cases {
        *covered
            .entry(case["arch"].as_str().unwrap().to_owned())
            .or_default() += 1;
        problems.extend(check_case(case));
    }
    // Every architecture has both inputs in the golden file (a new one needs the script rerun).
    for arch in Arch::all() {
        let n = covered.get(arch.name()).copied().unwrap_or(0);
        if n != 2 {
            problems.push(format!(
                "{arch}: {n} golden cases, expected 2 (rerun scripts/student_zoo.py)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_dense_head_matches_its_pytorch_twin() {
    let golden = golden();
    let cases = golden["head_cases"]
        .as_array()
        .expect("no head_cases in the golden file (rerun scripts/student_zoo.py)");
    let mut problems = Vec::new();
    let mut heads = BTreeSet::new();
    for case in cases {
        heads.insert(case["head"].as_str().unwrap().to_owned());
        problems.extend(check_case(case));
    }
    for h in ["fcn", "aspp", "fcos"] {
        if !heads.contains(h) {
            problems.push(format!(
                "head {h}: no golden case (rerun scripts/student_zoo.py)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
