//! Detection end to end on the engine: synthetic detection scenes made from the committed
//! Fashion-MNIST subset (written as a COCO folder and read back), FCOS-style teachers trained and
//! cached by mtkd, the MTKD-RL agent, exact resume, shared teacher outputs, the run's
//! detections file and plots; torchvision FCOS and RetinaNet teachers exported to TorchScript
//! (random init) with Pearson feature KD; the errors of bad detection input.

use mtkd_engine::trainer::{self, RunOptions, Silent};

mod common;
use common::*;

#[test]
fn detection_distills_resumes_exactly_and_shares_teacher_outputs() {
    let _g = serial();
    let s = scratch("e2e");
    let cfg = parse(&det_scenes(DET_POOL, &s)).unwrap();
    let full = s.join("full");
    let out = trainer::run(&cfg, &full, &RunOptions::default(), &mut Silent).unwrap();
    let sum = summary(&full);
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
        det_data_dir().join("scenes-coco").is_dir(),
        "the scenes went through COCO files"
    );

    // Killed after 5 steps (in its second epoch) and resumed, or reading shared teacher outputs (the pyramid features):
    // the same records, metric for metric.
    // The audit's most disagreed-on training images, drawn with truth, student and teachers.
    assert!(full.join("plots/audit/boxes.png").is_file());
    let audit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("audit.json")).unwrap()).unwrap();
    assert!(audit["overlays_png_base64"]
        .as_str()
        .is_some_and(|p| p.len() > 100));
    assert_resume_and_shared_outputs_repeat(&cfg, &s, &h, 5);
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn detection_config_errors_name_the_field() {
    let s = scratch("cfg");
    let base = det_scenes(DET_POOL, &s);
    let e = parse(&base.replace("head = \"fcos\"\n\n[train]", "head = \"fcn\"\n\n[train]"))
        .unwrap_err();
    assert!(e.contains("student.head") && e.contains("fcos"), "{e}");
    let e = parse(&base.replace(
        "augment = { hflip = true }",
        "augment = { crop_padding = 2 }",
    ))
    .unwrap_err();
    assert!(e.contains("data.augment") && e.contains("hflip"), "{e}");
    // MMKD's look-ahead needs a linear last layer; the meta mode weights locations instead.
    let e = parse(&base.replace("strategy = \"mtkd-rl\"", "strategy = \"mmkd\"")).unwrap_err();
    assert!(e.contains("distill.strategy") && e.contains("mmkd"), "{e}");
    assert!(parse(&base.replace("mode = \"clean\"", "mode = \"meta\"")).is_ok());
    // Its credit is each location's own: the cross-sample quizzes are refused.
    for quiz in ["current", "previous"] {
        let e = parse(&base.replace(
            "mode = \"clean\"",
            &format!("mode = \"meta\"\nquiz = \"{quiz}\""),
        ))
        .unwrap_err();
        assert!(e.contains("distill.agent.quiz") && e.contains("own"), "{e}");
    }
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
    // The detection credit's quiz: balanced by default, the focal loss on request.
    let meta = base.replace("mode = \"clean\"", "mode = \"meta\"");
    let cfg = parse(&meta).unwrap();
    let quiz = |c: &mtkd_engine::config::Config| {
        c.distill
            .as_ref()
            .unwrap()
            .agent
            .as_ref()
            .unwrap()
            .location_quiz
    };
    assert_eq!(
        quiz(&cfg),
        mtkd_distill_core::signals::LocationQuiz::BalancedCe
    );
    let focal = parse(&meta.replace(
        "mode = \"meta\"",
        "mode = \"meta\"\nlocation_quiz = \"focal\"",
    ))
    .unwrap();
    assert_eq!(
        quiz(&focal),
        mtkd_distill_core::signals::LocationQuiz::Focal
    );
    // A detection specialist's other boxes are dropped: nothing to leave unlabelled.
    let e = parse(&base.replace(
        "name = \"r8-fcos\"\narch = \"resnet8\"\nhead = \"fcos\"",
        "name = \"r8-fcos\"\narch = \"resnet8\"\nhead = \"fcos\"\nclasses = [0, 1]\nothers = \"ignore\"",
    ))
    .unwrap_err();
    assert!(e.contains("teachers[0].others"), "{e}");
    // Swapped classes edit boxes' classes (any two classes); label noise and permutations
    // edit image labels and stay refused.
    let teacher = |edit: &str| {
        base.replace(
            "name = \"r8-fcos\"\narch = \"resnet8\"\nhead = \"fcos\"",
            &format!("name = \"r8-fcos\"\narch = \"resnet8\"\nhead = \"fcos\"\n{edit}"),
        )
    };
    assert!(parse(&teacher("flip_pairs = [[0, 6], [2, 4]]")).is_ok());
    let e = parse(&teacher("permute_labels = true")).unwrap_err();
    assert!(
        e.contains("teachers[0]") && e.contains("not masks or boxes"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn torchvision_fcos_and_retinanet_teachers_join_the_pool() {
    let _g = serial();
    let s = scratch("tv");
    let shape = [
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
        args.extend(shape);
        args.push("--out");
        let pt_arg = pt.to_string_lossy().into_owned();
        args.push(&pt_arg);
        let said = export_teacher(&args);
        // 32 x 32 at strides 4, 8, 16: 64 + 16 + 4 locations.
        assert!(said.contains("[2, 15, 84]"), "{said}");
        extra.push_str(&format!(
            "\n[[teachers]]\nname = \"{name}\"\ntorchscript = \"{}\"\n",
            pt.display()
        ));
    }
    let text = det_scenes(&extra, &s)
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

/// A detection meta run from an mtkd that left `location_quiz` out of its config.toml scored its
/// credit on the focal loss (before the setting existed, and later when it was written only
/// when not focal); resumed by this one, whose default is the balanced CE, it keeps the focal
/// quiz and ends as it would have.
#[test]
fn a_run_from_before_the_location_quiz_setting_resumes_with_the_focal_quiz() {
    let _g = serial();
    let s = scratch("location-quiz-older");
    let with = |line: &str| {
        let pool = DET_POOL.replace("mode = \"clean\"\n", &format!("mode = \"meta\"\n{line}"));
        parse(&det_scenes(&pool, &s)).unwrap()
    };
    let (ran, today) = (with("location_quiz = \"focal\"\n"), with(""));
    assert_an_older_folder_resumes_as_it_ran(
        &ran,
        &today,
        &s,
        &["location_quiz", "unlabelled_ce", "advantage"],
        5,
    );
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn the_meta_agent_weights_each_location_and_resumes_exactly() {
    // The meta mode on a detector: a weight per teacher and pyramid location from the
    // per-location credit; the records keep each image's mean, which sums to 1; a killed run
    // resumes to the same records and shared teacher outputs give them too.
    let _g = serial();
    let s = scratch("meta");
    let pool = DET_POOL.replace("mode = \"clean\"", "mode = \"meta\"");
    let cfg = parse(&det_scenes(&pool, &s)).unwrap();
    let full = s.join("full");
    trainer::run(&cfg, &full, &RunOptions::default(), &mut Silent).unwrap();
    let h = history(&full);
    assert_eq!(h.len(), 2);
    for r in &h {
        let w: f64 = r.teacher_weights.iter().sum();
        assert!((w - 1.0).abs() < 1e-4, "weights sum to 1: {w}");
        assert!(r.train_kd.is_finite() && r.train_kd > 0.0);
        let m = &r.strategy_metrics;
        assert!(
            m.get("agent_updates").copied().unwrap_or(0.0) > 0.0,
            "{m:?}"
        );
    }
    assert_resume_and_shared_outputs_repeat(&cfg, &s, &h, 5);
    let _ = std::fs::remove_dir_all(&s);
}
