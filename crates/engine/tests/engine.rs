//! End-to-end tests of the engine on the committed Fashion-MNIST subset: config checking, a
//! distillation run with teachers trained and cached by mtkd, exact resume after an interruption,
//! bad teachers and non-finite losses, MMKD and the agent resumed, shared teacher outputs, the
//! teacher output cache, bf16 teachers, and the TorchScript export read back by PyTorch. The
//! binary's own tests (compare, signals, eval, predict) are mtkd-cli's.

use std::path::{Path, PathBuf};

use mtkd_engine::config::Config;
use mtkd_engine::trainer::{self, RunOptions, Silent};

mod common;
use common::*;

#[test]
fn config_errors_name_the_field() {
    let _serial = serial();
    let s = scratch("cfg");
    let ok = tiny("", &s);
    parse(&ok).unwrap();
    let err = parse(&ok.replace("epochs = 2", "epochz = 2")).unwrap_err();
    assert!(
        err.contains("unknown field `epochz`")
            && err.contains("`epochs`")
            && err.contains("test.toml"),
        "{err}"
    );
    let err = parse(&ok.replace("epochs = 2", "epochs = 0")).unwrap_err();
    assert!(
        err.contains("train.epochs") && err.contains("at least 1"),
        "{err}"
    );
    let err = parse(&ok.replace("lr = 0.05", "lr = -1.0")).unwrap_err();
    assert!(err.contains("train.lr"), "{err}");
    let err = parse(&ok.replace("arch = \"cnn-small\"", "arch = \"resnet9000\"")).unwrap_err();
    assert!(
        err.contains("resnet9000") && err.contains("resnet8x4"),
        "{err}"
    );
    let err = parse(&ok.replace("kind = \"mnist\"", "kind = \"mnits\"")).unwrap_err();
    assert!(err.contains("mnits") && err.contains("cifar10"), "{err}");
    let err = parse(&tiny("[distill]\nstrategy = \"equal\"", &s)).unwrap_err();
    assert!(
        err.contains("teachers") && err.contains("at least one"),
        "{err}"
    );
    let err = parse(&tiny("[distill]\nstrategy = \"single\"\nteacher = \"x\"\n[[teachers]]\nname = \"a\"\ntorchscript = \"a.pt\"", &s))
        .unwrap_err();
    assert!(
        err.contains("distill.teacher") && err.contains("no teacher named `x`"),
        "{err}"
    );
    let mmkd = "[distill]\nstrategy = \"mmkd\"\n[distill.mmkd]\nevery = 0\n[[teachers]]\nname = \"a\"\narch = \"resnet8\"";
    let err = parse(&tiny(mmkd, &s)).unwrap_err();
    assert!(err.contains("distill.mmkd.every"), "{err}");
    let err = parse(&tiny(&mmkd.replace("every = 0", "hiden = 8"), &s)).unwrap_err();
    assert!(err.contains("hiden") && err.contains("hidden"), "{err}");
    let err = parse(&tiny(
        "[[teachers]]\nname = \"a\"\narch = \"resnet8\"\ntorchscript = \"a.pt\"",
        &s,
    ))
    .unwrap_err();
    assert!(
        err.contains("teachers[0]") && err.contains("exactly one"),
        "{err}"
    );
    let err = Config::parse(&ok, Path::new("x.toml"), &["train.batch_size=0".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.batch_size"), "{err}");
    let cfg = Config::parse(
        &ok,
        Path::new("x.toml"),
        &["train.epochs=5".into(), "run.device=auto".into()],
    )
    .unwrap();
    assert_eq!((cfg.train.epochs, cfg.run.device.as_str()), (5, "auto"));
    let err = Config::load(Path::new("/nonexistent/mtkd.toml"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/mtkd.toml"), "{err}");
}

#[test]
fn missing_dataset_is_named() {
    let _serial = serial();
    let s = scratch("nodata");
    let cfg = parse(&tiny("", &s).replace("fashion-mnist-mini", "no-such-dataset")).unwrap();
    let err = run_err(&cfg, &s.join("run"));
    assert!(
        err.contains("no-such-dataset") && err.contains("train-images-idx3-ubyte"),
        "{err}"
    );
    assert!(!s.join("run/checkpoints").exists(), "nothing half-written");
    // Normalisation for three channels on grey images: an error naming the field, not a panic.
    let rgb = parse(&tiny("", &s).replace(
        "mean = [0.2860], std = [0.3530]",
        "mean = [0.5, 0.5, 0.5], std = [0.2, 0.2, 0.2]",
    ))
    .unwrap();
    let err = run_err(&rgb, &s.join("rgb"));
    assert!(
        err.contains("data.normalize") && err.contains("3 means"),
        "{err}"
    );
}

#[test]
fn a_run_killed_mid_epoch_resumes_to_identical_metrics() {
    let _serial = serial();
    let s = scratch("resume");
    let extra = "[distill]\nstrategy = \"equal\"\nfeature_weight = 5.0\n\
                 [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
                 [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
                 [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let cfg = parse(&tiny(extra, &s)).unwrap();

    // Uninterrupted run; trains and caches both teachers.
    let a = s.join("a");
    let out_a = run_in(&cfg, &a, &RunOptions::default()).unwrap();
    let ha = history(&a);
    assert_eq!(ha.len(), 2);
    assert!(
        ha.iter().all(|r| r.train_kd > 0.0 && r.train_feature > 0.0),
        "KD and feature terms are active: {ha:?}"
    );
    assert!(
        ha.iter().all(|r| r.teacher_weights == vec![0.5, 0.5]),
        "equal weights recorded: {ha:?}"
    );
    let teachers: Vec<_> = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(teachers.len(), 2, "two cached teachers");
    assert!(
        out_a
            .summary
            .teachers
            .iter()
            .all(|t| t.test_value.unwrap() > 20.0),
        "{:?}",
        out_a.summary.teachers
    );
    for f in [
        "config.toml",
        "summary.json",
        "student.safetensors",
        "student.pt",
        "plots/loss.png",
        "plots/accuracy.png",
        "plots/teacher_weights.png",
        "audit.json",
        "report.html",
    ] {
        assert!(a.join(f).is_file(), "{f} written");
    }
    let audit: mtkd_engine::record::Audit =
        serde_json::from_slice(&std::fs::read(a.join("audit.json")).unwrap()).unwrap();
    assert_eq!(audit.samples.len(), mtkd_engine::audit::KEEP);
    assert!(audit
        .samples
        .windows(2)
        .all(|w| w[0].disagreement >= w[1].disagreement));
    assert!(audit
        .samples
        .iter()
        .all(|x| x.teachers.iter().all(Option::is_some) && !x.image_png_base64.is_empty()));
    assert!(
        ha.iter().all(|r| r.class_weights.len() == 10
            && r.class_weights.iter().all(|row| row == &vec![0.5, 0.5])),
        "per-class weights recorded each epoch"
    );

    // Interrupted after 11 steps (epoch 1 has 8 batches: the stop is inside epoch 2), resumed.
    let b = s.join("b");
    halt_run(&cfg, &b, 11);
    assert_eq!(
        history(&b).len(),
        1,
        "one completed epoch before the interruption"
    );
    let text_before = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let cached_before: Vec<_> = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let out_b = run_in(&cfg, &b, &RunOptions::default()).unwrap();
    let hb = history(&b);
    // The line of the epoch restored from the checkpoint is the same text, byte for byte (not
    // merely the same after parsing: JSON floats must read back exactly).
    let text_after = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert!(
        text_after.starts_with(&text_before),
        "resumed metrics.jsonl rewrote the restored line:\n{text_before}\nvs\n{text_after}"
    );
    assert_eq!(
        strip_time(&ha),
        strip_time(&hb),
        "resumed metrics equal the uninterrupted run's"
    );
    assert_eq!(out_a.summary.final_value, out_b.summary.final_value);
    assert_eq!(
        out_a.summary.final_report.per_class,
        out_b.summary.final_report.per_class
    );
    let cached_after: Vec<_> = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(
        cached_before, cached_after,
        "teachers came from the cache, not retrained"
    );

    // The summary is what a user reads.
    let summary = summary(&b);
    assert_eq!(summary.strategy, "equal");
    assert_eq!(summary.epochs, 2);
    assert_eq!(summary.seed, 3);
    assert!(summary.best_value >= summary.final_value);

    // A different config cannot resume this folder.
    let other =
        parse(&tiny(extra, &s).replace("lr = 0.05\nmilestones", "lr = 0.01\nmilestones")).unwrap();
    let err = run_err(&other, &b);
    assert!(err.contains("another configuration"), "{err}");
}

/// The agent's parameters, normaliser and counters are in the checkpoint: for each agent mode, a
/// run interrupted mid-epoch and resumed ends with the metrics of an uninterrupted one.
#[test]
fn agent_runs_resume_exactly() {
    let _serial = serial();
    let s = scratch("agent");
    for (mode, mix) in [("parity", "dynamic"), ("clean", "fixed")] {
        let extra = format!(
            "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 5.0\n\
             [distill.agent]\nmode = \"{mode}\"\nmix = \"{mix}\"\nagent_step = 3\nbuffer_steps = 3\nwarmup_epochs = 1\n\
             [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
             [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
             [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"
        );
        let mut cfg = parse(&tiny(&extra, &s).replace("epochs = 2", "epochs = 3")).unwrap();
        cfg.run.weight_log = true;
        let a = s.join(format!("{mode}-a"));
        let out = run_in(&cfg, &a, &RunOptions::default()).unwrap();
        assert_eq!(
            out.summary.strategy,
            format!(
                "mtkd-rl-{mode}{}",
                if mix == "dynamic" { "-dynamic" } else { "" }
            )
        );
        let ha = history(&a);
        let last = &ha[2].strategy_metrics;
        assert!(
            last["agent_updates"] > 0.0 && last.contains_key("agent_loss"),
            "{mode}: the agent trained: {last:?}"
        );
        assert!(last["weight_entropy_logit"] > 0.0, "{last:?}");
        if mix == "dynamic" {
            assert!(last.contains_key("mix_logit_agent"), "{last:?}");
        }
        // Per-class weights of every epoch are in the metrics (the audit page shows them).
        assert!(a.join("report.html").is_file());
        for r in &ha[1..] {
            assert_eq!(r.class_weights.len(), 10);
            for row in &r.class_weights {
                let sum: f64 = row.iter().sum();
                assert!(row.len() == 2 && (sum - 1.0).abs() < 1e-4, "{row:?}");
            }
        }
        let b = s.join(format!("{mode}-b"));
        // 8 batches per epoch: stop inside epoch 3, after the agent has updated mid-epoch.
        halt_run(&cfg, &b, 21);
        if mode == "clean" {
            as_if_written_before(&b, &["location_quiz", "unlabelled_ce"]);
        }
        run_in(&cfg, &b, &RunOptions::default()).unwrap();
        assert_eq!(
            strip_time(&ha),
            strip_time(&history(&b)),
            "{mode}: resumed agent run equals the uninterrupted one"
        );
        // The per-sample weight log: a header and one line per sample and epoch, identical
        // after the resume (the interrupted epoch's partial lines are dropped and replayed).
        let csv_a = std::fs::read_to_string(a.join("weights.csv")).unwrap();
        let csv_b = std::fs::read_to_string(b.join("weights.csv")).unwrap();
        let header = "epoch,step,index,label,logit:t1,logit:t2,feature:t1,feature:t2\n";
        assert!(
            csv_a.starts_with(header),
            "{}",
            &csv_a[..80.min(csv_a.len())]
        );
        assert_eq!(csv_a.lines().count(), 1 + 3 * 256);
        assert_eq!(csv_a, csv_b);
    }
}

/// MMKD's weight network, Adam moments and quiz batch are in the checkpoint: a run interrupted
/// mid-epoch and resumed ends with the metrics of an uninterrupted one, and the meta-updates
/// move the weights away from the initial 1/M.
#[test]
fn mmkd_runs_resume_exactly() {
    let _serial = serial();
    let s = scratch("mmkd");
    let extra = "[distill]\nstrategy = \"mmkd\"\nfeature_weight = 5.0\n\
         [distill.mmkd]\nhidden = 16\nlr = 0.01\nevery = 2\n\
         [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let cfg = parse(&tiny(extra, &s)).unwrap();
    let a = s.join("a");
    let out = run_in(&cfg, &a, &RunOptions::default()).unwrap();
    assert_eq!(out.summary.strategy, "mmkd");
    let ha = history(&a);
    for rec in &ha {
        let m = &rec.strategy_metrics;
        // 8 batches per epoch, a meta-update every second one (the very first has no quiz).
        assert!(m["mmkd_meta_updates"] >= 3.0, "{m:?}");
        assert!(m["mmkd_quiz_loss"].is_finite(), "{m:?}");
    }
    let w = &ha[1].teacher_weights;
    assert!(
        w.iter().any(|x| (x - 0.5).abs() > 1e-4),
        "the meta-updates moved the weights: {w:?}"
    );
    let b = s.join("b");
    halt_run(&cfg, &b, 11);
    run_in(&cfg, &b, &RunOptions::default()).unwrap();
    assert_eq!(strip_time(&ha), strip_time(&history(&b)));
}

/// Teacher outputs shared through a folder give exactly the run that computes them itself, whether
/// a teacher pass (`share_teacher_outputs`) or an earlier run stored them; a file that does not
/// belong to the run's batches, or is cut short, is an error naming it.
#[test]
fn shared_teacher_outputs_are_exact() {
    let _serial = serial();
    let s = scratch("shared");
    let extra = "[distill]\nstrategy = \"ebkd\"\nfeature_weight = 5.0\n\
         [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let cfg = parse(&tiny(extra, &s)).unwrap();
    let own = s.join("own");
    run_in(&cfg, &own, &RunOptions::default()).unwrap();
    let own_history = history(&own);
    assert!(own_history.iter().all(|r| r.teacher_seconds > 0.0));
    let want = strip_time(&own_history);

    // A teacher pass stores both epochs; a run reads them.
    let root = s.join("outputs");
    // Over a disk limit: refused before any work.
    let err = trainer::share_teacher_outputs(&cfg, &s.join("small"), Some(1_000_000), &mut Silent)
        .unwrap_err();
    let too = err.root_cause().downcast_ref::<trainer::TooLarge>();
    // 256 samples x 2 epochs x (8 + 2 teachers x 4 x (10 + 64 x 7 x 7)) bytes.
    assert_eq!(
        too.map(|t| t.bytes),
        Some(256 * 2 * (8 + 2 * 4 * (10 + 64 * 49))),
        "{err:#}"
    );
    assert!(!s.join("small").exists());
    let (key, pass) = trainer::share_teacher_outputs(&cfg, &root, None, &mut Silent).unwrap();
    assert_eq!(pass.seconds.len(), 2);
    assert!(key.join("epoch-0.bin").is_file() && key.join("epoch-1.bin").is_file());
    let read = s.join("read");
    let opts = RunOptions {
        teacher_outputs: Some(root.clone()),
        ..RunOptions::default()
    };
    run_in(&cfg, &read, &opts).unwrap();
    assert_eq!(
        want,
        strip_time(&history(&read)),
        "read outputs change nothing"
    );

    // A run that finds nothing stored computes, stores the same bytes, and is unchanged too.
    let root2 = s.join("outputs2");
    let write = s.join("write");
    let opts2 = RunOptions {
        teacher_outputs: Some(root2.clone()),
        ..RunOptions::default()
    };
    run_in(&cfg, &write, &opts2).unwrap();
    assert_eq!(want, strip_time(&history(&write)));
    let key2 = root2.join(key.file_name().unwrap());
    for e in ["epoch-0.bin", "epoch-1.bin"] {
        assert_eq!(
            std::fs::read(key.join(e)).unwrap(),
            std::fs::read(key2.join(e)).unwrap(),
            "{e}"
        );
    }

    // Epoch files swapped: other batches, an error naming the file.
    std::fs::rename(key2.join("epoch-0.bin"), key2.join("tmp")).unwrap();
    std::fs::rename(key2.join("epoch-1.bin"), key2.join("epoch-0.bin")).unwrap();
    std::fs::rename(key2.join("tmp"), key2.join("epoch-1.bin")).unwrap();
    let err = format!(
        "{:#}",
        run_in(&cfg, &s.join("swapped"), &opts2).unwrap_err()
    );
    assert!(
        err.contains("epoch-0.bin") && err.contains("other batches"),
        "{err}"
    );
    // Cut short: an error naming the file.
    let bin = key.join("epoch-1.bin");
    let len = std::fs::metadata(&bin).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
    f.set_len(len / 2).unwrap();
    let err = format!("{:#}", run_in(&cfg, &s.join("cut"), &opts).unwrap_err());
    assert!(err.contains("epoch-1.bin") && err.contains("ends"), "{err}");
}

#[test]
fn non_finite_loss_stops_the_run_or_skips_the_batch() {
    let _serial = serial();
    let s = scratch("nan");
    let mut cfg = parse(&tiny("", &s)).unwrap();
    cfg.train.lr = 1e30;
    let err = run_err(&cfg, &s.join("stop"));
    assert!(
        err.contains("non-finite loss at epoch 1") && err.contains("global step"),
        "{err}"
    );
    // No epoch finished: the message must not promise a checkpoint.
    assert!(
        err.contains("there is no checkpoint") && !err.contains("last good checkpoint"),
        "{err}"
    );
    assert!(
        !s.join("stop/checkpoints/epoch-0001").exists(),
        "no checkpoint of the poisoned epoch"
    );
    // With `skip` the bad batches are counted, and a checkpoint is still never poisoned.
    cfg.train.on_nonfinite = mtkd_engine::config::NonFinitePolicy::Skip;
    cfg.train.epochs = 1;
    // Every batch after the first diverges: past the skip budget the run stops, naming the cause.
    let err = run_err(&cfg, &s.join("skip"));
    assert!(
        err.contains("over train.skip_budget = 0.05")
            && err.contains("of the 8 batches of epoch 1")
            && err.contains("Cause: the"),
        "{err}"
    );
    // With a budget the whole epoch, the batches are skipped and counted.
    cfg.train.skip_budget = 1.0;
    match run_in(&cfg, &s.join("skip-all"), &RunOptions::default()) {
        Ok(_) => {
            let h = history(&s.join("skip-all"));
            assert!(h[0].skipped_batches > 0, "{h:?}");
        }
        // Weights can overflow to inf while some loss stays finite: the checkpoint guard refuses.
        Err(e) => assert!(format!("{e:#}").contains("refusing to checkpoint"), "{e:#}"),
    }
}

#[test]
fn a_nan_checkpoint_never_replaces_a_good_one() {
    let _serial = serial();
    use mtkd_engine::checkpoint::{self, Meta};
    let s = scratch("ckpt");
    let meta = |epoch| Meta {
        epoch,
        step: 10,
        history: Vec::new(),
        elapsed_seconds: 1.0,
        config_hash: "h".into(),
        strategy_json: String::new(),
        active_teachers: None,
        prune_counts: Vec::new(),
    };
    let good = vec![(
        "student.w".to_owned(),
        tch::Tensor::from_slice(&[1.0f32, 2.0]),
    )];
    checkpoint::save(&s, &good, &meta(1), 0).unwrap();
    let bad = vec![(
        "student.w".to_owned(),
        tch::Tensor::from_slice(&[1.0f32, f32::NAN]),
    )];
    let err = checkpoint::save(&s, &bad, &meta(2), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("student.w") && err.contains("epoch 2"),
        "{err}"
    );
    let (tensors, m) = checkpoint::load_latest(&s).unwrap().unwrap();
    assert_eq!(m.epoch, 1);
    assert!(tensors[0].1.equal(&good[0].1));
    // An interrupted write (a leftover temporary folder) is ignored.
    std::fs::create_dir_all(s.join(".tmp-epoch-0003")).unwrap();
    assert_eq!(checkpoint::load_latest(&s).unwrap().unwrap().1.epoch, 1);
    // A newest checkpoint cut short (a disk that lost its tail) is skipped: the resume falls
    // back to the epoch before it.
    let newest = checkpoint::save(&s, &good, &meta(2), 0).unwrap();
    let f = newest.join("state.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_eq!(checkpoint::load_latest(&s).unwrap().unwrap().1.epoch, 1);
    assert!(
        s.join("epoch-0002.unreadable/state.safetensors").is_file(),
        "moved aside, not deleted"
    );
    // Overwritten bytes (same size: a bad sector, a stray write) fail the checksum: the resume
    // falls back, and the folder is moved aside beside the first one.
    let newest = checkpoint::save(&s, &good, &meta(2), 0).unwrap();
    let f = newest.join("state.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 4] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    assert_eq!(checkpoint::load_latest(&s).unwrap().unwrap().1.epoch, 1);
    assert!(s.join("epoch-0002.unreadable-2").is_dir());
    // A NaN written behind the checkpoint's back (checksums made to match) is refused on load.
    let newest = checkpoint::save(&s, &good, &meta(2), 0).unwrap();
    let f = newest.join("state.safetensors");
    tch::Tensor::write_safetensors(&bad, &f).unwrap();
    let sums_path = newest.join("checksums.json");
    let mut sums: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sums_path).unwrap()).unwrap();
    let data = std::fs::read(&f).unwrap();
    sums["files"]["state.safetensors"] = serde_json::json!({
        "bytes": data.len(),
        "crc32": format!("{:08x}", crc32fast::hash(&data)),
    });
    std::fs::write(&sums_path, serde_json::to_vec(&sums).unwrap()).unwrap();
    assert_eq!(checkpoint::load_latest(&s).unwrap().unwrap().1.epoch, 1);
    assert!(s.join("epoch-0002.unreadable-3").is_dir());
    // None readable: an error naming the folder.
    let first = s.join("epoch-0001/meta.json");
    std::fs::write(&first, b"{").unwrap();
    let err = format!("{:#}", checkpoint::load_latest(&s).unwrap_err());
    assert!(
        err.contains("no readable checkpoint") && err.contains("meta.json"),
        "{err}"
    );
}

/// Export a freshly initialised cnn-small with `classes` outputs as a logits-only TorchScript.
fn export_logits_teacher(path: &Path, classes: i64) {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = mtkd_student::Network::new(
        &vs.root(),
        mtkd_student::Arch::CnnSmall,
        (1, 28, 28),
        classes,
    )
    .unwrap();
    trainer::export_torchscript(&net, &vs, path.to_path_buf()).unwrap();
}

#[test]
fn bad_teachers_are_reported_with_their_file() {
    let _serial = serial();
    let s = scratch("badteacher");
    let with_teacher = |path: &Path, feature_weight: f64| {
        parse(&tiny(
            &format!(
                "[distill]\nstrategy = \"equal\"\nfeature_weight = {feature_weight}\n[[teachers]]\nname = \"ts\"\ntorchscript = \"{}\"\n",
                path.display()
            ),
            &s,
        ))
        .unwrap()
    };
    // Corrupt file.
    let corrupt = s.join("corrupt.pt");
    std::fs::write(&corrupt, b"this is not a TorchScript archive").unwrap();
    let err = run_err(&with_teacher(&corrupt, 0.0), &s.join("r1"));
    assert!(
        err.contains("corrupt.pt") && err.contains("not a loadable TorchScript"),
        "{err}"
    );
    // Missing file.
    let err = run_err(&with_teacher(&s.join("gone.pt"), 0.0), &s.join("r2"));
    assert!(
        err.contains("gone.pt") && err.contains("does not exist"),
        "{err}"
    );
    // Wrong class count.
    let seven = s.join("seven.pt");
    export_logits_teacher(&seven, 7);
    let err = run_err(&with_teacher(&seven, 0.0), &s.join("r3"));
    assert!(
        err.contains("seven.pt") && err.contains("7 classes") && err.contains("has 10"),
        "{err}"
    );
    // Logits-only teacher with feature KD configured.
    let ten = s.join("ten.pt");
    export_logits_teacher(&ten, 10);
    let err = run_err(&with_teacher(&ten, 5.0), &s.join("r4"));
    assert!(
        err.contains("ten.pt") && err.contains("logits only"),
        "{err}"
    );
    // The same teacher works for logit-only KD.
    let out = run_in(
        &with_teacher(&ten, 0.0),
        &s.join("r5"),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(out.summary.teachers.len(), 1);
    assert!(out.summary.teachers[0].source.contains("TorchScript"));
}

#[test]
fn exported_student_runs_in_pytorch_with_the_same_logits() {
    let _serial = serial();
    let python = torch_python();
    let s = scratch("export");
    let cfg = parse(&tiny("", &s).replace("epochs = 2", "epochs = 1")).unwrap();
    let dir = s.join("run");
    run_in(&cfg, &dir, &RunOptions::default()).unwrap();
    // Logits from Rust for a fixed input, from the saved weights.
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = mtkd_student::Network::new(&vs.root(), mtkd_student::Arch::CnnSmall, (1, 28, 28), 10)
        .unwrap();
    vs.load(dir.join("student.safetensors")).unwrap();
    let x = tch::Tensor::arange(2 * 28 * 28, (tch::Kind::Float, tch::Device::Cpu))
        .view([2, 1, 28, 28])
        .sin();
    let rust = tch::no_grad(|| net.forward_t(&x, false).logits);
    let rust: Vec<f32> = Vec::try_from(&rust.flatten(0, -1)).unwrap();
    let script = format!(
        "import torch\nm = torch.jit.load(r'{}')\nx = torch.arange(2*28*28, dtype=torch.float32).reshape(2,1,28,28).sin()\nprint(' '.join(repr(v) for v in m(x).flatten().tolist()))",
        dir.join("student.pt").display()
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Vec<f32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(py.len(), 20);
    for (r, p) in rust.iter().zip(&py) {
        assert!((r - p).abs() < 1e-4, "rust {r} vs torch {p}");
    }
}

#[test]
fn every_architecture_exports_to_torchscript_for_any_batch_size() {
    let _serial = serial();
    let s = scratch("zoo-export");
    let x = tch::Tensor::arange(3 * 28 * 28, (tch::Kind::Float, tch::Device::Cpu))
        .view([3, 1, 28, 28])
        .sin();
    for arch in mtkd_student::Arch::all() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = mtkd_student::Network::new(&vs.root(), arch, (1, 28, 28), 10).unwrap();
        let path = s.join(format!("{arch}.pt"));
        trainer::export_torchscript(&net, &vs, path.clone()).unwrap();
        let module = tch::CModule::load(&path).unwrap();
        // Traced with a batch of 1; must run a batch of 3 with the same logits as Rust.
        let script = module.forward_ts(&[&x]).unwrap();
        let rust = tch::no_grad(|| net.forward_t(&x, false).logits);
        assert_eq!(script.size(), vec![3, 10], "{arch}");
        let diff = (&script - &rust).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "{arch}: TorchScript and Rust logits differ by {diff}"
        );
    }
}

/// Three teachers, one trained on permuted labels: `[distill.prune]` drops the teacher that the
/// strategy does not use, its column leaves the signals, the event is recorded, and a run killed
/// after the pruning resumes to identical metrics.
#[test]
fn pruned_teachers_leave_the_pool_and_resume_stays_exact() {
    let _serial = serial();
    let s = scratch("prune");
    let teachers = "[[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
         [[teachers]]\nname = \"t3\"\narch = \"cnn-small\"\npermute_labels = true\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let three = |distill: &str| {
        tiny(&format!("{distill}{teachers}"), &s)
            .replace("epochs = 2\nbatch_size = 32", "epochs = 3\nbatch_size = 32")
            .replace("milestones = [1]", "milestones = [2]")
    };
    // Fixed weights that never use t3: it leaves after epoch 1.
    let cfg = parse(&three(
        "[distill]\nstrategy = \"fixed\"\nfeature_weight = 5.0\n\
         [distill.fixed]\nweights = [1, 1, 0]\n[distill.prune]\nthreshold = 0.1\n",
    ))
    .unwrap();
    assert_eq!(cfg.train.epochs, 3);
    let a = s.join("fixed-a");
    run_in(&cfg, &a, &RunOptions::default()).unwrap();
    let ha = history(&a);
    assert_eq!(ha[0].pruned, vec!["t3".to_owned()]);
    assert_eq!(ha[0].active_teachers, None);
    for r in &ha[1..] {
        assert_eq!(
            r.active_teachers,
            Some(vec!["t1".to_owned(), "t2".to_owned()])
        );
        assert_eq!(r.teacher_weights, vec![0.5, 0.5, 0.0]);
        assert!(r.pruned.is_empty());
    }
    // Killed inside epoch 3 (8 batches an epoch), after the pruning: resumes exactly.
    let b = s.join("fixed-b");
    halt_run(&cfg, &b, 19);
    run_in(&cfg, &b, &RunOptions::default()).unwrap();
    assert_eq!(strip_time(&ha), strip_time(&history(&b)));

    // Learning strategies drop columns of their own state: the parity agent (its stem and heads),
    // MMKD (its weight network and Adam moments) and the meta mode (its active set). A threshold
    // just above 1/3 with two teachers kept prunes exactly one teacher once weights are ~1/M.
    for (name, distill) in [
        ("parity", "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 5.0\n[distill.agent]\nagent_step = 4\n"),
        ("mmkd", "[distill]\nstrategy = \"mmkd\"\nfeature_weight = 5.0\n"),
        ("meta", "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 5.0\n[distill.agent]\nmode = \"meta\"\n"),
    ] {
        let cfg = parse(&three(&format!(
            "{distill}[distill.prune]\nthreshold = 0.34\nmin_teachers = 2\n"
        )))
        .unwrap();
        let a = s.join(format!("{name}-a"));
        run_in(&cfg, &a, &RunOptions::default()).unwrap();
        let ha = history(&a);
        let pruned: usize = ha.iter().map(|r| r.pruned.len()).sum();
        assert_eq!(pruned, 1, "{name}: one teacher leaves: {ha:?}");
        let after = ha.iter().position(|r| !r.pruned.is_empty()).unwrap();
        if after + 1 < ha.len() {
            assert_eq!(ha[after + 1].active_teachers.as_ref().map(Vec::len), Some(2));
        }
        let b = s.join(format!("{name}-b"));
        halt_run(&cfg, &b, 19);
        run_in(&cfg, &b, &RunOptions::default()).unwrap();
        assert_eq!(strip_time(&ha), strip_time(&history(&b)), "{name}: resume after pruning");
    }
}

/// Teachers of a hard pool: the training-set edits are part of the cache key and reach the
/// teacher's data (a class subset trains on those classes only), and bad edits name the field.
#[test]
fn teacher_training_edits_are_cached_apart_and_checked() {
    let _serial = serial();
    let s = scratch("edits");
    let base = "[distill]\nstrategy = \"equal\"\n\
         [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"half\"\narch = \"cnn-small\"\nclasses = [0, 1, 2, 3, 4]\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let cfg = parse(&tiny(base, &s)).unwrap();
    let teachers = mtkd_engine::trainer::prepare_teachers(&cfg, &mut mtkd_engine::Silent).unwrap();
    let dirs: Vec<String> = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    // The specialist never saw classes 5-9: its test top-1 is at most the share of 0-4.
    let half = teachers.iter().find(|t| t.name == "half").unwrap();
    assert!(half.test_value.unwrap() <= 60.0, "{teachers:?}");
    for (edit, field) in [
        ("classes = [0, 12]", "classes"),
        ("label_noise = 1.5", "label_noise"),
        ("flip_pairs = [[1, 1]]", "flip_pairs"),
    ] {
        let text = tiny(&base.replace("classes = [0, 1, 2, 3, 4]", edit), &s);
        let err = match parse(&text) {
            Err(e) => e,
            Ok(cfg) => format!(
                "{:#}",
                mtkd_engine::trainer::prepare_teachers(&cfg, &mut mtkd_engine::Silent).unwrap_err()
            ),
        };
        assert!(err.contains(field) && err.contains("half"), "{edit}: {err}");
    }
    let err = parse(&tiny(
        &base.replace(
            "arch = \"cnn-small\"\nclasses",
            "torchscript = \"x.pt\"\nclasses",
        ),
        &s,
    ))
    .unwrap_err();
    assert!(
        err.contains("TorchScript teacher is already trained"),
        "{err}"
    );
}

/// A TorchScript teacher (a linear classifier on 28x28 images) whose logits are NaN when the
/// batch has `nan_batch` samples (0: when it has more than 2, i.e. past the loader's probe).
fn export_nan_teacher(path: &Path, nan_batch: usize) {
    let cond = if nan_batch == 0 {
        "x.shape[0] > 2".to_owned()
    } else {
        format!("x.shape[0] == {nan_batch}")
    };
    let script = format!(
        "import torch\n\
         class T(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(784, 10)\n\
         \x20   def forward(self, x):\n        y = self.fc(x.flatten(1))\n        if {cond}:\n            y = y * float('nan')\n        return y\n\
         torch.manual_seed(0)\ntorch.jit.script(T()).save(r'{}')\n",
        path.display()
    );
    run_python_file(&path.with_extension("py"), &script);
}

#[test]
fn a_nan_teacher_is_caught_and_skipped_batches_leave_no_trace() {
    let _serial = serial();
    let s = scratch("nanteacher");
    let with = |path: &Path, extra: &str| {
        parse(&tiny(
            &format!(
                "on_nonfinite = \"skip\"\n{extra}[distill]\nstrategy = \"equal\"\nfeature_weight = 0.0\n[[teachers]]\nname = \"ts\"\ntorchscript = \"{}\"\n",
                path.display()
            ),
            &s,
        ))
        .unwrap()
    };
    // NaN on every real batch (it passes the 2-sample probe): refused when the pool is evaluated.
    let always = s.join("always.pt");
    export_nan_teacher(&always, 0);
    let err = run_err(&with(&always, ""), &s.join("r1"));
    assert!(
        err.contains("teacher `ts`") && err.contains("always.pt") && err.contains("test set"),
        "{err}"
    );
    // NaN on training batches only (32 samples): skipped, and past the budget the run stops
    // naming the teacher.
    let train_only = s.join("train-only.pt");
    export_nan_teacher(&train_only, 32);
    let err = run_err(&with(&train_only, ""), &s.join("r2"));
    assert!(
        err.contains("the logits of teacher `ts` (1 batches)") && err.contains("skip_budget"),
        "{err}"
    );
    // Under the stop policy the message blames the teacher, not the learning rate.
    let stop = parse(
        &tiny(
            &format!(
                "[distill]\nstrategy = \"equal\"\nfeature_weight = 0.0\n[[teachers]]\nname = \"ts\"\ntorchscript = \"{}\"\n",
                train_only.display()
            ),
            &s,
        ),
    )
    .unwrap();
    let err = run_err(&stop, &s.join("r-stop"));
    assert!(
        err.contains("the logits of teacher `ts`")
            && err.contains("teacher's file")
            && !err.contains("lower train.lr"),
        "{err}"
    );
    // A budget of the whole epoch: every batch skipped, and the skipped batches changed nothing,
    // BatchNorm's running statistics included (they are the fresh network's).
    let mut cfg = with(&train_only, "skip_budget = 1.0\n");
    cfg.train.epochs = 1;
    run_in(&cfg, &s.join("r3"), &RunOptions::default()).unwrap();
    let h = history(&s.join("r3"));
    assert_eq!(h[0].skipped_batches, 8);
    let state = tch::Tensor::read_safetensors(s.join("r3/student.safetensors")).unwrap();
    let mut seen = 0;
    for (name, t) in &state {
        if name.ends_with("running_mean") {
            assert_eq!(t.abs().max().double_value(&[]), 0.0, "{name}");
            seen += 1;
        }
        if name.ends_with("running_var") {
            assert_eq!((t - 1.0).abs().max().double_value(&[]), 0.0, "{name}");
        }
    }
    assert!(seen > 0, "the student has BatchNorm layers");
}

#[test]
fn a_teachers_seed_follows_its_name_not_its_place_in_the_pool() {
    let s = scratch("seedname");
    let pool = |a: &str, b: &str| {
        parse(&tiny(
            &format!(
                "[distill]\nstrategy = \"equal\"\n[[teachers]]\nname = \"{a}\"\narch = \"cnn-small\"\n\
                 [[teachers]]\nname = \"{b}\"\narch = \"cnn-small\"\n\
                 [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"
            ),
            &s,
        ))
        .unwrap()
    };
    let seed = |cfg: &Config, name: &str| {
        let t = cfg.teachers.iter().find(|t| t.name == name).unwrap();
        trainer::teacher_config(cfg, t).unwrap().run.seed
    };
    let (ab, ba) = (pool("x", "y"), pool("y", "x"));
    assert_eq!(seed(&ab, "x"), seed(&ba, "x"));
    assert_eq!(seed(&ab, "y"), seed(&ba, "y"));
    assert_ne!(seed(&ab, "x"), seed(&ab, "y"));
}

#[test]
fn a_teacher_gets_its_own_input_channels_size_and_normalisation() {
    let _serial = serial();
    let s = scratch("teacherinput");
    let pt = s.join("rgb64.pt");
    let expected = s.join("expected.txt");
    // An RGB 64x64 teacher with its own normalisation; PyTorch computes its logits for a fixed
    // student batch (grey 28x28, normalised as the tiny config does) turned into its input.
    let script = format!(
        "import torch\nimport torch.nn.functional as F\n\
         class T(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)\n        self.fc = torch.nn.Linear(8, 10)\n\
         \x20   def forward(self, x):\n        if x.shape[2] != 64:\n            raise RuntimeError('this teacher takes 64x64 images')\n        return self.fc(self.conv(x).relu().mean((2, 3)))\n\
         torch.manual_seed(0)\nm = torch.jit.script(T().eval())\nm.save(r'{pt}')\n\
         x = torch.arange(2*28*28, dtype=torch.float32).reshape(2,1,28,28).sin()\n\
         raw = x * 0.3530 + 0.2860\n\
         t = F.interpolate(raw.repeat(1,3,1,1), size=(64,64), mode='bilinear', align_corners=False)\n\
         mean = torch.tensor([0.485,0.456,0.406]).view(1,3,1,1); std = torch.tensor([0.229,0.224,0.225]).view(1,3,1,1)\n\
         with torch.no_grad():\n    y = m((t - mean) / std)\n\
         open(r'{exp}', 'w').write(' '.join(repr(v) for v in y.flatten().tolist()))\n",
        pt = pt.display(),
        exp = expected.display()
    );
    run_python_file(&s.join("make.py"), &script);
    let with = |input: &str| {
        parse(&tiny(
            &format!(
                "[distill]\nstrategy = \"equal\"\nfeature_weight = 0.0\n[[teachers]]\nname = \"rgb\"\ntorchscript = \"{}\"\n{input}",
                pt.display()
            ),
            &s,
        ))
        .unwrap()
    };
    // Without `input` the interpreter's own message comes through, with the way out.
    let err = run_err(&with(""), &s.join("r1"));
    assert!(
        err.contains("RuntimeError: this teacher takes 64x64 images") && err.contains("input = {"),
        "{err}"
    );
    let input = "input = { channels = 3, size = 64, normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] } }\n";
    let cfg = with(input);
    let t = &cfg.teachers[0];
    let teacher = mtkd_engine::teacher_input::InputAdapted {
        inner: Box::new(
            mtkd_teachers::TorchScriptTeacher::load(
                "rgb",
                &pt,
                tch::Device::Cpu,
                &mtkd_teachers::Expectation {
                    input: (3, 64, 64),
                    num_classes: 10,
                    needs_features: false,
                    dense: false,
                    det_locations: None,
                },
            )
            .unwrap(),
        ),
        transform: mtkd_engine::teacher_input::InputTransform::new(
            &cfg.data.normalize,
            1,
            t.input.as_ref().unwrap(),
            tch::Device::Cpu,
        ),
    };
    use mtkd_teachers::Teacher;
    let x = tch::Tensor::arange(2 * 28 * 28, (tch::Kind::Float, tch::Device::Cpu))
        .view([2, 1, 28, 28])
        .sin();
    let got: Vec<f32> = Vec::try_from(&teacher.forward(&x).unwrap().logits.flatten(0, -1)).unwrap();
    let want: Vec<f32> = std::fs::read_to_string(&expected)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "rust {g} vs torch {w}");
    }
    // And a whole distillation run with it.
    let out = run_in(&cfg, &s.join("r2"), &RunOptions::default()).unwrap();
    assert!(out.summary.teachers[0].test_value.is_some());
    // `input` is for TorchScript teachers.
    let err = parse(&tiny(
        &format!("[distill]\nstrategy = \"equal\"\n[[teachers]]\nname = \"a\"\narch = \"cnn-small\"\n{input}[teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"),
        &s,
    ))
    .unwrap_err();
    assert!(err.contains("teachers[0].input"), "{err}");
}

#[test]
fn a_student_starts_from_an_earlier_run_with_its_strategy_state() {
    let _serial = serial();
    let s = scratch("init");
    let pool =
        "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 0.0\nagent = { mode = \"meta\" }\n\
                [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
                [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
                [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let a = s.join("a");
    run_in(&parse(&tiny(pool, &s)).unwrap(), &a, &RunOptions::default()).unwrap();
    // A nearly frozen student (lr 1e-12): it must end where run `a` ended.
    let with_init = |extra: &str, pool: &str| {
        let text = tiny(pool, &s)
            .replace("lr = 0.05\nmilestones", "lr = 1e-12\nmilestones")
            .replace(
                "arch = \"cnn-small\"\n\n[train]",
                &format!(
                    "arch = \"cnn-small\"\ninit = \"{}\"\n{extra}\n[train]",
                    a.display()
                ),
            );
        parse(&text).unwrap()
    };
    let b = s.join("b");
    let out = run_in(
        &with_init("init_strategy = true", pool),
        &b,
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(
        out.summary.init.as_deref(),
        Some(format!("{} (strategy state included)", a.display()).as_str())
    );
    let wa = tch::Tensor::read_safetensors(a.join("student.safetensors")).unwrap();
    let wb: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(b.join("student.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let mut compared = 0;
    for (name, t) in &wa {
        if name.contains("running") || name.contains("num_batches") {
            continue;
        }
        let d = (t - &wb[name]).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{name} moved by {d}");
        compared += 1;
    }
    assert!(compared > 0);
    // The pool itself can come from the earlier run: no [[teachers]] here, the same result.
    let text = tiny("[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 0.0\nagent = { mode = \"meta\" }\n", &s)
        .replace("lr = 0.05\nmilestones", "lr = 1e-12\nmilestones")
        .replace(
            "arch = \"cnn-small\"\n\n[train]",
            &format!(
                "arch = \"cnn-small\"\ninit = \"{}\"\ninit_strategy = true\ninit_teachers = true\n\n[train]",
                a.display()
            ),
        );
    let carried = parse(&text).unwrap();
    assert_eq!(carried.teachers.len(), 2);
    let out_e = run_in(&carried, &s.join("e"), &RunOptions::default()).unwrap();
    assert_eq!(out_e.summary.final_value, out.summary.final_value);
    // The strategy state must fit the pool: one teacher less is refused, naming the run.
    let one =
        "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 0.0\nagent = { mode = \"meta\" }\n\
               [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
               [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let err = run_err(&with_init("init_strategy = true", one), &s.join("c"));
    assert!(
        err.contains("student.init_strategy") && err.contains(&a.display().to_string()),
        "{err}"
    );
    // Weights of another architecture are refused.
    let text = tiny("", &s).replace(
        "arch = \"cnn-small\"\n\n[train]",
        &format!("arch = \"resnet8\"\ninit = \"{}\"\n\n[train]", a.display()),
    );
    let err = run_err(&parse(&text).unwrap(), &s.join("d"));
    assert!(err.contains("trained a cnn-small student"), "{err}");
}

#[test]
fn single_teacher_kd_in_a_pool_runs_only_its_teacher_and_matches_a_pool_of_one() {
    let _serial = serial();
    let s = scratch("single-pool");
    let teacher = |name: &str| format!("[[teachers]]\nname = \"{name}\"\narch = \"cnn-small\"\n");
    let cfg = |pool: &str| {
        parse(&tiny(
            &format!(
                "[distill]\nstrategy = \"single\"\nteacher = \"x\"\nkd_weight = 1.0\nfeature_weight = 0.0\n\
                 {pool}[teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"
            ),
            &s,
        ))
        .unwrap()
    };
    let both = cfg(&(teacher("x") + &teacher("y")));
    let alone = cfg(&teacher("x"));
    run_in(&both, &s.join("both"), &RunOptions::default()).unwrap();
    run_in(&alone, &s.join("alone"), &RunOptions::default()).unwrap();
    let (hb, ha) = (history(&s.join("both")), history(&s.join("alone")));
    assert_eq!(hb.len(), 2);
    for (b, a) in hb.iter().zip(&ha) {
        // The same student, step for step: the idle teacher changed nothing.
        assert_eq!(b.train_loss, a.train_loss, "epoch {}", b.epoch);
        assert_eq!(b.test.value, a.test.value, "epoch {}", b.epoch);
        assert_eq!(b.teacher_weights, vec![1.0, 0.0]);
        // Only `x` is in the pool that runs.
        assert_eq!(b.active_teachers, Some(vec!["x".to_owned()]));
    }
}

#[test]
fn bench_steps_times_every_mode_with_the_trainers_step() {
    use mtkd_engine::trainer::bench::{bench_steps, BenchMode};
    let _serial = serial();
    let s = scratch("bench-steps");
    let cfg = parse(&tiny(
        "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 1.0\n\
         [[teachers]]\nname = \"x\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"y\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n",
        &s,
    ))
    .unwrap();
    let (plan, timings) = bench_steps(&cfg, &BenchMode::ALL, 1, 2, &mut Silent).unwrap();
    assert_eq!(plan.teachers.len(), 2);
    // Teachers trained by mtkd: the reference rebuilds them from their weights.
    assert!(plan.teachers.iter().all(Option::is_none));
    let native: Vec<&str> = plan
        .native_teachers
        .iter()
        .map(|t| t.as_ref().map(|(a, _)| a.as_str()).unwrap())
        .collect();
    assert_eq!(native, ["cnn-small", "resnet8"]);
    assert!(plan
        .native_teachers
        .iter()
        .all(|t| t.as_ref().unwrap().1.is_file()));
    assert_eq!(
        (plan.student.as_str(), plan.input, plan.num_classes),
        ("cnn-small", (1, 28, 28), 10)
    );
    let modes: Vec<BenchMode> = timings.iter().map(|t| t.mode).collect();
    assert_eq!(modes, BenchMode::ALL.to_vec());
    for t in &timings {
        assert_eq!(t.step_seconds.len(), 2);
        assert!(t.images_per_second.is_finite() && t.images_per_second > 0.0);
        // CE only runs no teacher; every other mode does (the cached one reads its outputs).
        assert_eq!(
            t.teacher_seconds > 0.0,
            t.mode != BenchMode::Ce,
            "{:?}",
            t.mode
        );
        // Only the agent holds a buffer for its update: 2 steps of 32 samples of its state.
        let agent = matches!(t.mode, BenchMode::MtkdRl | BenchMode::MtkdRlCached);
        assert_eq!(t.buffered_bytes > 0, agent, "{:?}", t.mode);
        if agent {
            assert_eq!(t.buffered_bytes % (2 * 32 * 4), 0, "{}", t.buffered_bytes);
        }
        // The breakdown: signals and the strategy run in every distillation mode, inside the
        // timed steps; the parity agent asks for no reward forward.
        let kd = t.mode != BenchMode::Ce;
        assert_eq!(t.signal_seconds > 0.0, kd, "{:?}", t.mode);
        assert_eq!(t.strategy_seconds > 0.0, kd, "{:?}", t.mode);
        assert_eq!(t.reward_seconds, 0.0, "{:?}", t.mode);
        let parts = t.teacher_seconds + t.signal_seconds + t.strategy_seconds;
        assert!(parts < t.step_seconds.iter().sum::<f64>(), "{t:?}");
    }
    // The clean agent's reward costs two eval-mode student forwards per step past its warm-up.
    let cfg = parse(&tiny(
        "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 1.0\n\
         [distill.agent]\nmode = \"clean\"\nwarmup_epochs = 1\n\
         [[teachers]]\nname = \"x\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"y\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n",
        &s,
    ))
    .unwrap();
    let (_, timings) = bench_steps(
        &cfg,
        &[BenchMode::Aver, BenchMode::MtkdRl],
        1,
        2,
        &mut Silent,
    )
    .unwrap();
    assert_eq!(timings[0].reward_seconds, 0.0);
    assert!(timings[1].reward_seconds > 0.0, "{:?}", timings[1]);
}

#[test]
fn the_teacher_output_cache_serves_later_epochs_and_changes_nothing() {
    let _serial = serial();
    let s = scratch("output-cache");
    let cfg = |cache: &str| {
        let text = tiny(
            &format!(
                "epochs = 3\n[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 1.0\n{cache}\
                 [[teachers]]\nname = \"x\"\narch = \"cnn-small\"\n\
                 [[teachers]]\nname = \"y\"\narch = \"resnet8\"\n\
                 [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"
            ),
            &s,
        )
        .replace("epochs = 2\n", "")
        .replace("augment = { crop_padding = 2, hflip = true }", "");
        parse(&text).unwrap()
    };
    let (plain, cached) = (cfg(""), cfg("output_cache_mb = 64\n"));
    run_in(&plain, &s.join("plain"), &RunOptions::default()).unwrap();
    run_in(&cached, &s.join("cached"), &RunOptions::default()).unwrap();
    let (hp, hc) = (history(&s.join("plain")), history(&s.join("cached")));
    assert_eq!(hc.len(), 3);
    // 256 samples in batches of 32: the first epoch runs the teachers, the next ones read
    // every batch from the cache.
    let served: Vec<Option<u64>> = hc.iter().map(|r| r.cached_batches).collect();
    assert_eq!(served, [Some(0), Some(8), Some(8)]);
    assert!(hp.iter().all(|r| r.cached_batches.is_none()));
    for (p, c) in hp.iter().zip(&hc) {
        // The same teacher outputs, so the same training, step for step.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(1.0);
        assert!(
            close(p.train_loss, c.train_loss),
            "epoch {}: {} vs {}",
            p.epoch,
            p.train_loss,
            c.train_loss
        );
        assert!(close(p.train_kd, c.train_kd), "epoch {}", p.epoch);
        assert!(close(p.train_feature, c.train_feature), "epoch {}", p.epoch);
        assert!(close(p.test.value, c.test.value), "epoch {}", p.epoch);
        for (a, b) in p.teacher_weights.iter().zip(&c.teacher_weights) {
            assert!(
                close(*a, *b),
                "epoch {}: weights {:?} vs {:?}",
                p.epoch,
                p.teacher_weights,
                c.teacher_weights
            );
        }
    }
}

#[test]
fn the_teacher_output_cache_is_refused_with_augmentation_or_too_little_memory() {
    let _serial = serial();
    let s = scratch("output-cache-bad");
    let extra = "[distill]\nstrategy = \"equal\"\nfeature_weight = 1.0\noutput_cache_mb = 1\n\
                 [[teachers]]\nname = \"x\"\narch = \"cnn-small\"\n\
                 [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    // With augmentation an image differs every epoch: refused at config check.
    let err = parse(&tiny(extra, &s)).unwrap_err();
    assert!(
        err.contains("distill.output_cache_mb") && err.contains("data.augment"),
        "{err}"
    );
    // Without it, 256 samples of a cnn-small's logits and feature maps need more than 1 MB.
    let text = tiny(extra, &s).replace("augment = { crop_padding = 2, hflip = true }", "");
    let err = run_err(&parse(&text).unwrap(), &s.join("d"));
    assert!(
        err.contains("distill.output_cache_mb = 1 is too small")
            && err.contains("256 training samples"),
        "{err}"
    );
}

/// `distill.teacher_precision = "bf16"`: the same cached teachers (trained in fp32) run in
/// bfloat16; their test accuracy and the KD term stay close to fp32's but are not identical, and
/// shared teacher outputs are stored under another key than fp32's.
#[test]
fn teachers_in_bf16_keep_their_accuracy_and_their_own_shared_outputs() {
    let _serial = serial();
    let s = scratch("bf16");
    let extra = |p: &str| {
        format!(
            "[distill]\nstrategy = \"equal\"\nfeature_weight = 5.0\nteacher_precision = \"{p}\"\n\
             [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
             [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
             [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"
        )
    };
    let fp32 = parse(&tiny(&extra("fp32"), &s)).unwrap();
    let bf16 = parse(&tiny(&extra("bf16"), &s)).unwrap();
    let a = run_in(&fp32, &s.join("fp32"), &RunOptions::default()).unwrap();
    let b = run_in(&bf16, &s.join("bf16"), &RunOptions::default()).unwrap();
    // The teachers come from the same cache entries (precision is not part of training).
    for (ta, tb) in a.summary.teachers.iter().zip(&b.summary.teachers) {
        assert_eq!(ta.source, tb.source);
        let (va, vb) = (ta.test_value.unwrap(), tb.test_value.unwrap());
        assert!(
            (va - vb).abs() <= 2.0,
            "{}: fp32 {va}% vs bf16 {vb}%",
            ta.name
        );
    }
    // The bf16 figure is measured once and kept beside each teacher's weights, for the weights
    // it was measured on: a changed figure file is read back as is (not measured again), one
    // written for other weights is measured again and rewritten.
    let mut stored: Vec<PathBuf> = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("test-bf16-nhwc-cpu.json"))
        .filter(|p| p.is_file())
        .collect();
    stored.sort();
    assert_eq!(stored.len(), 2, "one bf16 figure per cached teacher");
    let figure = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let values: Vec<f64> = stored
        .iter()
        .map(|p| figure(p)["value"].as_f64().unwrap())
        .collect();
    let mut from_run: Vec<f64> = b
        .summary
        .teachers
        .iter()
        .map(|t| t.test_value.unwrap())
        .collect();
    let mut sorted_values = values.clone();
    sorted_values.sort_by(f64::total_cmp);
    from_run.sort_by(f64::total_cmp);
    assert_eq!(sorted_values, from_run);
    let mut edited = figure(&stored[0]);
    edited["value"] = serde_json::json!(12.5);
    std::fs::write(&stored[0], serde_json::to_vec(&edited).unwrap()).unwrap();
    let mut other = figure(&stored[1]);
    other["weights_hash"] = serde_json::json!("0000000000000000");
    other["value"] = serde_json::json!(12.5);
    std::fs::write(&stored[1], serde_json::to_vec(&other).unwrap()).unwrap();
    let again: Vec<f64> = trainer::prepare_teachers(&bf16, &mut Silent)
        .unwrap()
        .iter()
        .map(|t| t.test_value.unwrap())
        .collect();
    assert!(again.contains(&12.5), "the kept figure is read: {again:?}");
    assert!(
        again.iter().filter(|v| **v == 12.5).count() == 1,
        "a figure of other weights is measured again: {again:?}"
    );
    assert_eq!(figure(&stored[1])["value"].as_f64(), Some(values[1]));
    let (ha, hb) = (history(&s.join("fp32")), history(&s.join("bf16")));
    let (ka, kb) = (ha[0].train_kd, hb[0].train_kd);
    assert!(
        ka != kb && (ka - kb).abs() <= 0.05 * ka.abs(),
        "first-epoch KD term: fp32 {ka} vs bf16 {kb}"
    );
    let (key_a, _) =
        trainer::share_teacher_outputs(&fp32, &s.join("out"), None, &mut Silent).unwrap();
    let (key_b, _) =
        trainer::share_teacher_outputs(&bf16, &s.join("out"), None, &mut Silent).unwrap();
    assert_ne!(key_a, key_b, "bf16 outputs must not be read as fp32 ones");
}

/// `run.channels_last` (default true on the CPU) changes the layout, not the training: a run
/// with it and one without give the same losses and accuracy up to the order of float sums,
/// and the saved weights (written contiguous) load into either.
#[test]
fn channels_last_changes_the_layout_not_the_training() {
    let _serial = serial();
    let s = scratch("cl");
    let extra = "[distill]\nstrategy = \"equal\"\nfeature_weight = 5.0\n\
         [[teachers]]\nname = \"t1\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let on = parse(&tiny(extra, &s)).unwrap();
    assert!(on.run.channels_last, "the default");
    let mut off = on.clone();
    off.run.channels_last = false;
    let a = run_in(&on, &s.join("on"), &RunOptions::default()).unwrap();
    let b = run_in(&off, &s.join("off"), &RunOptions::default()).unwrap();
    for (x, y) in history(&s.join("on")).iter().zip(&history(&s.join("off"))) {
        for (what, u, v) in [
            ("loss", x.train_loss, y.train_loss),
            ("kd", x.train_kd, y.train_kd),
            ("feature", x.train_feature, y.train_feature),
        ] {
            assert!(
                (u - v).abs() <= 1e-3 * u.abs().max(1.0),
                "epoch {} {what}: {u} vs {v}",
                x.epoch
            );
        }
    }
    assert!((a.summary.final_value - b.summary.final_value).abs() <= 1.0);
    // The weights file of the channels-last run is an ordinary safetensors file.
    let w = tch::Tensor::read_safetensors(a.dir.join("student.safetensors")).unwrap();
    assert!(!w.is_empty() && w.iter().all(|(_, t)| t.is_contiguous()));
}

/// `DistillStep` is the library's step: a user who builds it from a config and drives it over
/// an epoch by hand gets the trainer's own first epoch, loss and test accuracy to the bit.
#[test]
fn a_distill_step_driven_by_hand_repeats_the_trainers_epoch() {
    use mtkd_engine::dataset::Datasets;
    use mtkd_engine::trainer::{build_pool, evaluate, DistillStep, StepOutcome, Sums};
    let _serial = serial();
    let s = scratch("step-by-hand");
    let cfg = parse(
        &tiny(
            "[distill]\nstrategy = \"mtkd-rl\"\nfeature_weight = 1.0\n\
         [[teachers]]\nname = \"x\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"y\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n",
            &s,
        )
        .replace(
            "epochs = 2\nbatch_size = 32\nlr = 0.05\nmilestones = [1]",
            "epochs = 1\nbatch_size = 32\nlr = 0.05",
        ),
    )
    .unwrap();
    assert_eq!(cfg.train.epochs, 1);
    let dir = s.join("run");
    run_in(&cfg, &dir, &RunOptions::default()).unwrap();
    let rec = &history(&dir)[0];

    let device = tch::Device::Cpu;
    let data = Datasets::load(&cfg.data).unwrap();
    let members = build_pool(&cfg, &data, device, &mut Silent).unwrap();
    let mut step = DistillStep::new(&cfg, members, &data, device).unwrap();
    let loader = data
        .train_loader(&cfg.data, cfg.train.batch_size, cfg.run.seed)
        .unwrap();
    let mut sums = Sums::new(device, 2);
    step.start_epoch(0, cfg.train.lr).unwrap();
    let mut weights = 0;
    for (i, batch) in loader.epoch(0, 0, device).enumerate() {
        match step.run(&batch, &mut sums, 0, i as u64).unwrap() {
            StepOutcome::Applied(Some(d)) => {
                assert_eq!(d.weights.logit.size(), [batch.indices.len() as i64, 2]);
                weights += 1;
            }
            StepOutcome::Applied(None) => panic!("a distillation step without teachers' weights"),
            StepOutcome::NonFinite(what) => panic!("not finite: {what}"),
        }
    }
    assert_eq!(weights, loader.num_batches());
    assert_eq!(step.end_epoch(0).unwrap(), None, "no output cache");
    assert_eq!(sums.mean_loss().to_bits(), rec.train_loss.to_bits());
    let test = data
        .test_loader(&cfg.data, cfg.train.eval_batch_size)
        .unwrap();
    let (report, _) = evaluate(
        &|x| Ok(step.student().forward_t(x, false)),
        &test,
        device,
        step.task(),
        data.train.num_classes,
    )
    .unwrap();
    assert_eq!(report.value, rec.test.value);
    let _ = std::fs::remove_dir_all(&s);
}
