//! The MTKD-RL agent (docs/METHOD.md sections 3, 5 and 7) as a [`WeightingStrategy`].
//!
//! - `parity`: the published computation. State = per teacher `[cos, kl, ce, e_m, z_m]`; policy =
//!   stem (Linear D->hidden, no bias, ReLU) + two softmax heads; weights = fixed mix
//!   `(a + c + d) / 3` or dynamic mix `softmax(theta) . [a, c, d]`; epoch 0 uses all-ones
//!   weights; reward `r_hat = clamp(standardise(-L), 0, 1)`; every step is buffered and the agent
//!   takes one SGD step per buffered batch on `mean(-r_hat log w_l) + mean(-r_hat log w_f)`
//!   every `agent_step` steps and at the end of every epoch.
//! - `clean`: the defects of docs/METHOD.md section 7 fixed, each a documented choice (see
//!   docs/AGENT.md): one teacher gets weight 1; batches under two samples are not used to train
//!   the agent; a bounded buffer (`buffer_steps`) with an update whenever it fills; state
//!   normalised with running statistics; `warmup_epochs` of equal weights 1/M; and a real policy
//!   gradient: the agent's component is a logistic-normal policy `a = softmax(mu + sigma eps)`
//!   whose sampled pre-softmax action `u` is stored, and REINFORCE with a batch-mean baseline
//!   maximises the per-sample improvement of the student's cross-entropy over the step
//!   (`CE_before - CE_after`), standardised over the batch.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::signals::{BatchSignals, LocationQuiz};
use mtkd_distill_core::weighting::{
    restore_variable, Feedback, StrategyState, TeacherWeights, WeightingStrategy,
};
use mtkd_distill_core::{Error, Result};

use crate::{confidence, feature_gap, logit_gap};

/// Clean mode: maximal gradient norm of one agent update step.
const CLEAN_GRAD_CLIP: f64 = 1.0;

/// Published computation or the corrected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Parity,
    Clean,
    /// Per-teacher credit from a look-ahead quiz loss (docs/METHOD.md section 10; [`crate::meta`]).
    Meta,
}

/// Meta mode: which batch the look-ahead is scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Quiz {
    /// The previous training batch (held out from this step's update).
    Previous,
    /// The batch being trained on: each sample's credit carries the other samples' terms.
    Current,
    /// Each labelled sample (pixel, location) of the batch, scored on its own share of the
    /// virtual step, without the other samples' terms (default: measured across the pools of
    /// the three tasks, docs/AGENT.md; `mmkd::lookahead_own_loss`).
    #[default]
    Own,
}

/// Meta mode, on a run with unlabelled samples (`[data] labels`): what the policy's two
/// label-reading features (a teacher's loss against the target, and that loss minus the pool's
/// mean) hold on an unlabelled sample, pixel or location (docs/METHOD.md section 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnlabelledCe {
    /// The loss against the teachers' pseudo-targets (the ensemble's argmax, or its boxes that
    /// clear the pseudo-box score): the behaviour before step 11's fourth pass.
    Pseudo,
    /// Their running mean (0 after standardisation; the normaliser reads the rows the policy
    /// learns on, the labelled ones under the default quiz): where nothing can check
    /// a teacher, only the label-free features (KL to the student, entropy, cosine) tell the
    /// teachers apart (the default: measured on the three tasks' few-label settings,
    /// docs/RESULTS.md "fourth pass").
    #[default]
    Neutral,
}

/// Meta mode: how the centred credit becomes the policy's advantage (docs/AGENT.md,
/// "Settings"; measured across the pools of the three tasks in docs/RESULTS.md, eighth pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Advantage {
    /// `per-sample` on segmentation (the weights per pixel), `running-rms` on classification
    /// and detection: what measured best on each task's pools.
    #[default]
    Auto,
    /// Divided by its running RMS over every sample and teacher: one scale for the run, so a
    /// sample (pixel, location) whose credit is large pulls the policy harder than one whose
    /// credit is small.
    RunningRms,
    /// Each sample's centred credit divided by its own RMS over the teachers: every sample
    /// votes with the same strength for the direction its credit points (a sample whose credit
    /// is under a thousandth of the running RMS keeps that scale instead, so rounding noise
    /// does not vote).
    PerSample,
}

/// How the agent's output is combined with the hand-crafted components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mix {
    #[default]
    Fixed,
    Dynamic,
}

