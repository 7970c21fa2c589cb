//! CIFAR MobileNetV2 (Sandler et al. 2018, the RepDistiller `models/mobilenetv2.py` variant:
//! `mobilenetv2` is width 1.0, `mobilenetv2-half` is RepDistiller's `mobile_half`, width 0.5),
//! expansion 6. The feature map is `conv2` (1x1 conv to 1280 channels, BN, ReLU). PyTorch names:
//! `conv1.0`, `conv1.1`, `blocks.{i}.{j}.conv.{0,1,3,4,6,7}`, `conv2.0`, `conv2.1`; the classifier
//! is `fc` (RepDistiller calls it `classifier.0`).

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::layers::conv_bn;

/// Expansion ratio `T` of RepDistiller's `mobile_half` / `mobilenetv2_T_w(6, W)`.
const EXPANSION: i64 = 6;

/// Stride of the first 3x3 convolution. RepDistiller's CIFAR file uses 2 (`conv_bn(3, c, 2)`),
/// which gives a 2x2 feature map for 32x32 images.
const STEM_STRIDE: i64 = 2;

/// `InvertedResidual`: 1x1 expansion (kept even when the ratio is 1, as in RepDistiller),
/// 3x3 depthwise, 1x1 linear projection; identity shortcut when the shapes allow it.
fn inverted_residual(
    p: &nn::Path,
    cin: i64,
    cout: i64,
    stride: i64,
    expand: i64,
) -> impl ModuleT + 'static {
    let hidden = cin * expand;
    let c = p / "conv";
    let conv = nn::seq_t()
        .add(conv_bn(&c, ("0", "1"), cin, hidden, 1, 1, 1))
        .add_fn(|x| x.relu())
        .add(conv_bn(&c, ("3", "4"), hidden, hidden, 3, stride, hidden))
        .add_fn(|x| x.relu())
        .add(conv_bn(&c, ("6", "7"), hidden, cout, 1, 1, 1));
    let residual = stride == 1 && cin == cout;
    nn::func_t(move |x: &Tensor, train| {
        let out = x.apply_t(&conv, train);
        if residual {
            x + out
        } else {
            out
        }
    })
}

/// Backbone and its output channel count (1280 for widths up to 1).
pub(crate) fn mobilenetv2(
    p: &nn::Path,
    in_channels: i64,
    width_mult: f64,
) -> (nn::FuncT<'static>, i64) {
    // t, c, n, s
    let setting: [(i64, i64, i64, i64); 7] = [
        (1, 16, 1, 1),
        (EXPANSION, 24, 2, 1),
        (EXPANSION, 32, 3, 2),
        (EXPANSION, 64, 4, 2),
        (EXPANSION, 96, 3, 1),
        (EXPANSION, 160, 3, 2),
        (EXPANSION, 320, 1, 1),
    ];
    // Python's int(): truncation towards zero.
    let scale = |c: i64| (c as f64 * width_mult) as i64;

    let mut cin = scale(32);
    let conv1 = conv_bn(
        &(p / "conv1"),
        ("0", "1"),
        in_channels,
        cin,
        3,
        STEM_STRIDE,
        1,
    );
    let bp = p / "blocks";
    let mut blocks = Vec::new();
    for (i, &(t, c, n, s)) in setting.iter().enumerate() {
        let cout = scale(c);
        let mut seq = nn::seq_t();
        for j in 0..n {
            let stride = if j == 0 { s } else { 1 };
            seq = seq.add(inverted_residual(&(&bp / i / j), cin, cout, stride, t));
            cin = cout;
        }
        blocks.push(seq);
    }
    let last = if width_mult > 1.0 { scale(1280) } else { 1280 };
    let conv2 = conv_bn(&(p / "conv2"), ("0", "1"), cin, last, 1, 1, 1);
    let f = nn::func_t(move |x, train| {
        let mut x = x.apply_t(&conv1, train).relu();
        for b in &blocks {
            x = x.apply_t(b, train);
        }
        x.apply_t(&conv2, train).relu()
    });
    (f, last)
}
