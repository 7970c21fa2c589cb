//! Detection through `mtkd`: a trained run evaluated from its folder (the run's AP, per class,
//! and its detections in COCO's result format) and from its TorchScript export, and
//! `mtkd predict` drawing and listing the boxes of test images.

use std::path::PathBuf;

use mtkd_engine::trainer::{self, RunOptions, Silent};

#[path = "../../engine/tests/common/mod.rs"]
mod common;
use common::*;

#[test]
fn eval_and_predict_of_a_detection_run_repeat_its_final_evaluation() {
    let _g = serial();
    let s = scratch("eval");
    let cfg = parse(&det_scenes(DET_POOL, &s)).unwrap();
    let full = s.join("full");
    trainer::run(&cfg, &full, &RunOptions::default(), &mut Silent).unwrap();
    let sum = summary(&full);
    let dets: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("detections.json")).unwrap()).unwrap();
    let dets = dets.as_array().unwrap();

    // mtkd eval of the run folder: the run's own AP, per class, and its detections.
    let written = s.join("eval-detections.json");
    let o = mtkd_one_thread()
        .arg("eval")
        .arg(&full)
        .arg("--json")
        .arg("--detections")
        .arg(&written)
        .args(["--batch-size", "16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: mtkd_cli::inference::DetEvalReport = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r.report.value, sum.final_value);
    assert_eq!(r.report.get("ap50"), sum.final_report.get("ap50"));
    assert_eq!(
        serde_json::to_string(&r.report.per_class).unwrap(),
        serde_json::to_string(&sum.final_report.per_class).unwrap()
    );
    assert_eq!(r.on.samples, 16);
    // The run's own detections, up to the last printed digit of a box (the run's student
    // computes channels-last, the loaded one contiguous).
    let ours: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&written).unwrap()).unwrap();
    assert_eq!(ours.len(), dets.len());
    for (a, b) in ours.iter().zip(dets) {
        assert_eq!(a["image_id"], b["image_id"]);
        assert_eq!(a["category_id"], b["category_id"]);
        let close = |x: &serde_json::Value, y: &serde_json::Value, tol: f64| {
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= tol
        };
        assert!(close(&a["score"], &b["score"], 2e-5), "{a} vs {b}");
        for i in 0..4 {
            assert!(close(&a["bbox"][i], &b["bbox"][i], 0.011), "{a} vs {b}");
        }
    }
    // mtkd predict on three test images (the files of the scenes' COCO folder): at the
    // training's score threshold, the boxes of detections.json for those images.
    let coco = std::fs::read_dir(det_data_dir().join("scenes-coco"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("annotations/instances_val.json").is_file())
        .unwrap();
    let ann: serde_json::Value = serde_json::from_slice(
        &std::fs::read(coco.join("annotations/instances_val.json")).unwrap(),
    )
    .unwrap();
    let shown: Vec<(u64, PathBuf)> = ann["images"].as_array().unwrap()[..3]
        .iter()
        .map(|i| {
            (
                i["id"].as_u64().unwrap(),
                coco.join("val").join(i["file_name"].as_str().unwrap()),
            )
        })
        .collect();
    let o = mtkd_one_thread()
        .arg("predict")
        .arg(&full)
        .args(["--json", "--min-score", "0.05", "--out"])
        .arg(s.join("drawn"))
        .args(shown.iter().map(|(_, p)| p))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: Vec<mtkd_cli::inference::DetPrediction> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(preds.len(), 3);
    for ((id, _), p) in shown.iter().zip(&preds) {
        assert!(p.drawn.is_file());
        let theirs: Vec<&serde_json::Value> =
            dets.iter().filter(|d| d["image_id"] == *id).collect();
        assert_eq!(p.boxes.len(), theirs.len(), "image {id}");
        for (b, d) in p.boxes.iter().zip(theirs) {
            assert_eq!(b.label as u64 + 1, d["category_id"].as_u64().unwrap());
            assert!((b.score - d["score"].as_f64().unwrap()).abs() < 2e-5);
            // detections.json holds x, y, w, h.
            let x = d["bbox"][0].as_f64().unwrap();
            assert!((f64::from(b.bbox[0]) - x).abs() < 0.011, "{b:?} vs {d}");
        }
    }

    // Its TorchScript export, given the run's [data], says the same.
    let o = mtkd_one_thread()
        .arg("eval")
        .arg(full.join("student.pt"))
        .arg("--data")
        .arg(full.join("config.toml"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: mtkd_cli::inference::DetEvalReport = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        (r.report.value - sum.final_value).abs() < 1e-6,
        "{} vs {}",
        r.report.value,
        sum.final_value
    );

    let _ = std::fs::remove_dir_all(&s);
}

/// The `mtkd` binary on one libtorch thread, as the run it reads was trained and evaluated
/// (`run.threads = 1`): the thread count is part of the numerics (reductions split
/// differently), and the scores are compared to 2e-5.
fn mtkd_one_thread() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"));
    c.env("OMP_NUM_THREADS", "1").env("MKL_NUM_THREADS", "1");
    c
}
