//! The weighting strategy a config names, built for its pool (the strategy factory).

use anyhow::{anyhow, Context, Result};
use tch::Device;

use mtkd_distill_core::weighting::{Equal, EqualOnesWarmup, NoKd, Single, WeightingStrategy};

use super::pool::PoolMember;
use crate::config::{Config, StrategyKind};

/// The strategy of `cfg.distill` for `pool` (no KD without a distill section).
pub(super) fn build(
    cfg: &Config,
    pool: &[PoolMember],
    num_classes: i64,
    device: Device,
) -> Result<Box<dyn WeightingStrategy>> {
    let distill = cfg.distill.clone();
    let strategy: Box<dyn WeightingStrategy> = match distill.as_ref().map(|d| d.strategy) {
        None | Some(StrategyKind::None) => Box::new(NoKd),
        Some(StrategyKind::Equal) => match distill.as_ref().map(|d| d.equal_ones_epochs) {
            Some(n) if n > 0 => Box::new(EqualOnesWarmup::new(n)),
            _ => Box::new(Equal),
        },
        Some(StrategyKind::MtkdRl) => {
            let d = distill
                .as_ref()
                .ok_or_else(|| anyhow!("distill section missing"))?;
            let dims: Vec<i64> = pool
                .iter()
                .map(|p| {
                    p.teacher
                        .feature_shape()
                        .filter(|_| crate::shared::with_features(cfg))
                        .map(|f| f.0)
                        .unwrap_or(0)
                })
                .collect();
            let mut agent_cfg = d.agent.clone().unwrap_or_default();
            // Exploration noise differs between seeds of a comparison.
            agent_cfg.seed = agent_cfg.seed.wrapping_add(cfg.run.seed);
            mtkd_rl_weighting::build(
                agent_cfg,
                &dims,
                num_classes,
                d.ce_weight,
                d.kd_weight,
                device,
            )
            .context("building the MTKD-RL agent (distill.agent)")?
        }
        Some(StrategyKind::Ebkd) => Box::new(mtkd_distill_core::baselines::Ebkd),
        Some(StrategyKind::CaMkd) => Box::new(mtkd_distill_core::baselines::CaMkd),
        Some(StrategyKind::Aekd) => {
            let cap = distill.as_ref().map(|d| d.aekd_cap).unwrap_or(0.6);
            Box::new(mtkd_distill_core::baselines::Aekd::new(cap))
        }
        Some(StrategyKind::Mmkd) => {
            let d = distill
                .as_ref()
                .ok_or_else(|| anyhow!("distill section missing"))?;
            Box::new(
                mtkd_distill_core::mmkd::Mmkd::new(
                    d.mmkd.clone().unwrap_or_default(),
                    pool.len() as i64,
                    num_classes,
                    d.ce_weight,
                    d.kd_weight,
                    device,
                )
                .context("building the MMKD weight network (distill.mmkd)")?,
            )
        }
        Some(StrategyKind::Fixed) => {
            let table = distill
                .as_ref()
                .and_then(|d| d.fixed.as_ref())
                .ok_or_else(|| anyhow!("strategy `fixed` needs [distill.fixed]"))?;
            Box::new(
                mtkd_distill_core::weighting::Fixed::new(
                    table,
                    pool.len(),
                    num_classes as usize,
                    device,
                )
                .context("distill.fixed")?,
            )
        }
        Some(StrategyKind::Single) => Box::new(Single::new(single_teacher(cfg, pool)?)),
    };
    Ok(strategy)
}

/// The pool position of `distill.teacher` (single-teacher KD).
pub(super) fn single_teacher(cfg: &Config, pool: &[PoolMember]) -> Result<usize> {
    let name = cfg
        .distill
        .as_ref()
        .and_then(|d| d.teacher.clone())
        .unwrap_or_default();
    pool.iter()
        .position(|p| p.teacher.name() == name)
        .ok_or_else(|| anyhow!("distill.teacher: no teacher named `{name}`"))
}
