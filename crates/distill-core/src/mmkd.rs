//! MMKD (meta-learned teacher weights, docs/METHOD.md section 8): a weight network reads every
//! teacher's logits and the student's, and outputs a softmax over the teachers per sample. It is
//! trained by a look-ahead meta-gradient: take a virtual SGD step of the student with the current
//! weights, measure the cross-entropy of the virtually updated student on a quiz batch, and move
//! the weight network down the gradient of that quiz loss.
//!
//! # What differs from the MMKD paper (documented choices)
//!
//! - **Last-layer look-ahead.** The virtual step updates only the student's classifier
//!   (`z = h W' + b`, `h` the pooled embedding that feeds it), holding the backbone fixed. The
//!   gradient of the training loss with respect to the logits is taken in closed form,
//!   `dL/dz = (ce_w (softmax(z) - onehot(y)) + kd_w T sum_m w_m (softmax(z/T) - softmax(z_m/T))) / B`,
//!   so `W' = W - lr (dL/dz)' h` is an ordinary differentiable function of the weights and a
//!   single backward pass gives the meta-gradient (no second-order pass through the backbone,
//!   which tch's module API cannot run functionally). The virtual step is plain SGD at the
//!   student's current learning rate (no momentum, no weight decay), as in Meta-Weight-Net.
//! - **Quiz batch = the previous training batch** (its embeddings from the previous step, held
//!   one step). MMKD holds out a quiz set; mtkd does not, so every strategy of a comparison
//!   trains on exactly the same data.
//! - **Feature weights = logit weights.** The last-layer look-ahead gives no gradient for the
//!   feature loss (it does not touch the classifier); the paper's second weight network for
//!   intermediate features is not built, and the logit weights weight the features too.
//! - **Start at AVER.** The output layer starts at zero, so the first weights are exactly `1/M`.
//! - **Adam** (hand-written so that its moments go into the checkpoint) updates the network.
//!   A meta-update whose quiz loss or gradient is not finite is skipped.
//! - The strategy sees every batch, including one the trainer then skips for a non-finite loss
//!   (`on_nonfinite = "skip"`): its call counter and quiz batch advance all the same.
//!
//! Checked against PyTorch (autograd through a real virtual step, `torch.optim.Adam`) in
//! `tests/mmkd.rs`, values from `scripts/golden_mmkd.py`.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::signals::{BatchSignals, StudentHead};
use crate::weighting::{
    restore_variable, sorted_variables, StrategyState, TeacherWeights, WeightingStrategy,
};

/// MMKD settings (`[distill.mmkd]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmkdConfig {
    /// Hidden width of the weight network.
    #[serde(default = "default_hidden")]
    pub hidden: i64,
    /// Adam learning rate of the weight network.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// A meta-update every this many steps (the weights are computed at every step).
    #[serde(default = "default_every")]
    pub every: u64,
}

fn default_hidden() -> i64 {
    64
}
fn default_lr() -> f64 {
    1e-3
}
fn default_every() -> u64 {
    1
}

impl Default for MmkdConfig {
    fn default() -> MmkdConfig {
        MmkdConfig {
            hidden: default_hidden(),
            lr: default_lr(),
            every: default_every(),
        }
    }
}

impl MmkdConfig {
    /// The first invalid field and why, for config errors.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.hidden < 1 {
            return Err(("hidden", format!("must be >= 1, got {}", self.hidden)));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(("lr", format!("must be positive, got {}", self.lr)));
        }
        if self.every < 1 {
            return Err(("every", "must be >= 1".into()));
        }
        Ok(())
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// One Adam step (betas 0.9 / 0.999, eps 1e-8, as `torch.optim.Adam`) on `params` in place,
/// with moments `m` and `v` that the caller keeps (and checkpoints); `t` is the 1-based step
/// number. Shared by MMKD and the agent's meta mode (through [`AdamMoments`]), whose moments go
/// into checkpoints (tch's own optimizer does not expose them).
pub fn adam_step(
    params: &[&Tensor],
    grads: &[Tensor],
    m: &mut [Tensor],
    v: &mut [Tensor],
    t: u64,
    lr: f64,
) -> Result<()> {
    let bc1 = 1.0 - BETA1.powi(t as i32);
    let bc2 = 1.0 - BETA2.powi(t as i32);
    tch::no_grad(|| -> Result<()> {
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let _ = m[i].f_mul_scalar_(BETA1)?.f_add_(&(g * (1.0 - BETA1)))?;
            let _ = v[i]
                .f_mul_scalar_(BETA2)?
                .f_add_(&(g * g * (1.0 - BETA2)))?;
            let step = (&m[i] / bc1) / ((&v[i] / bc2).f_sqrt()? + ADAM_EPS) * lr;
            let mut p = p.shallow_clone();
            let _ = p.f_sub_(&step)?;
        }
        Ok(())
    })
}

