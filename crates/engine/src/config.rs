//! The run configuration: serde structs read from TOML with unknown keys rejected, checked
//! without IO ([`Config::check`]) before anything is loaded. Presets live in `configs/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use mtkd_student::{Arch, HeadKind};
pub use mtkd_vision_tasks::task::{DenseKd, TaskKind};
use mtkd_vision_tasks::transform::{Augment, EvalResize, Normalize};

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub student: StudentConfig,
    pub train: TrainConfig,
    /// Absent: the student trains on labels only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// The teacher pool, in a fixed order (weights and metrics are reported in this order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teachers: Vec<TeacherConfig>,
    /// How teachers given by `arch` are trained (once, then cached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_training: Option<TrainConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name of the run; the run folder is `<out_dir>/<name>-NNN` unless `--out` is given.
    pub name: String,
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    #[serde(default = "default_device")]
    pub device: String,
    /// libtorch intra-op threads; 0 keeps libtorch's default (one per core).
    #[serde(default)]
    pub threads: usize,
    /// Where teachers trained by mtkd are cached (relative to the working directory; shared by
    /// runs; keyed by a hash of data, architecture, training settings and seed).
    #[serde(default = "default_teacher_cache")]
    pub teacher_cache: PathBuf,
    /// Write every training sample's teacher weights to `weights.csv` (for audits; large).
    #[serde(default)]
    pub weight_log: bool,
    /// On the CPU, run the student, its adapters and the teachers in channels-last layout
    /// (default true): convolution weights are re-laid at the start and the teachers get each
    /// batch channels-last, which oneDNN's convolutions prefer. The same numbers up to the
    /// order of float sums. Measured A/B (docs/RESULTS.md, step 8): 1.17x on the CIFAR
    /// setting's MTKD-RL step, within noise on the Fashion-MNIST default's small CNNs. A frozen
    /// TorchScript teacher keeps the layout it was exported with (`export-teacher
    /// --channels-last`). Not used on a GPU.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub channels_last: bool,
}

impl RunConfig {
    fn check(&self) -> Checked {
        if self.name.trim().is_empty() || self.name.contains('/') {
            return bad("run.name", "must be a non-empty name without '/'".into());
        }
        let dev = self.device.as_str();
        let dev_ok = matches!(dev, "cpu" | "cuda" | "auto")
            || dev
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !dev_ok {
            return bad(
                "run.device",
                format!("`{dev}` is not one of cpu, cuda, cuda:N, auto"),
            );
        }
        Ok(())
    }
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_device() -> String {
    "cpu".into()
}
fn default_teacher_cache() -> PathBuf {
    PathBuf::from("runs/teachers")
}

pub use mtkd_vision_tasks::source::DatasetKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub kind: DatasetKind,
    /// Folder of the dataset. A relative path is looked up under `$MTKD_DATA_DIR` first (where
    /// `cargo xtask data` puts downloads), then relative to the working directory.
    pub root: PathBuf,
    /// Use only N training samples (0 = all), chosen as `subset` says.
    #[serde(default)]
    pub train_subset: usize,
    /// Use only N test samples (0 = all), chosen as `subset` says.
    #[serde(default)]
    pub test_subset: usize,
    /// How `train_subset` and `test_subset` choose their samples: `stratified` (default: seeded,
    /// every class keeps its share, the same subset for every run seed) or `first` (the first N,
    /// as mtkd before 0.2 did).
    #[serde(default)]
    pub subset: SubsetKind,
    pub normalize: Normalize,
    #[serde(default)]
    pub augment: Augment,
    /// ImageFolder: resize every image to this square size when reading (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<u32>,
    /// ImageFolder: 1 (grey) or 3 (RGB) channels (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Evaluation geometry (ImageNet-style resize + centre crop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_resize: Option<EvalResize>,
    /// Class names in label order, for plots and reports (formats without names, e.g. IDX,
    /// otherwise name the classes "0", "1", ...). Must have one name per class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_names: Vec<String>,
    /// The number of classes: `segmentation-folder` (background included; default: the
    /// number of `class_names`) and `mnist` (IDX files: default 10, as MNIST and
    /// Fashion-MNIST; EMNIST's splits have others). For any other kind the format says how
    /// many, and a different value here is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
    /// `synthetic-scenes`: how the scenes are made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenes: Option<mtkd_vision_tasks::segmentation::synthetic::SceneConfig>,
    /// Keep the labels of only part of the training set (`{ fraction = 0.1 }` or
    /// `{ keep = 2000 }`, seeded and stratified by class); the rest is used without labels
    /// (docs/METHOD.md section 15). The pool's `arch` teachers still train on every label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelsConfig>,
    /// A folder of images without labels used beside the training set (`{ root = "dir" }`:
    /// PNG or JPEG, sub-folders included, the training images' size and channels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabelled: Option<UnlabelledConfig>,
    /// How labelled and unlabelled samples mix in the batches: a share s in (0, 1) repeats the
    /// labelled samples (each copy augmented on its own) until they make about s of an epoch
    /// (default [`DEFAULT_LABELLED_SHARE`], half of every batch); 0 takes each image once per
    /// epoch, so a batch holds labelled samples in the set's proportion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled_share: Option<f64>,
}

