//! [`NativeTeacher`]: a network built and trained by mtkd, frozen and used through the same
//! [`Teacher`] trait as a user's TorchScript file.

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::{Arch, Error, Network, Result};
use mtkd_distill_core::{to_channels_last, FeatureShape, ModelOutput, Precision, Teacher};

/// A frozen mtkd network loaded from a weight file.
#[derive(Debug)]
pub struct NativeTeacher {
    name: String,
    vs: VarStore,
    net: Network,
    precision: Precision,
    /// Weights and each batch in channels-last layout (NHWC strides); outputs contiguous.
    channels_last: bool,
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
        check_fit(&vs, weights, arch, in_shape, num_classes)?;
        vs.load(weights).map_err(|source| Error::Weights {
            action: "load",
            path: weights.to_path_buf(),
            source,
        })?;
        vs.freeze();
        Ok(NativeTeacher {
            name: name.to_owned(),
            vs,
            net,
            precision: Precision::Fp32,
            channels_last: false,
        })
    }

    /// Run in channels-last layout from now on (or back to contiguous): every 4-D weight is
    /// re-laid in place and each batch is passed channels-last, so oneDNN's convolutions skip
    /// their layout conversions; the outputs are made contiguous again. The same numbers up
    /// to summation order; measured faster on the CPU (docs/PERF.md).
    pub fn set_channels_last(&mut self, on: bool) {
        if on == self.channels_last {
            return;
        }
        tch::no_grad(|| {
            for (_, mut v) in self.vs.variables() {
                if v.dim() == 4 {
                    let laid = if on {
                        to_channels_last(&v)
                    } else {
                        v.contiguous()
                    };
                    v.set_data(&laid);
                }
            }
        });
        self.channels_last = on;
    }

    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Compute in `precision` from now on: the weights (and BatchNorm statistics) are cast to
    /// it and each batch is cast to it on the way in; the outputs stay float32. Checked with a
    /// probe batch, so a network that cannot run in that precision is refused here.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == self.precision {
            return Ok(());
        }
        match precision {
            Precision::Fp32 => self.vs.float(),
            Precision::Bf16 => self.vs.bfloat16(),
        }
        self.precision = precision;
        let (c, h, w) = self.net.in_shape();
        let probe = Tensor::zeros([2, c, h, w], (tch::Kind::Float, self.vs.device()));
        // libtorch reports a kernel missing for a dtype by panicking through tch's infallible
        // calls: the probe turns that into an error naming the teacher.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tch::no_grad(|| self.net.f_forward_t(&precision.input(&probe), false))
        }));
        let reason = match ran {
            Ok(Ok(out)) if out.logits.isfinite().all().int64_value(&[]) == 1 => return Ok(()),
            Ok(Ok(_)) => "its logits on a probe batch are not finite".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "its forward pass failed".to_owned()),
        };
        Err(Error::Precision {
            name: self.name.clone(),
            precision: precision.to_string(),
            reason: reason.lines().next().unwrap_or_default().to_owned(),
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
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
        Ok(tch::no_grad(|| {
            let x = self.precision.input(images);
            if !self.channels_last {
                return self.net.forward_t(&x, false).into_float();
            }
            let out = self.net.forward_t(&to_channels_last(&x), false);
            ModelOutput {
                logits: out.logits.contiguous(),
                features: out.features.map(|f| f.contiguous()),
            }
            .into_float()
        }))
    }
}

/// Refuse, with the variable and both shapes, a weights file that does not fit the `arch`
/// network in `vs` (built for `input` and `num_classes`): a missing variable, another shape,
/// or (said so) a model for another number of classes.
fn check_fit(
    vs: &VarStore,
    path: &Path,
    arch: Arch,
    input: (i64, i64, i64),
    num_classes: i64,
) -> Result<()> {
    let stored: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(path)
            .map_err(|source| Error::Weights {
                action: "read",
                path: path.to_path_buf(),
                source,
            })?
            .into_iter()
            .collect();
    let mismatch = |reason: String| Error::WeightsMismatch {
        path: path.to_path_buf(),
        reason,
    };
    let mut wanted: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &wanted {
        let Some(t) = stored.get(name) else {
            return Err(mismatch(format!(
                " is not a {arch} model: it has no variable `{name}`"
            )));
        };
        let (got, want) = (t.size(), var.size());
        if got == want {
            continue;
        }
        let classes =
            want.first() == Some(&num_classes) && got.len() == want.len() && got[1..] == want[1..];
        return Err(mismatch(if classes {
            format!(
                " holds a model for {} classes (`{name}` is {got:?}), but these data have {num_classes} classes",
                got[0]
            )
        } else {
            format!(
                ": `{name}` is {got:?}, but a {arch} network for inputs {input:?} and {num_classes} classes needs {want:?}"
            )
        }));
    }
    Ok(())
}
