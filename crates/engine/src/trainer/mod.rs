//! The training loop shared by every task and strategy: data -> student (+ teachers, adapters,
//! weighting strategy) -> loss -> SGD step, evaluation every epoch, an atomic checkpoint per
//! epoch, exact resume, and the run folder's records (metrics.jsonl, summary.json, plots,
//! exported student).

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Tensor};

use crate::checkpoint::{self, Meta};
use crate::config::{Config, NonFinitePolicy};
use crate::dataset::Datasets;
use crate::optim::multistep_lr;
use crate::record::{write_json_atomic, EpochRecord, MetricsSink, Summary, TeacherSummary};
use mtkd_vision_tasks::loader::BatchLoader;
use mtkd_vision_tasks::task::{MetricReport, Task};

pub mod bench;
mod cache;
mod distiller;
mod evaluate;
mod export;
mod pool;
mod replicated;
mod source;
mod state;
mod step;
mod strategy;
mod weights;

pub use evaluate::{evaluate, evaluate_into, Sums};
pub use export::export_torchscript;
pub use pool::{
    build_pool, prepare_teachers, share_teacher_outputs, teacher_config, teacher_head, Pool,
    PoolMember, TeacherPass, TooLarge,
};
use source::Shared;
pub use step::{DistillStep, Distilled, StepOutcome};
use weights::WeightRecords;

/// Hooks through which a binary shows progress; the library itself prints nothing.
pub trait Observer {
    /// A phase begins (loading data, training a teacher, ...).
    fn phase(&mut self, _message: &str) {}
    /// An epoch begins: `label` names what trains, `batches` is the epoch's batch count.
    fn epoch_start(&mut self, _label: &str, _epoch: usize, _epochs: usize, _batches: usize) {}
    /// A batch finished; `loss` is given every few batches.
    fn batch(&mut self, _loss: Option<f64>) {}
    /// An epoch finished.
    fn epoch_end(&mut self, _record: &EpochRecord) {}
}

/// An observer that does nothing (tests, library use).
#[derive(Debug, Default)]
pub struct Silent;
impl Observer for Silent {}

/// Options that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop with [`Interrupted`] after this many optimizer steps in this session: simulates a
    /// kill at a precise point (for resume tests).
    pub halt_after_steps: Option<u64>,
    /// Read the teachers' training outputs from this folder when a run with the same batches
    /// stored them there, else compute and store them ([`crate::shared`]).
    pub teacher_outputs: Option<PathBuf>,
    /// Data-parallel training: this process is one rank of the collective's world
    /// ([`mtkd_dist`]). Every rank runs the same run folder; rank 0 alone writes it.
    pub comm: Option<Rc<dyn mtkd_dist::Collective>>,
}

/// Returned (as the error's root cause) when `halt_after_steps` stopped the run.
#[derive(Debug, thiserror::Error)]
#[error("run interrupted on request after {0} steps")]
pub struct Interrupted(pub u64);

/// Returned (as the error's root cause) when a stop was requested ([`crate::stop`]: the
/// binary's SIGINT/SIGTERM handler): after the epoch's checkpoint (`mid_epoch` false), or after
/// the current step, the interrupted epoch then replaying on resume.
#[derive(Debug, thiserror::Error)]
#[error("{}", stopped_message(.dir, *.completed, *.mid_epoch))]
pub struct Stopped {
    pub dir: PathBuf,
    /// Epochs completed and checkpointed.
    pub completed: usize,
    pub mid_epoch: bool,
}

fn stopped_message(dir: &Path, completed: usize, mid_epoch: bool) -> String {
    let resume = format!("mtkd train --resume {}", dir.display());
    match (mid_epoch, completed) {
        (false, n) => format!(
            "stopped on request after epoch {n}, which is checkpointed; continue with {resume}"
        ),
        (true, 0) => format!(
            "stopped on request during epoch 1, before any checkpoint; {resume} starts the run over"
        ),
        (true, n) => format!(
            "stopped on request during epoch {}; the checkpoint of epoch {n} is kept and {resume} \
             replays epoch {} exactly",
            n + 1,
            n + 1
        ),
    }
}

/// What to do about a non-finite loss, given what was not finite.
fn non_finite_advice(what: &str) -> &'static str {
    if what.starts_with("the logits of teacher") {
        "the teacher itself gives NaN or infinite outputs on this batch, which no training \
         setting fixes: check the teacher's file (evaluate it with `mtkd eval`, export it again) \
         or leave it out of [[teachers]]"
    } else {
        "lower train.lr or set train.on_nonfinite = \"skip\""
    }
}