/// `[data] labelled_share` when unset: half of every epoch is labelled samples (docs/METHOD.md
/// section 15 and docs/RESULTS.md give the measurements that chose it).
pub const DEFAULT_LABELLED_SHARE: f64 = 0.5;

/// Which training labels a run keeps (`[data] labels`): exactly one of `fraction` and `keep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsConfig {
    /// The share of the training samples that keep their label, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// How many training samples keep their label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    /// Seed of the choice (the same labelled samples for every run seed).
    #[serde(default)]
    pub seed: u64,
}

/// A folder of unlabelled images (`[data] unlabelled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlabelledConfig {
    /// The folder; a relative path is looked up as `data.root` is.
    pub root: PathBuf,
}

impl DataConfig {
    /// Whether some training samples carry no label (`labels` or `unlabelled`).
    pub fn has_unlabelled(&self) -> bool {
        self.labels.is_some() || self.unlabelled.is_some()
    }
}

impl DataConfig {
    /// The dataset this section describes, its folder resolved ([`crate::dataset::resolve_root`]
    /// gives `root`), for the readers of vision-tasks.
    pub fn source<'a>(&'a self, root: &'a Path) -> mtkd_vision_tasks::source::Source<'a> {
        mtkd_vision_tasks::source::Source {
            kind: self.kind,
            root,
            num_classes: self.num_classes,
            class_names: self.class_names.len(),
            image_size: self.image_size,
            channels: self.channels,
            scenes: self.scenes.as_ref(),
        }
    }

    /// The data section's own rules and those of its task (augmentations that follow masks or
    /// boxes, what a kind needs).
    fn check(&self) -> Checked {
        if matches!(
            self.kind,
            DatasetKind::SyntheticScenes | DatasetKind::SyntheticDetection
        ) {
            match &self.scenes {
                None => {
                    return bad(
                        "data.scenes",
                        format!(
                            "{} needs [data] scenes = {{ train = N, test = N, ... }}",
                            serde_plain(&self.kind)
                        ),
                    )
                }
                Some(sc) => {
                    if let Err(r) = sc.check() {
                        return bad("data.scenes", r);
                    }
                }
            }
        } else if self.scenes.is_some() {
            return bad(
                "data.scenes",
                "only data.kind = \"synthetic-scenes\" or \"synthetic-detection\" makes scenes"
                    .into(),
            );
        }
        if self.kind == DatasetKind::Coco && self.image_size.is_none() {
            return bad(
                "data.image_size",
                "coco needs image_size: every image (and its boxes) is resized to it".into(),
            );
        }
        if self.kind == DatasetKind::SegmentationFolder
            && self.num_classes.is_none()
            && self.class_names.is_empty()
        {
            return bad(
                "data.num_classes",
                "segmentation-folder needs num_classes (or class_names)".into(),
            );
        }
        if let Err((field, why)) = self
            .task()
            .check_transforms(Some(&self.augment), self.eval_resize.as_ref())
        {
            return bad(field, why);
        }
        if let Some(c) = self.channels {
            if c != 1 && c != 3 {
                return bad("data.channels", format!("must be 1 or 3, got {c}"));
            }
        }
        if let Some(l) = &self.labels {
            match (l.fraction, l.keep) {
                (Some(f), None) if !(f > 0.0 && f <= 1.0) => {
                    return bad(
                        "data.labels.fraction",
                        format!("must be in (0, 1], got {f}"),
                    )
                }
                (None, Some(0)) => {
                    return bad("data.labels.keep", "must be at least 1".into())
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return bad(
                        "data.labels",
                        "give exactly one of fraction (a share of the training set) and keep                          (a number of samples)"
                            .into(),
                    )
                }
            }
        }
        if let Some(s) = self.labelled_share {
            if !(0.0..1.0).contains(&s) {
                return bad(
                    "data.labelled_share",
                    format!("must be in [0, 1) (0: each image once per epoch), got {s}"),
                );
            }
            if !self.has_unlabelled() {
                return bad(
                    "data.labelled_share",
                    "mixes labelled and unlabelled samples: set data.labels or data.unlabelled"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

impl DataConfig {
    pub fn task(&self) -> TaskKind {
        self.kind.task()
    }
}

fn is_default_head(h: &HeadKind) -> bool {
    *h == HeadKind::Classifier
}
fn is_default_dense_kd(k: &DenseKd) -> bool {
    *k == DenseKd::Kl
}
fn is_default_feature_loss(k: &FeatureLoss) -> bool {
    *k == FeatureLoss::Mse
}
fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn is_default_pixel_weights(k: &PixelWeights) -> bool {
    *k == PixelWeights::Image
}

/// How a segmentation run's teacher weights vary inside an image (`distill.pixel_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PixelWeights {
    /// One weight per image and teacher (every strategy).
    #[default]
    Image,
    /// The per-image weight redistributed over the pixels by per-pixel teacher confidence.
    Confidence,
}

/// The feature-KD loss (`distill.feature_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureLoss {
    /// Mean squared error of the adapted student map and the teacher's map.
    #[default]
    Mse,
    /// Channel-wise distillation of the adapted map (spatial softmax per channel, at T).
    Cwd,
    /// Pearson-style: MSE of the per-channel standardised maps (zero mean, unit variance over
    /// the locations), which ignores the teachers' feature scales (detectors of other types).
    Pearson,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    pub arch: Arch,
    /// The head: `classifier` (default; classification data) or a segmentation head, `fcn` or
    /// `aspp` (segmentation data).
    #[serde(default, skip_serializing_if = "is_default_head")]
    pub head: HeadKind,
    /// Start from earlier weights instead of a random initialisation (light re-training when
    /// the data drift): a run folder (its `student.safetensors`; its architecture must match) or
    /// a `.safetensors` file of this architecture. The summary records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// With `init` a run folder: also carry over the weighting strategy's learnt state (the
    /// agent's policy, MMKD's weight network) from its last checkpoint; the pool must have the
    /// same teachers in the same order.
    #[serde(default, skip_serializing_if = "is_false")]
    pub init_strategy: bool,
    /// With `init` a run folder and no `[[teachers]]` here: use that run's teacher pool (its
    /// `[[teachers]]` and `[teacher_training]`), copied into this run's resolved config.
    #[serde(default, skip_serializing_if = "is_false")]
    pub init_teachers: bool,
}

impl StudentConfig {
    fn check(&self) -> Checked {
        if self.init_strategy && self.init.is_none() {
            return bad(
                "student.init_strategy",
                "needs student.init, the run folder whose strategy state is carried over".into(),
            );
        }
        Ok(())
    }
}

/// What to do when a loss becomes NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NonFinitePolicy {
    /// Stop the run with the step (and teacher) named; the last good checkpoint stays.
    #[default]
    Stop,
    /// Skip the batch (no optimizer step) and count it in the epoch's metrics.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_true")]
    pub nesterov: bool,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Epochs (0-based, at their start) where the learning rate is multiplied by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    #[serde(default)]
    pub on_nonfinite: NonFinitePolicy,
    /// With `on_nonfinite = "skip"`: the share of an epoch's batches that may be skipped; one
    /// more stops the run, naming what was not finite. (Absent from the resolved config at its
    /// default, so older run folders and cache keys stay valid.)
    #[serde(
        default = "default_skip_budget",
        skip_serializing_if = "is_default_skip_budget"
    )]
    pub skip_budget: f64,
}

