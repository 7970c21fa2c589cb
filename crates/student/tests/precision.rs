//! A teacher trained by mtkd run in bfloat16 (`distill.teacher_precision = "bf16"`): its logits
//! are PyTorch's for the same network and weights run in bfloat16 (the PyTorch twin of
//! `scripts/student_zoo.py`, through `scripts/teacher_logits.py --native --precision bf16`).

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::{Precision, Teacher};
use mtkd_student::{Arch, HeadKind, NativeTeacher, Network};

#[path = "../../../test-support/outputs.rs"]
mod outputs;
#[path = "../../../test-support/golden.rs"]
mod support;
use outputs::{float32_logits, max_diff};

fn python_logits(arch: &str, weights: &Path, precision: &str, out: &Path) -> Vec<f64> {
    let python = std::env::var("MTKD_TORCH_PYTHON").expect(
        "MTKD_TORCH_PYTHON names the Python with torch 2.13.0; run the tests through `cargo xtask test`",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/teacher_logits.py");
    let run = Command::new(python)
        .arg(script)
        .args(["--native", arch, "--weights"])
        .arg(weights)
        .args([
            "--classes",
            "10",
            "--shape",
            "2,1,28,28",
            "--precision",
            precision,
        ])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "teacher_logits.py failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    support::floats(&v["logits"])
}

#[test]
fn a_native_teacher_in_bf16_gives_pytorchs_bf16_logits() {
    let dir = std::env::temp_dir().join(format!("mtkd-student-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("resnet8.safetensors");
    tch::manual_seed(3);
    {
        let vs = VarStore::new(Device::Cpu);
        let _net = Network::new(&vs.root(), Arch::Resnet8, (1, 28, 28), 10).unwrap();
        vs.save(&weights).unwrap();
    }
    let load = || {
        NativeTeacher::load(
            "r8",
            Arch::Resnet8,
            HeadKind::Classifier,
            &weights,
            (1, 28, 28),
            10,
            Device::Cpu,
        )
        .unwrap()
    };
    let x = Tensor::arange(2 * 28 * 28, (Kind::Float, Device::Cpu))
        .view([2, 1, 28, 28])
        .sin();
    let logits = |t: &NativeTeacher| float32_logits(&t.forward(&x).unwrap());
    let fp32 = load();
    let mut bf16 = load();
    bf16.set_precision(Precision::Bf16).unwrap();
    assert_eq!(bf16.precision(), Precision::Bf16);
    let (a, b) = (logits(&fp32), logits(&bf16));

    let py32 = python_logits("resnet8", &weights, "fp32", &dir.join("fp32.json"));
    let py16 = python_logits("resnet8", &weights, "bf16", &dir.join("bf16.json"));
    let scale = py32.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    assert!(
        max_diff(&a, &py32) <= 1e-4 * scale,
        "fp32 twin: {}",
        max_diff(&a, &py32)
    );
    assert!(
        max_diff(&b, &py16) <= 1e-2 * scale,
        "rust bf16 vs python bf16: {} (scale {scale})",
        max_diff(&b, &py16)
    );
    let off = max_diff(&b, &a);
    assert!(
        off > 0.0 && off <= 0.1 * scale,
        "bf16 vs fp32: {off} (scale {scale}): the cast did not happen or broke the network"
    );
    // Back to fp32 gives fp32's logits again (the weights were cast, not replaced).
    bf16.set_precision(Precision::Fp32).unwrap();
    assert!(max_diff(&logits(&bf16), &a) <= 0.1 * scale);

    // Channels-last layout: the same logits up to summation order, contiguous outputs.
    let mut cl = load();
    cl.set_channels_last(true);
    assert!(cl.channels_last());
    let out = cl.forward(&x).unwrap();
    assert!(out.logits.is_contiguous() && out.features.as_ref().unwrap().is_contiguous());
    let c = logits(&cl);
    assert!(
        max_diff(&c, &py32) <= 1e-4 * scale,
        "channels-last: {}",
        max_diff(&c, &py32)
    );
    // In bf16 too (PyTorch's bf16 logits).
    cl.set_precision(Precision::Bf16).unwrap();
    let d = logits(&cl);
    assert!(
        max_diff(&d, &py16) <= 1e-2 * scale,
        "channels-last bf16: {}",
        max_diff(&d, &py16)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn channels_last_relays_the_weights_and_keeps_the_values() {
    let w = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]);
    let cl = mtkd_student::to_channels_last(&w);
    assert_eq!(cl.size(), vec![2, 3, 4, 5]);
    // NHWC in memory: the channel stride is 1, the width stride is C.
    assert_eq!(cl.stride(), vec![60, 1, 15, 3]);
    assert!(cl.equal(&w));
}
