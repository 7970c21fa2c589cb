//! mtkd-teachers: TorchScript teachers loaded with libtorch (`tch::CModule`), checked against the
//! output contract at load time, run frozen in eval mode without gradient tracking.
//!
//! # The output contract
//! A teacher file is a TorchScript module whose `forward(x)` takes a float batch `[B, C, H, W]`
//! (already normalised as the dataset config says) and returns either
//! - a tuple `(logits [B, K], feature_map [B, C', H', W'])`, the feature map being the last
//!   convolutional map from which the embedding is pooled (logit and feature KD), or
//! - a single tensor `logits [B, K]` (logit-only KD).
//!
//! A segmentation teacher returns per-pixel logits `[B, K, H, W]` instead of `[B, K]` (with or
//! without its feature map), checked when [`Expectation::dense`] is set. Logits at another
//! resolution than the input are resized bilinearly to it (said once in the log at load).
//!
//! A detection teacher ([`Expectation::det_locations`]) returns `[B, K + 5, L]`: per location
//! of the detector layout, `K` class logits, the four distances to the box's sides divided by
//! the location's stride, and a centerness logit; its feature map, if any, is the pyramid's
//! levels flattened the same way, `[B, C, L, 1]`.
//!
//! `scripts/export_teacher.py` wraps a PyTorch model into this contract.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

use mtkd_distill_core::{FeatureShape, Precision};
/// Re-exported so that a program needs only this crate to load and run a teacher.
pub use mtkd_distill_core::{ModelOutput, Teacher};

/// Errors of teacher loading and running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("teacher file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("teacher file {path} is not a loadable TorchScript module: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("teacher {path} breaks the output contract: {reason}")]
    TeacherContract { path: PathBuf, reason: String },
    #[error("teacher `{name}` failed on a batch: {source}")]
    Forward {
        name: String,
        #[source]
        source: tch::TchError,
    },
    #[error(transparent)]
    Core(#[from] mtkd_distill_core::Error),
}

/// Result alias of the teachers crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What the caller expects of a teacher, checked with a probe batch at load time.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Input `(C, H, W)` the dataset produces.
    pub input: (i64, i64, i64),
    /// Class count of the dataset.
    pub num_classes: i64,
    /// Whether feature KD is configured (then the teacher must return a feature map).
    pub needs_features: bool,
    /// Segmentation: the logits are per pixel, `[B, K, H, W]`.
    pub dense: bool,
    /// Detection: the output is `[B, K + 5, L]` over this many locations `L` (the layout of
    /// `mtkd_vision_tasks::detection::layout` for the input's size), the feature map, if any,
    /// `[B, C, L, 1]`.
    pub det_locations: Option<i64>,
}

/// A frozen TorchScript teacher.
#[derive(Debug)]
pub struct TorchScriptTeacher {
    name: String,
    path: PathBuf,
    module: CModule,
    num_classes: i64,
    feature_shape: Option<FeatureShape>,
    /// Segmentation logits at another resolution than the input: resized to this `(H, W)`.
    resize_to: Option<(i64, i64)>,
    device: Device,
    /// What the module computes in (its weights were cast to it at load).
    precision: Precision,
    /// Its 4-D parameters re-laid channels-last: each batch is passed channels-last too.
    channels_last: bool,
}

impl TorchScriptTeacher {
    /// Load `path` onto `device`, put it in eval mode and validate it with a probe batch.
    pub fn load(name: &str, path: &Path, device: Device, expect: &Expectation) -> Result<Self> {
        Self::load_in(name, path, device, expect, Precision::Fp32)
    }

