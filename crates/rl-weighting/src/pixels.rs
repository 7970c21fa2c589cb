//! The meta mode on segmentation (docs/METHOD.md section 10.7): the policy's features and the
//! look-ahead credit per pixel.
//!
//! - **Features.** At pixel p of image b, teacher m's features are those of a classification
//!   sample computed from its logits at that pixel: cross-entropy against the pixel's label,
//!   `T^2 KL(p_m || q)` to the student, entropy, the image's feature cosine (0 without feature
//!   KD), and the cross-entropy and KL relative to the teachers' mean at that pixel.
//! - **Credit.** The segmentation head's classifier is a 1x1 convolution, and the logits are its
//!   output upsampled bilinearly, so the logits at pixel p are `W h_p + b` with `h_p` the
//!   upsampled head map there ([`mtkd_distill_core::signals::StudentHead::pixel_embedding`]).
//!   The virtual step takes the closed-form gradient of the training loss (`ce_w` pixel CE +
//!   `kd_w sum_m w[b,m,p] T^2 KL_m[b,p]`, each averaged over the image's labelled pixels, then
//!   over images) with respect to every pixel's logits, moves `W` and `b` by one SGD step at the
//!   student's learning rate, and the quiz loss is the task's own loss of the moved classifier:
//!   the pixel cross-entropy averaged over each labelled image's labelled pixels, then over
//!   those images. The credit of teacher m at pixel p is minus the derivative of the quiz loss
//!   with respect to `w[b,m,p]`, per unit of learning rate and per unit of the pixel's share of
//!   the training loss (`1 / (B n_b)`, `n_b` the image's labelled pixels), so that it does not
//!   depend on the image's size.

use tch::{Kind, Reduction, Tensor};

use mtkd_distill_core::signals::{BatchSignals, PixelInputs, StudentHead};
use mtkd_distill_core::{Error, Result};

/// What the per-pixel features and look-ahead of one batch read, flattened to the
/// `N = B H W` pixels in `(b, y, x)` order.
pub struct PixelBatch {
    /// The policy's input, unnormalised, `[N, M, FEATURES]`.
    pub features: Tensor,
    /// 1 where a pixel has a label (or a pseudo-label), else 0, `[N]` float.
    pub valid: Tensor,
    /// The pixel's class (0 where it has none), `[N]` int64.
    pub targets: Tensor,
    /// Each teacher's softmax at temperature T, `[N, M, K]`.
    pub teacher_soft: Tensor,
    /// `1 / (B n_b)` at the labelled pixels of image b, 0 elsewhere `[N]`: each pixel's share of
    /// a per-image mean over the batch.
    pub share: Tensor,
    /// `(B, H, W)`.
    pub dims: (i64, i64, i64),
}

fn to_rows(t: &Tensor) -> Result<Tensor> {
    // [B, C, H, W] -> [B H W, C]
    let c = t.size()[1];
    Ok(t.f_permute([0, 2, 3, 1])?.f_reshape([-1, c])?)
}