impl TrainConfig {
    /// The section's own rules; `sec` is its name (`train` or `teacher_training`).
    fn check(&self, sec: &str) -> Checked {
        if self.epochs == 0 {
            return bad(&format!("{sec}.epochs"), "must be at least 1".into());
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad(&format!("{sec}.batch_size"), "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.skip_budget) {
            return bad(
                &format!("{sec}.skip_budget"),
                format!(
                    "must be a share of the epoch's batches in [0, 1], got {}",
                    self.skip_budget
                ),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(
                &format!("{sec}.lr"),
                format!("must be positive, got {}", self.lr),
            );
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(
                &format!("{sec}.momentum"),
                format!("must be in [0, 1), got {}", self.momentum),
            );
        }
        if self.nesterov && self.momentum == 0.0 {
            return bad(
                &format!("{sec}.nesterov"),
                "nesterov needs momentum > 0".into(),
            );
        }
        if self.weight_decay < 0.0 {
            return bad(
                &format!("{sec}.weight_decay"),
                "must not be negative".into(),
            );
        }
        if self.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return bad(
                &format!("{sec}.milestones"),
                "must be strictly increasing".into(),
            );
        }
        Ok(())
    }
}

/// The training seed of an `arch` teacher without `seed`: derived from the run's seed and the
/// teacher's name, so reordering or extending the pool keeps every cached teacher.
pub fn teacher_seed(run_seed: u64, name: &str) -> u64 {
    let h = stable_hash(name.as_bytes());
    let h = u64::from_str_radix(&h, 16).unwrap_or(0);
    run_seed.wrapping_add(1000 + h % 1_000_000)
}

fn default_skip_budget() -> f64 {
    0.05
}
fn is_default_skip_budget(v: &f64) -> bool {
    *v == default_skip_budget()
}

fn default_momentum() -> f64 {
    0.9
}
fn default_true() -> bool {
    true
}
fn default_wd() -> f64 {
    5e-4
}
fn default_gamma() -> f64 {
    0.1
}
fn default_eval_batch() -> usize {
    500
}

/// How a subset of a split is chosen (`data.subset`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubsetKind {
    #[default]
    Stratified,
    First,
}

