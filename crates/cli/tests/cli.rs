//! The `mtkd` binary end to end on the committed Fashion-MNIST subset: `mtkd compare` (one
//! teacher pass, rows equal to standalone runs, exact row names), a second process on a live
//! run folder, a full disk, failed starts, SIGINT, a commented or changed config on resume, a
//! checkpoint that cannot be written, and `mtkd eval` / `mtkd predict` of classification
//! students (what they refuse, class folders).

use std::path::{Path, PathBuf};

use mtkd_engine::record::Summary;
use mtkd_engine::trainer::RunOptions;

#[path = "../../engine/tests/common/mod.rs"]
mod common;
use common::*;

/// `mtkd compare` end to end on the subset: one teacher pass per seed shared by the strategies
/// (its folder deleted afterwards), the table with every planned row, and the same accuracies as
/// a comparison whose runs compute their own teacher outputs.
#[test]
fn compare_shares_one_teacher_pass_and_matches_standalone_runs() {
    let _serial = serial();
    let s = scratch("compare");
    let extra = "[distill]\nstrategy = \"equal\"\nfeature_weight = 5.0\n\
         [distill.oracle]\nweights = [0, 1]\n\
         [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let cfg = s.join("base.toml");
    std::fs::write(&cfg, tiny(extra, &s)).unwrap();
    let compare = |out: &Path, extra_args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
            .arg("compare")
            .arg("--config")
            .arg(&cfg)
            .args([
                "--seeds",
                "1",
                "--only",
                "no-kd,equal-aver,equal-ones-in-epoch-1-control,mmkd-last-layer-look-ahead,oracle-fixed-weights,single-t2",
                "--out",
            ])
            .arg(out)
            .args(extra_args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "mtkd compare failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let table = std::fs::read_to_string(out.join("comparison.md")).unwrap();
        let finals: Vec<f64> = [
            "no-kd",
            "oracle-fixed-weights",
            "equal-aver",
            "equal-ones-in-epoch-1-control",
            "mmkd-last-layer-look-ahead",
        ]
        .iter()
        .map(|d| {
            let text =
                std::fs::read_to_string(out.join(format!("{d}-seed3/summary.json"))).unwrap();
            serde_json::from_str::<Summary>(&text).unwrap().final_value
        })
        .collect();
        (table, finals)
    };
    let shared = s.join("shared");
    let (table, finals) = compare(&shared, &[]);
    for row in [
        "| no-kd |",
        "| equal (AVER) |",
        "| equal, ones in epoch 1 (control) † |",
        "| mmkd (last-layer look-ahead) |",
        "| oracle (fixed weights) |",
        "Headroom (oracle - AVER, final top-1)",
        "† distils at M times",
    ] {
        assert!(table.contains(row), "{row} missing from\n{table}");
    }
    // The oracle [0, 1] is single-teacher KD from t2 under another name: the same student.
    let final_of = |d: &str| -> f64 {
        let text = std::fs::read_to_string(shared.join(format!("{d}-seed3/summary.json"))).unwrap();
        serde_json::from_str::<Summary>(&text).unwrap().final_value
    };
    assert_eq!(final_of("oracle-fixed-weights"), final_of("single-t2"));
    assert!(table.contains("teacher pass"), "{table}");
    assert!(shared.join("teacher-pass-seed3.json").is_file());
    assert!(
        !shared.join("teacher-outputs").exists(),
        "the stored outputs are deleted once the seed is done"
    );
    let (table_own, finals_own) = compare(&s.join("own"), &["--no-shared-teachers"]);
    assert!(table_own.contains("--no-shared-teachers"), "{table_own}");
    assert_eq!(finals, finals_own);
}

/// A one-epoch tiny config written to `file` under scratch folder `s`.
fn write_one_epoch(file: &Path, s: &Path) {
    std::fs::write(file, tiny("", s).replace("epochs = 2", "epochs = 1")).unwrap();
}

/// A scratch folder `name` with a one-epoch config `c.toml` in it, and the run folder to be
/// (`run/`): `(scratch folder, config, run folder)`; the folder goes when the first is dropped.
fn one_epoch_setup(name: &str) -> (common::Scratch, PathBuf, PathBuf) {
    let s = scratch(name);
    let path = s.join("c.toml");
    write_one_epoch(&path, &s);
    let run = s.join("run");
    (s, path, run)
}

