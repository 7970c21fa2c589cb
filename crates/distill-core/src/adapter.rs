//! The per-teacher projector ("adapter") of docs/METHOD.md section 1: resize the student's feature map
//! to the teacher's spatial size, then 1x1 conv (with bias) -> BatchNorm -> ReLU.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::error::{check_shape, Result};
use crate::FeatureShape;

/// Maps the student's feature map `[B, Cs, Hs, Ws]` to one teacher's `[B, Ct, Ht, Wt]`.
///
/// Each teacher's adapter resizes the ORIGINAL student map (the published code chains the
/// resizes; docs/METHOD.md says not to). Larger maps are reduced with adaptive average pooling,
/// smaller ones enlarged with bilinear interpolation (align_corners = false).
#[derive(Debug)]
pub struct Adapter {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    student: FeatureShape,
    teacher: FeatureShape,
}

impl Adapter {
    /// Parameters live under `path` as `conv.weight`, `conv.bias`, `bn.*` (PyTorch names).
    pub fn new(path: &nn::Path, student: FeatureShape, teacher: FeatureShape) -> Adapter {
        let conv = nn::conv2d(path / "conv", student.0, teacher.0, 1, Default::default());
        let bn = nn::batch_norm2d(path / "bn", teacher.0, Default::default());
        Adapter {
            conv,
            bn,
            student,
            teacher,
        }
    }

    /// Project a student feature map to this teacher's shape.
    ///
    /// # Shapes
    /// `student_map [B, Cs, Hs, Ws]` -> `[B, Ct, Ht, Wt]`
    pub fn forward(&self, student_map: &Tensor, train: bool) -> Result<Tensor> {
        let (cs, hs, ws) = self.student;
        check_shape(
            "adapter input (student feature map)",
            student_map,
            &[-1, cs, hs, ws],
        )?;
        let (_, ht, wt) = self.teacher;
        let resized = if (hs, ws) == (ht, wt) {
            student_map.shallow_clone()
        } else if hs >= ht && ws >= wt {
            student_map.f_adaptive_avg_pool2d([ht, wt])?
        } else {
            student_map.f_upsample_bilinear2d([ht, wt], false, None, None)?
        };
        Ok(self.bn.forward_t(&resized.apply(&self.conv), train).relu())
    }
}