/// Agent settings (`[distill.agent]` in a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub mix: Mix,
    /// Width of the policy's hidden layer.
    #[serde(default = "default_hidden")]
    pub hidden: i64,
    /// SGD learning rate of the agent (no momentum).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// parity: agent update every this many steps (and at every epoch end).
    #[serde(default = "default_agent_step")]
    pub agent_step: usize,
    /// clean: bounded buffer; the agent updates whenever it holds this many steps.
    #[serde(default = "default_buffer")]
    pub buffer_steps: usize,
    /// clean: epochs with equal weights 1/M before the agent acts.
    #[serde(default = "default_warmup")]
    pub warmup_epochs: usize,
    /// clean: standard deviation of the logistic-normal policy in logit space.
    #[serde(default = "default_sigma")]
    pub sigma: f64,
    /// clean: seed of the exploration noise (counter-based: noise of call n depends on (seed, n)).
    #[serde(default)]
    pub seed: u64,
    /// meta: Adam learning rate of the policy.
    #[serde(default = "default_meta_lr")]
    pub meta_lr: f64,
    /// meta: entropy coefficient tau (per-sample optimum `w ~ exp(credit / tau)`).
    #[serde(default = "default_entropy")]
    pub entropy: f64,
    /// meta: the batch the look-ahead is scored on.
    #[serde(default)]
    pub quiz: Quiz,
    /// meta on detection: the classification loss the per-location credit is scored on
    /// (docs/METHOD.md section 14). Always written, so that a run folder keeps the quiz it
    /// ran with when the default changes.
    #[serde(default)]
    pub location_quiz: LocationQuiz,
    /// meta, with unlabelled samples: the label-reading features there (docs/METHOD.md section
    /// 15). Always written, as `location_quiz` is.
    #[serde(default)]
    pub unlabelled_ce: UnlabelledCe,
    /// meta: how the centred credit is scaled into the advantage. Always written, as
    /// `location_quiz` is (runs written before it existed ran `running-rms`).
    #[serde(default)]
    pub advantage: Advantage,
}

fn default_meta_lr() -> f64 {
    1e-2
}
fn default_entropy() -> f64 {
    0.05
}

fn default_hidden() -> i64 {
    128
}
fn default_lr() -> f64 {
    0.1
}
fn default_agent_step() -> usize {
    1000
}
fn default_buffer() -> usize {
    64
}
fn default_warmup() -> usize {
    1
}
fn default_sigma() -> f64 {
    0.5
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            mode: Mode::Parity,
            mix: Mix::Fixed,
            hidden: default_hidden(),
            lr: default_lr(),
            agent_step: default_agent_step(),
            buffer_steps: default_buffer(),
            warmup_epochs: default_warmup(),
            sigma: default_sigma(),
            seed: 0,
            meta_lr: default_meta_lr(),
            entropy: default_entropy(),
            quiz: Quiz::Own,
            location_quiz: LocationQuiz::default(),
            unlabelled_ce: UnlabelledCe::default(),
            advantage: Advantage::default(),
        }
    }
}

impl AgentConfig {
    /// Checks without IO; `Err` holds `(field, reason)`.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let bad = |f: &str, r: &str| Err((f.to_owned(), r.to_owned()));
        if self.hidden < 1 {
            return bad("hidden", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be positive");
        }
        if self.agent_step == 0 || self.buffer_steps == 0 {
            return bad(
                "agent_step",
                "agent_step and buffer_steps must be at least 1",
            );
        }
        if !(self.sigma > 0.0 && self.sigma.is_finite()) {
            return bad("sigma", "must be positive");
        }
        if !(self.meta_lr > 0.0 && self.meta_lr.is_finite()) {
            return bad("meta_lr", "must be positive");
        }
        if !(self.entropy > 0.0 && self.entropy.is_finite()) {
            return bad("entropy", "must be positive");
        }
        if self.mode == Mode::Meta && self.mix == Mix::Dynamic {
            return bad(
                "mix",
                "the meta mode has no mix: its policy gives the weights",
            );
        }
        if self.mode == Mode::Clean && self.mix == Mix::Dynamic {
            return bad("mix", "the dynamic mix is defined for parity mode only (its coefficients are not part of the clean policy's action)");
        }
        Ok(())
    }

    /// [`AgentConfig::check`] as the agent's error, and a pool of at least one teacher: what
    /// every mode's agent refuses to be built with.
    pub(crate) fn check_pool(&self, num_teachers: usize) -> Result<()> {
        self.check().map_err(|(f, r)| Error::Invalid {
            what: format!("distill.agent.{f}"),
            reason: r,
        })?;
        if num_teachers == 0 {
            return Err(Error::Invalid {
                what: "teachers".into(),
                reason: "the agent needs at least one teacher".into(),
            });
        }
        Ok(())
    }
}

