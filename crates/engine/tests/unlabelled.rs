//! Runs with unlabelled training images (docs/METHOD.md section 15), on the three tasks: part of
//! the labels kept (`[data] labels`), a folder of unlabelled images (`[data] unlabelled`), the
//! no-KD baseline on the labelled part, exact resume and shared teacher outputs, and the errors
//! of bad unlabelled input.

use std::path::Path;

use mtkd_engine::trainer::RunOptions;

mod common;
use common::*;

/// Two small teachers and the agent in meta mode (its look-ahead quiz takes labelled samples).
const POOL: &str = "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 1.0\n\
    [distill.agent]\nmode = \"meta\"\n\
    [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
    [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
    [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";

/// `[data]` lines go after `augment` of the tiny config.
fn with_data(cfg: &str, lines: &str) -> String {
    cfg.replacen(
        "augment = { crop_padding = 2, hflip = true }",
        &format!("augment = {{ crop_padding = 2, hflip = true }}\n{lines}"),
        1,
    )
}

fn write_png(path: &Path, w: u32, h: u32, rgb: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if rgb {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 7) as u8, 40]))
            .save(path)
            .unwrap();
    } else {
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 9) ^ (y * 5)) as u8]))
            .save(path)
            .unwrap();
    }
}

#[test]
fn classification_with_a_quarter_of_the_labels_distils_resumes_and_shares_outputs() {
    let _g = serial();
    let s = scratch("unlabelled-cls");
    // Each image once per epoch (labelled_share = 0): 64 labelled of 256.
    let cfg = parse(&with_data(
        &tiny(POOL, &s),
        "labels = { fraction = 0.25 }\nlabelled_share = 0",
    ))
    .unwrap();
    let full = s.join("full");
    let out = run_in(&cfg, &full, &RunOptions::default()).unwrap();
    let count = out.summary.labelled.expect("the summary counts the labels");
    assert_eq!(
        (count.samples, count.labelled, count.distinct_labelled),
        (256, 64, 64)
    );
    let h = history(&full);
    assert_eq!(h.len(), 2);
    for r in &h {
        assert!(r.train_kd > 0.0 && r.train_ce > 0.0, "{r:?}");
        assert!(r.train_ce.is_finite() && r.train_loss.is_finite());
        // The meta agent's look-ahead ran on the labelled quiz.
        assert!(
            r.strategy_metrics.contains_key("agent_updates"),
            "{:?}",
            r.strategy_metrics
        );
    }
    let page = std::fs::read_to_string(full.join("report.html")).unwrap();
    assert!(page.contains("training samples with labels") && page.contains("64 of 256"));
    assert_resume_and_shared_outputs_repeat(&cfg, &s, &h, 11);

    // The same labels without teachers: the no-KD baseline trains on the 64 labelled samples,
    // repeated to the set's 256 per epoch.
    let mut none = cfg.clone();
    none.distill.as_mut().unwrap().strategy = mtkd_engine::config::StrategyKind::None;
    let out = run_in(&none, &s.join("none"), &RunOptions::default()).unwrap();
    let count = out.summary.labelled.unwrap();
    assert_eq!(
        (count.samples, count.labelled, count.distinct_labelled),
        (256, 256, 64)
    );
    assert_eq!(out.summary.strategy, "no-kd");

    // The default labelled_share (0.5) repeats the labelled samples to half of the epoch: 3
    // copies of the 64 beside the 192 unlabelled.
    let shared = parse(&with_data(&tiny(POOL, &s), "labels = { keep = 64 }")).unwrap();
    let mut one = shared.clone();
    one.train.epochs = 1;
    one.train.milestones = vec![];
    let out = run_in(&one, &s.join("share"), &RunOptions::default()).unwrap();
    let count = out.summary.labelled.unwrap();
    assert_eq!(
        (count.samples, count.labelled, count.distinct_labelled),
        (384, 192, 64)
    );
    let _ = std::fs::remove_dir_all(&s);
}

