//! Segmentation end to end on the engine: synthetic scenes made from the committed Fashion-MNIST
//! subset, teachers with dense heads trained and cached by mtkd, the MTKD-RL agent on pooled
//! per-image signals, exact resume, shared teacher outputs, a torchvision segmentation teacher
//! exported to TorchScript, and the errors of bad segmentation input.

use mtkd_engine::trainer::{self, RunOptions, Silent};

mod common;
use common::*;

#[test]
fn segmentation_distills_resumes_exactly_and_shares_teacher_outputs() {
    let _g = serial();
    let s = scratch("e2e");
    let cfg = parse(&seg_scenes(SEG_POOL, &s)).unwrap();
    let full = s.join("full");
    let out = trainer::run(&cfg, &full, &RunOptions::default(), &mut Silent).unwrap();
    let sum = summary(&full);
    assert_eq!(sum.metric, "miou");
    assert_eq!(sum.student, "cnn-small + fcn");
    assert_eq!(
        out.summary.final_report.per_class.len(),
        11,
        "background + 10 item classes"
    );
    let pa = sum.final_report.get("pixel_accuracy");
    assert!(pa > 30.0 && pa <= 100.0, "pixel accuracy {pa}");
    assert!(sum.final_value > 0.0 && sum.final_value <= 100.0);
    assert_eq!(sum.teachers.len(), 2);
    assert!(sum
        .teachers
        .iter()
        .all(|t| t.test_value.is_some_and(|v| v > 0.0)));
    let h = history(&full);
    assert_eq!(h.len(), 2);
    assert!(h
        .iter()
        .all(|r| r.teacher_weights.len() == 2 && r.train_kd > 0.0 && r.train_feature > 0.0));
    for r in &h {
        let w: f64 = r.teacher_weights.iter().sum();
        assert!(
            (w - 1.0).abs() < 1e-4,
            "meta weights sum to 1 per image: {w}"
        );
        // Where the credit points, per pixel class: shares of the class's update pixels that
        // sum to 1 over the teachers, background always among them.
        assert_eq!(r.class_credit.len(), 11, "{:?}", r.class_credit);
        let seen: Vec<&Vec<f64>> = r.class_credit.iter().filter(|c| !c[0].is_nan()).collect();
        assert!(!r.class_credit[0][0].is_nan() && seen.len() > 1);
        for c in seen {
            let total: f64 = c.iter().sum();
            assert!((total - 1.0).abs() < 1e-9 && c.iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
    }
    let report = std::fs::read_to_string(full.join("report.html")).unwrap();
    assert!(report.contains("Where the agent's credit points"));
    for p in [
        "overlays.png",
        "class_iou.png",
        "accuracy.png",
        "teacher_weights.png",
    ] {
        assert!(full.join("plots").join(p).is_file(), "plots/{p}");
    }
    assert!(full.join("student.pt").is_file() && full.join("report.html").is_file());

    // Killed after 5 steps and resumed, or reading shared teacher outputs (per-pixel logits and feature maps):
    // the same records, metric for metric.
    // The audit's most disagreed-on training images, drawn with truth, student and teachers.
    assert!(full.join("plots/audit/overlays.png").is_file());
    let audit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("audit.json")).unwrap()).unwrap();
    assert!(audit["overlays_png_base64"]
        .as_str()
        .is_some_and(|p| p.len() > 100));
    assert_resume_and_shared_outputs_repeat(&cfg, &s, &h, 5);
    let _ = std::fs::remove_dir_all(&s);
}

