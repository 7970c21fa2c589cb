//! Detection end to end on the engine: synthetic detection scenes made from the committed
//! Fashion-MNIST subset (written as a COCO folder and read back), FCOS-style teachers trained and
//! cached by mtkd, the MTKD-RL agent, exact resume, shared teacher outputs, the run's
//! detections file and plots; torchvision FCOS and RetinaNet teachers exported to TorchScript
//! (random init) with Pearson feature KD; the errors of bad detection input.

use std::path::{Path, PathBuf};

use mtkd_engine::config::Config;
use mtkd_engine::record::{EpochRecord, Summary};
use mtkd_engine::trainer::{self, Interrupted, RunOptions, Silent};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mtkd-det-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
fn serial() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 64 training and 16 test scenes of 32 x 32 with boxes.
fn scenes(extra: &str, s: &Path) -> String {
    data_dir();
    format!(
        r#"
[run]
name = "det"
out_dir = "{out}"
teacher_cache = "{cache}"
seed = 1
threads = 1

[data]
kind = "synthetic-detection"
root = "{data}"
normalize = {{ mean = [0.25], std = [0.25] }}
augment = {{ hflip = true }}
scenes = {{ train = 64, test = 16, size = 32, objects = [1, 2], scale = [0.6, 1.0] }}

[student]
arch = "cnn-small"
head = "fcos"

[train]
epochs = 2
batch_size = 16
eval_batch_size = 16
lr = 0.02
milestones = [1]

[teacher_training]
epochs = 1
batch_size = 16
lr = 0.02
{extra}
"#,
        out = s.join("runs").display(),
        cache = s.join("teachers").display(),
        data = root().join("data/fashion-mnist-mini").display(),
    )
}

/// The scenes' COCO folders go under `$MTKD_DATA_DIR`: one folder for this test process, set
/// once (tests run on several threads).
fn data_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mtkd-det-data-{}", std::process::id()));
        std::env::set_var("MTKD_DATA_DIR", &d);
        d
    })
    .clone()
}

const POOL: &str = r#"
[distill]
strategy = "mtkd-rl"
temperature = 1.0
feature_weight = 1.0

[distill.agent]
mode = "clean"

[[teachers]]
name = "r8-fcos"
arch = "resnet8"
head = "fcos"

[[teachers]]
name = "small-fcos"
arch = "cnn-small"
head = "fcos"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("det.toml"), &[]).map_err(|e| e.to_string())
}

