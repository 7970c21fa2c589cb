//! TorchScript teachers exported from PyTorch by `scripts/export_teacher.py` (randomly initialised
//! torchvision resnet18 and mobilenet_v2): the Rust loader must give the logits and feature maps
//! that Python gives for the same input, and contract violations must be reported with the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::{Precision, Teacher};
use mtkd_teachers::{Expectation, TorchScriptTeacher};

#[path = "../../../test-support/golden.rs"]
mod support;
use support::{floats, ints, values};
#[path = "../../../test-support/outputs.rs"]
mod outputs;
#[path = "../../../test-support/scratch.rs"]
mod scratch_dir;
use outputs::{float32_logits, max_diff};
use scratch_dir::Scratch;

fn python() -> String {
    std::env::var("MTKD_TORCH_PYTHON")
        .expect("MTKD_TORCH_PYTHON names the Python with torch 2.13.0 and torchvision; run the tests through `cargo xtask test`")
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// A scratch folder for one test; the exported models take about 100 MB per test.
fn scratch(name: &str) -> Scratch {
    Scratch::new("mtkd-teachers", name)
}

fn py(args: &[&str]) {
    let out = Command::new(python()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn export(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{name}.pt"));
    let script = scripts().join("export_teacher.py");
    let mut args = vec![
        script.to_str().unwrap(),
        "--torchvision",
        name,
        "--num-classes",
        "10",
        "--input-shape",
        "3,32,32",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    py(&args);
    out
}

fn python_outputs(model: &Path, json: &Path) -> Value {
    let script = scripts().join("teacher_logits.py");
    py(&[
        script.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--shape",
        "3,3,32,32",
        "--out",
        json.to_str().unwrap(),
    ]);
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

fn expectation(needs_features: bool) -> Expectation {
    Expectation {
        input: (3, 32, 32),
        num_classes: 10,
        needs_features,
        dense: false,
        det_locations: None,
    }
}

/// `resnet18` of `path` as feature KD expects it ([`expectation`]), computing in `precision`.
fn load_r18(path: &Path, precision: Precision) -> mtkd_teachers::Result<TorchScriptTeacher> {
    TorchScriptTeacher::load_in("r18", path, Device::Cpu, &expectation(true), precision)
}

/// Loading `path` as `expect` describes it, in `precision`, fails with an error that holds
/// every one of `needles`.
fn assert_refused(
    name: &str,
    path: &Path,
    expect: &Expectation,
    precision: Precision,
    needles: &[&str],
) {
    let err = TorchScriptTeacher::load_in(name, path, Device::Cpu, expect, precision)
        .unwrap_err()
        .to_string();
    assert!(needles.iter().all(|n| err.contains(n)), "{err}");
}

fn input() -> Tensor {
    Tensor::arange(3 * 3 * 32 * 32, (Kind::Float, Device::Cpu))
        .view([3, 3, 32, 32])
        .sin()
}

#[test]
fn torchvision_teachers_give_pythons_logits_in_rust() {
    let dir = scratch("tv");
    for (name, feature_channels) in [("resnet18", 512), ("mobilenet_v2", 1280)] {
        let path = export(&dir, name, &[]);
        let want = python_outputs(&path, &dir.join(format!("{name}.json")));
        let t = TorchScriptTeacher::load(name, &path, Device::Cpu, &expectation(true)).unwrap();
        assert_eq!(t.num_classes(), 10);
        assert_eq!(
            t.feature_shape().map(|s| s.0),
            Some(feature_channels),
            "{name}"
        );
        let out = t.forward(&input()).unwrap();
        assert!(!out.logits.requires_grad(), "teachers run without gradient");
        let got = values(&out.logits);
        let py = floats(&want["logits"]);
        assert_eq!(got.len(), 30, "{name}");
        for (g, p) in got.iter().zip(&py) {
            assert!(
                (g - p).abs() < 1e-4 * (1.0 + p.abs()),
                "{name}: rust {g} vs python {p}"
            );
        }
        let fsum = out
            .features
            .as_ref()
            .unwrap()
            .sum(Kind::Double)
            .double_value(&[]);
        let pysum = want["features_sum"].as_f64().unwrap();
        assert!(
            (fsum - pysum).abs() < 1e-3 * (1.0 + pysum.abs()),
            "{name}: feature sum {fsum} vs {pysum}"
        );
        let fshape = ints(&want["features_shape"]);
        assert_eq!(out.features.as_ref().unwrap().size(), fshape, "{name}");
    }
}

#[test]
fn contract_violations_name_the_file() {
    let dir = scratch("contract");
    let logits_only = export(&dir, "resnet18", &["--logits-only"]);
    // Logit-only KD accepts it...
    let t =
        TorchScriptTeacher::load("r18", &logits_only, Device::Cpu, &expectation(false)).unwrap();
    assert_eq!(t.feature_shape(), None);
    // ...feature KD does not.
    let fp32 = Precision::Fp32;
    let e = expectation(true);
    assert_refused(
        "r18",
        &logits_only,
        &e,
        fp32,
        &["resnet18.pt", "logits only"],
    );
    // Class count.
    let e = Expectation {
        num_classes: 100,
        ..expectation(false)
    };
    assert_refused("r18", &logits_only, &e, fp32, &["10 classes", "has 100"]);
    // Input channels that the network cannot take.
    let e = Expectation {
        input: (1, 28, 28),
        ..expectation(false)
    };
    assert_refused(
        "r18",
        &logits_only,
        &e,
        fp32,
        &["resnet18.pt", "[2, 1, 28, 28]"],
    );
    // A truncated archive.
    let bytes = std::fs::read(&logits_only).unwrap();
    let cut = dir.join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let e = expectation(false);
    assert_refused(
        "cut",
        &cut,
        &e,
        fp32,
        &["cut.pt", "not a loadable TorchScript"],
    );
}

/// Pretrained RGB weights brought to a grey model (`--in-channels 1 --state-dict`): the stem's
/// RGB filters are summed, so a grey image gives the grey teacher exactly what the RGB network
/// gives for the same image with R = G = B.
#[test]
fn pretrained_rgb_weights_export_to_one_channel() {
    let dir = scratch("in-channels");
    let sd = dir.join("rgb.pth");
    let make = dir.join("make.py");
    std::fs::write(
        &make,
        format!(
            "import torch, torchvision\ntorch.manual_seed(1)\n\
             m = torchvision.models.resnet18(num_classes=10)\ntorch.save(m.state_dict(), r'{}')\n",
            sd.display()
        ),
    )
    .unwrap();
    py(&[make.to_str().unwrap()]);
    let script = scripts().join("export_teacher.py");
    let grey = dir.join("grey.pt");
    py(&[
        script.to_str().unwrap(),
        "--torchvision",
        "resnet18",
        "--num-classes",
        "10",
        "--in-channels",
        "1",
        "--input-shape",
        "1,32,32",
        "--state-dict",
        sd.to_str().unwrap(),
        "--logits-only",
        "--out",
        grey.to_str().unwrap(),
    ]);
    let check = dir.join("check.py");
    let result = dir.join("diff.txt");
    std::fs::write(
        &check,
        format!(
            "import torch, torchvision\n\
             rgb = torchvision.models.resnet18(num_classes=10)\nrgb.load_state_dict(torch.load(r'{sd}'))\nrgb.eval()\n\
             g = torch.jit.load(r'{grey}')\nx = torch.rand(4, 1, 32, 32)\n\
             with torch.no_grad():\n    a = rgb(x.repeat(1, 3, 1, 1))\n    b = g(x)\n    b = b[0] if isinstance(b, tuple) else b\n\
             open(r'{out}', 'w').write(repr(float((a - b).abs().max() / a.abs().max())))\n",
            sd = sd.display(),
            grey = grey.display(),
            out = result.display()
        ),
    )
    .unwrap();
    py(&[check.to_str().unwrap()]);
    let rel: f64 = std::fs::read_to_string(&result)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        rel < 1e-5,
        "grey teacher differs from the RGB network by {rel} (relative)"
    );
}

/// `teacher_precision = "bf16"` on a plain TorchScript file: its weights are cast to bfloat16 at
/// load, and the logits are PyTorch's for the same model run in bfloat16 (the export tool's
/// `--precision bf16`); a frozen file, whose weights are constants, is refused with the way out.
/// Channels-last layout keeps the logits and leaves a frozen file as it is.
#[test]
fn a_teacher_in_bf16_or_channels_last_gives_pytorchs_logits() {
    let dir = scratch("bf16");
    let plain = export(&dir, "resnet18", &[]);
    let in_bf16 = export(&dir.join("py-bf16"), "resnet18", &["--precision", "bf16"]);
    let want = python_outputs(&in_bf16, &dir.join("py-bf16.json"));
    let py = floats(&want["logits"]);
    let logits = |t: &TorchScriptTeacher| float32_logits(&t.forward(&input()).unwrap());
    let fp32 = load_r18(&plain, Precision::Fp32).unwrap();
    let bf16 = load_r18(&plain, Precision::Bf16).unwrap();
    assert_eq!(bf16.precision(), Precision::Bf16);
    let (a, b) = (logits(&fp32), logits(&bf16));
    let scale = py.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst_py = max_diff(&b, &py);
    let worst_fp32 = max_diff(&b, &a);
    // Python and Rust run the same bf16 kernels: far closer than bf16 is to fp32.
    assert!(
        worst_py <= 1e-2 * scale,
        "rust bf16 vs python bf16: max diff {worst_py} (scale {scale})"
    );
    assert!(
        worst_fp32 > 0.0 && worst_fp32 <= 0.1 * scale,
        "bf16 vs fp32: max diff {worst_fp32} (scale {scale}): the cast did not happen or broke the model"
    );

    // Channels-last (what the engine does on the CPU): fp32's logits up to summation order,
    // contiguous outputs; in bf16 too.
    let mut cl = load_r18(&plain, Precision::Fp32).unwrap();
    assert!(cl.set_channels_last(true).unwrap());
    let c = logits(&cl);
    let worst_cl = max_diff(&c, &a);
    assert!(
        worst_cl <= 1e-4 * scale,
        "channels-last vs contiguous: {worst_cl}"
    );
    let out = cl.forward(&input()).unwrap();
    assert!(out.logits.is_contiguous() && out.features.as_ref().unwrap().is_contiguous());
    let mut cl16 = load_r18(&plain, Precision::Bf16).unwrap();
    assert!(cl16.set_channels_last(true).unwrap());
    let d = logits(&cl16);
    let worst_cl16 = max_diff(&d, &py);
    assert!(
        worst_cl16 <= 1e-2 * scale,
        "channels-last bf16 vs python bf16: {worst_cl16}"
    );

    let frozen = export(&dir.join("frozen"), "resnet18", &["--optimize"]);
    // A frozen module has no parameters to re-lay: it keeps its layout.
    let mut f = load_r18(&frozen, Precision::Fp32).unwrap();
    assert!(!f.set_channels_last(true).unwrap());
    assert!(!f.channels_last());
    let needles = [frozen.to_str().unwrap(), "--precision bf16"];
    assert_refused(
        "r18",
        &frozen,
        &expectation(true),
        Precision::Bf16,
        &needles,
    );
}
