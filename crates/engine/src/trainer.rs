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
use mtkd_distill_core::{ModelOutput, Teacher};
use mtkd_student::{NativeTeacher, Network};
use mtkd_teachers::{Expectation, TorchScriptTeacher};
use mtkd_vision_tasks::loader::{Batch, BatchLoader};
use mtkd_vision_tasks::task::{MetricReport, Task};

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

/// One teacher of the pool and where it came from.
struct PoolMember {
    teacher: Box<dyn Teacher>,
    source: String,
    /// The weights or TorchScript file the teacher was loaded from.
    file: PathBuf,
    /// The teacher's primary test metric.
    test_value: Option<f64>,
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

/// Every teacher's output for a batch.
fn teacher_outputs(pool: &[PoolMember], images: &Tensor) -> Result<Vec<ModelOutput>> {
    let all: Vec<usize> = (0..pool.len()).collect();
    teacher_outputs_of(pool, &all, images)
}

/// The outputs of the teachers at `which` (pool positions), in that order.
fn teacher_outputs_of(
    pool: &[PoolMember],
    which: &[usize],
    images: &Tensor,
) -> Result<Vec<ModelOutput>> {
    which
        .iter()
        .map(|&i| &pool[i])
        .map(|p| {
            p.teacher
                .forward(images)
                .with_context(|| format!("teacher `{}`", p.teacher.name()))
        })
        .collect()
}

/// The task a config trains.
pub fn task_of(cfg: &Config) -> Box<dyn Task> {
    let dense_kd = cfg.distill.as_ref().map(|d| d.dense_kd).unwrap_or_default();
    mtkd_vision_tasks::task::task_of(cfg.data.task(), dense_kd)
}

fn pool_layout(cfg: &Config, pool: &[PoolMember], input: (i64, i64, i64)) -> Layout {
    let features = crate::shared::with_features(cfg);
    let k = pool.first().map(|p| p.teacher.num_classes()).unwrap_or(0);
    Layout {
        logits: task_of(cfg).logits_shape(k, (input.1, input.2)),
        features: pool
            .iter()
            .map(|p| p.teacher.feature_shape().filter(|_| features))
            .collect(),
    }
}

/// How long a teacher pass took.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TeacherPass {
    /// Seconds per epoch for the epochs this pass computed (empty when all were stored).
    pub seconds: Vec<f64>,
    /// Peak resident memory of the process, in MB.
    pub peak_rss_mb: Option<f64>,
}

/// Returned (as the error's root cause) by [`share_teacher_outputs`] when the outputs of all
/// epochs would take more than the allowed bytes.
#[derive(Debug, thiserror::Error)]
#[error(
    "the teacher outputs would take {:.1} GB ({}), over the limit of {:.1} GB",
    *bytes as f64 / 1e9,
    dir.display(),
    *max as f64 / 1e9
)]
pub struct TooLarge {
    pub bytes: u64,
    pub max: u64,
    pub dir: PathBuf,
}

/// Compute the teachers' outputs on every training batch of `cfg` (all epochs) and store them
/// under `root` for runs that share them (`mtkd share-teachers`); stored epochs are kept. Also
/// writes `pass.json` (a [`TeacherPass`]) into the key folder. Returns the key folder. With
/// `max_bytes`, refuses ([`TooLarge`]) before any work when all epochs would take more.
pub fn share_teacher_outputs(
    cfg: &Config,
    root: &Path,
    max_bytes: Option<u64>,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, TeacherPass)> {
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    if !cfg.uses_teachers() {
        bail!("the config's strategy uses no teachers: there are no outputs to share");
    }
    let device = device_of(&cfg.run.device)?;
    obs.phase("loading data");
    let data = Datasets::load(&cfg.data)?;
    let pool = build_pool(cfg, &data, device, obs)?;
    let files: Vec<PathBuf> = pool.iter().map(|p| p.file.clone()).collect();
    let dir = crate::shared::key_dir(root, cfg, &files, device)?;
    let layout = pool_layout(cfg, &pool, data.input_shape(&cfg.data)?);
    let total = crate::shared::epoch_bytes(&layout, data.train.len()) * cfg.train.epochs as u64;
    if let Some(max) = max_bytes {
        if total > max {
            return Err(anyhow::Error::new(TooLarge {
                bytes: total,
                max,
                dir: dir.clone(),
            }));
        }
    }
    let loader = data.train_loader(&cfg.data, cfg.train.batch_size, cfg.run.seed)?;
    let mut seconds = Vec::new();
    for epoch in 0..cfg.train.epochs {
        let mut out = EpochOutputs::open(&dir, epoch, layout.clone())?;
        if out.is_read() {
            continue;
        }
        let t0 = Instant::now();
        obs.epoch_start(
            "teacher outputs",
            epoch + 1,
            cfg.train.epochs,
            loader.num_batches(),
        );
        tch::no_grad(|| -> Result<()> {
            for batch in loader.epoch(epoch as u64, 0, device) {
                out.batch(&batch.indices, device, || {
                    teacher_outputs(&pool, &batch.images)
                })?;
                obs.batch(None);
            }
            Ok(())
        })?;
        out.finish()?;
        seconds.push(t0.elapsed().as_secs_f64());
        obs.phase(&format!(
            "teacher outputs of epoch {} stored in {:.1} s",
            epoch + 1,
            seconds[seconds.len() - 1]
        ));
    }
    let pass = TeacherPass {
        seconds,
        peak_rss_mb: crate::record::peak_rss_mb(),
    };
    write_json_atomic(&dir.join("pass.json"), &pass)?;
    Ok((dir, pass))
}