/// [`adam_step`]'s state for the variables of a var store, in [`sorted_variables`] order: the
/// moments and the number of steps taken, and their checkpoint. Shared by MMKD and the agent's
/// meta mode.
#[derive(Debug)]
pub struct AdamMoments {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Steps taken (the strategy keeps it in its checkpoint's bookkeeping).
    pub t: u64,
}

impl AdamMoments {
    /// Zero moments for `params`, no step taken.
    pub fn zeros(params: &[(String, Tensor)]) -> AdamMoments {
        AdamMoments {
            m: params.iter().map(|(_, p)| p.zeros_like()).collect(),
            v: params.iter().map(|(_, p)| p.zeros_like()).collect(),
            t: 0,
        }
    }

    /// One [`adam_step`] on `params` (in the moments' order) at learning rate `lr`.
    pub fn step(&mut self, params: &[&Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        adam_step(params, grads, &mut self.m, &mut self.v, self.t, lr)
    }

    /// Checkpoint tensors of `params` (a var store's, in [`sorted_variables`] order) with their
    /// moments: per parameter `adam_m.{name}`, `adam_v.{name}`, `param.{name}`.
    pub fn checkpoint_tensors(&self, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (i, (name, p)) in params.into_iter().enumerate() {
            tensors.push((format!("adam_m.{name}"), self.m[i].shallow_clone()));
            tensors.push((format!("adam_v.{name}"), self.v[i].shallow_clone()));
            tensors.push((format!("param.{name}"), p));
        }
        tensors
    }

    /// Restore what [`AdamMoments::checkpoint_tensors`] saved: every variable of `vs` and the
    /// moments (deep copies on its device: they are updated in place). `owner` names the
    /// strategy in errors; the step count is the caller's, from its bookkeeping.
    pub fn restore(&mut self, state: &StrategyState, vs: &nn::VarStore, owner: &str) -> Result<()> {
        let what = format!("{owner} checkpoint");
        let device = vs.device();
        let names: Vec<String> = sorted_variables(vs).into_iter().map(|(n, _)| n).collect();
        for (i, name) in names.iter().enumerate() {
            restore_variable(
                vs,
                owner,
                name,
                state.tensor(&what, &format!("param.{name}"))?,
            )?;
            self.m[i] = state
                .tensor(&what, &format!("adam_m.{name}"))?
                .to_device(device)
                .copy();
            self.v[i] = state
                .tensor(&what, &format!("adam_v.{name}"))?
                .to_device(device)
                .copy();
        }
        Ok(())
    }
}

/// Checkpoint tensors of a held quiz batch `(embeddings, labels)`: `quiz.embedding` and
/// `quiz.labels`; none without one.
pub fn quiz_tensors(quiz: Option<&(Tensor, Tensor)>) -> Vec<(String, Tensor)> {
    match quiz {
        Some((h, y)) => vec![
            ("quiz.embedding".into(), h.shallow_clone()),
            ("quiz.labels".into(), y.shallow_clone()),
        ],
        None => Vec::new(),
    }
}

/// The quiz batch that [`quiz_tensors`] saved, as copies on `device`, when the bookkeeping says
/// one was `held`; `what` names the checkpoint in errors.
pub fn restore_quiz(
    state: &StrategyState,
    what: &str,
    held: bool,
    device: Device,
) -> Result<Option<(Tensor, Tensor)>> {
    if !held {
        return Ok(None);
    }
    Ok(Some((
        state
            .tensor(what, "quiz.embedding")?
            .to_device(device)
            .copy(),
        state.tensor(what, "quiz.labels")?.to_device(device).copy(),
    )))
}

/// The MMKD strategy. Needs [`BatchSignals::student_head`] (see
/// [`WeightingStrategy::wants_student_head`]).
#[derive(Debug)]
pub struct Mmkd {
    cfg: MmkdConfig,
    vs: nn::VarStore,
    l1: nn::Linear,
    l2: nn::Linear,
    num_teachers: i64,
    num_classes: i64,
    ce_weight: f64,
    kd_weight: f64,
    /// Adam's moments per parameter (sorted by name) and the number of Adam steps taken.
    adam: AdamMoments,
    /// Calls to `weights` so far (the meta-update schedule).
    calls: u64,
    /// The previous batch's classifier input `[B, D]` and labels `[B]`.
    quiz: Option<(Tensor, Tensor)>,
    /// Since the last `take_epoch_metrics`: sum of meta losses (on the device) and their count.
    meta_loss_sum: Option<Tensor>,
    meta_updates: u64,
}

#[derive(Serialize, Deserialize)]
struct Bookkeeping {
    adam_t: u64,
    calls: u64,
    has_quiz: bool,
}

impl Mmkd {
    /// A weight network for `num_teachers` teachers over `num_classes` classes, whose student
    /// loss is `ce_weight CE + kd_weight sum_m w_m KL_m (+ features)`. The first layer is
    /// initialised from libtorch's global RNG; the output layer starts at zero.
    pub fn new(
        cfg: MmkdConfig,
        num_teachers: i64,
        num_classes: i64,
        ce_weight: f64,
        kd_weight: f64,
        device: Device,
    ) -> Result<Mmkd> {
        if let Err((field, reason)) = cfg.check() {
            return Err(Error::Invalid {
                what: format!("mmkd {field}"),
                reason,
            });
        }
        if num_teachers < 1 || num_classes < 1 {
            return Err(Error::Invalid {
                what: "mmkd".into(),
                reason: format!("{num_teachers} teachers, {num_classes} classes"),
            });
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l1 = nn::linear(
            &root / "l1",
            (num_teachers + 1) * num_classes,
            cfg.hidden,
            Default::default(),
        );
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        let l2 = nn::linear(&root / "l2", cfg.hidden, num_teachers, zero);
        let adam = AdamMoments::zeros(&sorted_variables(&vs));
        Ok(Mmkd {
            cfg,
            vs,
            l1,
            l2,
            num_teachers,
            num_classes,
            ce_weight,
            kd_weight,
            adam,
            calls: 0,
            quiz: None,
            meta_loss_sum: None,
            meta_updates: 0,
        })
    }

    /// The weight network's parameters by name (`l1.weight`, `l1.bias`, `l2.weight`, `l2.bias`).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        sorted_variables(&self.vs)
    }