/// Teacher weighting strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// No distillation (labels only), teachers are not run.
    None,
    /// Equal weights 1/M ("AVER").
    Equal,
    /// One teacher only: `distill.teacher` names it.
    Single,
    /// The MTKD-RL agent (`[distill.agent]`: parity or clean mode, fixed or dynamic mix).
    MtkdRl,
    /// Entropy-based weights (EBKD).
    Ebkd,
    /// Confidence-aware weights (CA-MKD; logit weights also used for features).
    CaMkd,
    /// Minimum-norm point of the teachers' KD gradients on the capped simplex (AEKD).
    Aekd,
    /// Meta-learned weight network, trained by a last-layer look-ahead (`[distill.mmkd]`).
    Mmkd,
    /// Weights from a table in the config (`[distill.fixed]`: per teacher or per class); the
    /// oracle rows of the comparison.
    Fixed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub strategy: StrategyKind,
    /// For `single`: the teacher's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the cross-entropy term.
    #[serde(default = "default_one")]
    pub ce_weight: f64,
    /// Weight of the (teacher-weighted) KD term.
    #[serde(default = "default_one")]
    pub kd_weight: f64,
    /// beta: weight of the (teacher-weighted) feature MSE term; 0 turns feature KD off.
    #[serde(default)]
    pub feature_weight: f64,
    /// Segmentation: the KD loss on logits, `kl` (pixel-wise KD at T, default) or `cwd`
    /// (channel-wise distillation).
    #[serde(default, skip_serializing_if = "is_default_dense_kd")]
    pub dense_kd: DenseKd,
    /// Segmentation: `image` (default: the strategy's per-image weights for every pixel) or
    /// `confidence` (each teacher's per-image weight spread over the pixels by its per-pixel
    /// confidence, docs/METHOD.md section 13; with `dense_kd = "kl"`).
    #[serde(default, skip_serializing_if = "is_default_pixel_weights")]
    pub pixel_weights: PixelWeights,
    /// The feature term: `mse` (default, through the adapters), `cwd` (channel-wise
    /// distillation of the adapted map, at T) or `pearson` (MSE of per-channel standardised
    /// maps).
    #[serde(default, skip_serializing_if = "is_default_feature_loss")]
    pub feature_loss: FeatureLoss,
    /// Detection: weight of the box KD term (GIoU of the student's boxes to the teacher's at
    /// positive locations) inside each teacher's KD term, beside the class KD (default 1).
    #[serde(default = "default_one", skip_serializing_if = "is_one")]
    pub box_kd_weight: f64,
    /// The MTKD-RL agent's settings (strategy `mtkd-rl`); defaults to parity mode, fixed mix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<mtkd_rl_weighting::agent::AgentConfig>,
    /// For `equal`: the first this many epochs give every teacher weight 1 instead of 1/M (the
    /// MTKD-RL parity agent's epoch-0 rule; a control for its loss scale). 0 = plain AVER.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub equal_ones_epochs: usize,
    /// AEKD's cap C on each teacher's weight.
    #[serde(default = "default_aekd_cap")]
    pub aekd_cap: f64,
    /// MMKD's weight network settings (strategy `mmkd`); defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmkd: Option<mtkd_distill_core::mmkd::MmkdConfig>,
    /// The weight table of strategy `fixed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed: Option<FixedWeights>,
    /// The pool's oracle: the weights a person who knows the teachers would choose (the owner of
    /// the true class, the clean teacher). `mtkd compare` adds it as a `fixed` row and reads every
    /// strategy against the headroom `oracle - AVER`. Not used by `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle: Option<FixedWeights>,
    /// Automatic teacher selection: teachers whose weight stays low leave the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneConfig>,
    /// Keep every training sample's teacher outputs (logits and, with feature KD, feature maps)
    /// in memory, up to this many MB, and reuse them from the second epoch on instead of
    /// running the teachers again (0 = off, the default). Exact only when a sample's image is
    /// the same every epoch, so it needs `data.augment` off; docs/ARCHITECTURE.md, performance.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub output_cache_mb: usize,
    /// The number format the teachers compute in: `fp32` (default) or `bf16` (weights, input
    /// and activations in bfloat16, outputs back to float32 for the losses). About twice as
    /// fast on a CPU with native bfloat16 (AVX512-BF16, AMX) or a GPU, many times slower on a
    /// CPU without it (a warning says so); docs/PERF.md. The teachers' test metrics are
    /// measured in this precision. A TorchScript teacher that cannot be cast (a frozen module)
    /// is exported in bf16 instead (`export-teacher --precision bf16`) and left at `fp32` here.
    #[serde(default, skip_serializing_if = "is_fp32")]
    pub teacher_precision: mtkd_distill_core::Precision,
}

