//! Segmentation: dense losses, pooled signals and metrics against `scripts/golden_segmentation.py`
//! (PyTorch for the losses, NumPy for the metrics); the folder reader's errors; the joint
//! transform; the synthetic scenes.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Array4};
use rand::SeedableRng;
use tch::{Kind, Tensor};

use mtkd_distill_core::ModelOutput;
use mtkd_vision_tasks::data::ImageSet;
use mtkd_vision_tasks::segmentation::{self, data, synthetic, Confusion, IGNORE};
use mtkd_vision_tasks::task::{DenseKd, Segmentation, SignalInputs, Task};
use mtkd_vision_tasks::transform::{self, Augment};

#[path = "../../../test-support/golden.rs"]
mod support;
use support::{floats, tensor};

fn close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    let got: Vec<f64> = Vec::<f64>::try_from(&got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() / (1.0 + w.abs()) < tol,
            "{what}[{i}]: got {g}, reference {w}"
        );
    }
}

#[test]
fn dense_losses_signals_and_metrics_match_the_references() {
    let golden = support::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/segmentation.json"
    ));
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let t = c["T"].as_f64().unwrap();
        let zs = tensor(&c["zs"]);
        let y = tensor(&c["y"]).to_kind(Kind::Int64);
        let teachers: Vec<Tensor> = c["teachers"]
            .as_array()
            .unwrap()
            .iter()
            .map(tensor)
            .collect();
        let kl_task = Segmentation { kd: DenseKd::Kl };
        let cwd_task = Segmentation { kd: DenseKd::Cwd };
        close(
            &format!("{name} ce"),
            &kl_task.loss(&zs, &y).unwrap(),
            &floats(&c["ce"]),
            1e-5,
        );
        for (m, zt) in teachers.iter().enumerate() {
            close(
                &format!("{name} kd[{m}]"),
                &kl_task.kd(&zs, zt, t, &y).unwrap(),
                &floats(&c["kd"][m]),
                1e-5,
            );
            close(
                &format!("{name} cwd[{m}]"),
                &cwd_task.kd(&zs, zt, t, &y).unwrap(),
                &floats(&c["cwd"][m]),
                1e-5,
            );
        }
        let w = tensor(&c["w"]);
        let pix =
            mtkd_distill_core::loss::pixel_weighted_kd(&zs, &teachers, &w, &y, 255, t).unwrap();
        close(
            &format!("{name} pixel-weighted kd"),
            &pix,
            &floats(&c["pixel_weighted_kd"]),
            1e-5,
        );
        let outs: Vec<ModelOutput> = teachers
            .iter()
            .map(|l| ModelOutput {
                logits: l.shallow_clone(),
                features: None,
            })
            .collect();
        let b = zs.size()[0];
        let labels = Tensor::zeros([b], (Kind::Int64, tch::Device::Cpu));
        let s = kl_task
            .signals(&SignalInputs {
                student_logits: &zs,
                projected: &[],
                teachers: &outs,
                targets: &y,
                image_labels: &labels,
                temperature: t,
                kl_terms: None,
            })
            .unwrap();
        for m in 0..teachers.len() {
            let col = |x: &Tensor| x.select(1, m as i64);
            close(
                &format!("{name} signal ce[{m}]"),
                &col(&s.ce),
                &floats(&c["teacher_ce"][m]),
                1e-5,
            );
            close(
                &format!("{name} signal kl[{m}]"),
                &col(&s.kl),
                &floats(&c["kd"][m]),
                1e-5,
            );
            close(
                &format!("{name} signal entropy[{m}]"),
                &col(&s.entropy),
                &floats(&c["entropy"][m]),
                1e-5,
            );
            let pooled = support::tensor(&c["pooled"][m]);
            close(
                &format!("{name} pooled[{m}]"),
                &s.teacher_logits[m],
                &support::values(&pooled),
                1e-5,
            );
        }
        // The metrics, from a confusion matrix accumulated over two halves of the batch.
        let mut conf = Confusion::new(zs.size()[1] as usize);
        let half = b / 2;
        conf.update(&zs.narrow(0, 0, half), &y.narrow(0, 0, half))
            .unwrap();
        conf.update(&zs.narrow(0, half, b - half), &y.narrow(0, half, b - half))
            .unwrap();
        let want = &c["metrics"];
        let got = conf.report();
        let matrix: Vec<Vec<u64>> = serde_json::from_value(want["confusion"].clone()).unwrap();
        assert_eq!(conf.matrix(), matrix, "{name}: confusion matrix");
        assert!(
            (got.miou - want["miou"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: mIoU {got:?}"
        );
        assert!((got.pixel_accuracy - want["pixel_accuracy"].as_f64().unwrap()).abs() < 1e-9);
        for (i, w) in want["per_class_iou"].as_array().unwrap().iter().enumerate() {
            match w.as_f64() {
                Some(w) => assert!((got.per_class_iou[i] - w).abs() < 1e-9, "{name}: IoU[{i}]"),
                None => assert!(
                    got.per_class_iou[i].is_nan(),
                    "{name}: class {i} has no IoU"
                ),
            }
        }
        if name == "absent-class" {
            assert!(
                got.per_class_iou[2].is_nan(),
                "the absent class is left out of the mean"
            );
        }
    }
}

