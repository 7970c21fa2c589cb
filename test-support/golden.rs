//! Readers for the golden JSON files that the PyTorch scripts (`scripts/golden*.py`) write, and
//! the assertions that compare with their values, shared by the test binaries of several crates
//! through `#[path]` (dev-only, never in a library).
#![allow(dead_code)]

use serde_json::Value;
use tch::{Kind, Tensor};

/// Parse a golden file.
pub fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Parse the golden file `name` of the including crate (`<crate>/tests/golden/<name>`).
pub fn golden_file(name: &str) -> Value {
    load(&format!(
        "{}/tests/golden/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// A stored tensor `{"shape": [...], "data": [...]}` as float32; JSON `null` (PyTorch's NaN) is NaN.
pub fn tensor(v: &Value) -> Tensor {
    let shape = ints(&v["shape"]);
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

/// A stored list of integers (a shape, class labels).
pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Stored class labels as an int64 tensor `[B]`.
pub fn labels(v: &Value) -> Tensor {
    Tensor::from_slice(&ints(v))
}

/// A tensor's values, flattened, as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// `got` has `want`'s length and every element is within `tol` of PyTorch's in relative error
/// `|g - w| / (1 + |w|)`.
pub fn assert_close_values(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        assert!(err < tol, "{what}[{i}]: got {g}, PyTorch {w}");
    }
}

/// A tensor's values are PyTorch's `want` (as [`assert_close_values`]).
pub fn assert_close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    assert_close_values(what, &values(got), want, tol);
}

/// `got` has the shape of the stored tensor `want` and its values (as [`assert_close_values`]).
pub fn assert_close_to_stored(what: &str, got: &Tensor, want: &Value, tol: f64) {
    let want = tensor(want);
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_close_values(what, &values(got), &values(&want), tol);
}