impl DistillConfig {
    /// The distill section's rules, with what they depend on elsewhere (the task, the teachers,
    /// the augmentation).
    fn check(&self, cfg: &Config) -> Checked {
        let task = cfg.data.task();
        let meta = self.strategy == StrategyKind::MtkdRl
            && self
                .agent
                .as_ref()
                .is_some_and(|a| a.mode == mtkd_rl_weighting::agent::Mode::Meta);
        if self.strategy == StrategyKind::Mmkd && !task.look_ahead() {
            return bad(
                "distill.strategy",
                "mmkd looks ahead through the student's last linear layer on pooled \
                 features; a detector's class conv over a pyramid has none (the agent's meta \
                 mode weights each location instead: strategy = \"mtkd-rl\" with \
                 [distill.agent] mode = \"meta\")"
                    .into(),
            );
        }
        if task == TaskKind::Detection {
            if !(self.box_kd_weight >= 0.0 && self.box_kd_weight.is_finite()) {
                return bad(
                    "distill.box_kd_weight",
                    format!("must be >= 0, got {}", self.box_kd_weight),
                );
            }
        } else if self.box_kd_weight != 1.0 {
            return bad("distill.box_kd_weight", "is a detection setting".into());
        }
        if task != TaskKind::Detection
            && self.agent.as_ref().is_some_and(|a| {
                a.location_quiz != mtkd_distill_core::signals::LocationQuiz::default()
            })
        {
            return bad(
                "distill.agent.location_quiz",
                "is a detection setting (the quiz of the meta mode's per-location credit); \
                 remove it"
                    .into(),
            );
        }
        if !cfg.data.has_unlabelled()
            && self.agent.as_ref().is_some_and(|a| {
                a.unlabelled_ce != mtkd_rl_weighting::agent::UnlabelledCe::default()
            })
        {
            return bad(
                "distill.agent.unlabelled_ce",
                "is a setting for runs with unlabelled samples (data.labels or \
                 data.unlabelled), which this run has none of; remove it"
                    .into(),
            );
        }
        if meta
            && task == TaskKind::Detection
            && self
                .agent
                .as_ref()
                .is_some_and(|a| a.quiz != mtkd_rl_weighting::agent::Quiz::Own)
        {
            return bad(
                "distill.agent.quiz",
                "on detection the meta mode's credit is each location's own (docs/METHOD.md \
                 section 14); remove quiz or set quiz = \"own\""
                    .into(),
            );
        }
        if meta && task == TaskKind::Segmentation {
            if self.dense_kd != DenseKd::Kl {
                return bad(
                    "distill.dense_kd",
                    "the agent's meta mode weights each pixel's KL on segmentation; set \
                     dense_kd = \"kl\" (or use another strategy with cwd)"
                        .into(),
                );
            }
            if self.pixel_weights != PixelWeights::Image {
                return bad(
                    "distill.pixel_weights",
                    "the agent's meta mode learns a weight per pixel itself on segmentation; \
                     remove pixel_weights"
                        .into(),
                );
            }
            if self
                .agent
                .as_ref()
                .is_some_and(|a| a.quiz == mtkd_rl_weighting::agent::Quiz::Previous)
            {
                return bad(
                    "distill.agent.quiz",
                    "on segmentation the meta mode's quiz is the current batch's labelled \
                     pixels (docs/METHOD.md section 10.7); remove quiz = \"previous\" (\"own\", \
                     the default, or \"current\")"
                        .into(),
                );
            }
        }
        if self.pixel_weights != PixelWeights::Image
            && (task != TaskKind::Segmentation || self.dense_kd != DenseKd::Kl)
        {
            return bad(
                "distill.pixel_weights",
                "per-pixel weights apply to segmentation with dense_kd = \"kl\"".into(),
            );
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "distill.temperature",
                format!("must be positive, got {}", self.temperature),
            );
        }
        for (f, v) in [
            ("ce_weight", self.ce_weight),
            ("kd_weight", self.kd_weight),
            ("feature_weight", self.feature_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(&format!("distill.{f}"), format!("must be >= 0, got {v}"));
            }
        }
        if self.output_cache_mb > 0 && cfg.data.augment.is_random() {
            return bad(
                "distill.output_cache_mb",
                "reuses each sample's teacher outputs across epochs, so its image must be \
                 the same every epoch: turn data.augment off (crop_padding = 0, hflip = \
                 false, no random_resized_crop or scale) or set output_cache_mb = 0"
                    .into(),
            );
        }
        if let Some(a) = &self.agent {
            if let Err((f, r)) = a.check() {
                return bad(&format!("distill.agent.{f}"), r);
            }
        }
        if let Some(c) = &self.mmkd {
            if let Err((f, r)) = c.check() {
                return bad(&format!("distill.mmkd.{f}"), r);
            }
        }
        let m = cfg.teachers.len();
        for (field, table) in [
            ("distill.fixed", &self.fixed),
            ("distill.oracle", &self.oracle),
        ] {
            if let Some(t) = table {
                if let Err(r) = t.check(m) {
                    return bad(field, r);
                }
            }
        }
        if let Some(p) = &self.prune {
            if !(p.threshold > 0.0 && p.threshold < 1.0) {
                return bad(
                    "distill.prune.threshold",
                    format!("must be in (0, 1), got {}", p.threshold),
                );
            }
            if p.patience == 0 || p.min_teachers == 0 {
                return bad(
                    "distill.prune",
                    "patience and min_teachers must be at least 1".into(),
                );
            }
        }
        if self.strategy == StrategyKind::Fixed && self.fixed.is_none() {
            return bad(
                "distill.fixed",
                "strategy `fixed` needs a [distill.fixed] table (weights = [...] per teacher or per_class = [[...], ...])".into(),
            );
        }
        if self.strategy == StrategyKind::Aekd && !(self.aekd_cap > 0.0 && self.aekd_cap <= 1.0) {
            return bad(
                "distill.aekd_cap",
                format!("must be in (0, 1], got {}", self.aekd_cap),
            );
        }
        if self.strategy == StrategyKind::Aekd && m > 1 && self.aekd_cap * (m as f64) < 1.0 {
            return bad(
                "distill.aekd_cap",
                format!(
                    "{} x {m} teachers < 1: no weights on the simplex respect the cap",
                    self.aekd_cap
                ),
            );
        }
        if self.strategy != StrategyKind::None && cfg.teachers.is_empty() {
            return bad(
                "teachers",
                format!(
                    "strategy `{:?}` needs at least one [[teachers]] entry",
                    self.strategy
                ),
            );
        }
        if self.strategy == StrategyKind::Single {
            match &self.teacher {
                None => {
                    return bad(
                        "distill.teacher",
                        "strategy `single` needs the teacher's name".into(),
                    )
                }
                Some(n) if !cfg.teachers.iter().any(|t| &t.name == n) => {
                    let names: Vec<&str> = cfg.teachers.iter().map(|t| t.name.as_str()).collect();
                    return bad(
                        "distill.teacher",
                        format!("no teacher named `{n}`; teachers are {names:?}"),
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn is_true(v: &bool) -> bool {
    *v
}

fn is_fp32(p: &mtkd_distill_core::Precision) -> bool {
    *p == mtkd_distill_core::Precision::Fp32
}

/// `[distill.prune]`: at the end of an epoch, a teacher whose mean logit weight over the epoch
/// was below `threshold` for `patience` epochs in a row leaves the pool (its forward pass is no
/// longer paid, its column leaves the signals); at least `min_teachers` stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneConfig {
    /// Mean logit weight (over an epoch's samples) under which a teacher counts as unused.
    #[serde(default = "default_prune_threshold")]
    pub threshold: f64,
    /// Consecutive epochs under the threshold before the teacher leaves.
    #[serde(default = "default_one_usize")]
    pub patience: usize,
    /// Never fewer teachers than this.
    #[serde(default = "default_one_usize")]
    pub min_teachers: usize,
}

impl Default for PruneConfig {
    fn default() -> PruneConfig {
        PruneConfig {
            threshold: default_prune_threshold(),
            patience: 1,
            min_teachers: 1,
        }
    }
}

fn default_prune_threshold() -> f64 {
    0.1
}
fn default_one_usize() -> usize {
    1
}

pub use mtkd_distill_core::weighting::FixedWeights;

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

fn default_aekd_cap() -> f64 {
    0.6
}

fn default_temperature() -> f64 {
    4.0
}
fn default_one() -> f64 {
    1.0
}

/// One teacher: either an architecture that mtkd trains (and caches), or a TorchScript file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub name: String,
    /// Train this architecture on the run's dataset (cached by config hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    /// A TorchScript file following the teacher contract (see mtkd-teachers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torchscript: Option<PathBuf>,
    /// Seed for training an `arch` teacher (default: derived from the run seed and the teacher's
    /// name, `config::teacher_seed`, so the pool's order does not matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `arch` teachers only: train on samples of these classes alone (a specialist; the head
    /// keeps every class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<usize>>,
    /// Segmentation specialists (`classes`) only: what the other classes' pixels become in its
    /// training masks: `"background"` (default: it learns to call them background) or
    /// `"ignore"` (unlabelled: the loss skips them, so it never sees them as background).
    #[serde(default, skip_serializing_if = "OtherClasses::is_background")]
    pub others: OtherClasses,
    /// `arch` teachers only: then on N of the remaining training samples, seeded and stratified
    /// by class (0 = all).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub train_subset: usize,
    /// `arch` teachers only: this fraction of training labels replaced by a uniformly drawn
    /// class (symmetric noise; fixed per sample by the teacher's seed).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub label_noise: f64,
    /// `arch` teachers only: labels of each pair of classes swapped (segmentation: the masks'
    /// pixels of foreground classes; detection: the boxes' classes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flip_pairs: Vec<[usize; 2]>,
    /// `arch` teachers only: every label mapped through a seeded permutation without fixed
    /// points (a teacher that is confidently wrong on every class).
    #[serde(default, skip_serializing_if = "is_false")]
    pub permute_labels: bool,
    /// `arch` teachers only: its own number of epochs (default: `[teacher_training] epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// `arch` teachers only: the head (default: the student's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadKind>,
    /// TorchScript teachers only: the input the teacher was trained on, made from the student's
    /// batch (default: the student's batch as it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<TeacherInput>,
}

/// What a segmentation specialist's training masks make of the classes it does not own
/// (`[[teachers]] others`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OtherClasses {
    /// Their pixels become background (class 0).
    #[default]
    Background,
    /// Their pixels become unlabelled (the ignore index): the loss skips them.
    Ignore,
}

impl OtherClasses {
    fn is_background(&self) -> bool {
        *self == OtherClasses::Background
    }
}

/// How a teacher's input is made from the student's (normalised, augmented) batch: the batch is
/// un-normalised with `[data] normalize`, its channels converted (grey repeated to RGB, or RGB
/// averaged to grey), resized (bilinear) and normalised with the teacher's own mean and std.
/// Every field is optional: an absent one keeps the student's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherInput {
    /// 1 or 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Square side in pixels (e.g. 224).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// The teacher's normalisation (e.g. ImageNet's mean [0.485, 0.456, 0.406], std [0.229,
    /// 0.224, 0.225]); one value per teacher channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
}

impl TeacherConfig {
    /// The edits of this teacher's training set.
    pub fn label_edits(&self) -> mtkd_vision_tasks::classification::labels::LabelEdits {
        mtkd_vision_tasks::classification::labels::LabelEdits {
            classes: self.classes.clone(),
            subset: Some(self.train_subset),
            flip_pairs: self.flip_pairs.clone(),
            permute: self.permute_labels,
            noise: self.label_noise,
        }
    }
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// A field's problem, as the section checks find it: the dotted field and the reason.
type Checked = Result<(), (String, String)>;

fn bad(field: &str, reason: String) -> Checked {
    Err((field.to_owned(), reason))
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("override `{0}` must look like section.key=value")]
    Override(String),
}

impl Config {
    /// Read, apply `key=value` overrides (TOML values; bare words are strings), parse, check.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path, overrides)
    }