/// The per-pixel features of a batch (no gradient).
pub fn pixel_batch(s: &BatchSignals, px: &PixelInputs, features: i64) -> Result<PixelBatch> {
    tch::no_grad(|| {
        let t = s.temperature;
        let size = px.student_logits.size();
        if size.len() != 4 || px.teacher_logits.is_empty() {
            return Err(Error::Invalid {
                what: "mtkd-rl meta pixels".into(),
                reason: format!(
                    "per-pixel inputs need [B, K, H, W] logits and a teacher, got {size:?} and {} teachers",
                    px.teacher_logits.len()
                ),
            });
        }
        let (b, h, w) = (size[0], size[2], size[3]);
        let m = px.teacher_logits.len() as i64;
        let valid_map = px.targets.f_ne(px.ignore_index)?;
        let valid_f = valid_map.f_to_kind(Kind::Float)?;
        let log_q = (px.student_logits.f_div_scalar(t)?).f_log_softmax(1, Kind::Float)?;
        let (mut ce, mut kl, mut ent, mut soft) = (vec![], vec![], vec![], vec![]);
        for tl in &px.teacher_logits {
            let tl = tl.f_to_kind(Kind::Float)?;
            ce.push(tl.f_cross_entropy_loss::<&Tensor>(
                &px.targets,
                None,
                Reduction::None,
                px.ignore_index,
                0.0,
            )?);
            let logp = tl.f_log_softmax(1, Kind::Float)?;
            ent.push(-(logp.f_exp()? * &logp).f_sum_dim_intlist(1, false, Kind::Float)?);
            let log_pt = tl.f_div_scalar(t)?.f_log_softmax(1, Kind::Float)?;
            let pt = log_pt.f_exp()?;
            kl.push((&pt * (&log_pt - &log_q)).f_sum_dim_intlist(1, false, Kind::Float)? * (t * t));
            soft.push(to_rows(&pt)?);
        }
        let ce = Tensor::f_stack(&ce, 1)?; // [B, M, H, W]
        let kl = Tensor::f_stack(&kl, 1)?;
        let ent = Tensor::f_stack(&ent, 1)?;
        let cos = match &s.cos {
            Some(c) => c
                .f_to_kind(Kind::Float)?
                .f_view([b, m, 1, 1])?
                .f_expand([b, m, h, w], false)?,
            None => ce.f_zeros_like()?,
        };
        let rel = |x: &Tensor| -> Result<Tensor> { Ok(x - x.f_mean_dim(1, true, Kind::Float)?) };
        let f = Tensor::f_stack(
            &[
                ce.shallow_clone(),
                kl.shallow_clone(),
                ent,
                cos,
                rel(&ce)?,
                rel(&kl)?,
            ],
            2,
        )?; // [B, M, F, H, W]
        let features_t = f
            .f_permute([0, 3, 4, 1, 2])?
            .f_reshape([b * h * w, m, features])?;
        let n_b = valid_f
            .f_sum_dim_intlist([1i64, 2].as_slice(), true, Kind::Float)?
            .f_clamp_min(1.0)?;
        let share = (&valid_f / n_b / b as f64).f_reshape([-1])?;
        Ok(PixelBatch {
            features: features_t,
            valid: valid_f.f_reshape([-1])?,
            targets: px
                .targets
                .f_where_scalarother(&valid_map, 0)?
                .f_reshape([-1])?,
            teacher_soft: Tensor::f_stack(&soft, 1)?,
            share,
            dims: (b, h, w),
        })
    })
}

/// The pixels the quiz reads `[N]` (1 or 0): the labelled pixels of the images that carry their
/// labels (a pseudo-labelled image's pixels are valid for the features but not quizzed on).
pub fn quiz_pixels(s: &BatchSignals, px: &PixelBatch) -> Result<Tensor> {
    let (b, h, w) = px.dims;
    Ok(match &s.labelled {
        None => px.valid.shallow_clone(),
        Some(l) => {
            &px.valid
                * l.f_to_kind(Kind::Float)?
                    .f_view([b, 1])?
                    .f_expand([b, h * w], false)?
                    .f_reshape([-1])?
        }
    })
}

/// Which quiz the per-pixel credit scores ([`pixel_credit`]).
pub enum PixelQuiz<'a> {
    /// The whole moved classifier on every quiz pixel (`quiz = "current"`): the credit of a
    /// pixel carries the other pixels' terms through `h_p . h_q`; weights and credit `[N, M]`.
    Current,
    /// Each quiz pixel on its own share of the virtual step, `z'_p = z_p - lr (|h_p|^2 + 1) g_p`
    /// (`quiz = "own"`): no cross terms, so only these rows `[S]` (indices into the `N` pixels)
    /// are computed; weights and credit `[S, M]`.
    Own(&'a Tensor),
}

