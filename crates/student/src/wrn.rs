//! Wide ResNets (Zagoruyko & Komodakis 2016, the RepDistiller variant): WRN-depth-k with
//! pre-activation blocks; the feature map is `relu(bn1(block3))`. PyTorch names:
//! `conv1`, `block1.layer.0.bn1`, `...convShortcut`, `bn1`, `fc`.

use tch::nn::{self, ModuleT};
use tch::Tensor;

fn wide_block(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> impl ModuleT + 'static {
    let bn1 = nn::batch_norm2d(p / "bn1", cin, Default::default());
    let c1 = nn::ConvConfig {
        stride,
        padding: 1,
        bias: false,
        ..Default::default()
    };
    let conv1 = nn::conv2d(p / "conv1", cin, cout, 3, c1);
    let bn2 = nn::batch_norm2d(p / "bn2", cout, Default::default());
    let c2 = nn::ConvConfig {
        padding: 1,
        bias: false,
        ..Default::default()
    };
    let conv2 = nn::conv2d(p / "conv2", cout, cout, 3, c2);
    let equal = cin == cout;
    let shortcut = (!equal).then(|| {
        let cs = nn::ConvConfig {
            stride,
            bias: false,
            ..Default::default()
        };
        nn::conv2d(p / "convShortcut", cin, cout, 1, cs)
    });
    nn::func_t(move |x: &Tensor, train| {
        let a = x.apply_t(&bn1, train).relu();
        let out = a.apply(&conv1).apply_t(&bn2, train).relu().apply(&conv2);
        let res = match &shortcut {
            Some(s) => a.apply(s),
            None => x.shallow_clone(),
        };
        out + res
    })
}

/// Backbone and its output channel count. `depth` must be 6n + 4.
pub(crate) fn wrn(p: &nn::Path, in_channels: i64, depth: i64, k: i64) -> (nn::FuncT<'static>, i64) {
    let n = (depth - 4) / 6;
    let widths = [16, 16 * k, 32 * k, 64 * k];
    let cfg = nn::ConvConfig {
        padding: 1,
        bias: false,
        ..Default::default()
    };
    let conv1 = nn::conv2d(p / "conv1", in_channels, widths[0], 3, cfg);
    let mut blocks = Vec::new();
    let mut cin = widths[0];
    for (bi, (&w, stride)) in widths[1..].iter().zip([1, 2, 2]).enumerate() {
        let bp = p / format!("block{}", bi + 1) / "layer";
        let mut seq = nn::seq_t();
        for j in 0..n {
            seq = seq.add(wide_block(
                &(&bp / j),
                cin,
                w,
                if j == 0 { stride } else { 1 },
            ));
            cin = w;
        }
        blocks.push(seq);
    }
    let bn = nn::batch_norm2d(p / "bn1", widths[3], Default::default());
    let f = nn::func_t(move |x, train| {
        let mut x = x.apply(&conv1);
        for b in &blocks {
            x = x.apply_t(b, train);
        }
        x.apply_t(&bn, train).relu()
    });
    (f, widths[3])
}