/// Train (or find in the cache) and evaluate the teacher pool of a config, without training a
/// student: what `mtkd teachers` prints.
pub fn prepare_teachers(cfg: &Config, obs: &mut dyn Observer) -> Result<Vec<TeacherSummary>> {
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let device = device_of(&cfg.run.device)?;
    obs.phase("loading data");
    let data = Datasets::load(&cfg.data)?;
    let pool = build_pool(cfg, &data, device, obs)?;
    Ok(pool
        .iter()
        .map(|p| TeacherSummary {
            name: p.teacher.name().to_owned(),
            source: p.source.clone(),
            test_value: p.test_value,
        })
        .collect())
}

fn build_pool(
    cfg: &Config,
    data: &Datasets,
    device: Device,
    obs: &mut dyn Observer,
) -> Result<Vec<PoolMember>> {
    let in_shape = data.input_shape(&cfg.data)?;
    let needs_features = cfg.distill.as_ref().is_some_and(|d| d.feature_weight > 0.0);
    let task = task_of(cfg);
    let mut pool = Vec::new();
    for (i, t) in cfg.teachers.iter().enumerate() {
        let member = if let Some(arch) = t.arch {
            let (weights, top1) = ensure_native_teacher(cfg, i, t, obs)?;
            let teacher = NativeTeacher::load(
                &t.name,
                arch,
                teacher_head(cfg, t),
                &weights,
                in_shape,
                data.num_classes(),
                device,
            )
            .with_context(|| format!("loading teacher `{}` from {}", t.name, weights.display()))?;
            PoolMember {
                teacher: Box::new(teacher),
                source: format!("mtkd {arch} ({})", weights.display()),
                file: weights,
                test_value: Some(top1),
            }
        } else {
            let path = t
                .torchscript
                .as_ref()
                .ok_or_else(|| anyhow!("teacher `{}` has no source", t.name))?;
            let transform = t.input.as_ref().map(|i| {
                crate::teacher_input::InputTransform::new(
                    &cfg.data.normalize,
                    in_shape.0 as usize,
                    i,
                    device,
                )
            });
            let expect = Expectation {
                input: transform
                    .as_ref()
                    .map(|x| x.shape(in_shape))
                    .unwrap_or(in_shape),
                num_classes: data.num_classes(),
                needs_features,
                dense: task.kind() == mtkd_vision_tasks::task::TaskKind::Segmentation,
            };
            let teacher: Box<dyn Teacher> = Box::new(
                TorchScriptTeacher::load(&t.name, path, device, &expect)
                    .with_context(|| format!("loading teacher `{}`", t.name))?,
            );
            let teacher: Box<dyn Teacher> = match transform {
                Some(transform) => Box::new(crate::teacher_input::InputAdapted {
                    inner: teacher,
                    transform,
                }),
                None => teacher,
            };
            obs.phase(&format!("evaluating teacher `{}`", t.name));
            let loader = data.test_loader(&cfg.data, cfg.train.eval_batch_size)?;
            // Its outputs are checked on every test batch: a teacher that is NaN on real
            // images (past the probe) is refused here, not skipped batch after batch later.
            let (report, _) = evaluate(
                &|x| {
                    let out = teacher.forward(x)?;
                    if loss::ensure_finite("logits", &out.logits).is_err()
                        || out
                            .features
                            .as_ref()
                            .is_some_and(|f| loss::ensure_finite("features", f).is_err())
                    {
                        bail!(
                            "teacher `{}` ({}) gives NaN or infinite outputs on the test set",
                            t.name,
                            path.display()
                        );
                    }
                    Ok(out)
                },
                &loader,
                device,
                task.as_ref(),
                data.test.num_classes,
            )?;
            PoolMember {
                teacher,
                source: format!("TorchScript {}", path.display()),
                file: path.clone(),
                test_value: Some(report.value),
            }
        };
        pool.push(member);
    }
    Ok(pool)
}

/// The head of an `arch` teacher: its own, else the student's.
pub fn teacher_head(cfg: &Config, t: &TeacherConfig) -> mtkd_student::HeadKind {
    t.head.unwrap_or(cfg.student.head)
}

/// The config that trains teacher `t` (an `arch` teacher) on the run's data.
pub fn teacher_config(cfg: &Config, t: &TeacherConfig) -> Result<Config> {
    let arch = t
        .arch
        .ok_or_else(|| anyhow!("teacher `{}` is not an arch teacher", t.name))?;
    let mut train = cfg
        .teacher_training
        .clone()
        .ok_or_else(|| anyhow!("[teacher_training] is missing"))?;
    if let Some(e) = t.epochs {
        train.epochs = e;
    }
    let mut run = cfg.run.clone();
    run.name = t.name.clone();
    run.out_dir = cfg.run.teacher_cache.clone();
    run.seed = t
        .seed
        .unwrap_or_else(|| crate::config::teacher_seed(cfg.run.seed, &t.name));
    Ok(Config {
        run,
        data: cfg.data.clone(),
        student: crate::config::StudentConfig {
            arch,
            head: teacher_head(cfg, t),
            init: None,
            init_strategy: false,
            init_teachers: false,
        },
        train,
        distill: None,
        teachers: Vec::new(),
        teacher_training: None,
    })
}

