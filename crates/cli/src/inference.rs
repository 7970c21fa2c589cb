//! Using a trained model without training anything: `mtkd eval` (accuracy, per-class accuracy
//! and the confusion matrix of a model on a split of a dataset) and `mtkd predict` (the top-k
//! classes of image files). A model is a run folder (its student), a student's
//! `.safetensors` (with its architecture), or a TorchScript `.pt` (an exported student or any
//! teacher that follows the teacher contract). The data are described by a `[data]` table only:
//! a run folder brings its own, and nothing about training is needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::Teacher;
use mtkd_engine::config::{DataConfig, TaskKind};
use mtkd_student::{Arch, NativeTeacher};
use mtkd_vision_tasks::classification::Accuracy;
use mtkd_vision_tasks::data::ImageSet;
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};

/// What a model file or folder is.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A run folder: `student.safetensors`, the architecture and data from its `config.toml`.
    Run(PathBuf),
    /// A student's weights; the architecture must be given.
    Weights { path: PathBuf, arch: Arch },
    /// A TorchScript module: `forward(x) -> logits` or `-> (logits, feature_map)`.
    TorchScript(PathBuf),
}

impl ModelSource {
    /// Classify `path`: a folder is a run, `.safetensors` needs `arch`, anything else is read
    /// as TorchScript.
    pub fn of(path: &Path, arch: Option<Arch>) -> Result<ModelSource> {
        if path.is_dir() {
            if !path.join("config.toml").is_file() || !path.join("student.safetensors").is_file() {
                bail!(
                    "{} is a folder but not a finished run folder (it needs config.toml and student.safetensors)",
                    path.display()
                );
            }
            return Ok(ModelSource::Run(path.to_path_buf()));
        }
        if !path.is_file() {
            bail!("the model {} does not exist", path.display());
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            let arch = arch.ok_or_else(|| {
                anyhow!(
                    "{} holds weights only: give the student's architecture with --arch (e.g. cnn-small), or pass its run folder",
                    path.display()
                )
            })?;
            return Ok(ModelSource::Weights {
                path: path.to_path_buf(),
                arch,
            });
        }
        Ok(ModelSource::TorchScript(path.to_path_buf()))
    }

    /// The `[data]` table of a run folder's config (None for a bare model file).
    pub fn run_data(&self) -> Result<Option<DataConfig>> {
        match self {
            ModelSource::Run(dir) => {
                let path = dir.join("config.toml");
                Ok(Some(data_table(&path)?))
            }
            _ => Ok(None),
        }
    }

    /// The class count of a run folder's student, from its summary (None for a bare model file
    /// or a run that did not finish).
    pub fn run_classes(&self) -> Option<usize> {
        let ModelSource::Run(dir) = self else {
            return None;
        };
        let text = std::fs::read(dir.join("summary.json")).ok()?;
        let s: mtkd_engine::record::Summary = serde_json::from_slice(&text).ok()?;
        Some(s.final_report.per_class.len()).filter(|&k| k > 0)
    }

    /// The head of a run folder's student (a classifier for bare weights).
    fn head(&self) -> Result<mtkd_student::HeadKind> {
        match self {
            ModelSource::Run(dir) => Ok(mtkd_engine::Config::load(&dir.join("config.toml"), &[])?
                .student
                .head),
            _ => Ok(mtkd_student::HeadKind::Classifier),
        }
    }

    fn arch(&self) -> Result<Option<Arch>> {
        match self {
            ModelSource::Run(dir) => {
                let cfg = mtkd_engine::Config::load(&dir.join("config.toml"), &[])?;
                Ok(Some(cfg.student.arch))
            }
            ModelSource::Weights { arch, .. } => Ok(Some(*arch)),
            ModelSource::TorchScript(_) => Ok(None),
        }
    }
}

/// The `[data]` table of a TOML file (a run config, or a file holding only `[data]`), with
/// the file named in errors.
pub fn data_table(path: &Path) -> Result<DataConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let data = table
        .remove("data")
        .ok_or_else(|| anyhow!("{} has no [data] table", path.display()))?;
    data.try_into()
        .with_context(|| format!("{}: the [data] table", path.display()))
}