    /// Parse from text (`path` only names the source in errors).
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let perr = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let mut value: toml::Table = toml::from_str(text).map_err(|e| perr(e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let mut cfg: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| perr(e.to_string()))?;
        if cfg.student.init_teachers && cfg.teachers.is_empty() {
            let init = cfg.student.init.clone().ok_or_else(|| ConfigError::Field {
                path: path.to_path_buf(),
                field: "student.init_teachers".into(),
                reason: "needs student.init, the run folder whose teachers are carried over".into(),
            })?;
            let theirs = Config::load(&init.join("config.toml"), &[])?;
            cfg.teachers = theirs.teachers;
            if cfg.teacher_training.is_none() {
                cfg.teacher_training = theirs.teacher_training;
            }
        }
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Checks that need no IO: ranges, names, cross-field rules; each section checks its own
    /// fields next to its definition, the rules across sections are below.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        self.problem()
            .map_err(|(field, reason)| ConfigError::Field {
                path: path.to_path_buf(),
                field,
                reason,
            })
    }

    fn problem(&self) -> Checked {
        self.train.check("train")?;
        if let Some(t) = &self.teacher_training {
            t.check("teacher_training")?;
        }
        self.run.check()?;
        self.check_heads()?;
        self.data.check()?;
        if let Some(d) = &self.distill {
            d.check(self)?;
        }
        self.student.check()?;
        self.check_teachers()
    }