    /// Overwrite parameter `name` (tests and checkpoints).
    pub fn set_parameter(&mut self, name: &str, value: &Tensor) -> Result<()> {
        restore_variable(&self.vs, "mmkd", name, value)
    }

    /// The network's input: every teacher's logits, then the student's, `[B, (M + 1) K]`.
    fn input(&self, s: &BatchSignals) -> Result<Tensor> {
        if s.num_teachers() != self.num_teachers {
            return Err(Error::Invalid {
                what: "mmkd teachers".into(),
                reason: format!(
                    "built for {} teachers, the batch has {}",
                    self.num_teachers,
                    s.num_teachers()
                ),
            });
        }
        let mut parts: Vec<Tensor> = s.teacher_logits.iter().map(Tensor::detach).collect();
        parts.push(s.student_logits.detach());
        for (i, p) in parts.iter().enumerate() {
            crate::error::check_shape(
                &format!("mmkd logits {i}"),
                p,
                &[s.batch_size(), self.num_classes],
            )?;
        }
        Ok(Tensor::f_cat(&parts, 1)?.f_to_kind(Kind::Float)?)
    }

    /// Per-sample weights `[B, M]`, with gradient to the network's parameters.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.l2
            .forward(&self.l1.forward(x).relu())
            .softmax(1, Kind::Float)
    }