/// What a finished run produced.
#[derive(Debug)]
pub struct Outcome {
    pub dir: PathBuf,
    pub summary: Summary,
}

/// Pick the device named in the config.
pub fn device_of(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("run.device: `{other}` is not cpu, cuda, cuda:N or auto"))?;
            Device::Cuda(n)
        }
    })
    .and_then(|d: Device| {
        if let Device::Cuda(n) = d {
            let count = tch::Cuda::device_count() as usize;
            if n >= count {
                bail!("run.device asks for CUDA device {n}, but libtorch sees {count} CUDA device(s); use device = \"cpu\" or \"auto\"");
            }
        }
        Ok(d)
    })
}

/// A fresh run folder `<out_dir>/<name>-NNN` (the first free number).
pub fn new_run_dir(cfg: &Config) -> Result<PathBuf> {
    std::fs::create_dir_all(&cfg.run.out_dir)
        .with_context(|| format!("cannot create {}", cfg.run.out_dir.display()))?;
    for n in 1..100_000 {
        let dir = cfg.run.out_dir.join(format!("{}-{n:03}", cfg.run.name));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot create the run folder {}", dir.display())))
            }
        }
    }
    bail!(
        "no free run folder name under {}",
        cfg.run.out_dir.display()
    )
}

pub use crate::config::stable_hash;

/// Write the resolved config into the run folder (before the first step). A folder that has
/// one already keeps it when it holds the same configuration (comments and layout aside); when
/// it holds another, the run is refused with the keys that differ. Returns the config's hash
/// (of its serialization), and [`older_hash`]'s for a folder written by an older mtkd.
pub fn write_resolved_config(dir: &Path, cfg: &Config) -> Result<(String, Option<OlderFolder>)> {
    let text = toml::to_string_pretty(cfg).context("serialising the resolved config")?;
    let path = dir.join("config.toml");
    if path.exists() {
        let old_text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let old = Config::parse(&old_text, &path, &[])
            .with_context(|| format!("reading back the run's configuration {}", path.display()))?;
        let differ = crate::config::differences(&old, cfg)?;
        if !differ.is_empty() {
            bail!(
                "{} was made with another configuration ({} differ{}: {}); resume it with its own \
                 config (mtkd train --resume {}) or start a new run",
                dir.display(),
                if differ.len() == 1 {
                    "this key"
                } else {
                    "these keys"
                },
                if differ.len() == 1 { "s" } else { "" },
                differ.join(", "),
                dir.display()
            );
        }
        let older = older_hash(&old_text, &text, &path, true);
        return Ok((stable_hash(text.as_bytes()), older));
    }
    crate::fsio::write_atomic(&path, text.as_bytes())?;
    Ok((stable_hash(text.as_bytes()), None))
}

/// A run folder written by an older mtkd: the settings its `config.toml` lacks, and the hash its
/// checkpoints carry.
#[derive(Debug, Clone)]
pub struct OlderFolder {
    /// The hash of the text that version wrote.
    pub hash: String,
    /// The settings this version writes and that folder lacks (`table.key`).
    pub added: Vec<String>,
}

/// A run folder written by an older mtkd: its `config.toml` (`old_text`) lacks settings that
/// this version writes (their defaults fill them in), so its checkpoints carry the hash of the
/// text that version wrote, which is `text` without those settings' lines. That hash and the
/// settings, and a warning naming them (`warn`: one process of a data-parallel job logs it);
/// `None` when nothing is missing.
fn older_hash(old_text: &str, text: &str, path: &Path, warn: bool) -> Option<OlderFolder> {
    let added = crate::config::keys_missing_from(old_text, text);
    if added.is_empty() {
        return None;
    }
    if warn {
        tracing::warn!(
            "{} predates these settings, which take their current defaults: {}",
            path.display(),
            added.join(", ")
        );
    }
    let mut table = String::new();
    let mut kept = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').to_owned();
        } else if let Some((k, _)) = t.split_once(" = ") {
            let key = if table.is_empty() {
                k.to_owned()
            } else {
                format!("{table}.{k}")
            };
            if added.contains(&key) {
                continue;
            }
        }
        kept.push_str(line);
        kept.push('\n');
    }
    Some(OlderFolder {
        hash: stable_hash(kept.as_bytes()),
        added,
    })
}