    /// The student's and the `arch` teachers' heads fit the task; label edits only where
    /// there are labels to edit.
    fn check_heads(&self) -> Checked {
        let task = self.data.task();
        let head_task = |h: HeadKind| TaskKind::of_head(h.is_detector(), h.is_dense());
        if head_task(self.student.head) != task {
            let want = task.head_hint();
            return bad(
                "student.head",
                format!(
                    "data.kind `{}` is {} data: the student needs {want}, not head `{}`",
                    serde_plain(&self.data.kind),
                    serde_plain(&task),
                    self.student.head
                ),
            );
        }
        for (i, t) in self.teachers.iter().enumerate() {
            if !task.labels_are_targets() && (t.label_noise > 0.0 || t.permute_labels) {
                return bad(
                    &format!("teachers[{i}]"),
                    "label_noise and permute_labels edit image labels, not masks or boxes; \
                     a segmentation or detection teacher's set can be cut (train_subset), trained shorter \
                     (epochs), kept to some classes (classes: the others lose their annotations) \
                     or have pairs of classes swapped in its annotations (flip_pairs)"
                        .into(),
                );
            }
            if task == TaskKind::Segmentation && t.flip_pairs.iter().flatten().any(|&c| c == 0) {
                return bad(
                    &format!("teachers[{i}].flip_pairs"),
                    "swaps foreground classes of a segmentation teacher's masks; class 0 \
                     (background) stays background"
                        .into(),
                );
            }
            if task == TaskKind::Segmentation && t.classes.as_ref().is_some_and(|c| c.contains(&0))
            {
                return bad(
                    &format!("teachers[{i}].classes"),
                    "lists the foreground classes a segmentation specialist keeps; class 0 \
                     (background) is always kept"
                        .into(),
                );
            }
            if t.others == OtherClasses::Ignore
                && (task != TaskKind::Segmentation || t.classes.is_none())
            {
                return bad(
                    &format!("teachers[{i}].others"),
                    "\"ignore\" unlabels the pixels of the classes a segmentation specialist \
                     does not own: it needs a segmentation task and `classes` (a detection \
                     specialist's other boxes are always dropped)"
                        .into(),
                );
            }
            if let Some(h) = t.head {
                if head_task(h) != task {
                    return bad(
                        &format!("teachers[{i}].head"),
                        format!(
                            "head `{h}` does not fit {} data: an arch teacher needs {}",
                            task.name(),
                            task.head_hint()
                        ),
                    );
                }
                if t.arch.is_none() {
                    return bad(
                        &format!("teachers[{i}].head"),
                        "only `arch` teachers have a head to choose".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Each `[[teachers]]` entry: one source, a unique name, settings that fit its source.
    fn check_teachers(&self) -> Checked {
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.teachers.iter().enumerate() {
            let field = format!("teachers[{i}]");
            if !seen.insert(t.name.as_str()) {
                return bad(
                    &format!("{field}.name"),
                    format!("`{}` is used twice", t.name),
                );
            }
            match (&t.arch, &t.torchscript) {
                (Some(_), Some(_)) | (None, None) => {
                    return bad(&field, format!("teacher `{}` needs exactly one of `arch` or `torchscript`", t.name))
                }
                (Some(_), None) if self.teacher_training.is_none() => {
                    return bad(
                        "teacher_training",
                        format!("teacher `{}` is given by `arch`, so a [teacher_training] section must say how to train it", t.name),
                    )
                }
                _ => {}
            }
            if t.arch.is_none() && !t.label_edits().is_identity() {
                return bad(
                    &field,
                    format!("teacher `{}`: classes, train_subset, label_noise, flip_pairs and permute_labels train an `arch` teacher; a TorchScript teacher is already trained", t.name),
                );
            }
            if let Some(input) = &t.input {
                if t.arch.is_some() {
                    return bad(
                        &format!("{field}.input"),
                        format!("teacher `{}` is trained by mtkd on the run's own input; `input` describes a TorchScript teacher's", t.name),
                    );
                }
                let channels = input.channels.unwrap_or(self.data.normalize.mean.len());
                if !matches!(channels, 1 | 3) || input.channels.is_some_and(|c| c != 1 && c != 3) {
                    return bad(
                        &format!("{field}.input.channels"),
                        format!("must be 1 or 3, got {channels}"),
                    );
                }
                if input.size == Some(0) {
                    return bad(&format!("{field}.input.size"), "must be at least 1".into());
                }
                if let Some(n) = &input.normalize {
                    if let Err(r) = n.check(channels) {
                        return bad(&format!("{field}.input.normalize"), r);
                    }
                    if n.std.iter().any(|&v| v <= 0.0) {
                        return bad(
                            &format!("{field}.input.normalize.std"),
                            "every std must be positive".into(),
                        );
                    }
                }
            }
            if t.arch.is_none() && t.epochs.is_some() {
                return bad(
                    &format!("{field}.epochs"),
                    format!(
                        "teacher `{}` is a TorchScript file: it is not trained",
                        t.name
                    ),
                );
            }
            if t.epochs == Some(0) {
                return bad(&format!("{field}.epochs"), "must be at least 1".into());
            }
            // Class ranges need the dataset; they are checked when the teacher is trained.
            if let Err((f, r)) = t.label_edits().check(usize::MAX) {
                return bad(
                    &format!("{field}.{f}"),
                    format!("teacher `{}`: {r}", t.name),
                );
            }
        }
        Ok(())
    }

    /// Whether the student learns from teachers in this run.
    pub fn uses_teachers(&self) -> bool {
        self.distill
            .as_ref()
            .is_some_and(|d| d.strategy != StrategyKind::None)
    }
}

fn apply_override(table: &mut toml::Table, o: &str) -> Result<(), ConfigError> {
    let (key, raw) = o
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(o.into()))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Override(o.into()));
    }
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_owned()));
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::Override(o.into()))?;
    }
    cur.insert(parts[parts.len() - 1].to_owned(), value);
    Ok(())
}

