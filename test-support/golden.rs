//! Readers for the golden JSON files that the PyTorch scripts (`scripts/golden*.py`) write,
//! shared by the test binaries of several crates through `#[path]` (dev-only, never in a library).
#![allow(dead_code)]

use serde_json::Value;
use tch::{Kind, Tensor};

/// Parse a golden file.
pub fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// A stored tensor `{"shape": [...], "data": [...]}` as float32; JSON `null` (PyTorch's NaN) is NaN.
pub fn tensor(v: &Value) -> Tensor {
    let shape: Vec<i64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let data: Vec<f32> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32).unwrap_or(f32::NAN))
        .collect();
    Tensor::from_slice(&data).view(shape.as_slice())
}

/// A stored list of numbers.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A tensor's values, flattened, as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}
