//! CIFAR ShuffleNetV2 (Ma et al. 2018, the RepDistiller `models/ShuffleNetv2.py` variant):
//! a 1x1 stem to 24 channels (stride 1), three stages of a `DownBlock` and `BasicBlock`s with
//! channel split and shuffle, and the feature map `relu(bn2(conv2))`. PyTorch names: `conv1`,
//! `bn1`, `layer{1,2,3}.{j}.conv{k}` / `.bn{k}`, `conv2`, `bn2`; the classifier is `fc`
//! (RepDistiller calls it `linear`).

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::layers::conv_bn;

/// Per-stage output channels (three stages and the last 1x1 conv) and basic blocks per stage.
fn config(net_size: f64) -> ([i64; 4], [i64; 3]) {
    let sizes: [(f64, [i64; 4], [i64; 3]); 6] = [
        (0.2, [40, 80, 160, 512], [3, 3, 3]),
        (0.3, [40, 80, 160, 512], [3, 7, 3]),
        (0.5, [48, 96, 192, 1024], [3, 7, 3]),
        (1.0, [116, 232, 464, 1024], [3, 7, 3]),
        (1.5, [176, 352, 704, 1024], [3, 7, 3]),
        (2.0, [224, 488, 976, 2048], [3, 7, 3]),
    ];
    sizes
        .iter()
        .find(|(s, _, _)| (s - net_size).abs() < 1e-9)
        .map(|&(_, c, n)| (c, n))
        .unwrap_or_else(|| {
            panic!("ShuffleNetV2 net_size {net_size} is not one of 0.2, 0.3, 0.5, 1, 1.5, 2")
        })
}

/// Channel shuffle with 2 groups: `[N, C, H, W] -> [N, 2, C/2, H, W] -> [N, C/2, 2, H, W]`.
fn shuffle(x: &Tensor) -> Tensor {
    const GROUPS: i64 = 2;
    let s = x.size();
    let (c, h, w) = (s[1], s[2], s[3]);
    // -1 for the batch: a traced export must not freeze the example's batch size.
    x.view([-1, GROUPS, c / GROUPS, h, w])
        .permute([0i64, 2, 1, 3, 4])
        .reshape([-1, c, h, w])
}

/// `BasicBlock`: split the channels in halves, transform the second half (1x1, 3x3 depthwise,
/// 1x1), concatenate with the untouched first half, shuffle.
fn basic_block(p: &nn::Path, channels: i64) -> impl ModuleT + 'static {
    // RepDistiller: int(in_channels * split_ratio) with split_ratio 0.5.
    let half = channels / 2;
    let cb1 = conv_bn(p, ("conv1", "bn1"), half, half, 1, 1, 1);
    let cb2 = conv_bn(p, ("conv2", "bn2"), half, half, 3, 1, half);
    let cb3 = conv_bn(p, ("conv3", "bn3"), half, half, 1, 1, 1);
    nn::func_t(move |x: &Tensor, train| {
        let c = x.size()[1];
        let x1 = x.narrow(1, 0, half);
        let x2 = x.narrow(1, half, c - half);
        let out = x2.apply_t(&cb1, train).relu();
        let out = out.apply_t(&cb2, train);
        let out = out.apply_t(&cb3, train).relu();
        shuffle(&Tensor::cat(&[x1, out], 1))
    })
}

/// `DownBlock`: two stride-2 branches (left: 3x3 depthwise, 1x1; right: 1x1, 3x3 depthwise,
/// 1x1) of `cout / 2` channels each, concatenated and shuffled.
fn down_block(p: &nn::Path, cin: i64, cout: i64) -> impl ModuleT + 'static {
    let mid = cout / 2;
    let cb1 = conv_bn(p, ("conv1", "bn1"), cin, cin, 3, 2, cin);
    let cb2 = conv_bn(p, ("conv2", "bn2"), cin, mid, 1, 1, 1);
    let cb3 = conv_bn(p, ("conv3", "bn3"), cin, mid, 1, 1, 1);
    let cb4 = conv_bn(p, ("conv4", "bn4"), mid, mid, 3, 2, mid);
    let cb5 = conv_bn(p, ("conv5", "bn5"), mid, mid, 1, 1, 1);
    nn::func_t(move |x: &Tensor, train| {
        let left = x.apply_t(&cb1, train);
        let left = left.apply_t(&cb2, train).relu();
        let right = x.apply_t(&cb3, train).relu();
        let right = right.apply_t(&cb4, train);
        let right = right.apply_t(&cb5, train).relu();
        shuffle(&Tensor::cat(&[left, right], 1))
    })
}

/// Backbone and its output channel count (1024 for net_size 1).
pub(crate) fn shufflenetv2(
    p: &nn::Path,
    in_channels: i64,
    net_size: f64,
) -> (nn::FuncT<'static>, i64) {
    let (out_channels, num_blocks) = config(net_size);
    // RepDistiller's stem is a 1x1 convolution (its 3x3 variant is commented out).
    let stem = conv_bn(p, ("conv1", "bn1"), in_channels, 24, 1, 1, 1);
    let mut cin = 24;
    let mut layers = Vec::new();
    for (li, (&cout, &n)) in out_channels[..3].iter().zip(&num_blocks).enumerate() {
        let lp = p / format!("layer{}", li + 1);
        let mut seq = nn::seq_t().add(down_block(&(&lp / 0), cin, cout));
        for j in 0..n {
            seq = seq.add(basic_block(&(&lp / (j + 1)), cout));
        }
        cin = cout;
        layers.push(seq);
    }
    let last = out_channels[3];
    let last_conv = conv_bn(p, ("conv2", "bn2"), cin, last, 1, 1, 1);
    let f = nn::func_t(move |x, train| {
        let mut x = x.apply_t(&stem, train).relu();
        for l in &layers {
            x = x.apply_t(l, train);
        }
        x.apply_t(&last_conv, train).relu()
    });
    (f, last)
}
