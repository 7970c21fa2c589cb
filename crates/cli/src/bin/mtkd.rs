//! The `mtkd` command line: `mtkd train`, `teachers`, `share-teachers`, `compare`, `doctor`.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use mtkd_engine::record::EpochRecord;
use mtkd_engine::trainer::{self, Interrupted};
use mtkd_engine::{Config, Observer, RunOptions};

#[derive(Parser)]
#[command(
    name = "mtkd",
    version,
    about = "Multi-teacher knowledge distillation on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a student (distilling from the configured teachers) and write a run folder.
    Train {
        /// The run configuration (TOML). Presets are in configs/.
        #[arg(long, conflicts_with = "resume")]
        config: Option<PathBuf>,
        /// Continue the run in this folder from its last checkpoint (uses its config.toml).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Override a config value, e.g. --set train.epochs=1 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Run folder to create (default: <run.out_dir>/<run.name>-NNN).
        #[arg(long, conflicts_with = "resume")]
        out: Option<PathBuf>,
        /// Stop after this many optimizer steps, as if killed (for resume tests).
        #[arg(long, hide = true)]
        halt_after_steps: Option<u64>,
        /// Share teacher outputs through this folder: read them when a run with the same data,
        /// teachers, seed and batch size stored them there (`mtkd share-teachers`), else compute
        /// and store them.
        #[arg(long, value_name = "DIR")]
        teacher_outputs: Option<PathBuf>,
    },
    /// Compute the teachers' outputs on every training batch of a config once and store them
    /// under DIR, for `mtkd train --teacher-outputs DIR` runs that see the same batches.
    ShareTeachers {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Folder of shared teacher outputs.
        #[arg(long, value_name = "DIR")]
        into: PathBuf,
        /// Refuse (exit status 4) when all epochs' outputs would take more than this many GB.
        #[arg(long, value_name = "GB")]
        max_gb: Option<f64>,
    },
    /// Train (or take from the cache) and evaluate the teacher pool of a config.
    Teachers {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Run every weighting strategy under identical settings and seeds; write a markdown table.
    Compare {
        /// The base config (its [distill] section gives temperature and loss weights).
        #[arg(long)]
        config: PathBuf,
        /// Seeds per strategy (run.seed, run.seed + 1, ...; from --first-seed if given).
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        /// The first student seed (default: run.seed). The teachers keep run.seed's seeds, so
        /// `--first-seed 2 --seeds 1` runs seed 2 of a table with the same cached teachers
        /// (`--set run.seed=2` would give the teachers other seeds and train them again).
        #[arg(long)]
        first_seed: Option<u64>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Comparison folder (default: <run.out_dir>/compare-<run.name>); finished runs in it are reused.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only these rows (comma-separated row names, exact): no-kd, single-<teacher>,
        /// oracle-fixed-weights (with [distill.oracle]), equal-aver, equal-ones-in-epoch-1-control,
        /// ebkd, ca-mkd-logit-weights, aekd, mmkd-last-layer-look-ahead, mtkd-rl-parity-fixed,
        /// mtkd-rl-parity-dynamic, mtkd-rl-clean, mtkd-rl-meta, mtkd-rl-meta-prune; or the groups
        /// `single` (every single-teacher row) and `mtkd-rl` (every agent row). `--list` prints
        /// the names of a config's rows.
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// Print the row names of this comparison (for --only) and exit.
        #[arg(long)]
        list: bool,
        /// Let every run compute its own teacher outputs (default: one teacher pass per seed,
        /// shared by all strategies; exact, see `mtkd share-teachers`).
        #[arg(long)]
        no_shared_teachers: bool,
        /// Disk allowed for one seed's shared teacher outputs; a seed whose outputs would take
        /// more runs without sharing.
        #[arg(long, value_name = "GB", default_value_t = 50.0)]
        shared_teachers_max_gb: f64,
        /// Run each row data-parallel under this launcher, e.g. "mpirun -n 2 --bind-to none"
        /// (split at spaces; `mtkd train ...` follows it). Rows with [distill.prune] run in one
        /// process.
        #[arg(long, value_name = "COMMAND")]
        launcher: Option<String>,
    },
    /// Evaluate a model on a split of a dataset: top-1, top-5, per-class accuracy, confusion
    /// matrix. MODEL: a run folder, a student .safetensors (with --arch) or a TorchScript .pt.
    Eval {
        model: PathBuf,
        /// A TOML file with a [data] table (kind, root, normalize, ...; a run's config.toml
        /// works too). Default: the run folder's own.
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
        /// Read the dataset from this folder instead of the [data] table's root.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "test")]
        split: mtkd_cli::inference::EvalSplit,
        /// The student architecture of a .safetensors model (e.g. cnn-small).
        #[arg(long)]
        arch: Option<mtkd_student::Arch>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// cpu, cuda, cuda:N or auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Detection: also write the detections to FILE in COCO's result format.
        #[arg(long, value_name = "FILE")]
        detections: Option<PathBuf>,
    },
    /// The top-k classes of image files (PNG, JPEG), preprocessed as the data's test split.
    Predict {
        model: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// A TOML file with a [data] table (default: the run folder's own).
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
        #[arg(long)]
        arch: Option<mtkd_student::Arch>,
        /// Class count of a bare model file when the [data] table names no classes.
        #[arg(long)]
        classes: Option<usize>,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Print JSON (one object per image) instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Segmentation and detection: the folder the masks, overlays and drawn boxes are
        /// written to.
        #[arg(long, value_name = "DIR", default_value = "predictions")]
        out: PathBuf,
        /// Detection: the lowest score of a box kept.
        #[arg(long, default_value_t = 0.3)]
        min_score: f64,
    },
    /// Time the training step of a config in the step modes of the performance report (CE only,
    /// one-teacher KD, AVER, MTKD-RL, MTKD-RL with the teacher output cache) and write the
    /// timings as JSON (`cargo xtask bench`).
    BenchSteps {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Modes to time, comma-separated: ce, kd1, aver, mtkd-rl, mtkd-rl-cached (the step
        /// from the second epoch on with `distill.output_cache_mb` and data.augment off).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "ce,kd1,aver,mtkd-rl,mtkd-rl-cached"
        )]
        modes: Vec<String>,
        /// Untimed steps per mode before the timed ones.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps per mode.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Also measure the machine's peak (a large convolution and a matmul).
        #[arg(long)]
        peak: bool,
        /// Write the JSON here (default: standard output).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write the data-parallel scaling report (run by `cargo xtask bench-dist`).
    ScalingReport {
        /// The output of `crates/dist/examples/allreduce.rs` under mpirun (JSON lines).
        #[arg(long)]
        allreduce: PathBuf,
        /// A one-process run folder.
        #[arg(long)]
        one: PathBuf,
        /// The same config's run folder on several ranks.
        #[arg(long)]
        many: PathBuf,
        /// The command to print in the report.
        #[arg(long, default_value = "cargo xtask bench-dist")]
        command: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the performance report (markdown) from the JSON files of `cargo xtask bench`.
    BenchReport {
        /// Folder of `<setting>-mtkd-r<N>.json` and `<setting>-eager-r<N>.json` files.
        #[arg(long)]
        raw: PathBuf,
        /// Criterion's output folder (target/criterion), for the benches' table.
        #[arg(long)]
        criterion: Option<PathBuf>,
        /// The command to print in the report.
        #[arg(long, default_value = "cargo xtask bench")]
        command: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the tch and libtorch versions, threads and CUDA devices.
    Doctor,
    /// (Re)write a run folder's audit page, report.html (every run writes it when it ends).
    Report {
        /// A run folder (with metrics.jsonl and summary.json).
        run: PathBuf,
    },
}

/// A comparison stopped by SIGINT/SIGTERM while one of its runs trained.
#[derive(Debug, thiserror::Error)]
#[error("comparison stopped during run {0} (its checkpoints are kept); run the same mtkd compare command again to continue")]
struct CompareStopped(String);

/// Exit status of a run stopped by SIGINT/SIGTERM (the shell's 128 + SIGINT).
const STOPPED_EXIT: u8 = 130;

/// SIGINT/SIGTERM: the first ends the run after the current epoch (checkpointed), the second
/// after the current step, the third at once.
fn install_stop_handler() {
    let _ = ctrlc::set_handler(|| {
        match mtkd_engine::stop::request() {
        1 => eprintln!(
            "\nmtkd: stopping after this epoch's checkpoint (press Ctrl-C again to stop after the current step)"
        ),
        2 => eprintln!(
            "\nmtkd: stopping after the current step (the epoch replays on resume; Ctrl-C again quits at once)"
        ),
        _ => std::process::exit(i32::from(STOPPED_EXIT)),
    }
    });
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    install_stop_handler();
    let result = match cli.cmd {
        Cmd::Doctor => doctor(),
        Cmd::ScalingReport {
            allreduce,
            one,
            many,
            command,
            out,
        } => mtkd_cli::scaling::write_report(&allreduce, &one, &many, &command, &out),
        Cmd::BenchReport {
            raw,
            criterion,
            command,
            out,
        } => mtkd_engine::trainer::bench::write_report(&raw, criterion.as_deref(), &command, &out),
        Cmd::BenchSteps {
            config,
            overrides,
            modes,
            warmup,
            steps,
            peak,
            json,
        } => bench_steps(config, overrides, modes, warmup, steps, peak, json),
        Cmd::Eval {
            model,
            data,
            root,
            split,
            arch,
            json,
            batch_size,
            device,
            detections,
        } => eval(
            model, data, root, split, arch, json, batch_size, device, detections,
        ),
        Cmd::Predict {
            model,
            images,
            data,
            arch,
            classes,
            top_k,
            json,
            device,
            out,
            min_score,
        } => predict(
            model, images, data, arch, classes, top_k, json, device, out, min_score,
        ),
        Cmd::Report { run } => mtkd_engine::report::write_report(&run).map(|p| {
            println!("{}", p.display());
        }),
        Cmd::Compare {
            config,
            overrides,
            list,
            ..
        } if list => Config::load(&config, &overrides)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| mtkd_cli::compare::names(&cfg))
            .map(|names| {
                for n in names {
                    println!("{n}");
                }
            }),
        Cmd::Compare {
            config,
            seeds,
            first_seed,
            overrides,
            out,
            only,
            no_shared_teachers,
            shared_teachers_max_gb,
            launcher,
            ..
        } => compare(
            config,
            first_seed,
            seeds,
            overrides,
            out,
            only,
            (!no_shared_teachers).then_some(shared_teachers_max_gb),
            launcher,
        ),
        Cmd::Teachers { config, overrides } => teachers(config, overrides),
        Cmd::ShareTeachers {
            config,
            overrides,
            into,
            max_gb,
        } => share_teachers(config, overrides, into, max_gb),
        Cmd::Train {
            config,
            resume,
            overrides,
            out,
            halt_after_steps,
            teacher_outputs,
        } => train(
            config,
            resume,
            overrides,
            out,
            RunOptions {
                halt_after_steps,
                teacher_outputs,
                comm: None,
            },
        ),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if e.root_cause().downcast_ref::<trainer::Stopped>().is_some()
                || e.root_cause().downcast_ref::<CompareStopped>().is_some()
            {
                eprintln!("mtkd: {e:#}");
                return std::process::ExitCode::from(STOPPED_EXIT);
            }
            if e.root_cause().downcast_ref::<Interrupted>().is_some() {
                eprintln!("mtkd: {e:#}");
                return std::process::ExitCode::from(3);
            }
            if e.root_cause().downcast_ref::<trainer::TooLarge>().is_some() {
                eprintln!("mtkd: {e:#}");
                return std::process::ExitCode::from(TOO_LARGE_EXIT);
            }
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The model and its [data] table for `eval` / `predict`.
fn model_and_data(
    model: &std::path::Path,
    data: Option<PathBuf>,
    arch: Option<mtkd_student::Arch>,
) -> Result<(
    mtkd_cli::inference::ModelSource,
    mtkd_engine::config::DataConfig,
)> {
    use mtkd_cli::inference::{data_table, ModelSource};
    let src = ModelSource::of(model, arch)?;
    let data = match data {
        Some(f) => data_table(&f)?,
        None => src.run_data()?.ok_or_else(|| {
            anyhow::anyhow!(
                "{} is a model file: give --data FILE with a [data] table (kind, root, normalize) saying how its inputs are made",
                model.display()
            )
        })?,
    };
    Ok((src, data))
}

#[allow(clippy::too_many_arguments)]
fn eval(
    model: PathBuf,
    data: Option<PathBuf>,
    root: Option<PathBuf>,
    split: mtkd_cli::inference::EvalSplit,
    arch: Option<mtkd_student::Arch>,
    json: bool,
    batch_size: usize,
    device: String,
    detections: Option<PathBuf>,
) -> Result<()> {
    init_logging(None);
    let (src, mut data) = model_and_data(&model, data, arch)?;
    if let Some(r) = root {
        data.root = r;
    }
    let device = trainer::device_of(&device)?;
    if data.task() == mtkd_engine::config::TaskKind::Detection {
        let r = mtkd_cli::inference::evaluate_detection(
            &src,
            &data,
            split,
            batch_size.max(1),
            device,
            detections.as_deref(),
        )?;
        if !eval_head(json, &r, &r.on, "images")? {
            return Ok(());
        }
        let line: Vec<String> = r
            .report
            .scalars
            .keys()
            .map(|k| {
                format!(
                    "{} {:.2}%",
                    mtkd_vision_tasks::task::metric_label(k),
                    r.report.get(k)
                )
            })
            .collect();
        println!("{}   mean loss {:.4}\n", line.join("   "), r.mean_loss);
        print_per_class(&r.class_names, &r.report.per_class, "AP");
        if let Some(p) = &r.detections {
            println!("\ndetections (COCO result format): {}", p.display());
        }
        return Ok(());
    }
    if data.task() == mtkd_engine::config::TaskKind::Segmentation {
        let r = mtkd_cli::inference::evaluate_segmentation(
            &src,
            &data,
            split,
            batch_size.max(1),
            device,
        )?;
        if !eval_head(json, &r, &r.on, "images")? {
            return Ok(());
        }
        println!(
            "mIoU {:.2}%   pixel accuracy {:.2}%   mean cross-entropy {:.4}\n",
            r.report.value,
            r.report.get("pixel_accuracy"),
            r.mean_cross_entropy
        );
        print_per_class(&r.class_names, &r.report.per_class, "IoU");
        return Ok(());
    }
    let r = mtkd_cli::inference::evaluate(&src, &data, split, batch_size.max(1), device)?;
    if !eval_head(json, &r, &r.on, "samples")? {
        return Ok(());
    }
    println!(
        "top-1 {:.2}%   top-5 {:.2}%   mean cross-entropy {:.4}\n",
        r.top1, r.top5, r.mean_cross_entropy
    );
    let width = r
        .per_class
        .iter()
        .map(|c| c.class.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<width$}  {:>8}  {:>7}", "class", "samples", "top-1");
    for c in &r.per_class {
        println!("{:<width$}  {:>8}  {:>6.2}%", c.class, c.samples, c.top1);
    }
    if r.confusion.len() <= 20 {
        println!("\nconfusion matrix (rows: true class, columns: predicted class, in class order)");
        for (c, row) in r.per_class.iter().zip(&r.confusion) {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
            println!("{:<width$} {}", c.class, cells.join(""));
        }
    } else {
        println!(
            "\n(confusion matrix of {} classes: see --json)",
            r.confusion.len()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn predict(
    model: PathBuf,
    images: Vec<PathBuf>,
    data: Option<PathBuf>,
    arch: Option<mtkd_student::Arch>,
    classes: Option<usize>,
    top_k: usize,
    json: bool,
    device: String,
    out: PathBuf,
    min_score: f64,
) -> Result<()> {
    init_logging(None);
    let (src, data) = model_and_data(&model, data, arch)?;
    let device = trainer::device_of(&device)?;
    if data.task() == mtkd_engine::config::TaskKind::Detection {
        let preds = mtkd_cli::inference::predict_detection(
            &src, &data, &images, &out, min_score, classes, device,
        )?;
        return answer(&preds, json, |p| {
            let boxes: Vec<String> = p
                .boxes
                .iter()
                .map(|b| {
                    format!(
                        "{} {:.2} at [{:.0}, {:.0}, {:.0}, {:.0}]",
                        b.class, b.score, b.bbox[0], b.bbox[1], b.bbox[2], b.bbox[3]
                    )
                })
                .collect();
            format!(
                "{}: {} box(es){}{} (drawn {})",
                p.image,
                boxes.len(),
                if boxes.is_empty() { "" } else { ": " },
                boxes.join("; "),
                p.drawn.display()
            )
        });
    }
    if data.task() == mtkd_engine::config::TaskKind::Segmentation {
        let preds =
            mtkd_cli::inference::predict_segmentation(&src, &data, &images, &out, classes, device)?;
        return answer(&preds, json, |p| {
            let shares: Vec<String> = p
                .classes
                .iter()
                .map(|c| format!("{} {:.1}%", c.class, 100.0 * c.share))
                .collect();
            format!(
                "{}: {} (mask {}, overlay {})",
                p.image,
                shares.join(", "),
                p.mask.display(),
                p.overlay.display()
            )
        });
    }
    let preds = mtkd_cli::inference::predict(&src, &data, &images, top_k, classes, device)?;
    answer(&preds, json, |p| {
        let top: Vec<String> = p
            .top
            .iter()
            .map(|t| format!("{} {:.1}%", t.class, 100.0 * t.probability))
            .collect();
        format!("{}: {}", p.image, top.join(", "))
    })
}

/// The start of `mtkd eval`'s answer: the whole report `r` as JSON (`false`: nothing more to
/// print), or the model and data lines (`true`: the task's lines follow).
fn eval_head<T: serde::Serialize>(
    json: bool,
    r: &T,
    on: &mtkd_cli::inference::Evaluated,
    unit: &str,
) -> Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(false);
    }
    println!("model: {}", on.model);
    println!(
        "data:  {} ({} split, {} {unit})",
        on.data, on.split, on.samples
    );
    Ok(true)
}

/// Print the answers of `mtkd predict`: JSON, or one line per image.
fn answer<T: serde::Serialize>(preds: &[T], json: bool, line: impl Fn(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(preds)?);
    } else {
        for p in preds {
            println!("{}", line(p));
        }
    }
    Ok(())
}

/// A per-class table of an evaluation: the class, then its value (`absent` when NaN: the class
/// is in neither truth nor predictions).
fn print_per_class(names: &[String], values: &[f64], what: &str) {
    let width = names.iter().map(String::len).max().unwrap_or(5).max(5);
    println!("{:<width$}  {:>7}", "class", what);
    for (name, v) in names.iter().zip(values) {
        if v.is_nan() {
            println!("{name:<width$}  {:>7}", "absent");
        } else {
            println!("{name:<width$}  {v:>6.2}%");
        }
    }
}

fn doctor() -> Result<()> {
    for (k, v) in mtkd_engine::doctor::report() {
        println!("{k:>18}: {v}");
    }
    Ok(())
}

fn bench_steps(
    config: PathBuf,
    overrides: Vec<String>,
    modes: Vec<String>,
    warmup: usize,
    steps: usize,
    peak: bool,
    json: Option<PathBuf>,
) -> Result<()> {
    use mtkd_engine::trainer::bench;
    let cfg = Config::load(&config, &overrides)?;
    init_logging(None);
    let modes = modes
        .iter()
        .map(|m| bench::BenchMode::parse(m))
        .collect::<Result<Vec<_>>>()?;
    // The peak first, on an idle process (measured after the modes it reads lower).
    let peak = if peak {
        if cfg.run.threads > 0 {
            tch::set_num_threads(cfg.run.threads as i32);
        }
        Some(bench::measure_peak(
            trainer::device_of(&cfg.run.device)?,
            5,
        )?)
    } else {
        None
    };
    let (plan, timings) = bench::bench_steps(&cfg, &modes, warmup, steps, &mut Bars::default())?;
    let out = serde_json::json!({
        "config": config.display().to_string(),
        "overrides": overrides,
        "threads": tch::get_num_threads(),
        "plan": plan,
        "timings": timings,
        "peak_gflops": peak,
    });
    let text = serde_json::to_string_pretty(&out)?;
    match json {
        Some(p) => mtkd_engine::fsio::write_atomic(&p, text.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn teachers(config: PathBuf, overrides: Vec<String>) -> Result<()> {
    let cfg = Config::load(&config, &overrides)?;
    init_logging(None);
    let pool = trainer::prepare_teachers(&cfg, &mut Bars::default())?;
    if pool.is_empty() {
        anyhow::bail!("{} has no [[teachers]]", config.display());
    }
    let metric = mtkd_vision_tasks::task::metric_label(trainer::task_of(&cfg).primary()).to_owned();
    for t in pool {
        println!(
            "teacher {:<14} test {metric} {:>6.2}%   ({})",
            t.name,
            t.test_value.unwrap_or(f64::NAN),
            t.source
        );
    }
    Ok(())
}

/// Exit status of `mtkd share-teachers` when the outputs would exceed `--max-gb`.
const TOO_LARGE_EXIT: u8 = 4;

fn share_teachers(
    config: PathBuf,
    overrides: Vec<String>,
    into: PathBuf,
    max_gb: Option<f64>,
) -> Result<()> {
    let cfg = Config::load(&config, &overrides)?;
    init_logging(None);
    let max = max_gb.map(|g| (g * 1e9) as u64);
    let (dir, pass) = trainer::share_teacher_outputs(&cfg, &into, max, &mut Bars::default())?;
    if !pass.seconds.is_empty() {
        let mean = pass.seconds.iter().sum::<f64>() / pass.seconds.len() as f64;
        eprintln!(
            "mtkd: {} epochs of teacher outputs, {mean:.1} s per epoch",
            pass.seconds.len()
        );
    }
    println!("{}", dir.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compare(
    config: PathBuf,
    first_seed: Option<u64>,
    seeds: u64,
    overrides: Vec<String>,
    out: Option<PathBuf>,
    only: Option<Vec<String>>,
    share_max_gb: Option<f64>,
    launcher: Option<String>,
) -> Result<()> {
    let share = share_max_gb.is_some();
    let launcher: Vec<String> = launcher
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    use mtkd_cli::compare;
    let cfg = Config::load(&config, &overrides)?;
    let plan = compare::plan(&cfg, first_seed, seeds.max(1), only.as_deref())?;
    let out_arg = out.clone();
    let out = out.unwrap_or_else(|| cfg.run.out_dir.join(format!("compare-{}", cfg.run.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let _lock = mtkd_engine::fsio::DirLock::try_acquire(&out, "comparison folder")?;
    init_logging(None);
    eprintln!(
        "mtkd: comparison of {} runs in {}",
        plan.len(),
        out.display()
    );
    // Teachers first (trained once, cached), so no run pays for them.
    let teachers = trainer::prepare_teachers(&cfg, &mut Bars::default())?;
    let exe = std::env::current_exe().context("locating the mtkd binary")?;
    let shared_root = out.join("teacher-outputs");
    let mut results = Vec::new();
    let mut plan_seeds: Vec<u64> = plan.iter().map(|p| p.seed).collect();
    plan_seeds.dedup();
    let mut done = 0;
    for &seed in &plan_seeds {
        // One teacher pass per seed (before its first unfinished run that uses teachers); the
        // stored outputs are deleted once every run of the seed is done.
        let mut passed = false;
        let mut seed_shares = share;
        for p in plan.iter().filter(|p| p.seed == seed) {
            done += 1;
            let dir = out.join(&p.dir_name);
            let planned = toml::to_string_pretty(&p.config)?;
            if let Ok(existing) = std::fs::read_to_string(dir.join("config.toml")) {
                if existing != planned {
                    anyhow::bail!(
                        "{} was made with other settings than this comparison plans (another base config, \
                         --set or mtkd version); use another --out folder or delete that run",
                        dir.display()
                    );
                }
            }
            if !dir.join("summary.json").is_file() {
                let cfg_path = out.join(format!("{}.toml", p.dir_name));
                mtkd_engine::fsio::write_atomic(&cfg_path, planned.as_bytes())?;
                if seed_shares && p.config.uses_teachers() && !passed {
                    eprintln!("mtkd: teacher pass for seed {seed}");
                    let max = share_max_gb.unwrap_or(f64::INFINITY);
                    seed_shares = teacher_pass(&exe, &cfg_path, &shared_root, &out, seed, max)?;
                    passed = true;
                }
                let shares = seed_shares && p.config.uses_teachers();
                eprintln!(
                    "mtkd: [{}/{}] {} (seed {})",
                    done,
                    plan.len(),
                    p.strategy,
                    p.seed
                );
                // Data-parallel rows: `LAUNCHER... mtkd train ...` (pruning runs in one process).
                let prunes = p.config.distill.as_ref().is_some_and(|d| d.prune.is_some());
                let mut cmd = match launcher.split_first() {
                    Some((program, args)) if !prunes => {
                        let mut c = std::process::Command::new(program);
                        c.args(args).arg(&exe);
                        c
                    }
                    _ => std::process::Command::new(&exe),
                };
                cmd.arg("train");
                if dir.join("config.toml").is_file() {
                    cmd.arg("--resume").arg(&dir);
                } else {
                    cmd.arg("--config").arg(&cfg_path).arg("--out").arg(&dir);
                }
                if shares {
                    cmd.arg("--teacher-outputs").arg(&shared_root);
                }
                let status = cmd
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("starting mtkd train")?;
                if mtkd_engine::stop::level() > 0 || status.code() == Some(i32::from(STOPPED_EXIT))
                {
                    return Err(anyhow::Error::new(CompareStopped(p.dir_name.clone())));
                }
                if !status.success() {
                    anyhow::bail!(
                        "run {} failed ({status}); its folder is {}",
                        p.dir_name,
                        dir.display()
                    );
                }
            }
            results.push(compare::read_run(&p.strategy, &dir)?);
        }
        // This seed's stored outputs only: another seed's half-made pass (an interrupted
        // comparison) is kept for when that seed's runs come.
        if let Ok(entries) = std::fs::read_dir(&shared_root) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("seed{seed}-"))
                {
                    std::fs::remove_dir_all(e.path())
                        .with_context(|| format!("removing {}", e.path().display()))?;
                }
            }
        }
        // Gone when empty (fails harmlessly while another seed's outputs remain).
        let _ = std::fs::remove_dir(&shared_root);
    }
    let passes: Vec<trainer::TeacherPass> = plan_seeds
        .iter()
        .filter_map(|s| {
            let path = out.join(format!("teacher-pass-seed{s}.json"));
            serde_json::from_slice(&std::fs::read(path).ok()?).ok()
        })
        .collect();
    let mut md = String::new();
    md.push_str(&format!("# Strategy comparison: {}\n\n", cfg.run.name));
    md.push_str(&format!(
        "Command: `mtkd compare --config {}{} --seeds {}{}`  \nStudent: {}; {} epochs; data: {:?} {}\n\n",
        config.display(),
        first_seed
            .map(|f| format!(" --first-seed {f}"))
            .unwrap_or_default(),
        seeds,
        overrides
            .iter()
            .map(|o| format!(" --set '{o}'"))
            .chain(only.as_ref().map(|o| format!(" --only {}", o.join(","))))
            .chain(out_arg.as_ref().map(|o| format!(" --out {}", o.display())))
            .chain((!share).then(|| " --no-shared-teachers".to_owned()))
            .collect::<String>(),
        cfg.student.arch,
        cfg.train.epochs,
        cfg.data.kind,
        cfg.data.root.display()
    ));
    // Runs with unlabelled samples: how many labels the student had (docs/METHOD.md 15).
    if let Some(c) = results
        .iter()
        .filter(|r| r.summary.strategy != "no-kd")
        .find_map(|r| r.summary.labelled)
    {
        md.push_str(&format!(
            "Labels: the student's epochs hold {} training samples, {} of them labelled ({} \
             distinct); the others take the teachers' pseudo-targets. The no-kd row trains on \
             the labelled samples only, repeated to {} per epoch (docs/METHOD.md section 15).\n\n",
            c.samples, c.labelled, c.distinct_labelled, c.samples
        ));
    }
    md.push_str(&format!(
        "Machine: {}; {} logical cores; libtorch threads {}; mtkd {}; {}\n\n",
        mtkd_engine::trainer::bench::cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        tch::get_num_threads(),
        env!("CARGO_PKG_VERSION"),
        mtkd_engine::trainer::bench::utc_now(),
    ));
    md.push_str(&format!(
        "Teachers (test {}):\n\n",
        mtkd_vision_tasks::task::metric_label(trainer::task_of(&cfg).primary())
    ));
    for t in &teachers {
        md.push_str(&format!(
            "- {}: {:.2}% ({})\n",
            t.name,
            t.test_value.unwrap_or(f64::NAN),
            t.source
        ));
    }
    md.push_str("\nMean ± sample standard deviation over seeds. Final = after the last epoch; best = best test epoch (reported for comparison with the paper's practice; select on a validation split).\n\n");
    md.push_str(&compare::table(&results));
    md.push_str(&compare::teacher_note(&passes, share));
    if share && passes.len() < plan_seeds.len() {
        md.push_str(
            "Some seeds ran without shared outputs (over --shared-teachers-max-gb or no run \
             needed a pass); their rows include the teachers' forward passes.\n",
        );
    }
    if !launcher.is_empty() {
        md.push_str(&format!(
            "Each row ran data-parallel under `{}` (rows with [distill.prune] in one process): \
             its s / epoch is the ranks' wall time, and its figures differ from one process's \
             within the data-parallel tolerance (README, \"Several processes\").\n",
            launcher.join(" ")
        ));
    }
    // Each run's audit page gains the comparison now that all its siblings exist.
    for p in &plan {
        if let Err(e) = mtkd_engine::report::write_report(&out.join(&p.dir_name)) {
            eprintln!("mtkd: report of {}: {e:#}", p.dir_name);
        }
    }
    let path = out.join("comparison.md");
    mtkd_engine::fsio::write_atomic(&path, md.as_bytes())?;
    println!("{md}");
    println!("table: {}", path.display());
    Ok(())
}

/// The CPU model from /proc/cpuinfo (or "unknown CPU").
/// Run `mtkd share-teachers` for one seed's config; keep its timing as
/// `teacher-pass-seed<seed>.json` in the comparison folder. Returns false (the seed's runs then
/// compute their own outputs) when the outputs would take more than `max_gb`.
fn teacher_pass(
    exe: &std::path::Path,
    cfg_path: &std::path::Path,
    shared_root: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
    max_gb: f64,
) -> Result<bool> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("share-teachers")
        .arg("--config")
        .arg(cfg_path)
        .arg("--into")
        .arg(shared_root);
    if max_gb.is_finite() {
        cmd.arg("--max-gb").arg(max_gb.to_string());
    }
    let output = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting mtkd share-teachers")?;
    if output.status.code() == Some(i32::from(TOO_LARGE_EXIT)) {
        eprintln!(
            "mtkd: seed {seed}: every run computes its own teacher outputs \
             (raise --shared-teachers-max-gb to share them)"
        );
        return Ok(false);
    }
    if !output.status.success() {
        anyhow::bail!(
            "the teacher pass for seed {seed} failed ({})",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let key = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    let pass: trainer::TeacherPass = serde_json::from_slice(
        &std::fs::read(key.join("pass.json"))
            .with_context(|| format!("reading {}", key.join("pass.json").display()))?,
    )?;
    let keep = out.join(format!("teacher-pass-seed{seed}.json"));
    // A pass that found every epoch stored (a resumed comparison) measured nothing.
    if !pass.seconds.is_empty() || !keep.is_file() {
        let bytes = std::fs::read(key.join("pass.json"))
            .with_context(|| format!("reading {}", key.join("pass.json").display()))?;
        mtkd_engine::fsio::write_atomic(&keep, &bytes)?;
    }
    Ok(true)
}

/// The log file's writer: a write that fails (a full disk, a file that cannot grow) is reported
/// once on stderr instead of being dropped silently; the run goes on.
struct LogFile {
    file: File,
    path: PathBuf,
    failed: bool,
}

impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.file.write_all(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                if !self.failed {
                    self.failed = true;
                    eprintln!(
                        "mtkd: cannot write the log {}: {e}; log lines are lost from here on (the run goes on)",
                        self.path.display()
                    );
                }
                // Reported: the logger must not also print its own error for every line.
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging(log_file: Option<(File, PathBuf)>) {
    let stderr_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(stderr_filter);
    let file = log_file.map(|(file, path)| {
        fmt::layer()
            .with_ansi(false)
            .with_writer(Mutex::new(LogFile {
                file,
                path,
                failed: false,
            }))
            .with_filter(EnvFilter::new("info"))
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

/// The exit status of a failed `mtkd train`.
fn train_exit_code(e: &anyhow::Error) -> i32 {
    if e.root_cause().downcast_ref::<trainer::Stopped>().is_some() {
        i32::from(STOPPED_EXIT)
    } else if e.root_cause().downcast_ref::<Interrupted>().is_some() {
        3
    } else {
        1
    }
}

fn train(
    config: Option<PathBuf>,
    resume: Option<PathBuf>,
    overrides: Vec<String>,
    out: Option<PathBuf>,
    mut opts: RunOptions,
) -> Result<()> {
    // Data-parallel: started by mpirun (or srun), this process is one rank. A rank that fails
    // or panics ends the whole job at once (MPI_Abort), naming itself, so that no rank waits
    // forever for it in a collective.
    let env = mtkd_dist::DistEnv::detect()?;
    if env.world > 1 {
        let comm: std::rc::Rc<dyn mtkd_dist::Collective> = mtkd_dist::connect(&env)?.into();
        let (rank, world) = (env.rank, env.world);
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            eprintln!("mtkd (rank {rank} of {world}): panicked; ending the job");
            // Leaving without MPI_Finalize: the launcher ends the other ranks.
            std::process::exit(101);
        }));
        opts.comm = Some(std::rc::Rc::clone(&comm));
        return match train_ranked(config, resume, overrides, out, opts, Some(&*comm)) {
            Ok(()) => {
                comm.barrier()?;
                Ok(())
            }
            // A stop on request: the ranks agreed on it (the trainer's stop level), so they all
            // stop here together and leave normally.
            Err(e) if e.root_cause().downcast_ref::<trainer::Stopped>().is_some() => {
                comm.barrier()?;
                Err(e)
            }
            Err(e) => {
                eprintln!("mtkd (rank {rank} of {world}): error: {e:#}");
                comm.abort(train_exit_code(&e));
            }
        };
    }
    train_ranked(config, resume, overrides, out, opts, None)
}

fn train_ranked(
    config: Option<PathBuf>,
    resume: Option<PathBuf>,
    overrides: Vec<String>,
    out: Option<PathBuf>,
    opts: RunOptions,
    comm: Option<&dyn mtkd_dist::Collective>,
) -> Result<()> {
    let rank = comm.map_or(0, |c| c.rank());
    // Check the whole config before any work.
    let mut created = false;
    let (cfg, dir) = match (&config, &resume) {
        (_, Some(dir)) => {
            let path = dir.join("config.toml");
            if !path.is_file() {
                anyhow::bail!(
                    "{} is not a run folder: it has no config.toml",
                    dir.display()
                );
            }
            (Config::load(&path, &overrides)?, dir.clone())
        }
        (Some(path), None) => {
            let cfg = Config::load(path, &overrides)?;
            let dir = match out {
                Some(d) => {
                    if !d.exists() && rank == 0 {
                        created = true;
                    }
                    std::fs::create_dir_all(&d)
                        .with_context(|| format!("cannot create {}", d.display()))?;
                    d
                }
                // Data-parallel: rank 0 picks the folder and tells the others.
                None => {
                    created = rank == 0;
                    let mine = if rank == 0 {
                        trainer::new_run_dir(&cfg)?.display().to_string()
                    } else {
                        String::new()
                    };
                    match comm {
                        Some(c) => PathBuf::from(mtkd_dist::broadcast_string(c, &mine)?),
                        None => PathBuf::from(mine),
                    }
                }
            };
            (cfg, dir)
        }
        (None, None) => {
            anyhow::bail!("give --config FILE (presets are in configs/) or --resume RUN_DIR")
        }
    };
    let result = train_in(&cfg, &dir, &opts, rank);
    // A start that failed before its first checkpoint (bad teacher, bad data, no device) leaves
    // no folder behind; a stopped run keeps its folder (it resumes), as does any run with a
    // checkpoint.
    if let Err(e) = &result {
        let stopped = e.root_cause().downcast_ref::<trainer::Stopped>().is_some()
            || e.root_cause().downcast_ref::<Interrupted>().is_some();
        if created
            && !stopped
            && !mtkd_engine::checkpoint::any(&dir.join("checkpoints"))
            && std::fs::remove_dir_all(&dir).is_ok()
        {
            eprintln!(
                "mtkd: the run did not start; its folder {} is removed",
                dir.display()
            );
        }
    }
    result
}

fn train_in(cfg: &Config, dir: &std::path::Path, opts: &RunOptions, rank: usize) -> Result<()> {
    if rank > 0 {
        // Data-parallel: rank 0 logs, shows progress and prints the results.
        init_logging(None);
        mtkd_engine::run(cfg, dir, opts, &mut mtkd_engine::Silent)?;
        return Ok(());
    }
    let log_path = dir.join("mtkd.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    init_logging(Some((log, log_path)));
    eprintln!("mtkd: run folder {}", dir.display());
    if let Some(c) = &opts.comm {
        eprintln!(
            "mtkd: data-parallel over {} ranks ({}); the global batch of {} is split between them",
            c.world(),
            c.name(),
            cfg.train.batch_size
        );
    }
    let mut obs = Bars::default();
    let outcome = mtkd_engine::run(cfg, dir, opts, &mut obs)?;
    let s = &outcome.summary;
    println!();
    let metric = mtkd_vision_tasks::task::metric_label(&s.metric).to_owned();
    for t in &s.teachers {
        if let Some(a) = t.test_value {
            println!(
                "teacher {:<14} test {metric} {:6.2}%   ({})",
                t.name, a, t.source
            );
        }
    }
    let others: String = s
        .final_report
        .scalars
        .iter()
        .filter(|(k, _)| **k != s.metric)
        .filter(|(k, _)| {
            s.final_report
                .kind()
                .final_line
                .is_none_or(|shown| shown.contains(&k.as_str()))
        })
        .map(|(k, v)| format!(", {} {v:.2}%", mtkd_vision_tasks::task::metric_label(k)))
        .collect();
    println!(
        "student {} ({} parameters, strategy {}): test {metric} {:.2}% (best {:.2}% at epoch {}){others}, {:.0} s",
        s.student, s.student_parameters, s.strategy, s.final_value, s.best_value, s.best_epoch, s.wall_seconds
    );
    if let Some(init) = &s.init {
        println!("  (the student started from {init})");
    }
    println!("results: {}", outcome.dir.display());
    println!("  report.html (the audit page: open it in a browser), summary.json, metrics.jsonl, audit.json, plots/*.png, student.safetensors, student.pt (TorchScript), checkpoints/, mtkd.log");
    Ok(())
}

/// Progress bars with rate and ETA, one per epoch.
#[derive(Default)]
struct Bars {
    bar: Option<ProgressBar>,
}

impl Observer for Bars {
    fn phase(&mut self, message: &str) {
        // A pass without epoch records (the teacher pass) ends its bar here.
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        eprintln!("mtkd: {message}");
    }

    fn epoch_start(&mut self, label: &str, epoch: usize, epochs: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} batches, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("{label} epoch {epoch}/{epochs}"));
        self.bar = Some(bar);
    }

    fn batch(&mut self, loss: Option<f64>) {
        if let Some(b) = &self.bar {
            b.inc(1);
            if let Some(l) = loss {
                let msg = b.message();
                let base = msg.split(" loss").next().unwrap_or(&msg).to_owned();
                b.set_message(format!("{base} loss {l:.3}"));
            }
        }
    }

    fn epoch_end(&mut self, r: &EpochRecord) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let (train, test) = (r.test.kind().train_label, r.test.epoch_line());
        eprintln!(
            "  epoch {:>3}: loss {:.4} (ce {:.4}, kd {:.4}, feat {:.4}) {train} {:.2}%  {test}  lr {:.4}  {:.1}s",
            r.epoch, r.train_loss, r.train_ce, r.train_kd, r.train_feature, r.train_metric, r.lr, r.seconds
        );
    }
}
