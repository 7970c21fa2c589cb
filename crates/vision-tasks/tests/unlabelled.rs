//! Unlabelled samples: hidden labels and their placeholders, unlabelled images appended to a
//! set, the loader's per-sample flag, and each task's pseudo-targets from the teachers'
//! ensemble (docs/METHOD.md section 15), checked against the ensemble computed by hand.

use std::sync::Arc;

use ndarray::{Array3, Array4};
use tch::{Device, Kind, Tensor};

use mtkd_vision_tasks::data::{Annotations, ImageSet};
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};
use mtkd_vision_tasks::segmentation::IGNORE;
use mtkd_vision_tasks::task::{task_of, TaskKind, TaskParams};
use mtkd_vision_tasks::transform::Normalize;

fn set(n: usize) -> ImageSet {
    let images = Array4::from_shape_fn((n, 1, 4, 4), |(i, _, y, x)| (i * 16 + y * 4 + x) as u8);
    let labels = (0..n as i64).map(|i| i % 3).collect();
    ImageSet::new(images, labels, 3).unwrap()
}

#[test]
fn hidden_labels_leave_placeholders_and_travel_with_the_samples() {
    let mut s = set(6);
    s.annotations = Annotations::Masks(Array3::from_elem((6, 4, 4), 2));
    let h = s.hide_labels(&[1, 4]);
    assert_eq!(h.labelled_count(), 2);
    assert_eq!(
        h.labelled.as_deref(),
        Some(&[false, true, false, false, true, false][..])
    );
    assert_eq!(h.labels, vec![0, 1, 0, 0, 1, 0]);
    let m = h.annotations.masks().unwrap();
    assert!(m
        .index_axis(ndarray::Axis(0), 0)
        .iter()
        .all(|&v| v == IGNORE));
    assert!(m.index_axis(ndarray::Axis(0), 1).iter().all(|&v| v == 2));
    // A selection keeps each sample's flag.
    let sel = h.select(&[4, 0, 4]);
    assert_eq!(sel.labelled.as_deref(), Some(&[true, false, true][..]));

    // Unlabelled images appended: flags false, labels 0; another shape is refused.
    let extra = Array4::<u8>::zeros((3, 1, 4, 4));
    let all = set(2).with_unlabelled(&extra).unwrap();
    assert_eq!((all.len(), all.labelled_count()), (5, 2));
    assert_eq!(all.labels, vec![0, 1, 0, 0, 0]);
    let err = set(2)
        .with_unlabelled(&Array4::<u8>::zeros((1, 1, 5, 4)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 x 5 x 4") && err.contains("1 x 4 x 4"),
        "{err}"
    );
}

#[test]
fn the_loader_says_which_samples_are_labelled() {
    let h = Arc::new(set(10).hide_labels(&[0, 3, 7]));
    let loader = BatchLoader::new(
        Arc::clone(&h),
        LoaderConfig {
            batch_size: 4,
            shuffle: true,
            seed: 5,
            ..loader_cfg()
        },
    )
    .unwrap();
    let mut seen = 0;
    for b in loader.epoch(0, 0, Device::Cpu) {
        let flags: Vec<bool> = Vec::<bool>::try_from(b.labelled.as_ref().unwrap()).unwrap();
        for (f, &i) in flags.iter().zip(&b.indices) {
            assert_eq!(*f, [0, 3, 7].contains(&i), "sample {i}");
        }
        seen += b.labelled_count();
    }
    assert_eq!(seen, 3);
    // A fully labelled set gives no flags.
    let full = BatchLoader::new(Arc::new(set(4)), loader_cfg()).unwrap();
    assert!(full.epoch(0, 0, Device::Cpu).all(|b| b.labelled.is_none()));
}

fn loader_cfg() -> LoaderConfig {
    LoaderConfig {
        batch_size: 2,
        shuffle: false,
        drop_last: false,
        augment: None,
        eval_resize: None,
        normalize: Normalize {
            mean: vec![0.0],
            std: vec![1.0],
        },
        seed: 0,
    }
}

fn params() -> TaskParams {
    TaskParams {
        dense_kd: Default::default(),
        image: (32, 32),
        box_kd_weight: 1.0,
    }
}

/// The mean of the teachers' softmax over dim 1, by hand (f64 loops over a `[B, K]` slice).
fn ensemble_argmax(teachers: &[Vec<f64>], k: usize) -> Vec<i64> {
    let b = teachers[0].len() / k;
    (0..b)
        .map(|i| {
            let mut mean = vec![0.0; k];
            for t in teachers {
                let row = &t[i * k..(i + 1) * k];
                let mx = row.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = row.iter().map(|v| (v - mx).exp()).sum();
                for c in 0..k {
                    mean[c] += (row[c] - mx).exp() / z / teachers.len() as f64;
                }
            }
            (0..k)
                .max_by(|&a, &c| mean[a].partial_cmp(&mean[c]).unwrap())
                .unwrap() as i64
        })
        .collect()
}

#[test]
fn classification_pseudo_labels_are_the_teachers_mean_probability_argmax() {
    tch::manual_seed(3);
    let (b, k) = (8i64, 5i64);
    let t1 = Tensor::randn([b, k], (Kind::Float, Device::Cpu)) * 3.0;
    // A confident teacher that disagrees with a diffuse one: the mean of probabilities, not of
    // logits, decides.
    let t2 = Tensor::randn([b, k], (Kind::Float, Device::Cpu)) * 0.3;
    let labels = Tensor::from_slice(&[4i64, 4, 4, 4, 4, 4, 4, 4]);
    let labelled = Tensor::from_slice(&[true, false, false, true, false, false, false, false]);
    let task = task_of(TaskKind::Classification, &params());
    let (t, img) = task
        .pseudo_targets(
            &labels,
            &labels,
            &[t1.shallow_clone(), t2.shallow_clone()],
            &labelled,
        )
        .unwrap();
    let by_hand = ensemble_argmax(
        &[
            Vec::<f64>::try_from(t1.to_kind(Kind::Double).flatten(0, -1)).unwrap(),
            Vec::<f64>::try_from(t2.to_kind(Kind::Double).flatten(0, -1)).unwrap(),
        ],
        k as usize,
    );
    let got: Vec<i64> = Vec::<i64>::try_from(&t).unwrap();
    for i in 0..b as usize {
        let want = if i == 0 || i == 3 { 4 } else { by_hand[i] };
        assert_eq!(got[i], want, "sample {i}");
    }
    assert_eq!(got, Vec::<i64>::try_from(&img).unwrap());
}

#[test]
fn segmentation_pseudo_masks_are_per_pixel_and_name_the_main_foreground_class() {
    tch::manual_seed(4);
    let (b, k, h, w) = (3i64, 4i64, 5i64, 6i64);
    let t1 = Tensor::randn([b, k, h, w], (Kind::Float, Device::Cpu));
    let t2 = Tensor::randn([b, k, h, w], (Kind::Float, Device::Cpu)) * 2.0;
    let masks = Tensor::full([b, h, w], 1i64, (Kind::Int64, Device::Cpu));
    let labels = Tensor::from_slice(&[1i64, 1, 1]);
    let labelled = Tensor::from_slice(&[false, true, false]);
    let task = task_of(TaskKind::Segmentation, &params());
    let (m, img) = task
        .pseudo_targets(
            &masks,
            &labels,
            &[t1.shallow_clone(), t2.shallow_clone()],
            &labelled,
        )
        .unwrap();
    // Pixels as rows of [K]: [B, H, W, K].
    let rows = |t: &Tensor| {
        Vec::<f64>::try_from(t.permute([0, 2, 3, 1]).to_kind(Kind::Double).flatten(0, -1)).unwrap()
    };
    let by_hand = ensemble_argmax(&[rows(&t1), rows(&t2)], k as usize);
    let got: Vec<i64> = Vec::<i64>::try_from(m.flatten(0, -1)).unwrap();
    let per = (h * w) as usize;
    let img: Vec<i64> = Vec::<i64>::try_from(&img).unwrap();
    for i in 0..b as usize {
        let px = &got[i * per..(i + 1) * per];
        if i == 1 {
            assert!(
                px.iter().all(|&c| c == 1) && img[i] == 1,
                "labelled image kept"
            );
            continue;
        }
        assert_eq!(px, &by_hand[i * per..(i + 1) * per], "image {i}");
        let mut counts = vec![0usize; k as usize];
        for &c in px {
            counts[c as usize] += 1;
        }
        let best = (1..k as usize)
            .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
            .unwrap();
        let want = if counts[best] == 0 { 0 } else { best as i64 };
        assert_eq!(img[i], want, "image {i}: {counts:?}");
    }
}

#[test]
fn detection_pseudo_boxes_need_a_confident_ensemble() {
    let task = task_of(TaskKind::Detection, &params());
    let k = 3i64;
    let l = task.teacher_output(k, (32, 32)).locations.unwrap();
    // Teachers sure that nothing is anywhere: the unlabelled image gets no positive location,
    // the labelled one keeps its assignment.
    let quiet = Tensor::full([2, k + 5, l], -12.0, (Kind::Float, Device::Cpu));
    let gt = mtkd_vision_tasks::objects::pack_objects(&[
        &[mtkd_vision_tasks::objects::Object {
            class: 1,
            bbox: [4.0, 4.0, 20.0, 20.0],
            area: 256.0,
        }],
        &[mtkd_vision_tasks::objects::Object {
            class: 2,
            bbox: [8.0, 8.0, 24.0, 24.0],
            area: 256.0,
        }],
    ]);
    let batch = mtkd_vision_tasks::loader::Batch {
        images: Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu)),
        labels: Tensor::from_slice(&[1i64, 2]),
        targets: mtkd_vision_tasks::loader::BatchTargets::Objects(gt),
        indices: vec![0, 1],
        labelled: Some(Tensor::from_slice(&[true, false])),
        global_len: 2,
        global_labelled: 1,
    };
    let targets = task.targets(&batch).unwrap();
    let (t, img) = task
        .pseudo_targets(
            &targets,
            &batch.labels,
            &[quiet.shallow_clone(), quiet.shallow_clone()],
            batch.labelled.as_ref().unwrap(),
        )
        .unwrap();
    assert!(
        t.get(0).equal(&targets.get(0)),
        "the labelled image keeps its targets"
    );
    assert!(
        !t.get(1).equal(&targets.get(1)),
        "the unlabelled image's targets are replaced"
    );
    assert_eq!(Vec::<i64>::try_from(&img).unwrap(), vec![1, 0]);
    // The unlabelled image has no positive: its targets equal those of an image without objects.
    let empty = mtkd_vision_tasks::objects::pack_objects(&[&[], &[]]);
    let none = task
        .targets(&mtkd_vision_tasks::loader::Batch {
            targets: mtkd_vision_tasks::loader::BatchTargets::Objects(empty),
            labelled: None,
            images: batch.images.shallow_clone(),
            labels: batch.labels.shallow_clone(),
            indices: vec![0, 1],
            global_len: 2,
            global_labelled: 2,
        })
        .unwrap();
    assert!(t.get(1).equal(&none.get(1)));
}
