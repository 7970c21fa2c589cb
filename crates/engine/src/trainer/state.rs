//! The run's state for checkpoints: every tensor by name, restoring it, the strategy's state,
//! and `student.init` / `student.init_strategy`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tch::nn::VarStore;
use tch::Tensor;

use mtkd_distill_core::weighting::StrategyState;

use super::step::DistillStep;
use crate::checkpoint;
use crate::config::Config;

/// Every tensor of the run's state, by checkpoint name.
pub(super) fn state_tensors(step: &DistillStep) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (n, t) in sorted_vars(&step.student_vs) {
        out.push((format!("student.{n}"), t));
    }
    for (n, t) in sorted_vars(&step.distiller.adapter_vs) {
        out.push((format!("adapter.{n}"), t));
    }
    for (n, t) in step.opt.state() {
        out.push((format!("optim.{n}"), t));
    }
    out
}

/// Everything data-parallel ranks must hold alike (the checkpoint's tensors and the
/// strategy's), sorted by name: the same list on every rank, whatever order maps gave.
pub(super) fn replicated_state(step: &DistillStep) -> Result<Vec<Tensor>> {
    let mut all = state_tensors(step);
    all.extend(strategy_state(step)?.0);
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// The strategy's state: tensors prefixed `strategy.` and its JSON bookkeeping.
pub(super) fn strategy_state(step: &DistillStep) -> Result<(Vec<(String, Tensor)>, String)> {
    let st = step.distiller.strategy.save_state()?;
    Ok((
        st.tensors
            .into_iter()
            .map(|(n, t)| (format!("strategy.{n}"), t))
            .collect(),
        st.json,
    ))
}

pub(super) fn restore(
    step: &mut DistillStep,
    tensors: Vec<(String, Tensor)>,
    strategy_json: &str,
) -> Result<()> {
    let (strategy, tensors): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .partition(|(n, _)| n.starts_with("strategy."));
    let st = StrategyState {
        tensors: strategy
            .into_iter()
            .map(|(n, t)| (n["strategy.".len()..].to_owned(), t))
            .collect(),
        json: strategy_json.to_owned(),
    };
    if !st.tensors.is_empty() || !st.json.is_empty() {
        step.distiller
            .strategy
            .load_state(&st)
            .context("restoring the weighting strategy from the checkpoint")?;
    }
    let student = step.student_vs.variables();
    let adapter = step.distiller.adapter_vs.variables();
    let mut optim = Vec::new();
    let mut restored = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (name, t) in tensors {
            let (store, key) = if let Some(k) = name.strip_prefix("student.") {
                (&student, k)
            } else if let Some(k) = name.strip_prefix("adapter.") {
                (&adapter, k)
            } else if let Some(k) = name.strip_prefix("optim.") {
                optim.push((k.to_owned(), t));
                continue;
            } else {
                bail!("checkpoint holds an unknown tensor `{name}`");
            };
            let mut var = store
                .get(key)
                .ok_or_else(|| {
                    anyhow!("checkpoint tensor `{name}` has no matching variable in this model")
                })?
                .shallow_clone();
            if var.size() != t.size() {
                bail!(
                    "checkpoint tensor `{name}` has shape {:?}, the model {:?}",
                    t.size(),
                    var.size()
                );
            }
            var.copy_(&t);
            restored.insert(name);
        }
        Ok(())
    })?;
    let missing: Vec<String> = student
        .keys()
        .map(|k| format!("student.{k}"))
        .chain(adapter.keys().map(|k| format!("adapter.{k}")))
        .filter(|k| !restored.contains(k))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the checkpoint lacks {} variable(s) of this model, e.g. `{}`",
            missing.len(),
            missing[0]
        );
    }
    step.opt
        .load_state(&optim)
        .map_err(|e| anyhow!("checkpoint optimizer state: {e}"))?;
    Ok(())
}

/// `student.init_strategy`: the strategy's state from the last checkpoint of the run `init`.
pub(super) fn init_strategy_from(step: &mut DistillStep, init: &Path) -> Result<()> {
    let ckpt = init.join("checkpoints");
    let (tensors, meta) = checkpoint::load_latest(&ckpt)?.ok_or_else(|| {
        anyhow!(
            "student.init_strategy: {} has no checkpoint to take the strategy's state from",
            init.display()
        )
    })?;
    if meta.active_teachers.is_some() {
        bail!(
                "student.init_strategy: teachers left the pool of {} (pruning); its strategy state does not fit the whole pool",
                init.display()
            );
    }
    let st = StrategyState {
        tensors: tensors
            .into_iter()
            .filter_map(|(n, t)| n.strip_prefix("strategy.").map(|k| (k.to_owned(), t)))
            .collect(),
        json: meta.strategy_json,
    };
    if st.tensors.is_empty() && st.json.is_empty() {
        bail!(
                "student.init_strategy: the run {} kept no strategy state (its strategy learns nothing)",
                init.display()
            );
    }
    step.distiller.strategy.load_state(&st).with_context(|| {
            format!(
                "student.init_strategy: the strategy state of {} does not fit this run's strategy and pool",
                init.display()
            )
        })?;
    tracing::info!(from = %init.display(), epoch = meta.epoch, "strategy state carried over");
    Ok(())
}

/// The weights file `student.init` names: a run folder's `student.safetensors` (its architecture
/// checked against `arch`) or a file.
pub(super) fn init_weights(init: &Path, arch: mtkd_student::Arch) -> Result<PathBuf> {
    if init.is_dir() {
        let cfg_path = init.join("config.toml");
        let weights = init.join("student.safetensors");
        if !weights.is_file() {
            bail!(
                "student.init: {} is not a finished run folder (no student.safetensors)",
                init.display()
            );
        }
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let theirs = Config::parse(&text, &cfg_path, &[])?;
            if theirs.student.arch != arch {
                bail!(
                    "student.init: {} trained a {} student, this run builds a {arch}",
                    init.display(),
                    theirs.student.arch
                );
            }
        }
        return Ok(weights);
    }
    if !init.is_file() {
        bail!("student.init: {} does not exist", init.display());
    }
    Ok(init.to_path_buf())
}

pub(super) fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let vars = vs.variables();
    let mut v: Vec<(String, Tensor)> = vars
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Re-lay every 4-D variable of `vs` (convolution weights) channels-last, in place: the
/// modules keep their handles, and gradients and momentum follow the parameters' layout.
pub(super) fn relay_channels_last(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let laid = mtkd_distill_core::to_channels_last(&v);
                v.set_data(&laid);
            }
        }
    });
}

/// The variables of `vs` by name, each contiguous (safetensors stores row-major data; a
/// channels-last weight is copied).
pub(super) fn contiguous_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    sorted_vars(vs)
        .into_iter()
        .map(|(n, t)| (n, t.contiguous()))
        .collect()
}

pub(super) fn sorted_vars(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
