//! SGD with (Nesterov) momentum and weight decay, PyTorch semantics, with momentum buffers that
//! are saved in checkpoints: tch's C++ optimizers keep their state out of reach, and an exact
//! resume needs it.

use tch::Tensor;

/// `torch.optim.SGD(params, lr, momentum, weight_decay, nesterov)` with dampening 0.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<(String, Tensor)>,
    buffers: Vec<Option<Tensor>>,
    pub lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
}

impl Sgd {
    /// `params` are named trainable tensors (names must be unique: they key the saved buffers).
    pub fn new(
        params: Vec<(String, Tensor)>,
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Sgd {
        let n = params.len();
        Sgd {
            params,
            buffers: (0..n).map(|_| None).collect(),
            lr,
            momentum,
            nesterov,
            weight_decay,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update from the gradients currently stored in the parameters.
    pub fn step(&mut self) {
        let grads: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, p)| Some(p.grad()).filter(Tensor::defined))
            .collect();
        self.step_with(grads);
    }

    /// Data-parallel training: make the stored gradients the same on every rank (each rank's
    /// scaled by `scale`, its share of the global batch, then summed: [`mtkd_dist::all_reduce_grads`])
    /// and return them for [`Sgd::step_with`]. A parameter without a gradient on some rank
    /// sends zeros; one without a gradient on every rank stays without one, as in one process.
    pub fn sync_grads(
        &self,
        c: &dyn mtkd_dist::Collective,
        scale: f64,
    ) -> mtkd_dist::Result<Vec<Option<Tensor>>> {
        let mut list: Vec<Tensor> = Vec::with_capacity(self.params.len() + 1);
        let mut flags = Vec::with_capacity(self.params.len());
        for (_, p) in &self.params {
            let g = p.grad();
            flags.push(if g.defined() { 1f32 } else { 0.0 });
            list.push(if g.defined() { g } else { p.zeros_like() });
        }
        let flags_t = Tensor::from_slice(&flags).to_device(self.params[0].1.device());
        list.push(flags_t.shallow_clone());
        mtkd_dist::all_reduce_grads(c, &list, scale)?;
        let any = Vec::<f32>::try_from(&flags_t.to_device(tch::Device::Cpu))?;
        list.pop();
        Ok(list
            .into_iter()
            .zip(any)
            .map(|(g, f)| (f > 0.0).then_some(g))
            .collect())
    }

    /// One update from `grads` (one per parameter, in order; `None`: no update, as for a
    /// parameter without a gradient).
    pub fn step_with(&mut self, grads: Vec<Option<Tensor>>) {
        tch::no_grad(|| {
            for (((_, p), buf), g) in self
                .params
                .iter_mut()
                .zip(self.buffers.iter_mut())
                .zip(grads)
            {
                let Some(g) = g else {
                    continue;
                };
                let mut d = if self.weight_decay != 0.0 {
                    &g + &*p * self.weight_decay
                } else {
                    g
                };
                if self.momentum != 0.0 {
                    let b = match buf.take() {
                        None => d.copy(),
                        Some(mut b) => {
                            let _ = b.g_mul_scalar_(self.momentum).g_add_(&d);
                            b
                        }
                    };
                    d = if self.nesterov {
                        d + &b * self.momentum
                    } else {
                        b.shallow_clone()
                    };
                    *buf = Some(b);
                }
                let _ = p.g_sub_(&(d * self.lr));
            }
        });
    }

    /// Momentum buffers by parameter name (for checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| {
                b.as_ref()
                    .map(|b| (format!("momentum.{n}"), b.shallow_clone()))
            })
            .collect()
    }

    /// Restore buffers written by [`Sgd::state`]; unknown names are an error.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), String> {
        for (name, t) in state {
            let key = name
                .strip_prefix("momentum.")
                .ok_or_else(|| format!("unexpected optimizer entry `{name}`"))?;
            let i = self
                .params
                .iter()
                .position(|(n, _)| n == key)
                .ok_or_else(|| {
                    format!("optimizer state names parameter `{key}` that this model does not have")
                })?;
            if t.size() != self.params[i].1.size() {
                return Err(format!(
                    "optimizer state for `{key}` has shape {:?}, the parameter {:?}",
                    t.size(),
                    self.params[i].1.size()
                ));
            }
            self.buffers[i] = Some(t.to_device(self.params[i].1.device()));
        }
        Ok(())
    }
}

/// Learning rate of a multistep schedule at `epoch` (0-based).
pub fn multistep_lr(base: f64, milestones: &[usize], gamma: f64, epoch: usize) -> f64 {
    let k = milestones.iter().filter(|&&m| epoch >= m).count();
    base * gamma.powi(k as i32)
}
