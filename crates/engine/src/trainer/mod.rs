//! The training loop shared by every task and strategy: data -> student (+ teachers, adapters,
//! weighting strategy) -> loss -> SGD step, evaluation every epoch, an atomic checkpoint per
//! epoch, exact resume, and the run folder's records (metrics.jsonl, summary.json, plots,
//! exported student).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, Meta};
use crate::config::{Config, DistillConfig, NonFinitePolicy, StrategyKind, TeacherConfig};
use crate::dataset::Datasets;
use crate::optim::{multistep_lr, Sgd};
use crate::record::{write_json_atomic, EpochRecord, MetricsSink, Summary, TeacherSummary};
use crate::shared::{EpochOutputs, Layout};
use mtkd_distill_core::adapter::Adapter;
use mtkd_distill_core::loss;
use mtkd_distill_core::signals::StudentHead;
use mtkd_distill_core::weighting::{
    Equal, EqualOnesWarmup, Feedback, NoKd, Single, StrategyState, TeacherWeights,
    WeightingStrategy,
};
use mtkd_distill_core::{ModelOutput, Precision, Teacher};
use mtkd_student::{NativeTeacher, Network};
use mtkd_teachers::{Expectation, TorchScriptTeacher};
use mtkd_vision_tasks::loader::{Batch, BatchLoader};
use mtkd_vision_tasks::task::{MetricReport, Task};

pub mod bench;
mod cache;
mod evaluate;
mod export;
mod pool;
mod state;
mod step;
mod strategy;
mod weights;

pub use evaluate::evaluate;
use evaluate::Sums;
pub use export::export_torchscript;
use pool::{build_pool, pool_layout, teacher_outputs, teacher_outputs_of, PoolMember};
pub use pool::{
    prepare_teachers, share_teacher_outputs, teacher_config, teacher_head, TeacherPass, TooLarge,
};
use state::{init_weights, trainable};

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

/// Write the resolved config into the run folder (before the first step).
pub fn write_resolved_config(dir: &Path, cfg: &Config) -> Result<String> {
    let text = toml::to_string_pretty(cfg).context("serialising the resolved config")?;
    let path = dir.join("config.toml");
    if path.exists() {
        let old = std::fs::read_to_string(&path)?;
        if old != text {
            bail!(
                "{} was made with another configuration; resume it with its own config (mtkd train --resume {}) or start a new run",
                dir.display(),
                dir.display()
            );
        }
    } else {
        crate::fsio::write_atomic(&path, text.as_bytes())?;
    }
    Ok(stable_hash(text.as_bytes()))
}

/// Run (or resume) the run whose folder is `dir`.
pub fn run(cfg: &Config, dir: &Path, opts: &RunOptions, obs: &mut dyn Observer) -> Result<Outcome> {
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let device = device_of(&cfg.run.device)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // One process per run folder, for the whole run (released when this returns or the
    // process ends).
    let _lock = crate::fsio::DirLock::try_acquire(dir, "run folder")?;
    let config_hash = write_resolved_config(dir, cfg)?;
    obs.phase("loading data");
    let data = Datasets::load(&cfg.data)?;
    let pool = if cfg.uses_teachers() {
        build_pool(cfg, &data, device, obs)?
    } else {
        Vec::new()
    };
    Trainer::new(cfg, data, pool, device, dir.to_path_buf(), config_hash)?.fit(opts, obs)
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
    match data.kind {
        crate::config::DatasetKind::SyntheticDetection => {
            data.scenes.as_ref().map(|s| s.size as i64).unwrap_or(0)
        }
        _ => data.image_size.map(i64::from).unwrap_or(0),
    }
}

