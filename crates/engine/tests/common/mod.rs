//! What the end-to-end tests share: the repository root, scratch folders, the lock that keeps
//! libtorch's global generator reproducible, the tiny configs of the three tasks, the run
//! records, and the set-up's Python. Used by the engine's tests and, through `#[path]`, by
//! mtkd-cli's tests of the binary (which run the same configs through `mtkd`).

#![allow(dead_code)] // each test binary uses a part

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use mtkd_engine::config::Config;
use mtkd_engine::record::EpochRecord;
use mtkd_engine::trainer::{self, Interrupted, RunOptions, Silent};

#[path = "../../../../test-support/scratch.rs"]
mod scratch_dir;
pub use scratch_dir::Scratch;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// An empty folder for one test of this test binary and process, removed when the test ends
/// (kept when it fails, to be looked at).
pub fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("mtkd-{}", env!("CARGO_CRATE_NAME")), name)
}

/// libtorch's random generator (used to initialise networks after `manual_seed`) is global to
/// the process, and the tests of one binary run on parallel threads: every test that builds a
/// network holds this lock so that each run's initialisation is reproducible.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("test.toml"), &[]).map_err(|e| e.to_string())
}

/// A finished run's `summary.json`.
pub fn summary(dir: &Path) -> mtkd_engine::record::Summary {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
}

pub fn history(dir: &Path) -> Vec<EpochRecord> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The records without their times, as JSON (COCO's undefined size ranges are NaN, written
/// `null`, which compares equal).
pub fn strip_time(h: &[EpochRecord]) -> String {
    let h: Vec<EpochRecord> = h
        .iter()
        .map(|r| EpochRecord {
            seconds: 0.0,
            teacher_seconds: 0.0,
            data_parallel: None,
            ..r.clone()
        })
        .collect();
    serde_json::to_string_pretty(&h).unwrap()
}

/// A tiny classification config on the committed subset: 256 training and 200 test images.
pub fn tiny(extra: &str, scratch_dir: &Path) -> String {
    format!(
        r#"
[run]
name = "tiny"
out_dir = "{out}"
teacher_cache = "{cache}"
seed = 3
threads = 1

[data]
kind = "mnist"
root = "{data}"
train_subset = 256
test_subset = 200
normalize = {{ mean = [0.2860], std = [0.3530] }}
augment = {{ crop_padding = 2, hflip = true }}

[student]
arch = "cnn-small"

[train]
epochs = 2
batch_size = 32
lr = 0.05
milestones = [1]
{extra}
"#,
        out = scratch_dir.join("runs").display(),
        cache = scratch_dir.join("teachers").display(),
        data = root().join("data/fashion-mnist-mini").display(),
    )
}

/// Run `name`: 64 training and 16 test scenes of 32 x 32 of `kind`, a `cnn-small` student with
/// `head`, teachers trained one epoch, at learning rate `lr`.
fn scenes_config(
    (name, kind, head): (&str, &str, &str),
    augment: &str,
    lr: f64,
    extra: &str,
    s: &Path,
) -> String {
    format!(
        r#"
[run]
name = "{name}"
out_dir = "{out}"
teacher_cache = "{cache}"
seed = 1
threads = 1

[data]
kind = "{kind}"
root = "{data}"
normalize = {{ mean = [0.25], std = [0.25] }}
augment = {augment}
scenes = {{ train = 64, test = 16, size = 32, objects = [1, 2], scale = [0.6, 1.0] }}

[student]
arch = "cnn-small"
head = "{head}"

[train]
epochs = 2
batch_size = 16
eval_batch_size = 16
lr = {lr}
milestones = [1]

[teacher_training]
epochs = 1
batch_size = 16
lr = {lr}
{extra}
"#,
        out = s.join("runs").display(),
        cache = s.join("teachers").display(),
        data = root().join("data/fashion-mnist-mini").display(),
    )
}

/// Segmentation scenes (`synthetic-scenes`, an FCN head, flips, zoom and shifts).
pub fn seg_scenes(extra: &str, s: &Path) -> String {
    scenes_config(
        ("seg", "synthetic-scenes", "fcn"),
        "{ hflip = true, scale = [0.8, 1.25], crop_padding = 2 }",
        0.05,
        extra,
        s,
    )
}

/// Two dense teachers and the agent in meta mode.
pub const SEG_POOL: &str = r#"
[distill]
strategy = "mtkd-rl"
temperature = 2.0
feature_weight = 1.0

[distill.agent]
mode = "meta"

[[teachers]]
name = "r8-aspp"
arch = "resnet8"
head = "aspp"

[[teachers]]
name = "small-fcn"
arch = "cnn-small"
"#;

/// Detection scenes with boxes (`synthetic-detection`, an FCOS head, flips; written as a COCO
/// folder under [`det_data_dir`]).
pub fn det_scenes(extra: &str, s: &Path) -> String {
    det_data_dir();
    scenes_config(
        ("det", "synthetic-detection", "fcos"),
        "{ hflip = true }",
        0.02,
        extra,
        s,
    )
}

/// The detection scenes' COCO folders go under `$MTKD_DATA_DIR`: one folder for this test
/// process, set once (tests run on several threads; child `mtkd` processes inherit it).
pub fn det_data_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!(
            "mtkd-{}-data-{}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        std::env::set_var("MTKD_DATA_DIR", &d);
        d
    })
    .clone()
}