/// The size and channels single images of `data` are read at.
fn geometry(data: &DataConfig) -> (u32, usize) {
    let root = mtkd_engine::dataset::resolve_root(&data.root);
    data.source(&root).geometry()
}

/// How reports name a dataset: its kind and resolved root.
fn describe(data: &DataConfig) -> String {
    format!(
        "{:?} {}",
        data.kind,
        mtkd_engine::dataset::resolve_root(&data.root).display()
    )
}

fn eval_loader(set: Arc<ImageSet>, data: &DataConfig, batch_size: usize) -> Result<BatchLoader> {
    BatchLoader::new(
        set,
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            augment: None,
            eval_resize: data.eval_resize.clone(),
            normalize: data.normalize.clone(),
            seed: 0,
        },
    )
    .context("data.normalize / data.eval_resize")
}

/// What a model's output is, for loading and checking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Class logits `[B, K]`.
    Classes,
    /// Per-pixel logits `[B, K, H, W]` (segmentation).
    Dense,
    /// A detector's `[B, K + 5, L]` over `locations` locations.
    Boxes { locations: i64 },
}

/// A loaded model, ready to classify batches.
pub struct Model {
    net: Box<dyn Teacher>,
    /// What it was loaded from, for reports.
    pub source: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .finish()
    }
}

impl Model {
    /// Load `src` for inputs of `input` `(C, H, W)` and `num_classes` classes.
    pub fn load(
        src: &ModelSource,
        input: (i64, i64, i64),
        num_classes: i64,
        device: Device,
    ) -> Result<Model> {
        Self::load_for(src, input, num_classes, device, Output::Classes)
    }

    /// As [`Model::load`], for a model whose output is `output`.
    /// [`Model::load_for`] with the input shape of `loader`'s batches.
    pub fn for_loader(
        src: &ModelSource,
        loader: &BatchLoader,
        num_classes: usize,
        device: Device,
        output: Output,
    ) -> Result<Model> {
        let (c, h, w) = loader.output_shape();
        Self::load_for(
            src,
            (c as i64, h as i64, w as i64),
            num_classes as i64,
            device,
            output,
        )
    }

    pub fn load_for(
        src: &ModelSource,
        input: (i64, i64, i64),
        num_classes: i64,
        device: Device,
        output: Output,
    ) -> Result<Model> {
        if output != Output::Classes && matches!(src, ModelSource::Weights { .. }) {
            bail!("a segmentation or detection student's weights need their head: pass its run folder (or its student.pt)");
        }
        let (net, source): (Box<dyn Teacher>, String) = match src {
            ModelSource::Run(dir) => {
                let arch = src.arch()?.ok_or_else(|| anyhow!("no architecture"))?;
                let w = dir.join("student.safetensors");
                (
                    Box::new(
                        NativeTeacher::load(
                            "student",
                            arch,
                            src.head()?,
                            &w,
                            input,
                            num_classes,
                            device,
                        )
                        .with_context(|| format!("loading {}", w.display()))?,
                    ),
                    format!("{arch} student of {}", dir.display()),
                )
            }
            ModelSource::Weights { path, arch } => (
                Box::new(
                    NativeTeacher::load(
                        "student",
                        *arch,
                        mtkd_student::HeadKind::Classifier,
                        path,
                        input,
                        num_classes,
                        device,
                    )
                    .with_context(|| format!("loading {} as {arch}", path.display()))?,
                ),
                format!("{arch} weights {}", path.display()),
            ),
            ModelSource::TorchScript(path) => {
                let expect = mtkd_teachers::Expectation {
                    input,
                    num_classes,
                    needs_features: false,
                    dense: output == Output::Dense,
                    det_locations: match output {
                        Output::Boxes { locations } => Some(locations),
                        _ => None,
                    },
                };
                // The teacher crate's contract, worded for a model being used, not taught from.
                let module =
                    mtkd_teachers::TorchScriptTeacher::load("model", path, device, &expect)
                        .map_err(|e| match e {
                            mtkd_teachers::Error::TeacherContract { path, reason } => anyhow!(
                                "the model {} does not fit these data: {reason}",
                                path.display()
                            ),
                            mtkd_teachers::Error::Missing { path } => {
                                anyhow!("the model {} does not exist", path.display())
                            }
                            mtkd_teachers::Error::Corrupt { path, reason } => anyhow!(
                                "the model {} is not a loadable TorchScript module: {reason}",
                                path.display()
                            ),
                            other => anyhow::Error::new(other)
                                .context(format!("loading {}", path.display())),
                        })?;
                (Box::new(module), format!("TorchScript {}", path.display()))
            }
        };
        Ok(Model { net, source })
    }

