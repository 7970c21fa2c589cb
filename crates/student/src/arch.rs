//! The architecture catalogue and the [`Network`] type every architecture builds.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::head::{DetHead, HeadKind, SegHead, FPN_CHANNELS};
use crate::{mobilenetv2, resnet, shufflenetv2, small, wrn, Error, Result};
use mtkd_distill_core::{FeatureShape, ModelOutput};

/// Supported architectures (CIFAR-style: they work for any input size and channel count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Arch {
    /// Two conv blocks and a linear head: the smallest useful student.
    CnnSmall,
    Resnet8,
    Resnet14,
    Resnet20,
    Resnet32,
    Resnet56,
    Resnet8x4,
    Resnet32x4,
    Wrn16x1,
    Wrn16x2,
    Wrn28x4,
    Wrn40x2,
    /// CIFAR MobileNetV2 (RepDistiller), width 1.0.
    MobileNetV2,
    /// CIFAR MobileNetV2 at width 0.5 (RepDistiller's `mobile_half`).
    MobileNetV2Half,
    /// CIFAR ShuffleNetV2 (RepDistiller's `ShuffleV2`), net size 1.
    ShuffleNetV2,
}

const NAMES: &[(&str, Arch)] = &[
    ("cnn-small", Arch::CnnSmall),
    ("resnet8", Arch::Resnet8),
    ("resnet14", Arch::Resnet14),
    ("resnet20", Arch::Resnet20),
    ("resnet32", Arch::Resnet32),
    ("resnet56", Arch::Resnet56),
    ("resnet8x4", Arch::Resnet8x4),
    ("resnet32x4", Arch::Resnet32x4),
    ("wrn-16-1", Arch::Wrn16x1),
    ("wrn-16-2", Arch::Wrn16x2),
    ("wrn-28-4", Arch::Wrn28x4),
    ("wrn-40-2", Arch::Wrn40x2),
    ("mobilenetv2", Arch::MobileNetV2),
    ("mobilenetv2-half", Arch::MobileNetV2Half),
    ("shufflenetv2", Arch::ShuffleNetV2),
];

impl Arch {
    pub fn all() -> impl Iterator<Item = Arch> {
        NAMES.iter().map(|(_, a)| *a)
    }
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
    pub fn known() -> String {
        NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch> {
        NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, a)| *a)
            .ok_or_else(|| Error::UnknownArch {
                name: s.to_owned(),
                known: Arch::known(),
            })
    }
}

impl TryFrom<String> for Arch {
    type Error = Error;
    fn try_from(s: String) -> Result<Arch> {
        s.parse()
    }
}

impl From<Arch> for String {
    fn from(a: Arch) -> String {
        a.name().to_owned()
    }
}

/// The head a [`Network`] carries.
#[derive(Debug)]
enum Head {
    /// Global average pooling and `fc`.
    Classifier(nn::Linear),
    /// A segmentation head under `head`.
    Dense(SegHead),
    /// A detection head under `head`.
    Detector(Box<DetHead>),
}

/// A network: a backbone producing the last feature map and a head (`head.rs`): the
/// classifier `fc` after global average pooling, or a segmentation head under `head.` giving
/// per-pixel logits at the input's size. PyTorch names throughout; a classification network's
/// names are those of the zoo's PyTorch twins (`scripts/student_zoo.py`).
#[derive(Debug)]
pub struct Network {
    pub arch: Arch,
    pub head_kind: HeadKind,
    backbone: nn::FuncT<'static>,
    head: Head,
    in_shape: (i64, i64, i64),
    feature_shape: FeatureShape,
    num_classes: i64,
}

impl Network {
    /// Build the classifier `arch` under `path` for images `(C, H, W)` and `num_classes`
    /// classes.
    pub fn new(
        path: &nn::Path,
        arch: Arch,
        in_shape: (i64, i64, i64),
        num_classes: i64,
    ) -> Result<Network> {
        Self::with_head(path, arch, HeadKind::Classifier, in_shape, num_classes)
    }

