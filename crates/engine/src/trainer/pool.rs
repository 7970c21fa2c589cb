//! The teacher pool: building it (TorchScript files and teachers trained by mtkd, with the
//! teacher cache), running it on a batch, the teacher pass of shared outputs, and the
//! config that trains an `arch` teacher.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::loss;
use mtkd_distill_core::weighting::TeacherWeights;
use mtkd_distill_core::{ModelOutput, Precision, Teacher};
use mtkd_student::NativeTeacher;
use mtkd_teachers::{Expectation, TorchScriptTeacher};
use mtkd_vision_tasks::task::Task;

use super::{device_of, evaluate, stable_hash, task_of, Observer, RunOptions, Trainer};
use crate::config::{Config, TeacherConfig};
use crate::dataset::Datasets;
use crate::record::{write_json_atomic, Summary, TeacherSummary};
use crate::shared::{EpochOutputs, Layout};

/// One teacher of the pool and where it came from.
pub struct PoolMember {
    pub(super) teacher: Box<dyn Teacher>,
    pub(super) source: String,
    /// The weights or TorchScript file the teacher was loaded from.
    pub(super) file: PathBuf,
    /// The teacher's primary test metric.
    pub(super) test_value: Option<f64>,
}

/// The teacher pool of a run and which of its teachers are still in it.
pub struct Pool {
    pub(crate) members: Vec<PoolMember>,
    /// Positions of the teachers still in the pool (`[distill.prune]`, single-teacher KD),
    /// increasing.
    pub(crate) active: Vec<usize>,
    /// Per teacher: consecutive epochs under the pruning threshold.
    pub(crate) prune_counts: Vec<usize>,
}

