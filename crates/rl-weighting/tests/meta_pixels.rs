//! The meta mode on segmentation (docs/METHOD.md section 10.7) against
//! `scripts/golden_meta_pixels.py`: per-pixel look-ahead credit through a 1x1 classifier and
//! bilinear upsampling (autograd through a real virtual step in PyTorch), the quiz loss, the
//! policy after each Adam step, and the per-pixel and per-image weights; then resume.

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::signals::{BatchSignals, PixelInputs, StudentHead};
use mtkd_distill_core::weighting::WeightingStrategy;
use mtkd_distill_core::ModelOutput;
use mtkd_rl_weighting::agent::{Advantage, AgentConfig, Mode, Quiz, UnlabelledCe};
use mtkd_rl_weighting::meta::{MetaAgent, FEATURES};
use mtkd_rl_weighting::pixels::{pixel_batch, pixel_credit, PixelQuiz};

#[path = "../../../test-support/golden.rs"]
mod support;
use support::{assert_close_to_stored, tensor, values};

fn golden() -> Value {
    support::golden_file("meta_pixels.json")
}

fn dims(g: &Value) -> (i64, i64, i64) {
    let d: Vec<i64> = g["dims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    (d[0], d[1], d[2])
}

/// A stored batch's signals, built the way the engine builds them: the student's logits and
/// per-pixel embedding from the head map (1x1 classifier, bilinear upsampling), pooled
/// signals from `compute_dense`, and the per-pixel inputs.
fn signals(g: &Value, b: &Value) -> BatchSignals {
    let (bs, h, w) = dims(g);
    let fmap = tensor(&b["fmap"]);
    let weight = tensor(&b["weight"]);
    let bias = tensor(&b["bias"]);
    let emb = fmap.upsample_bilinear2d([h, w], false, None, None);
    let z = emb.permute([0, 2, 3, 1]).matmul(&weight.tr()) + &bias;
    let student = z.permute([0, 3, 1, 2]).contiguous();
    let teachers: Vec<ModelOutput> = b["teachers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| ModelOutput {
            logits: tensor(t),
            features: None,
        })
        .collect();
    let targets = Tensor::from_slice(
        &b["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect::<Vec<_>>(),
    )
    .view([bs, h, w]);
    let labelled: Vec<bool> = b["labelled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let ignore = g["ignore"].as_i64().unwrap();
    let image_labels = Tensor::zeros([bs], (Kind::Int64, Device::Cpu));
    let t = g["temperature"].as_f64().unwrap();
    let mut s = BatchSignals::compute_dense(
        &student,
        &[None, None, None],
        &teachers,
        &targets,
        &image_labels,
        ignore,
        t,
        None,
    )
    .unwrap();
    s.student_head = Some(StudentHead {
        embedding: fmap.mean_dim([2i64, 3].as_slice(), false, Kind::Float),
        weight,
        bias: Some(bias),
        lr: g["inner_lr"].as_f64().unwrap(),
        pixel_embedding: Some(emb),
    });
    s.labelled = Some(Tensor::from_slice(&labelled));
    s.pixels = Some(PixelInputs {
        teacher_logits: teachers.iter().map(|o| o.logits.shallow_clone()).collect(),
        student_logits: student,
        targets,
        ignore_index: ignore,
    });
    s
}

fn agent(g: &Value) -> MetaAgent {
    agent_with(g, UnlabelledCe::Pseudo)
}

/// The golden's agent (`quiz = "current"`, `advantage = "running-rms"`) with `unlabelled_ce` as
/// given (the golden's `batches` read the pseudo-masks, its `neutral` holds the other setting's
/// values).
fn agent_with(g: &Value, unlabelled_ce: UnlabelledCe) -> MetaAgent {
    agent_of(g, unlabelled_ce, Advantage::RunningRms)
}

fn agent_of(g: &Value, unlabelled_ce: UnlabelledCe, advantage: Advantage) -> MetaAgent {
    let cfg = AgentConfig {
        mode: Mode::Meta,
        quiz: Quiz::Current,
        hidden: g["hidden"].as_i64().unwrap(),
        meta_lr: g["meta_lr"].as_f64().unwrap(),
        entropy: g["entropy"].as_f64().unwrap(),
        unlabelled_ce,
        advantage,
        ..AgentConfig::default()
    };
    let mut a = MetaAgent::new(
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
fn pixel_credit_matches_autograd_through_a_real_virtual_step() {
    let g = golden();
    let m = g["M"].as_i64().unwrap();
    let credit_of = |b: &Value, w: &Tensor, quiz: PixelQuiz<'_>| {
        let s = signals(&g, b);
        let px = pixel_batch(&s, s.pixels.as_ref().unwrap(), FEATURES).unwrap();
        pixel_credit(
            &s,
            &px,
            s.student_head.as_ref().unwrap(),
            w,
            g["ce_weight"].as_f64().unwrap(),
            g["kd_weight"].as_f64().unwrap(),
            quiz,
        )
        .unwrap()
        .expect("the batch has labelled pixels")
    };
    for (i, b) in g["batches"].as_array().unwrap().iter().enumerate() {
        // The weights the credit is taken at: the policy's at this step, as PyTorch computed them.
        let w = tensor(&b["credit_weights"]).to_kind(Kind::Float);
        let n = w.size()[0];
        // quiz = "current": the whole moved classifier; quiz = "own": each pixel on its own
        // share of the step (PyTorch one pixel at a time), here at every row.
        let every = Tensor::arange(n, (Kind::Int64, Device::Cpu));
        for (quiz, credit_key, quiz_key) in [
            (PixelQuiz::Current, "credit", "quiz_loss"),
            (PixelQuiz::Own(&every), "own_credit", "own_quiz_loss"),
        ] {
            let (credit, quiz) = credit_of(b, &w, quiz);
            assert_eq!(credit.size(), [n, m]);
            assert_close_to_stored(
                &format!("batch {i} {credit_key}"),
                &credit,
                &b[credit_key],
                1e-4,
            );
            let q = quiz.double_value(&[]);
            let want = b[quiz_key].as_f64().unwrap();
            assert!(
                (q - want).abs() < 1e-5 * (1.0 + want),
                "batch {i} {quiz_key} {q} vs {want}"
            );
        }
        // The own quiz at a subset of rows computes those rows' credit alone.
        let rows = Tensor::arange_start_step(1, n, 3, (Kind::Int64, Device::Cpu));
        let (sub, _) = credit_of(b, &w.index_select(0, &rows), PixelQuiz::Own(&rows));
        let full = tensor(&b["own_credit"]).to_kind(Kind::Float);
        let want = full.index_select(0, &rows);
        let err = (&sub - &want).abs().max().double_value(&[]);
        let tol = 1e-4 * (1.0 + want.abs().max().double_value(&[]));
        assert!(
            err < tol,
            "batch {i} own credit at a subset: max error {err}"
        );
    }
}

#[test]
fn per_pixel_weights_and_updates_match_pytorch() {
    let g = golden();
    let (bs, h, w) = dims(&g);
    let mut a = agent(&g);
    for (i, b) in g["batches"].as_array().unwrap().iter().enumerate() {
        let out = a.weights(&signals(&g, b)).unwrap();
        for (name, p) in a.parameters() {
            assert_close_to_stored(
                &format!("batch {i} {name}"),
                &p,
                &b["params_after"][&name],
                1e-4,
            );
        }
        let pixel = out
            .pixel
            .as_ref()
            .expect("segmentation weights are per pixel");
        assert_eq!(pixel.size(), [bs, 3, h, w]);
        assert_close_to_stored(
            &format!("batch {i} pixel weights"),
            pixel,
            &b["pixel_weights"],
            1e-4,
        );
        assert_close_to_stored(
            &format!("batch {i} image weights"),
            &out.logit,
            &b["image_weights"],
            1e-4,
        );
        // Every pixel's weights sum to 1 (AVER's total KD weight).
        let sums = values(&pixel.sum_dim_intlist(1i64, false, Kind::Float));
        assert!(sums.iter().all(|v| (v - 1.0).abs() < 1e-5));
    }
    let metrics = a.take_epoch_metrics();
    let updates = metrics
        .iter()
        .find(|(n, _)| n == "agent_updates")
        .unwrap()
        .1;
    assert_eq!(updates, 3.0);
}

/// `unlabelled_ce = "neutral"`: the two `ce` features at 0 on the unlabelled image's pixels
/// (batch 0's last image); the policy after each update and the weights against PyTorch, and different from the pseudo-mask run's where that image is in the batch.
#[test]
fn neutral_per_pixel_weights_and_updates_match_pytorch() {
    let g = golden();
    let batches = g["batches"].as_array().unwrap();
    let neutral = g["neutral"].as_array().unwrap();
    let mut a = agent_with(&g, UnlabelledCe::Neutral);
    for (i, (b, want)) in batches.iter().zip(neutral).enumerate() {
        let out = a.weights(&signals(&g, b)).unwrap();
        for (name, p) in a.parameters() {
            assert_close_to_stored(
                &format!("neutral batch {i} {name}"),
                &p,
                &want["params_after"][&name],
                1e-4,
            );
        }
        let pixel = out.pixel.as_ref().expect("per-pixel weights");
        assert_close_to_stored(
            &format!("neutral batch {i} pixel weights"),
            pixel,
            &want["pixel_weights"],
            1e-4,
        );
        assert_close_to_stored(
            &format!("neutral batch {i} image weights"),
            &out.logit,
            &want["image_weights"],
            1e-4,
        );
    }
    // The check can fail: on batch 0 the unlabelled image's weights differ between the settings.
    let (n, p) = (
        tensor(&neutral[0]["image_weights"]),
        tensor(&batches[0]["image_weights"]),
    );
    let last = n.size()[0] - 1;
    let gap = (n.get(last) - p.get(last)).abs().max().double_value(&[]);
    assert!(
        gap > 1e-3,
        "neutral and pseudo agree on the unlabelled image ({gap})"
    );
}

/// `advantage = "per-sample"`, and `"auto"`, which is per-sample on segmentation: each pixel's
/// centred credit over its own RMS; the policy after each update and the weights against
/// PyTorch, and different from the running-RMS run's.
#[test]
fn per_sample_advantage_per_pixel_matches_pytorch_and_is_the_auto_choice() {
    let g = golden();
    let batches = g["batches"].as_array().unwrap();
    let want_all = g["per_sample"].as_array().unwrap();
    for advantage in [Advantage::PerSample, Advantage::Auto] {
        let mut a = agent_of(&g, UnlabelledCe::Pseudo, advantage);
        for (i, (b, want)) in batches.iter().zip(want_all).enumerate() {
            let out = a.weights(&signals(&g, b)).unwrap();
            for (name, p) in a.parameters() {
                assert_close_to_stored(
                    &format!("{advantage:?} batch {i} {name}"),
                    &p,
                    &want["params_after"][&name],
                    1e-4,
                );
            }
            assert_close_to_stored(
                &format!("{advantage:?} batch {i} pixel weights"),
                out.pixel.as_ref().expect("per-pixel weights"),
                &want["pixel_weights"],
                1e-4,
            );
        }
    }
    // The check can fail: after three updates the two advantages give other weights.
    let (r, p) = (
        tensor(&batches[2]["pixel_weights"]),
        tensor(&want_all[2]["pixel_weights"]),
    );
    let gap = (r - p).abs().max().double_value(&[]);
    assert!(gap > 1e-4, "per-sample and running-rms agree ({gap})");
}

#[test]
fn per_pixel_mode_resumes_exactly() {
    let g = golden();
    let batches = g["batches"].as_array().unwrap();
    let mut a = agent(&g);
    a.weights(&signals(&g, &batches[0])).unwrap();
    a.weights(&signals(&g, &batches[1])).unwrap();
    let state = a.save_state().unwrap();
    let mut c = agent(&g);
    c.load_state(&state).unwrap();
    let want = a.weights(&signals(&g, &batches[2])).unwrap();
    let got = c.weights(&signals(&g, &batches[2])).unwrap();
    assert!(want.pixel.unwrap().equal(&got.pixel.unwrap()));
    // Without the state the weights differ (the check can fail).
    let mut fresh = agent(&g);
    let other = fresh.weights(&signals(&g, &batches[2])).unwrap();
    assert!(!want.logit.equal(&other.logit));
}