/// A meta run with unlabelled samples from an mtkd before `unlabelled_ce` (and `advantage`)
/// read the teachers' pseudo-targets there; resumed by this one, whose default holds those
/// features at their mean, it keeps reading them and ends as it would have.
#[test]
fn a_run_from_before_the_unlabelled_ce_setting_resumes_with_its_pseudo_targets() {
    let _g = serial();
    let s = scratch("unlabelled-older");
    let with = |line: &str| {
        parse(&with_data(
            &tiny(
                &POOL.replace("mode = \"meta\"\n", &format!("mode = \"meta\"\n{line}")),
                &s,
            ),
            "labels = { fraction = 0.25 }\nlabelled_share = 0",
        ))
        .unwrap()
    };
    let (ran, today) = (with("unlabelled_ce = \"pseudo\"\n"), with(""));
    assert_an_older_folder_resumes_as_it_ran(&ran, &today, &s, &["unlabelled_ce", "advantage"], 11);
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn an_unlabelled_folder_joins_the_training_set_and_bad_images_are_named() {
    let _g = serial();
    let s = scratch("unlabelled-folder");
    let dir = s.join("extra");
    for i in 0..40 {
        write_png(
            &dir.join(format!("batch-{}/img{i:02}.png", i % 2)),
            28,
            28,
            false,
        );
    }
    let text = |folder: &Path| {
        let mut t = with_data(
            &tiny(POOL, &s),
            &format!("unlabelled = {{ root = \"{}\" }}", folder.display()),
        );
        t = t
            .replace("epochs = 2", "epochs = 1")
            .replace("milestones = [1]", "milestones = []");
        t
    };
    let cfg = parse(&text(&dir)).unwrap();
    let out = run_in(&cfg, &s.join("ok"), &RunOptions::default()).unwrap();
    let count = out.summary.labelled.unwrap();
    assert_eq!((count.samples, count.labelled), (296, 256));

    // An image of another size, an RGB image for grey data, an empty folder: named errors.
    let bad = s.join("bad-size");
    write_png(&bad.join("a.png"), 28, 28, false);
    write_png(&bad.join("b.png"), 30, 28, false);
    let err = run_err(&parse(&text(&bad)).unwrap(), &s.join("r1"));
    assert!(
        err.contains("data.unlabelled") && err.contains("b.png") && err.contains("30 x 28"),
        "{err}"
    );
    let rgb = s.join("bad-rgb");
    write_png(&rgb.join("c.png"), 28, 28, true);
    let err = run_err(&parse(&text(&rgb)).unwrap(), &s.join("r2"));
    assert!(err.contains("c.png") && err.contains("grey"), "{err}");
    let empty = s.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run_err(&parse(&text(&empty)).unwrap(), &s.join("r3"));
    assert!(
        err.contains("holds no images") && err.contains("empty"),
        "{err}"
    );
    let missing = s.join("missing");
    let err = run_err(&parse(&text(&missing)).unwrap(), &s.join("r4"));
    assert!(err.contains("missing"), "{err}");
    let _ = std::fs::remove_dir_all(&s);
}

#[test]
fn label_settings_outside_their_range_name_the_field() {
    let s = scratch("unlabelled-config");
    for (lines, field) in [
        ("labels = { fraction = 0.0 }", "data.labels.fraction"),
        ("labels = { fraction = 1.5 }", "data.labels.fraction"),
        ("labels = { keep = 0 }", "data.labels.keep"),
        ("labels = { fraction = 0.5, keep = 10 }", "data.labels"),
        ("labels = { fractoin = 0.5 }", "fractoin"),
        (
            "labels = { fraction = 0.5 }\nlabelled_share = -0.1",
            "data.labelled_share",
        ),
        ("labelled_share = 0.3", "data.labelled_share"),
        (
            "labels = { fraction = 0.5 }\nlabelled_share = 1.0",
            "data.labelled_share",
        ),
    ] {
        let err = parse(&with_data(&tiny(POOL, &s), lines)).unwrap_err();
        assert!(err.contains(field), "{lines}: {err}");
    }
    let cfg = parse(&with_data(&tiny(POOL, &s), "labels = { keep = 100000 }")).unwrap();
    let err = run_err(&cfg, &s.join("r"));
    assert!(err.contains("data.labels.keep = 100000"), "{err}");
}

#[test]
fn segmentation_and_detection_distil_from_unlabelled_scenes() {
    let _g = serial();
    let s = scratch("unlabelled-dense");
    let labels = "labels = { fraction = 0.25 }\nscenes =";
    let seg = parse(&seg_scenes(SEG_POOL, &s).replacen("scenes =", labels, 1)).unwrap();
    let det = parse(&det_scenes(DET_POOL, &s).replacen("scenes =", labels, 1)).unwrap();
    for (name, cfg) in [("seg", &seg), ("det", &det)] {
        let dir = s.join(name);
        let out = run_in(cfg, &dir, &RunOptions::default()).unwrap();
        // 16 labelled scenes, 3 copies each beside the 48 unlabelled (labelled_share 0.5).
        assert_eq!(out.summary.labelled.unwrap().labelled, 48, "{name}");
        assert!(out.summary.final_value.is_finite(), "{name}");
        let h = history(&dir);
        assert!(
            h.iter()
                .all(|r| r.train_kd > 0.0 && r.train_loss.is_finite()),
            "{name}: {h:?}"
        );
        if name == "seg" {
            assert_resume_and_shared_outputs_repeat(cfg, &s.join("seg-repeat"), &h, 7);
        }
    }
    let _ = std::fs::remove_dir_all(&s);
}