    /// One meta-update: virtual classifier step on this batch, quiz loss on the previous one,
    /// Adam on the weight network. Returns the quiz loss (a scalar tensor, detached), or `None`
    /// when it or a gradient was not finite (no update then).
    fn meta_step(
        &mut self,
        s: &BatchSignals,
        x: &Tensor,
        head: &StudentHead,
        quiz: &(Tensor, Tensor),
    ) -> Result<Option<Tensor>> {
        crate::error::check_shape(
            "student classifier weight",
            &head.weight,
            &[self.num_classes, -1],
        )?;
        let w = self.forward(x);
        let meta = lookahead_quiz_loss(s, head, &w, quiz, self.ce_weight, self.kd_weight)?;
        let params = self.parameters();
        let tensors: Vec<&Tensor> = params.iter().map(|(_, p)| p).collect();
        let grads = Tensor::f_run_backward(&[&meta], &tensors, false, false)?;
        // A non-finite batch (this one or the quiz) must not reach Adam's moments: skip the
        // update, so a batch the trainer skips under `on_nonfinite = "skip"` cannot poison the
        // weight network. (One device sync per meta-update.)
        let mut finite = meta.f_isfinite()?;
        for g in &grads {
            finite = finite.f_logical_and(&g.f_isfinite()?.f_all()?)?;
        }
        if finite.f_int64_value(&[])? == 0 {
            tracing::warn!("mmkd: non-finite meta-gradient, update skipped");
            return Ok(None);
        }
        self.adam.step(&tensors, &grads, self.cfg.lr)?;
        Ok(Some(meta.detach()))
    }
}

/// The quiz loss after a virtual SGD step of the student's classifier taken with teacher
/// weights `w` (differentiable in `w`): the look-ahead of MMKD and of the agent's meta mode
/// (docs/METHOD.md sections 8 and 10). The step uses the closed-form logit gradient of
/// `ce_weight CE + kd_weight sum_m w_m T^2 KL_m` on the batch of `s`, at the student's learning
/// rate, without momentum or weight decay; the loss is the mean cross-entropy of the updated
/// classifier on the quiz batch `(embeddings, labels)`.
///
/// # Shapes
/// `w [B, M]`, `quiz.0 [Q, D]`, `quiz.1 [Q]` -> scalar
pub fn lookahead_quiz_loss(
    s: &BatchSignals,
    head: &StudentHead,
    w: &Tensor,
    quiz: &(Tensor, Tensor),
    ce_weight: f64,
    kd_weight: f64,
) -> Result<Tensor> {
    let step = VirtualStep::of(s, head, w, ce_weight, kd_weight)?;
    let new_weight = &step.weight - step.g.tr().f_matmul(&step.h)? * head.lr;
    let (hq, yq) = quiz;
    let zq = hq.f_matmul(&new_weight.tr())?;
    let zq = match &head.bias {
        Some(bias) => {
            zq + (bias.detach() - step.g.sum_dim_intlist(0i64, false, Kind::Float) * head.lr)
        }
        None => zq,
    };
    Ok(zq.f_cross_entropy_loss::<Tensor>(yq, None, Reduction::Mean, -100, 0.0)?)
}

/// The agent's own-sample quiz (`quiz = "own"`, docs/METHOD.md section 10): the same virtual
/// step as [`lookahead_quiz_loss`], but each labelled sample is scored on the part of the step
/// that its own gradient takes, `z'_b = z_b - lr (|h_b|^2 + 1) g_b` (`+ 1` only with a bias),
/// so that the credit of `w[b, m]` is the alignment of teacher m's pull on sample b with b's
/// own label and carries none of the other samples' gradients (the batch's cross terms
/// `h_b . h_b'`). The loss is the mean cross-entropy over the labelled samples; `None` when
/// the batch has none.
///
/// # Shapes
/// `w [B, M]` -> scalar
pub fn lookahead_own_loss(
    s: &BatchSignals,
    head: &StudentHead,
    w: &Tensor,
    ce_weight: f64,
    kd_weight: f64,
) -> Result<Option<Tensor>> {
    let step = VirtualStep::of(s, head, w, ce_weight, kd_weight)?;
    let mut norm = step.h.f_square()?.f_sum_dim_intlist(1, true, Kind::Float)?;
    if head.bias.is_some() {
        norm += 1.0;
    }
    let z_new = &step.z - step.g * norm * head.lr;
    let ce = z_new.f_cross_entropy_loss::<Tensor>(&s.labels, None, Reduction::None, -100, 0.0)?;
    match &s.labelled {
        None => Ok(Some(ce.f_mean(Kind::Float)?)),
        Some(l) => {
            let l = l.f_to_kind(Kind::Float)?;
            let n = l.f_sum(Kind::Float)?;
            if n.f_double_value(&[])? == 0.0 {
                return Ok(None);
            }
            Ok(Some((ce * &l).f_sum(Kind::Float)? / n))
        }
    }
}

/// The pieces of the look-ahead's virtual step: the detached embeddings `h [B, D]`, classifier
/// weight `[K, D]` and logits `z [B, K]`, and the closed-form logit gradient `g [B, K]` of the
/// training loss (already divided by B), differentiable in the teacher weights.
struct VirtualStep {
    h: Tensor,
    weight: Tensor,
    z: Tensor,
    g: Tensor,
}

impl VirtualStep {
    fn of(
        s: &BatchSignals,
        head: &StudentHead,
        w: &Tensor,
        ce_weight: f64,
        kd_weight: f64,
    ) -> Result<VirtualStep> {
        let t = s.temperature;
        let b = s.batch_size();
        let h = head.embedding.detach().f_to_kind(Kind::Float)?;
        let weight = head.weight.detach();
        let k = weight.size()[0];
        crate::error::check_shape("student classifier weight", &weight, &[-1, -1])?;
        crate::error::check_shape("student embedding", &h, &[b, weight.size()[1]])?;
        crate::error::check_shape("look-ahead teacher weights", w, &[b, s.num_teachers()])?;
        let z = match &head.bias {
            Some(bias) => h.f_matmul(&weight.tr())? + bias.detach(),
            None => h.f_matmul(&weight.tr())?,
        };
        let onehot = s.labels.f_one_hot(k)?.f_to_kind(Kind::Float)?;
        let mut g = (z.f_softmax(1, Kind::Float)? - onehot) * ce_weight;
        if let Some(share) = s.ce_share()? {
            g *= share.unsqueeze(1);
        }
        let q = (&z / t).f_softmax(1, Kind::Float)?;
        for (m, zt) in s.teacher_logits.iter().enumerate() {
            let p = (zt.detach() / t).f_softmax(1, Kind::Float)?;
            g += w.select(1, m as i64).unsqueeze(1) * (&q - p) * (t * kd_weight);
        }
        let g = g / b as f64;
        Ok(VirtualStep { h, weight, z, g })
    }
}

impl WeightingStrategy for Mmkd {
    fn name(&self) -> &str {
        "mmkd"
    }

