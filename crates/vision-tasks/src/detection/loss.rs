//! The detector's losses and the detection KD terms (docs/METHOD.md, section 14), per image.
//!
//! - Task loss (FCOS): sigmoid focal loss (alpha 0.25, gamma 2) over every location and class,
//!   GIoU loss of the decoded boxes and binary cross-entropy of the centerness at positive
//!   locations; each summed over the image and divided by its positive count (at least 1).
//! - Class KD: per location and class, `T^2` times the binary KL between the teacher's and the
//!   student's sigmoid probabilities at temperature T, summed over classes and averaged over
//!   locations with foreground weights `max(max_k sigmoid(teacher), positive)`, so that the
//!   many background locations cannot drown the few objects.
//! - Box KD: the GIoU loss between the student's and the teacher's decoded boxes, averaged over
//!   the image's positive locations (0 without any).

use tch::{Kind, Reduction, Tensor};

use super::boxes::giou_loss;
use super::layout::{DetLayout, Targets};
use crate::error::Result;
use mtkd_distill_core::signals::{BatchSignals, LocationQuiz, LocationSignals, TeacherColumns};
use mtkd_distill_core::ModelOutput;

pub const FOCAL_ALPHA: f64 = 0.25;
pub const FOCAL_GAMMA: f64 = 2.0;

/// `torchvision.ops.sigmoid_focal_loss`, reduction none.
pub fn sigmoid_focal(logits: &Tensor, targets: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let p = logits.f_sigmoid()?;
    let ce = logits.f_binary_cross_entropy_with_logits::<Tensor>(
        targets,
        None,
        None,
        Reduction::None,
    )?;
    let p_t = &p * targets + (p.neg() + 1.0) * (targets.neg() + 1.0);
    let mut loss = ce * (p_t.neg() + 1.0).pow_tensor_scalar(gamma);
    if alpha >= 0.0 {
        let a_t = targets * alpha + (targets.neg() + 1.0) * (1.0 - alpha);
        loss = a_t * loss;
    }
    Ok(loss)
}

/// Per-image positive counts `[B]`, at least 1.
fn positives(t: &Targets) -> Tensor {
    t.positive()
        .sum_dim_intlist(1, false, Kind::Float)
        .clamp_min(1.0)
}

/// The three FCOS terms per image `[B]` each: classification, box, centerness.
pub fn fcos_terms(
    layout: &DetLayout,
    out: &Tensor,
    targets: &Targets,
    num_classes: i64,
) -> Result<(Tensor, Tensor, Tensor)> {
    layout.check("detector output", out, num_classes)?;
    let k = num_classes;
    let pos = targets.positive();
    let npos = positives(targets);
    let cls_logits = out.slice(1, 0, k, 1).transpose(1, 2); // [B, L, K]
                                                            // One-hot of the assigned class; background rows are all zeros.
    let onehot = targets.classes.clamp_min(0).one_hot(k).to_kind(Kind::Float) * pos.unsqueeze(-1);
    let cls = sigmoid_focal(&cls_logits, &onehot, FOCAL_ALPHA, FOCAL_GAMMA)?.sum_dim_intlist(
        [1i64, 2].as_slice(),
        false,
        Kind::Float,
    ) / &npos;
    let pred = layout.boxes(out, k)?;
    let gl = giou_loss(&pred, &targets.boxes.to_kind(pred.kind()))?;
    let gl = gl.where_self(&pos.ge(0.5), &Tensor::zeros_like(&gl));
    let bx = gl.sum_dim_intlist(1, false, Kind::Float) / &npos;
    let ctr_logits = out.select(1, k + 4);
    let ctr = ctr_logits.f_binary_cross_entropy_with_logits::<Tensor>(
        &targets.centerness,
        None,
        None,
        Reduction::None,
    )? * &pos;
    let ctr = ctr.sum_dim_intlist(1, false, Kind::Float) / &npos;
    Ok((cls, bx, ctr))
}

