//! The baseline weighting strategies (EBKD, CA-MKD, AEKD) against values computed by PyTorch
//! (`scripts/golden_baselines.py`; AEKD's lambda there by an exact active-set solve).

use serde_json::Value;
use tch::{Kind, Tensor};

use mtkd_distill_core::baselines::{
    aekd_gradients, confidence_weights, min_norm_capped_simplex, Aekd, CaMkd, Ebkd,
};
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::weighting::WeightingStrategy;
use mtkd_distill_core::ModelOutput;

#[path = "../../../test-support/golden.rs"]
mod support;
use support::{assert_close, assert_close_values, floats, labels, tensor, values};

fn golden() -> Value {
    support::golden_file("baselines.json")
}

struct Case {
    name: String,
    t: f64,
    cap: f64,
    zs: Tensor,
    zt: Vec<Tensor>,
    y: Tensor,
    raw: Value,
}

impl Case {
    fn m(&self) -> i64 {
        self.zt.len() as i64
    }

    fn b(&self) -> i64 {
        self.zs.size()[0]
    }

    /// Signals for the given teachers (logits only: no feature maps, no projections).
    fn signals_for(&self, zt: &[Tensor]) -> BatchSignals {
        let teachers: Vec<ModelOutput> = zt
            .iter()
            .map(|z| ModelOutput {
                logits: z.shallow_clone(),
                features: None,
            })
            .collect();
        let projected: Vec<Option<Tensor>> = zt.iter().map(|_| None).collect();
        BatchSignals::compute(&self.zs, &projected, &teachers, &self.y, self.t).unwrap()
    }

    fn signals(&self) -> BatchSignals {
        self.signals_for(&self.zt)
    }
}

fn cases() -> Vec<Case> {
    golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            t: c["temperature"].as_f64().unwrap(),
            cap: c["cap"].as_f64().unwrap(),
            zs: tensor(&c["student_logits"]),
            zt: c["teacher_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(tensor)
                .collect(),
            y: labels(&c["labels"]),
            raw: c.clone(),
        })
        .collect()
}

/// Row sums of a `[B, M]` matrix.
fn row_sums(t: &Tensor) -> Vec<f64> {
    values(&t.sum_dim_intlist(1i64, false, Kind::Double))
}

#[test]
fn ebkd_matches_pytorch() {
    for c in cases() {
        let s = c.signals();
        let mut strategy = Ebkd;
        assert_eq!(strategy.name(), "ebkd");
        let w = strategy.weights(&s).unwrap();
        assert_eq!(w.logit.size(), vec![c.b(), c.m()], "{}: ebkd shape", c.name);
        assert_eq!(w.logit.kind(), Kind::Float, "{}: ebkd kind", c.name);
        assert!(
            !w.logit.requires_grad(),
            "{}: ebkd weights carry no gradient",
            c.name
        );
        let want = floats(&c.raw["expected"]["ebkd"]);
        assert_close(&format!("{}: ebkd logit", c.name), &w.logit, &want, 1e-5);
        assert_close(
            &format!("{}: ebkd feature", c.name),
            &w.feature,
            &want,
            1e-5,
        );
        // docs/METHOD.md: the EBKD weights of a sample sum to M - 1.
        let m1 = (c.m() - 1) as f64;
        assert_close(
            &format!("{}: ebkd row sums", c.name),
            &w.logit.sum_dim_intlist(1i64, false, Kind::Double),
            &vec![m1; c.b() as usize],
            1e-5,
        );
    }
}