#[test]
fn a_mask_class_outside_the_range_is_refused_by_the_metric() {
    let mut conf = Confusion::new(3);
    let logits = Tensor::zeros([1, 3, 2, 2], (Kind::Float, tch::Device::Cpu));
    let bad = Tensor::from_slice(&[0i64, 1, 7, 255]).view([1, 2, 2]);
    let err = conf.update(&logits, &bad).unwrap_err().to_string();
    assert!(err.contains("class 7 outside 0..3"), "{err}");
}

#[test]
fn image_label_is_the_most_frequent_foreground_class() {
    let m = Array2::from_shape_vec((2, 4), vec![0u8, 0, 0, 2, 2, 1, 255, 0]).unwrap();
    assert_eq!(segmentation::image_label(m.view(), 3), 2);
    let bg = Array2::from_shape_vec((1, 3), vec![0u8, 255, 0]).unwrap();
    assert_eq!(segmentation::image_label(bg.view(), 3), 0);
    let tie = Array2::from_shape_vec((1, 4), vec![1u8, 2, 2, 1]).unwrap();
    assert_eq!(segmentation::image_label(tie.view(), 3), 1);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mtkd-seg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    dir
}

fn grey(path: &Path, w: u32, h: u32, v: u8) {
    image::GrayImage::from_pixel(w, h, image::Luma([v]))
        .save(path)
        .unwrap();
}