    /// Logits `[B, K]` of a normalised batch.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.net.forward(images)?.logits)
    }

    /// The output of a normalised batch, as an evaluation takes it: an error naming the model
    /// when it is NaN or infinite.
    pub fn checked_output(&self, images: &Tensor) -> Result<mtkd_distill_core::ModelOutput> {
        let logits = self.logits(images)?;
        mtkd_distill_core::loss::ensure_finite("logits", &logits)
            .map_err(|_| anyhow!("{} gives NaN or infinite outputs", self.source))?;
        Ok(mtkd_distill_core::ModelOutput {
            logits,
            features: None,
        })
    }
}

/// One class's line of an [`EvalReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassLine {
    pub class: String,
    pub samples: usize,
    pub top1: f64,
}

/// The model, the data and the split an evaluation ran on, and how many images it saw: the
/// first fields of every `mtkd eval` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluated {
    pub model: String,
    pub data: String,
    pub split: String,
    pub samples: usize,
}

impl Evaluated {
    fn new(model: &Model, data: &DataConfig, split: EvalSplit, samples: usize) -> Evaluated {
        Evaluated {
            model: model.source.clone(),
            data: describe(data),
            split: format!("{split:?}").to_lowercase(),
            samples,
        }
    }
}

/// What `mtkd eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// What was evaluated on what.
    #[serde(flatten)]
    pub on: Evaluated,
    pub top1: f64,
    pub top5: f64,
    pub mean_cross_entropy: f64,
    pub per_class: Vec<ClassLine>,
    /// `confusion[true][predicted]`: sample counts.
    pub confusion: Vec<Vec<u64>>,
}

/// Which split `mtkd eval` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalSplit {
    Test,
    Train,
}

impl From<EvalSplit> for mtkd_vision_tasks::data::Split {
    fn from(s: EvalSplit) -> Self {
        match s {
            EvalSplit::Test => mtkd_vision_tasks::data::Split::Test,
            EvalSplit::Train => mtkd_vision_tasks::data::Split::Train,
        }
    }
}

/// Load one split of `data` (its subset settings applied; the other split is not read).
pub fn load_split(data: &DataConfig, split: EvalSplit) -> Result<ImageSet> {
    mtkd_engine::dataset::Datasets::load_split(data, split.into())
}

/// Evaluate `src` on a split of `data`.
pub fn evaluate(
    src: &ModelSource,
    data: &DataConfig,
    split: EvalSplit,
    batch_size: usize,
    device: Device,
) -> Result<EvalReport> {
    if data.task() != TaskKind::Classification {
        bail!(
            "this is {} data: use inference::evaluate_{} (`mtkd eval` does)",
            data.task().name(),
            data.task().name()
        );
    }
    let set = Arc::new(load_split(data, split)?);
    let loader = eval_loader(Arc::clone(&set), data, batch_size)?;
    let k = set.num_classes;
    let model = Model::for_loader(src, &loader, k, device, Output::Classes)?;
    let mut acc = Accuracy::new(k);
    let mut confusion = vec![vec![0u64; k]; k];
    let mut ce = 0.0f64;
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0, 0, device) {
            let logits = model.logits(&batch.images)?;
            mtkd_distill_core::loss::ensure_finite("logits", &logits)
                .map_err(|_| anyhow!("{} gives NaN or infinite logits", model.source))?;
            acc.update(&logits, &batch.labels)?;
            ce += mtkd_distill_core::loss::cross_entropy(&logits, &batch.labels)?
                .sum(Kind::Double)
                .double_value(&[]);
            let pred = Vec::<i64>::try_from(&logits.argmax(1, false).to_device(Device::Cpu))?;
            let truth = Vec::<i64>::try_from(&batch.labels.to_device(Device::Cpu))?;
            for (t, p) in truth.iter().zip(&pred) {
                confusion[*t as usize][*p as usize] += 1;
            }
        }
        Ok(())
    })?;
    let report = acc.report();
    let per_class = (0..k)
        .map(|i| ClassLine {
            class: set
                .class_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| i.to_string()),
            samples: confusion[i].iter().sum::<u64>() as usize,
            top1: report.per_class.get(i).copied().unwrap_or(f64::NAN),
        })
        .collect();
    Ok(EvalReport {
        on: Evaluated::new(&model, data, split, set.len()),
        top1: report.top1,
        top5: report.top5,
        mean_cross_entropy: ce / set.len().max(1) as f64,
        per_class,
        confusion,
    })
}

