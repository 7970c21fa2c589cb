//! `mpirun -n 2 mtkd train` against one process on the committed Fashion-MNIST subset: the
//! same student within the stated tolerance (AVER and the meta agent), one folder written by
//! rank 0; a rank that raises or is killed mid-epoch ends the job within a bounded time, and the
//! run resumes on one or two ranks. Built with the `mpi` feature (`cargo xtask test` does).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mtkd_engine::record::{EpochRecord, Summary};

#[path = "../../engine/tests/common/mod.rs"]
mod common;
use common::*;
#[path = "../../../test-support/mpirun.rs"]
mod mpirun;
use mpirun::{mpirun, spawn, wait};

/// Tolerances of a two-rank run against one process (docs/ARCHITECTURE.md, "Data-parallel
/// training"): BatchNorm's batch statistics come from each rank's half of the batch, and sums
/// run in another order, so the runs drift apart slowly.
const TOP1_TOLERANCE: f64 = 3.0;
const WEIGHT_TOLERANCE: f64 = 0.02;
/// A job whose rank failed must end within this.
const END_WITHIN: Duration = Duration::from_secs(60);

fn mtkd() -> &'static str {
    env!("CARGO_BIN_EXE_mtkd")
}

fn train_args(config: &Path, dir: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "train".into(),
        "--config".into(),
        config.into(),
        "--out".into(),
        dir.into(),
    ]
}

/// Run `cmd` (one process) and require success, showing its stderr otherwise.
fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn one_process(config: &Path, dir: &Path) {
    run_ok(Command::new(mtkd()).args(train_args(config, dir)));
}

fn two_ranks(config: &Path, dir: &Path) -> String {
    let (code, out) = wait(
        spawn(mpirun(2).arg(mtkd()).args(train_args(config, dir))),
        Duration::from_secs(300),
        "mpirun -n 2 mtkd train",
    );
    assert_eq!(code, Some(0), "{out}");
    out
}

