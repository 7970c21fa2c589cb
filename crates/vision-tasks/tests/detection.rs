//! Detection: box operations, NMS, the focal loss, the class KD, Pearson feature KD and COCO AP against
//! `scripts/golden_detection.py` (torchvision and pycocotools); the FCOS assignment and
//! decoding; the COCO reader's rules and errors; the loader's flip of boxes; the synthetic
//! scenes' boxes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use ndarray::Array4;
use serde_json::Value;
use tch::{Kind, Tensor};

use mtkd_vision_tasks::data::{Annotations, ImageSet};
use mtkd_vision_tasks::detection::eval::{evaluate, DetBox, GtBox};
use mtkd_vision_tasks::detection::layout::DetLayout;
use mtkd_vision_tasks::detection::{boxes, coco, loss, pack_objects, DetMetric, Object};
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};
use mtkd_vision_tasks::segmentation::synthetic;
use mtkd_vision_tasks::task::{Detection, Metric, Task};
use mtkd_vision_tasks::transform::{Augment, Normalize};

#[path = "../../../test-support/golden.rs"]
mod support;

fn golden() -> Value {
    support::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/detection.json"
    ))
}

/// A nested JSON list of numbers as a float tensor.
fn nested(v: &Value) -> Tensor {
    fn walk(v: &Value, shape: &mut Vec<i64>, depth: usize, out: &mut Vec<f32>) {
        match v {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len() as i64);
                }
                for x in items {
                    walk(x, shape, depth + 1, out);
                }
            }
            x => out.push(x.as_f64().map(|f| f as f32).unwrap_or(f32::NAN)),
        }
    }
    let (mut shape, mut out) = (Vec::new(), Vec::new());
    walk(v, &mut shape, 0, &mut out);
    if out.is_empty() {
        return Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu));
    }
    Tensor::from_slice(&out).view(shape.as_slice())
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let g = support::values(got);
    let w = support::values(want);
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, torchvision {w}"
        );
    }
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn box_iou_giou_and_focal_match_torchvision() {
    let g = golden();
    for c in g["box_iou"].as_array().unwrap() {
        let got = boxes::box_iou(&nested(&c["a"]), &nested(&c["b"])).unwrap();
        close("box_iou", &got, &nested(&c["iou"]), 1e-5);
    }
    for c in g["giou"].as_array().unwrap() {
        let got = boxes::generalized_box_iou(&nested(&c["a"]), &nested(&c["b"])).unwrap();
        close("generalized_box_iou", &got, &nested(&c["giou"]), 1e-5);
    }
    for c in g["giou_loss"].as_array().unwrap() {
        let got = boxes::giou_loss(&nested(&c["a"]), &nested(&c["b"])).unwrap();
        close("giou_loss", &got, &nested(&c["loss"]), 1e-5);
    }
    for c in g["focal"].as_array().unwrap() {
        let got = loss::sigmoid_focal(
            &nested(&c["logits"]),
            &nested(&c["targets"]),
            c["alpha"].as_f64().unwrap(),
            c["gamma"].as_f64().unwrap(),
        )
        .unwrap();
        close("sigmoid_focal_loss", &got, &nested(&c["loss"]), 1e-5);
    }
}

#[test]
fn class_kd_and_pearson_features_match_pytorch() {
    let g = golden();
    for c in g["class_kd"].as_array().unwrap() {
        let s = nested(&c["student"]);
        let t = nested(&c["teacher"]);
        let classes = nested(&c["classes"]).to_kind(Kind::Int64);
        let k = s.size()[1] - 5;
        let targets = mtkd_vision_tasks::detection::layout::Targets {
            boxes: Tensor::zeros(
                [s.size()[0], s.size()[2], 4],
                (Kind::Float, tch::Device::Cpu),
            ),
            centerness: Tensor::zeros([s.size()[0], s.size()[2]], (Kind::Float, tch::Device::Cpu)),
            classes,
        };
        let got = loss::class_kd(&s, &t, &targets, k, c["temperature"].as_f64().unwrap()).unwrap();
        close("class_kd", &got, &nested(&c["loss"]), 1e-5);
    }
    for c in g["pearson"].as_array().unwrap() {
        let got = mtkd_distill_core::loss::feature_pearson(
            &nested(&c["student"]),
            &nested(&c["teacher"]),
        )
        .unwrap();
        let want = nested(&c["loss"]);
        let (gv, wv) = (support::values(&got), support::values(&want));
        for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "feature_pearson[{i}]: got {a}, PyTorch {b}"
            );
        }
    }
}

