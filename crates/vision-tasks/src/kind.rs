//! Which task a run trains ([`TaskKind`]), and what its targets can follow: a leaf module that
//! the data, the loader and the tasks share.

use serde::{Deserialize, Serialize};

use crate::transform::{Augment, EvalResize};

/// Which task a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    #[default]
    Classification,
    Segmentation,
    Detection,
}

impl TaskKind {
    /// Whether this task's targets can follow the transforms `augment` (training) and
    /// `eval_resize` (evaluation). Masks follow every transform that keeps the image size;
    /// boxes follow only the horizontal flip; `augment.scale` is a segmentation transform.
    /// `Err((field, why))` names the `[data]` field to change.
    pub fn check_transforms(
        self,
        augment: Option<&Augment>,
        eval_resize: Option<&EvalResize>,
    ) -> std::result::Result<(), (&'static str, String)> {
        let rrc = augment.is_some_and(|a| a.random_resized_crop.is_some());
        let scale = augment.is_some_and(|a| a.scale.is_some());
        let resizes = rrc || eval_resize.is_some();
        match self {
            TaskKind::Detection
                if resizes || scale || augment.is_some_and(|a| a.crop_padding > 0) =>
            {
                Err((
                    "data.augment",
                    "detection boxes follow only the horizontal flip (hflip); crop_padding, \
                     scale, random_resized_crop and eval_resize are not built for boxes"
                        .into(),
                ))
            }
            TaskKind::Segmentation if resizes => Err((
                "data.augment",
                "segmentation keeps the image size: use augment.scale and crop_padding, not \
                 random_resized_crop or eval_resize"
                    .into(),
            )),
            TaskKind::Classification if scale => Err((
                "data.augment.scale",
                "is a segmentation augmentation".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The task's name as configs and messages write it.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::Segmentation => "segmentation",
            TaskKind::Detection => "detection",
        }
    }

    /// Whether a look-ahead strategy (MMKD, the agent's meta mode) applies: they look ahead
    /// through the student's last linear layer on pooled features, which a detector's class
    /// conv over a pyramid is not.
    pub fn look_ahead(self) -> bool {
        self != TaskKind::Detection
    }
}