/// The FCOS loss per image `[B]`: the sum of [`fcos_terms`].
pub fn fcos_loss(
    layout: &DetLayout,
    out: &Tensor,
    targets: &Targets,
    num_classes: i64,
) -> Result<Tensor> {
    let (c, b, t) = fcos_terms(layout, out, targets, num_classes)?;
    Ok(c + b + t)
}

/// Foreground weights `[B, L]` of a teacher's output: `max(max_k sigmoid(t), positive)`.
pub fn foreground_weights(teacher: &Tensor, targets: &Targets, num_classes: i64) -> Tensor {
    let score = teacher
        .slice(1, 0, num_classes, 1)
        .detach()
        .sigmoid()
        .amax(1, false);
    score.maximum(&targets.positive())
}

/// Class KD per image `[B]` (foreground-weighted binary KL at temperature T, times `T^2`).
pub fn class_kd(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Targets,
    num_classes: i64,
    temperature: f64,
) -> Result<Tensor> {
    let k = num_classes;
    let per_loc = class_kl_per_location(
        &student.slice(1, 0, k, 1),
        &teacher.slice(1, 0, k, 1),
        temperature,
    ); // [B, L]
    let w = foreground_weights(teacher, targets, k);
    Ok((per_loc * &w).sum_dim_intlist(1, false, Kind::Float)
        / w.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-6))
}

/// Box KD per image `[B]`: GIoU loss between the student's and the teacher's decoded boxes at
/// positive locations, averaged over them.
pub fn box_kd(
    layout: &DetLayout,
    student: &Tensor,
    teacher: &Tensor,
    targets: &Targets,
    num_classes: i64,
) -> Result<Tensor> {
    let ps = layout.boxes(student, num_classes)?;
    let pt = layout.boxes(&teacher.detach(), num_classes)?;
    let gl = giou_loss(&ps, &pt)?;
    let pos = targets.positive();
    let gl = gl.where_self(&pos.ge(0.5), &Tensor::zeros_like(&gl));
    Ok(gl.sum_dim_intlist(1, false, Kind::Float) / positives(targets))
}

/// Class logits pooled per image `[B, K]`: the mean over the image's positive locations (over
/// all locations when it has none).
pub fn pooled_class_logits(out: &Tensor, targets: &Targets, num_classes: i64) -> Tensor {
    let cls = out.slice(1, 0, num_classes, 1); // [B, K, L]
    let pos = targets.positive();
    let any = pos.sum_dim_intlist(1, true, Kind::Float).gt(0.0); // [B, 1]
    let w = pos.where_self(&any, &Tensor::ones_like(&pos)).unsqueeze(1); // [B, 1, L]
    (&cls * &w).sum_dim_intlist(2, false, Kind::Float)
        / w.sum_dim_intlist(2, false, Kind::Float).clamp_min(1.0)
}

/// The per-image signals of a detection batch for the weighting strategies (detached): a
/// teacher's "cross-entropy" is its FCOS loss against the ground truth, its KL the detection
/// KD term, its entropy that of the softmax of its pooled class logits, and the logits the
/// strategies see are the pooled class logits ([`pooled_class_logits`]).
#[allow(clippy::too_many_arguments)]
pub fn detection_signals(
    layout: &DetLayout,
    student: &Tensor,
    projected: &[Option<Tensor>],
    teachers: &[ModelOutput],
    targets: &Targets,
    image_labels: &Tensor,
    num_classes: i64,
    temperature: f64,
    kl_terms: &[Tensor],
) -> Result<BatchSignals> {
    mtkd_distill_core::signals::check_teachers(teachers, Some(kl_terms))?;
    tch::no_grad(|| {
        let s = student.detach();
        let mut c = TeacherColumns::with_capacity(teachers.len());
        for (t, kl) in teachers.iter().zip(kl_terms) {
            c.ce.push(fcos_loss(layout, &t.logits, targets, num_classes)?);
            let p = pooled_class_logits(&t.logits, targets, num_classes);
            let logp = p.log_softmax(1, Kind::Float);
            c.entropy.push(
                (logp.exp() * &logp)
                    .sum_dim_intlist(1, false, Kind::Float)
                    .neg(),
            );
            c.logits.push(p);
            c.kl.push(kl.detach());
        }
        let pooled = pooled_class_logits(&s, targets, num_classes);
        Ok(c.into_signals(projected, teachers, pooled, image_labels, temperature)?)
    })
}