/// One buffered step.
#[derive(Debug)]
struct Stored {
    state: Tensor,
    ce: Tensor,
    kl: Tensor,
    cos: Tensor,
    /// parity: r_hat `[B]`; clean: standardised advantage `[B]`.
    signal: Tensor,
    /// clean: the sampled pre-softmax actions `[B, M]` (logit, feature).
    actions: Option<(Tensor, Tensor)>,
}

/// Running mean and variance of the state features (clean mode).
#[derive(Debug)]
pub(crate) struct RunningNorm {
    pub(crate) mean: Tensor,
    pub(crate) var: Tensor,
    pub(crate) count: f64,
}

impl RunningNorm {
    pub(crate) fn new(d: i64, device: Device) -> RunningNorm {
        RunningNorm {
            mean: Tensor::zeros([d], (Kind::Float, device)),
            var: Tensor::ones([d], (Kind::Float, device)),
            count: 0.0,
        }
    }

    pub(crate) fn update_and_apply(&mut self, x: &Tensor) -> Tensor {
        self.update(x);
        self.apply(x)
    }

    /// Fold the rows of `x` `[N, D]` into the running mean and variance.
    pub(crate) fn update(&mut self, x: &Tensor) {
        let b = x.size()[0] as f64;
        let bm = x.mean_dim(0, false, Kind::Float);
        let bv = x.var_dim(0, false, false);
        let total = self.count + b;
        let delta = &bm - &self.mean;
        let new_mean = &self.mean + &delta * (b / total);
        let m2 = &self.var * self.count + bv * b + delta.square() * (self.count * b / total);
        self.var = m2 / total;
        self.mean = new_mean;
        self.count = total;
    }

    /// `x` standardised by the running statistics.
    pub(crate) fn apply(&self, x: &Tensor) -> Tensor {
        // Clipped: a feature nearly constant so far must not become a huge input later.
        ((x - &self.mean) / (&self.var + 1e-4).sqrt()).clamp(-5.0, 5.0)
    }
}

#[derive(Debug, Default)]
struct EpochStats {
    agent_loss: f64,
    updates: usize,
    /// `[sum r, sum r^2]` over used samples, on the device (read once per epoch).
    reward: Option<Tensor>,
    reward_n: f64,
    skipped: usize,
    /// `[entropy_l, entropy_f, feature weight per teacher...]` summed over batches, on the device.
    weights: Option<Tensor>,
    weight_batches: usize,
}

#[derive(Serialize, Deserialize)]
struct Bookkeeping {
    epoch: usize,
    calls: u64,
    steps_since_update: usize,
    norm_count: f64,
}

/// The MTKD-RL agent.
#[derive(Debug)]
pub struct MtkdAgent {
    cfg: AgentConfig,
    name: String,
    vs: nn::VarStore,
    stem: nn::Linear,
    logit_head: nn::Linear,
    feature_head: nn::Linear,
    theta_logit: Tensor,
    theta_feature: Tensor,
    opt: nn::Optimizer,
    num_teachers: i64,
    state_dim: i64,
    /// Embedding width per teacher (state blocks are `[cos, kl, ce, e_m (C_m), z_m (K)]`).
    dims: Vec<i64>,
    num_classes: i64,
    buffer: Vec<Stored>,
    pending: Option<(Tensor, Option<(Tensor, Tensor)>)>,
    epoch: usize,
    calls: u64,
    steps_since_update: usize,
    norm: RunningNorm,
    stats: EpochStats,
}

/// The epoch metrics every mode's agent starts with: its updates, and the batches it did not
/// learn from (`agent_skipped_samples`).
pub(crate) fn update_counts(updates: f64, skipped: f64) -> Vec<(String, f64)> {
    vec![
        ("agent_updates".to_owned(), updates),
        ("agent_skipped_samples".to_owned(), skipped),
    ]
}

/// Width of the agent state: `sum_m (C_m + K + 3)`.
pub fn state_dim(embedding_dims: &[i64], num_classes: i64) -> i64 {
    embedding_dims.iter().map(|c| c + num_classes + 3).sum()
}