/// Train (or find in the cache) an `arch` teacher: returns its weights and test top-1.
fn ensure_native_teacher(
    cfg: &Config,
    index: usize,
    t: &TeacherConfig,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, f64)> {
    let tcfg = teacher_config(cfg, t)?;
    // The cache key covers exactly what changes the teacher: data, architecture, training
    // settings and seed (not the device, threads, names or folders).
    // The training-set edits (hard pools) join the key only when there are any, so a plain
    // teacher keeps the key it always had. Class names only label plots: not in the key.
    #[derive(serde::Serialize)]
    struct Edits<'k> {
        classes: &'k Option<Vec<usize>>,
        train_subset: usize,
        label_noise: f64,
        flip_pairs: &'k [[usize; 2]],
        permute_labels: bool,
    }
    #[derive(serde::Serialize)]
    struct Key<'k> {
        data: &'k crate::config::DataConfig,
        arch: String,
        /// Absent for a classifier (the keys classification teachers always had).
        #[serde(skip_serializing_if = "Option::is_none")]
        head: Option<String>,
        train: &'k crate::config::TrainConfig,
        seed: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        edits: Option<Edits<'k>>,
    }
    let edits = t.label_edits();
    let mut key_data = tcfg.data.clone();
    key_data.class_names.clear();
    let key = Key {
        data: &key_data,
        arch: tcfg.student.arch.to_string(),
        head: tcfg
            .student
            .head
            .is_dense()
            .then(|| tcfg.student.head.to_string()),
        train: &tcfg.train,
        seed: tcfg.run.seed,
        edits: (!edits.is_identity()).then_some(Edits {
            classes: &t.classes,
            train_subset: t.train_subset,
            label_noise: t.label_noise,
            flip_pairs: &t.flip_pairs,
            permute_labels: t.permute_labels,
        }),
    };
    let key = stable_hash(toml::to_string(&key)?.as_bytes());
    let dir =
        cfg.run
            .teacher_cache
            .join(format!("{}-{}-{}", t.name, tcfg.student.arch, &key[..12]));
    let summary_path = dir.join("summary.json");
    // One process trains a cache entry; another one that needs it waits, then finds it done.
    let _lock = crate::fsio::DirLock::acquire_waiting(&dir, |holder| {
        obs.phase(&format!(
            "teacher `{}` is being trained by {holder}; waiting for it",
            t.name
        ));
    })?;
    if summary_path.is_file() && dir.join("student.safetensors").is_file() {
        let s: Summary = serde_json::from_slice(&std::fs::read(&summary_path)?)
            .with_context(|| format!("reading {}", summary_path.display()))?;
        tracing::info!(teacher = %t.name, dir = %dir.display(), top1 = s.final_value, "teacher found in cache");
        obs.phase(&format!(
            "teacher `{}` ({}) from cache: test top-1 {:.2}%",
            t.name, tcfg.student.arch, s.final_value
        ));
        return Ok((dir.join("student.safetensors"), s.final_value));
    }
    obs.phase(&format!(
        "training teacher `{}` ({}) into {}",
        t.name,
        tcfg.student.arch,
        dir.display()
    ));
    // A cache folder is keyed by what defines the teacher: its config file is informative and
    // rewritten, and its checkpoints are bound to the key (not to threads or device).
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::fsio::write_atomic(
        &dir.join("config.toml"),
        toml::to_string_pretty(&tcfg)?.as_bytes(),
    )?;
    let hash = key.clone();
    let mut data = Datasets::load(&tcfg.data)?;
    if !edits.is_identity() {
        let (train, report) =
            mtkd_vision_tasks::classification::labels::apply(&data.train, &edits, tcfg.run.seed)
                .with_context(|| format!("teacher `{}` (teachers[{index}])", t.name))?;
        tracing::info!(teacher = %t.name, samples = report.samples, changed_labels = report.changed,
            permutation = ?report.permutation, "teacher training set edited");
        obs.phase(&format!(
            "teacher `{}` trains on {} samples, {} of them with a changed label",
            t.name, report.samples, report.changed
        ));
        data.train = std::sync::Arc::new(train);
    }
    let device = device_of(&tcfg.run.device)?;
    let out = Trainer::new(&tcfg, data, Vec::new(), device, dir.clone(), hash)?
        .with_label(format!("teacher {}", t.name))
        .fit(&RunOptions::default(), obs)?;
    Ok((dir.join("student.safetensors"), out.summary.final_value))
}