#[test]
fn ca_mkd_matches_pytorch() {
    for c in cases() {
        let s = c.signals();
        let mut strategy = CaMkd;
        assert_eq!(strategy.name(), "ca-mkd");
        let w = strategy.weights(&s).unwrap();
        assert_eq!(
            w.logit.size(),
            vec![c.b(), c.m()],
            "{}: ca-mkd shape",
            c.name
        );
        assert_eq!(w.feature.kind(), Kind::Float, "{}: ca-mkd kind", c.name);
        let want = floats(&c.raw["expected"]["ca_mkd"]);
        assert_close(&format!("{}: ca-mkd logit", c.name), &w.logit, &want, 1e-5);
        // The feature weight falls back to the logit weight (no teacher heads in the contract).
        assert_close(
            &format!("{}: ca-mkd feature", c.name),
            &w.feature,
            &want,
            1e-5,
        );
        assert_close(
            &format!("{}: confidence_weights", c.name),
            &confidence_weights(&s.ce).unwrap(),
            &want,
            1e-5,
        );
        for (b, total) in row_sums(&w.logit).iter().enumerate() {
            assert!(
                (total - 1.0).abs() < 1e-5,
                "{}: ca-mkd row {b} sums to {total}",
                c.name
            );
        }
    }
}

#[test]
fn aekd_matches_pytorch() {
    let mut binding = 0;
    for c in cases() {
        let e = &c.raw["expected"];
        let want = floats(&e["aekd_lambda"]);
        let vectors: Vec<Vec<f64>> = e["aekd_vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();

        // The closed-form gradients, then the solver on PyTorch's gradients, then the strategy.
        let s = c.signals();
        let g = aekd_gradients(&s.student_logits, &s.teacher_logits, s.temperature).unwrap();
        assert_eq!(g.len(), vectors.len(), "{}: aekd gradient count", c.name);
        for (m, (got, v)) in g.iter().zip(&vectors).enumerate() {
            assert_close_values(&format!("{}: aekd g_{m}", c.name), got, v, 1e-9);
        }
        let lambda = min_norm_capped_simplex(&vectors, c.cap).unwrap();
        assert_close_values(&format!("{}: aekd solver", c.name), &lambda, &want, 1e-8);
        let total: f64 = lambda.iter().sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "{}: lambda sums to {total}",
            c.name
        );
        for (m, l) in lambda.iter().enumerate() {
            assert!(
                (-1e-9..=c.cap + 1e-9).contains(l),
                "{}: lambda_{m} = {l} outside [0, {}]",
                c.name,
                c.cap
            );
        }
        if e["aekd_cap_binds"].as_bool().unwrap() {
            binding += 1;
            let top = lambda.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert!(
                (top - c.cap).abs() < 1e-9,
                "{}: the cap should bind: {lambda:?}",
                c.name
            );
        }

        let mut strategy = Aekd::new(c.cap);
        assert_eq!(strategy.name(), "aekd");
        let w = strategy.weights(&s).unwrap();
        assert_eq!(w.logit.size(), vec![c.b(), c.m()], "{}: aekd shape", c.name);
        assert_eq!(w.logit.kind(), Kind::Float, "{}: aekd kind", c.name);
        // The same lambda for every sample, for logits and features.
        let rows: Vec<f64> = (0..c.b()).flat_map(|_| want.iter().copied()).collect();
        assert_close(&format!("{}: aekd logit", c.name), &w.logit, &rows, 1e-4);
        assert_close(
            &format!("{}: aekd feature", c.name),
            &w.feature,
            &rows,
            1e-4,
        );
        for (b, total) in row_sums(&w.feature).iter().enumerate() {
            assert!(
                (total - 1.0).abs() < 1e-6,
                "{}: aekd row {b} sums to {total}",
                c.name
            );
        }
    }
    assert!(binding >= 2, "the golden file should exercise the cap");
}

#[test]
fn aekd_infeasible_cap_is_an_error() {
    let all = cases();
    for c in &all {
        let s = c.signals();
        // Below 1/M no weights can sum to 1.
        let cap = 0.9 / c.m() as f64;
        let err = Aekd::new(cap).weights(&s).unwrap_err().to_string();
        assert!(err.contains("aekd cap"), "{}: {err}", c.name);
        assert!(
            Aekd::new(-1.0).weights(&s).is_err(),
            "{}: a negative cap",
            c.name
        );
        // Exactly 1/M: the only feasible point is uniform.
        let w = Aekd::new(1.0 / c.m() as f64).weights(&s).unwrap();
        let uniform = vec![1.0 / c.m() as f64; (c.b() * c.m()) as usize];
        assert_close(
            &format!("{}: aekd cap 1/M", c.name),
            &w.logit,
            &uniform,
            1e-6,
        );
    }
    assert!(
        (Aekd::default().cap - 0.6).abs() < 1e-15,
        "the AEKD paper's cap"
    );
    assert!(min_norm_capped_simplex(&[vec![1.0], vec![2.0]], 0.4).is_err());
}