/// The agent state of a batch: per teacher, in pool order, `[cos_m, kl_m, ce_m, e_m, z_m]`.
/// A missing cosine (no feature KD) is 0; a logits-only teacher contributes no embedding.
///
/// # Shapes
/// -> `[B, sum_m (C_m + K + 3)]`
pub fn build_state(signals: &BatchSignals) -> Result<Tensor> {
    let b = signals.batch_size();
    let device = signals.ce.device();
    let mut cols = Vec::new();
    for m in 0..signals.num_teachers() {
        let cos = match &signals.cos {
            Some(c) => c.select(1, m).unsqueeze(1),
            None => Tensor::zeros([b, 1], (Kind::Float, device)),
        };
        cols.push(cos);
        cols.push(signals.kl.select(1, m).unsqueeze(1));
        cols.push(signals.ce.select(1, m).unsqueeze(1));
        if let Some(e) = &signals.teacher_embeddings[m as usize] {
            cols.push(e.to_kind(Kind::Float));
        }
        cols.push(signals.teacher_logits[m as usize].to_kind(Kind::Float));
    }
    Ok(Tensor::f_cat(&cols, 1)?)
}

/// Published reward: `clamp((r - mean r) / std r, 0, 1)` with `r = -L` and the unbiased std.
///
/// # Shapes
/// `per_sample_loss [B]` -> `[B]` (NaN for B < 2 or equal losses, as in the published code)
pub fn parity_reward(per_sample_loss: &Tensor) -> Tensor {
    let r = -per_sample_loss.to_kind(Kind::Float);
    let z = (&r - r.mean(Kind::Float)) / r.std(true);
    z.clamp(0.0, 1.0)
}