/// `T^2` times the binary KL between a teacher's and the student's sigmoid probabilities at
/// temperature T, summed over classes, per location `[B, L]` (gradient to the student only).
///
/// # Shapes
/// `student [B, K, L]` and `teacher [B, K, L]` class logits -> `[B, L]`
fn class_kl_per_location(student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    let s = student / temperature;
    let t = teacher.detach() / temperature;
    // KL(Bern(p_t) || Bern(p_s)) = p_t (log p_t - log p_s) + (1 - p_t) (log(1 - p_t) - log(1 - p_s)),
    // with log sigmoid for stability: log(1 - sigmoid(x)) = log sigmoid(-x).
    let (lt, lnt) = (t.log_sigmoid(), t.neg().log_sigmoid());
    let (ls, lns) = (s.log_sigmoid(), s.neg().log_sigmoid());
    let pt = t.sigmoid();
    let kl = &pt * (&lt - &ls) + (pt.neg() + 1.0) * (&lnt - &lns);
    kl.sum_dim_intlist(1, false, Kind::Float) * (temperature * temperature)
}

/// The detection KD term per image `[B]` with a weight per teacher and location `w [B, M, L]`
/// (docs/METHOD.md section 14): teacher m's class KD is `sum_l w f kl / sum_l f` (foreground
/// weights `f` as [`class_kd`]) and its box KD `sum_pos w GIoU-loss / n_pos`; with `w = 1/M`
/// everywhere this is AVER's term. The weights carry no gradient.
#[allow(clippy::too_many_arguments)]
pub fn location_weighted_kd(
    layout: &DetLayout,
    student: &Tensor,
    teachers: &[Tensor],
    w: &Tensor,
    targets: &Targets,
    num_classes: i64,
    temperature: f64,
    box_kd_weight: f64,
) -> Result<Tensor> {
    let k = num_classes;
    let s_cls = student.slice(1, 0, k, 1);
    let w = w.detach();
    let pos = targets.positive();
    let ps = if box_kd_weight > 0.0 {
        Some(layout.boxes(student, k)?)
    } else {
        None
    };
    let mut kd = Tensor::zeros([student.size()[0]], (Kind::Float, student.device()));
    for (m, t) in teachers.iter().enumerate() {
        let wm = w.select(1, m as i64); // [B, L]
        let kl = class_kl_per_location(&s_cls, &t.slice(1, 0, k, 1), temperature);
        let f = foreground_weights(t, targets, k);
        kd += (kl * &f * &wm).sum_dim_intlist(1, false, Kind::Float)
            / f.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-6);
        if let Some(ps) = &ps {
            let pt = layout.boxes(&t.detach(), k)?;
            let gl = giou_loss(ps, &pt)?;
            let gl = gl.where_self(&pos.ge(0.5), &Tensor::zeros_like(&gl));
            kd += (gl * &wm).sum_dim_intlist(1, false, Kind::Float) / positives(targets)
                * box_kd_weight;
        }
    }
    Ok(kd)
}