#[test]
fn one_teacher_and_identical_teachers() {
    let c = &cases()[0];
    let b = c.b() as usize;
    // One teacher: every strategy gives weight 1 (AEKD whatever its cap).
    let s = c.signals_for(&c.zt[..1]);
    let ones = vec![1.0; b];
    assert_close(
        "ebkd, one teacher",
        &Ebkd.weights(&s).unwrap().logit,
        &ones,
        1e-9,
    );
    assert_close(
        "ca-mkd, one teacher",
        &CaMkd.weights(&s).unwrap().logit,
        &ones,
        1e-9,
    );
    assert_close(
        "aekd, one teacher",
        &Aekd::new(1.0).weights(&s).unwrap().logit,
        &ones,
        1e-9,
    );
    assert_close(
        "aekd, one teacher, default cap",
        &Aekd::default().weights(&s).unwrap().logit,
        &ones,
        1e-9,
    );

    // Three copies of one teacher: EBKD gives 2/3 each, CA-MKD 1/3, AEKD 1/3 (every point of
    // the simplex is optimal; the solver stays at the uniform start).
    let same = [
        c.zt[0].shallow_clone(),
        c.zt[0].shallow_clone(),
        c.zt[0].shallow_clone(),
    ];
    let s = c.signals_for(&same);
    let third = vec![1.0 / 3.0; 3 * b];
    assert_close(
        "ebkd, identical teachers",
        &Ebkd.weights(&s).unwrap().logit,
        &vec![2.0 / 3.0; 3 * b],
        1e-6,
    );
    assert_close(
        "ca-mkd, identical teachers",
        &CaMkd.weights(&s).unwrap().logit,
        &third,
        1e-6,
    );
    assert_close(
        "aekd, identical teachers",
        &Aekd::default().weights(&s).unwrap().logit,
        &third,
        1e-6,
    );

    // The student equal to every teacher: all gradients vanish (G = 0): uniform.
    let student = [
        c.zs.shallow_clone(),
        c.zs.shallow_clone(),
        c.zs.shallow_clone(),
    ];
    let s = c.signals_for(&student);
    assert_close(
        "aekd, G = 0",
        &Aekd::default().weights(&s).unwrap().logit,
        &third,
        1e-6,
    );
}