impl MtkdAgent {
    /// An agent for teachers with embedding widths `embedding_dims` (0 for logits-only) and
    /// `num_classes` classes. Parameters are initialised from the global torch seed.
    pub fn new(
        cfg: AgentConfig,
        embedding_dims: &[i64],
        num_classes: i64,
        device: Device,
    ) -> Result<MtkdAgent> {
        cfg.check_pool(embedding_dims.len())?;
        if cfg.mode == Mode::Meta {
            return Err(Error::Invalid {
                what: "distill.agent.mode".into(),
                reason: "the meta mode is built by mtkd_rl_weighting::build (meta::MetaAgent)"
                    .into(),
            });
        }
        let m = embedding_dims.len() as i64;
        let d = state_dim(embedding_dims, num_classes);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let stem = nn::linear(
            &root / "stem",
            d,
            cfg.hidden,
            nn::LinearConfig {
                bias: false,
                ..Default::default()
            },
        );
        let logit_head = nn::linear(&root / "logit_head", cfg.hidden, m, Default::default());
        let feature_head = nn::linear(&root / "feature_head", cfg.hidden, m, Default::default());
        let (theta_logit, theta_feature) = if cfg.mix == Mix::Dynamic {
            (
                root.ones("theta_logit", &[3]),
                root.ones("theta_feature", &[3]),
            )
        } else {
            (
                Tensor::ones([3], (Kind::Float, device)),
                Tensor::ones([3], (Kind::Float, device)),
            )
        };
        let opt = nn::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            wd: 0.0,
            nesterov: false,
        }
        .build(&vs, cfg.lr)?;
        let name = match (cfg.mode, cfg.mix) {
            (Mode::Parity, Mix::Fixed) => "mtkd-rl-parity",
            (Mode::Parity, Mix::Dynamic) => "mtkd-rl-parity-dynamic",
            (Mode::Clean, _) => "mtkd-rl-clean",
            (Mode::Meta, _) => "mtkd-rl-meta",
        }
        .to_owned();
        let norm = RunningNorm::new(d, device);
        Ok(MtkdAgent {
            cfg,
            name,
            vs,
            stem,
            logit_head,
            feature_head,
            theta_logit,
            theta_feature,
            opt,
            num_teachers: m,
            state_dim: d,
            dims: embedding_dims.to_vec(),
            num_classes,
            buffer: Vec::new(),
            pending: None,
            epoch: 0,
            calls: 0,
            steps_since_update: 0,
            norm,
            stats: EpochStats::default(),
        })
    }

    /// The agent's parameters (names: `stem.weight`, `logit_head.{weight,bias}`,
    /// `feature_head.{weight,bias}`, and `theta_logit`, `theta_feature` in dynamic mode).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Policy heads' softmax outputs `(a_l, a_f)` and their pre-softmax values.
    ///
    /// # Shapes
    /// `state [B, D]` -> `[B, M]` each
    pub fn policy(&self, state: &Tensor) -> ((Tensor, Tensor), (Tensor, Tensor)) {
        let h = self.stem.forward(state).relu();
        let zl = self.logit_head.forward(&h);
        let zf = self.feature_head.forward(&h);
        (
            (zl.softmax(1, Kind::Float), zf.softmax(1, Kind::Float)),
            (zl, zf),
        )
    }

    /// Combine the agent's components with confidence and gap weights.
    ///
    /// # Shapes
    /// all `[B, M]` -> weights `[B, M]`
    pub fn mix(
        &self,
        a_l: &Tensor,
        a_f: &Tensor,
        ce: &Tensor,
        kl: &Tensor,
        cos: &Tensor,
    ) -> Result<TeacherWeights> {
        let c = confidence(ce)?;
        let dl = logit_gap(kl)?;
        let df = feature_gap(cos)?;
        Ok(match self.cfg.mix {
            Mix::Fixed => TeacherWeights {
                pixel: None,
                logit: (a_l + &c + dl) / 3.0,
                feature: (a_f + &c + df) / 3.0,
            },
            Mix::Dynamic => {
                let sl = self.theta_logit.softmax(0, Kind::Float);
                let sf = self.theta_feature.softmax(0, Kind::Float);
                TeacherWeights {
                    pixel: None,
                    logit: a_l * sl.get(0) + &c * sl.get(1) + dl * sl.get(2),
                    feature: a_f * sf.get(0) + &c * sf.get(1) + df * sf.get(2),
                }
            }
        })
    }

    /// The published agent loss of one batch (with gradient into the agent's parameters).
    pub fn parity_loss(
        &self,
        state: &Tensor,
        ce: &Tensor,
        kl: &Tensor,
        cos: &Tensor,
        r_hat: &Tensor,
    ) -> Result<Tensor> {
        let ((a_l, a_f), _) = self.policy(state);
        let w = self.mix(&a_l, &a_f, ce, kl, cos)?;
        let r = r_hat.unsqueeze(1);
        let ll = (-(&r * w.logit.log().clamp_min(-100.0))).mean(Kind::Float);
        let lf = (-(&r * w.feature.log().clamp_min(-100.0))).mean(Kind::Float);
        Ok(ll + lf)
    }

    /// REINFORCE loss of one stored clean-mode batch.
    fn clean_loss(&self, s: &Stored) -> Result<Tensor> {
        let (u_l, u_f) = s.actions.as_ref().ok_or_else(|| Error::Invalid {
            what: "agent buffer".into(),
            reason: "clean-mode entry without actions".into(),
        })?;
        let (_, (mu_l, mu_f)) = self.policy(&s.state);
        let sigma = self.cfg.sigma;
        let logp = -(((u_l - mu_l) / sigma)
            .square()
            .sum_dim_intlist(1, false, Kind::Float)
            + ((u_f - mu_f) / sigma)
                .square()
                .sum_dim_intlist(1, false, Kind::Float))
            * 0.5;
        Ok((-(&s.signal * logp)).mean(Kind::Float))
    }

    /// One pass over the buffer: one SGD step per stored batch, in order; the buffer is emptied.
    pub fn update(&mut self) -> Result<()> {
        let buffer = std::mem::take(&mut self.buffer);
        for s in &buffer {
            self.opt.zero_grad();
            let loss = match self.cfg.mode {
                Mode::Parity => self.parity_loss(&s.state, &s.ce, &s.kl, &s.cos, &s.signal)?,
                Mode::Clean | Mode::Meta => self.clean_loss(s)?,
            };
            let v = loss.double_value(&[]);
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("{} agent loss", self.name),
                });
            }
            loss.backward();
            if self.cfg.mode == Mode::Clean {
                // REINFORCE gradients are heavy-tailed; the published update has no clipping.
                self.opt.clip_grad_norm(CLEAN_GRAD_CLIP);
            }
            self.opt.step();
            self.stats.agent_loss += v;
            self.stats.updates += 1;
        }
        self.steps_since_update = 0;
        tracing::debug!(agent = %self.name, batches = buffer.len(), "agent updated");
        Ok(())
    }

    /// Standard normal noise `[B, M]` for call `n` (counter-based, so a resumed run draws the same).
    fn noise(&self, n: u64, b: i64, salt: u64) -> Tensor {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.cfg.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt);
        let v: Vec<f32> = (0..b * self.num_teachers)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_slice(&v)
            .view([b, self.num_teachers])
            .to_device(self.vs.device())
    }

    fn cos_or_zeros(signals: &BatchSignals) -> Tensor {
        signals
            .cos
            .as_ref()
            .map(Tensor::shallow_clone)
            .unwrap_or_else(|| signals.ce.zeros_like())
    }

    fn record_weights(&mut self, w: &TeacherWeights) {
        // Accumulated on the device: no host sync per step.
        let ent = |t: &Tensor| {
            let p = t.clamp_min(1e-12);
            (-(&p * p.log()).sum_dim_intlist(1, false, Kind::Double))
                .mean(Kind::Double)
                .unsqueeze(0)
        };
        let row = Tensor::cat(
            &[
                ent(&w.logit),
                ent(&w.feature),
                w.feature.mean_dim(0, false, Kind::Double),
            ],
            0,
        );
        self.stats.weights = Some(match self.stats.weights.take() {
            Some(acc) => acc + row,
            None => row,
        });
        self.stats.weight_batches += 1;
    }
}

