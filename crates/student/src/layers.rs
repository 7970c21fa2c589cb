//! The conv → BatchNorm → ReLU builders the zoo's small blocks and the dense heads share
//! (PyTorch names: `<p>/conv`, `<p>/bn`).

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