struct Trainer<'a> {
    cfg: &'a Config,
    /// What the loop trains: the task's loss, KD, signals and metric.
    task: Box<dyn Task>,
    data: Datasets,
    pool: Vec<PoolMember>,
    device: Device,
    dir: PathBuf,
    config_hash: String,
    label: String,
    student_vs: VarStore,
    student: Network,
    adapter_vs: VarStore,
    adapters: Vec<Adapter>,
    strategy: Box<dyn WeightingStrategy>,
    opt: Sgd,
    /// Sums of logit and feature weights `[K, M]` (full pool order) and sample counts `[K]`
    /// per class over the current epoch.
    per_class: Option<(Tensor, Tensor, Tensor)>,
    /// Positions (full pool order) of the teachers still in the pool (`[distill.prune]`).
    active: Vec<usize>,
    /// Per teacher: consecutive epochs under the pruning threshold.
    prune_counts: Vec<usize>,
    /// The last epoch's most disagreed-on training samples (for `audit.json`).
    audit: Vec<crate::audit::Candidate>,
    /// `weights.csv` when `run.weight_log` is on.
    weight_log: Option<std::io::BufWriter<std::fs::File>>,
    /// Folder of the shared teacher outputs for this run's batches (`RunOptions::teacher_outputs`).
    shared: Option<PathBuf>,
    /// Batches per training epoch (the skip budget is a share of them).
    epoch_batches: usize,
    /// The non-trainable variables of the student and the adapters (BatchNorm's running
    /// statistics), shallow handles: put back after a skipped batch.
    buffers: Vec<Tensor>,
    /// The teachers' outputs kept across epochs (`distill.output_cache_mb`).
    output_cache: Option<cache::OutputCache>,
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
        tch::manual_seed(cfg.run.seed as i64);
        let in_shape = data.input_shape(&cfg.data)?;
        let student_vs = VarStore::new(device);
        let student = Network::with_head(
            &student_vs.root(),
            cfg.student.arch,
            cfg.student.head,
            in_shape,
            data.num_classes(),
        )
        .with_context(|| format!("building student {}", cfg.student.arch))?;
        let mut student_vs = student_vs;
        if let Some(init) = &cfg.student.init {
            let file = init_weights(init, cfg.student.arch)?;
            student_vs.load(&file).with_context(|| {
                format!(
                    "student.init: loading {} into a {} student",
                    file.display(),
                    cfg.student.arch
                )
            })?;
            tracing::info!(from = %file.display(), "student initialised from earlier weights");
        }
        let adapter_vs = VarStore::new(device);
        let mut adapters = Vec::new();
        let distill = cfg.distill.clone();
        if distill
            .as_ref()
            .is_some_and(|d| d.feature_weight > 0.0 && d.strategy != StrategyKind::None)
        {
            for (m, member) in pool.iter().enumerate() {
                let shape = member.teacher.feature_shape().ok_or_else(|| {
                    anyhow!(
                        "teacher `{}` gives logits only, but distill.feature_weight > 0 asks for feature KD; \
                         set distill.feature_weight = 0 or use a teacher that returns its feature map",
                        member.teacher.name()
                    )
                })?;
                adapters.push(Adapter::new(
                    &(adapter_vs.root() / m),
                    student.feature_shape(),
                    shape,
                ));
            }
        }
        if cfg.run.channels_last && device == Device::Cpu {
            state::relay_channels_last(&student_vs);
            state::relay_channels_last(&adapter_vs);
        }
        let strategy = strategy::build(cfg, &pool, data.num_classes(), device)?;
        let mut params = Vec::new();
        for (name, t) in trainable(&student_vs) {
            params.push((format!("student.{name}"), t));
        }
        for (name, t) in trainable(&adapter_vs) {
            params.push((format!("adapter.{name}"), t));
        }
        let t = &cfg.train;
        let opt = Sgd::new(params, t.lr, t.momentum, t.nesterov, t.weight_decay);
        let label = if pool.is_empty() {
            format!("{}", cfg.student.arch)
        } else {
            format!("{} <- {} teachers", cfg.student.arch, pool.len())
        };
        let m = pool.len();
        let mut tr = Trainer {
            task: task_of(cfg),
            per_class: None,
            active: (0..m).collect(),
            prune_counts: vec![0; m],
            audit: Vec::new(),
            weight_log: None,
            shared: None,
            output_cache: None,
            epoch_batches: 0,
            buffers: student_vs
                .variables()
                .into_values()
                .chain(adapter_vs.variables().into_values())
                .filter(|t| !t.requires_grad())
                .collect(),
            cfg,
            data,
            pool,
            device,
            dir,
            config_hash,
            label,
            student_vs,
            student,
            adapter_vs,
            adapters,
            strategy,
            opt,
        };
        // Single-teacher KD inside a pool runs only its teacher: the others would get weight 0
        // (docs/ARCHITECTURE.md, performance).
        if m > 1
            && tr
                .distill()
                .is_some_and(|d| d.strategy == StrategyKind::Single)
        {
            let idx = strategy::single_teacher(cfg, &tr.pool)?;
            tr.set_active(vec![idx])?;
        }
        Ok(tr)
    }

    /// Allocate the teacher output cache when the config asks for one (`distill.output_cache_mb`).
    fn open_output_cache(&mut self) -> Result<()> {
        if let Some(mb) = self
            .distill()
            .map(|d| d.output_cache_mb)
            .filter(|&mb| mb > 0)
        {
            self.output_cache = Some(cache::OutputCache::new(
                self.data.train.len(),
                &self.layout(),
                mb,
                self.device,
            )?);
        }
        Ok(())
    }

    fn with_label(mut self, label: String) -> Self {
        self.label = label;
        self
    }

    /// What a shared-output record holds for this run's pool.
    fn layout(&self) -> Layout {
        pool_layout(self.cfg, &self.pool, self.student.in_shape())
    }

    fn distill(&self) -> Option<&DistillConfig> {
        self.cfg
            .distill
            .as_ref()
            .filter(|d| d.strategy != StrategyKind::None && !self.pool.is_empty())
    }

    fn fit(mut self, opts: &RunOptions, obs: &mut dyn Observer) -> Result<Outcome> {
        let cfg = self.cfg;
        let tc = &cfg.train;
        let ckpt_dir = self.dir.join("checkpoints");
        let mut meta = match checkpoint::load_latest(&ckpt_dir)? {
            Some((tensors, meta)) => {
                if meta.config_hash != self.config_hash {
                    bail!(
                        "the checkpoints in {} belong to another configuration",
                        ckpt_dir.display()
                    );
                }
                if let Some(active) = meta.active_teachers.clone() {
                    self.set_active(active)?;
                }
                if !meta.prune_counts.is_empty() {
                    self.prune_counts = meta.prune_counts.clone();
                }
                self.restore(tensors, &meta.strategy_json)?;
                tracing::info!(dir = %self.dir.display(), epoch = meta.epoch, "resuming from checkpoint");
                obs.phase(&format!(
                    "resuming {} after epoch {}",
                    self.dir.display(),
                    meta.epoch
                ));
                meta
            }
            None => {
                if let (Some(init), true) = (&cfg.student.init, cfg.student.init_strategy) {
                    self.init_strategy_from(init)?;
                }
                Meta {
                    epoch: 0,
                    step: 0,
                    history: Vec::new(),
                    elapsed_seconds: 0.0,
                    config_hash: self.config_hash.clone(),
                    strategy_json: String::new(),
                    active_teachers: None,
                    prune_counts: Vec::new(),
                }
            }
        };
        if let (Some(root), Some(_)) = (&opts.teacher_outputs, self.distill()) {
            let files: Vec<PathBuf> = self.pool.iter().map(|p| p.file.clone()).collect();
            self.shared = Some(crate::shared::key_dir(root, cfg, &files, self.device)?);
        } else {
            // Shared outputs serve every epoch: with them, an in-memory cache would never be read.
            self.open_output_cache()?;
        }
        let mut sink = MetricsSink::create(&self.dir.join("metrics.jsonl"), &meta.history)?;
        if cfg.run.weight_log && !self.pool.is_empty() {
            self.weight_log = Some(self.open_weight_log(meta.epoch)?);
        }
        let train_loader = self
            .data
            .train_loader(&cfg.data, tc.batch_size, cfg.run.seed)?;
        let test_loader = self.data.test_loader(&cfg.data, tc.eval_batch_size)?;
        self.epoch_batches = train_loader.num_batches();
        let num_classes = self.data.train.num_classes;
        let task = task_of(cfg);
        let session_start = Instant::now();
        let elapsed_before = meta.elapsed_seconds;
        let mut session_steps = 0u64;
        let mut last_report: Option<MetricReport> = None;
        for epoch in meta.epoch..tc.epochs {
            let t0 = Instant::now();
            let lr = multistep_lr(tc.lr, &tc.milestones, tc.gamma, epoch);
            self.opt.lr = lr;
            obs.epoch_start(
                &self.label,
                epoch + 1,
                tc.epochs,
                train_loader.num_batches(),
            );
            self.strategy.start_epoch(epoch)?;
            self.per_class = None;
            self.audit.clear();
            let mut sums = Sums::new(self.device, self.pool.len());
            let mut shared = match &self.shared {
                Some(dir) => Some(EpochOutputs::open(dir, epoch, self.layout())?),
                None => None,
            };
            for batch in train_loader.epoch(epoch as u64, 0, self.device) {
                if let Some(limit) = opts.halt_after_steps {
                    if session_steps >= limit {
                        return Err(anyhow::Error::new(Interrupted(session_steps)));
                    }
                }
                if crate::stop::level() >= 2 {
                    return Err(anyhow::Error::new(Stopped {
                        dir: self.dir.clone(),
                        completed: epoch,
                        mid_epoch: true,
                    }));
                }
                let step_ok = self.step(&batch, &mut sums, shared.as_mut(), epoch, meta.step)?;
                if step_ok {
                    meta.step += 1;
                    session_steps += 1;
                }
                let show = sums.batches.is_multiple_of(20);
                obs.batch(show.then_some(sums.last_loss));
            }
            if let Some(shared) = shared {
                shared.finish()?;
            }
            let cached_batches = self.output_cache.as_mut().map(|c| {
                let (hits, misses) = c.take_counts();
                tracing::info!(
                    epoch = epoch + 1,
                    hits,
                    misses,
                    "teacher output cache (batches)"
                );
                hits
            });
            self.strategy.end_epoch(epoch)?;
            let (report, test_loss) = evaluate(
                &|x| Ok(self.student.forward_t(x, false)),
                &test_loader,
                self.device,
                task.as_ref(),
                num_classes,
            )?;
            let mut rec = sums.record(
                epoch + 1,
                lr,
                &report,
                test_loss,
                t0.elapsed().as_secs_f64(),
            );
            rec.strategy_metrics = self.strategy.take_epoch_metrics().into_iter().collect();
            rec.cached_batches = cached_batches;
            self.class_weights_into(&mut rec)?;
            if self.active.len() < self.pool.len() {
                rec.active_teachers = Some(self.active_names());
            }
            rec.pruned = self.prune_after_epoch(&rec)?;
            if self.active.len() < self.pool.len() {
                meta.active_teachers = Some(self.active.clone());
            }
            if cfg.distill.as_ref().is_some_and(|d| d.prune.is_some()) {
                meta.prune_counts = self.prune_counts.clone();
            }
            meta.epoch = epoch + 1;
            meta.history.push(rec.clone());
            meta.elapsed_seconds = elapsed_before + session_start.elapsed().as_secs_f64();
            if let Some(log) = &mut self.weight_log {
                log.flush()
                    .and_then(|()| log.get_ref().sync_data())
                    .context("writing weights.csv")?;
            }
            let (strategy_tensors, strategy_json) = self.strategy_state()?;
            meta.strategy_json = strategy_json;
            let mut tensors = self.state_tensors();
            tensors.extend(strategy_tensors);
            checkpoint::save(&ckpt_dir, &tensors, &meta, 0)
                .with_context(|| format!("checkpointing epoch {}", epoch + 1))?;
            sink.append(&rec)?;
            tracing::info!(
                epoch = epoch + 1,
                test = rec.test.value,
                metric = %rec.test.primary,
                train_loss = rec.train_loss,
                "epoch done"
            );
            obs.epoch_end(&rec);
            last_report = Some(report);
            if crate::stop::level() >= 1 && epoch + 1 < tc.epochs {
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
            None => {
                evaluate(
                    &|x| Ok(self.student.forward_t(x, false)),
                    &test_loader,
                    self.device,
                    task.as_ref(),
                    num_classes,
                )?
                .0
            }
        };
        self.finish(&meta, &report)
    }

    fn finish(mut self, meta: &Meta, report: &MetricReport) -> Result<Outcome> {
        let dir = &self.dir;
        let weights = dir.join("student.safetensors");
        let named = state::contiguous_vars(&self.student_vs);
        crate::fsio::write_atomic_with(&weights, |tmp| {
            Tensor::write_safetensors(&named, tmp).map_err(|e| e.to_string().into())
        })?;
        export_torchscript(&self.student, &self.student_vs, dir.join("student.pt"))?;
        let names: Vec<String> = self
            .pool
            .iter()
            .map(|p| p.teacher.name().to_owned())
            .collect();
        crate::plot::plot_run(&dir.join("plots"), &meta.history, &names)?;
        match self.task.kind() {
            mtkd_vision_tasks::task::TaskKind::Segmentation => self.segmentation_plots(report)?,
            mtkd_vision_tasks::task::TaskKind::Detection => self.detection_outputs(report)?,
            mtkd_vision_tasks::task::TaskKind::Classification => {}
        }
        if !self.audit.is_empty() {
            let audit =
                crate::audit::finish(&self.audit, &self.data.train, &names, self.cfg.train.epochs)?;
            write_json_atomic(&dir.join("audit.json"), &audit)?;
        }
        if let Some(log) = &mut self.weight_log {
            log.flush().context("writing weights.csv")?;
        }
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
        let summary = Summary {
            run: dir.display().to_string(),
            strategy: if self.distill().is_some() {
                self.strategy.name().to_owned()
            } else {
                "no-kd".into()
            },
            student: if self.cfg.student.head != mtkd_student::HeadKind::Classifier {
                format!("{} + {}", self.cfg.student.arch, self.cfg.student.head)
            } else {
                self.cfg.student.arch.to_string()
            },
            student_parameters: mtkd_student::arch::parameter_count(&self.student_vs),
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
                .pool
                .iter()
                .map(|p| TeacherSummary {
                    name: p.teacher.name().to_owned(),
                    source: p.source.clone(),
                    test_value: p.test_value,
                })
                .collect(),
            mtkd_version: env!("CARGO_PKG_VERSION").to_owned(),
            device: format!("{:?}", self.device),
            peak_rss_mb: crate::record::peak_rss_mb(),
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
        };
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
