//! The parity agent against a PyTorch reference of the published computation
//! (`scripts/golden_agent.py`): state, policy, fixed and dynamic weights, reward, agent loss and
//! the parameters after one update pass; and the clean mode's guards.

use std::collections::HashMap;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::weighting::{Feedback, TeacherWeights, WeightingStrategy};
use mtkd_distill_core::ModelOutput;
use mtkd_rl_weighting::agent::{
    build_state, parity_reward, Advantage, AgentConfig, Mix, Mode, MtkdAgent, Quiz,
};

#[path = "../../../test-support/golden.rs"]
mod support;
use support::tensor;
#[path = "../../../test-support/lookahead.rs"]
mod lookahead;
use lookahead::{check_batches, metric};

fn golden() -> Value {
    support::golden_file("agent.json")
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let g = Vec::<f64>::try_from(&got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let w = Vec::<f64>::try_from(&want.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: got {a}, PyTorch {b}"
        );
    }
}

/// Signals of a stored batch, built the way the engine builds them (from teacher outputs), with
/// the CE/KL/COS matrices replaced by the stored ones.
fn signals(b: &Value) -> (BatchSignals, Tensor) {
    let logits: Vec<Tensor> = b["teacher_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(tensor)
        .collect();
    let embs: Vec<Tensor> = b["teacher_embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(tensor)
        .collect();
    let n = logits[0].size()[0];
    let outs: Vec<ModelOutput> = logits
        .iter()
        .zip(&embs)
        .map(|(l, e)| ModelOutput {
            logits: l.shallow_clone(),
            features: Some(e.unsqueeze(-1).unsqueeze(-1)),
        })
        .collect();
    let labels = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    let mut s = BatchSignals::compute(&logits[0], &[], &outs, &labels, 4.0).unwrap();
    s.ce = tensor(&b["ce"]);
    s.kl = tensor(&b["kl"]);
    s.cos = Some(tensor(&b["cos"]));
    (s, tensor(&b["loss"]))
}

fn agent(g: &Value, mix: Mix) -> MtkdAgent {
    let dims: Vec<i64> = g["C"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let cfg = AgentConfig {
        mode: Mode::Parity,
        mix,
        hidden: g["hidden"].as_i64().unwrap(),
        lr: g["lr"].as_f64().unwrap(),
        ..Default::default()
    };
    let a = MtkdAgent::new(cfg, &dims, g["K"].as_i64().unwrap(), Device::Cpu).unwrap();
    let vars = a.var_store().variables();
    tch::no_grad(|| {
        for (name, v) in g["initial_params"].as_object().unwrap() {
            if let Some(var) = vars.get(name) {
                var.shallow_clone().copy_(&tensor(v));
            } else {
                assert!(
                    mix == Mix::Fixed && name.starts_with("theta"),
                    "agent lacks parameter {name}"
                );
            }
        }
    });
    a
}

#[test]
fn parity_agent_matches_pytorch() {
    let g = golden();
    let e = &g["expected"];
    let batches: Vec<(BatchSignals, Tensor)> = g["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(signals)
        .collect();
    for (i, (s, loss)) in batches.iter().enumerate() {
        assert_close(
            &format!("state {i}"),
            &build_state(s).unwrap(),
            &tensor(&e["state"][i]),
            1e-6,
        );
        assert_close(
            &format!("r_hat {i}"),
            &parity_reward(loss),
            &tensor(&e["r_hat"][i]),
            1e-5,
        );
    }
    for (mix, key) in [(Mix::Fixed, "fixed"), (Mix::Dynamic, "dynamic")] {
        let mut a = agent(&g, mix);
        let (s0, loss0) = &batches[0];
        let state = build_state(s0).unwrap();
        let ((a_l, a_f), _) = a.policy(&state);
        assert_close("a_l", &a_l, &tensor(&e["a_l"]), 1e-5);
        assert_close("a_f", &a_f, &tensor(&e["a_f"]), 1e-5);
        assert_close(
            "confidence",
            &mtkd_rl_weighting::confidence(&s0.ce).unwrap(),
            &tensor(&e["confidence"]),
            1e-6,
        );
        assert_close(
            "logit gap",
            &mtkd_rl_weighting::logit_gap(&s0.kl).unwrap(),
            &tensor(&e["logit_gap"]),
            1e-6,
        );
        assert_close(
            "feature gap",
            &mtkd_rl_weighting::feature_gap(s0.cos.as_ref().unwrap()).unwrap(),
            &tensor(&e["feature_gap"]),
            1e-6,
        );
        // Epoch 0: the published all-ones weights.
        a.start_epoch(0).unwrap();
        let w0 = a.weights(s0).unwrap();
        assert_close(
            "epoch-0 weights",
            &w0.logit,
            &Tensor::ones([6, 3], (Kind::Float, Device::Cpu)),
            0.0,
        );
        // From epoch 1 the mix.
        a.start_epoch(1).unwrap();
        let w = a.weights(s0).unwrap();
        assert_close(
            &format!("{key} w_l"),
            &w.logit,
            &tensor(&e[key]["w_l"]),
            1e-5,
        );
        assert_close(
            &format!("{key} w_f"),
            &w.feature,
            &tensor(&e[key]["w_f"]),
            1e-5,
        );
        let l = a
            .parity_loss(
                &state,
                &s0.ce,
                &s0.kl,
                s0.cos.as_ref().unwrap(),
                &parity_reward(loss0),
            )
            .unwrap();
        let want = e[key]["agent_loss"].as_f64().unwrap();
        assert!(
            (l.double_value(&[]) - want).abs() < 1e-5,
            "{key} agent loss {} vs {want}",
            l.double_value(&[])
        );

        // One update pass over both batches, through the strategy interface (observe buffers the
        // step; end_epoch runs the pass). The weights() call above left batch 0 pending.
        let fb = |loss: &Tensor, step| Feedback {
            per_sample_loss: loss.shallow_clone(),
            pre_step_ce: loss.zeros_like(),
            eval_ce: None,
            step,
        };
        a.observe(s0, &w, &fb(loss0, 0)).unwrap();
        let (s1, loss1) = &batches[1];
        let w1 = a.weights(s1).unwrap();
        a.observe(s1, &w1, &fb(loss1, 1)).unwrap();
        a.end_epoch(1).unwrap();
        let metrics: HashMap<String, f64> = a.take_epoch_metrics().into_iter().collect();
        assert_eq!(metrics["agent_updates"], 2.0);
        for (name, want) in e[key]["params_after_update"].as_object().unwrap() {
            let got = &a.var_store().variables()[name];
            let init = tensor(&g["initial_params"][name]);
            // Compare the change (about 1e-3), relative to its size: a wrong gradient cannot hide.
            let dg = got - &init;
            let dw = tensor(want) - &init;
            let scale = dw.abs().max().double_value(&[]).max(1e-12);
            let err = (&dg - &dw).abs().max().double_value(&[]);
            assert!(
                err / scale < 1e-3,
                "{key}: {name} update differs from PyTorch: max err {err}, change scale {scale}"
            );
        }
    }
}

#[test]
fn reward_is_undefined_for_tiny_or_flat_batches_and_the_agent_skips_them() {
    let g = golden();
    for key in ["r_hat_batch_of_one", "r_hat_equal_losses"] {
        let case = &g[key];
        let loss = tensor(&case["loss"]);
        let r = parity_reward(&loss);
        assert!(
            r.isnan().all().int64_value(&[]) != 0,
            "{key}: PyTorch gives NaN, so do we"
        );
    }
    // The agent does not train on them (docs/METHOD.md 7.2) and says so in its metrics.
    let mut a = agent(&g, Mix::Fixed);
    let (s, _) = signals(&g["batches"][0]);
    a.start_epoch(1).unwrap();
    let w = a.weights(&s).unwrap();
    let flat = Tensor::full([6], 2.5, (Kind::Float, Device::Cpu));
    a.observe(
        &s,
        &w,
        &Feedback {
            per_sample_loss: flat.shallow_clone(),
            pre_step_ce: flat,
            eval_ce: None,
            step: 0,
        },
    )
    .unwrap();
    a.end_epoch(1).unwrap();
    let m: HashMap<String, f64> = a.take_epoch_metrics().into_iter().collect();
    assert_eq!((m["agent_skipped_samples"], m["agent_updates"]), (1.0, 0.0));
}

/// Feedback of a step whose training loss and pre-step CE are `pre`, and whose eval-mode CE
/// goes from `pre` to `post`.
fn observe_eval_ce(
    a: &mut MtkdAgent,
    s: &BatchSignals,
    w: &TeacherWeights,
    pre: Tensor,
    post: Tensor,
    step: u64,
) {
    a.observe(
        s,
        w,
        &Feedback {
            per_sample_loss: pre.shallow_clone(),
            pre_step_ce: pre.shallow_clone(),
            eval_ce: Some((pre, post)),
            step,
        },
    )
    .unwrap();
}

fn clean(m: usize, buffer_steps: usize) -> MtkdAgent {
    let cfg = AgentConfig {
        mode: Mode::Clean,
        buffer_steps,
        warmup_epochs: 1,
        lr: 0.05,
        seed: 9,
        ..Default::default()
    };
    MtkdAgent::new(cfg, &vec![2; m], 4, Device::Cpu).unwrap()
}

fn random_signals(m: i64, b: i64, seed: i64) -> BatchSignals {
    tch::manual_seed(seed);
    let outs: Vec<ModelOutput> = (0..m)
        .map(|_| ModelOutput {
            logits: Tensor::randn([b, 4], (Kind::Float, Device::Cpu)),
            features: Some(Tensor::randn([b, 2, 1, 1], (Kind::Float, Device::Cpu))),
        })
        .collect();
    let s = Tensor::randn([b, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(4, [b], (Kind::Int64, Device::Cpu));
    let proj: Vec<Option<Tensor>> = (0..m)
        .map(|_| Some(Tensor::randn([b, 2, 1, 1], (Kind::Float, Device::Cpu))))
        .collect();
    BatchSignals::compute(&s, &proj, &outs, &y, 4.0).unwrap()
}

#[test]
fn clean_mode_warms_up_handles_one_teacher_and_bounds_its_buffer() {
    // One teacher: weight 1, no division by zero.
    let mut one = clean(1, 4);
    one.start_epoch(3).unwrap();
    let w = one.weights(&random_signals(1, 5, 1)).unwrap();
    assert_close(
        "one teacher",
        &w.logit,
        &Tensor::ones([5, 1], (Kind::Float, Device::Cpu)),
        0.0,
    );

    let mut a = clean(3, 4);
    a.start_epoch(0).unwrap();
    let w = a.weights(&random_signals(3, 5, 2)).unwrap();
    assert_close(
        "warm-up weights",
        &w.logit,
        &Tensor::full([5, 3], 1.0 / 3.0, (Kind::Float, Device::Cpu)),
        1e-6,
    );
    a.start_epoch(1).unwrap();
    let mut updates = 0.0;
    for step in 0..10u64 {
        let s = random_signals(3, 8, 10 + step as i64);
        let w = a.weights(&s).unwrap();
        let rows = w.logit.sum_dim_intlist(1, false, Kind::Double);
        assert_close(
            "rows sum to 1",
            &rows,
            &Tensor::ones([8], (Kind::Double, Device::Cpu)),
            1e-5,
        );
        let pre = Tensor::rand([8], (Kind::Float, Device::Cpu)) + 1.0;
        let post = &pre - Tensor::rand([8], (Kind::Float, Device::Cpu)) * 0.1;
        observe_eval_ce(&mut a, &s, &w, pre, post, step);
        let m: HashMap<String, f64> = a.take_epoch_metrics().into_iter().collect();
        updates += m["agent_updates"];
    }
    assert_eq!(
        updates, 8.0,
        "a buffer of 4 steps updates after steps 4 and 8 (one SGD step per stored batch)"
    );
    // A batch of one is not used to train the agent.
    let s = random_signals(3, 1, 99);
    let w = a.weights(&s).unwrap();
    let one = Tensor::ones([1], (Kind::Float, Device::Cpu));
    observe_eval_ce(&mut a, &s, &w, one.shallow_clone(), one, 10);
    let m: HashMap<String, f64> = a.take_epoch_metrics().into_iter().collect();
    assert_eq!(m["agent_skipped_samples"], 1.0);
    // Dynamic mix is parity-only.
    let bad = AgentConfig {
        mode: Mode::Clean,
        mix: Mix::Dynamic,
        ..Default::default()
    };
    assert!(MtkdAgent::new(bad, &[2, 2], 4, Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("dynamic"));
}

#[test]
fn agent_state_round_trips_through_a_checkpoint() {
    let mut a = clean(3, 2);
    a.start_epoch(1).unwrap();
    for step in 0..3u64 {
        let s = random_signals(3, 6, 40 + step as i64);
        let w = a.weights(&s).unwrap();
        let pre = Tensor::rand([6], (Kind::Float, Device::Cpu)) + 1.0;
        let post = &pre * 0.9;
        observe_eval_ce(&mut a, &s, &w, pre, post, step);
    }
    a.end_epoch(1).unwrap();
    let saved = a.save_state().unwrap();
    let mut b = clean(3, 2);
    b.load_state(&saved).unwrap();
    b.start_epoch(2).unwrap();
    a.start_epoch(2).unwrap();
    let s = random_signals(3, 6, 77);
    let wa = a.weights(&s).unwrap();
    let wb = b.weights(&s).unwrap();
    assert!(
        wa.logit.equal(&wb.logit),
        "a restored agent (parameters, normaliser, noise counter) acts identically"
    );
}

// ---- meta mode (docs/METHOD.md section 10) against scripts/golden_meta.py ----

fn meta_golden_of(quiz: &str) -> Value {
    support::golden_file("meta.json")[quiz].clone()
}

fn meta_golden() -> Value {
    meta_golden_of("previous")
}

fn meta_agent(g: &Value) -> mtkd_rl_weighting::meta::MetaAgent {
    meta_agent_with(g, Quiz::Previous)
}

/// The meta-mode settings of a golden file.
fn meta_config(g: &Value, quiz: Quiz) -> AgentConfig {
    AgentConfig {
        mode: Mode::Meta,
        quiz,
        hidden: g["hidden"].as_i64().unwrap(),
        meta_lr: g["meta_lr"].as_f64().unwrap(),
        entropy: g["entropy"].as_f64().unwrap(),
        ..AgentConfig::default()
    }
}

fn meta_agent_with(g: &Value, quiz: Quiz) -> mtkd_rl_weighting::meta::MetaAgent {
    meta_agent_of(g, meta_config(g, quiz))
}

/// A meta agent with settings `cfg`, started from the golden file's initial policy.
fn meta_agent_of(g: &Value, cfg: AgentConfig) -> mtkd_rl_weighting::meta::MetaAgent {
    let mut a = mtkd_rl_weighting::meta::MetaAgent::new(
        cfg,
        g["M"].as_u64().unwrap() as usize,
        g["ce_weight"].as_f64().unwrap(),
        g["kd_weight"].as_f64().unwrap(),
        Device::Cpu,
    )
    .unwrap();
    for (name, v) in g["init"].as_object().unwrap() {
        a.set_parameter(name, &tensor(v)).unwrap();
    }
    a
}

#[test]
fn meta_mode_credit_update_and_weights_match_pytorch() {
    meta_matches_pytorch("previous", Quiz::Previous, 2.0);
    meta_matches_pytorch("current", Quiz::Current, 3.0);
    meta_matches_pytorch("own", Quiz::Own, 3.0);
}

#[test]
fn meta_mode_per_sample_advantage_matches_pytorch() {
    let g = meta_golden_of("own-per-sample");
    let mut a = meta_agent_of(
        &g,
        AgentConfig {
            advantage: Advantage::PerSample,
            ..meta_config(&g, Quiz::Own)
        },
    );
    check_batches(
        &g,
        "own-per-sample ",
        &mut a,
        mtkd_rl_weighting::meta::MetaAgent::parameters,
    );
    // The two advantages move the policy differently from the same start.
    let own = meta_golden_of("own");
    let last = |g: &Value| g["batches"][2]["params_after"]["l2.weight"].clone();
    assert_ne!(last(&g), last(&own));
}

fn meta_matches_pytorch(which: &str, quiz: Quiz, updates: f64) {
    let g = meta_golden_of(which);
    let mut a = meta_agent_with(&g, quiz);
    let (_, mean) = check_batches(
        &g,
        &format!("{which} "),
        &mut a,
        mtkd_rl_weighting::meta::MetaAgent::parameters,
    );
    let metrics = a.take_epoch_metrics();
    assert_eq!(metric(&metrics, "agent_updates"), updates, "{which}");
    assert!((metric(&metrics, "agent_quiz_loss") - mean).abs() < 1e-4 * (1.0 + mean));
}

#[test]
fn meta_mode_starts_at_equal_weights_and_resumes_exactly() {
    let g = meta_golden();
    let batches = g["batches"].as_array().unwrap();
    // Default initialisation: zero output layer and biases, so the policy starts at AVER's
    // weights (with `quiz = previous` the first batch makes no update before its weights).
    let cfg = AgentConfig {
        mode: Mode::Meta,
        quiz: Quiz::Previous,
        ..AgentConfig::default()
    };
    let mut fresh = mtkd_rl_weighting::meta::MetaAgent::new(cfg, 3, 1.0, 1.0, Device::Cpu).unwrap();
    let w = fresh.weights(&lookahead::signals(&g, &batches[0])).unwrap();
    assert_close(
        "first weights",
        &w.logit,
        &Tensor::full([6, 3], 1.0 / 3.0, (Kind::Float, Device::Cpu)),
        1e-6,
    );
    // Two batches, checkpoint, continue in a new agent: the same weights as uninterrupted.
    let mut a = meta_agent(&g);
    a.weights(&lookahead::signals(&g, &batches[0])).unwrap();
    a.weights(&lookahead::signals(&g, &batches[1])).unwrap();
    let state = a.save_state().unwrap();
    let mut b = meta_agent(&g);
    let mut c = mtkd_rl_weighting::meta::MetaAgent::new(
        meta_config(&g, Quiz::Previous),
        3,
        g["ce_weight"].as_f64().unwrap(),
        g["kd_weight"].as_f64().unwrap(),
        Device::Cpu,
    )
    .unwrap();
    c.load_state(&state).unwrap();
    let want = a.weights(&lookahead::signals(&g, &batches[2])).unwrap();
    let got = c.weights(&lookahead::signals(&g, &batches[2])).unwrap();
    assert!(want.logit.equal(&got.logit), "resumed weights differ");
    // Without the state the third batch's weights differ (the check can fail).
    b.weights(&lookahead::signals(&g, &batches[2])).unwrap();
    let other = b.weights(&lookahead::signals(&g, &batches[2])).unwrap();
    assert!(!want.logit.equal(&other.logit));
}

#[test]
fn meta_mode_drops_pruned_teachers_and_refuses_a_wrong_pool() {
    let g = meta_golden();
    let batches = g["batches"].as_array().unwrap();
    let mut a = meta_agent(&g);
    a.weights(&lookahead::signals(&g, &batches[0])).unwrap();
    a.retain_teachers(&[0, 2]).unwrap();
    // A batch with all three teachers no longer fits.
    let err = a.weights(&lookahead::signals(&g, &batches[1])).unwrap_err();
    assert!(err.to_string().contains("teachers"), "{err}");
    let state = a.save_state().unwrap();
    assert!(state.json.contains("\"active\":[0,2]"), "{}", state.json);
    assert!(a.retain_teachers(&[5]).is_err());
}

/// `unlabelled_ce = "neutral"`: nothing of an unlabelled sample's label-reading features (its
/// teachers' losses against a pseudo-label) reaches any weight, its own or another sample's;
/// with `"pseudo"` (the behaviour before it) they move its weights.
#[test]
fn meta_mode_neutral_ignores_the_pseudo_labels_losses_of_unlabelled_samples() {
    use mtkd_rl_weighting::agent::UnlabelledCe;
    let g = meta_golden_of("own");
    let batches = g["batches"].as_array().unwrap();
    let labelled = |s: &mut BatchSignals| {
        let b = s.batch_size();
        let l: Vec<bool> = (0..b).map(|i| i < b / 2).collect();
        s.labelled = Some(Tensor::from_slice(&l));
    };
    // The same batches, with other losses on the unlabelled samples (teachers' order reversed).
    let edited = |s: &mut BatchSignals| {
        let b = s.batch_size();
        let rows = Tensor::arange_start(b / 2, b, (Kind::Int64, Device::Cpu));
        let other = s.ce.index_select(0, &rows).flip([1]) * 3.0 + 1.0;
        s.ce = s.ce.index_copy(0, &rows, &other);
    };
    let run = |ce: UnlabelledCe, edit: bool| -> Vec<Tensor> {
        let mut a = meta_agent_of(
            &g,
            AgentConfig {
                unlabelled_ce: ce,
                ..meta_config(&g, Quiz::Own)
            },
        );
        batches
            .iter()
            .map(|b| {
                let mut s = lookahead::signals(&g, b);
                labelled(&mut s);
                if edit {
                    edited(&mut s);
                }
                a.weights(&s).unwrap().logit
            })
            .collect()
    };
    let same = |x: &[Tensor], y: &[Tensor]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| p.allclose(q, 1e-6, 1e-7, false))
    };
    let (n, n_edit) = (
        run(UnlabelledCe::Neutral, false),
        run(UnlabelledCe::Neutral, true),
    );
    assert!(
        same(&n, &n_edit),
        "neutral: the unlabelled samples' losses moved a weight"
    );
    let (p, p_edit) = (
        run(UnlabelledCe::Pseudo, false),
        run(UnlabelledCe::Pseudo, true),
    );
    assert!(
        !same(&p, &p_edit),
        "pseudo: the unlabelled samples' losses moved no weight"
    );
    assert!(!same(&n, &p), "neutral and pseudo gave the same weights");
}

/// The same on detection's per-location path: the unlabelled image's locations read nothing
/// of their teachers' losses against the pseudo-boxes under `"neutral"`, and do under `"pseudo"`.
#[test]
fn meta_mode_neutral_per_location_ignores_the_pseudo_boxes_losses() {
    use mtkd_distill_core::signals::LocationSignals;
    use mtkd_rl_weighting::agent::UnlabelledCe;
    let (b, m, l) = (4i64, 3i64, 10i64);
    // Images 0 and 1 labelled, 2 and 3 not; `valid` is the labelled images' locations.
    let labelled = Tensor::from_slice(&[true, true, false, false]);
    let batch = |seed: i64, edit: bool| {
        // Deterministic inputs (the global RNG is shared with the tests running beside this one);
        // the per-location path reads only the location signals and the labelled flags.
        let mut s = random_signals(m, b, seed);
        s.cos = None;
        let mut k = 0.0;
        let mut r = || {
            k += 1.0;
            (Tensor::arange(b * m * l, (Kind::Float, Device::Cpu))
                * (0.37 * k + 0.11 * seed as f64))
                .sin()
                .view([b, m, l])
                * 0.5
                + 0.5
        };
        let mut ce = r() * 2.0;
        if edit {
            let rows = Tensor::from_slice(&[2i64, 3]);
            let other = ce.index_select(0, &rows).flip([1]) * 3.0 + 1.0;
            ce = ce.index_copy(0, &rows, &other);
        }
        s.locations = Some(LocationSignals {
            ce,
            kl: r(),
            entropy: r(),
            credit: (r() - 0.5)
                * labelled
                    .to_kind(Kind::Float)
                    .view([b, 1, 1])
                    .expand([b, m, l], false),
            quiz_loss: Tensor::from(1.0f32),
            valid: labelled
                .to_kind(Kind::Float)
                .view([b, 1])
                .expand([b, l], false)
                .contiguous(),
            classes: Tensor::full([b, l], -1, (Kind::Int64, Device::Cpu)),
        });
        s.labelled = Some(labelled.shallow_clone());
        s
    };
    // One initial policy for every run (a new agent draws its first layer from the global RNG,
    // which the tests running beside this one move).
    let init = mtkd_rl_weighting::meta::MetaAgent::new(
        AgentConfig {
            mode: Mode::Meta,
            ..AgentConfig::default()
        },
        m as usize,
        1.0,
        1.0,
        Device::Cpu,
    )
    .unwrap()
    .parameters();
    let run_with = |ce: UnlabelledCe, edit: bool, advantage: Advantage| -> Vec<Tensor> {
        let cfg = AgentConfig {
            mode: Mode::Meta,
            unlabelled_ce: ce,
            advantage,
            ..AgentConfig::default()
        };
        let mut a = mtkd_rl_weighting::meta::MetaAgent::new(cfg, m as usize, 1.0, 1.0, Device::Cpu)
            .unwrap();
        for (name, v) in &init {
            a.set_parameter(name, v).unwrap();
        }
        (0..4)
            .map(|i| a.weights(&batch(i, edit)).unwrap().pixel.unwrap())
            .collect()
    };
    let run = |ce: UnlabelledCe, edit: bool| run_with(ce, edit, Advantage::Auto);
    let same = |x: &[Tensor], y: &[Tensor]| x.iter().zip(y).all(|(p, q)| p.equal(q));
    let n = run(UnlabelledCe::Neutral, false);
    // `advantage = "auto"` is the running RMS on detection, not per-sample.
    assert!(same(
        &n,
        &run_with(UnlabelledCe::Neutral, false, Advantage::RunningRms)
    ));
    assert!(!same(
        &n,
        &run_with(UnlabelledCe::Neutral, false, Advantage::PerSample)
    ));
    assert!(
        same(&n, &run(UnlabelledCe::Neutral, true)),
        "neutral read the pseudo-boxes' losses"
    );
    let p = run(UnlabelledCe::Pseudo, false);
    assert!(
        !same(&p, &run(UnlabelledCe::Pseudo, true)),
        "pseudo read no loss"
    );
    // The policy moved off AVER's weights (the check has something to compare).
    assert!(!n[3].allclose(&Tensor::full_like(&n[3], 1.0 / 3.0), 1e-4, 1e-4, false));
}