/// A run folder of an older mtkd lacks the settings added since (`older.added`), and reading its
/// `config.toml` back fills them with today's defaults. Where a default is not what that mtkd
/// did, resuming with it would change the run mid-way. `cfg` with each such setting set to the
/// behaviour the folder ran with, `None` when none applies:
///
/// - `distill.agent.advantage`: `"running-rms"` (before it existed the advantage was the
///   centred credit over one running RMS; `"auto"` is per-sample on segmentation);
/// - `distill.agent.unlabelled_ce`: `"pseudo"`, on a run with unlabelled samples (before it
///   existed the label-reading features read the teachers' pseudo-targets there);
/// - `distill.agent.location_quiz`: `"focal"`, on detection (the quiz before it existed, and
///   the only value left out of a folder's config while it was written only when not focal;
///   the one commit that left `"balanced-ce"` out instead, 322b35e, was replaced in the same
///   session and never landed).
///
/// Only a meta run reads them; `warn`: this process logs the warning (one rank of a
/// data-parallel job does).
/// The config hash is unchanged: the hash of an older folder is taken without the lines it
/// lacks ([`older_hash`]).
fn settings_of_an_older_run(
    cfg: &Config,
    older: Option<&OlderFolder>,
    dir: &Path,
    warn: bool,
) -> Option<Config> {
    use mtkd_distill_core::signals::LocationQuiz;
    use mtkd_rl_weighting::agent::{Advantage, UnlabelledCe};
    let added = &older?.added;
    let lacks = |key: &str| added.iter().any(|k| k == key);
    let mut pinned = cfg.clone();
    let agent = pinned.distill.as_mut()?.agent.as_mut()?;
    if agent.mode != mtkd_rl_weighting::agent::Mode::Meta {
        return None;
    }
    let mut kept = Vec::new();
    if lacks("distill.agent.advantage") && agent.advantage == Advantage::Auto {
        agent.advantage = Advantage::RunningRms;
        kept.push("advantage = \"running-rms\"");
    }
    if lacks("distill.agent.unlabelled_ce")
        && cfg.data.has_unlabelled()
        && agent.unlabelled_ce == UnlabelledCe::Neutral
    {
        agent.unlabelled_ce = UnlabelledCe::Pseudo;
        kept.push("unlabelled_ce = \"pseudo\"");
    }
    if lacks("distill.agent.location_quiz")
        && cfg.data.task() == mtkd_vision_tasks::task::TaskKind::Detection
        && agent.location_quiz == LocationQuiz::BalancedCe
    {
        agent.location_quiz = LocationQuiz::Focal;
        kept.push("location_quiz = \"focal\"");
    }
    if kept.is_empty() {
        return None;
    }
    if warn {
        tracing::warn!(
            "{} predates these [distill.agent] settings and resumes with what it ran with, not \
         today's defaults: {}",
            dir.display(),
            kept.join(", ")
        );
    }
    Some(pinned)
}