    /// The weight network loses the kept-out teachers' input blocks and output rows (their
    /// Adam moments too); the rest keeps its learnt values.
    fn retain_teachers(&mut self, keep: &[usize]) -> Result<()> {
        let m = self.num_teachers as usize;
        if keep.is_empty() || keep.iter().any(|&k| k >= m) {
            return Err(Error::Invalid {
                what: "mmkd pruning".into(),
                reason: format!("keep {keep:?} from {m} teachers"),
            });
        }
        let k = self.num_classes;
        let device = self.vs.device();
        let idx = |v: Vec<i64>| Tensor::from_slice(&v).to_device(device);
        // Input columns: each kept teacher's K logits, then the student's.
        let mut cols: Vec<i64> = keep
            .iter()
            .flat_map(|&t| (t as i64 * k)..(t as i64 + 1) * k)
            .collect();
        cols.extend((m as i64 * k)..((m as i64 + 1) * k));
        let cols = idx(cols);
        let rows = idx(keep.iter().map(|&t| t as i64).collect());
        // Sorted parameter order: l1.bias, l1.weight, l2.bias, l2.weight.
        let slice = |name: &str, t: &Tensor| -> Result<Tensor> {
            Ok(match name {
                "l1.weight" => t.f_index_select(1, &cols)?,
                "l2.weight" | "l2.bias" => t.f_index_select(0, &rows)?,
                _ => t.copy(),
            })
        };
        let old = self.parameters();
        let mut values = Vec::new();
        for (i, (name, p)) in old.iter().enumerate() {
            values.push((
                name.clone(),
                slice(name, &p.detach())?,
                slice(name, &self.adam.m[i])?,
                slice(name, &self.adam.v[i])?,
            ));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l1 = nn::linear(
            &root / "l1",
            (keep.len() as i64 + 1) * k,
            self.cfg.hidden,
            Default::default(),
        );
        let l2 = nn::linear(
            &root / "l2",
            self.cfg.hidden,
            keep.len() as i64,
            Default::default(),
        );
        self.vs = vs;
        self.l1 = l1;
        self.l2 = l2;
        self.num_teachers = keep.len() as i64;
        self.adam.m.clear();
        self.adam.v.clear();
        for (name, p, am, av) in values {
            self.set_parameter(&name, &p)?;
            self.adam.m.push(am);
            self.adam.v.push(av);
        }
        Ok(())
    }

    fn wants_student_head(&self) -> bool {
        true
    }

    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let head = signals
            .student_head
            .as_ref()
            .ok_or_else(|| Error::Invalid {
                what: "mmkd".into(),
                reason: "the signals carry no student classifier (BatchSignals::student_head)"
                    .into(),
            })?;
        let x = self.input(signals)?;
        let due = self.calls.is_multiple_of(self.cfg.every);
        let mut held = None;
        if let (true, Some(quiz)) = (due, self.quiz.take()) {
            let q = (quiz.0.shallow_clone(), quiz.1.shallow_clone());
            held = Some(quiz);
            if let Some(meta) = self.meta_step(signals, &x, head, &q)? {
                self.meta_loss_sum = Some(match self.meta_loss_sum.take() {
                    Some(sum) => sum + meta,
                    None => meta,
                });
                self.meta_updates += 1;
            }
        }
        self.calls += 1;
        // The next quiz: this batch's labelled samples (a batch without any keeps the last).
        match signals.quiz(&head.embedding)? {
            Some(q) => self.quiz = Some(q),
            None => {
                if self.quiz.is_none() {
                    self.quiz = held;
                }
            }
        }
        let w = tch::no_grad(|| self.forward(&x));
        Ok(TeacherWeights {
            pixel: None,
            feature: w.copy(),
            logit: w,
        })
    }