fn history(dir: &Path) -> Vec<EpochRecord> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The records without their times, as JSON (COCO's undefined size ranges are NaN, written
/// `null`, which compares equal).
fn strip_time(h: &[EpochRecord]) -> String {
    let h: Vec<EpochRecord> = h
        .iter()
        .map(|r| EpochRecord {
            seconds: 0.0,
            teacher_seconds: 0.0,
            ..r.clone()
        })
        .collect();
    serde_json::to_string(&h).unwrap()
}

#[test]
fn detection_distills_resumes_exactly_and_shares_teacher_outputs() {
    let _g = serial();
    let s = scratch("e2e");
    let cfg = parse(&scenes(POOL, &s)).unwrap();
    let full = s.join("full");
    let out = trainer::run(&cfg, &full, &RunOptions::default(), &mut Silent).unwrap();
    let sum: Summary =
        serde_json::from_slice(&std::fs::read(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(sum.metric, "ap");
    assert_eq!(sum.student, "cnn-small + fcos");
    assert_eq!(out.summary.final_report.per_class.len(), 10);
    for k in ["ap50", "ap75", "ap_small", "ar100"] {
        assert!(sum.final_report.scalars.contains_key(k), "{k}");
    }
    assert!(sum.final_value >= 0.0 && sum.final_value <= 100.0);
    assert!(sum.final_report.get("ar100") > 0.0, "some object is found");
    assert_eq!(sum.teachers.len(), 2);
    let h = history(&full);
    assert_eq!(h.len(), 2);
    assert!(h
        .iter()
        .all(|r| r.teacher_weights.len() == 2 && r.train_kd > 0.0 && r.train_feature > 0.0));
    for r in &h {
        let w: f64 = r.teacher_weights.iter().sum();
        assert!((w - 1.0).abs() < 1e-4, "weights sum to 1 per image: {w}");
    }
    for p in [
        "boxes.png",
        "class_ap.png",
        "accuracy.png",
        "teacher_weights.png",
    ] {
        assert!(full.join("plots").join(p).is_file(), "plots/{p}");
    }
    // The student's test detections in COCO's result format, ids of the written COCO folder.
    let dets: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("detections.json")).unwrap()).unwrap();
    let dets = dets.as_array().unwrap();
    assert!(!dets.is_empty());
    for d in dets {
        let id = d["image_id"].as_u64().unwrap();
        let cat = d["category_id"].as_u64().unwrap();
        assert!((1..=16).contains(&id) && (1..=10).contains(&cat), "{d}");
        assert_eq!(d["bbox"].as_array().unwrap().len(), 4);
    }
    assert!(
        data_dir().join("scenes-coco").is_dir(),
        "the scenes went through COCO files"
    );

    // mtkd eval of the run folder: the run's own AP, per class, and its detections.
    let written = s.join("eval-detections.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .arg("eval")
        .arg(&full)
        .arg("--json")
        .arg("--detections")
        .arg(&written)
        .args(["--batch-size", "16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: mtkd_engine::inference::DetEvalReport = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r.report.value, sum.final_value);
    assert_eq!(r.report.get("ap50"), sum.final_report.get("ap50"));
    assert_eq!(
        serde_json::to_string(&r.report.per_class).unwrap(),
        serde_json::to_string(&sum.final_report.per_class).unwrap()
    );
    assert_eq!(r.samples, 16);
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
    let coco = std::fs::read_dir(data_dir().join("scenes-coco"))
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
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .arg("predict")
        .arg(&full)
        .args(["--json", "--min-score", "0.05", "--out"])
        .arg(s.join("drawn"))
        .args(shown.iter().map(|(_, p)| p))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: Vec<mtkd_engine::inference::DetPrediction> =
        serde_json::from_slice(&o.stdout).unwrap();
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
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .arg("eval")
        .arg(full.join("student.pt"))
        .arg("--data")
        .arg(full.join("config.toml"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: mtkd_engine::inference::DetEvalReport = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        (r.report.value - sum.final_value).abs() < 1e-6,
        "{} vs {}",
        r.report.value,
        sum.final_value
    );

    // Killed after 3 steps, resumed: the same records, metric for metric.
    let halted = s.join("halted");
    let opts = RunOptions {
        halt_after_steps: Some(3),
        ..RunOptions::default()
    };
    let err = trainer::run(&cfg, &halted, &opts, &mut Silent).unwrap_err();
    assert!(
        err.root_cause().downcast_ref::<Interrupted>().is_some(),
        "{err:#}"
    );
    trainer::run(&cfg, &halted, &RunOptions::default(), &mut Silent).unwrap();
    assert_eq!(strip_time(&h), strip_time(&history(&halted)));

    // Shared teacher outputs ([K + 5, L] and the pyramid features) change nothing.
    let shared_root = s.join("outputs");
    let (key, _) = trainer::share_teacher_outputs(&cfg, &shared_root, None, &mut Silent).unwrap();
    assert!(key.join("epoch-1.bin").is_file());
    let read = s.join("read");
    let opts = RunOptions {
        teacher_outputs: Some(shared_root),
        ..RunOptions::default()
    };
    trainer::run(&cfg, &read, &opts, &mut Silent).unwrap();
    assert_eq!(strip_time(&h), strip_time(&history(&read)));
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn detection_config_errors_name_the_field() {
    let s = scratch("cfg");
    let base = scenes(POOL, &s);
    let e = parse(&base.replace("head = \"fcos\"\n\n[train]", "head = \"fcn\"\n\n[train]"))
        .unwrap_err();
    assert!(e.contains("student.head") && e.contains("fcos"), "{e}");
    let e = parse(&base.replace(
        "augment = { hflip = true }",
        "augment = { crop_padding = 2 }",
    ))
    .unwrap_err();
    assert!(e.contains("data.augment") && e.contains("hflip"), "{e}");
    let e = parse(&base.replace("mode = \"clean\"", "mode = \"meta\"")).unwrap_err();
    assert!(e.contains("distill.strategy") && e.contains("meta"), "{e}");
    let e = parse(
        &base
            .replace("kind = \"synthetic-detection\"", "kind = \"coco\"")
            .replace("scenes = {", "# scenes = {"),
    )
    .unwrap_err();
    assert!(e.contains("data.image_size"), "{e}");
    let e = parse(&base.replace(
        "name = \"r8-fcos\"\narch = \"resnet8\"\nhead = \"fcos\"",
        "name = \"r8-fcos\"\narch = \"resnet8\"\nhead = \"aspp\"",
    ))
    .unwrap_err();
    assert!(e.contains("teachers[0].head"), "{e}");
    let _ = std::fs::remove_dir_all(&s);
}

fn export_teacher(args: &[&str], out: &Path) -> String {
    let python = std::env::var("MTKD_TORCH_PYTHON")
        .expect("MTKD_TORCH_PYTHON names the Python that has torch; run the tests through `cargo xtask test`");
    let o = std::process::Command::new(python)
        .arg(root().join("scripts/export_teacher.py"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn torchvision_fcos_and_retinanet_teachers_join_the_pool() {
    let _g = serial();
    let s = scratch("tv");
    let common = [
        "--num-classes",
        "10",
        "--in-channels",
        "1",
        "--input-shape",
        "1,32,32",
        "--det-strides",
        "4,8,16",
    ];
    let mut extra = String::from(
        "[distill]\nstrategy = \"equal\"\nfeature_weight = 1.0\nfeature_loss = \"pearson\"\n",
    );
    for name in ["fcos_resnet50_fpn", "retinanet_resnet50_fpn"] {
        let pt = s.join(format!("{name}.pt"));
        let mut args = vec!["--torchvision", name];
        args.extend(common);
        let said = export_teacher(&args, &pt);
        // 32 x 32 at strides 4, 8, 16: 64 + 16 + 4 locations.
        assert!(said.contains("[2, 15, 84]"), "{said}");
        extra.push_str(&format!(
            "\n[[teachers]]\nname = \"{name}\"\ntorchscript = \"{}\"\n",
            pt.display()
        ));
    }
    let text = scenes(&extra, &s)
        .replace("epochs = 2\n", "epochs = 1\n")
        .replace("milestones = [1]\n", "");
    let cfg = parse(&text).unwrap();
    let run = trainer::run(&cfg, &s.join("run"), &RunOptions::default(), &mut Silent).unwrap();
    assert_eq!(run.summary.teachers.len(), 2);
    for t in &run.summary.teachers {
        assert!(
            t.source.starts_with("TorchScript") && t.test_value.is_some(),
            "{t:?}"
        );
    }
    let h = history(&s.join("run"));
    assert!(h[0].train_kd > 0.0 && h[0].train_feature > 0.0);
    // RetinaNet's trace holds the anchors of its input size: at another size it is refused at
    // load, the file named.
    let bad = parse(&text.replace("size = 32", "size = 48")).unwrap();
    let err = format!(
        "{:#}",
        trainer::run(&bad, &s.join("bad"), &RunOptions::default(), &mut Silent).unwrap_err()
    );
    assert!(err.contains("retinanet_resnet50_fpn.pt"), "{err}");
    let _ = std::fs::remove_dir_all(&s);
}