#[test]
fn nms_keeps_what_torchvision_keeps() {
    let g = golden();
    for c in g["nms"].as_array().unwrap() {
        let keep = boxes::nms(
            &nested(&c["boxes"]),
            &nested(&c["scores"]),
            c["iou_threshold"].as_f64().unwrap(),
        )
        .unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&keep).unwrap(),
            ints(&c["keep"]),
            "nms case {}",
            c["name"]
        );
    }
    for c in g["batched_nms"].as_array().unwrap() {
        let classes = Tensor::from_slice(&ints(&c["classes"]));
        let keep = boxes::batched_nms(
            &nested(&c["boxes"]),
            &nested(&c["scores"]),
            &classes,
            c["iou_threshold"].as_f64().unwrap(),
        )
        .unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&keep).unwrap(),
            ints(&c["keep"]),
            "batched_nms case {}",
            c["name"]
        );
    }
}

#[test]
fn coco_ap_matches_pycocotools() {
    let g = golden();
    let cases = g["coco"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let mut cat_ids: Vec<u64> = c["categories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_u64().unwrap())
            .collect();
        cat_ids.sort_unstable();
        let idx: BTreeMap<u64, usize> = cat_ids.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let bbox = |v: &Value| -> [f64; 4] {
            let f = support::floats(v);
            [f[0], f[1], f[2], f[3]]
        };
        let gts: Vec<GtBox> = c["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| GtBox {
                image: a["image_id"].as_u64().unwrap(),
                category: idx[&a["category_id"].as_u64().unwrap()],
                bbox: bbox(&a["bbox"]),
                area: a["area"].as_f64().unwrap(),
            })
            .collect();
        let dets: Vec<DetBox> = c["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| DetBox {
                image: d["image_id"].as_u64().unwrap(),
                category: idx[&d["category_id"].as_u64().unwrap()],
                bbox: bbox(&d["bbox"]),
                score: d["score"].as_f64().unwrap(),
            })
            .collect();
        let got = evaluate(&gts, &dets, cat_ids.len());
        let want = support::floats(&c["stats"]);
        for (i, (g, w)) in got.stats.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-6,
                "case {}: stats[{i}] = {g}, pycocotools {w}",
                c["name"]
            );
        }
    }
}

/// A detector output that says exactly `objects` (class logit +8 at the assigned locations,
/// -8 elsewhere; the assigned box's distances; centerness logit from the target).
fn perfect_output(layout: &DetLayout, objects: &[&[Object]], k: i64) -> Tensor {
    let gt = pack_objects(objects).slice(2, 0, 5, 1);
    let t = layout.assign(&gt).unwrap();
    let loc = layout.locations(tch::Device::Cpu);
    let (cx, cy, st) = (loc.select(1, 0), loc.select(1, 1), loc.select(1, 2));
    let b = &t.boxes;
    let ltrb = Tensor::stack(
        &[
            (&cx - b.select(2, 0)) / &st,
            (&cy - b.select(2, 1)) / &st,
            (b.select(2, 2) - &cx) / &st,
            (b.select(2, 3) - &cy) / &st,
        ],
        1,
    )
    .clamp_min(0.0); // [B, 4, L]
    let pos = t.positive();
    let onehot = t.classes.clamp_min(0).one_hot(k).to_kind(Kind::Float) * pos.unsqueeze(-1);
    let cls = (onehot.transpose(1, 2) * 16.0) - 8.0;
    let ctr = (t.centerness.clamp(1e-4, 1.0 - 1e-4).logit(None) * &pos + (pos.neg() + 1.0) * -8.0)
        .unsqueeze(1);
    Tensor::cat(&[cls, ltrb * pos.unsqueeze(1), ctr], 1)
}