    /// Build `arch` with `head` under `path` for images `(C, H, W)` and `num_classes` classes.
    pub fn with_head(
        path: &nn::Path,
        arch: Arch,
        head_kind: HeadKind,
        in_shape: (i64, i64, i64),
        num_classes: i64,
    ) -> Result<Network> {
        let c = in_shape.0;
        let (backbone, channels) = match arch {
            Arch::CnnSmall => small::cnn_small(path, c),
            Arch::Resnet8 => resnet::cifar_resnet(path, c, 8, [16, 16, 32, 64]),
            Arch::Resnet14 => resnet::cifar_resnet(path, c, 14, [16, 16, 32, 64]),
            Arch::Resnet20 => resnet::cifar_resnet(path, c, 20, [16, 16, 32, 64]),
            Arch::Resnet32 => resnet::cifar_resnet(path, c, 32, [16, 16, 32, 64]),
            Arch::Resnet56 => resnet::cifar_resnet(path, c, 56, [16, 16, 32, 64]),
            Arch::Resnet8x4 => resnet::cifar_resnet(path, c, 8, [32, 64, 128, 256]),
            Arch::Resnet32x4 => resnet::cifar_resnet(path, c, 32, [32, 64, 128, 256]),
            Arch::Wrn16x1 => wrn::wrn(path, c, 16, 1),
            Arch::Wrn16x2 => wrn::wrn(path, c, 16, 2),
            Arch::Wrn28x4 => wrn::wrn(path, c, 28, 4),
            Arch::Wrn40x2 => wrn::wrn(path, c, 40, 2),
            Arch::MobileNetV2 => mobilenetv2::mobilenetv2(path, c, 1.0),
            Arch::MobileNetV2Half => mobilenetv2::mobilenetv2(path, c, 0.5),
            Arch::ShuffleNetV2 => shufflenetv2::shufflenetv2(path, c, 1.0),
        };
        let head = match head_kind {
            HeadKind::Classifier => Head::Classifier(nn::linear(
                path / "fc",
                channels,
                num_classes,
                Default::default(),
            )),
            HeadKind::Fcos => Head::Detector(Box::new(DetHead::new(
                &(path / "head"),
                channels,
                num_classes,
            ))),
            kind => Head::Dense(SegHead::new(&(path / "head"), kind, channels, num_classes)),
        };
        // Probe the feature map's spatial size once with a zero image (no BN statistics change
        // in eval mode, no gradient).
        let device = path.device();
        let probe = tch::no_grad(|| {
            Tensor::f_zeros(
                [1, in_shape.0, in_shape.1, in_shape.2],
                (Kind::Float, device),
            )
            .map(|z| backbone.forward_t(&z, false).size())
        })?;
        let feature_shape = match &head {
            Head::Classifier(_) => (probe[1], probe[2], probe[3]),
            Head::Dense(h) => (h.channels, probe[2], probe[3]),
            Head::Detector(_) => {
                let (h, w) = (in_shape.1, in_shape.2);
                let want = (ceil_div(h, 4), ceil_div(w, 4));
                if (probe[2], probe[3]) != want {
                    return Err(Error::Core(mtkd_distill_core::Error::Invalid {
                        what: format!("{arch} with head `fcos`"),
                        reason: format!(
                            "the detection head needs a stride-4 backbone map ({}x{} for a {h}x{w} \
                             input), but {arch} gives {}x{}; use cnn-small or a CIFAR ResNet / WRN",
                            want.0, want.1, probe[2], probe[3]
                        ),
                    }));
                }
                let l: i64 = crate::head::DET_STRIDES
                    .iter()
                    .map(|s| ceil_div(h, *s) * ceil_div(w, *s))
                    .sum();
                (FPN_CHANNELS, l, 1)
            }
        };
        Ok(Network {
            arch,
            head_kind,
            backbone,
            head,
            in_shape,
            feature_shape,
            num_classes,
        })
    }

    /// Forward a batch, keeping the feature map (the backbone's for a classifier, the head's
    /// last map before its 1x1 classifier for a segmentation head).
    ///
    /// # Shapes
    /// `images [B, C, H, W]` -> logits `[B, K]` (classifier) or `[B, K, H, W]` (segmentation),
    /// features `[B, C', H', W']`
    pub fn forward_t(&self, images: &Tensor, train: bool) -> ModelOutput {
        let features = self.backbone.forward_t(images, train);
        match &self.head {
            Head::Classifier(fc) => {
                let logits = fc.forward(&features.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
                ModelOutput {
                    logits,
                    features: Some(features),
                }
            }
            Head::Dense(h) => {
                let size = images.size();
                let (f, logits) = h.forward_t(&features, train, (size[2], size[3]));
                ModelOutput {
                    logits,
                    features: Some(f),
                }
            }
            Head::Detector(h) => {
                let (f, logits) = h.forward_t(&features, train);
                ModelOutput {
                    logits,
                    features: Some(f),
                }
            }
        }
    }

    /// Fallible forward that checks the input shape first (for user-provided data).
    pub fn f_forward_t(&self, images: &Tensor, train: bool) -> Result<ModelOutput> {
        let (c, h, w) = self.in_shape;
        mtkd_distill_core::error::check_shape("network input", images, &[-1, c, h, w])?;
        Ok(self.forward_t(images, train))
    }

    pub fn feature_shape(&self) -> FeatureShape {
        self.feature_shape
    }
    /// The last linear map: `fc` (weight `[K, C']`, bias `[K]`, applied to the pooled feature
    /// map) or a segmentation head's 1x1 classifier viewed as `[K, C']` (applied at every
    /// location of the head's feature map, so also to its pooled map).
    pub fn classifier(&self) -> (Tensor, Option<Tensor>) {
        match &self.head {
            Head::Classifier(fc) => (
                fc.ws.shallow_clone(),
                fc.bs.as_ref().map(Tensor::shallow_clone),
            ),
            Head::Dense(h) => {
                let w = &h.classifier.ws;
                let s = w.size();
                (
                    w.view([s[0], s[1]]),
                    h.classifier.bs.as_ref().map(Tensor::shallow_clone),
                )
            }
            // The class conv's centre tap `[K, C']`: not the whole map (strategies that need
            // the student's linear head are refused for detection).
            Head::Detector(h) => (
                h.cls.ws.select(3, 1).select(2, 1),
                h.cls.bs.as_ref().map(Tensor::shallow_clone),
            ),
        }
    }
    pub fn in_shape(&self) -> (i64, i64, i64) {
        self.in_shape
    }
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }
}

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Number of trainable parameters in a var store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum()
}

/// The device a var store lives on (re-exported for convenience).
pub fn device_of(vs: &nn::VarStore) -> Device {
    vs.device()
}