impl WeightingStrategy for MtkdAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn buffered_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        self.buffer
            .iter()
            .map(|s| {
                [&s.state, &s.ce, &s.kl, &s.cos, &s.signal]
                    .into_iter()
                    .map(bytes)
                    .sum::<u64>()
                    + s.actions
                        .as_ref()
                        .map(|(l, f)| bytes(l) + bytes(f))
                        .unwrap_or(0)
            })
            .sum()
    }

    /// The policy loses the kept-out teachers' state blocks (stem columns, normaliser entries)
    /// and head rows; the rest keeps its learnt values. Called between epochs (empty buffer).
    fn retain_teachers(&mut self, keep: &[usize]) -> Result<()> {
        let m = self.num_teachers as usize;
        if keep.is_empty() || keep.iter().any(|&k| k >= m) || !self.buffer.is_empty() {
            return Err(Error::Invalid {
                what: "agent pruning".into(),
                reason: format!(
                    "keep {keep:?} from {m} teachers ({} buffered batches)",
                    self.buffer.len()
                ),
            });
        }
        let device = self.vs.device();
        let k = self.num_classes;
        let mut starts = Vec::new();
        let mut at = 0i64;
        for d in &self.dims {
            starts.push(at);
            at += d + k + 3;
        }
        let cols: Vec<i64> = keep
            .iter()
            .flat_map(|&t| starts[t]..starts[t] + self.dims[t] + k + 3)
            .collect();
        let cols = Tensor::from_slice(&cols).to_device(device);
        let rows = Tensor::from_slice(&keep.iter().map(|&t| t as i64).collect::<Vec<_>>())
            .to_device(device);
        let vars = self.vs.variables();
        let get = |n: &str| -> Result<Tensor> {
            vars.get(n)
                .map(|t| t.detach().copy())
                .ok_or_else(|| Error::Invalid {
                    what: "agent pruning".into(),
                    reason: format!("no parameter `{n}`"),
                })
        };
        let mut values = vec![(
            "stem.weight".to_owned(),
            get("stem.weight")?.f_index_select(1, &cols)?,
        )];
        for head in ["logit_head", "feature_head"] {
            for part in ["weight", "bias"] {
                let n = format!("{head}.{part}");
                values.push((n.clone(), get(&n)?.f_index_select(0, &rows)?));
            }
        }
        if self.cfg.mix == Mix::Dynamic {
            values.push(("theta_logit".into(), get("theta_logit")?));
            values.push(("theta_feature".into(), get("theta_feature")?));
        }
        let dims: Vec<i64> = keep.iter().map(|&t| self.dims[t]).collect();
        let d = state_dim(&dims, k);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        self.stem = nn::linear(
            &root / "stem",
            d,
            self.cfg.hidden,
            nn::LinearConfig {
                bias: false,
                ..Default::default()
            },
        );
        let mm = keep.len() as i64;
        self.logit_head = nn::linear(
            &root / "logit_head",
            self.cfg.hidden,
            mm,
            Default::default(),
        );
        self.feature_head = nn::linear(
            &root / "feature_head",
            self.cfg.hidden,
            mm,
            Default::default(),
        );
        if self.cfg.mix == Mix::Dynamic {
            self.theta_logit = root.ones("theta_logit", &[3]);
            self.theta_feature = root.ones("theta_feature", &[3]);
        }
        for (n, v) in &values {
            restore_variable(&vs, "agent", n, v)?;
        }
        self.opt = nn::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            wd: 0.0,
            nesterov: false,
        }
        .build(&vs, self.cfg.lr)?;
        self.vs = vs;
        self.norm.mean = self.norm.mean.f_index_select(0, &cols)?;
        self.norm.var = self.norm.var.f_index_select(0, &cols)?;
        self.dims = dims;
        self.state_dim = d;
        self.num_teachers = mm;
        Ok(())
    }

    fn wants_eval_ce(&self) -> bool {
        self.cfg.mode == Mode::Clean
            && self.num_teachers > 1
            && self.epoch >= self.cfg.warmup_epochs
    }

    fn start_epoch(&mut self, epoch: usize) -> Result<()> {
        self.epoch = epoch;
        Ok(())
    }

    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let b = signals.batch_size();
        let m = signals.num_teachers();
        if m != self.num_teachers {
            return Err(Error::ShapeMismatch {
                what: "agent teachers".into(),
                expected: self.num_teachers.to_string(),
                got: m.to_string(),
            });
        }
        let device = signals.ce.device();
        let call = self.calls;
        self.calls += 1;
        let w = tch::no_grad(|| -> Result<TeacherWeights> {
            let state = build_state(signals)?;
            if state.size()[1] != self.state_dim {
                return Err(Error::ShapeMismatch {
                    what: "agent state width (sum of teacher embedding widths + classes + 3)"
                        .into(),
                    expected: self.state_dim.to_string(),
                    got: state.size()[1].to_string(),
                });
            }
            let cos = Self::cos_or_zeros(signals);
            match self.cfg.mode {
                Mode::Parity => {
                    self.pending = Some((state.shallow_clone(), None));
                    if self.epoch == 0 {
                        // Published: all-ones weights in epoch 0 (a sum over teachers).
                        return Ok(TeacherWeights::broadcast(&vec![1.0; m as usize], b, device));
                    }
                    let ((a_l, a_f), _) = self.policy(&state);
                    self.mix(&a_l, &a_f, &signals.ce, &signals.kl, &cos)
                }
                Mode::Clean | Mode::Meta => {
                    if m == 1 {
                        self.pending = None;
                        return Ok(TeacherWeights::broadcast(&[1.0], b, device));
                    }
                    let state = self.norm.update_and_apply(&state);
                    if self.epoch < self.cfg.warmup_epochs {
                        self.pending = None;
                        return Ok(TeacherWeights::broadcast(
                            &vec![1.0 / m as f64; m as usize],
                            b,
                            device,
                        ));
                    }
                    let (_, (mu_l, mu_f)) = self.policy(&state);
                    let u_l = &mu_l + self.noise(call, b, 1) * self.cfg.sigma;
                    let u_f = &mu_f + self.noise(call, b, 2) * self.cfg.sigma;
                    let w = self.mix(
                        &u_l.softmax(1, Kind::Float),
                        &u_f.softmax(1, Kind::Float),
                        &signals.ce,
                        &signals.kl,
                        &cos,
                    )?;
                    self.pending = Some((state, Some((u_l, u_f))));
                    Ok(w)
                }
            }
        })?;
        self.record_weights(&w);
        Ok(w)
    }

    fn observe(
        &mut self,
        signals: &BatchSignals,
        _weights: &TeacherWeights,
        feedback: &Feedback,
    ) -> Result<()> {
        let Some((state, actions)) = self.pending.take() else {
            return Ok(());
        };
        let b = signals.batch_size();
        let signal = tch::no_grad(|| match self.cfg.mode {
            Mode::Parity => parity_reward(&feedback.per_sample_loss),
            Mode::Clean | Mode::Meta => match &feedback.eval_ce {
                Some((before, after)) => {
                    let r = (before - after).to_kind(Kind::Float);
                    // Zero spread: every sample improved equally, nothing to learn (skipped below).
                    (&r - r.mean(Kind::Float)) / r.std(true)
                }
                None => Tensor::full([b], f64::NAN, (Kind::Float, signals.ce.device())),
            },
        });
        let finite = b >= 2 && signal.isfinite().all().int64_value(&[]) != 0;
        if !finite {
            // Published code: NaN reward poisons the agent (docs/METHOD.md 7.2). Both modes skip it.
            self.stats.skipped += 1;
            tracing::warn!(agent = %self.name, batch = b, step = feedback.step, "agent sample skipped: reward undefined (batch under 2 samples or equal losses)");
        } else {
            let rs = signal.to_kind(Kind::Double);
            let row = Tensor::stack(&[rs.sum(Kind::Double), rs.square().sum(Kind::Double)], 0);
            self.stats.reward = Some(match self.stats.reward.take() {
                Some(acc) => acc + row,
                None => row,
            });
            self.stats.reward_n += b as f64;
            self.buffer.push(Stored {
                state,
                ce: signals.ce.shallow_clone(),
                kl: signals.kl.shallow_clone(),
                cos: Self::cos_or_zeros(signals),
                signal,
                actions,
            });
        }
        self.steps_since_update += 1;
        let due = match self.cfg.mode {
            Mode::Parity => self.steps_since_update >= self.cfg.agent_step,
            Mode::Clean | Mode::Meta => self.buffer.len() >= self.cfg.buffer_steps,
        };
        if due {
            self.update()?;
        }
        Ok(())
    }

    fn end_epoch(&mut self, _epoch: usize) -> Result<()> {
        if !self.buffer.is_empty() {
            self.update()?;
        }
        self.steps_since_update = 0;
        Ok(())
    }

    fn take_epoch_metrics(&mut self) -> Vec<(String, f64)> {
        let s = std::mem::take(&mut self.stats);
        let mut out = update_counts(s.updates as f64, s.skipped as f64);
        if s.updates > 0 {
            out.push(("agent_loss".to_owned(), s.agent_loss / s.updates as f64));
        }
        let host = |t: &Tensor| Vec::<f64>::try_from(&t.to_device(Device::Cpu)).unwrap_or_default();
        if let (Some(r), true) = (&s.reward, s.reward_n > 0.0) {
            let v = host(r);
            let mean = v[0] / s.reward_n;
            out.push(("reward_mean".to_owned(), mean));
            out.push((
                "reward_std".to_owned(),
                (v[1] / s.reward_n - mean * mean).max(0.0).sqrt(),
            ));
        }
        if let (Some(w), true) = (&s.weights, s.weight_batches > 0) {
            let n = s.weight_batches as f64;
            let v = host(w);
            out.push(("weight_entropy_logit".to_owned(), v[0] / n));
            out.push(("weight_entropy_feature".to_owned(), v[1] / n));
            for (m, w) in v[2..].iter().enumerate() {
                out.push((format!("feature_weight_{m}"), w / n));
            }
        }
        if self.cfg.mix == Mix::Dynamic {
            for (prefix, t) in [
                ("mix_logit", &self.theta_logit),
                ("mix_feature", &self.theta_feature),
            ] {
                let v = Vec::<f64>::try_from(&t.softmax(0, Kind::Double).to_device(Device::Cpu))
                    .unwrap_or_default();
                for (name, x) in ["agent", "confidence", "gap"].iter().zip(v) {
                    out.push((format!("{prefix}_{name}"), x));
                }
            }
        }
        out
    }

    fn save_state(&self) -> Result<StrategyState> {
        let mut tensors: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (format!("param.{n}"), t))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors.push(("norm.mean".into(), self.norm.mean.shallow_clone()));
        tensors.push(("norm.var".into(), self.norm.var.shallow_clone()));
        let book = Bookkeeping {
            epoch: self.epoch,
            calls: self.calls,
            steps_since_update: self.steps_since_update,
            norm_count: self.norm.count,
        };
        let json = StrategyState::json_of("agent state", &book)?;
        if !self.buffer.is_empty() {
            return Err(Error::Invalid {
                what: "agent state".into(),
                reason: "checkpoint requested with a non-empty buffer (call end_epoch first)"
                    .into(),
            });
        }
        Ok(StrategyState { tensors, json })
    }

    fn load_state(&mut self, state: &StrategyState) -> Result<()> {
        let vars = self.vs.variables();
        for (name, t) in &state.tensors {
            if let Some(p) = name.strip_prefix("param.") {
                restore_variable(&self.vs, "agent", p, t)?;
            } else if name == "norm.mean" {
                self.norm.mean = t.to_device(self.vs.device());
            } else if name == "norm.var" {
                self.norm.var = t.to_device(self.vs.device());
            }
        }
        let book: Bookkeeping = state.bookkeeping("agent checkpoint")?;
        self.epoch = book.epoch;
        self.calls = book.calls;
        self.steps_since_update = book.steps_since_update;
        self.norm.count = book.norm_count;
        if self.cfg.mix == Mix::Dynamic {
            self.theta_logit = vars["theta_logit"].shallow_clone();
            self.theta_feature = vars["theta_feature"].shallow_clone();
        }
        Ok(())
    }
}
