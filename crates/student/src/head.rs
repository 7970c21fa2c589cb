//! Heads on a backbone's last feature map: the classifier (`fc`, global average pooling first)
//! and two segmentation heads that give per-pixel logits at the input's resolution.
//!
//! - `fcn`: FCN head (Long et al. 2015, as torchvision's `FCNHead`): 3x3 conv-BN-ReLU to
//!   `C/4` channels (at least 32), then a 1x1 classifier.
//! - `aspp`: a light DeepLabV3 head (Chen et al. 2017): atrous spatial pyramid pooling with a 1x1
//!   branch, 3x3 branches at dilations 2 and 4 (the zoo's maps are small), an image-pooling
//!   branch, a 1x1 projection, a 3x3 conv-BN-ReLU and a 1x1 classifier.
//!
//! The segmentation logits are computed at the feature map's resolution and upsampled
//! bilinearly (align_corners = false) to the input's size; the head's last feature map (before
//! the classifier) is what the network exposes for feature KD.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use crate::layers::conv_bn_relu;
use crate::{Error, Result};

/// Which head a network has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HeadKind {
    /// Global average pooling and a linear classifier `fc`: `[B, K]` logits.
    #[default]
    Classifier,
    /// FCN head: `[B, K, H, W]` logits.
    Fcn,
    /// Light DeepLabV3 (ASPP) head: `[B, K, H, W]` logits.
    Aspp,
}

const HEADS: &[(&str, HeadKind)] = &[
    ("classifier", HeadKind::Classifier),
    ("fcn", HeadKind::Fcn),
    ("aspp", HeadKind::Aspp),
];

impl HeadKind {
    pub fn name(self) -> &'static str {
        HEADS
            .iter()
            .find(|(_, h)| *h == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
    /// Whether the head gives per-pixel logits.
    pub fn is_dense(self) -> bool {
        self != HeadKind::Classifier
    }
}

impl fmt::Display for HeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HeadKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<HeadKind> {
        HEADS
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, h)| *h)
            .ok_or_else(|| Error::UnknownArch {
                name: format!("head `{s}`"),
                known: HEADS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            })
    }
}

impl TryFrom<String> for HeadKind {
    type Error = Error;
    fn try_from(s: String) -> Result<HeadKind> {
        s.parse()
    }
}

impl From<HeadKind> for String {
    fn from(h: HeadKind) -> String {
        h.name().to_owned()
    }
}

/// A segmentation head: a feature transform and a 1x1 classifier `classifier`.
#[derive(Debug)]
pub(crate) struct SegHead {
    body: nn::FuncT<'static>,
    pub(crate) classifier: nn::Conv2D,
    pub(crate) channels: i64,
}

impl SegHead {
    pub(crate) fn new(p: &nn::Path, kind: HeadKind, cin: i64, num_classes: i64) -> SegHead {
        let (body, channels) = match kind {
            HeadKind::Fcn => {
                let c = (cin / 4).max(32);
                let b = conv_bn_relu(&(p / "block"), cin, c, 3, 1);
                (nn::func_t(move |x, train| b.forward_t(x, train)), c)
            }
            _ => {
                let c = 64;
                let b0 = conv_bn_relu(&(p / "aspp0"), cin, c, 1, 1);
                let b1 = conv_bn_relu(&(p / "aspp1"), cin, c, 3, 2);
                let b2 = conv_bn_relu(&(p / "aspp2"), cin, c, 3, 4);
                let pool = conv_bn_relu(&(p / "pool"), cin, c, 1, 1);
                let project = conv_bn_relu(&(p / "project"), 4 * c, c, 1, 1);
                let refine = conv_bn_relu(&(p / "refine"), c, c, 3, 1);
                let f = nn::func_t(move |x: &Tensor, train| {
                    let size = x.size();
                    let g = pool
                        .forward_t(&x.adaptive_avg_pool2d([1, 1]), train)
                        .expand([size[0], c, size[2], size[3]], false);
                    let cat = Tensor::cat(
                        &[
                            b0.forward_t(x, train),
                            b1.forward_t(x, train),
                            b2.forward_t(x, train),
                            g,
                        ],
                        1,
                    );
                    refine.forward_t(&project.forward_t(&cat, train), train)
                });
                (f, c)
            }
        };
        let classifier = nn::conv2d(
            p / "classifier",
            channels,
            num_classes,
            1,
            Default::default(),
        );
        SegHead {
            body,
            classifier,
            channels,
        }
    }

    /// Head features `[B, D, h, w]` and logits upsampled to `out_hw`: `[B, K, H, W]`.
    pub(crate) fn forward_t(
        &self,
        x: &Tensor,
        train: bool,
        out_hw: (i64, i64),
    ) -> (Tensor, Tensor) {
        let f = self.body.forward_t(x, train);
        let logits = self.classifier.forward(&f);
        let size = logits.size();
        let logits = if (size[2], size[3]) == out_hw {
            logits
        } else {
            logits.upsample_bilinear2d([out_hw.0, out_hw.1], false, None, None)
        };
        (f, logits)
    }
}