/// Run (or resume) the run whose folder is `dir`.
pub fn run(cfg: &Config, dir: &Path, opts: &RunOptions, obs: &mut dyn Observer) -> Result<Outcome> {
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let comm = opts.comm.clone().filter(|c| c.world() > 1);
    let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let device = match &comm {
        // One GPU per rank of a machine: `cuda` or `cuda:N` means the rank's local GPU.
        Some(c) if cfg.run.device.starts_with("cuda") => {
            device_of(&format!("cuda:{}", c.local_rank()))?
        }
        _ => device_of(&cfg.run.device)?,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One process per run folder, for the whole run (released when this returns or the
    // process ends); data-parallel: rank 0 holds it for the job.
    let _lock = if writer {
        Some(crate::fsio::DirLock::try_acquire(dir, "run folder")?)
    } else {
        None
    };
    let (mut config_hash, older) = if writer {
        write_resolved_config(dir, cfg)?
    } else {
        let text = toml::to_string_pretty(cfg).context("serialising the resolved config")?;
        let path = dir.join("config.toml");
        let older = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| older_hash(&old, &text, &path, false));
        (stable_hash(text.as_bytes()), older)
    };
    let pinned;
    let cfg = match settings_of_an_older_run(cfg, older.as_ref(), dir, writer) {
        Some(c) => {
            pinned = c;
            &pinned
        }
        None => cfg,
    };
    if comm.is_some() && cfg.distill.as_ref().is_some_and(|d| d.prune.is_some()) {
        bail!(
            "[distill.prune] does not run data-parallel yet (each rank would judge the teachers \
             on its own part of the data): train it in one process"
        );
    }
    // A changed configuration is refused before any work (data, teachers).
    let ckpt_dir = dir.join("checkpoints");
    if let Some(theirs) = checkpoint::latest_config_hash(&ckpt_dir) {
        // A folder of an older mtkd resumes with the hash its checkpoints were made with.
        if older.as_ref().map(|o| o.hash.as_str()) == Some(theirs.as_str()) {
            config_hash = theirs.clone();
        }
        if theirs != config_hash {
            bail!(
                "the checkpoints in {} belong to another configuration than {} (was it edited \
                 after the run started?); put the configuration back or start a new run",
                ckpt_dir.display(),
                dir.join("config.toml").display()
            );
        }
    }
    obs.phase("loading data");
    let data = Datasets::load(&cfg.data)?;
    // Without teachers, unlabelled samples have nothing to teach (docs/METHOD.md section 15).
    let (data, pool) = if cfg.uses_teachers() {
        // Data-parallel: rank 0 trains or exports missing teachers into the cache first; the
        // other ranks then find them there.
        let first = comm.as_ref().is_some_and(|c| c.rank() == 0);
        if let Some(c) = comm.as_ref().filter(|_| !first) {
            c.barrier()?;
        }
        let pool = build_pool(cfg, &data, device, obs);
        if let Some(c) = comm.as_ref().filter(|_| first) {
            c.barrier()?;
        }
        (data, pool?)
    } else {
        (data.labelled_only(), Vec::new())
    };
    let mut trainer = Trainer::new(cfg, data, pool, device, dir.to_path_buf(), config_hash)?;
    if let Some(c) = comm {
        trainer.step.data_parallel(c);
        trainer.writer = writer;
    }
    trainer.fit(opts, obs)
}

/// The task a config trains.
pub fn task_of(cfg: &Config) -> Box<dyn Task> {
    let d = cfg.distill.as_ref();
    let side = detection_side(&cfg.data);
    mtkd_vision_tasks::task::task_of(
        cfg.data.task(),
        &mtkd_vision_tasks::task::TaskParams {
            dense_kd: d.map(|d| d.dense_kd).unwrap_or_default(),
            image: (side, side),
            box_kd_weight: d.map(|d| d.box_kd_weight).unwrap_or(1.0),
        },
    )
}

/// The side of a detection dataset's (square) images: the scenes' size or `image_size`.
pub fn detection_side(data: &crate::config::DataConfig) -> i64 {
    // The side is in the config: no need to look the folder up.
    i64::from(data.source(&data.root).square_side())
}

/// The loop of one run: epochs of [`DistillStep`]s, evaluation, records, checkpoints.
struct Trainer<'a> {
    cfg: &'a Config,
    data: Datasets,
    dir: PathBuf,
    config_hash: String,
    label: String,
    /// The student, its optimizer, the pool and its teacher source, the distiller.
    step: DistillStep,
    /// What the run keeps of the teachers' weights (per class, the audit, `weights.csv`).
    records: WeightRecords,
    /// Batches per training epoch (the skip budget is a share of them).
    epoch_batches: usize,
    /// Whether this process writes the run folder (data-parallel: rank 0 only).
    writer: bool,
}

impl<'a> Trainer<'a> {
    fn new(
        cfg: &'a Config,
        data: Datasets,
        pool: Vec<PoolMember>,
        device: Device,
        dir: PathBuf,
        config_hash: String,
    ) -> Result<Self> {
        let step = DistillStep::new(cfg, pool, &data, device)?;
        let label = if step.pool.is_empty() {
            format!("{}", cfg.student.arch)
        } else {
            format!("{} <- {} teachers", cfg.student.arch, step.pool.len())
        };
        Ok(Trainer {
            cfg,
            data,
            dir,
            config_hash,
            label,
            step,
            records: WeightRecords::default(),
            epoch_batches: 0,
            writer: true,
        })
    }

    /// Keep the teachers' outputs in memory across epochs when the config asks for it
    /// (`distill.output_cache_mb`).
    fn open_output_cache(&mut self) -> Result<()> {
        self.step.open_output_cache(self.data.train.len())
    }

    fn with_label(mut self, label: String) -> Self {
        self.label = label;
        self
    }