impl Pool {
    pub(crate) fn new(members: Vec<PoolMember>) -> Pool {
        let m = members.len();
        Pool {
            members,
            active: (0..m).collect(),
            prune_counts: vec![0; m],
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every position, active or not.
    pub(crate) fn all(&self) -> Vec<usize> {
        (0..self.members.len()).collect()
    }

    /// Every teacher's name, in pool order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|p| p.teacher.name().to_owned())
            .collect()
    }

    /// The names of the active teachers.
    pub(crate) fn active_names(&self) -> Vec<String> {
        self.active
            .iter()
            .map(|&i| self.members[i].teacher.name().to_owned())
            .collect()
    }

    /// The outputs of the teachers at `which` (pool positions), in that order.
    pub(crate) fn run(&self, which: &[usize], images: &Tensor) -> Result<Vec<ModelOutput>> {
        teacher_outputs_of(&self.members, which, images)
    }

    /// A row over the active teachers spread over the full pool: 0 for a pruned teacher, or NaN
    /// when the row is NaN (a class without samples).
    pub(crate) fn row_to_full(&self, row: &[f64]) -> Vec<f64> {
        let fill = if row.iter().any(|v| v.is_nan()) {
            f64::NAN
        } else {
            0.0
        };
        let mut out = vec![fill; self.members.len()];
        for (&i, &v) in self.active.iter().zip(row) {
            out[i] = v;
        }
        out
    }

    /// Weights of the active teachers `[B, M_active]` spread over the full pool `[B, M]` (0 for
    /// a pruned teacher), detached.
    pub(crate) fn to_full(&self, w: &TeacherWeights, device: Device) -> Result<TeacherWeights> {
        let m = self.members.len();
        if self.active.len() == m {
            return Ok(TeacherWeights {
                pixel: w.pixel.as_ref().map(Tensor::detach),
                logit: w.logit.detach(),
                feature: w.feature.detach(),
            });
        }
        let idx = Tensor::from_slice(&self.active.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(device);
        let spread = |t: &Tensor| -> Result<Tensor> {
            let mut size = t.size();
            size[1] = m as i64;
            Ok(
                Tensor::zeros(size.as_slice(), (Kind::Float, device)).f_index_copy(
                    1,
                    &idx,
                    &t.detach().to_kind(Kind::Float),
                )?,
            )
        };
        Ok(TeacherWeights {
            pixel: w.pixel.as_ref().map(spread).transpose()?,
            logit: spread(&w.logit)?,
            feature: spread(&w.feature)?,
        })
    }
}

/// Every teacher's output for a batch.
pub(super) fn teacher_outputs(pool: &[PoolMember], images: &Tensor) -> Result<Vec<ModelOutput>> {
    let all: Vec<usize> = (0..pool.len()).collect();
    teacher_outputs_of(pool, &all, images)
}

/// The outputs of the teachers at `which` (pool positions), in that order.
pub(super) fn teacher_outputs_of(
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

pub(super) fn pool_layout(cfg: &Config, pool: &[PoolMember], input: (i64, i64, i64)) -> Layout {
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
        out.finish(1)?;
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

pub fn build_pool(
    cfg: &Config,
    data: &Datasets,
    device: Device,
    obs: &mut dyn Observer,
) -> Result<Vec<PoolMember>> {
    let in_shape = data.input_shape(&cfg.data)?;
    let needs_features = cfg.distill.as_ref().is_some_and(|d| d.feature_weight > 0.0);
    let task = task_of(cfg);
    let precision = cfg
        .distill
        .as_ref()
        .map(|d| d.teacher_precision)
        .unwrap_or_default();
    let channels_last = cfg.run.channels_last;
    if precision == Precision::Bf16
        && device == Device::Cpu
        && !mtkd_distill_core::cpu_has_native_bf16()
    {
        tracing::warn!("distill.teacher_precision = \"bf16\" on a CPU without native bfloat16 (AVX512-BF16 or AMX): libtorch emulates it and the teachers run many times slower than in fp32");
        obs.phase(
            "warning: teacher_precision = bf16 on a CPU without native bfloat16: the teachers \
             will run many times slower than in fp32",
        );
    }
    let mut pool = Vec::new();
    for (i, t) in cfg.teachers.iter().enumerate() {
        let member = if let Some(arch) = t.arch {
            let (weights, top1) = ensure_native_teacher(cfg, i, t, obs)?;
            let mut teacher = NativeTeacher::load(
                &t.name,
                arch,
                teacher_head(cfg, t),
                &weights,
                in_shape,
                data.num_classes(),
                device,
            )
            .with_context(|| format!("loading teacher `{}` from {}", t.name, weights.display()))?;
            teacher
                .set_precision(precision)
                .with_context(|| format!("distill.teacher_precision = \"{precision}\""))?;
            teacher.set_channels_last(channels_last && device == Device::Cpu);
            // Its cached test metric was measured in fp32 when it was trained; in another
            // precision it is measured once as it will run, and kept beside its weights.
            let test_value = if precision == Precision::Fp32 {
                top1
            } else {
                let layout = channels_last && device == Device::Cpu;
                let (value, measured) = metric_in(&weights, precision, layout, device, || {
                    obs.phase(&format!("evaluating teacher `{}` in {precision}", t.name));
                    evaluate_teacher(&teacher, &weights, cfg, data, device, task.as_ref())
                })?;
                if !measured {
                    obs.phase(&format!(
                        "teacher `{}` in {precision}: test {} {value:.2}% (measured once, kept in the teacher cache)",
                        t.name,
                        mtkd_vision_tasks::task::metric_label(task.primary()),
                    ));
                }
                value
            };
            PoolMember {
                teacher: Box::new(teacher),
                source: format!("mtkd {arch} ({})", weights.display()),
                file: weights,
                test_value: Some(test_value),
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
            let output = task.teacher_output(data.num_classes(), (in_shape.1, in_shape.2));
            let expect = Expectation {
                input: transform
                    .as_ref()
                    .map(|x| x.shape(in_shape))
                    .unwrap_or(in_shape),
                num_classes: data.num_classes(),
                needs_features,
                dense: output.dense,
                det_locations: output.locations,
            };
            let mut ts = TorchScriptTeacher::load_in(&t.name, path, device, &expect, precision)
                .with_context(|| format!("loading teacher `{}`", t.name))?;
            ts.set_channels_last(channels_last && device == Device::Cpu)
                .with_context(|| format!("teacher `{}`", t.name))?;
            let teacher: Box<dyn Teacher> = Box::new(ts);
            let teacher: Box<dyn Teacher> = match transform {
                Some(transform) => Box::new(crate::teacher_input::InputAdapted {
                    inner: teacher,
                    transform,
                }),
                None => teacher,
            };
            obs.phase(&format!("evaluating teacher `{}`", t.name));
            let test_value =
                evaluate_teacher(teacher.as_ref(), path, cfg, data, device, task.as_ref())?;
            PoolMember {
                teacher,
                source: format!("TorchScript {}", path.display()),
                file: path.clone(),
                test_value: Some(test_value),
            }
        };
        pool.push(member);
    }
    Ok(pool)
}

/// The test metric of a cached mtkd teacher run in `precision` (and layout, on `device`): read
/// from `test-<precision>-<layout>-<device>.json` beside its weights when that file was written
/// for these very weights, else measured by `measure` and written there. Returns the value and
/// whether it was measured now.
fn metric_in(
    weights: &Path,
    precision: Precision,
    channels_last: bool,
    device: Device,
    measure: impl FnOnce() -> Result<f64>,
) -> Result<(f64, bool)> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stored {
        precision: String,
        channels_last: bool,
        device: String,
        /// [`crate::config::stable_hash`] of the weights file the value was measured on.
        weights_hash: String,
        value: f64,
    }
    let device_name = match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        _ => "other",
    };
    let layout = if channels_last { "nhwc" } else { "nchw" };
    let dir = weights.parent().unwrap_or(Path::new("."));
    let path = dir.join(format!("test-{precision}-{layout}-{device_name}.json"));
    let bytes = std::fs::read(weights).with_context(|| format!("reading {}", weights.display()))?;
    let weights_hash = crate::config::stable_hash(&bytes);
    if let Ok(old) = std::fs::read(&path) {
        match serde_json::from_slice::<Stored>(&old) {
            Ok(s) if s.weights_hash == weights_hash && s.value.is_finite() => {
                tracing::info!(file = %path.display(), value = s.value, "teacher metric in {precision} from cache");
                return Ok((s.value, false));
            }
            Ok(_) => {
                tracing::info!(file = %path.display(), "teacher metric written for other weights: measured again")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable teacher metric: measured again")
            }
        }
    }
    let value = measure()?;
    crate::fsio::write_json_atomic(
        &path,
        &Stored {
            precision: precision.to_string(),
            channels_last,
            device: device_name.to_owned(),
            weights_hash,
            value,
        },
    )?;
    Ok((value, true))
}

/// A teacher's primary metric on the test split, as it runs in the pool (precision, layout,
/// input adaptation). Its outputs are checked on every test batch: a teacher that is NaN on
/// real images (past the load-time probe) is refused here, not skipped batch after batch later.
fn evaluate_teacher(
    teacher: &dyn Teacher,
    file: &Path,
    cfg: &Config,
    data: &Datasets,
    device: Device,
    task: &dyn Task,
) -> Result<f64> {
    let loader = data.test_loader(&cfg.data, cfg.train.eval_batch_size)?;
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
                    teacher.name(),
                    file.display()
                );
            }
            Ok(out)
        },
        &loader,
        device,
        task,
        data.test.num_classes,
    )?;
    Ok(report.value)
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
    // The teachers train on every label: a student's `labels`, `unlabelled` and
    // `labelled_share` are its own (docs/METHOD.md section 15).
    let mut data = cfg.data.clone();
    data.labels = None;
    data.unlabelled = None;
    data.labelled_share = None;
    Ok(Config {
        run,
        data,
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

/// The cache folder of an `arch` teacher (`tcfg`: its training config, [`teacher_config`]),
/// `<teacher_cache>/<name>-<arch>-<first 12 hex digits of the key>`, and the whole key.
fn teacher_cache_dir(cfg: &Config, t: &TeacherConfig, tcfg: &Config) -> Result<(PathBuf, String)> {
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
        /// Absent when "background" (the keys specialists always had).
        #[serde(skip_serializing_if = "Option::is_none")]
        others: Option<crate::config::OtherClasses>,
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
        head: (tcfg.student.head != mtkd_student::HeadKind::Classifier)
            .then(|| tcfg.student.head.to_string()),
        train: &tcfg.train,
        seed: tcfg.run.seed,
        edits: (!edits.is_identity()).then_some(Edits {
            classes: &t.classes,
            train_subset: t.train_subset,
            label_noise: t.label_noise,
            flip_pairs: &t.flip_pairs,
            permute_labels: t.permute_labels,
            others: (t.others != crate::config::OtherClasses::Background).then_some(t.others),
        }),
    };
    let key = stable_hash(toml::to_string(&key)?.as_bytes());
    let dir =
        cfg.run
            .teacher_cache
            .join(format!("{}-{}-{}", t.name, tcfg.student.arch, &key[..12]));
    Ok((dir, key))
}

/// Train (or find in the cache) an `arch` teacher: returns its weights and test top-1.
pub(super) fn ensure_native_teacher(
    cfg: &Config,
    index: usize,
    t: &TeacherConfig,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, f64)> {
    let tcfg = teacher_config(cfg, t)?;
    let (dir, key) = teacher_cache_dir(cfg, t, &tcfg)?;
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
            "teacher `{}` ({}) from cache: test {} {:.2}% (fp32)",
            t.name,
            tcfg.student.arch,
            mtkd_vision_tasks::task::metric_label(&s.metric),
            s.final_value
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
    // A dense specialist keeps every image; the other classes lose their annotations.
    let mut edits = t.label_edits();
    if !tcfg.data.task().labels_are_targets() {
        if let Some(classes) = edits.classes.take() {
            let ignore = t.others == crate::config::OtherClasses::Ignore;
            let (train, changed) = data
                .train
                .keep_classes(&classes, ignore)
                .with_context(|| format!("teacher `{}` (teachers[{index}])", t.name))?;
            tracing::info!(teacher = %t.name, changed, others = ?t.others, "annotations of the other classes removed");
            obs.phase(&format!(
                "teacher `{}` trains on classes {classes:?} only: {changed} annotated pixels or objects of the other classes {}",
                t.name,
                if ignore { "left unlabelled" } else { "removed" }
            ));
            data.train = std::sync::Arc::new(train);
        }
        // Swapped classes: the masks' pixels or the boxes' classes of each pair trade places.
        if !edits.flip_pairs.is_empty() {
            let pairs = std::mem::take(&mut edits.flip_pairs);
            let (train, changed) = data
                .train
                .swap_classes(&pairs)
                .with_context(|| format!("teacher `{}` (teachers[{index}])", t.name))?;
            tracing::info!(teacher = %t.name, changed, pairs = ?pairs, "classes swapped in the annotations");
            obs.phase(&format!(
                "teacher `{}` trains with classes {pairs:?} swapped: {changed} annotated pixels or objects changed",
                t.name
            ));
            data.train = std::sync::Arc::new(train);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A config of the repository's `configs/` folder, with `sets` applied.
    fn repo_config(name: &str, sets: &[String]) -> Config {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        Config::load(&root.join("configs").join(name), sets).unwrap()
    }

    /// Teacher `t`'s cache folder name and key under `cfg`.
    fn cache_entry(cfg: &Config, t: &TeacherConfig) -> (String, String) {
        let tcfg = teacher_config(cfg, t).unwrap();
        let (dir, key) = teacher_cache_dir(cfg, t, &tcfg).unwrap();
        (dir.file_name().unwrap().to_string_lossy().into_owned(), key)
    }

    /// A teacher's cache key must not move when an option it does not set is added: the
    /// specialists of configs/pool-seg-specialists.toml keep the folders they were trained into
    /// with the other classes as background (before `others` existed), and get new ones with
    /// `others = "ignore"`. (Their 8 training epochs of then: the config trains 16 since.)
    #[test]
    fn a_specialist_keeps_its_cache_key_unless_it_sets_others() {
        let then = [
            "teacher_training.epochs=8".to_owned(),
            "teacher_training.milestones=[6]".to_owned(),
        ];
        let cfg = repo_config("pool-seg-specialists.toml", &then);
        let mut t = cfg.teachers[0].clone();
        assert_eq!(t.others, crate::config::OtherClasses::Ignore);
        assert_eq!(cache_entry(&cfg, &t).0, "tops-resnet14-257ce01e3d6b");
        t.others = crate::config::OtherClasses::Background;
        assert_eq!(cache_entry(&cfg, &t).0, "tops-resnet14-f80ca02beea7");
        // The training epochs are part of the key: the 16-epoch specialist is another folder.
        let now = repo_config("pool-seg-specialists.toml", &[]);
        assert_eq!(
            cache_entry(&now, &now.teachers[0]).0,
            "tops-resnet14-0f3ab6458cf0"
        );
    }

    /// A dense teacher with swapped classes is its own cache entry: the same teacher without
    /// the swaps, or with other pairs, is another.
    #[test]
    fn a_dense_teacher_with_swapped_classes_has_its_own_cache_key() {
        let cfg = repo_config("pool-det-swapped.toml", &[]);
        let key = |t: &TeacherConfig| cache_entry(&cfg, t).1;
        let mut t = cfg.teachers[0].clone();
        assert_eq!(t.flip_pairs, vec![[0, 6], [2, 4]]);
        let swapped = key(&t);
        t.flip_pairs = vec![[1, 3], [5, 9]];
        let other_pairs = key(&t);
        t.flip_pairs.clear();
        let plain = key(&t);
        assert_ne!(swapped, other_pairs);
        assert_ne!(swapped, plain);
        assert_ne!(other_pairs, plain);
    }
}