#[test]
fn assignment_decoding_and_ap_of_a_perfect_detector() {
    let layout = DetLayout::standard((48, 48));
    assert_eq!(layout.len(), 12 * 12 + 6 * 6 + 3 * 3);
    let a = [
        Object {
            class: 0,
            bbox: [4.0, 4.0, 16.0, 18.0],
            area: 150.0,
        },
        Object {
            class: 2,
            bbox: [20.0, 10.0, 46.0, 44.0],
            area: 700.0,
        },
    ];
    let b = [Object {
        class: 1,
        bbox: [10.0, 20.0, 40.0, 30.0],
        area: 300.0,
    }];
    let none: [Object; 0] = [];
    let objects: [&[Object]; 3] = [&a, &b, &none];
    let gt = pack_objects(&objects);
    assert_eq!(gt.size(), [3, 2, 6]);
    let t = layout.assign(&gt.slice(2, 0, 5, 1)).unwrap();
    let pos = t.positive().sum_dim_intlist(1, false, Kind::Float);
    let pos: Vec<f32> = Vec::<f32>::try_from(&pos).unwrap();
    assert!(pos[0] >= 2.0 && pos[1] >= 1.0, "positives {pos:?}");
    assert_eq!(pos[2], 0.0, "an image without objects has no positives");
    // The small box goes to the finest level, the large one to a coarser one.
    let levels = layout.levels(tch::Device::Cpu);
    let lv = |img: i64, class: i64| -> Vec<i64> {
        let m = t.classes.get(img).eq(class);
        Vec::<i64>::try_from(&levels.masked_select(&m)).unwrap()
    };
    assert!(
        lv(0, 0).iter().all(|&l| l == 0),
        "small box levels {:?}",
        lv(0, 0)
    );
    assert!(
        lv(0, 2).iter().all(|&l| l >= 1),
        "large box levels {:?}",
        lv(0, 2)
    );

    let out = perfect_output(&layout, &objects, 3);
    let task = Detection {
        layout: layout.clone(),
        box_kd_weight: 1.0,
    };
    let targets = t.pack();
    // Its box loss is zero, and distilling it into itself costs nothing but the binary
    // entropy of its own scores (KD on sigmoid outputs is a KL: zero against itself).
    let (_, bx, _) = loss::fcos_terms(&layout, &out, &t, 3).unwrap();
    assert!(
        support::values(&bx).iter().all(|v| v.abs() < 1e-4),
        "box loss {bx:?}"
    );
    let kd = task.kd(&out, &out, 2.0, &targets).unwrap();
    assert!(
        support::values(&kd).iter().all(|v| v.abs() < 1e-4),
        "self-KD {kd:?}"
    );
    let worse = &out * 0.5;
    let kd = task.kd(&worse, &out, 2.0, &targets).unwrap();
    assert!(support::values(&kd)[..2].iter().all(|v| *v > 1e-3));

    let mut metric = DetMetric::new(layout, 3);
    metric.update_boxes(&out, &gt, &[0, 1, 2]).unwrap();
    let r = Metric::report(&metric);
    assert_eq!(r.primary, "ap");
    assert!(
        (r.value - 100.0).abs() < 1e-6,
        "AP of a perfect detector: {}",
        r.value
    );
    assert!((r.get("ap50") - 100.0).abs() < 1e-6);
    // A detector that says nothing scores 0.
    let mut empty = DetMetric::new(DetLayout::standard((48, 48)), 3);
    empty
        .update_boxes(&(out.zeros_like() - 20.0), &gt, &[0, 1, 2])
        .unwrap();
    assert_eq!(Metric::report(&empty).value, 0.0);
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mtkd-det-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_set() -> ImageSet {
    let mut images = Array4::<u8>::zeros((3, 1, 16, 16));
    images
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 251) as u8);
    let mut set = ImageSet::new(images, vec![0, 1, 0], 2).unwrap();
    set.class_names = vec!["cat".into(), "dog".into()];
    set.annotations = Annotations::Objects(vec![
        vec![Object {
            class: 0,
            bbox: [1.0, 2.0, 9.0, 12.0],
            area: 80.0,
        }],
        vec![
            Object {
                class: 1,
                bbox: [0.0, 0.0, 16.0, 8.0],
                area: 128.0,
            },
            Object {
                class: 1,
                bbox: [3.0, 3.0, 6.0, 6.0],
                area: 9.0,
            },
        ],
        vec![],
    ]);
    set
}