    /// Evaluate the student on the test split.
    fn evaluate(&self, loader: &BatchLoader) -> Result<(MetricReport, f64)> {
        evaluate(
            &|x| Ok(self.step.student.forward_t(x, false)),
            loader,
            self.step.device,
            self.step.task.as_ref(),
            self.data.train.num_classes,
        )
    }

    /// Resume from the last checkpoint, or start: the checkpoint's state and bookkeeping.
    fn start(&mut self, ckpt_dir: &Path, obs: &mut dyn Observer) -> Result<Meta> {
        let cfg = self.cfg;
        let Some((tensors, meta)) = checkpoint::load_latest(ckpt_dir)? else {
            if let (Some(init), true) = (&cfg.student.init, cfg.student.init_strategy) {
                state::init_strategy_from(&mut self.step, init)?;
            }
            return Ok(Meta {
                epoch: 0,
                step: 0,
                history: Vec::new(),
                elapsed_seconds: 0.0,
                config_hash: self.config_hash.clone(),
                strategy_json: String::new(),
                active_teachers: None,
                prune_counts: Vec::new(),
            });
        };
        if meta.config_hash != self.config_hash {
            bail!(
                "the checkpoints in {} belong to another configuration",
                ckpt_dir.display()
            );
        }
        if let Some(active) = meta.active_teachers.clone() {
            self.step.set_active(active)?;
        }
        if !meta.prune_counts.is_empty() {
            self.step.pool.prune_counts = meta.prune_counts.clone();
        }
        state::restore(&mut self.step, tensors, &meta.strategy_json)?;
        tracing::info!(dir = %self.dir.display(), epoch = meta.epoch, "resuming from checkpoint");
        obs.phase(&format!(
            "resuming {} after epoch {}",
            self.dir.display(),
            meta.epoch
        ));
        Ok(meta)
    }