/// The per-location signals of a detection batch and the look-ahead credit of each teacher at
/// each location (docs/METHOD.md section 14), without gradient out:
///
/// - `ce[b, m, l]`: teacher m's focal loss at location l against the assigned class, summed
///   over classes; `kl`: its class KD term there ([`class_kd`] before pooling); `entropy`: the
///   binary entropy of its class probabilities, summed over classes.
/// - The credit is a virtual SGD step in logit space: the student's class logits move by
///   `-lr (dCE/dz + kd_weight sum_m w_m dKD_m/dz)`, and the quiz loss `quiz_loss` is a sigmoid
///   focal loss over the labelled images `quiz_rows [B]` (summed over an image's locations and
///   classes, divided by its positives, averaged over the images): the FCOS classification
///   term (`LocationQuiz::Focal`, gamma 2) or the same without its focusing factor
///   (`LocationQuiz::BalancedCe`, gamma 0, the default). To first order
///   `-d quiz / d w[b, m, l] / lr = kd_weight <dQuiz/dz, dKD_m/dz>` at that location: teacher m
///   earns credit where its pull on the logits points the way the quiz's does. Scaled by `B^2`
///   so that it does not depend on the batch size.
#[allow(clippy::too_many_arguments)]
pub fn location_signals(
    student: &Tensor,
    teachers: &[Tensor],
    targets: &Targets,
    quiz_rows: &Tensor,
    num_classes: i64,
    temperature: f64,
    kd_weight: f64,
    quiz_loss: LocationQuiz,
) -> Result<LocationSignals> {
    let k = num_classes;
    let b = student.size()[0];
    let z = student
        .slice(1, 0, k, 1)
        .detach()
        .to_kind(Kind::Float)
        .set_requires_grad(true); // [B, K, L]
    let pos = targets.positive();
    let onehot = (targets.classes.clamp_min(0).one_hot(k).to_kind(Kind::Float) * pos.unsqueeze(-1))
        .transpose(1, 2); // [B, K, L]
    let npos = positives(targets);
    let rows = quiz_rows.to_kind(Kind::Float);
    let n_quiz = rows.sum(Kind::Float).clamp_min(1.0);
    let gamma = match quiz_loss {
        LocationQuiz::Focal => FOCAL_GAMMA,
        LocationQuiz::BalancedCe => 0.0,
    };
    let focal = sigmoid_focal(&z, &onehot, FOCAL_ALPHA, gamma)?;
    let quiz = ((focal.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float) / &npos) * &rows)
        .sum(Kind::Float)
        / &n_quiz;
    let g_quiz = Tensor::f_run_backward(&[&quiz], &[&z], false, false)?
        .pop()
        .unwrap_or_else(|| z.zeros_like());
    let (mut ce, mut kl, mut ent, mut credit) = (vec![], vec![], vec![], vec![]);
    for t in teachers {
        let tc = t.slice(1, 0, k, 1).detach().to_kind(Kind::Float);
        let per_loc = class_kl_per_location(&z, &tc, temperature);
        let f = foreground_weights(t, targets, k);
        let kd = ((&per_loc * &f).sum_dim_intlist(1, false, Kind::Float)
            / f.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-6))
        .sum(Kind::Float)
            / b as f64;
        let g = Tensor::f_run_backward(&[&kd], &[&z], false, false)?
            .pop()
            .unwrap_or_else(|| z.zeros_like());
        tch::no_grad(|| -> Result<()> {
            credit.push(
                (&g_quiz * &g).sum_dim_intlist(1, false, Kind::Float)
                    * (kd_weight * (b * b) as f64),
            );
            kl.push(per_loc.detach());
            ce.push(
                sigmoid_focal(&tc, &onehot, FOCAL_ALPHA, FOCAL_GAMMA)?.sum_dim_intlist(
                    1,
                    false,
                    Kind::Float,
                ),
            );
            let p = tc.sigmoid();
            let h = -(&p * tc.log_sigmoid() + (p.neg() + 1.0) * tc.neg().log_sigmoid());
            ent.push(h.sum_dim_intlist(1, false, Kind::Float));
            Ok(())
        })?;
    }
    let l = z.size()[2];
    Ok(LocationSignals {
        ce: Tensor::stack(&ce, 1),
        kl: Tensor::stack(&kl, 1),
        entropy: Tensor::stack(&ent, 1),
        credit: Tensor::stack(&credit, 1),
        quiz_loss: quiz.detach(),
        valid: rows.view([b, 1]).expand([b, l], false).contiguous(),
        classes: targets.classes.shallow_clone(),
    })
}
