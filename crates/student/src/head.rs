//! Heads on a backbone's last feature map: the classifier (`fc`, global average pooling first)
//! and two segmentation heads that give per-pixel logits at the input's resolution.
//!
//! - `fcn`: FCN head (Long et al. 2015, as torchvision's `FCNHead`): 3x3 conv-BN-ReLU to
//!   `C/4` channels (at least 32), then a 1x1 classifier.
//! - `aspp`: a light DeepLabV3 head (Chen et al. 2017): atrous spatial pyramid pooling with a 1x1
//!   branch, 3x3 branches at dilations 2 and 4 (the zoo's maps are small), an image-pooling
//!   branch, a 1x1 projection, a 3x3 conv-BN-ReLU and a 1x1 classifier.
//!
//! - `fcos`: an anchor-free one-stage detector (Tian et al. 2019, as torchvision's FCOS, made
//!   small): an FPN of 64 channels on the backbone's stride-4 map (a 1x1 lateral, two stride-2
//!   3x3 levels, top-down nearest upsampling and a 3x3 smoothing conv per level), shared
//!   class and box towers of two 3x3 conv-GroupNorm-ReLU blocks, a class conv (bias
//!   `-log((1 - 0.01) / 0.01)`), a box conv (ReLU, bias 1: every box starts one stride from its
//!   location) and a centerness conv on the box tower. Its output is `[B, K + 5, L]`, its
//!   feature map the FPN levels flattened, `[B, 64, L, 1]`.
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
    /// FCOS-style detection head on a small FPN: `[B, K + 5, L]` outputs
    /// (`mtkd_vision_tasks::detection::layout`).
    Fcos,
}

const HEADS: &[(&str, HeadKind)] = &[
    ("classifier", HeadKind::Classifier),
    ("fcn", HeadKind::Fcn),
    ("aspp", HeadKind::Aspp),
    ("fcos", HeadKind::Fcos),
];

impl HeadKind {
    pub fn name(self) -> &'static str {
        HEADS
            .iter()
            .find(|(_, h)| *h == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
    /// Whether the head gives per-pixel logits (segmentation).
    pub fn is_dense(self) -> bool {
        matches!(self, HeadKind::Fcn | HeadKind::Aspp)
    }
    /// Whether the head is a detector.
    pub fn is_detector(self) -> bool {
        self == HeadKind::Fcos
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

/// FPN width of the detection head.
pub const FPN_CHANNELS: i64 = 64;
/// The detector's strides: the backbone's map (stride 4) and two stride-2 levels on it.
pub const DET_STRIDES: [i64; 3] = [4, 8, 16];

fn gn_block(p: &nn::Path, c: i64) -> nn::SequentialT {
    nn::seq_t()
        .add(nn::conv2d(
            p / "conv",
            c,
            c,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        ))
        .add(nn::group_norm(p / "gn", 16, c, Default::default()))
        .add_fn(|x| x.relu())
}

fn conv3(p: nn::Path, cin: i64, cout: i64, stride: i64, bias: f64) -> nn::Conv2D {
    nn::conv2d(
        p,
        cin,
        cout,
        3,
        nn::ConvConfig {
            padding: 1,
            stride,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            bs_init: nn::Init::Const(bias),
            ..Default::default()
        },
    )
}

/// The detection head: FPN, towers and the three output convs.
#[derive(Debug)]
pub(crate) struct DetHead {
    lateral: nn::Conv2D,
    down: [nn::Conv2D; 2],
    smooth: [nn::Conv2D; 3],
    cls_tower: nn::SequentialT,
    box_tower: nn::SequentialT,
    pub(crate) cls: nn::Conv2D,
    reg: nn::Conv2D,
    ctr: nn::Conv2D,
}

impl DetHead {
    pub(crate) fn new(p: &nn::Path, cin: i64, num_classes: i64) -> DetHead {
        let c = FPN_CHANNELS;
        let plain = |name: &str, cin: i64, k: i64, stride: i64| {
            nn::conv2d(
                p / name,
                cin,
                c,
                k,
                nn::ConvConfig {
                    padding: k / 2,
                    stride,
                    ..Default::default()
                },
            )
        };
        let tower = |name: &str| {
            let t = p / name;
            nn::seq_t()
                .add(gn_block(&(&t / "0"), c))
                .add(gn_block(&(&t / "1"), c))
        };
        let prior = -((1.0f64 - 0.01) / 0.01).ln();
        DetHead {
            lateral: plain("lateral", cin, 1, 1),
            down: [plain("down1", c, 3, 2), plain("down2", c, 3, 2)],
            smooth: [
                plain("smooth0", c, 3, 1),
                plain("smooth1", c, 3, 1),
                plain("smooth2", c, 3, 1),
            ],
            cls_tower: tower("cls_tower"),
            box_tower: tower("box_tower"),
            cls: conv3(p / "cls_logits", c, num_classes, 1, prior),
            reg: conv3(p / "bbox_reg", c, 4, 1, 1.0),
            ctr: conv3(p / "centerness", c, 1, 1, 0.0),
        }
    }

    /// The pyramid's level maps `[B, 64, h_l, w_l]` of a stride-4 backbone map.
    fn pyramid(&self, x: &Tensor) -> Vec<Tensor> {
        let p4 = self.lateral.forward(x);
        let p8 = self.down[0].forward(&p4);
        let p16 = self.down[1].forward(&p8.relu());
        let up = |t: &Tensor, like: &Tensor| {
            let s = like.size();
            t.upsample_nearest2d([s[2], s[3]], None, None)
        };
        let p8 = &p8 + up(&p16, &p8);
        let p4 = &p4 + up(&p8, &p4);
        [p4, p8, p16]
            .iter()
            .zip(&self.smooth)
            .map(|(t, s)| s.forward(t))
            .collect()
    }

    /// Features `[B, 64, L, 1]` and outputs `[B, K + 5, L]`.
    pub(crate) fn forward_t(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let levels = self.pyramid(x);
        let mut feats = Vec::with_capacity(3);
        let mut outs = Vec::with_capacity(3);
        for f in &levels {
            let ct = self.cls_tower.forward_t(f, train);
            let bt = self.box_tower.forward_t(f, train);
            let o = Tensor::cat(
                &[
                    self.cls.forward(&ct),
                    self.reg.forward(&bt).relu(),
                    self.ctr.forward(&bt),
                ],
                1,
            );
            outs.push(o.flatten(2, 3));
            feats.push(f.flatten(2, 3));
        }
        let features = Tensor::cat(&feats, 2).unsqueeze(-1);
        (features, Tensor::cat(&outs, 2))
    }
}