    /// [`TorchScriptTeacher::load`], then compute in `precision`: the module's parameters and
    /// buffers are cast to it and each batch is cast to it on the way in; the outputs reach
    /// the caller as float32. The probe batch runs in that precision, so a module that cannot
    /// (a frozen module keeps its weights as float32 constants) is refused here with the way
    /// out: export it in that precision (`scripts/export_teacher.py --precision bf16`).
    pub fn load_in(
        name: &str,
        path: &Path,
        device: Device,
        expect: &Expectation,
        precision: Precision,
    ) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
            });
        }
        let mut module = CModule::load_on_device(path, device).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: first_line(&e.to_string()),
        })?;
        module.set_eval();
        if precision != Precision::Fp32 {
            module.to(device, precision.kind(), false);
        }
        let mut t = TorchScriptTeacher {
            name: name.to_owned(),
            path: path.to_path_buf(),
            module,
            num_classes: 0,
            feature_shape: None,
            resize_to: None,
            device,
            precision,
            channels_last: false,
        };
        t.validate(expect).map_err(|e| match (precision, e) {
            (Precision::Fp32, e) => e,
            (p, Error::TeacherContract { path, reason }) => Error::TeacherContract {
                path,
                reason: format!(
                    "{reason} (with its weights cast to {p}: a module that cannot compute in \
                     {p}, such as a frozen one, is exported in it instead with \
                     `scripts/export_teacher.py --precision {p}` and loaded as it is)"
                ),
            },
            (_, e) => e,
        })?;
        tracing::info!(teacher = name, path = %path.display(), classes = t.num_classes,
            features = ?t.feature_shape, "loaded TorchScript teacher");
        Ok(t)
    }

    fn contract(&self, reason: impl Into<String>) -> Error {
        Error::TeacherContract {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn validate(&mut self, expect: &Expectation) -> Result<()> {
        let (c, h, w) = expect.input;
        // A fixed pseudo-random probe (not zeros: a constant input can hide NaN paths).
        let probe = tch::no_grad(|| {
            Tensor::arange(2 * c * h * w, (Kind::Float, self.device))
                .view([2, c, h, w])
                .sin()
        });
        let out = self.raw_forward(&probe).map_err(|e| match e {
            Error::Forward { source, .. } => self.contract(format!(
                "forward failed on a probe batch of shape [2, {c}, {h}, {w}] (the input it will get): {}. \
                 A teacher trained on other input (channels, size, normalisation) is given its own with \
                 `[[teachers]] input = {{ channels = 3, size = 224, normalize = {{ mean = [...], std = [...] }} }}`",
                error_line(&source.to_string())
            )),
            other => other,
        })?;
        let mut ls = out.logits.size();
        if let Some(l) = expect.det_locations {
            if ls.len() != 3 || ls[0] != 2 || ls[2] != l || ls[1] < 6 {
                return Err(self.contract(format!(
                    "a detection teacher's output must be [B, K + 5, L] = [2, {}, {l}] (class \
                     logits, 4 box distances, centerness over the {l} locations of a {h}x{w} \
                     input at strides 4, 8, 16), got shape {ls:?}",
                    expect.num_classes + 5
                )));
            }
            ls[1] -= 5;
        } else if expect.dense {
            if ls.len() != 4 || ls[0] != 2 {
                return Err(self.contract(format!(
                    "a segmentation teacher's logits must be [B, K, H, W], got shape {ls:?}"
                )));
            }
            if (ls[2], ls[3]) != (h, w) {
                tracing::warn!(teacher = %self.name, logits = ?(ls[2], ls[3]), input = ?(h, w),
                    "the teacher's logits are not at the input's resolution; they are resized bilinearly to it");
                self.resize_to = Some((h, w));
            }
        } else if ls.len() != 2 || ls[0] != 2 {
            return Err(self.contract(format!("logits must be [B, K], got shape {ls:?}")));
        }
        if ls[1] != expect.num_classes {
            return Err(self.contract(format!(
                "it predicts {} classes but the dataset has {}",
                ls[1], expect.num_classes
            )));
        }
        if !matches!(
            out.logits.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(self.contract(format!(
                "logits must be floating point, got {:?}",
                out.logits.kind()
            )));
        }
        self.num_classes = ls[1];
        match &out.features {
            Some(f) => {
                let fs = f.size();
                if fs.len() != 4 || fs[0] != 2 {
                    return Err(self.contract(format!(
                        "the second output must be the feature map [B, C, H, W], got shape {fs:?}"
                    )));
                }
                if let Some(l) = expect.det_locations {
                    if (fs[2], fs[3]) != (l, 1) {
                        return Err(self.contract(format!(
                            "a detection teacher's feature map must be its pyramid levels \
                             flattened, [B, C, {l}, 1], got shape {fs:?}"
                        )));
                    }
                }
                self.feature_shape = Some((fs[1], fs[2], fs[3]));
            }
            None if expect.needs_features => {
                return Err(self.contract(
                    "feature distillation is configured but this teacher returns logits only; \
                     export it with its feature layer (scripts/export_teacher.py --feature-layer) \
                     or set feature_weight = 0",
                ));
            }
            None => {}
        }
        for (what, t) in [
            ("logits", Some(&out.logits)),
            ("feature map", out.features.as_ref()),
        ] {
            if let Some(t) = t {
                if mtkd_distill_core::loss::ensure_finite(what, t).is_err() {
                    return Err(
                        self.contract(format!("its {what} on the probe batch are not finite"))
                    );
                }
            }
        }
        Ok(())
    }

    /// The batch as the module takes it: in its precision and layout.
    fn input(&self, images: &Tensor) -> Tensor {
        let x = self.precision.input(images);
        if self.channels_last && x.dim() == 4 {
            mtkd_distill_core::to_channels_last(&x)
        } else {
            x
        }
    }

    fn raw_forward(&self, images: &Tensor) -> Result<ModelOutput> {
        let fwd = |source| Error::Forward {
            name: self.name.clone(),
            source,
        };
        let out = tch::no_grad(|| {
            self.module
                .forward_is(&[IValue::Tensor(self.input(images))])
        })
        .map_err(fwd)?;
        let cl = self.channels_last;
        let as_float = |t: Tensor| {
            let t = if cl { t.contiguous() } else { t };
            if t.kind() == Kind::Float {
                t
            } else {
                t.to_kind(Kind::Float)
            }
        };
        match out {
            IValue::Tensor(logits) => Ok(ModelOutput {
                logits: as_float(logits),
                features: None,
            }),
            IValue::Tuple(mut items) | IValue::GenericList(mut items) if items.len() == 2 => {
                let f = items.pop();
                let l = items.pop();
                match (l, f) {
                    (Some(IValue::Tensor(l)), Some(IValue::Tensor(f))) => Ok(ModelOutput {
                        logits: as_float(l),
                        features: Some(as_float(f)),
                    }),
                    _ => Err(self.contract("forward must return (logits, feature_map) tensors")),
                }
            }
            IValue::TensorList(mut ts) if ts.len() == 2 => {
                let f = ts.pop().map(as_float);
                let l = ts
                    .pop()
                    .map(as_float)
                    .unwrap_or_else(|| Tensor::zeros([0], tch::kind::FLOAT_CPU));
                Ok(ModelOutput {
                    logits: l,
                    features: f,
                })
            }
            other => Err(self.contract(format!(
                "forward must return a tensor (logits) or a pair (logits, feature_map), got {}",
                describe(&other)
            ))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Run in channels-last layout (or back): the module's 4-D parameters (convolution
    /// weights) are re-laid in place and each batch is passed channels-last, so oneDNN's CPU
    /// convolutions skip their layout conversions; the outputs are made contiguous again.
    /// Returns whether the layout is now channels-last: a frozen module keeps its weights as
    /// constants, which cannot be re-laid, and is left as it is (it can be exported
    /// channels-last instead, `export-teacher --channels-last`).
    pub fn set_channels_last(&mut self, on: bool) -> Result<bool> {
        if on == self.channels_last {
            return Ok(on);
        }
        let params = self.module.named_parameters().map_err(|e| Error::Corrupt {
            path: self.path.clone(),
            reason: first_line(&e.to_string()),
        })?;
        let four: Vec<Tensor> = params
            .into_iter()
            .map(|(_, t)| t)
            .filter(|t| t.dim() == 4)
            .collect();
        if four.is_empty() {
            return Ok(self.channels_last);
        }
        tch::no_grad(|| {
            for mut p in four {
                let laid = if on {
                    mtkd_distill_core::to_channels_last(&p)
                } else {
                    p.contiguous()
                };
                p.set_data(&laid);
            }
        });
        self.channels_last = on;
        tracing::info!(teacher = %self.name, channels_last = on, "teacher layout");
        Ok(on)
    }

    pub fn channels_last(&self) -> bool {
        self.channels_last
    }
}

impl Teacher for TorchScriptTeacher {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_classes(&self) -> i64 {
        self.num_classes
    }
    fn feature_shape(&self) -> Option<FeatureShape> {
        self.feature_shape
    }
    fn forward(&self, images: &Tensor) -> mtkd_distill_core::Result<ModelOutput> {
        let mut out = self
            .raw_forward(images)
            .map_err(|e| mtkd_distill_core::Error::Invalid {
                what: format!("teacher `{}` ({})", self.name, self.path.display()),
                reason: e.to_string(),
            })?;
        if let Some((h, w)) = self.resize_to {
            out.logits = out
                .logits
                .f_upsample_bilinear2d([h, w], false, None, None)?;
        }
        Ok(out)
    }
}

fn describe(v: &IValue) -> String {
    match v {
        IValue::Tuple(items) => format!("a tuple of {} items", items.len()),
        IValue::GenericList(items) => format!("a list of {} items", items.len()),
        IValue::TensorList(items) => format!("a list of {} tensors", items.len()),
        IValue::None => "None".into(),
        _ => "a non-tensor value".into(),
    }
}

/// The line of a libtorch error that says what went wrong: for the TorchScript interpreter, the
/// exception at the end of its traceback (its first line only says that an operation failed).
fn error_line(s: &str) -> String {
    if s.contains("TorchScript interpreter") {
        let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if let Some(l) = lines
            .iter()
            .rev()
            .find(|l| l.contains("Error:") || l.contains("Exception:"))
            .or(lines.last())
        {
            return (*l).to_owned();
        }
    }
    first_line(s)
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_owned()
}