fn summary(dir: &Path) -> Summary {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

fn epochs(dir: &Path) -> Vec<EpochRecord> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A tiny run with two teachers (trained one epoch into the scratch cache by the first run).
fn config(s: &Path, strategy: &str, epochs: usize) -> PathBuf {
    let extra = format!(
        "[distill]\nstrategy = \"{strategy}\"\nfeature_weight = 5.0\n\
         [distill.agent]\nmode = \"meta\"\n\
         [[teachers]]\nname = \"t1\"\narch = \"cnn-small\"\n\
         [[teachers]]\nname = \"t2\"\narch = \"resnet8\"\n\
         [teacher_training]\nepochs = 1\nbatch_size = 32\nlr = 0.05\n"
    );
    let path = s.join(format!("{strategy}-{epochs}.toml"));
    let text = tiny(&extra, s).replace("epochs = 2\n", &format!("epochs = {epochs}\n"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Two ranks against one process: final and per-epoch top-1 within TOP1_TOLERANCE, the mean
/// teacher weights of every epoch within WEIGHT_TOLERANCE; rank 0 alone wrote the folder.
#[test]
fn two_ranks_match_one_process_with_aver_and_the_meta_agent() {
    let _serial = serial();
    let s = scratch("dp-match");
    for strategy in ["equal", "mtkd-rl"] {
        let cfg = config(&s, strategy, 3);
        let (one, two) = (
            s.join(format!("{strategy}-1")),
            s.join(format!("{strategy}-2")),
        );
        one_process(&cfg, &one);
        let out = two_ranks(&cfg, &two);
        assert!(out.contains("data-parallel over 2 ranks (mpi)"), "{out}");
        let (a, b) = (summary(&one), summary(&two));
        let (ea, eb) = (epochs(&one), epochs(&two));
        assert_eq!(ea.len(), eb.len());
        let mut lines = Vec::new();
        for (x, y) in ea.iter().zip(&eb) {
            lines.push(format!(
                "{strategy} epoch {}: top-1 {:.2} vs {:.2}, weights {:?} vs {:?}",
                x.epoch, x.test.value, y.test.value, x.teacher_weights, y.teacher_weights
            ));
            assert!(
                (x.test.value - y.test.value).abs() <= TOP1_TOLERANCE,
                "{}",
                lines.join("\n")
            );
            for (wx, wy) in x.teacher_weights.iter().zip(&y.teacher_weights) {
                assert!((wx - wy).abs() <= WEIGHT_TOLERANCE, "{}", lines.join("\n"));
            }
        }
        eprintln!("{}", lines.join("\n"));
        assert!((a.final_value - b.final_value).abs() <= TOP1_TOLERANCE);
        assert_eq!(b.strategy, a.strategy);
        assert!(two.join("student.pt").is_file() && two.join("report.html").is_file());
        assert!(two.join("checkpoints").is_dir());
    }
    // Nothing but the two runs' folders (rank 1 made no folder of its own).
    let runs = s.join("runs");
    assert!(
        !runs.exists() || std::fs::read_dir(&runs).unwrap().next().is_none(),
        "a rank wrote a run folder of its own under {}",
        runs.display()
    );
}

/// One rank raises mid-epoch (MPMD launch: only rank 1 is told to stop after 12 steps, the
/// middle of epoch 2): the job ends non-zero within END_WITHIN, naming the rank; the run then
/// resumes on ONE process from rank 0's checkpoint of epoch 1 and finishes. A rank killed by
/// SIGKILL mid-run also ends the job within END_WITHIN, and the run resumes on two ranks.
#[test]
fn a_failing_or_killed_rank_ends_the_job_and_the_run_resumes() {
    let _serial = serial();
    let s = scratch("dp-fault");
    let cfg = config(&s, "mtkd-rl", 3);
    // Teachers into the cache first, so that the steps below are the student's.
    one_process(&cfg, &s.join("warm"));
    let dir = s.join("raise");
    let start = Instant::now();
    let (code, out) = wait(
        spawn(
            mpirun(1)
                .arg(mtkd())
                .args(train_args(&cfg, &dir))
                .arg(":")
                .args(["-n", "1", "-x", "OMP_NUM_THREADS=1"])
                .arg(mtkd())
                .args(train_args(&cfg, &dir))
                .args(["--halt-after-steps", "12"]),
        ),
        END_WITHIN,
        "a job with a failing rank",
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("mtkd (rank 1 of 2): error"), "{out}");
    eprintln!("a raising rank ended the job in {:?}", start.elapsed());
    assert_eq!(
        epochs(&dir).len(),
        1,
        "epoch 1 is checkpointed, epoch 2 was cut"
    );
    run_ok(Command::new(mtkd()).arg("train").arg("--resume").arg(&dir));
    assert_eq!(summary(&dir).epochs, 3);

    // SIGKILL one rank once epoch 1 is checkpointed.
    let cfg6 = config(&s, "mtkd-rl", 6);
    let dir = s.join("kill");
    let mut child = spawn(mpirun(2).arg(mtkd()).args(train_args(&cfg6, &dir)));
    let t0 = Instant::now();
    while !dir.join("metrics.jsonl").is_file()
        || std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            < 1
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "no epoch finished");
        if child.try_wait().unwrap().is_some() {
            panic!("the run ended before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let children = Command::new("ps")
        .args(["-o", "pid=", "--ppid", &child.id().to_string()])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), 2, "mpirun's ranks: {pids:?}");
    let killed = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &pids[1]])
        .status()
        .unwrap()
        .success());
    let (code, out) = wait(child, END_WITHIN, "a job with a killed rank");
    assert_ne!(code, Some(0), "{out}");
    eprintln!("a killed rank ended the job in {:?}", killed.elapsed());
    let done = epochs(&dir).len();
    assert!(done < 6, "the run finished before the kill landed");
    let (code, out) = wait(
        spawn(mpirun(2).arg(mtkd()).args(["train", "--resume"]).arg(&dir)),
        Duration::from_secs(300),
        "the resumed two-rank run",
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(summary(&dir).epochs, 6);
}

/// Teacher outputs shared through a folder (`mtkd share-teachers`, one process) serve two
/// ranks, each reading its rows; 257 samples make the epoch's last global batch a single
/// sample, which the ranks leave out and the reader skips. The run matches the two-rank run
/// whose teachers run live. Without the files, the ranks refuse to write them.
#[test]
fn shared_teacher_outputs_serve_two_ranks() {
    let _serial = serial();
    let s = scratch("dp-shared");
    let cfg = config(&s, "mtkd-rl", 2);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("train_subset = 256", "train_subset = 257");
    std::fs::write(&cfg, text).unwrap();
    let shared = s.join("shared");
    run_ok(
        Command::new(mtkd())
            .args(["share-teachers", "--config"])
            .arg(&cfg)
            .arg("--into")
            .arg(&shared),
    );
    let read = s.join("read");
    let (code, log) = wait(
        spawn(
            mpirun(2)
                .arg(mtkd())
                .args(train_args(&cfg, &read))
                .arg("--teacher-outputs")
                .arg(&shared),
        ),
        Duration::from_secs(300),
        "two ranks reading shared outputs",
    );
    assert_eq!(code, Some(0), "{log}");
    let live = s.join("live");
    two_ranks(&cfg, &live);
    let (a, b) = (epochs(&read), epochs(&live));
    for (x, y) in a.iter().zip(&b) {
        eprintln!(
            "epoch {}: shared {:.2} live {:.2}, weights {:?} / {:?}",
            x.epoch, x.test.value, y.test.value, x.teacher_weights, y.teacher_weights
        );
        assert!((x.test.value - y.test.value).abs() <= TOP1_TOLERANCE);
        for (wx, wy) in x.teacher_weights.iter().zip(&y.teacher_weights) {
            assert!((wx - wy).abs() <= WEIGHT_TOLERANCE);
        }
    }
    let (code, log) = wait(
        spawn(
            mpirun(2)
                .arg(mtkd())
                .args(train_args(&cfg, &s.join("none")))
                .arg("--teacher-outputs")
                .arg(s.join("empty")),
        ),
        END_WITHIN,
        "two ranks without shared outputs",
    );
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("mtkd share-teachers"), "{log}");
}

/// `mtkd compare --launcher "mpirun -n 2 ..."`: the teacher pass in one process, every row on
/// two ranks reading the shared outputs, the table saying so.
#[test]
fn compare_runs_its_rows_on_two_ranks() {
    let _serial = serial();
    let s = scratch("dp-compare");
    let cfg = config(&s, "equal", 1);
    let out = s.join("cmp");
    let launcher = "mpirun -n 2 --bind-to none --oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo -x OMP_NUM_THREADS=1";
    let (code, log) = wait(
        spawn(
            Command::new(mtkd())
                .args(["compare", "--config"])
                .arg(&cfg)
                .args(["--seeds", "1", "--only", "equal-aver,mtkd-rl-meta", "--out"])
                .arg(&out)
                .args(["--launcher", launcher])
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
        ),
        Duration::from_secs(300),
        "mtkd compare --launcher",
    );
    assert_eq!(code, Some(0), "{log}");
    let table = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(
        table.contains("Each row ran data-parallel under `mpirun -n 2"),
        "{table}"
    );
    for row in ["equal-aver-seed3", "mtkd-rl-meta-seed3"] {
        let e = epochs(&out.join(row));
        assert_eq!(
            e[0].data_parallel.as_ref().map(|d| d.ranks),
            Some(2),
            "{row} did not run on two ranks"
        );
    }
}
