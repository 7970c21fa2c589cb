//! mtkd-rl-weighting: the MTKD-RL agent's weight components (docs/METHOD.md section 3).
//!
//! The hand-crafted per-sample components — teacher confidence, logit gap and feature gap — and
//! the fixed mix are here; [`agent::MtkdAgent`] (policy, reward, buffer, update; parity and clean
//! modes) builds on them and implements `mtkd_distill_core::weighting::WeightingStrategy`.

pub mod agent;
pub mod meta;
pub mod pixels;

use tch::{Kind, Tensor};

use mtkd_distill_core::error::check_shape;
use mtkd_distill_core::Result;

/// Teacher confidence `c = (1 - softmax_m(CE)) / (M - 1)`: low cross-entropy, high weight.
/// Rows sum to 1. For one teacher the published formula divides by zero; this returns 1.
///
/// # Shapes
/// `ce [B, M]` -> `[B, M]`
pub fn confidence(ce: &Tensor) -> Result<Tensor> {
    check_shape("confidence input (CE matrix)", ce, &[-1, -1])?;
    let m = ce.size()[1];
    if m == 1 {
        return Ok(Tensor::ones_like(ce));
    }
    Ok((1.0 - ce.f_softmax(1, Kind::Float)?) / (m - 1) as f64)
}

/// Logit gap weight `d_l = softmax_m(KL)`: the farther the student from a teacher, the more weight.
///
/// # Shapes
/// `kl [B, M]` -> `[B, M]`
pub fn logit_gap(kl: &Tensor) -> Result<Tensor> {
    check_shape("logit gap input (KL matrix)", kl, &[-1, -1])?;
    Ok(kl.f_softmax(1, Kind::Float)?)
}

/// Feature gap weight `d_f = softmax_m(COS)`.
///
/// # Shapes
/// `cos [B, M]` -> `[B, M]`
pub fn feature_gap(cos: &Tensor) -> Result<Tensor> {
    check_shape("feature gap input (cosine matrix)", cos, &[-1, -1])?;
    Ok(cos.f_softmax(1, Kind::Float)?)
}

/// The fixed mix `(a + c + d) / 3` of the agent's head output, confidence and gap.
///
/// # Shapes
/// all `[B, M]` -> `[B, M]`
pub fn fixed_mix(agent: &Tensor, confidence: &Tensor, gap: &Tensor) -> Result<Tensor> {
    check_shape("fixed mix confidence", confidence, &agent.size())?;
    check_shape("fixed mix gap", gap, &agent.size())?;
    Ok((agent + confidence + gap) / 3.0)
}

/// The agent of `[distill.agent]` as a strategy: [`agent::MtkdAgent`] in parity and clean mode,
/// [`meta::MetaAgent`] in meta mode. `embedding_dims` are the teachers' embedding widths (0 for
/// logits-only); `ce_weight` and `kd_weight` are the student loss's (the meta mode's look-ahead
/// needs them).
pub fn build(
    cfg: agent::AgentConfig,
    embedding_dims: &[i64],
    num_classes: i64,
    ce_weight: f64,
    kd_weight: f64,
    device: tch::Device,
) -> Result<Box<dyn mtkd_distill_core::weighting::WeightingStrategy>> {
    Ok(match cfg.mode {
        agent::Mode::Meta => Box::new(meta::MetaAgent::new(
            cfg,
            embedding_dims.len(),
            ce_weight,
            kd_weight,
            device,
        )?),
        _ => Box::new(agent::MtkdAgent::new(
            cfg,
            embedding_dims,
            num_classes,
            device,
        )?),
    })
}
