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
        /// Seeds per strategy (run.seed, run.seed + 1, ...).
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Comparison folder (default: <run.out_dir>/compare-<run.name>); finished runs in it are reused.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only strategies whose label starts with one of these (comma-separated), e.g. equal,mtkd-rl.
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// Let every run compute its own teacher outputs (default: one teacher pass per seed,
        /// shared by all strategies; exact, see `mtkd share-teachers`).
        #[arg(long)]
        no_shared_teachers: bool,
        /// Disk allowed for one seed's shared teacher outputs; a seed whose outputs would take
        /// more runs without sharing.
        #[arg(long, value_name = "GB", default_value_t = 50.0)]
        shared_teachers_max_gb: f64,
    },
    /// Print the tch and libtorch versions, threads and CUDA devices.
    Doctor,
    /// (Re)write a run folder's audit page, report.html (every run writes it when it ends).
    Report {
        /// A run folder (with metrics.jsonl and summary.json).
        run: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Doctor => doctor(),
        Cmd::Report { run } => mtkd_engine::report::write_report(&run).map(|p| {
            println!("{}", p.display());
        }),
        Cmd::Compare {
            config,
            seeds,
            overrides,
            out,
            only,
            no_shared_teachers,
            shared_teachers_max_gb,
        } => compare(
            config,
            seeds,
            overrides,
            out,
            only,
            (!no_shared_teachers).then_some(shared_teachers_max_gb),
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
            },
        ),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
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

fn doctor() -> Result<()> {
    for (k, v) in mtkd_engine::doctor::report() {
        println!("{k:>18}: {v}");
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
    for t in pool {
        println!(
            "teacher {:<14} test top-1 {:>6.2}%   ({})",
            t.name,
            t.test_top1.unwrap_or(f64::NAN),
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

fn compare(
    config: PathBuf,
    seeds: u64,
    overrides: Vec<String>,
    out: Option<PathBuf>,
    only: Option<Vec<String>>,
    share_max_gb: Option<f64>,
) -> Result<()> {
    let share = share_max_gb.is_some();
    use mtkd_engine::compare;
    let cfg = Config::load(&config, &overrides)?;
    let plan = compare::plan(&cfg, seeds.max(1), only.as_deref())?;
    let out = out.unwrap_or_else(|| cfg.run.out_dir.join(format!("compare-{}", cfg.run.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
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
                std::fs::write(&cfg_path, &planned)
                    .with_context(|| format!("writing {}", cfg_path.display()))?;
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
                let mut cmd = std::process::Command::new(&exe);
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
        "Command: `mtkd compare --config {} --seeds {}{}`  \nStudent: {}; {} epochs; data: {:?} {}\n\n",
        config.display(),
        seeds,
        overrides
            .iter()
            .map(|o| format!(" --set '{o}'"))
            .chain(only.as_ref().map(|o| format!(" --only '{}'", o.join(","))))
            .chain((!share).then(|| " --no-shared-teachers".to_owned()))
            .collect::<String>(),
        cfg.student.arch,
        cfg.train.epochs,
        cfg.data.kind,
        cfg.data.root.display()
    ));
    md.push_str(&format!(
        "Machine: {}; {} logical cores; libtorch threads {}; mtkd {}; {}\n\n",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        tch::get_num_threads(),
        env!("CARGO_PKG_VERSION"),
        std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
    ));
    md.push_str("Teachers (test top-1):\n\n");
    for t in &teachers {
        md.push_str(&format!(
            "- {}: {:.2}% ({})\n",
            t.name,
            t.test_top1.unwrap_or(f64::NAN),
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
    // Each run's audit page gains the comparison now that all its siblings exist.
    for p in &plan {
        if let Err(e) = mtkd_engine::report::write_report(&out.join(&p.dir_name)) {
            eprintln!("mtkd: report of {}: {e:#}", p.dir_name);
        }
    }
    let path = out.join("comparison.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}");
    println!("table: {}", path.display());
    Ok(())
}

/// The CPU model from /proc/cpuinfo (or "unknown CPU").
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

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
        std::fs::copy(key.join("pass.json"), &keep)
            .with_context(|| format!("writing {}", keep.display()))?;
    }
    Ok(true)
}

fn init_logging(log_file: Option<File>) {
    let stderr_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(stderr_filter);
    let file = log_file.map(|f| {
        fmt::layer()
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .with_filter(EnvFilter::new("info"))
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

fn train(
    config: Option<PathBuf>,
    resume: Option<PathBuf>,
    overrides: Vec<String>,
    out: Option<PathBuf>,
    opts: RunOptions,
) -> Result<()> {
    // Check the whole config before any work.
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
                    std::fs::create_dir_all(&d)
                        .with_context(|| format!("cannot create {}", d.display()))?;
                    d
                }
                None => trainer::new_run_dir(&cfg)?,
            };
            (cfg, dir)
        }
        (None, None) => {
            anyhow::bail!("give --config FILE (presets are in configs/) or --resume RUN_DIR")
        }
    };
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("mtkd.log"))
        .with_context(|| format!("cannot open {}", dir.join("mtkd.log").display()))?;
    init_logging(Some(log));
    eprintln!("mtkd: run folder {}", dir.display());
    let mut obs = Bars::default();
    let outcome = mtkd_engine::run(&cfg, &dir, &opts, &mut obs)?;
    let s = &outcome.summary;
    println!();
    for t in &s.teachers {
        if let Some(a) = t.test_top1 {
            println!(
                "teacher {:<14} test top-1 {:6.2}%   ({})",
                t.name, a, t.source
            );
        }
    }
    println!(
        "student {} ({} parameters, strategy {}): test top-1 {:.2}% (best {:.2}% at epoch {}), top-5 {:.2}%, {:.0} s",
        s.student, s.student_parameters, s.strategy, s.final_value, s.best_value, s.best_epoch, s.final_top5, s.wall_seconds
    );
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
        eprintln!(
            "  epoch {:>3}: loss {:.4} (ce {:.4}, kd {:.4}, feat {:.4}) train top-1 {:.2}%  test top-1 {:.2}%  top-5 {:.2}%  lr {:.4}  {:.1}s",
            r.epoch, r.train_loss, r.train_ce, r.train_kd, r.train_feature, r.train_top1, r.test_top1, r.test_top5, r.lr, r.seconds
        );
    }
}