/// Evaluate a forward function over a loader: accuracy report and mean cross-entropy.
pub fn evaluate(
    forward: &dyn Fn(&Tensor) -> Result<ModelOutput>,
    loader: &BatchLoader,
    device: Device,
    task: &dyn Task,
    num_classes: usize,
) -> Result<(MetricReport, f64)> {
    let mut metric = task.metric(num_classes);
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut n = 0usize;
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0, 0, device) {
            let out = forward(&batch.images)?;
            metric.update(&out.logits, &batch)?;
            loss_sum += task
                .loss(&out.logits, task.targets(&batch)?)?
                .sum(Kind::Double);
            n += batch.indices.len();
        }
        Ok(())
    })?;
    Ok((
        metric.report(),
        loss_sum.double_value(&[]) / n.max(1) as f64,
    ))
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
        let strategy: Box<dyn WeightingStrategy> = match distill.as_ref().map(|d| d.strategy) {
            None | Some(StrategyKind::None) => Box::new(NoKd),
            Some(StrategyKind::Equal) => match distill.as_ref().map(|d| d.equal_ones_epochs) {
                Some(n) if n > 0 => Box::new(EqualOnesWarmup::new(n)),
                _ => Box::new(Equal),
            },
            Some(StrategyKind::MtkdRl) => {
                let d = distill
                    .as_ref()
                    .ok_or_else(|| anyhow!("distill section missing"))?;
                let dims: Vec<i64> = pool
                    .iter()
                    .map(|p| p.teacher.feature_shape().map(|f| f.0).unwrap_or(0))
                    .collect();
                let mut agent_cfg = d.agent.clone().unwrap_or_default();
                // Exploration noise differs between seeds of a comparison.
                agent_cfg.seed = agent_cfg.seed.wrapping_add(cfg.run.seed);
                mtkd_rl_weighting::build(
                    agent_cfg,
                    &dims,
                    data.num_classes(),
                    d.ce_weight,
                    d.kd_weight,
                    device,
                )
                .context("building the MTKD-RL agent (distill.agent)")?
            }
            Some(StrategyKind::Ebkd) => Box::new(mtkd_distill_core::baselines::Ebkd),
            Some(StrategyKind::CaMkd) => Box::new(mtkd_distill_core::baselines::CaMkd),
            Some(StrategyKind::Aekd) => {
                let cap = distill.as_ref().map(|d| d.aekd_cap).unwrap_or(0.6);
                Box::new(mtkd_distill_core::baselines::Aekd::new(cap))
            }
            Some(StrategyKind::Mmkd) => {
                let d = distill
                    .as_ref()
                    .ok_or_else(|| anyhow!("distill section missing"))?;
                Box::new(
                    mtkd_distill_core::mmkd::Mmkd::new(
                        d.mmkd.clone().unwrap_or_default(),
                        pool.len() as i64,
                        data.num_classes(),
                        d.ce_weight,
                        d.kd_weight,
                        device,
                    )
                    .context("building the MMKD weight network (distill.mmkd)")?,
                )
            }
            Some(StrategyKind::Fixed) => {
                let table = distill
                    .as_ref()
                    .and_then(|d| d.fixed.as_ref())
                    .ok_or_else(|| anyhow!("strategy `fixed` needs [distill.fixed]"))?;
                Box::new(
                    mtkd_distill_core::weighting::Fixed::new(
                        table,
                        pool.len(),
                        data.num_classes() as usize,
                        device,
                    )
                    .context("distill.fixed")?,
                )
            }
            Some(StrategyKind::Single) => {
                let name = distill
                    .as_ref()
                    .and_then(|d| d.teacher.clone())
                    .unwrap_or_default();
                let idx = pool
                    .iter()
                    .position(|p| p.teacher.name() == name)
                    .ok_or_else(|| anyhow!("distill.teacher: no teacher named `{name}`"))?;
                Box::new(Single::new(idx))
            }
        };
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
        Ok(Trainer {
            task: task_of(cfg),
            per_class: None,
            active: (0..m).collect(),
            prune_counts: vec![0; m],
            audit: Vec::new(),
            weight_log: None,
            shared: None,
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
        })
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

    /// Every tensor of the run's state, by checkpoint name.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (n, t) in sorted_vars(&self.student_vs) {
            out.push((format!("student.{n}"), t));
        }
        for (n, t) in sorted_vars(&self.adapter_vs) {
            out.push((format!("adapter.{n}"), t));
        }
        for (n, t) in self.opt.state() {
            out.push((format!("optim.{n}"), t));
        }
        out
    }

    /// The strategy's state: tensors prefixed `strategy.` and its JSON bookkeeping.
    fn strategy_state(&self) -> Result<(Vec<(String, Tensor)>, String)> {
        let st = self.strategy.save_state()?;
        Ok((
            st.tensors
                .into_iter()
                .map(|(n, t)| (format!("strategy.{n}"), t))
                .collect(),
            st.json,
        ))
    }

    fn restore(&mut self, tensors: Vec<(String, Tensor)>, strategy_json: &str) -> Result<()> {
        let (strategy, tensors): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|(n, _)| n.starts_with("strategy."));
        let st = StrategyState {
            tensors: strategy
                .into_iter()
                .map(|(n, t)| (n["strategy.".len()..].to_owned(), t))
                .collect(),
            json: strategy_json.to_owned(),
        };
        if !st.tensors.is_empty() || !st.json.is_empty() {
            self.strategy
                .load_state(&st)
                .context("restoring the weighting strategy from the checkpoint")?;
        }
        let student = self.student_vs.variables();
        let adapter = self.adapter_vs.variables();
        let mut optim = Vec::new();
        let mut restored = std::collections::HashSet::new();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in tensors {
                let (store, key) = if let Some(k) = name.strip_prefix("student.") {
                    (&student, k)
                } else if let Some(k) = name.strip_prefix("adapter.") {
                    (&adapter, k)
                } else if let Some(k) = name.strip_prefix("optim.") {
                    optim.push((k.to_owned(), t));
                    continue;
                } else {
                    bail!("checkpoint holds an unknown tensor `{name}`");
                };
                let mut var = store
                    .get(key)
                    .ok_or_else(|| {
                        anyhow!("checkpoint tensor `{name}` has no matching variable in this model")
                    })?
                    .shallow_clone();
                if var.size() != t.size() {
                    bail!(
                        "checkpoint tensor `{name}` has shape {:?}, the model {:?}",
                        t.size(),
                        var.size()
                    );
                }
                var.copy_(&t);
                restored.insert(name);
            }
            Ok(())
        })?;
        let missing: Vec<String> = student
            .keys()
            .map(|k| format!("student.{k}"))
            .chain(adapter.keys().map(|k| format!("adapter.{k}")))
            .filter(|k| !restored.contains(k))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the checkpoint lacks {} variable(s) of this model, e.g. `{}`",
                missing.len(),
                missing[0]
            );
        }
        self.opt
            .load_state(&optim)
            .map_err(|e| anyhow!("checkpoint optimizer state: {e}"))?;
        Ok(())
    }

    /// `student.init_strategy`: the strategy's state from the last checkpoint of the run `init`.
    fn init_strategy_from(&mut self, init: &Path) -> Result<()> {
        let ckpt = init.join("checkpoints");
        let (tensors, meta) = checkpoint::load_latest(&ckpt)?.ok_or_else(|| {
            anyhow!(
                "student.init_strategy: {} has no checkpoint to take the strategy's state from",
                init.display()
            )
        })?;
        if meta.active_teachers.is_some() {
            bail!(
                "student.init_strategy: teachers left the pool of {} (pruning); its strategy state does not fit the whole pool",
                init.display()
            );
        }
        let st = StrategyState {
            tensors: tensors
                .into_iter()
                .filter_map(|(n, t)| n.strip_prefix("strategy.").map(|k| (k.to_owned(), t)))
                .collect(),
            json: meta.strategy_json,
        };
        if st.tensors.is_empty() && st.json.is_empty() {
            bail!(
                "student.init_strategy: the run {} kept no strategy state (its strategy learns nothing)",
                init.display()
            );
        }
        self.strategy.load_state(&st).with_context(|| {
            format!(
                "student.init_strategy: the strategy state of {} does not fit this run's strategy and pool",
                init.display()
            )
        })?;
        tracing::info!(from = %init.display(), epoch = meta.epoch, "strategy state carried over");
        Ok(())
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

    /// One optimizer step on a batch. Returns false when the batch was skipped (non-finite loss
    /// under the `skip` policy).
    fn step(
        &mut self,
        batch: &Batch,
        sums: &mut Sums,
        shared: Option<&mut EpochOutputs>,
        epoch: usize,
        step: u64,
    ) -> Result<bool> {
        // A skipped batch must leave no trace: BatchNorm's running statistics, updated by the
        // training-mode forward, are put back when the batch is skipped.
        let saved: Option<Vec<Tensor>> = (self.cfg.train.on_nonfinite == NonFinitePolicy::Skip)
            .then(|| self.buffers.iter().map(Tensor::copy).collect());
        let (images, labels, indices) = (&batch.images, &batch.labels, &batch.indices[..]);
        let targets = self.task.targets(batch)?;
        let out = self.student.forward_t(images, true);
        let ce = self.task.loss(&out.logits, targets)?;
        let b = labels.size()[0];
        let distill = self.distill().cloned();
        let (per_sample, kd, feat, weights_mean) = match &distill {
            None => (&ce * 1.0, None, None, None),
            Some(d) => {
                let t0 = Instant::now();
                let pool = &self.pool;
                let active = &self.active;
                let t_outs = match shared {
                    // Stored outputs hold the whole pool; a pruned teacher's column is dropped.
                    Some(shared) => {
                        let all =
                            shared.batch(indices, self.device, || teacher_outputs(pool, images))?;
                        if active.len() == all.len() {
                            all
                        } else {
                            all.into_iter()
                                .enumerate()
                                .filter(|(i, _)| active.contains(i))
                                .map(|(_, o)| o)
                                .collect()
                        }
                    }
                    None => teacher_outputs_of(pool, active, images)?,
                };
                sums.teacher_seconds += t0.elapsed().as_secs_f64();
                let features = out
                    .features
                    .as_ref()
                    .ok_or_else(|| anyhow!("the student gives no feature map"))?;
                let projected: Vec<Option<Tensor>> = if self.adapters.is_empty() {
                    (0..t_outs.len()).map(|_| None).collect()
                } else {
                    self.active
                        .iter()
                        .map(|&i| self.adapters[i].forward(features, true).map(Some))
                        .collect::<std::result::Result<_, _>>()?
                };
                // The KL terms with gradient, once; the signals get them detached.
                let kl_terms: Vec<Tensor> = t_outs
                    .iter()
                    .map(|t| self.task.kd(&out.logits, &t.logits, d.temperature, targets))
                    .collect::<std::result::Result<_, _>>()?;
                let mut signals = self.task.signals(
                    &out.logits,
                    &projected,
                    &t_outs,
                    targets,
                    labels,
                    d.temperature,
                    Some(&kl_terms),
                )?;
                if self.strategy.wants_student_head() {
                    let (weight, bias) = self.student.classifier();
                    signals.student_head = Some(StudentHead {
                        embedding: out
                            .embedding()
                            .ok_or_else(|| anyhow!("the student gives no feature map"))?
                            .detach(),
                        weight: weight.detach(),
                        bias: bias.as_ref().map(Tensor::detach),
                        lr: self.opt.lr,
                    });
                }
                let w = self.strategy.weights(&signals).with_context(|| {
                    format!(
                        "strategy `{}` at epoch {} step {step}",
                        self.strategy.name(),
                        epoch + 1
                    )
                })?;
                let mut kd = Tensor::zeros([b], (Kind::Float, self.device));
                let mut feat = Tensor::zeros([b], (Kind::Float, self.device));
                for (m, (t, term)) in t_outs.iter().zip(&kl_terms).enumerate() {
                    kd += w.logit.select(1, m as i64) * term;
                    if let (Some(p), Some(tf)) = (&projected[m], &t.features) {
                        let term = match d.feature_loss {
                            crate::config::FeatureLoss::Mse => loss::feature_mse(p, tf)?,
                            crate::config::FeatureLoss::Cwd => loss::cwd(p, tf, d.temperature)?,
                        };
                        feat += w.feature.select(1, m as i64) * term;
                    }
                }
                let total = &ce * d.ce_weight + &kd * d.kd_weight + &feat * d.feature_weight;
                let full = self.to_full(&w)?;
                let wm = Tensor::stack(
                    &[
                        full.logit.mean_dim(0, false, Kind::Float),
                        full.feature.mean_dim(0, false, Kind::Float),
                    ],
                    0,
                );
                (
                    total,
                    Some(kd),
                    Some(feat),
                    Some((wm, signals, w, t_outs, full)),
                )
            }
        };
        let loss = per_sample.mean(Kind::Float);
        // One check per step; the diagnosis below runs only when it fails.
        if loss::ensure_finite("loss", &loss).is_err() {
            let bad = |t: &Tensor| loss::ensure_finite("", t).is_err();
            let mut what = None;
            if let Some((_, _, w, t_outs, _)) = &weights_mean {
                for (p, t) in self.active.iter().map(|&i| &self.pool[i]).zip(t_outs) {
                    if what.is_none() && bad(&t.logits) {
                        what = Some(format!("the logits of teacher `{}`", p.teacher.name()));
                    }
                }
                if what.is_none() && (bad(&w.logit) || bad(&w.feature)) {
                    what = Some(format!(
                        "the weights of strategy `{}`",
                        self.strategy.name()
                    ));
                }
            }
            let what = what.unwrap_or_else(|| {
                if bad(&ce) {
                    "the cross-entropy term".to_owned()
                } else if kd.as_ref().is_some_and(bad) {
                    "the KD term".to_owned()
                } else {
                    "the feature term".to_owned()
                }
            });
            if let Some(saved) = saved {
                tch::no_grad(|| {
                    for (var, copy) in self.buffers.iter_mut().zip(&saved) {
                        var.copy_(copy);
                    }
                });
            }
            return self.non_finite(epoch, step, &what, sums);
        }
        let eval_before = if weights_mean.is_some() && self.strategy.wants_eval_ce() {
            let before = tch::no_grad(|| self.student.forward_t(images, false));
            Some(self.task.loss(&before.logits, targets)?)
        } else {
            None
        };
        self.opt.zero_grad();
        loss.backward();
        self.opt.step();
        let correct = self
            .task
            .train_score(&out.logits.detach(), targets)?
            .sum(Kind::Double);
        sums.add(
            b,
            &loss.detach(),
            &ce.detach(),
            kd.as_ref(),
            feat.as_ref(),
            &correct,
            weights_mean.as_ref().map(|x| &x.0),
        );
        if let Some((_, signals, w, _, full)) = weights_mean {
            self.record_weights(&full, labels, indices, epoch, step)?;
            if epoch + 1 == self.cfg.train.epochs {
                crate::audit::collect(&mut self.audit, &signals, &full, &self.active, indices)?;
            }
            let eval_ce = match eval_before {
                Some(before) => {
                    let after = tch::no_grad(|| self.student.forward_t(images, false));
                    Some((before, self.task.loss(&after.logits, targets)?))
                }
                None => None,
            };
            let feedback = Feedback {
                per_sample_loss: per_sample.detach(),
                pre_step_ce: ce.detach(),
                eval_ce,
                step,
            };
            self.strategy
                .observe(&signals, &w, &feedback)
                .with_context(|| {
                    format!(
                        "strategy `{}` at epoch {} step {step}",
                        self.strategy.name(),
                        epoch + 1
                    )
                })?;
        }
        Ok(true)
    }

    /// Weights of the active teachers `[B, M_active]` spread over the full pool `[B, M]` (0 for
    /// a pruned teacher), detached.
    fn to_full(&self, w: &TeacherWeights) -> Result<TeacherWeights> {
        let m = self.pool.len();
        if self.active.len() == m {
            return Ok(TeacherWeights {
                logit: w.logit.detach(),
                feature: w.feature.detach(),
            });
        }
        let idx = Tensor::from_slice(&self.active.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(self.device);
        let spread = |t: &Tensor| -> Result<Tensor> {
            let b = t.size()[0];
            Ok(
                Tensor::zeros([b, m as i64], (Kind::Float, self.device)).f_index_copy(
                    1,
                    &idx,
                    &t.detach().to_kind(Kind::Float),
                )?,
            )
        };
        Ok(TeacherWeights {
            logit: spread(&w.logit)?,
            feature: spread(&w.feature)?,
        })
    }

    fn active_names(&self) -> Vec<String> {
        self.active
            .iter()
            .map(|&i| self.pool[i].teacher.name().to_owned())
            .collect()
    }

    /// Keep only the teachers at `active` (full pool positions, increasing).
    fn set_active(&mut self, active: Vec<usize>) -> Result<()> {
        if active.is_empty() || active.iter().any(|&i| i >= self.pool.len()) {
            bail!(
                "the checkpoint's active teachers {active:?} do not fit a pool of {}",
                self.pool.len()
            );
        }
        let keep: Vec<usize> = active
            .iter()
            .map(|i| self.active.iter().position(|a| a == i))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow!("a pruned teacher cannot come back to the pool"))?;
        self.strategy
            .retain_teachers(&keep)
            .with_context(|| format!("strategy `{}`", self.strategy.name()))?;
        self.active = active;
        Ok(())
    }

    /// `[distill.prune]` at the end of an epoch: count the epochs each active teacher spent under
    /// the threshold and drop those past their patience. Returns the names that left.
    fn prune_after_epoch(&mut self, rec: &EpochRecord) -> Result<Vec<String>> {
        let Some(p) = self.distill().and_then(|d| d.prune.clone()) else {
            return Ok(Vec::new());
        };
        let mut leaving = Vec::new();
        for &i in &self.active {
            let w = rec.teacher_weights.get(i).copied().unwrap_or(f64::NAN);
            if w < p.threshold {
                self.prune_counts[i] += 1;
            } else {
                self.prune_counts[i] = 0;
            }
            if self.prune_counts[i] >= p.patience {
                leaving.push((w, i));
            }
        }
        // Lowest weight first, never below min_teachers.
        leaving.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let room = self.active.len().saturating_sub(p.min_teachers);
        leaving.truncate(room);
        if leaving.is_empty() {
            return Ok(Vec::new());
        }
        let gone: Vec<usize> = leaving.iter().map(|&(_, i)| i).collect();
        let names: Vec<String> = gone
            .iter()
            .map(|&i| self.pool[i].teacher.name().to_owned())
            .collect();
        let active: Vec<usize> = self
            .active
            .iter()
            .copied()
            .filter(|i| !gone.contains(i))
            .collect();
        self.set_active(active)?;
        for (n, (w, _)) in names.iter().zip(&leaving) {
            tracing::info!(teacher = %n, epoch = rec.epoch, mean_weight = w, threshold = p.threshold,
                "teacher leaves the pool (distill.prune)");
        }
        Ok(names)
    }

    /// The epoch's per-class mean weights into its record.
    fn class_weights_into(&self, rec: &mut EpochRecord) -> Result<()> {
        if let Some((sums, fsums, counts)) = &self.per_class {
            let m = self.pool.len().max(1);
            let grid = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
                let mean = t / counts.clamp_min(1.0).unsqueeze(1);
                let v: Vec<f64> = Vec::try_from(&mean.to_device(Device::Cpu).flatten(0, -1))?;
                Ok(v.chunks(m).map(<[f64]>::to_vec).collect())
            };
            rec.class_weights = grid(sums)?;
            rec.class_feature_weights = grid(fsums)?;
        }
        Ok(())
    }

    /// Open `weights.csv` for appending, keeping only the lines of the `done` completed epochs
    /// (a resumed run replays the interrupted epoch, so its partial lines go).
    fn open_weight_log(&self, done: usize) -> Result<std::io::BufWriter<std::fs::File>> {
        let path = self.dir.join("weights.csv");
        let mut header = "epoch,step,index,label".to_owned();
        for kind in ["logit", "feature"] {
            for p in &self.pool {
                header.push_str(&format!(",{kind}:{}", p.teacher.name()));
            }
        }
        let mut kept = header + "\n";
        if let Ok(old) = std::fs::read_to_string(&path) {
            for line in old.lines().skip(1) {
                let epoch: usize = line
                    .split(',')
                    .next()
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(usize::MAX);
                if epoch <= done {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        crate::fsio::write_atomic(&path, kept.as_bytes())?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(std::io::BufWriter::new(f))
    }

    /// Per-class mean logit weights (for the heatmap) and the optional per-sample CSV log.
    fn record_weights(
        &mut self,
        w: &TeacherWeights,
        labels: &Tensor,
        indices: &[usize],
        epoch: usize,
        step: u64,
    ) -> Result<()> {
        let k = self.data.num_classes();
        let onehot = labels.onehot(k).to_kind(Kind::Double); // [B, K]
        let sums = onehot
            .transpose(0, 1)
            .matmul(&w.logit.to_kind(Kind::Double)); // [K, M]
        let fsums = onehot
            .transpose(0, 1)
            .matmul(&w.feature.to_kind(Kind::Double)); // [K, M]
        let counts = onehot.sum_dim_intlist(0, false, Kind::Double); // [K]
        match &mut self.per_class {
            Some((s, f, c)) => {
                *s += sums;
                *f += fsums;
                *c += counts;
            }
            None => self.per_class = Some((sums, fsums, counts)),
        }
        if let Some(log) = &mut self.weight_log {
            let m = w.logit.size()[1] as usize;
            let wl = Vec::<f32>::try_from(&w.logit.to_device(Device::Cpu).flatten(0, -1))?;
            let wf = Vec::<f32>::try_from(&w.feature.to_device(Device::Cpu).flatten(0, -1))?;
            let lab = Vec::<i64>::try_from(&labels.to_device(Device::Cpu))?;
            for (b, idx) in indices.iter().enumerate() {
                let mut line = format!("{},{step},{idx},{}", epoch + 1, lab[b]);
                for v in wl[b * m..(b + 1) * m].iter().chain(&wf[b * m..(b + 1) * m]) {
                    line.push_str(&format!(",{v:.6}"));
                }
                writeln!(log, "{line}").context("writing weights.csv")?;
            }
        }
        Ok(())
    }

    fn non_finite(&self, epoch: usize, step: u64, what: &str, sums: &mut Sums) -> Result<bool> {
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
                 lower train.lr or set train.on_nonfinite = \"skip\"",
                epoch + 1,
                step,
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
                Ok(false)
            }
        }
    }

    /// `plots/overlays.png` (a few test images: truth, student, each teacher) and
    /// `plots/class_iou.png` (the student's final IoU per class).
    fn segmentation_plots(&self, report: &MetricReport) -> Result<()> {
        let plots = self.dir.join("plots");
        let names = &self.data.test.class_names;
        crate::plot::class_bars(
            &plots.join("class_iou.png"),
            "Student: test IoU per class (last epoch)",
            "IoU (%)",
            names,
            &report.per_class,
        )?;
        let loader = self.data.test_loader(&self.cfg.data, 4)?;
        let Some(batch) = loader.epoch(0, 0, self.device).next() else {
            return Ok(());
        };
        let argmax = |logits: &Tensor| -> Result<Vec<i64>> {
            Ok(Vec::<i64>::try_from(
                &logits
                    .argmax(1, false)
                    .to_device(Device::Cpu)
                    .flatten(0, -1),
            )?)
        };
        let mut maps = vec![Vec::<i64>::try_from(
            &self
                .task
                .targets(&batch)?
                .to_device(Device::Cpu)
                .flatten(0, -1),
        )?];
        let mut titles = vec!["truth".to_owned(), "student".to_owned()];
        maps.push(argmax(
            &tch::no_grad(|| self.student.forward_t(&batch.images, false)).logits,
        )?);
        for p in &self.pool {
            maps.push(argmax(&p.teacher.forward(&batch.images)?.logits)?);
            titles.push(format!("teacher {}", p.teacher.name()));
        }
        let (c, h, w) = self.data.test.image_shape();
        let per = h * w;
        let rows: Vec<crate::plot::OverlayRow> = batch
            .indices
            .iter()
            .enumerate()
            .map(|(k, &i)| crate::plot::OverlayRow {
                image: self
                    .data
                    .test
                    .images
                    .index_axis(ndarray::Axis(0), i)
                    .iter()
                    .copied()
                    .collect(),
                channels: c,
                maps: maps
                    .iter()
                    .map(|m| m[k * per..(k + 1) * per].to_vec())
                    .collect(),
            })
            .collect();
        crate::plot::segmentation_overlays(
            &plots.join("overlays.png"),
            (h, w),
            &titles,
            names,
            &rows,
        )
    }

    fn finish(mut self, meta: &Meta, report: &MetricReport) -> Result<Outcome> {
        let dir = &self.dir;
        let weights = dir.join("student.safetensors");
        let vs = &self.student_vs;
        crate::fsio::write_atomic_with(&weights, |tmp| {
            vs.save(tmp).map_err(|e| e.to_string().into())
        })?;
        export_torchscript(&self.student, &self.student_vs, dir.join("student.pt"))?;
        let names: Vec<String> = self
            .pool
            .iter()
            .map(|p| p.teacher.name().to_owned())
            .collect();
        crate::plot::plot_run(&dir.join("plots"), &meta.history, &names)?;
        if self.task.kind() == mtkd_vision_tasks::task::TaskKind::Segmentation {
            self.segmentation_plots(report)?;
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
            student: if self.cfg.student.head.is_dense() {
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

/// The weights file `student.init` names: a run folder's `student.safetensors` (its architecture
/// checked against `arch`) or a file.
fn init_weights(init: &Path, arch: mtkd_student::Arch) -> Result<PathBuf> {
    if init.is_dir() {
        let cfg_path = init.join("config.toml");
        let weights = init.join("student.safetensors");
        if !weights.is_file() {
            bail!(
                "student.init: {} is not a finished run folder (no student.safetensors)",
                init.display()
            );
        }
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let theirs = Config::parse(&text, &cfg_path, &[])?;
            if theirs.student.arch != arch {
                bail!(
                    "student.init: {} trained a {} student, this run builds a {arch}",
                    init.display(),
                    theirs.student.arch
                );
            }
        }
        return Ok(weights);
    }
    if !init.is_file() {
        bail!("student.init: {} does not exist", init.display());
    }
    Ok(init.to_path_buf())
}

/// Export the student as TorchScript (logits output: tracing supports a single return value).
/// The weights are copied into a frozen CPU copy of the network, so the file is portable and
/// the traced graph holds constants, not trainable parameters.
pub fn export_torchscript(net: &Network, vs: &VarStore, path: PathBuf) -> Result<()> {
    let (c, h, w) = net.in_shape();
    let mut frozen = VarStore::new(Device::Cpu);
    let copy = Network::with_head(
        &frozen.root(),
        net.arch,
        net.head_kind,
        net.in_shape(),
        net.num_classes(),
    )?;
    frozen
        .copy(vs)
        .context("copying the student's weights for export")?;
    frozen.freeze();
    let example = Tensor::zeros([1, c, h, w], (Kind::Float, Device::Cpu));
    let module = tch::no_grad(|| {
        tch::CModule::create_by_tracing("MtkdStudent", "forward", &[example], &mut |xs| {
            vec![copy.forward_t(&xs[0], false).logits]
        })
    })
    .context("tracing the student for TorchScript export")?;
    // libtorch aborts the process (an exception thrown while unwinding) when the disk fills
    // during its write: check the room first. The file holds the weights once, plus the graph.
    let weights: i64 = frozen
        .variables()
        .values()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum();
    crate::fsio::ensure_room(&path, 2 * weights as u64 + (4 << 20))?;
    crate::fsio::write_atomic_with(&path, |tmp| {
        module.save(tmp).map_err(|e| e.to_string().into())
    })?;
    Ok(())
}

fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let vars = vs.variables();
    let mut v: Vec<(String, Tensor)> = vars
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn sorted_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Running sums of an epoch, kept as tensors (no device sync per batch).
struct Sums {
    n: i64,
    batches: usize,
    skipped: usize,
    loss: Tensor,
    ce: Tensor,
    kd: Tensor,
    feat: Tensor,
    correct: Tensor,
    weights: Tensor,
    weight_batches: i64,
    /// What was not finite in the skipped batches, and how often.
    skip_causes: std::collections::BTreeMap<String, usize>,
    last_loss: f64,
    /// Wall time spent getting the teachers' outputs (forward passes or shared reads).
    teacher_seconds: f64,
}

impl Sums {
    fn new(device: Device, m: usize) -> Sums {
        let z = || Tensor::zeros([], (Kind::Double, device));
        Sums {
            n: 0,
            batches: 0,
            skipped: 0,
            loss: z(),
            ce: z(),
            kd: z(),
            feat: z(),
            correct: z(),
            weights: Tensor::zeros([2, m as i64], (Kind::Double, device)),
            weight_batches: 0,
            skip_causes: Default::default(),
            last_loss: f64::NAN,
            teacher_seconds: 0.0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        b: i64,
        loss: &Tensor,
        ce: &Tensor,
        kd: Option<&Tensor>,
        feat: Option<&Tensor>,
        correct: &Tensor,
        w: Option<&Tensor>,
    ) {
        self.n += b;
        self.batches += 1;
        self.loss += loss.to_kind(Kind::Double) * b as f64;
        self.ce += ce.sum(Kind::Double);
        if let Some(k) = kd {
            self.kd += k.detach().sum(Kind::Double);
        }
        if let Some(f) = feat {
            self.feat += f.detach().sum(Kind::Double);
        }
        self.correct += correct;
        if let Some(w) = w {
            self.weights += w.to_kind(Kind::Double);
            self.weight_batches += 1;
        }
        if self.batches.is_multiple_of(20) {
            self.last_loss = loss.double_value(&[]);
        }
    }

    fn record(
        &self,
        epoch: usize,
        lr: f64,
        report: &MetricReport,
        test_loss: f64,
        seconds: f64,
    ) -> EpochRecord {
        let n = self.n.max(1) as f64;
        let (weights, feature_weights) = if self.weight_batches > 0 {
            let mean = (&self.weights / self.weight_batches as f64).to_device(Device::Cpu);
            (
                Vec::<f64>::try_from(&mean.get(0)).unwrap_or_default(),
                Vec::<f64>::try_from(&mean.get(1)).unwrap_or_default(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        EpochRecord {
            epoch,
            lr,
            train_loss: self.loss.double_value(&[]) / n,
            train_ce: self.ce.double_value(&[]) / n,
            train_kd: self.kd.double_value(&[]) / n,
            train_feature: self.feat.double_value(&[]) / n,
            train_metric: 100.0 * self.correct.double_value(&[]) / n,
            test_loss,
            test: report.clone(),
            teacher_weights: weights,
            teacher_feature_weights: feature_weights,
            class_weights: Vec::new(),
            class_feature_weights: Vec::new(),
            pruned: Vec::new(),
            active_teachers: None,
            strategy_metrics: Default::default(),
            skipped_batches: self.skipped,
            seconds,
            teacher_seconds: self.teacher_seconds,
        }
    }
}