/// What `mtkd eval` reports of a segmentation model (percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegEvalReport {
    /// What was evaluated on what.
    #[serde(flatten)]
    pub on: Evaluated,
    /// mIoU (`value`), pixel accuracy, per-class IoU.
    pub report: mtkd_engine::record::MetricReport,
    pub class_names: Vec<String>,
    /// Mean over images of the per-pixel cross-entropy.
    pub mean_cross_entropy: f64,
}

/// Evaluate a segmentation model `src` on a split of `data`: mIoU, pixel accuracy, IoU per
/// class, the same computation as training's evaluation.
pub fn evaluate_segmentation(
    src: &ModelSource,
    data: &DataConfig,
    split: EvalSplit,
    batch_size: usize,
    device: Device,
) -> Result<SegEvalReport> {
    let task = mtkd_vision_tasks::task::Segmentation::default();
    let set = Arc::new(load_split(data, split)?);
    let loader = eval_loader(Arc::clone(&set), data, batch_size)?;
    let k = set.num_classes;
    let model = Model::for_loader(src, &loader, k, device, Output::Dense)?;
    let (report, ce) =
        mtkd_engine::trainer::evaluate(&|x| model.checked_output(x), &loader, device, &task, k)?;
    Ok(SegEvalReport {
        on: Evaluated::new(&model, data, split, set.len()),
        report,
        class_names: set.class_names.clone(),
        mean_cross_entropy: ce,
    })
}

/// What `mtkd eval` reports of a detection model (percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetEvalReport {
    /// What was evaluated on what.
    #[serde(flatten)]
    pub on: Evaluated,
    /// AP@[.5:.95] (`value`), AP50, AP75, AP by size, AR, AP per class: COCO's evaluation.
    pub report: mtkd_engine::record::MetricReport,
    pub class_names: Vec<String>,
    /// Mean over images of the FCOS loss against the ground truth.
    pub mean_loss: f64,
    /// Where the detections were written in COCO's result format, when asked.
    pub detections: Option<PathBuf>,
}

/// Evaluate a detection model `src` on a split of `data` through the trainer's evaluation
/// (the same assignment, post-processing and COCO AP); with `detections`, write the
/// detections there in COCO's result format, with the data's COCO ids when the split was read
/// whole (else index + 1), as a run's `detections.json` is.
pub fn evaluate_detection(
    src: &ModelSource,
    data: &DataConfig,
    split: EvalSplit,
    batch_size: usize,
    device: Device,
    detections: Option<&Path>,
) -> Result<DetEvalReport> {
    use mtkd_vision_tasks::detection::{coco, layout::DetLayout, DetMetric};
    use mtkd_vision_tasks::task::{task_of, Metric, TaskParams};
    let set = Arc::new(load_split(data, split)?);
    let loader = eval_loader(Arc::clone(&set), data, batch_size)?;
    let (c, h, w) = loader.output_shape();
    let hw = (h as i64, w as i64);
    let k = set.num_classes;
    let task = task_of(
        TaskKind::Detection,
        &TaskParams {
            image: hw,
            box_kd_weight: 1.0,
            ..TaskParams::default()
        },
    );
    let locations = task.logits_shape(k as i64, hw)[1];
    let model = Model::load_for(
        src,
        (c as i64, hw.0, hw.1),
        k as i64,
        device,
        Output::Boxes { locations },
    )?;
    let mut metric = DetMetric::new(DetLayout::standard(hw), k);
    let mean_loss = mtkd_engine::trainer::evaluate_into(
        &|x| model.checked_output(x),
        &loader,
        device,
        task.as_ref(),
        &mut metric,
    )?;
    if let Some(path) = detections {
        let (ids, cats) =
            mtkd_engine::dataset::coco_ids_of(data, split.into())?.unwrap_or_default();
        coco::write_results(path, metric.detections(), &ids, &cats)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(DetEvalReport {
        on: Evaluated::new(&model, data, split, set.len()),
        report: metric.report(),
        class_names: set.class_names.clone(),
        mean_loss,
        detections: detections.map(Path::to_path_buf),
    })
}

/// One image's segmentation from `mtkd predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegPrediction {
    pub image: String,
    /// The predicted class of every pixel, an 8-bit index PNG of the image's size.
    pub mask: PathBuf,
    /// The image with the prediction drawn over it and a legend of the classes.
    pub overlay: PathBuf,
    /// The classes predicted, with their share of the image's pixels, largest first.
    pub classes: Vec<ClassShare>,
}