    fn fit(mut self, opts: &RunOptions, obs: &mut dyn Observer) -> Result<Outcome> {
        let cfg = self.cfg;
        let tc = &cfg.train;
        let ckpt_dir = self.dir.join("checkpoints");
        let mut meta = self.start(&ckpt_dir, obs)?;
        let distils = self.step.distiller.settings().is_some();
        match &opts.teacher_outputs {
            Some(root) if distils => {
                let files: Vec<PathBuf> = self
                    .step
                    .pool
                    .members
                    .iter()
                    .map(|p| p.file.clone())
                    .collect();
                let dir = crate::shared::key_dir(root, cfg, &files, self.step.device)?;
                let part = self.step.comm().map(|c| (c.rank(), c.world()));
                self.step.source = Box::new(Shared::new(dir, part));
            }
            // Shared outputs serve every epoch: with them, an in-memory cache would never be read.
            _ => self.open_output_cache()?,
        }
        if let Some(c) = self.step.comm() {
            // Every rank starts from rank 0's state. After a resume each has read the
            // checkpoint itself: the ranks first check that they read the same one (epoch, step,
            // the strategy's bookkeeping), then take rank 0's tensors.
            let json = stable_hash(meta.strategy_json.as_bytes());
            let json_bits = u64::from_str_radix(&json[..json.len().min(13)], 16).unwrap_or(0);
            let read = Tensor::from_slice(&[meta.epoch as f64, meta.step as f64, json_bits as f64]);
            mtkd_dist::check_same(
                c,
                "the checkpoint each rank resumed from (epoch, step, strategy state)",
                &[read],
            )?;
            mtkd_dist::broadcast_tensors(c, &state::replicated_state(&self.step)?)?;
        }
        let mut sink = if self.writer {
            Some(MetricsSink::create(
                &self.dir.join("metrics.jsonl"),
                &meta.history,
            )?)
        } else {
            None
        };
        if cfg.run.weight_log && !self.step.pool.is_empty() && self.writer {
            self.records.weight_log = Some(weights::open_weight_log(
                &self.dir,
                &self.step.pool,
                meta.epoch,
            )?);
        }
        let mut train_loader = self
            .data
            .train_loader(&cfg.data, tc.batch_size, cfg.run.seed)?;
        if let Some(c) = self.step.comm() {
            train_loader = train_loader.sharded(c.rank(), c.world());
        }
        let test_loader = self.data.test_loader(&cfg.data, tc.eval_batch_size)?;
        self.epoch_batches = train_loader.num_batches();
        let session_start = Instant::now();
        let elapsed_before = meta.elapsed_seconds;
        let mut session_steps = 0u64;
        let mut last_report: Option<MetricReport> = None;
        for epoch in meta.epoch..tc.epochs {
            let t0 = Instant::now();
            let lr = multistep_lr(tc.lr, &tc.milestones, tc.gamma, epoch);
            obs.epoch_start(
                &self.label,
                epoch + 1,
                tc.epochs,
                train_loader.num_batches(),
            );
            self.step.start_epoch(epoch, lr)?;
            self.records.start_epoch();
            let mut sums = Sums::new(self.step.device, self.step.pool.len());
            for batch in train_loader.epoch(epoch as u64, 0, self.step.device) {
                if let Some(limit) = opts.halt_after_steps {
                    if session_steps >= limit {
                        return Err(anyhow::Error::new(Interrupted(session_steps)));
                    }
                }
                if self.stop_level()? >= 2 {
                    return Err(anyhow::Error::new(Stopped {
                        dir: self.dir.clone(),
                        completed: epoch,
                        mid_epoch: true,
                    }));
                }
                match self.step.run(&batch, &mut sums, epoch, meta.step)? {
                    StepOutcome::Applied(distilled) => {
                        if let Some(d) = distilled {
                            let last = epoch + 1 == tc.epochs;
                            self.records.add(
                                &d,
                                &batch,
                                self.data.num_classes(),
                                &self.step.pool.active,
                                (epoch, meta.step, last),
                            )?;
                        }
                        meta.step += 1;
                        session_steps += 1;
                    }
                    StepOutcome::NonFinite(what) => {
                        self.non_finite(epoch, meta.step, &what, &mut sums)?
                    }
                }
                let show = sums.batches.is_multiple_of(20);
                obs.batch(show.then_some(sums.last_loss));
            }
            let cached_batches = self.step.end_epoch(epoch)?;
            if let Some(c) = self.step.comm() {
                sums.all_reduce(c)?;
                self.step.average_buffers()?;
                let tensors = state::replicated_state(&self.step)?;
                mtkd_dist::check_same(
                    c,
                    &format!(
                        "the student, adapters, optimizer and strategy state after epoch {}",
                        epoch + 1
                    ),
                    &tensors,
                )?;
            }
            let (report, test_loss) = self.evaluate(&test_loader)?;
            let mut rec = sums.record(
                epoch + 1,
                lr,
                &report,
                test_loss,
                t0.elapsed().as_secs_f64(),
            );
            rec.strategy_metrics = self
                .step
                .distiller
                .strategy
                .take_epoch_metrics()
                .into_iter()
                .collect();
            rec.cached_batches = cached_batches;
            self.records
                .class_weights_into(&mut rec, self.step.pool.len())?;
            // The strategy's columns are the current pool's; the record's the full pool's.
            rec.class_credit = self
                .step
                .distiller
                .strategy
                .take_class_credit()
                .iter()
                .map(|row| self.step.pool.row_to_full(row))
                .collect();
            if self.step.pool.active.len() < self.step.pool.len() {
                rec.active_teachers = Some(self.step.pool.active_names());
            }
            rec.pruned = self.prune_after_epoch(&rec)?;
            if self.step.pool.active.len() < self.step.pool.len() {
                meta.active_teachers = Some(self.step.pool.active.clone());
            }
            if cfg.distill.as_ref().is_some_and(|d| d.prune.is_some()) {
                meta.prune_counts = self.step.pool.prune_counts.clone();
            }
            meta.epoch = epoch + 1;
            meta.history.push(rec.clone());
            meta.elapsed_seconds = elapsed_before + session_start.elapsed().as_secs_f64();
            self.records.sync_weight_log()?;
            let (strategy_tensors, strategy_json) = state::strategy_state(&self.step)?;
            meta.strategy_json = strategy_json;
            let mut tensors = state::state_tensors(&self.step);
            tensors.extend(strategy_tensors);
            if self.writer {
                checkpoint::save(&ckpt_dir, &tensors, &meta, 0)
                    .with_context(|| format!("checkpointing epoch {}", epoch + 1))?;
            }
            if let Some(sink) = sink.as_mut() {
                sink.append(&rec)?;
            }
            tracing::info!(
                epoch = epoch + 1,
                test = rec.test.value,
                metric = %rec.test.primary,
                train_loss = rec.train_loss,
                "epoch done"
            );
            obs.epoch_end(&rec);
            last_report = Some(report);
            if self.stop_level()? >= 1 && epoch + 1 < tc.epochs {
                return Err(anyhow::Error::new(Stopped {
                    dir: self.dir.clone(),
                    completed: epoch + 1,
                    mid_epoch: false,
                }));
            }
        }
        // A run resumed after its last epoch re-evaluates to fill the summary.
        let report = match last_report {
            Some(r) => r,
            None => self.evaluate(&test_loader)?.0,
        };
        self.finish(&meta, &report)
    }

