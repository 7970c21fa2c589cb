//! A teacher's own input (`[[teachers]] input`): real teachers are often RGB, 224 px and
//! ImageNet-normalised while the student is small and grey. [`InputAdapted`] wraps a teacher and
//! makes its input from the student's batch: un-normalise with the data's normalisation, convert
//! the channels (grey repeated, or RGB averaged), resize (bilinear, no corner alignment, as
//! `torch.nn.functional.interpolate(mode="bilinear")`), normalise with the teacher's values.
//!
//! The contract a teacher sees without `input`: mtkd's batch as it is, i.e. the student's
//! augmented images, normalised with `[data] normalize`, at the data's size and channels.

use tch::{Kind, Tensor};

use crate::config::TeacherInput;
use mtkd_distill_core::{FeatureShape, ModelOutput, Teacher};
use mtkd_vision_tasks::transform::Normalize;

/// The input transform of one teacher.
#[derive(Debug)]
pub struct InputTransform {
    channels: usize,
    size: Option<usize>,
    /// `[1, C, 1, 1]` on the teacher's device, made once: the data's std and mean (to
    /// un-normalise) and the teacher's mean and std.
    data_std: Tensor,
    data_mean: Tensor,
    mean: Tensor,
    std: Tensor,
}

impl InputTransform {
    /// The transform from batches normalised with `data` (`in_channels` channels) to `input`,
    /// for batches on `device`.
    pub fn new(
        data: &Normalize,
        in_channels: usize,
        input: &TeacherInput,
        device: tch::Device,
    ) -> InputTransform {
        let channels = input.channels.unwrap_or(in_channels);
        let (mean, std) = match &input.normalize {
            Some(n) => (n.mean.clone(), n.std.clone()),
            // Keep the data's normalisation, spread over the new channels.
            None => {
                let spread = |v: &[f32]| -> Vec<f32> {
                    if v.len() == channels {
                        v.to_vec()
                    } else {
                        let m = v.iter().sum::<f32>() / v.len().max(1) as f32;
                        vec![m; channels]
                    }
                };
                (spread(&data.mean), spread(&data.std))
            }
        };
        let per_channel = |v: &[f32]| {
            Tensor::from_slice(v)
                .to_device(device)
                .view([1, v.len() as i64, 1, 1])
        };
        InputTransform {
            channels,
            size: input.size,
            data_std: per_channel(&data.std),
            data_mean: per_channel(&data.mean),
            mean: per_channel(&mean),
            std: per_channel(&std),
        }
    }

    /// `(C, H, W)` of the teacher's input for a student input of `(c, h, w)`.
    pub fn shape(&self, (_, h, w): (i64, i64, i64)) -> (i64, i64, i64) {
        let (h, w) = self.size.map(|s| (s as i64, s as i64)).unwrap_or((h, w));
        (self.channels as i64, h, w)
    }

    /// The teacher's input for a normalised student batch `[B, C, H, W]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let raw = x * &self.data_std + &self.data_mean;
        let c = x.size()[1] as usize;
        let raw = match (c, self.channels) {
            (a, b) if a == b => raw,
            (1, n) => raw.repeat([1, n as i64, 1, 1]),
            (_, 1) => raw.mean_dim(1, true, Kind::Float),
            (_, n) => raw
                .mean_dim(1, true, Kind::Float)
                .repeat([1, n as i64, 1, 1]),
        };
        let raw = match self.size {
            Some(s) if raw.size()[2] != s as i64 || raw.size()[3] != s as i64 => {
                raw.upsample_bilinear2d([s as i64, s as i64], false, None, None)
            }
            _ => raw,
        };
        (raw - &self.mean) / &self.std
    }
}

/// A teacher that sees its own input, made from the student's batch by an [`InputTransform`].
pub struct InputAdapted {
    pub inner: Box<dyn Teacher>,
    pub transform: InputTransform,
}

impl Teacher for InputAdapted {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn num_classes(&self) -> i64 {
        self.inner.num_classes()
    }
    fn feature_shape(&self) -> Option<FeatureShape> {
        self.inner.feature_shape()
    }
    fn forward(&self, images: &Tensor) -> mtkd_distill_core::Result<ModelOutput> {
        self.inner.forward(&self.transform.apply(images))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_is_repeated_resized_bilinearly_and_renormalised() {
        let data = Normalize {
            mean: vec![0.5],
            std: vec![0.25],
        };
        let input = TeacherInput {
            channels: Some(3),
            size: Some(4),
            normalize: Some(Normalize {
                mean: vec![0.0, 1.0, 2.0],
                std: vec![1.0, 1.0, 0.5],
            }),
        };
        let t = InputTransform::new(&data, 1, &input, tch::Device::Cpu);
        assert_eq!(t.shape((1, 2, 2)), (3, 4, 4));
        // Raw pixels [[0, 1], [2, 3]], normalised as the data are.
        let raw = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]).view([1, 1, 2, 2]);
        let x = (&raw - 0.5) / 0.25;
        let y = t.apply(&x);
        assert_eq!(y.size(), vec![1, 3, 4, 4]);
        // PyTorch's F.interpolate(raw, size=4, mode="bilinear", align_corners=False).
        let want = [
            0.0f32, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75,
            3.0,
        ];
        for (c, (m, s)) in [(0.0f32, 1.0f32), (1.0, 1.0), (2.0, 0.5)]
            .iter()
            .enumerate()
        {
            let got = Vec::<f32>::try_from(&y.get(0).get(c as i64).flatten(0, -1)).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - (w - m) / s).abs() < 1e-5, "channel {c}: {got:?}");
            }
        }
    }
}
