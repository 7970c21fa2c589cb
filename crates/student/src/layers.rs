//! The conv → BatchNorm (→ ReLU) builders the zoo's blocks and the dense heads share
//! (PyTorch names: `<p>/conv`, `<p>/bn`, or the caller's).

use tch::nn;

/// `conv(k x k, stride 1, padding = dilation * (k - 1) / 2, no bias) -> BN -> ReLU` under
/// `p / "conv"` and `p / "bn"`.
pub fn conv_bn_relu(p: &nn::Path, cin: i64, cout: i64, k: i64, dilation: i64) -> nn::SequentialT {
    let conv = nn::ConvConfig {
        padding: dilation * (k - 1) / 2,
        dilation,
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(nn::conv2d(p / "conv", cin, cout, k, conv))
        .add(nn::batch_norm2d(p / "bn", cout, Default::default()))
        .add_fn(|x| x.relu())
}

/// `conv(k x k, stride, padding (k - 1) / 2, groups, no bias) -> BN` named `names.0` and
/// `names.1` under `p` (MobileNetV2's and ShuffleNetV2's; `groups == cin` makes the convolution
/// depthwise).
pub(crate) fn conv_bn(
    p: &nn::Path,
    names: (&str, &str),
    cin: i64,
    cout: i64,
    kernel: i64,
    stride: i64,
    groups: i64,
) -> nn::SequentialT {
    let cfg = nn::ConvConfig {
        stride,
        padding: (kernel - 1) / 2,
        groups,
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(nn::conv2d(p / names.0, cin, cout, kernel, cfg))
        .add(nn::batch_norm2d(p / names.1, cout, Default::default()))
}
