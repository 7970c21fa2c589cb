//! Segmentation through `mtkd`: a trained run evaluated from its folder and from its
//! TorchScript export (the run's own mIoU and pixel accuracy), and a segmentation folder
//! (images and mask PNGs) trained by `mtkd train` and predicted by `mtkd predict`, with a bad
//! mask named.

use std::path::{Path, PathBuf};

use mtkd_engine::trainer::{self, RunOptions, Silent};

#[path = "../../engine/tests/common/mod.rs"]
mod common;
use common::*;

#[test]
fn eval_of_a_segmentation_run_and_its_export_repeats_its_final_evaluation() {
    let _g = serial();
    let s = scratch("eval");
    let cfg = parse(&seg_scenes(SEG_POOL, &s)).unwrap();
    let full = s.join("full");
    trainer::run(&cfg, &full, &RunOptions::default(), &mut Silent).unwrap();
    let sum = summary(&full);
    let pa = sum.final_report.get("pixel_accuracy");
    // `mtkd eval` of the run folder and of its TorchScript export repeats the final evaluation.
    use mtkd_cli::inference::{evaluate_segmentation, EvalSplit, ModelSource};
    let data = mtkd_cli::inference::data_table(&full.join("config.toml")).unwrap();
    for src in [
        ModelSource::Run(full.clone()),
        ModelSource::TorchScript(full.join("student.pt")),
    ] {
        let r = evaluate_segmentation(&src, &data, EvalSplit::Test, 8, tch::Device::Cpu).unwrap();
        assert!(
            (r.report.value - sum.final_value).abs() < 1e-3,
            "{src:?}: {} vs {}",
            r.report.value,
            sum.final_value
        );
        assert!((r.report.get("pixel_accuracy") - pa).abs() < 1e-3);
    }

    let _ = std::fs::remove_dir_all(&s);
}

fn folder_config(root_dir: &Path, s: &Path, extra: &str) -> String {
    format!(
        r#"
[run]
name = "folder"
out_dir = "{out}"
teacher_cache = "{out}/teachers"
seed = 0
threads = 1

[data]
kind = "segmentation-folder"
root = "{root}"
channels = 1
num_classes = 3
normalize = {{ mean = [0.5], std = [0.25] }}

[student]
arch = "cnn-small"
head = "aspp"

[train]
epochs = 1
batch_size = 4
eval_batch_size = 4
lr = 0.05
{extra}
"#,
        out = s.join("runs").display(),
        root = root_dir.display(),
    )
}

fn write_split(dir: &Path, n: usize, size: u32, bad: Option<usize>) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    for i in 0..n {
        let img = image::GrayImage::from_fn(size, size, |x, y| {
            image::Luma([((x * 7 + y * 3 + i as u32) % 256) as u8])
        });
        img.save(dir.join(format!("images/{i:02}.png"))).unwrap();
        let mut m: Vec<u8> = (0..size * size)
            .map(|p| ((p % size) * 3 / size) as u8)
            .collect();
        if bad == Some(i) {
            m[5] = 9;
        }
        mtkd_vision_tasks::segmentation::data::write_index_mask(
            &dir.join(format!("masks/{i:02}.png")),
            size as usize,
            size as usize,
            &m,
        )
        .unwrap();
    }
}

#[test]
fn a_segmentation_folder_trains_and_a_bad_mask_is_named() {
    let _g = serial();
    let s = scratch("folder");
    let data = s.join("data");
    write_split(&data.join("train"), 8, 24, None);
    write_split(&data.join("val"), 4, 24, None);
    let cfg = parse(&folder_config(&data, &s, "")).unwrap();
    let out = trainer::run(&cfg, &s.join("ok"), &RunOptions::default(), &mut Silent).unwrap();
    assert_eq!(out.summary.final_report.per_class.len(), 3);
    assert_eq!(out.summary.student, "cnn-small + aspp");

    // mtkd predict on the test images: masks of the images' size whose pixel accuracy against
    // the test masks is the run's own, and overlays.
    let preds_dir = s.join("preds");
    let images: Vec<PathBuf> = (0..4)
        .map(|i| data.join(format!("val/images/{i:02}.png")))
        .collect();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .arg("predict")
        .arg(s.join("ok"))
        .arg("--json")
        .arg("--out")
        .arg(&preds_dir)
        .args(&images)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: Vec<mtkd_cli::inference::SegPrediction> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(preds.len(), 4);
    let (mut right, mut all) = (0usize, 0usize);
    for (i, p) in preds.iter().enumerate() {
        let mask = image::open(&p.mask).unwrap().to_luma8();
        assert_eq!(mask.dimensions(), (24, 24));
        let truth = image::open(data.join(format!("val/masks/{i:02}.png")))
            .unwrap()
            .to_luma8();
        for (a, b) in mask.pixels().zip(truth.pixels()) {
            assert!(a[0] < 3, "class {} of 3", a[0]);
            right += usize::from(a[0] == b[0]);
            all += 1;
        }
        assert!(p.overlay.is_file());
        let total: f64 = p.classes.iter().map(|c| c.share).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }
    let acc = 100.0 * right as f64 / all as f64;
    let want = out.summary.final_report.get("pixel_accuracy");
    assert!((acc - want).abs() < 0.2, "{acc} vs the run's {want}");

    // A mask with a class outside 0..3: the run fails before training, naming the file.
    write_split(&data.join("val"), 4, 24, Some(2));
    let err = format!(
        "{:#}",
        trainer::run(&cfg, &s.join("bad"), &RunOptions::default(), &mut Silent).unwrap_err()
    );
    assert!(
        err.contains("val/masks/02.png") && err.contains("class 9, outside 0..3"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&s);
}