/// A class's share of a predicted mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassShare {
    pub class: String,
    pub label: usize,
    pub share: f64,
}

/// The class count of a dense model's predictions (`--classes`, the data's `num_classes` or
/// `class_names`, a run's summary), and at least one image to predict.
fn dense_classes(
    src: &ModelSource,
    data: &DataConfig,
    images: &[PathBuf],
    num_classes: Option<usize>,
) -> Result<usize> {
    if images.is_empty() {
        bail!("give at least one image file");
    }
    num_classes
        .or(data.num_classes)
        .or((!data.class_names.is_empty()).then_some(data.class_names.len()))
        .or_else(|| src.run_classes())
        .ok_or_else(|| {
            anyhow!("give the class count with --classes (the [data] table has neither num_classes nor class_names)")
        })
}

/// Segment each image file with a segmentation model, read and normalised as the data's test
/// split is (its own size, grey or RGB): per image `<stem>.mask.png` (the class of every pixel
/// as an 8-bit index PNG, the format of a mask folder) and `<stem>.overlay.png` under `out`.
/// The class count comes from `num_classes`, the data's `num_classes` or its `class_names`.
pub fn predict_segmentation(
    src: &ModelSource,
    data: &DataConfig,
    images: &[PathBuf],
    out: &Path,
    num_classes: Option<usize>,
    device: Device,
) -> Result<Vec<SegPrediction>> {
    let k = dense_classes(src, data, images, num_classes)?;
    let names = class_names(data, k);
    let channels = data.channels.unwrap_or(geometry(data).1);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut preds = Vec::new();
    for path in images {
        let (w, h) = image::image_dimensions(path)
            .with_context(|| format!("reading the image {}", path.display()))?;
        let pixels = mtkd_vision_tasks::data::read_image(path, 0, channels)
            .with_context(|| format!("reading the image {}", path.display()))?;
        let arr =
            ndarray::Array4::from_shape_vec((1, channels, h as usize, w as usize), pixels.clone())?;
        let set = Arc::new(ImageSet::new(arr, vec![0], k)?);
        let loader = eval_loader(set, data, 1)?;
        let (c, lh, lw) = loader.output_shape();
        let model = Model::for_loader(src, &loader, k, device, Output::Dense)?;
        let batch = loader
            .epoch(0, 0, device)
            .next()
            .ok_or_else(|| anyhow!("no batch from {}", path.display()))?;
        let logits = tch::no_grad(|| model.logits(&batch.images))?;
        let classes = Vec::<i64>::try_from(
            &logits
                .argmax(1, false)
                .to_device(Device::Cpu)
                .flatten(0, -1),
        )?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mask_path = out.join(format!("{stem}.mask.png"));
        let bytes: Vec<u8> = classes.iter().map(|&c| c as u8).collect();
        let mut png = Vec::new();
        image::GrayImage::from_raw(lw as u32, lh as u32, bytes)
            .ok_or_else(|| anyhow!("the prediction does not match the image's size"))?
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        mtkd_engine::fsio::write_atomic(&mask_path, &png)?;
        let overlay = out.join(format!("{stem}.overlay.png"));
        mtkd_engine::plot::segmentation_overlays(
            &overlay,
            (lh, lw),
            &["prediction".to_owned()],
            &names,
            &[mtkd_engine::plot::OverlayRow {
                image: pixels,
                channels: c,
                maps: vec![classes.clone()],
            }],
        )?;
        let mut counts = vec![0usize; k];
        for &c in &classes {
            counts[c as usize] += 1;
        }
        let mut shares: Vec<ClassShare> = counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(label, &n)| ClassShare {
                class: names[label].clone(),
                label,
                share: n as f64 / classes.len() as f64,
            })
            .collect();
        shares.sort_by(|a, b| b.share.total_cmp(&a.share).then(a.label.cmp(&b.label)));
        preds.push(SegPrediction {
            image: path.display().to_string(),
            mask: mask_path,
            overlay,
            classes: shares,
        });
    }
    Ok(preds)
}

