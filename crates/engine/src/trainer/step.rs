//! One optimizer step ([`DistillStep`]): the student's forward pass and task loss, the teachers'
//! outputs from the run's [`TeacherSource`], the [`Distiller`]'s terms, the non-finite check,
//! the update and the strategy's feedback. The loop, `mtkd bench-steps` and, later,
//! data-parallel ranks drive this same step; what it applied comes back as a [`StepOutcome`]
//! and the loop keeps the records.

use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use mtkd_dist::Collective;
use mtkd_distill_core::loss;
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::weighting::{Feedback, TeacherWeights};
use mtkd_student::Network;
use mtkd_vision_tasks::loader::Batch;
use mtkd_vision_tasks::task::Task;

use super::cache::OutputCache;
use super::distiller::{Distiller, Terms};
use super::evaluate::Sums;
use super::pool::{pool_layout, Pool, PoolMember};
use super::source::{Live, TeacherSource};
use super::state::{init_weights, relay_channels_last, trainable};
use super::strategy::single_teacher;
use super::task_of;
use crate::config::{Config, NonFinitePolicy, StrategyKind};
use crate::dataset::Datasets;
use crate::optim::Sgd;
use crate::shared::Layout;

/// What a step did.
pub enum StepOutcome {
    /// The update was applied; with distillation, what the records keep of it (boxed: the
    /// signals are large).
    Applied(Option<Box<Distilled>>),
    /// The loss was not finite (the message names what): nothing was applied, and BatchNorm's
    /// running statistics were put back when `restore_buffers` asked for it.
    NonFinite(String),
}

/// The teachers' part of an applied step, for the run's records.
pub struct Distilled {
    /// The weights spread over the full pool `[B, M]` (0 for a pruned teacher), detached.
    pub weights: TeacherWeights,
    pub signals: BatchSignals,
}

/// The student, its optimizer, the teacher pool with its source of outputs, and the distiller.
pub struct DistillStep {
    pub(crate) task: Box<dyn Task>,
    pub(crate) device: Device,
    pub(crate) student_vs: VarStore,
    pub(crate) student: Network,
    pub(crate) opt: Sgd,
    pub(crate) pool: Pool,
    pub(crate) distiller: Distiller,
    pub(crate) source: Box<dyn TeacherSource>,
    /// What a shared-output record of this pool holds (all members, pruned or not).
    pub(crate) layout: Layout,
    /// The non-trainable variables of the student and the adapters (BatchNorm's running
    /// statistics), shallow handles: put back after a skipped batch.
    pub(crate) buffers: Vec<Tensor>,
    /// Copy the buffers before each step, to put them back when the loss is not finite
    /// (`train.on_nonfinite = "skip"`).
    pub(crate) restore_buffers: bool,
    /// Data-parallel training: the ranks' collective ([`DistillStep::data_parallel`]).
    pub(crate) comm: Option<Rc<dyn Collective>>,
}

impl DistillStep {
    /// The step of `cfg`: the student (seeded by `run.seed`, from `student.init` when set) for
    /// `data`'s images and classes, the distiller with its adapters and strategy over
    /// `members`, SGD over the student's and the adapters' parameters, teachers run live.
    /// Single-teacher KD inside a pool keeps only its teacher active.
    pub fn new(
        cfg: &Config,
        members: Vec<PoolMember>,
        data: &Datasets,
        device: Device,
    ) -> Result<DistillStep> {
        tch::manual_seed(cfg.run.seed as i64);
        let in_shape = data.input_shape(&cfg.data)?;
        let mut student_vs = VarStore::new(device);
        let student = Network::with_head(
            &student_vs.root(),
            cfg.student.arch,
            cfg.student.head,
            in_shape,
            data.num_classes(),
        )
        .with_context(|| format!("building student {}", cfg.student.arch))?;
        if let Some(init) = &cfg.student.init {
            let file = init_weights(init, cfg.student.arch)?;
            student_vs.load(&file).with_context(|| {
                format!(
                    "student.init: loading {} into a {} student",
                    file.display(),
                    cfg.student.arch
                )
            })?;
            tracing::info!(from = %file.display(), "student initialised from earlier weights");
        }
        let pool = Pool::new(members);
        let layout = pool_layout(cfg, &pool.members, in_shape);
        let distiller = Distiller::new(cfg, &pool, &student, data.num_classes(), device)?;
        if cfg.run.channels_last && device == Device::Cpu {
            relay_channels_last(&student_vs);
            relay_channels_last(&distiller.adapter_vs);
        }
        let mut params = Vec::new();
        for (name, t) in trainable(&student_vs) {
            params.push((format!("student.{name}"), t));
        }
        for (name, t) in trainable(&distiller.adapter_vs) {
            params.push((format!("adapter.{name}"), t));
        }
        let t = &cfg.train;
        let opt = Sgd::new(params, t.lr, t.momentum, t.nesterov, t.weight_decay);
        // Sorted by name: data-parallel ranks average them in the same order.
        let sorted = |vs: &VarStore| {
            let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.into_iter().map(|(_, t)| t)
        };
        let buffers = sorted(&student_vs)
            .chain(sorted(&distiller.adapter_vs))
            .filter(|t| !t.requires_grad())
            .collect();
        let single = pool.len() > 1
            && distiller
                .settings()
                .is_some_and(|d| d.strategy == StrategyKind::Single);
        let mut step = DistillStep {
            task: task_of(cfg),
            device,
            student_vs,
            student,
            opt,
            pool,
            distiller,
            source: Box::new(Live),
            layout,
            buffers,
            restore_buffers: cfg.train.on_nonfinite == NonFinitePolicy::Skip,
            comm: None,
        };
        // Single-teacher KD inside a pool runs only its teacher: the others would get weight 0
        // (docs/ARCHITECTURE.md, performance).
        if single {
            let idx = single_teacher(cfg, &step.pool.members)?;
            step.set_active(vec![idx])?;
        }
        Ok(step)
    }