    /// The stop request ([`crate::stop`]); data-parallel ranks agree on the highest of theirs,
    /// so that they all stop at the same step or epoch (a signal may reach them one by one).
    fn stop_level(&self) -> Result<u8> {
        let mine = crate::stop::level();
        let Some(c) = self.step.comm() else {
            return Ok(mine);
        };
        let mut any = [
            f64::from(u8::from(mine >= 1)),
            f64::from(u8::from(mine >= 2)),
        ];
        mtkd_dist::all_reduce_f64(c, &mut any)?;
        Ok(if any[1] > 0.0 {
            2
        } else if any[0] > 0.0 {
            1
        } else {
            0
        })
    }

    /// `[distill.prune]` at the end of an epoch: the teachers whose weight stayed low leave
    /// the pool (never below `min_teachers`). Returns the names that left.
    fn prune_after_epoch(&mut self, rec: &EpochRecord) -> Result<Vec<String>> {
        let Some(p) = self.step.distiller.settings().and_then(|d| d.prune.clone()) else {
            return Ok(Vec::new());
        };
        let leaving = weights::leaving(&mut self.step.pool, &p, rec);
        if leaving.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = leaving
            .iter()
            .map(|&(_, i)| self.step.pool.members[i].teacher.name().to_owned())
            .collect();
        let active: Vec<usize> = self
            .step
            .pool
            .active
            .iter()
            .copied()
            .filter(|i| !leaving.iter().any(|&(_, g)| g == *i))
            .collect();
        self.step.set_active(active)?;
        for (n, (w, _)) in names.iter().zip(&leaving) {
            tracing::info!(teacher = %n, epoch = rec.epoch, mean_weight = w, threshold = p.threshold,
                "teacher leaves the pool (distill.prune)");
        }
        Ok(names)
    }