    fn take_epoch_metrics(&mut self) -> Vec<(String, f64)> {
        let mut out = vec![("mmkd_meta_updates".to_owned(), self.meta_updates as f64)];
        if let Some(sum) = self.meta_loss_sum.take() {
            let n = self.meta_updates.max(1) as f64;
            out.push(("mmkd_quiz_loss".to_owned(), sum.double_value(&[]) / n));
        }
        self.meta_updates = 0;
        out
    }

    fn save_state(&self) -> Result<StrategyState> {
        let mut tensors = self.adam.checkpoint_tensors(self.parameters());
        tensors.extend(quiz_tensors(self.quiz.as_ref()));
        let json = StrategyState::json_of(
            "mmkd checkpoint",
            &Bookkeeping {
                adam_t: self.adam.t,
                calls: self.calls,
                has_quiz: self.quiz.is_some(),
            },
        )?;
        Ok(StrategyState { tensors, json })
    }

    fn load_state(&mut self, state: &StrategyState) -> Result<()> {
        let book: Bookkeeping = state.bookkeeping("mmkd checkpoint")?;
        self.adam.restore(state, &self.vs, "mmkd")?;
        self.quiz = restore_quiz(state, "mmkd checkpoint", book.has_quiz, self.vs.device())?;
        self.adam.t = book.adam_t;
        self.calls = book.calls;
        Ok(())
    }
}