    /// Train data-parallel over `comm`'s ranks: each step then takes this rank's part of the
    /// global batch ([`mtkd_vision_tasks::loader::BatchLoader::sharded`]), its gradients are
    /// all-reduced before the (identical) optimizer step, a non-finite loss on any rank skips
    /// or stops the step on every rank, and a strategy that reads the whole batch or learns
    /// runs replicated on the gathered global batch ([`super::replicated`]). The parameters
    /// are not broadcast here: the trainer does it after a resume.
    pub fn data_parallel(&mut self, comm: Rc<dyn Collective>) {
        let constant = matches!(
            self.distiller.settings().map(|d| d.strategy),
            None | Some(
                StrategyKind::None
                    | StrategyKind::Equal
                    | StrategyKind::Single
                    | StrategyKind::Fixed
            )
        );
        if comm.world() > 1 && !constant {
            let inner = std::mem::replace(
                &mut self.distiller.strategy,
                Box::new(mtkd_distill_core::weighting::Equal),
            );
            self.distiller.strategy =
                Box::new(super::replicated::Replicated::new(inner, Rc::clone(&comm)));
        }
        self.comm = Some(comm);
    }

    /// Data-parallel training: average BatchNorm's running statistics (and any other float
    /// buffer) over the ranks, which each kept from their own parts of the batches; done
    /// before every evaluation and checkpoint (docs/ARCHITECTURE.md, "Data-parallel training").
    pub fn average_buffers(&self) -> Result<()> {
        if let Some(c) = self.comm.as_deref().filter(|c| c.world() > 1) {
            let floats: Vec<Tensor> = self
                .buffers
                .iter()
                .filter(|t| t.is_floating_point())
                .map(Tensor::shallow_clone)
                .collect();
            mtkd_dist::all_reduce_grads(c, &floats, 1.0 / c.world() as f64)?;
        }
        Ok(())
    }

    /// The ranks' collective when training data-parallel.
    pub fn comm(&self) -> Option<&dyn Collective> {
        self.comm.as_deref()
    }

    /// Keep the teachers' outputs in memory across epochs when the config asks for it
    /// (`distill.output_cache_mb`); `train_len` is the training set's size.
    pub fn open_output_cache(&mut self, train_len: usize) -> Result<()> {
        if let Some(mb) = self
            .distiller
            .settings()
            .map(|d| d.output_cache_mb)
            .filter(|&mb| mb > 0)
        {
            self.source = Box::new(OutputCache::new(train_len, &self.layout, mb, self.device)?);
        }
        Ok(())
    }

    /// The student being trained.
    pub fn student(&self) -> &Network {
        &self.student
    }

    /// The task the step trains for.
    pub fn task(&self) -> &dyn Task {
        self.task.as_ref()
    }

    /// Start epoch `epoch` (0-based) at learning rate `lr`: the strategy's and the teacher
    /// source's epoch bookkeeping.
    pub fn start_epoch(&mut self, epoch: usize, lr: f64) -> Result<()> {
        self.opt.lr = lr;
        self.distiller.strategy.start_epoch(epoch)?;
        if self.distiller.settings().is_some() {
            self.source.start_epoch(epoch, &self.layout)?;
        }
        Ok(())
    }

