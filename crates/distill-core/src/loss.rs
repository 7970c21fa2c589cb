//! Per-sample losses of docs/METHOD.md sections 2 and 4. Each returns a `[B]` tensor; the caller weights
//! and averages. Checked against PyTorch in `tests/golden.rs`.

use tch::{Kind, Reduction, Tensor};

use crate::error::{check_shape, Error, Result};

/// Cross-entropy of `logits` against integer `targets`, per sample.
///
/// # Shapes
/// `logits [B, K]`, `targets [B]` (int64) -> `[B]`
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_shape("cross_entropy logits", logits, &[-1, -1])?;
    check_shape("cross_entropy targets", targets, &[logits.size()[0]])?;
    Ok(logits.f_cross_entropy_loss::<&Tensor>(targets, None, Reduction::None, -100, 0.0)?)
}

/// Temperature-scaled KL divergence `T^2 * KL(softmax(t/T) || softmax(s/T))`, per sample.
/// Gradients flow through `student` only if it requires them; `teacher` is treated as constant.
///
/// # Shapes
/// `student [B, K]`, `teacher [B, K]` -> `[B]`
pub fn kd_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(Error::Invalid {
            what: "temperature".into(),
            reason: format!("must be positive, got {temperature}"),
        });
    }
    check_shape("kd_kl teacher logits", teacher, &student.size())?;
    let log_q = (student / temperature).f_log_softmax(-1, Kind::Float)?;
    let log_p = (teacher.detach() / temperature).f_log_softmax(-1, Kind::Float)?;
    let kl = (log_p.exp() * (&log_p - log_q)).f_sum_dim_intlist(-1, false, Kind::Float)?;
    Ok(kl * (temperature * temperature))
}

/// Mean squared error between two feature maps, averaged over all but the batch dimension.
///
/// # Shapes
/// `student [B, C, H, W]`, `teacher [B, C, H, W]` -> `[B]`
pub fn feature_mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_shape("feature_mse teacher map", teacher, &student.size())?;
    let diff = student - teacher.detach();
    let per = diff.square().flatten(1, -1);
    Ok(per.f_mean_dim(-1, false, Kind::Float)?)
}

/// Cosine similarity along dim 1 (eps 1e-8, as `torch.nn.functional.cosine_similarity`).
///
/// # Shapes
/// `a [B, C]`, `b [B, C]` -> `[B]`
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_shape("cosine second operand", b, &a.size())?;
    Ok(Tensor::f_cosine_similarity(a, b, 1, 1e-8)?)
}

/// Entropy of `softmax(logits)` (natural log), per sample.
///
/// # Shapes
/// `logits [B, K]` -> `[B]`
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let log_p = logits.f_log_softmax(-1, Kind::Float)?;
    Ok(-(log_p.exp() * log_p).f_sum_dim_intlist(-1, false, Kind::Float)?)
}

/// Top-k correct flags per sample (1.0 if the target is among the `k` largest logits).
///
/// # Shapes
/// `logits [B, K]`, `targets [B]` -> `[B]` (float)
pub fn topk_correct(logits: &Tensor, targets: &Tensor, k: i64) -> Result<Tensor> {
    let k = k.min(logits.size()[1]);
    let (_, idx) = logits.f_topk(k, -1, true, true)?;
    Ok(idx
        .f_eq_tensor(&targets.unsqueeze(-1))?
        .f_any_dim(-1, false)?
        .to_kind(Kind::Float))
}

/// Fail with [`Error::NonFinite`] naming `what` when `t` holds NaN or infinity.
pub fn ensure_finite(what: &str, t: &Tensor) -> Result<()> {
    let finite = t.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
    if finite {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what: what.to_owned(),
        })
    }
}