/// Two FCOS teachers and the agent in clean mode.
pub const DET_POOL: &str = r#"
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

/// The Python that has the build's torch (set by `cargo xtask test`).
pub fn torch_python() -> String {
    std::env::var("MTKD_TORCH_PYTHON").expect(
        "MTKD_TORCH_PYTHON names the Python that has torch 2.13.0; run the tests through `cargo xtask test`",
    )
}

/// Write `script` to `file` and run it with [`torch_python`] (torch.jit.script reads a class's
/// source, so scripts that define modules run from a file, not `python -c`).
pub fn run_python_file(file: &Path, script: &str) {
    std::fs::write(file, script).unwrap();
    let out = std::process::Command::new(torch_python())
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `scripts/export_teacher.py` with `args`; its stdout.
pub fn export_teacher<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = std::process::Command::new(torch_python())
        .arg(root().join("scripts/export_teacher.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

pub fn run_in(cfg: &Config, dir: &Path, opts: &RunOptions) -> anyhow::Result<trainer::Outcome> {
    trainer::run(cfg, dir, opts, &mut Silent)
}

/// Run `cfg` in `dir` and stop it after `steps` optimizer steps, as if killed. `steps` must be
/// past the first epoch's end, so that the run resumes from a checkpoint (a run killed in its
/// first epoch starts again from nothing, which tests no resume).
pub fn halt_run(cfg: &Config, dir: &Path, steps: u64) {
    let opts = RunOptions {
        halt_after_steps: Some(steps),
        ..RunOptions::default()
    };
    let err = run_in(cfg, dir, &opts).unwrap_err();
    assert!(
        err.root_cause().downcast_ref::<Interrupted>().is_some(),
        "{err:#}"
    );
    assert!(
        mtkd_engine::checkpoint::latest_config_hash(&dir.join("checkpoints")).is_some(),
        "halted after {steps} steps, {} holds no checkpoint to resume from: halt later",
        dir.display()
    );
}

/// The error of a run that must fail, with its causes.
pub fn run_err(cfg: &Config, dir: &Path) -> String {
    format!(
        "{:#}",
        run_in(cfg, dir, &RunOptions::default()).unwrap_err()
    )
}

/// The records `h` of `cfg`'s uninterrupted run come back from a run killed after `steps`
/// optimizer steps and resumed, and from a run that reads the teachers' outputs shared by
/// `mtkd share-teachers` (folders under `s`).
pub fn assert_resume_and_shared_outputs_repeat(
    cfg: &Config,
    s: &Path,
    h: &[EpochRecord],
    steps: u64,
) {
    let halted = s.join("halted");
    halt_run(cfg, &halted, steps);
    run_in(cfg, &halted, &RunOptions::default()).unwrap();
    assert_eq!(strip_time(h), strip_time(&history(&halted)), "resumed");
    let shared_root = s.join("outputs");
    let (key, _) = trainer::share_teacher_outputs(cfg, &shared_root, None, &mut Silent).unwrap();
    assert!(key.join("epoch-1.bin").is_file());
    let read = s.join("read");
    let opts = RunOptions {
        teacher_outputs: Some(shared_root),
        ..RunOptions::default()
    };
    run_in(cfg, &read, &opts).unwrap();
    assert_eq!(strip_time(h), strip_time(&history(&read)), "shared outputs");
}

/// Make run folder `dir` look as an mtkd from before the settings `keys` (of `[distill.agent]`,
/// by name) left it: its config.toml without their lines, its checkpoints hashed with that text.
pub fn as_if_written_before(dir: &Path, keys: &[&str]) {
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !keys.iter().any(|k| l.starts_with(&format!("{k} = "))))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        text.lines().count(),
        old.lines().count() + keys.len(),
        "{text}"
    );
    std::fs::write(&path, &old).unwrap();
    let (new_hash, old_hash) = (
        mtkd_engine::trainer::stable_hash(text.as_bytes()),
        mtkd_engine::trainer::stable_hash(old.as_bytes()),
    );
    for e in std::fs::read_dir(dir.join("checkpoints")).unwrap() {
        let ckpt = e.unwrap().path();
        let meta = ckpt.join("meta.json");
        if !meta.is_file() {
            continue;
        }
        // The hash in place (same length), and the checkpoint's checksum of meta.json with it.
        let data = std::fs::read_to_string(&meta).unwrap();
        assert!(data.contains(&new_hash), "{data}");
        let data = data.replace(&new_hash, &old_hash);
        std::fs::write(&meta, &data).unwrap();
        let sums_path = ckpt.join("checksums.json");
        let mut sums: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sums_path).unwrap()).unwrap();
        sums["files"]["meta.json"]["crc32"] =
            format!("{:08x}", crc32fast::hash(data.as_bytes())).into();
        std::fs::write(&sums_path, serde_json::to_vec_pretty(&sums).unwrap()).unwrap();
    }
}