    /// A non-finite loss under `train.on_nonfinite`: stop with what was not finite, or skip
    /// the batch within `train.skip_budget`.
    fn non_finite(&self, epoch: usize, step: u64, what: &str, sums: &mut Sums) -> Result<()> {
        let ckpt_dir = self.dir.join("checkpoints");
        let kept = if checkpoint::any(&ckpt_dir) {
            format!(
                "The last good checkpoint is kept in {} (mtkd train --resume {} continues from it)",
                ckpt_dir.display(),
                self.dir.display()
            )
        } else {
            "No epoch finished, so there is no checkpoint".to_owned()
        };
        match self.cfg.train.on_nonfinite {
            NonFinitePolicy::Stop => bail!(
                "non-finite loss at epoch {} (global step {}): {what} is NaN or infinite. {kept}; \
                 {}",
                epoch + 1,
                step,
                non_finite_advice(what)
            ),
            NonFinitePolicy::Skip => {
                tracing::warn!(
                    epoch = epoch + 1,
                    step,
                    what,
                    "non-finite loss: batch skipped"
                );
                sums.skipped += 1;
                sums.batches += 1;
                *sums.skip_causes.entry(what.to_owned()).or_default() += 1;
                let budget = self.cfg.train.skip_budget;
                let allowed = (budget * self.epoch_batches as f64).floor() as usize;
                if sums.skipped > allowed {
                    let mut causes: Vec<(&String, &usize)> = sums.skip_causes.iter().collect();
                    causes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                    bail!(
                        "train.on_nonfinite = \"skip\": {} of the {} batches of epoch {} had a non-finite \
                         loss, over train.skip_budget = {budget} ({allowed} batches). Cause: {}. {kept}",
                        sums.skipped,
                        self.epoch_batches,
                        epoch + 1,
                        causes
                            .iter()
                            .map(|(w, n)| format!("{w} ({n} batches)"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Ok(())
            }
        }
    }

    /// The run's summary.json.
    fn summary(&self, meta: &Meta, report: &MetricReport) -> Summary {
        let dir = &self.dir;
        // The first epoch with the highest primary metric.
        let best_rec = meta
            .history
            .iter()
            .fold(None::<&EpochRecord>, |a, r| match a {
                Some(a) if a.test.value >= r.test.value => Some(a),
                _ => Some(r),
            });
        let (best_epoch, best, best_report) = match best_rec {
            Some(r) => (r.epoch, r.test.value, r.test.clone()),
            None => (0, f64::MIN, report.clone()),
        };
        Summary {
            run: dir.display().to_string(),
            strategy: if self.step.distiller.settings().is_some() {
                self.step.distiller.strategy.name().to_owned()
            } else {
                "no-kd".into()
            },
            student: if self.cfg.student.head != mtkd_student::HeadKind::Classifier {
                format!("{} + {}", self.cfg.student.arch, self.cfg.student.head)
            } else {
                self.cfg.student.arch.to_string()
            },
            student_parameters: mtkd_student::arch::parameter_count(&self.step.student_vs),
            seed: self.cfg.run.seed,
            metric: report.primary.clone(),
            final_value: report.value,
            best_value: best,
            best_epoch,
            final_report: report.clone(),
            best_report,
            epochs: meta.epoch,
            wall_seconds: meta.elapsed_seconds,
            teachers: self
                .step
                .pool
                .members
                .iter()
                .map(|p| TeacherSummary {
                    name: p.teacher.name().to_owned(),
                    source: p.source.clone(),
                    test_value: p.test_value,
                })
                .collect(),
            mtkd_version: env!("CARGO_PKG_VERSION").to_owned(),
            device: format!("{:?}", self.step.device),
            peak_rss_mb: crate::record::peak_rss_mb(),
            labelled: self.data.labelled,
            init: self.cfg.student.init.as_ref().map(|p| {
                format!(
                    "{}{}",
                    p.display(),
                    if self.cfg.student.init_strategy {
                        " (strategy state included)"
                    } else {
                        ""
                    }
                )
            }),
        }
    }

    fn finish(mut self, meta: &Meta, report: &MetricReport) -> Result<Outcome> {
        if !self.writer {
            // Data-parallel: rank 0 writes the folder's files.
            return Ok(Outcome {
                summary: self.summary(meta, report),
                dir: self.dir.clone(),
            });
        }
        let dir = &self.dir;
        let weights = dir.join("student.safetensors");
        let named = state::contiguous_vars(&self.step.student_vs);
        crate::fsio::write_atomic_with(&weights, |tmp| {
            Tensor::write_safetensors(&named, tmp).map_err(|e| e.to_string().into())
        })?;
        export_torchscript(
            &self.step.student,
            &self.step.student_vs,
            dir.join("student.pt"),
        )?;
        let names = self.step.pool.names();
        crate::plot::plot_run(&dir.join("plots"), &meta.history, &names)?;
        let run = export::FinishedRun {
            cfg: self.cfg,
            data: &self.data,
            dir,
            step: &self.step,
        };
        run.task_outputs(report)?;
        if !self.records.audit.is_empty() {
            let dense =
                self.step.task().kind() != mtkd_vision_tasks::task::TaskKind::Classification;
            let mut audit = crate::audit::finish(
                &self.records.audit,
                &self.data.train,
                &names,
                self.cfg.train.epochs,
                dense,
            )?;
            if dense {
                // The page's samples (one per image), not the raw candidates.
                let indices: Vec<usize> = audit
                    .samples
                    .iter()
                    .take(crate::audit::PICTURED)
                    .map(|c| c.index)
                    .collect();
                let pictures = dir.join("plots").join("audit");
                std::fs::create_dir_all(&pictures)
                    .with_context(|| format!("cannot create {}", pictures.display()))?;
                if run.train_picture(&indices, &pictures)? {
                    audit.overlays_png_base64 = crate::audit::picture_base64(&pictures)?;
                }
            }
            write_json_atomic(&dir.join("audit.json"), &audit)?;
        }
        self.records.sync_weight_log()?;
        let summary = self.summary(meta, report);
        write_json_atomic(&dir.join("summary.json"), &summary)?;
        // The audit page is a view of the files above: a failure is reported, the run stands.
        match crate::report::write_report(dir) {
            Ok(path) => tracing::info!(report = %path.display(), "audit report written"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the audit report could not be written")
            }
        }
        Ok(Outcome {
            dir: dir.clone(),
            summary,
        })
    }
}