#[test]
fn the_folder_reader_loads_index_and_palette_masks_and_names_bad_files() {
    let dir = scratch("ok");
    grey(&dir.join("images/a.png"), 4, 3, 10);
    let mask: Vec<u8> = vec![0, 1, 1, 2, 0, 0, 255, 2, 2, 2, 1, 0];
    data::write_index_mask(&dir.join("masks/a.png"), 3, 4, &mask).unwrap();
    // A palette PNG: its indices are the classes, whatever its colours.
    {
        grey(&dir.join("images/b.png"), 4, 3, 20);
        let f = std::fs::File::create(dir.join("masks/b.png")).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 4, 3);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![0u8, 0, 0, 128, 0, 0, 0, 128, 0]);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(&[2u8; 12]).unwrap();
        wr.finish().unwrap();
    }
    let set = data::read_seg_folder(&dir, 3, 1).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.image_shape(), (1, 3, 4));
    let masks = set.annotations.masks().unwrap();
    assert_eq!(
        masks
            .index_axis(ndarray::Axis(0), 0)
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        mask
    );
    assert!(masks
        .index_axis(ndarray::Axis(0), 1)
        .iter()
        .all(|&v| v == 2));
    assert_eq!(set.labels, vec![2, 2]);
    // A subset keeps each image's mask with it.
    let one = set.select(&[1]);
    assert!(one.annotations.masks().unwrap().iter().all(|&v| v == 2));

    // Out-of-range class: the mask file and the pixel are named.
    let err = data::read_seg_folder(&dir, 2, 1).unwrap_err().to_string();
    assert!(
        err.contains("masks/a.png") && err.contains("class 2, outside 0..2"),
        "{err}"
    );

    // Mask and image of different sizes.
    let dir2 = scratch("size");
    grey(&dir2.join("images/a.png"), 5, 3, 10);
    data::write_index_mask(&dir2.join("masks/a.png"), 3, 4, &mask).unwrap();
    let err = data::read_seg_folder(&dir2, 3, 1).unwrap_err().to_string();
    assert!(
        err.contains("masks/a.png") && err.contains("mask is 4x3 but its image"),
        "{err}"
    );

    // An RGB mask where an index mask is expected.
    let dir3 = scratch("rgb");
    grey(&dir3.join("images/a.png"), 4, 3, 10);
    image::RgbImage::from_pixel(4, 3, image::Rgb([128, 0, 0]))
        .save(dir3.join("masks/a.png"))
        .unwrap();
    let err = data::read_seg_folder(&dir3, 3, 1).unwrap_err().to_string();
    assert!(
        err.contains("masks/a.png") && err.contains("an RGB mask where an index mask is expected"),
        "{err}"
    );

    // An image without a mask.
    grey(&dir3.join("images/z.png"), 4, 3, 10);
    std::fs::remove_file(dir3.join("masks/a.png")).unwrap();
    let err = data::read_seg_folder(&dir3, 3, 1).unwrap_err().to_string();
    assert!(err.contains("has no mask"), "{err}");
    for d in [dir, dir2, dir3] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn the_joint_transform_moves_mask_and_image_together() {
    // An image whose pixel value encodes its class: after any zoom, shift and flip, every
    // labelled output pixel must still carry the value of its class (nearest for the mask,
    // bilinear for the image: exact inside constant regions).
    let (h, w) = (16usize, 16usize);
    let mut mask = Array2::<u8>::zeros((h, w));
    let mut img = Array3::<u8>::zeros((1, h, w));
    for y in 0..h {
        for x in 0..w {
            let c = if x < 8 { 1 } else { 2 };
            mask[[y, x]] = c;
            img[[0, y, x]] = 100 * c;
        }
    }
    let aug = Augment {
        crop_padding: 3,
        hflip: true,
        random_resized_crop: None,
        scale: Some([0.7, 1.4]),
    };
    let mut flipped = 0;
    for seed in 0..50u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut dst = vec![0f32; h * w];
        let mut dm = vec![0i64; h * w];
        transform::apply_joint(
            img.view(),
            mask.view(),
            Some(&aug),
            IGNORE,
            &mut rng,
            &mut dst,
            &mut dm,
        );
        for i in 0..h * w {
            assert!(
                matches!(dm[i], 1 | 2 | 255),
                "mask values stay classes or unlabelled"
            );
            if dm[i] == 255 {
                assert_eq!(
                    dst[i], 0.0,
                    "outside the image: zero pixel, unlabelled mask"
                );
            }
        }
        // Where a pixel and two neighbours on each side carry one class, the (bilinear) image
        // is that class's value: image and mask moved together.
        let row = 8 * w;
        if dm[row..row + w].iter().find(|&&v| v != 255) == Some(&2) {
            flipped += 1;
        }
        let mut checked = 0;
        for y in 0..h {
            for x in 2..w - 2 {
                let i = y * w + x;
                let c = dm[i];
                if c != 255 && (i - 2..=i + 2).all(|j| dm[j] == c) {
                    assert!(
                        (dst[i] - 100.0 * c as f32).abs() < 1e-3,
                        "seed {seed} ({y},{x}): class {c} but pixel {}",
                        dst[i]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 20, "seed {seed}: only {checked} interior pixels");
    }
    assert!(
        (10..=40).contains(&flipped),
        "about half are flipped ({flipped} of 50)"
    );
}

fn items() -> ImageSet {
    // Ten "objects": bright squares of different sizes, one per class.
    let mut images = Array4::<u8>::zeros((10, 1, 28, 28));
    for c in 0..10 {
        for y in 4..(8 + 2 * c) {
            for x in 4..(8 + 2 * c) {
                images[[c, 0, y, x]] = 200;
            }
        }
    }
    ImageSet::new(images, (0..10).collect(), 10).unwrap()
}

#[test]
fn synthetic_scenes_are_seeded_and_their_masks_exact() {
    let cfg = synthetic::SceneConfig {
        train: 20,
        test: 5,
        size: 48,
        objects: [1, 3],
        scale: [0.8, 1.2],
        seed: 3,
    };
    let a = synthetic::generate(&items(), 20, &cfg, 7).unwrap();
    let b = synthetic::generate(&items(), 20, &cfg, 7).unwrap();
    let c = synthetic::generate(&items(), 20, &cfg, 8).unwrap();
    assert_eq!(a.images, b.images);
    assert_eq!(a.annotations, b.annotations);
    assert_ne!(a.annotations, c.annotations, "another seed, other scenes");
    assert_eq!(a.num_classes, 11);
    assert_eq!(a.class_names[0], "background");
    let masks = a.annotations.masks().unwrap();
    // Object pixels are bright (the squares are 200 x contrast >= 0.7), background texture is
    // at most 120, and every scene holds at least one object.
    for i in 0..20 {
        let m = masks.index_axis(ndarray::Axis(0), i);
        let im = a.images.index_axis(ndarray::Axis(0), i);
        assert!(m.iter().any(|&v| v > 0), "scene {i} has an object");
        for ((y, x), &v) in m.indexed_iter() {
            let p = im[[0, y, x]];
            if v > 0 {
                assert!(p >= 139, "scene {i} ({y},{x}): object pixel {p}");
            } else {
                assert!(p <= 120, "scene {i} ({y},{x}): background pixel {p}");
            }
        }
        assert_eq!(a.labels[i], segmentation::image_label(m, 11));
    }
}
