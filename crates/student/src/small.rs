//! `cnn-small`: conv(32)-BN-ReLU-pool, conv(64)-BN-ReLU-pool, conv(64)-BN-ReLU. About 60k
//! parameters; the feature map is the last conv block's output.

use tch::nn::{self, ModuleT};

fn block(p: &nn::Path, cin: i64, cout: i64) -> nn::SequentialT {
    crate::layers::conv_bn_relu(p, cin, cout, 3, 1)
}

pub(crate) fn cnn_small(p: &nn::Path, in_channels: i64) -> (nn::FuncT<'static>, i64) {
    let b1 = block(&(p / "block1"), in_channels, 32);
    let b2 = block(&(p / "block2"), 32, 64);
    let b3 = block(&(p / "block3"), 64, 64);
    let f = nn::func_t(move |x, train| {
        let x = b1.forward_t(x, train).max_pool2d_default(2);
        let x = b2.forward_t(&x, train).max_pool2d_default(2);
        b3.forward_t(&x, train)
    });
    (f, 64)
}