/// One image's detections from `mtkd predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetPrediction {
    pub image: String,
    /// The image with its boxes drawn, their class's colour, scores beside them.
    pub drawn: PathBuf,
    /// The boxes above the score threshold, best first, in the pixels of the network's input
    /// (the data's image size).
    pub boxes: Vec<PredictedBox>,
}

/// One detected object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictedBox {
    pub class: String,
    pub label: usize,
    pub score: f64,
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
}

/// Detect objects in each image file with a detection model, read and normalised as the data's
/// test split is (resized to the data's image size): the boxes scoring at least `min_score`
/// after the training's post-processing (class-aware NMS), and `<stem>.boxes.png` under `out`.
pub fn predict_detection(
    src: &ModelSource,
    data: &DataConfig,
    images: &[PathBuf],
    out: &Path,
    min_score: f64,
    num_classes: Option<usize>,
    device: Device,
) -> Result<Vec<DetPrediction>> {
    use mtkd_vision_tasks::detection::{self as det, layout::DetLayout};
    if !(0.0..=1.0).contains(&min_score) {
        bail!("--min-score must be in [0, 1], got {min_score}");
    }
    let k = dense_classes(src, data, images, num_classes)?;
    let names = class_names(data, k);
    let side = mtkd_engine::trainer::detection_side(data);
    if side <= 0 {
        bail!("the [data] table gives no image size for the detector (data.image_size)");
    }
    let channels = data.channels.unwrap_or(geometry(data).1);
    let mut pixels = Vec::new();
    for p in images {
        pixels.extend(
            mtkd_vision_tasks::data::read_image(p, side as u32, channels)
                .with_context(|| format!("reading the image {}", p.display()))?,
        );
    }
    let n = images.len();
    let arr = ndarray::Array4::from_shape_vec(
        (n, channels, side as usize, side as usize),
        pixels.clone(),
    )?;
    let set = Arc::new(ImageSet::new(arr, vec![0; n], k)?);
    let loader = eval_loader(set, data, 16)?;
    let (_, h, w) = loader.output_shape();
    let layout = DetLayout::standard((h as i64, w as i64));
    let model = Model::for_loader(
        src,
        &loader,
        k,
        device,
        Output::Boxes {
            locations: layout.len(),
        },
    )?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let pp = det::Postprocess {
        score_threshold: min_score,
        ..Default::default()
    };
    let per_image = channels * side as usize * side as usize;
    let mut preds = Vec::new();
    for batch in loader.epoch(0, 0, device) {
        let logits = tch::no_grad(|| model.checked_output(&batch.images))?.logits;
        let dets = det::postprocess(&layout, &logits, k as i64, &pp)?;
        for (&i, ds) in batch.indices.iter().zip(dets) {
            let stem = images[i]
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into());
            let drawn = out.join(format!("{stem}.boxes.png"));
            mtkd_engine::plot::detection_overlays(
                &drawn,
                (h, w),
                &["prediction".to_owned()],
                &names,
                &[mtkd_engine::plot::BoxRow {
                    image: pixels[i * per_image..(i + 1) * per_image].to_vec(),
                    channels,
                    boxes: vec![ds
                        .iter()
                        .map(|d| mtkd_engine::plot::DrawBox {
                            class: d.class,
                            bbox: d.bbox,
                            score: Some(d.score),
                        })
                        .collect()],
                }],
            )?;
            preds.push(DetPrediction {
                image: images[i].display().to_string(),
                drawn,
                boxes: ds
                    .iter()
                    .map(|d| PredictedBox {
                        class: names[d.class].clone(),
                        label: d.class,
                        score: f64::from(d.score),
                        bbox: d.bbox,
                    })
                    .collect(),
            });
        }
    }
    Ok(preds)
}