/// A run folder of an older mtkd resumes with the behaviour it ran with. `ran` sets the
/// settings `lacks` (of `[distill.agent]`) to what that mtkd did; `today` is the same run at
/// today's defaults, which must train differently (or the check could not fail). `ran`, halted
/// after `steps` optimizer steps, stripped of those lines (its config then reads back with
/// today's defaults), and resumed from its own config.toml ends as its uninterrupted run does.
pub fn assert_an_older_folder_resumes_as_it_ran(
    ran: &Config,
    today: &Config,
    s: &Path,
    lacks: &[&str],
    steps: u64,
) {
    run_in(ran, &s.join("ran"), &RunOptions::default()).unwrap();
    run_in(today, &s.join("today"), &RunOptions::default()).unwrap();
    let h_ran = strip_time(&history(&s.join("ran")));
    assert_ne!(
        h_ran,
        strip_time(&history(&s.join("today"))),
        "the older behaviour and today's default differ"
    );
    let older = s.join("older");
    halt_run(ran, &older, steps);
    as_if_written_before(&older, lacks);
    let text = std::fs::read_to_string(older.join("config.toml")).unwrap();
    let read_back = parse(&text).unwrap();
    assert_eq!(
        read_back.distill.as_ref().unwrap().agent,
        today.distill.as_ref().unwrap().agent,
        "the stripped folder reads back with today's defaults"
    );
    run_in(&read_back, &older, &RunOptions::default()).unwrap();
    assert_eq!(h_ran, strip_time(&history(&older)), "resumed");
}