/// A segmentation meta run from an mtkd before `advantage` ran the running RMS; resumed by this
/// one (its config.toml without the line, read back as `"auto"`, per-sample here) it keeps the
/// running RMS and ends as the uninterrupted running-RMS run does, not as the per-sample one.
#[test]
fn a_run_from_before_the_advantage_setting_resumes_with_its_running_rms() {
    let _g = serial();
    let s = scratch("advantage-older");
    let with = |line: &str| {
        parse(&seg_scenes(
            &SEG_POOL.replace("mode = \"meta\"\n", &format!("mode = \"meta\"\n{line}")),
            &s,
        ))
        .unwrap()
    };
    let (ran, today) = (with("advantage = \"running-rms\"\n"), with(""));
    assert_an_older_folder_resumes_as_it_ran(&ran, &today, &s, &["advantage"], 5);
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn the_parity_agent_without_feature_kd_reads_shared_outputs_exactly() {
    // Without feature KD no feature maps are shared: the agent's state must be the same whether
    // the teachers ran or their outputs were read (it once differed by the embeddings' width).
    let _g = serial();
    let s = scratch("parity");
    let pool = SEG_POOL
        .replace("feature_weight = 1.0", "feature_weight = 0.0")
        .replace("mode = \"meta\"", "mode = \"parity\"");
    let text = seg_scenes(&pool, &s)
        .replace("epochs = 2\n", "epochs = 1\n")
        .replace("milestones = [1]\n", "");
    let cfg = parse(&text).unwrap();
    trainer::run(
        &cfg,
        &s.join("computed"),
        &RunOptions::default(),
        &mut Silent,
    )
    .unwrap();
    let shared_root = s.join("outputs");
    trainer::share_teacher_outputs(&cfg, &shared_root, None, &mut Silent).unwrap();
    let opts = RunOptions {
        teacher_outputs: Some(shared_root),
        ..RunOptions::default()
    };
    trainer::run(&cfg, &s.join("read"), &opts, &mut Silent).unwrap();
    assert_eq!(
        strip_time(&history(&s.join("computed"))),
        strip_time(&history(&s.join("read")))
    );
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn segmentation_config_errors_name_the_field() {
    let s = scratch("cfg");
    let no_head = seg_scenes("", &s).replace("head = \"fcn\"\n", "");
    let e = parse(&no_head).unwrap_err();
    assert!(
        e.contains("student.head") && e.contains("segmentation head"),
        "{e}"
    );
    let edits = seg_scenes(
        "[[teachers]]\nname = \"t\"\narch = \"resnet8\"\nlabel_noise = 0.2\n",
        &s,
    );
    let e = parse(&edits).unwrap_err();
    assert!(e.contains("teachers[0]") && e.contains("not masks"), "{e}");
    let rrc = seg_scenes("", &s).replace(
        "crop_padding = 2 }",
        "crop_padding = 2, random_resized_crop = 24 }",
    );
    let e = parse(&rrc).unwrap_err();
    assert!(
        e.contains("data.augment") && e.contains("keeps the image size"),
        "{e}"
    );
    // The meta mode weights each pixel itself: no per-pixel rule on top, KL only, no held quiz.
    for (setting, field) in [
        ("pixel_weights = \"confidence\"", "distill.pixel_weights"),
        ("dense_kd = \"cwd\"", "distill.dense_kd"),
    ] {
        let text = seg_scenes(
            &SEG_POOL.replace(
                "temperature = 2.0",
                &format!("temperature = 2.0\n{setting}"),
            ),
            &s,
        );
        let e = parse(&text).unwrap_err();
        assert!(e.contains(field) && e.contains("meta"), "{e}");
    }
    let e = parse(&seg_scenes(
        &SEG_POOL.replace("mode = \"meta\"", "mode = \"meta\"\nquiz = \"previous\""),
        &s,
    ))
    .unwrap_err();
    assert!(e.contains("distill.agent.quiz"), "{e}");
    // A specialist keeps foreground classes; background is always kept.
    let specialist = |classes: &str| {
        seg_scenes(
            &SEG_POOL.replace(
                "head = \"aspp\"",
                &format!("head = \"aspp\"\nclasses = {classes}"),
            ),
            &s,
        )
    };
    assert!(parse(&specialist("[1, 2]")).is_ok());
    assert!(parse(&specialist("[1, 2]\nothers = \"ignore\"")).is_ok());
    let e = parse(&specialist("[0, 1]")).unwrap_err();
    assert!(
        e.contains("teachers[0].classes") && e.contains("background"),
        "{e}"
    );
    // Swapped classes: foreground pairs only.
    let swapped = |pairs: &str| {
        seg_scenes(
            &SEG_POOL.replace(
                "head = \"aspp\"",
                &format!("head = \"aspp\"\nflip_pairs = {pairs}"),
            ),
            &s,
        )
    };
    assert!(parse(&swapped("[[1, 7], [3, 5]]")).is_ok());
    let e = parse(&swapped("[[0, 1]]")).unwrap_err();
    assert!(
        e.contains("teachers[0].flip_pairs") && e.contains("background"),
        "{e}"
    );
    // `others = "ignore"` unlabels the classes a specialist does not own: it needs `classes`.
    let e = parse(&seg_scenes(
        &SEG_POOL.replace("head = \"aspp\"", "head = \"aspp\"\nothers = \"ignore\""),
        &s,
    ))
    .unwrap_err();
    assert!(
        e.contains("teachers[0].others") && e.contains("classes"),
        "{e}"
    );
    // The detection credit's quiz is a detection setting.
    let e = parse(&seg_scenes(
        &SEG_POOL.replace(
            "mode = \"meta\"",
            "mode = \"meta\"\nlocation_quiz = \"focal\"",
        ),
        &s,
    ))
    .unwrap_err();
    assert!(e.contains("distill.agent.location_quiz"), "{e}");
    // What the policy reads on unlabelled pixels needs unlabelled pixels.
    let e = parse(&seg_scenes(
        &SEG_POOL.replace(
            "mode = \"meta\"",
            "mode = \"meta\"\nunlabelled_ce = \"pseudo\"",
        ),
        &s,
    ))
    .unwrap_err();
    assert!(
        e.contains("distill.agent.unlabelled_ce") && e.contains("data.labels"),
        "{e}"
    );
    let no_scenes = seg_scenes("", &s).replace("scenes = {", "# scenes = {");
    assert!(parse(&no_scenes).unwrap_err().contains("data.scenes"));
    let classif = seg_scenes("", &s)
        .replace("kind = \"synthetic-scenes\"", "kind = \"mnist\"")
        .replace("scenes = {", "# scenes = {")
        .replace(", scale = [0.8, 1.25]", "");
    let e = parse(&classif).unwrap_err();
    assert!(
        e.contains("student.head") && e.contains("classification data"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn per_pixel_weights_move_trust_inside_the_image() {
    let _g = serial();
    let s = scratch("pixel");
    let pool = SEG_POOL
        .replace("strategy = \"mtkd-rl\"", "strategy = \"ca-mkd\"")
        .replace("feature_weight = 1.0", "feature_weight = 0.0")
        .replace("[distill.agent]\nmode = \"meta\"\n", "");
    let image = parse(&seg_scenes(&pool, &s)).unwrap();
    let pixel = parse(&seg_scenes(
        &pool.replace(
            "temperature = 2.0",
            "temperature = 2.0\npixel_weights = \"confidence\"",
        ),
        &s,
    ))
    .unwrap();
    trainer::run(
        &image,
        &s.join("image"),
        &RunOptions::default(),
        &mut Silent,
    )
    .unwrap();
    trainer::run(
        &pixel,
        &s.join("pixel"),
        &RunOptions::default(),
        &mut Silent,
    )
    .unwrap();
    let (a, b) = (history(&s.join("image")), history(&s.join("pixel")));
    // The same per-image weights (CA-MKD's, from pooled CE) are recorded; the KD term differs
    // because inside each image the weight follows the teacher that is right at each pixel.
    assert_eq!(
        a[0].teacher_weights, b[0].teacher_weights,
        "epoch 1 starts from the same student"
    );
    assert!(b.iter().all(|r| r.train_kd.is_finite() && r.train_kd > 0.0));
    assert_ne!(a[0].train_kd, b[0].train_kd);
    let e = parse(&seg_scenes(
        &pool.replace(
            "temperature = 2.0",
            "temperature = 2.0\npixel_weights = \"confidence\"\ndense_kd = \"cwd\"",
        ),
        &s,
    ))
    .unwrap_err();
    assert!(e.contains("distill.pixel_weights"), "{e}");
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn a_torchvision_segmentation_teacher_joins_the_pool() {
    let _g = serial();
    let s = scratch("tv");
    let pt = s.join("lraspp.pt");
    let args: Vec<std::ffi::OsString> = vec![
        std::ffi::OsString::from("--torchvision"),
        std::ffi::OsString::from("lraspp_mobilenet_v3_large"),
        std::ffi::OsString::from("--num-classes"),
        std::ffi::OsString::from("11"),
        std::ffi::OsString::from("--input-shape"),
        std::ffi::OsString::from("3,32,32"),
        std::ffi::OsString::from("--out"),
        std::ffi::OsString::from(&pt),
    ];
    let said = export_teacher(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
    assert!(
        said.contains("logits [2, 11, 32, 32]") && said.contains("feature map [2, 128,"),
        "{said}"
    );
    // The grey scenes are given to the RGB teacher as three channels (`[[teachers]] input`).
    let extra = format!(
        "[distill]\nstrategy = \"equal\"\n\n[[teachers]]\nname = \"lraspp\"\ntorchscript = \"{}\"\ninput = {{ channels = 3 }}\n",
        pt.display()
    );
    let mut text = seg_scenes(&extra, &s);
    text = text
        .replace("epochs = 2\n", "epochs = 1\n")
        .replace("milestones = [1]\n", "");
    let cfg = parse(&text).unwrap();
    let run = trainer::run(&cfg, &s.join("run"), &RunOptions::default(), &mut Silent).unwrap();
    let t = &run.summary.teachers[0];
    assert!(
        t.source.starts_with("TorchScript") && t.test_value.is_some(),
        "{t:?}"
    );
    assert!(history(&s.join("run"))[0].train_kd > 0.0);
    // Without its input transform the 3-channel teacher is refused at load, the file named.
    let bad = parse(&text.replace("input = { channels = 3 }\n", "")).unwrap();
    let err = format!(
        "{:#}",
        trainer::run(&bad, &s.join("bad"), &RunOptions::default(), &mut Silent).unwrap_err()
    );
    assert!(
        err.contains("lraspp.pt") && err.contains("[[teachers]] input"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn a_teacher_at_another_resolution_is_resized_to_the_mask() {
    let _g = serial();
    let s = scratch("halfres");
    // A segmentation model whose logits are at half the input's resolution.
    let module = s.join("half.py");
    std::fs::write(
        &module,
        "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 11, 1))\n",
    )
    .unwrap();
    let pt = s.join("half.pt");
    let args: Vec<std::ffi::OsString> = vec![
        std::ffi::OsString::from("--module"),
        std::ffi::OsString::from(format!("{}:build", module.display())),
        std::ffi::OsString::from("--segmentation"),
        std::ffi::OsString::from("--feature-layer"),
        std::ffi::OsString::from("1"),
        std::ffi::OsString::from("--num-classes"),
        std::ffi::OsString::from("11"),
        std::ffi::OsString::from("--input-shape"),
        std::ffi::OsString::from("1,32,32"),
        std::ffi::OsString::from("--out"),
        std::ffi::OsString::from(&pt),
    ];
    let said = export_teacher(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
    assert!(said.contains("logits [2, 11, 16, 16]"));
    let extra = format!(
        "[distill]\nstrategy = \"equal\"\n\n[[teachers]]\nname = \"half\"\ntorchscript = \"{}\"\n",
        pt.display()
    );
    let text = seg_scenes(&extra, &s)
        .replace("epochs = 2\n", "epochs = 1\n")
        .replace("milestones = [1]\n", "");
    let cfg = parse(&text).unwrap();
    let run = trainer::run(&cfg, &s.join("run"), &RunOptions::default(), &mut Silent).unwrap();
    assert!(run.summary.teachers[0].test_value.is_some());
    let h = history(&s.join("run"));
    assert!(
        h[0].train_kd.is_finite() && h[0].train_kd > 0.0,
        "{:?}",
        h[0]
    );
    let log = std::fs::read_to_string(s.join("run").join("summary.json")).unwrap();
    assert!(log.contains("\"miou\""));
    // A classification-shaped teacher in a segmentation pool is refused, the file named.
    let flat = s.join("flat.py");
    std::fs::write(
        &flat,
        "import torch.nn as nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 11))\n",
    )
    .unwrap();
    let flat_pt = s.join("flat.pt");
    let args: Vec<std::ffi::OsString> = vec![
        std::ffi::OsString::from("--module"),
        std::ffi::OsString::from(format!("{}:build", flat.display())),
        std::ffi::OsString::from("--logits-only"),
        std::ffi::OsString::from("--num-classes"),
        std::ffi::OsString::from("11"),
        std::ffi::OsString::from("--input-shape"),
        std::ffi::OsString::from("1,32,32"),
        std::ffi::OsString::from("--out"),
        std::ffi::OsString::from(&flat_pt),
    ];
    export_teacher(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
    let bad =
        parse(&text.replace(&pt.display().to_string(), &flat_pt.display().to_string())).unwrap();
    let err = format!(
        "{:#}",
        trainer::run(&bad, &s.join("bad"), &RunOptions::default(), &mut Silent).unwrap_err()
    );
    assert!(
        err.contains("flat.pt") && err.contains("[B, K, H, W]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn a_segmentation_specialist_and_the_per_pixel_oracle() {
    // A teacher kept to five item classes (the others unannotated) and the oracle's table per
    // pixel class: the KD term follows each pixel's row, not the image's.
    let _g = serial();
    let s = scratch("oracle");
    let pool = |distill: &str| {
        format!(
            "{distill}\n[[teachers]]\nname = \"tops\"\narch = \"resnet8\"\nhead = \"aspp\"\nclasses = [1, 2, 3, 4, 5]\n\n[[teachers]]\nname = \"small-fcn\"\narch = \"cnn-small\"\nflip_pairs = [[1, 6]]\n"
        )
    };
    let rows = std::iter::once("[1, 1]".to_owned())
        .chain((1..=10).map(|c| if c <= 5 { "[1, 0]" } else { "[0, 1]" }.to_owned()))
        .collect::<Vec<_>>()
        .join(", ");
    let oracle = pool(&format!(
        "[distill]\nstrategy = \"fixed\"\ntemperature = 2.0\nfeature_weight = 0.0\n\n[distill.fixed]\nper_class = [{rows}]\n"
    ));
    let even = pool(
        "[distill]\nstrategy = \"fixed\"\ntemperature = 2.0\nfeature_weight = 0.0\n\n[distill.fixed]\nweights = [1, 1]\n",
    );
    let one_epoch = |t: String| {
        t.replace("epochs = 2\n", "epochs = 1\n")
            .replace("milestones = [1]\n", "")
    };
    let a = parse(&one_epoch(seg_scenes(&oracle, &s))).unwrap();
    let b = parse(&one_epoch(seg_scenes(&even, &s))).unwrap();
    // The second teacher trains with T-shirt/top and Sandal swapped in its masks.
    #[derive(Default)]
    struct Phases(Vec<String>);
    impl trainer::Observer for Phases {
        fn phase(&mut self, message: &str) {
            self.0.push(message.to_owned());
        }
    }
    let mut phases = Phases::default();
    trainer::run(&a, &s.join("oracle"), &RunOptions::default(), &mut phases).unwrap();
    let swapped = phases
        .0
        .iter()
        .find(|p| p.contains("`small-fcn` trains with classes [[1, 6]] swapped"))
        .unwrap_or_else(|| panic!("no swap reported: {:?}", phases.0));
    let changed: usize = swapped
        .split(": ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{swapped}"));
    assert!(changed > 0, "{swapped}");
    trainer::run(&b, &s.join("even"), &RunOptions::default(), &mut Silent).unwrap();
    let (ha, hb) = (history(&s.join("oracle")), history(&s.join("even")));
    let w: f64 = ha[0].teacher_weights.iter().sum();
    assert!((w - 1.0).abs() < 1e-4, "weights sum to 1: {w}");
    // Per image the oracle's weights are the mean of its pixels' rows: mostly background
    // ([0.5, 0.5]), pulled toward the owner of the items; not a row of the table.
    assert!(ha[0].teacher_weights.iter().all(|&v| v > 0.05 && v < 0.95));
    assert_ne!(
        ha[0].train_kd, hb[0].train_kd,
        "the KD term follows the pixels' rows"
    );
    // Trust per class is read per pixel: each class's row of the table (classes that occur).
    let cw = &ha[0].class_weights;
    assert_eq!(cw.len(), 11);
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    assert!(close(&cw[0], &[0.5, 0.5]), "background: {:?}", cw[0]);
    for (c, row) in cw.iter().enumerate().skip(1) {
        let want: &[f64] = if c <= 5 { &[1.0, 0.0] } else { &[0.0, 1.0] };
        // A class that no pixel of the epoch had is NaN (no mean), not a row of zeros.
        let absent = row.iter().all(|v| v.is_nan());
        assert!(absent || close(row, want), "class {c}: {row:?}");
    }
    assert!(cw.iter().skip(1).filter(|r| !r[0].is_nan()).count() >= 5);
    // The feature weights are per image, grouped by the image's label: no image is labelled
    // background, so its row has no mean.
    let fw = &ha[0].class_feature_weights;
    assert!(fw[0].iter().all(|v| v.is_nan()), "background: {:?}", fw[0]);
    // The specialist is its own cache entry (the class subset is part of the key).
    let cached: Vec<String> = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cached.iter().any(|n| n.starts_with("tops-resnet8-")),
        "{cached:?}"
    );
    let _ = std::fs::remove_dir_all(&s);
}
