//! CIFAR ResNets (He et al. 2016, the RepDistiller variants): resnet8/14/20/32/56 with filters
//! [16, 16, 32, 64] and the "x4" variants with [32, 64, 128, 256]. Parameter names follow the
//! PyTorch modules (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, `fc`).

use tch::nn::{self, ModuleT};
use tch::Tensor;

fn conv3x3(p: nn::Path, cin: i64, cout: i64, stride: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding: 1,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, 3, cfg)
}

fn basic_block(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> impl ModuleT + 'static {
    let conv1 = conv3x3(p / "conv1", cin, cout, stride);
    let bn1 = nn::batch_norm2d(p / "bn1", cout, Default::default());
    let conv2 = conv3x3(p / "conv2", cout, cout, 1);
    let bn2 = nn::batch_norm2d(p / "bn2", cout, Default::default());
    let down = if stride != 1 || cin != cout {
        let d = p / "downsample";
        let cfg = nn::ConvConfig {
            stride,
            bias: false,
            ..Default::default()
        };
        Some(
            nn::seq_t()
                .add(nn::conv2d(&d / "0", cin, cout, 1, cfg))
                .add(nn::batch_norm2d(&d / "1", cout, Default::default())),
        )
    } else {
        None
    };
    nn::func_t(move |x: &Tensor, train| {
        let out = x
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .apply(&conv2)
            .apply_t(&bn2, train);
        let residual = match &down {
            Some(d) => x.apply_t(d, train),
            None => x.shallow_clone(),
        };
        (out + residual).relu()
    })
}

/// Backbone and its output channel count. `depth` must be 6n + 2.
pub(crate) fn cifar_resnet(
    p: &nn::Path,
    in_channels: i64,
    depth: i64,
    filters: [i64; 4],
) -> (nn::FuncT<'static>, i64) {
    let n = (depth - 2) / 6;
    let conv1 = conv3x3(p / "conv1", in_channels, filters[0], 1);
    let bn1 = nn::batch_norm2d(p / "bn1", filters[0], Default::default());
    let mut layers = Vec::new();
    let mut cin = filters[0];
    for (li, (&planes, stride)) in filters[1..].iter().zip([1, 2, 2]).enumerate() {
        let lp = p / format!("layer{}", li + 1);
        let mut seq = nn::seq_t();
        for b in 0..n {
            let s = if b == 0 { stride } else { 1 };
            seq = seq.add(basic_block(&(&lp / b), cin, planes, s));
            cin = planes;
        }
        layers.push(seq);
    }
    let f = nn::func_t(move |x, train| {
        let mut x = x.apply(&conv1).apply_t(&bn1, train).relu();
        for l in &layers {
            x = x.apply_t(l, train);
        }
        x
    });
    (f, filters[3])
}
