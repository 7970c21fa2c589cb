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
    /// The task of a network whose head is a detector (`detector`), per-pixel (`dense`), or
    /// neither (a classifier).
    pub fn of_head(detector: bool, dense: bool) -> TaskKind {
        if detector {
            TaskKind::Detection
        } else if dense {
            TaskKind::Segmentation
        } else {
            TaskKind::Classification
        }
    }

    /// The heads a network of this task needs, as the config writes them (for messages).
    pub fn head_hint(self) -> &'static str {
        match self {
            TaskKind::Classification => "head = \"classifier\"",
            TaskKind::Segmentation => "a segmentation head (head = \"fcn\" or \"aspp\")",
            TaskKind::Detection => "a detection head (head = \"fcos\")",
        }
    }

    /// Whether an image's label is the whole target, so that label edits (a class subset,
    /// label noise, flips, permutations) make a teacher of another kind; masks and boxes are
    /// not edited.
    pub fn labels_are_targets(self) -> bool {
        self == TaskKind::Classification
    }

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

    /// Whether MMKD applies: it looks ahead through the student's last linear layer on pooled
    /// features, which a detector's class conv over a pyramid is not (the agent's meta mode
    /// weights a detector's locations from a credit in logit space instead).
    pub fn look_ahead(self) -> bool {
        self != TaskKind::Detection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_task_names_the_transforms_its_targets_cannot_follow() {
        let aug = |f: fn(&mut Augment)| {
            let mut a = Augment::default();
            f(&mut a);
            a
        };
        let flip = aug(|a| a.hflip = true);
        let shift = aug(|a| a.crop_padding = 2);
        let zoom = aug(|a| a.scale = Some([0.8, 1.25]));
        let rrc = aug(|a| a.random_resized_crop = Some(24));
        let resize = EvalResize {
            resize: 36,
            crop: 32,
        };
        let ok = |t: TaskKind, a: &Augment, e: Option<&EvalResize>| {
            t.check_transforms(Some(a), e).map_err(|(field, _)| field)
        };
        for t in [
            TaskKind::Classification,
            TaskKind::Segmentation,
            TaskKind::Detection,
        ] {
            assert_eq!(ok(t, &flip, None), Ok(()), "{t:?}: a flip fits every task");
        }
        assert_eq!(ok(TaskKind::Classification, &rrc, Some(&resize)), Ok(()));
        assert_eq!(
            ok(TaskKind::Classification, &zoom, None),
            Err("data.augment.scale")
        );
        assert_eq!(ok(TaskKind::Segmentation, &zoom, None), Ok(()));
        assert_eq!(ok(TaskKind::Segmentation, &shift, None), Ok(()));
        assert_eq!(
            ok(TaskKind::Segmentation, &flip, Some(&resize)),
            Err("data.augment")
        );
        assert_eq!(ok(TaskKind::Segmentation, &rrc, None), Err("data.augment"));
        for a in [&shift, &zoom, &rrc] {
            assert_eq!(ok(TaskKind::Detection, a, None), Err("data.augment"));
        }
        assert_eq!(TaskKind::Detection.check_transforms(None, None), Ok(()));
    }

    #[test]
    fn a_head_says_its_task() {
        assert_eq!(TaskKind::of_head(true, true), TaskKind::Detection);
        assert_eq!(TaskKind::of_head(false, true), TaskKind::Segmentation);
        assert_eq!(TaskKind::of_head(false, false), TaskKind::Classification);
        assert!(TaskKind::Segmentation.head_hint().contains("aspp"));
        assert!(TaskKind::Classification.labels_are_targets());
        assert!(!TaskKind::Detection.labels_are_targets());
    }
}