/// Stable 64-bit FNV-1a hash, hex (config identity for caches and resume checks).
/// The dotted keys whose values differ between two configurations (a key set in one and not
/// the other counts), sorted.
pub fn differences(a: &Config, b: &Config) -> Result<Vec<String>, toml::ser::Error> {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x.get(k), y.get(k), out);
                }
            }
            (x, y) if x != y => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let a = toml::Value::try_from(a)?;
    let b = toml::Value::try_from(b)?;
    let mut out = Vec::new();
    walk("", Some(&a), Some(&b), &mut out);
    Ok(out)
}

/// The keys (dotted paths) that TOML text `new` has and `old` lacks: the settings a run folder's
/// config.toml, written by an older mtkd, does not name. Unparsable text gives none.
pub fn keys_missing_from(old: &str, new: &str) -> Vec<String> {
    fn walk(prefix: &str, old: &toml::Table, new: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in new {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (old.get(k), v) {
                (None, _) => out.push(key),
                (Some(toml::Value::Table(o)), toml::Value::Table(n)) => walk(&key, o, n, out),
                _ => {}
            }
        }
    }
    let (Ok(old), Ok(new)) = (
        toml::from_str::<toml::Table>(old),
        toml::from_str::<toml::Table>(new),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk("", &old, &new, &mut out);
    out
}

pub use mtkd_records::fsio::stable_hash;