#[test]
fn coco_folders_round_trip_and_bad_files_are_named() {
    let dir = scratch("coco");
    let set = tiny_set();
    coco::write_coco(&dir, "train", &set).unwrap();
    let back = coco::read_coco(&dir, "train", 1, None).unwrap();
    assert_eq!(back.set.images, set.images);
    assert_eq!(back.set.annotations, set.annotations);
    assert_eq!(back.set.class_names, set.class_names);
    assert_eq!(
        back.report.negatives, 1,
        "the image without boxes is a valid negative"
    );
    assert_eq!(back.report.boxes, 3);
    // Resized on reading: boxes and areas scale with the image.
    let big = coco::read_coco(&dir, "train", 1, Some(32)).unwrap();
    assert_eq!(
        big.set.annotations.objects().unwrap()[0][0].bbox,
        [2.0, 4.0, 18.0, 24.0]
    );
    assert_eq!(big.set.annotations.objects().unwrap()[0][0].area, 320.0);

    let ann = coco::annotation_path(&dir, "train");
    let original = std::fs::read_to_string(&ann).unwrap();
    let json: Value = serde_json::from_str(&original).unwrap();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut j = json.clone();
        f(&mut j);
        std::fs::write(&ann, serde_json::to_string(&j).unwrap()).unwrap();
        coco::read_coco(&dir, "train", 1, None)
    };
    // A box past the image is clipped and counted; a zero-size one is left out and counted.
    let r = edit(&|j| {
        j["annotations"][0]["bbox"] = serde_json::json!([10.0, 10.0, 20.0, 20.0]);
        j["annotations"][1]["bbox"] = serde_json::json!([3.0, 3.0, 0.0, 5.0]);
    })
    .unwrap();
    assert_eq!(
        (r.report.clipped, r.report.degenerate, r.report.boxes),
        (1, 1, 2)
    );
    assert_eq!(
        r.set.annotations.objects().unwrap()[0][0].bbox,
        [10.0, 10.0, 16.0, 16.0]
    );
    let err = |e: mtkd_vision_tasks::Error| e.to_string();
    let e = err(edit(&|j| j["annotations"][0]["category_id"] = 99.into()).unwrap_err());
    assert!(
        e.contains("category_id 99") && e.contains("instances_train.json"),
        "{e}"
    );
    let e = err(edit(&|j| j["annotations"][0]["image_id"] = 77.into()).unwrap_err());
    assert!(e.contains("image_id 77"), "{e}");
    let e = err(
        edit(&|j| j["annotations"][0]["bbox"] = serde_json::json!([1.0, 1.0, -3.0, 2.0]))
            .unwrap_err(),
    );
    assert!(e.contains("non-negative"), "{e}");
    let e = err(edit(&|j| j["images"][0]["file_name"] = "gone.png".into()).unwrap_err());
    assert!(e.contains("gone.png"), "{e}");
    std::fs::write(&ann, &original[..original.len() / 2]).unwrap();
    let e = err(coco::read_coco(&dir, "train", 1, None).unwrap_err());
    assert!(
        e.contains("instances_train.json") && e.contains("COCO"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_loader_flips_boxes_with_the_images() {
    let set = Arc::new(tiny_set());
    let cfg = |augment: Option<Augment>| LoaderConfig {
        batch_size: 3,
        shuffle: false,
        drop_last: false,
        augment,
        eval_resize: None,
        normalize: Normalize {
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
        },
        seed: 3,
    };
    let plain = BatchLoader::new(Arc::clone(&set), cfg(None)).unwrap();
    let p = plain.epoch(0, 0, tch::Device::Cpu).next().unwrap();
    assert_eq!(p.targets.objects().unwrap().size(), [3, 2, 6]);
    let flip = Augment {
        hflip: true,
        ..Default::default()
    };
    let mut seen_flip = false;
    for epoch in 0..8 {
        let loader = BatchLoader::new(Arc::clone(&set), cfg(Some(flip.clone()))).unwrap();
        let f = loader.epoch(epoch, 0, tch::Device::Cpu).next().unwrap();
        for i in 0..3 {
            let same = f.images.get(i).equal(&p.images.get(i));
            let mirrored = f.images.get(i).equal(&p.images.get(i).flip([2]));
            assert!(same || mirrored);
            let (bf, bp) = (
                f.targets.objects().unwrap().get(i),
                p.targets.objects().unwrap().get(i),
            );
            if mirrored && !same {
                seen_flip = true;
                // x1' = W - x2, x2' = W - x1 for real boxes.
                let real = bp.select(1, 4).ge(0.0);
                let want_x1 = (bp.select(1, 2).neg() + 16.0).masked_select(&real);
                assert!(bf
                    .select(1, 0)
                    .masked_select(&real)
                    .allclose(&want_x1, 1e-6, 1e-6, false));
            } else {
                assert!(bf.equal(&bp));
            }
        }
    }
    assert!(seen_flip);
    // Geometric augmentations that would move boxes are refused.
    let crop = Augment {
        crop_padding: 4,
        ..Default::default()
    };
    let e = BatchLoader::new(set, cfg(Some(crop)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("hflip"), "{e}");
}

#[test]
fn synthetic_scenes_have_the_boxes_of_their_visible_pixels() {
    let source = mtkd_vision_tasks::data::read_mnist_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-mini"),
        mtkd_vision_tasks::data::Split::Test,
    )
    .unwrap();
    let cfg = synthetic::SceneConfig {
        train: 1,
        test: 20,
        size: 48,
        objects: [1, 3],
        scale: [0.8, 1.4],
        seed: 0,
    };
    let seg = synthetic::generate(&source, 20, &cfg, 5).unwrap();
    let (det, _) = synthetic::generate_detection(&source, 20, &cfg, 5).unwrap();
    assert_eq!(seg.images, det.images, "the same scenes");
    assert_eq!(det.num_classes, 10);
    let masks = seg.annotations.masks().unwrap();
    for (i, objs) in det.annotations.objects().unwrap().iter().enumerate() {
        assert!(
            !objs.is_empty()
                || masks
                    .index_axis(ndarray::Axis(0), i)
                    .iter()
                    .all(|&m| m == 0)
        );
        for o in objs {
            let [x1, y1, x2, y2] = o.bbox.map(|v| v as usize);
            assert!(x2 > x1 && y2 > y1 && x2 <= 48 && y2 <= 48);
            // Every box holds pixels of its class on its border rows and columns.
            let m = masks.index_axis(ndarray::Axis(0), i);
            let class = o.class as u8 + 1;
            assert!((x1..x2).any(|x| m[[y1, x]] == class));
            assert!((x1..x2).any(|x| m[[y2 - 1, x]] == class));
            assert!((y1..y2).any(|y| m[[y, x1]] == class));
            assert!((y1..y2).any(|y| m[[y, x2 - 1]] == class));
            assert!(o.area as usize <= (x2 - x1) * (y2 - y1));
        }
    }
}

/// The meta mode's per-location signals and credit on a detection batch, and the KD term with a
/// weight per teacher and location, against autograd (`scripts/golden_det_locations.py`).
#[test]
fn per_location_signals_credit_and_weighted_kd_match_pytorch() {
    use mtkd_vision_tasks::detection::layout::Targets;
    let g = support::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/det_locations.json"
    ));
    let student = support::tensor(&g["student"]);
    let teachers: Vec<Tensor> = g["teachers"]
        .as_array()
        .unwrap()
        .iter()
        .map(support::tensor)
        .collect();
    let (b, l) = (student.size()[0], student.size()[2]);
    let k = student.size()[1] - 5;
    let classes = Tensor::from_slice(&support::ints(&g["classes"])).view([b, l]);
    let targets = Targets {
        classes,
        boxes: Tensor::zeros([b, l, 4], (Kind::Float, tch::Device::Cpu)),
        centerness: Tensor::zeros([b, l], (Kind::Float, tch::Device::Cpu)),
    };
    let labelled: Vec<bool> = g["labelled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let t = g["temperature"].as_f64().unwrap();
    let s = loss::location_signals(
        &student,
        &teachers,
        &targets,
        &Tensor::from_slice(&labelled),
        k,
        t,
        g["kd_weight"].as_f64().unwrap(),
        mtkd_distill_core::signals::LocationQuiz::Focal,
    )
    .unwrap();
    for (name, got) in [
        ("ce", &s.ce),
        ("kl", &s.kl),
        ("entropy", &s.entropy),
        ("credit", &s.credit),
    ] {
        support::assert_close_to_stored(name, got, &g[name], 1e-4);
    }
    let q = s.quiz_loss.double_value(&[]);
    let want = g["quiz_loss"].as_f64().unwrap();
    assert!((q - want).abs() < 1e-5 * (1.0 + want), "quiz {q} vs {want}");
    // `location_quiz = "balanced-ce"`: focal without its focusing factor.
    let s2 = loss::location_signals(
        &student,
        &teachers,
        &targets,
        &Tensor::from_slice(&labelled),
        k,
        t,
        g["kd_weight"].as_f64().unwrap(),
        mtkd_distill_core::signals::LocationQuiz::BalancedCe,
    )
    .unwrap();
    support::assert_close_to_stored(
        "credit_balanced_ce",
        &s2.credit,
        &g["credit_balanced_ce"],
        1e-4,
    );
    let q = s2.quiz_loss.double_value(&[]);
    let want = g["quiz_loss_balanced_ce"].as_f64().unwrap();
    assert!((q - want).abs() < 1e-5 * (1.0 + want), "quiz {q} vs {want}");
    let (c1, c2) = (
        s.credit.abs().mean(Kind::Double),
        s2.credit.abs().mean(Kind::Double),
    );
    assert!(
        c1.double_value(&[]) != c2.double_value(&[]),
        "the two quizzes give the same credit"
    );
    // The update reads the labelled images' locations only.
    assert_eq!(
        support::values(&s.valid.sum_dim_intlist(1i64, false, Kind::Float)),
        [l as f64, l as f64, 0.0]
    );
    let layout = DetLayout::new((16, 16), &[4, 8, 16]);
    let kd = loss::location_weighted_kd(
        &layout,
        &student,
        &teachers,
        &support::tensor(&g["weights"]),
        &targets,
        k,
        t,
        0.0,
    )
    .unwrap();
    support::assert_close_to_stored("weighted KD", &kd, &g["weighted_kd"], 1e-4);
}