/// The `fixed` strategy (oracle rows): per-teacher and per-class tables, rows normalised to sum
/// 1, pruning renormalises, and bad tables are errors.
#[test]
fn fixed_weights_per_teacher_and_per_class() {
    use mtkd_distill_core::weighting::{Fixed, FixedWeights};
    let k = 4;
    let labels = Tensor::from_slice(&[0i64, 3, 1, 3]);
    let teachers: Vec<ModelOutput> = (0..3)
        .map(|m| ModelOutput {
            logits: Tensor::from_slice(&[0.1f32 * m as f32; 16]).view([4, k]),
            features: None,
        })
        .collect();
    let none: Vec<Option<Tensor>> = teachers.iter().map(|_| None).collect();
    let student = Tensor::zeros([4, k], (Kind::Float, tch::Device::Cpu));
    let s = BatchSignals::compute(&student, &none, &teachers, &labels, 4.0).unwrap();

    let cfg = FixedWeights {
        weights: Some(vec![2.0, 1.0, 1.0]),
        per_class: None,
    };
    let mut f = Fixed::new(&cfg, 3, k as usize, tch::Device::Cpu).unwrap();
    let w = f.weights(&s).unwrap();
    assert_eq!(values(&w.logit), [0.5, 0.25, 0.25].repeat(4));
    assert_eq!(values(&w.feature), values(&w.logit));

    let cfg = FixedWeights {
        weights: None,
        per_class: Some(vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
            vec![0.0, 3.0, 1.0],
        ]),
    };
    let mut f = Fixed::new(&cfg, 3, k as usize, tch::Device::Cpu).unwrap();
    let w = values(&f.weights(&s).unwrap().logit);
    let want = [
        1.0, 0.0, 0.0, // class 0
        0.0, 0.75, 0.25, // class 3
        0.0, 1.0, 0.0, // class 1
        0.0, 0.75, 0.25, // class 3
    ];
    assert_close_values("per-class weights", &w, &want, 1e-6);
    // Teacher 1 leaves: class 1's row has no weight left and becomes uniform.
    f.retain_teachers(&[0, 2]).unwrap();
    let two: Vec<ModelOutput> = [0, 2]
        .iter()
        .map(|&m| ModelOutput {
            logits: teachers[m].logits.shallow_clone(),
            features: None,
        })
        .collect();
    let s2 = BatchSignals::compute(&student, &none[..2], &two, &labels, 4.0).unwrap();
    let w = values(&f.weights(&s2).unwrap().logit);
    assert_close_values(
        "after pruning",
        &w,
        &[1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0],
        1e-6,
    );
    // A batch of three teachers no longer fits.
    assert!(f.weights(&s).is_err());

    for bad in [
        FixedWeights {
            weights: Some(vec![1.0, 1.0]),
            per_class: None,
        },
        FixedWeights {
            weights: Some(vec![0.0, 0.0, 0.0]),
            per_class: None,
        },
        FixedWeights {
            weights: Some(vec![1.0, -1.0, 1.0]),
            per_class: None,
        },
        FixedWeights {
            weights: None,
            per_class: Some(vec![vec![1.0, 0.0, 0.0]; 3]),
        },
        FixedWeights {
            weights: None,
            per_class: None,
        },
    ] {
        assert!(
            Fixed::new(&bad, 3, k as usize, tch::Device::Cpu).is_err(),
            "{bad:?}"
        );
    }
}

/// `fixed` per class on a segmentation batch weights each pixel by its own class (the dense
/// oracle); unlabelled pixels do not count in the image's mean, and an image without a labelled
/// pixel takes its image label's row.
#[test]
fn fixed_per_class_weights_each_pixel_of_a_segmentation_batch() {
    use mtkd_distill_core::signals::PixelInputs;
    use mtkd_distill_core::weighting::{Fixed, FixedWeights};
    let (k, ignore) = (3i64, 255i64);
    let targets = Tensor::from_slice(&[0i64, 1, 2, ignore, 255, 255, 255, 255]).view([2, 2, 2]);
    let image_labels = Tensor::from_slice(&[1i64, 2]);
    let teachers: Vec<ModelOutput> = (0..2)
        .map(|m| ModelOutput {
            logits: Tensor::full([2, k, 2, 2], m as f64, (Kind::Float, tch::Device::Cpu)),
            features: None,
        })
        .collect();
    let student = Tensor::zeros([2, k, 2, 2], (Kind::Float, tch::Device::Cpu));
    let mut s = BatchSignals::compute_dense(
        &student,
        &[None, None],
        &teachers,
        &targets,
        &image_labels,
        ignore,
        2.0,
        None,
    )
    .unwrap();
    s.pixels = Some(PixelInputs {
        teacher_logits: teachers.iter().map(|t| t.logits.shallow_clone()).collect(),
        student_logits: student,
        targets,
        ignore_index: ignore,
    });
    let cfg = FixedWeights {
        weights: None,
        per_class: Some(vec![vec![1.0, 1.0], vec![1.0, 0.0], vec![0.0, 1.0]]),
    };
    let mut f = Fixed::new(&cfg, 2, k as usize, tch::Device::Cpu).unwrap();
    assert!(f.wants_pixels());
    let w = f.weights(&s).unwrap();
    let pixel = w.pixel.expect("per-pixel weights");
    assert_eq!(pixel.size(), [2, 2, 2, 2]);
    // Image 0, teacher 0 at its four pixels (classes 0, 1, 2, unlabelled -> row 0).
    assert_eq!(values(&pixel.get(0).get(0)), [0.5, 1.0, 0.0, 0.5]);
    // Image means over labelled pixels: (0.5 + 1 + 0) / 3; image 1 has none: row of class 2.
    assert_close_values(
        "image weights",
        &values(&w.logit),
        &[0.5, 0.5, 0.0, 1.0],
        1e-6,
    );
    // Per-teacher tables stay per image.
    let cfg = FixedWeights {
        weights: Some(vec![1.0, 1.0]),
        per_class: None,
    };
    assert!(!Fixed::new(&cfg, 2, 3, tch::Device::Cpu)
        .unwrap()
        .wants_pixels());
}