    /// End epoch `epoch`: the teacher source's count of batches served from memory (`None`
    /// when it keeps none), then the strategy's end of epoch (the agent's buffered updates).
    pub fn end_epoch(&mut self, epoch: usize) -> Result<Option<u64>> {
        let cached = if self.distiller.settings().is_some() {
            self.source.end_epoch(epoch)?
        } else {
            None
        };
        self.distiller.strategy.end_epoch(epoch)?;
        Ok(cached)
    }

    /// One optimizer step on `batch` (`epoch` 0-based, `step` the run's global step).
    pub fn run(
        &mut self,
        batch: &Batch,
        sums: &mut Sums,
        epoch: usize,
        step: u64,
    ) -> Result<StepOutcome> {
        // A skipped batch must leave no trace: BatchNorm's running statistics, updated by the
        // training-mode forward, are put back when the batch is skipped.
        let saved: Option<Vec<Tensor>> = self
            .restore_buffers
            .then(|| self.buffers.iter().map(Tensor::copy).collect());
        let targets = self.task.targets(batch)?;
        let out = self.student.forward_t(&batch.images, true);
        let distils = self.distiller.settings().is_some();
        let teachers = if distils {
            let t0 = Instant::now();
            let t = self.source.outputs(&self.pool, batch)?;
            sums.teacher_seconds += t0.elapsed().as_secs_f64();
            Some(t)
        } else {
            None
        };
        // Unlabelled samples take the teachers' ensemble's pseudo-targets (docs/METHOD.md
        // section 15).
        let (targets, labels) = match (&batch.labelled, &teachers) {
            (None, _) => (targets, batch.labels.shallow_clone()),
            (Some(_), None) => anyhow::bail!(
                "a batch with unlabelled samples in a run that does not distil (the loader \
                 should have dropped them)"
            ),
            (Some(l), Some(outs)) => {
                let logits: Vec<Tensor> = outs.iter().map(|o| o.logits.shallow_clone()).collect();
                self.task
                    .pseudo_targets(&targets, &batch.labels, &logits, l)
                    .context("the teachers' pseudo-targets for the unlabelled samples")?
            }
        };
        let ce_all = self.task.loss(&out.logits, &targets)?;
        // The task loss reads the labelled samples only, averaged over them: a batch's labelled
        // samples weigh as a fully labelled batch would (docs/METHOD.md section 15). `scored`
        // is what the records keep (0 on unlabelled samples). The count is the global batch's
        // (the loader's), so that data-parallel ranks average over the same samples as one
        // process does, and no host sync is needed.
        let (ce, scored) = match &batch.labelled {
            None => (ce_all.shallow_clone(), ce_all.shallow_clone()),
            Some(l) => {
                let masked = ce_all.where_self(l, &Tensor::zeros_like(&ce_all));
                let scale = batch.global_len as f64 / batch.global_labelled.max(1) as f64;
                (&masked * scale, masked)
            }
        };
        let terms = match teachers {
            Some(teachers) => {
                let head = self.distiller.student_head(
                    self.task.as_ref(),
                    &self.student,
                    &out,
                    self.opt.lr,
                )?;
                Some(self.distiller.terms(
                    self.task.as_ref(),
                    &out,
                    &ce,
                    &targets,
                    &labels,
                    batch.labelled.as_ref(),
                    teachers,
                    &self.pool.active,
                    head,
                    sums,
                    (epoch, step),
                )?)
            }
            None => None,
        };
        let loss = match &terms {
            Some(t) => t.total.mean(Kind::Float),
            None => ce.mean(Kind::Float),
        };
        // One check per step; the diagnosis runs only when it fails. Data-parallel ranks agree:
        // a non-finite loss on any rank skips (or stops) the step on all of them.
        let bad_here = loss::ensure_finite("loss", &loss).is_err();
        let mut bad = bad_here;
        if let Some(c) = self.comm.as_deref().filter(|c| c.world() > 1) {
            let t = Instant::now();
            let mut flag = [f64::from(u8::from(bad_here))];
            mtkd_dist::all_reduce_f64(c, &mut flag)?;
            bad = flag[0] > 0.0;
            sums.add_collective(c.world(), t.elapsed().as_secs_f64());
        }
        if bad {
            if let Some(saved) = saved {
                tch::no_grad(|| {
                    for (var, copy) in self.buffers.iter_mut().zip(&saved) {
                        var.copy_(copy);
                    }
                });
            }
            if !bad_here {
                return Ok(StepOutcome::NonFinite(
                    "the loss of another data-parallel rank".to_owned(),
                ));
            }
            return Ok(StepOutcome::NonFinite(self.diagnose(&ce, terms.as_ref())));
        }
        let reward = terms.is_some() && self.distiller.strategy.wants_eval_ce();
        let eval_before = if reward {
            Some(self.eval_ce(&batch.images, &targets, sums)?)
        } else {
            None
        };
        self.opt.zero_grad();
        loss.backward();
        match self.comm.as_deref().filter(|c| c.world() > 1) {
            None => self.opt.step(),
            Some(c) => {
                let t = Instant::now();
                let share = batch.indices.len() as f64 / batch.global_len.max(1) as f64;
                let grads = self.opt.sync_grads(c, share)?;
                sums.add_collective(c.world(), t.elapsed().as_secs_f64());
                self.opt.step_with(grads);
            }
        }
        let score = self.task.train_score(&out.logits.detach(), &targets)?;
        let correct = match &batch.labelled {
            None => score.sum(Kind::Double),
            Some(l) => {
                sums.add_unlabelled(l);
                score
                    .where_self(l, &Tensor::zeros_like(&score))
                    .sum(Kind::Double)
            }
        };
        let Some(terms) = terms else {
            sums.add(
                batch.indices.len() as i64,
                &loss.detach(),
                &scored.detach(),
                None,
                &correct,
            );
            return Ok(StepOutcome::Applied(None));
        };
        let full = self.pool.to_full(&terms.weights, self.device)?;
        sums.add(
            batch.indices.len() as i64,
            &loss.detach(),
            &scored.detach(),
            Some((&terms, &full)),
            &correct,
        );
        let eval_ce = match eval_before {
            Some(before) => Some((before, self.eval_ce(&batch.images, &targets, sums)?)),
            None => None,
        };
        let t5 = Instant::now();
        let feedback = Feedback {
            per_sample_loss: terms.total.detach(),
            pre_step_ce: ce_all.detach(),
            eval_ce,
            step,
        };
        self.distiller.observe(&terms, &feedback, (epoch, step))?;
        sums.strategy_seconds += t5.elapsed().as_secs_f64();
        Ok(StepOutcome::Applied(Some(Box::new(Distilled {
            weights: full,
            signals: terms.signals,
        }))))
    }