/// `mtkd train --config config --out dir`; returns (exit code, stderr).
fn train_into(config: &Path, dir: &Path) -> (Option<i32>, String) {
    mtkd(&[
        os("train"),
        os("--config"),
        config.as_os_str(),
        os("--out"),
        dir.as_os_str(),
    ])
}

/// The `mtkd` binary with arguments; returns (exit code, stderr).
fn mtkd(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_live_run_folder_is_refused_and_a_cache_entry_waits_for_its_trainer() {
    let _serial = serial();
    let s = scratch("locks");
    let cfg = parse(&tiny("", &s).replace("epochs = 2", "epochs = 1")).unwrap();
    let dir = s.join("run");
    let held = mtkd_engine::fsio::DirLock::try_acquire(&dir, "run folder").unwrap();
    let err = run_err(&cfg, &dir);
    assert!(
        err.contains("in use by pid") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    assert!(!dir.join("metrics.jsonl").exists(), "nothing written");
    drop(held);
    run_in(&cfg, &dir, &RunOptions::default()).unwrap();

    // A teacher cache entry held by another process: `mtkd teachers` waits, then finds the
    // teacher the holder trained instead of training it again.
    let extra = "[distill]\nstrategy = \"equal\"\nfeature_weight = 0.0\n\
                 [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
                 [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    let path = s.join("pool.toml");
    std::fs::write(&path, tiny(extra, &s)).unwrap();
    let (code, err) = mtkd(&[os("teachers"), os("--config"), path.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    let entry = std::fs::read_dir(s.join("teachers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("t1-"))
        .unwrap();
    let done = s.join("done");
    std::fs::create_dir_all(&done).unwrap();
    for f in ["summary.json", "student.safetensors"] {
        std::fs::rename(entry.join(f), done.join(f)).unwrap();
    }
    let held = mtkd_engine::fsio::DirLock::try_acquire(&entry, "teacher cache entry").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .args([os("teachers"), os("--config"), path.as_os_str()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        use std::io::BufRead;
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "ended early: {seen}"
        );
        seen.push_str(&line);
        if line.contains("waiting for it") {
            break;
        }
    }
    // The holder finishes: its outputs appear, then it lets go.
    for f in ["summary.json", "student.safetensors"] {
        std::fs::rename(done.join(f), entry.join(f)).unwrap();
    }
    drop(held);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{seen}{rest}");
    assert!(
        rest.contains("from cache") && !rest.contains("training teacher"),
        "{rest}"
    );
}

#[test]
fn a_full_disk_keeps_the_previous_outputs_and_ends_with_an_error() {
    let _serial = serial();
    let (_scratch, path, dir) = one_epoch_setup("fulldisk");
    let (code, err) = train_into(&path, &dir);
    assert_eq!(code, Some(0), "{err}");
    let before: Vec<Vec<u8>> = ["student.safetensors", "student.pt", "summary.json"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    // A finished run resumed rewrites its outputs; with the file size limited (as a full disk
    // does, but with EFBIG), the first big write fails: an error, not an abort, and every file
    // as it was.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" train --resume \"$1\"")
        .arg(env!("CARGO_BIN_EXE_mtkd"))
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("writing") && err.contains("student.") && err.contains("file too large"),
        "{err}"
    );
    assert!(
        !err.contains("terminate called") && !err.contains("c10::Error"),
        "{err}"
    );
    for (f, old) in ["student.safetensors", "student.pt", "summary.json"]
        .iter()
        .zip(&before)
    {
        assert_eq!(&std::fs::read(dir.join(f)).unwrap(), old, "{f} untouched");
    }
    let temps: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn failed_starts_leave_no_folder_and_log_errors_are_reported() {
    let _serial = serial();
    let s = scratch("starts");
    let bad = s.join("bad.toml");
    std::fs::write(
        &bad,
        tiny(
            "[distill]\nstrategy = \"equal\"\n[[teachers]]\nname = \"ts\"\ntorchscript = \"/nonexistent/t.pt\"\n",
            &s,
        ),
    )
    .unwrap();
    let (code, err) = mtkd(&[os("train"), os("--config"), bad.as_os_str()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("t.pt"), "{err}");
    let left: Vec<_> = std::fs::read_dir(s.join("runs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "orphan run folders: {left:?}");

    // A log that cannot be written (here: onto a full device) is said, and the run goes on.
    let good = s.join("good.toml");
    write_one_epoch(&good, &s);
    let dir = s.join("full-log");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.join("mtkd.log")).unwrap();
    let (code, err) = train_into(&good, &dir);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        err.matches("cannot write the log").count(),
        1,
        "said once: {err}"
    );
    assert!(dir.join("summary.json").is_file());
}

/// Lines of a run's metrics.jsonl (0 when there is none yet).
fn metric_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Start `mtkd train` on `cfg` into `dir`, send SIGINT `signals` times once an epoch is done,
/// and return (exit code, stderr).
fn interrupt(cfg: &Path, dir: &Path, signals: usize) -> (Option<i32>, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .args([
            os("train"),
            os("--config"),
            cfg.as_os_str(),
            os("--out"),
            dir.as_os_str(),
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while metric_lines(dir) == 0 {
        assert!(t0.elapsed().as_secs() < 120, "no epoch finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for _ in 0..signals {
        let ok = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sigint_finishes_the_epoch_then_resumes_and_a_second_one_stops_at_the_step() {
    let _serial = serial();
    let s = scratch("sigint");
    let cfg = s.join("c.toml");
    std::fs::write(&cfg, tiny("", &s).replace("epochs = 2", "epochs = 40")).unwrap();
    let a = s.join("a");
    let (code, err) = interrupt(&cfg, &a, 1);
    assert_eq!(code, Some(130), "{err}");
    let done = metric_lines(&a);
    assert!((1..40).contains(&done), "{done} epochs");
    assert!(
        err.contains(&format!("stopped on request after epoch {done}"))
            && err.contains("mtkd train --resume"),
        "{err}"
    );
    assert!(
        a.join(format!("checkpoints/epoch-{done:04}")).is_dir(),
        "nothing lost"
    );
    // Twice: stop at the step; the checkpoint of the last whole epoch stays.
    let b = s.join("b");
    let (code, err) = interrupt(&cfg, &b, 2);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("stopped on request") && err.contains("--resume"),
        "{err}"
    );
    // The first run continues to the end.
    let (code, err) = mtkd(&[os("train"), os("--resume"), a.as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(metric_lines(&a), 40);
}

/// A tiny config with two teachers (t1, t2) for the comparison planner's tests (nothing trains).
fn two_teacher_config(s: &Path) -> mtkd_engine::config::Config {
    let extra = "[distill]\nstrategy = \"equal\"\n\
         [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n";
    parse(&tiny(extra, s)).unwrap()
}

#[test]
fn compare_only_takes_exact_row_names_and_refuses_unknown_ones() {
    let s = scratch("only");
    let cfg = two_teacher_config(&s);
    use mtkd_cli::compare::plan;
    let rows = |only: &[&str]| -> Result<Vec<String>, String> {
        let only: Vec<String> = only.iter().map(|o| (*o).to_owned()).collect();
        plan(&cfg, None, 1, Some(&only))
            .map(|p| p.into_iter().map(|r| r.strategy).collect())
            .map_err(|e| format!("{e:#}"))
    };
    assert_eq!(rows(&["equal-aver"]).unwrap(), vec!["equal (AVER)"]);
    assert_eq!(rows(&["single"]).unwrap(), vec!["single t1", "single t2"]);
    assert_eq!(rows(&["mtkd-rl"]).unwrap().len(), 5);
    for bad in [&["equal"][..], &["none"], &["no-kd", "mtkd"]] {
        let err = rows(bad).unwrap_err();
        assert!(
            err.contains("no such row")
                && err.contains("equal-aver")
                && err.contains("mtkd-rl-meta-prune"),
            "{err}"
        );
    }
}

#[test]
fn compare_first_seed_moves_the_student_seeds_and_keeps_the_teachers() {
    let s = scratch("firstseed");
    let cfg = two_teacher_config(&s);
    use mtkd_cli::compare::plan;
    let only = vec!["equal-aver".to_owned()];
    let from_base = plan(&cfg, None, 3, Some(&only)).unwrap();
    let from_two = plan(&cfg, Some(cfg.run.seed + 2), 2, Some(&only)).unwrap();
    let seeds =
        |p: &[mtkd_cli::compare::Planned]| -> Vec<u64> { p.iter().map(|r| r.seed).collect() };
    let base = cfg.run.seed;
    assert_eq!(seeds(&from_base), vec![base, base + 1, base + 2]);
    assert_eq!(seeds(&from_two), vec![base + 2, base + 3]);
    // The same run folder name as the full comparison's seed, so the runs can share one folder.
    assert_eq!(from_two[0].dir_name, from_base[2].dir_name);
    assert_eq!(from_two[0].config.run.seed, base + 2);
    // Every run's teachers carry the base seed's teacher seeds, set and equal.
    let teacher_seeds = |r: &mtkd_cli::compare::Planned| -> Vec<Option<u64>> {
        r.config.teachers.iter().map(|t| t.seed).collect()
    };
    let expected = teacher_seeds(&from_base[0]);
    assert!(expected.iter().all(Option::is_some), "{expected:?}");
    assert_ne!(expected[0], expected[1]);
    for r in from_base.iter().chain(&from_two) {
        assert_eq!(teacher_seeds(r), expected, "{}", r.dir_name);
    }
}

#[test]
fn eval_and_predict_use_a_trained_student_without_a_training_config() {
    let _serial = serial();
    let s = scratch("evalpredict");
    let cfg_path = s.join("c.toml");
    write_one_epoch(&cfg_path, &s);
    let cfg = parse(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let dir = s.join("run");
    let out = run_in(&cfg, &dir, &RunOptions::default()).unwrap();
    // A file with only the [data] table describes the inputs of a bare model file.
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let data_only: String = {
        let start = text.find("[data]").unwrap();
        let end = text.find("[student]").unwrap();
        text[start..end].to_owned()
    };
    let data_path = s.join("data.toml");
    std::fs::write(&data_path, &data_only).unwrap();
    let eval = |model: &Path, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![os("eval"), model.as_os_str(), os("--json")];
        args.extend(extra.iter().map(|a| os(a)));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let data_arg = data_path.to_str().unwrap();
    let from_run = eval(&dir, &[]);
    let from_pt = eval(&dir.join("student.pt"), &["--data", data_arg]);
    let from_weights = eval(
        &dir.join("student.safetensors"),
        &["--data", data_arg, "--arch", "cnn-small"],
    );
    for r in [&from_run, &from_pt, &from_weights] {
        assert_eq!(r["top1"].as_f64().unwrap(), out.summary.final_value, "{r}");
        assert_eq!(r["samples"].as_u64().unwrap(), 200);
        let conf = r["confusion"].as_array().unwrap();
        let total: u64 = conf
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
            .sum();
        assert_eq!(total, 200);
    }
    assert_eq!(from_run["confusion"], from_pt["confusion"]);
    // A weights file without its architecture is refused with the way out.
    let (code, err) = mtkd(&[
        os("eval"),
        dir.join("student.safetensors").as_os_str(),
        os("--data"),
        data_path.as_os_str(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--arch"), "{err}");

    // predict: test images written as PNG files get the student's own top-1.
    let test = mtkd_vision_tasks::data::read_mnist_dir(
        &root().join("data/fashion-mnist-mini"),
        mtkd_vision_tasks::data::Split::Test,
    )
    .unwrap();
    let mut files = Vec::new();
    for i in 0..4 {
        let px: Vec<u8> = test
            .images
            .slice(ndarray::s![i, 0, .., ..])
            .iter()
            .copied()
            .collect();
        let img = image::GrayImage::from_raw(28, 28, px).unwrap();
        let f = s.join(format!("img{i}.png"));
        img.save(&f).unwrap();
        files.push(f);
    }
    let mut args = vec![
        os("predict"),
        dir.as_os_str(),
        os("--json"),
        os("--top-k"),
        os("3"),
    ];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: Vec<mtkd_cli::inference::Prediction> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(preds.len(), 4);
    // The same images through the library, normalised as the test split is.
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = mtkd_student::Network::new(&vs.root(), mtkd_student::Arch::CnnSmall, (1, 28, 28), 10)
        .unwrap();
    vs.load(dir.join("student.safetensors")).unwrap();
    let x = tch::Tensor::from_slice(
        &test
            .images
            .slice(ndarray::s![0..4, .., .., ..])
            .iter()
            .map(|&v| (f32::from(v) / 255.0 - 0.2860) / 0.3530)
            .collect::<Vec<f32>>(),
    )
    .view([4, 1, 28, 28]);
    let probs = tch::no_grad(|| net.forward_t(&x, false).logits.softmax(1, tch::Kind::Float));
    for (i, p) in preds.iter().enumerate() {
        assert_eq!(p.top.len(), 3);
        let best = probs.get(i as i64).argmax(0, false).int64_value(&[]) as usize;
        assert_eq!(p.top[0].label, best, "{p:?}");
        let want = probs.get(i as i64).double_value(&[best as i64]);
        assert!(
            (p.top[0].probability - want).abs() < 1e-5,
            "{p:?} vs {want}"
        );
        assert!(p
            .top
            .windows(2)
            .all(|w| w[0].probability >= w[1].probability));
    }
}

/// The run folder's saved config is compared as a configuration: a comment added to it still
/// resumes; a changed key is refused with its name, and a config edited behind the checkpoints'
/// back is refused before the data are even loaded.
#[test]
fn a_commented_config_resumes_and_a_changed_one_is_refused_before_any_work() {
    let _serial = serial();
    let (_scratch, path, dir) = one_epoch_setup("configresume");
    let train = |extra: &[&str]| {
        let mut args = vec![os("train"), os("--resume"), dir.as_os_str()];
        args.extend(extra.iter().map(|a| os(a)));
        mtkd(&args)
    };
    let (code, err) = train_into(&path, &dir);
    assert_eq!(code, Some(0), "{err}");
    let saved = dir.join("config.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    std::fs::write(&saved, format!("# trained for the spring line\n{text}")).unwrap();
    let (code, err) = train(&[]);
    assert_eq!(
        code,
        Some(0),
        "a comment is not another configuration: {err}"
    );
    assert!(
        std::fs::read_to_string(&saved)
            .unwrap()
            .starts_with("# trained"),
        "the user's file is kept as it is"
    );
    // A changed key is named.
    let (code, err) = train(&["--set", "train.lr=0.01", "--set", "run.seed=4"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("another configuration") && err.contains("run.seed, train.lr"),
        "{err}"
    );
    // Edited in place after the checkpoints were written: refused before loading anything.
    std::fs::write(&saved, text.replace("lr = 0.05", "lr = 0.01")).unwrap();
    let (code, err) = train(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("belong to another configuration") && !err.contains("loading data"),
        "{err}"
    );
}

/// A checkpoint whose write fails (the file-size limit stands in for a full disk) ends the
/// run with an error and leaves no half-written `.tmp-epoch-N` folder behind.
#[test]
fn a_checkpoint_that_cannot_be_written_leaves_no_temporary_folder() {
    let _serial = serial();
    let (_scratch, path, dir) = one_epoch_setup("fullckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" train --config \"$1\" --out \"$2\"")
        .arg(env!("CARGO_BIN_EXE_mtkd"))
        .arg(&path)
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("checkpointing epoch 1") && err.contains("file too large"),
        "{err}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Write `n` test images of class `c` of the mini Fashion-MNIST as PNG files into `dir`.
fn write_pngs(set: &mtkd_vision_tasks::data::ImageSet, c: i64, n: usize, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let idx: Vec<usize> = (0..set.len())
        .filter(|&i| set.labels[i] == c)
        .take(n)
        .collect();
    for (k, i) in idx.into_iter().enumerate() {
        let px: Vec<u8> = set
            .images
            .slice(ndarray::s![i, 0, .., ..])
            .iter()
            .copied()
            .collect();
        image::GrayImage::from_raw(28, 28, px)
            .unwrap()
            .save(dir.join(format!("{k}.png")))
            .unwrap();
    }
}

/// What a new user of eval and predict runs into: an ImageFolder run predicts with its class
/// folders' names, a model for other classes is refused in plain words (not a C++ backtrace,
/// not called a teacher), `--top-k 0` is refused, and `data.num_classes` is honoured for IDX
/// data and checked everywhere else.
#[test]
fn eval_and_predict_refuse_what_does_not_fit_and_read_class_folders() {
    let _serial = serial();
    let s = scratch("evalfit");
    let mini = root().join("data/fashion-mnist-mini");
    let test = mtkd_vision_tasks::data::read_mnist_dir(&mini, mtkd_vision_tasks::data::Split::Test)
        .unwrap();
    let names = ["boot", "coat", "dress", "shirt", "trouser"];
    let classes = [9i64, 4, 3, 6, 1];
    for (name, c) in names.iter().zip(classes) {
        write_pngs(&test, c, 12, &s.join(format!("folder/train/{name}")));
        write_pngs(&test, c, 4, &s.join(format!("folder/val/{name}")));
    }
    let folder_data = format!(
        "[data]\nkind = \"image-folder\"\nroot = \"{}\"\nimage_size = 28\nchannels = 1\nnormalize = {{ mean = [0.2860], std = [0.3530] }}\n",
        s.join("folder").display()
    );
    let data_path = s.join("folder.toml");
    std::fs::write(&data_path, &folder_data).unwrap();
    // A 10-class Fashion-MNIST student.
    let cfg_path = s.join("c.toml");
    write_one_epoch(&cfg_path, &s);
    let cfg = parse(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let ten = s.join("ten");
    run_in(&cfg, &ten, &RunOptions::default()).unwrap();
    for (model, extra) in [
        (ten.join("student.safetensors"), vec!["--arch", "cnn-small"]),
        (ten.join("student.pt"), vec![]),
    ] {
        let mut args = vec![
            os("eval"),
            model.as_os_str(),
            os("--data"),
            data_path.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| os(a)));
        let (code, err) = mtkd(&args);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("10 classes") && err.contains('5') && !err.contains("teacher"),
            "{err}"
        );
        assert!(
            !err.contains("Exception raised") && !err.contains("frame #"),
            "{err}"
        );
    }
    // A student trained on the folder: predict names its classes by the folders.
    let folder_cfg = format!(
        "[run]\nname = \"folder\"\nout_dir = \"{}\"\nseed = 1\nthreads = 1\n{folder_data}[student]\narch = \"cnn-small\"\n[train]\nepochs = 1\nbatch_size = 16\nlr = 0.05\n",
        s.join("runs").display()
    );
    let five = s.join("five");
    run_in(&parse(&folder_cfg).unwrap(), &five, &RunOptions::default()).unwrap();
    let img = s.join("folder/val/coat/0.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mtkd"))
        .args([
            os("predict"),
            five.as_os_str(),
            os("--json"),
            img.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds: Vec<mtkd_cli::inference::Prediction> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(preds[0].top.len(), 5);
    for t in &preds[0].top {
        assert_eq!(t.class, names[t.label], "{t:?}");
    }
    let (code, err) = mtkd(&[
        os("predict"),
        five.as_os_str(),
        os("--top-k"),
        os("0"),
        img.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--top-k must be at least 1"), "{err}");
    // data.num_classes: honoured for IDX files, checked for other kinds.
    let mut idx = cfg.clone();
    idx.data.num_classes = Some(12);
    let set = mtkd_engine::dataset::Datasets::load(&idx.data).unwrap();
    assert_eq!(set.num_classes(), 12);
    idx.data.num_classes = Some(5);
    let err = format!(
        "{:#}",
        mtkd_engine::dataset::Datasets::load(&idx.data).unwrap_err()
    );
    assert!(err.contains("label") && err.contains("5 classes"), "{err}");
    let mut folder = parse(&folder_cfg).unwrap();
    folder.data.num_classes = Some(6);
    let err = format!(
        "{:#}",
        mtkd_engine::dataset::Datasets::load(&folder.data).unwrap_err()
    );
    assert!(
        err.contains("data.num_classes = 6") && err.contains("has 5 classes"),
        "{err}"
    );
}