/// One image's answer from `mtkd predict`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub image: String,
    /// The top-k classes, most probable first.
    pub top: Vec<TopClass>,
}

/// One of a [`Prediction`]'s classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopClass {
    pub class: String,
    pub label: usize,
    pub probability: f64,
}

/// The class folders of an ImageFolder dataset (its `train/` sub-folders, sorted: the label
/// order the reader gives), None when they cannot be read.
pub fn class_folders(data: &DataConfig) -> Option<Vec<String>> {
    let root = mtkd_engine::dataset::resolve_root(&data.root);
    data.source(&root).class_folders()
}

/// The class names of `data`: `data.class_names`, the class folders of an ImageFolder, or the
/// label numbers.
pub fn class_names(data: &DataConfig, num_classes: usize) -> Vec<String> {
    if !data.class_names.is_empty() {
        return data.class_names.clone();
    }
    match class_folders(data) {
        Some(v) if v.len() == num_classes => v,
        _ => (0..num_classes).map(|i| i.to_string()).collect(),
    }
}

/// The top-`k` classes of each image file, read and normalised as the data's test split is.
/// `num_classes` is needed for a bare model file when the data do not say (run folders and
/// `class_names` do).
pub fn predict(
    src: &ModelSource,
    data: &DataConfig,
    images: &[PathBuf],
    k: usize,
    num_classes: Option<usize>,
    device: Device,
) -> Result<Vec<Prediction>> {
    if images.is_empty() {
        bail!("give at least one image file");
    }
    if k == 0 {
        bail!("--top-k must be at least 1 (it is the number of classes shown per image)");
    }
    let num_classes = match num_classes {
        Some(n) => n,
        None if !data.class_names.is_empty() => data.class_names.len(),
        None => {
            let root = mtkd_engine::dataset::resolve_root(&data.root);
            let source = data.source(&root);
            if data.task() != TaskKind::Classification {
                bail!(
                    "this is {} data: use inference::predict_{} (`mtkd predict` does)",
                    data.task().name(),
                    data.task().name()
                );
            }
            match source.known_classes().or_else(|| source.class_folders().map(|v| v.len())) {
                Some(k) => k,
                None => bail!(
                    "give the class count with --classes: the data's class folders ({}) cannot be read",
                    root.join("train").display()
                ),
            }
        }
    };
    let (size, channels) = geometry(data);
    let mut pixels = Vec::new();
    for p in images {
        pixels.extend(
            mtkd_vision_tasks::data::read_image(p, size, channels)
                .with_context(|| format!("reading the image {}", p.display()))?,
        );
    }
    let arr = ndarray::Array4::from_shape_vec(
        (images.len(), channels, size as usize, size as usize),
        pixels,
    )?;
    let set = Arc::new(ImageSet::new(arr, vec![0; images.len()], num_classes)?);
    let loader = eval_loader(set, data, 64)?;
    let model = Model::for_loader(src, &loader, num_classes, device, Output::Classes)?;
    let names = class_names(data, num_classes);
    let mut out = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0, 0, device) {
            let probs = model.logits(&batch.images)?.softmax(1, Kind::Float);
            let kk = k.clamp(1, num_classes) as i64;
            let (p, idx) = probs.topk(kk, 1, true, true);
            let p = Vec::<f32>::try_from(&p.to_device(Device::Cpu).flatten(0, -1))?;
            let idx = Vec::<i64>::try_from(&idx.to_device(Device::Cpu).flatten(0, -1))?;
            for (row, &i) in batch.indices.iter().enumerate() {
                let kk = kk as usize;
                out.push(Prediction {
                    image: images[i].display().to_string(),
                    top: (0..kk)
                        .map(|j| {
                            let l = idx[row * kk + j] as usize;
                            TopClass {
                                class: names[l].clone(),
                                label: l,
                                probability: f64::from(p[row * kk + j]),
                            }
                        })
                        .collect(),
                });
            }
        }
        Ok(())
    })?;
    Ok(out)
}