/// A per-class table on detection weights each pyramid location by the class of the box it is
/// assigned to; a location assigned to no box takes the mean of the rows; an image's weights
/// are the mean over its locations.
#[test]
fn fixed_per_class_weights_each_location_of_a_detection_batch() {
    use mtkd_distill_core::signals::LocationSignals;
    use mtkd_distill_core::weighting::{Fixed, FixedWeights};
    let (b, m, l, k) = (2i64, 3i64, 4i64, 2i64);
    let z = || Tensor::zeros([b, m, l], (Kind::Float, tch::Device::Cpu));
    let teachers: Vec<ModelOutput> = (0..m)
        .map(|_| ModelOutput {
            logits: Tensor::zeros([b, k], (Kind::Float, tch::Device::Cpu)),
            features: None,
        })
        .collect();
    let student = Tensor::zeros([b, k], (Kind::Float, tch::Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1]);
    let mut s =
        BatchSignals::compute(&student, &[None, None, None], &teachers, &labels, 1.0).unwrap();
    s.locations = Some(LocationSignals {
        ce: z(),
        kl: z(),
        entropy: z(),
        credit: z(),
        quiz_loss: Tensor::from(0.0f32),
        valid: Tensor::ones([b, l], (Kind::Float, tch::Device::Cpu)),
        classes: Tensor::from_slice(&[0i64, 1, -1, 0, -1, -1, 1, 1]).view([b, l]),
    });
    // Class 0 -> teacher 0, class 1 -> teachers 1 and 2 (normalised to 1/2 each).
    let cfg = FixedWeights {
        weights: None,
        per_class: Some(vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 1.0]]),
    };
    let mut f = Fixed::new(&cfg, m as usize, k as usize, tch::Device::Cpu).unwrap();
    assert!(f.wants_locations());
    let w = f.weights(&s).unwrap();
    let loc = w.pixel.expect("per-location weights");
    assert_eq!(loc.size(), [b, m, l]);
    // Image 0, locations: class 0, class 1, background (mean of the rows), class 0.
    assert_close_values(
        "image 0 teacher 0",
        &values(&loc.get(0).get(0)),
        &[1.0, 0.0, 0.5, 1.0],
        1e-6,
    );
    assert_close_values(
        "image 0 teacher 2",
        &values(&loc.get(0).get(2)),
        &[0.0, 0.5, 0.25, 0.0],
        1e-6,
    );
    // Every location's weights sum to 1 (AVER's total KD weight).
    assert_close_values(
        "sums",
        &values(&loc.sum_dim_intlist(1, false, Kind::Float)),
        &[1.0; 8],
        1e-6,
    );
    // Image 1: background, background, class 1, class 1 -> teacher 0 gets (0.5 + 0.5) / 4.
    assert_close_values(
        "image weights",
        &values(&w.logit),
        &[0.625, 0.1875, 0.1875, 0.25, 0.375, 0.375],
        1e-6,
    );
}