/// The look-ahead credit of per-pixel weights `w` (no gradient in or out; rows as `quiz` says),
/// and the quiz loss (a scalar; with [`PixelQuiz::Own`] its estimate from the rows read, the
/// quiz-weighted mean of their own terms times the total quiz weight). `None` when the batch has
/// no labelled pixel to quiz on.
pub fn pixel_credit(
    s: &BatchSignals,
    px: &PixelBatch,
    head: &StudentHead,
    w: &Tensor,
    ce_weight: f64,
    kd_weight: f64,
    quiz: PixelQuiz<'_>,
) -> Result<Option<(Tensor, Tensor)>> {
    let (b, h, wd) = px.dims;
    let emb = head
        .pixel_embedding
        .as_ref()
        .ok_or_else(|| Error::Invalid {
            what: "mtkd-rl meta".into(),
            reason:
                "the student head carries no per-pixel embedding (StudentHead::pixel_embedding)"
                    .into(),
        })?;
    let es = emb.size();
    if es.len() != 4 || es[0] != b || es[2] != h || es[3] != wd {
        return Err(Error::ShapeMismatch {
            what: "per-pixel student embedding".into(),
            expected: format!("[{b}, D, {h}, {wd}]"),
            got: format!("{es:?}"),
        });
    }
    let quiz_rows = quiz_pixels(s, px)?;
    // Per-pixel quiz weights: mean over each quiz image's labelled pixels, then over those images.
    let per_img = quiz_rows.f_view([b, h * wd])?;
    let n_b = per_img.f_sum_dim_intlist(1, true, Kind::Float)?;
    let images = n_b.f_gt(0.0)?.f_to_kind(Kind::Float)?.f_sum(Kind::Float)?;
    if images.f_double_value(&[])? == 0.0 {
        return Ok(None);
    }
    let quiz_w = (per_img / n_b.f_clamp_min(1.0)? / images).f_reshape([-1])?;
    // The rows computed: every pixel, or the own quiz's selection.
    let pick = |t: &Tensor| -> Result<Tensor> {
        Ok(match &quiz {
            PixelQuiz::Current => t.shallow_clone(),
            PixelQuiz::Own(rows) => t.f_index_select(0, rows)?,
        })
    };
    // The CE term's share per pixel: labelled images only, scaled as the step scales it.
    let ce_rows = match s.ce_share()? {
        Some(share) => Some(pick(
            &share
                .f_view([b, 1])?
                .f_expand([b, h * wd], false)?
                .f_reshape([-1, 1])?,
        )?),
        None => None,
    };
    let hp = pick(&to_rows(&emb.detach().f_to_kind(Kind::Float)?)?)?; // [N or S, D]
    let (targets, soft, share, quiz_w, valid) = (
        pick(&px.targets)?,
        pick(&px.teacher_soft)?,
        pick(&px.share)?,
        pick(&quiz_w)?,
        pick(&px.valid)?,
    );
    let weight = head.weight.detach().f_to_kind(Kind::Float)?; // [K, D]
    let k = weight.size()[0];
    let z = match &head.bias {
        Some(bias) => hp.f_matmul(&weight.tr())? + bias.detach(),
        None => hp.f_matmul(&weight.tr())?,
    };
    let t = s.temperature;
    let onehot = targets.f_one_hot(k)?.f_to_kind(Kind::Float)?;
    let leaf = w.detach().set_requires_grad(true);
    let mut g_ce = (z.f_softmax(1, Kind::Float)? - &onehot) * ce_weight;
    if let Some(rows) = &ce_rows {
        g_ce *= rows;
    }
    let q_t = (&z / t).f_softmax(1, Kind::Float)?;
    // sum_m w[n, m] (q_T - p_m,T) = q_T sum_m w - sum_m w p_m
    let pull = &q_t * leaf.f_sum_dim_intlist(1, true, Kind::Float)?
        - leaf
            .f_unsqueeze(2)?
            .f_mul(&soft)?
            .f_sum_dim_intlist(1, false, Kind::Float)?;
    let g = (g_ce + pull * (kd_weight * t)) * share.f_unsqueeze(1)?;
    let lr = head.lr;
    let z_new = match &quiz {
        PixelQuiz::Own(_) => {
            let mut norm = hp.f_square()?.f_sum_dim_intlist(1, true, Kind::Float)?;
            if head.bias.is_some() {
                norm += 1.0;
            }
            &z - g * norm * lr
        }
        PixelQuiz::Current => {
            let w_new = &weight - g.tr().f_matmul(&hp)? * lr;
            match &head.bias {
                Some(bias) => {
                    hp.f_matmul(&w_new.tr())? + bias.detach()
                        - g.f_sum_dim_intlist(0, false, Kind::Float)? * lr
                }
                None => hp.f_matmul(&w_new.tr())?,
            }
        }
    };
    let ce_new =
        z_new.f_cross_entropy_loss::<&Tensor>(&targets, None, Reduction::None, -100, 0.0)?;
    let quiz_loss = (ce_new * &quiz_w).f_sum(Kind::Float)?;
    let grad = Tensor::f_run_backward(&[&quiz_loss], &[&leaf], false, false)?;
    // Per unit of learning rate and of the pixel's share of the training loss.
    let scale = share.f_clamp_min(1e-30)?.f_reciprocal()?.f_mul(&valid)?;
    let credit = (-&grad[0] / lr.max(1e-12)) * scale.f_unsqueeze(1)?;
    let quiz_loss = match &quiz {
        PixelQuiz::Current => quiz_loss,
        // The rows read stand for every quiz pixel (the quiz weights sum to 1 over them all).
        PixelQuiz::Own(_) => quiz_loss / quiz_w.f_sum(Kind::Float)?.f_clamp_min(1e-30)?,
    };
    Ok(Some((credit.detach(), quiz_loss.detach())))
}
