//! [`NativeTeacher`]: a network built and trained by mtkd, frozen and used through the same
//! [`Teacher`] trait as a user's TorchScript file.

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::{Arch, Error, Network, Result};
use mtkd_distill_core::{FeatureShape, ModelOutput, Teacher};

/// A frozen mtkd network loaded from a weight file.
#[derive(Debug)]
pub struct NativeTeacher {
    name: String,
    _vs: VarStore,
    net: Network,
}

impl NativeTeacher {
    /// Build `arch` with `head` and load `weights` (safetensors or libtorch `.ot`) onto `device`.
    pub fn load(
        name: &str,
        arch: Arch,
        head: crate::HeadKind,
        weights: &Path,
        in_shape: (i64, i64, i64),
        num_classes: i64,
        device: Device,
    ) -> Result<NativeTeacher> {
        let mut vs = VarStore::new(device);
        let net = Network::with_head(&vs.root(), arch, head, in_shape, num_classes)?;
        vs.load(weights).map_err(|source| Error::Weights {
            action: "load",
            path: weights.to_path_buf(),
            source,
        })?;
        vs.freeze();
        Ok(NativeTeacher {
            name: name.to_owned(),
            _vs: vs,
            net,
        })
    }

    pub fn arch(&self) -> Arch {
        self.net.arch
    }
}

impl Teacher for NativeTeacher {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_classes(&self) -> i64 {
        self.net.num_classes()
    }
    fn feature_shape(&self) -> Option<FeatureShape> {
        Some(self.net.feature_shape())
    }
    fn forward(&self, images: &Tensor) -> mtkd_distill_core::Result<ModelOutput> {
        let (c, h, w) = self.net.in_shape();
        mtkd_distill_core::error::check_shape(
            &format!("input of teacher `{}`", self.name),
            images,
            &[-1, c, h, w],
        )?;
        Ok(tch::no_grad(|| self.net.forward_t(images, false)))
    }
}