    /// Keep only the teachers at `active` (full pool positions, increasing); the strategy
    /// drops the others from its state.
    pub fn set_active(&mut self, active: Vec<usize>) -> Result<()> {
        let pool = &mut self.pool;
        if active.is_empty() || active.iter().any(|&i| i >= pool.len()) {
            anyhow::bail!(
                "the checkpoint's active teachers {active:?} do not fit a pool of {}",
                pool.len()
            );
        }
        let keep: Vec<usize> = active
            .iter()
            .map(|i| pool.active.iter().position(|a| a == i))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("a pruned teacher cannot come back to the pool"))?;
        let strategy = &mut self.distiller.strategy;
        strategy
            .retain_teachers(&keep)
            .with_context(|| format!("strategy `{}`", strategy.name()))?;
        pool.active = active;
        Ok(())
    }

    /// The task loss of the student in eval mode (the clean and meta agents' reward).
    fn eval_ce(&self, images: &Tensor, targets: &Tensor, sums: &mut Sums) -> Result<Tensor> {
        let t = Instant::now();
        let out = tch::no_grad(|| self.student.forward_t(images, false));
        let ce = self.task.loss(&out.logits, targets)?;
        sums.reward_seconds += t.elapsed().as_secs_f64();
        Ok(ce)
    }

    /// What made the loss non-finite: a teacher's logits, the strategy's weights, or a term.
    fn diagnose(&self, ce: &Tensor, terms: Option<&Terms>) -> String {
        let bad = |t: &Tensor| loss::ensure_finite("", t).is_err();
        if let Some(terms) = terms {
            for (&i, t) in self.pool.active.iter().zip(&terms.teachers) {
                if bad(&t.logits) {
                    return format!(
                        "the logits of teacher `{}`",
                        self.pool.members[i].teacher.name()
                    );
                }
            }
            if bad(&terms.weights.logit) || bad(&terms.weights.feature) {
                return format!(
                    "the weights of strategy `{}`",
                    self.distiller.strategy.name()
                );
            }
        }
        if bad(ce) {
            "the cross-entropy term".to_owned()
        } else if terms.is_some_and(|t| bad(&t.kd)) {
            "the KD term".to_owned()
        } else {
            "the feature term".to_owned()
        }
    }
}
