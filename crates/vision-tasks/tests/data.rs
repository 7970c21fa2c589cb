//! Dataset readers on the committed Fashion-MNIST subset and on small files the tests write,
//! the loader's determinism, and the accuracy metric.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use mtkd_vision_tasks::classification::Accuracy;
use mtkd_vision_tasks::data::{self, Split};
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};
use mtkd_vision_tasks::transform::{Augment, EvalResize, Normalize};

fn mini() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-mini")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mtkd-vt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn reads_the_committed_fashion_mnist_subset() {
    let train = data::read_mnist_dir(&mini(), Split::Train).unwrap();
    let test = data::read_mnist_dir(&mini(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (3000, 1000));
    assert_eq!(train.image_shape(), (1, 28, 28));
    assert_eq!(train.num_classes, 10);
    // Fashion-MNIST's first training label is 9 (ankle boot), the first test label 9 as well.
    assert_eq!(train.labels[0], 9);
    assert_eq!(test.labels[0], 9);
    let mut counts = [0usize; 10];
    for &l in &train.labels {
        counts[l as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| c > 250),
        "every class is present: {counts:?}"
    );
    let mean =
        train.images.iter().map(|&v| f64::from(v)).sum::<f64>() / train.images.len() as f64 / 255.0;
    assert!(
        (mean - 0.286).abs() < 0.01,
        "pixel mean {mean} is Fashion-MNIST's ~0.286"
    );
}

#[test]
fn truncated_and_missing_idx_files_are_named() {
    let dir = scratch("trunc");
    let src = std::fs::read(mini().join("t10k-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), &src[..src.len() / 2]).unwrap();
    std::fs::copy(
        mini().join("t10k-labels-idx1-ubyte.gz"),
        dir.join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let err = data::read_mnist_dir(&dir, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t10k-images-idx3-ubyte.gz") && err.contains("truncated"),
        "{err}"
    );
    // An uncompressed IDX file cut short: the header promises more than the file holds.
    let mut raw = vec![0u8, 0, 8, 1];
    raw.extend_from_slice(&10u32.to_be_bytes());
    raw.extend_from_slice(&[1, 2, 3]);
    std::fs::write(dir.join("short-idx1-ubyte"), &raw).unwrap();
    let err = data::read_idx(&dir.join("short-idx1-ubyte"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("short-idx1-ubyte") && err.contains("need 10 bytes"),
        "{err}"
    );
    let err = data::read_mnist_dir(&dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte.gz") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn reads_cifar_binary_records() {
    let dir = scratch("cifar");
    // CIFAR-100 layout: coarse label, fine label, 3072 pixels (R plane, G plane, B plane).
    let mut f = std::fs::File::create(dir.join("train.bin")).unwrap();
    for i in 0..3u8 {
        let mut rec = vec![7, 40 + i];
        rec.extend((0..3072).map(|p| ((p / 1024) as u8) * 100 + i));
        f.write_all(&rec).unwrap();
    }
    drop(f);
    let set = data::read_cifar_files(&[dir.join("train.bin")], 2, 100).unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!(set.labels, vec![40, 41, 42]);
    assert_eq!(set.image_shape(), (3, 32, 32));
    assert_eq!(set.images[[2, 1, 5, 5]], 102, "green plane of sample 2");
    std::fs::write(dir.join("bad.bin"), vec![0u8; 3000]).unwrap();
    let err = data::read_cifar_files(&[dir.join("bad.bin")], 1, 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.bin") && err.contains("3073-byte record"),
        "{err}"
    );
}

#[test]
fn reads_an_image_folder_tree() {
    let dir = scratch("folder");
    for (ci, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for k in 0..2u8 {
            let img = image::RgbImage::from_fn(8, 8, |x, _| {
                image::Rgb([ci as u8 * 200, k * 50, x as u8])
            });
            img.save(dir.join(class).join(format!("{k}.png"))).unwrap();
        }
    }
    let set = data::read_image_folder(&dir, 8, 3).unwrap();
    assert_eq!(set.len(), 4);
    assert_eq!(set.labels, vec![0, 0, 1, 1]);
    assert_eq!(set.class_names, vec!["cat", "dog"]);
    assert_eq!(set.image_shape(), (3, 8, 8));
    assert_eq!(set.images[[2, 0, 3, 3]], 200, "red channel of a dog image");
    assert_eq!(set.images[[3, 1, 0, 0]], 50, "green channel of dog/1.png");
    std::fs::write(dir.join("dog").join("broken.jpg"), b"not a jpeg").unwrap();
    let err = data::read_image_folder(&dir, 8, 3).unwrap_err().to_string();
    assert!(err.contains("broken.jpg"), "{err}");
}

fn loader(seed: u64, augment: bool) -> BatchLoader {
    let set = Arc::new(
        data::read_mnist_dir(&mini(), Split::Test)
            .unwrap()
            .take(300),
    );
    BatchLoader::new(
        set,
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            drop_last: false,
            augment: augment.then_some(Augment {
                crop_padding: 2,
                hflip: true,
                random_resized_crop: None,
                scale: None,
            }),
            eval_resize: None,
            normalize: Normalize {
                mean: vec![0.286],
                std: vec![0.353],
            },
            seed,
        },
    )
    .unwrap()
}

fn batches(l: &BatchLoader, epoch: u64, start: usize) -> Vec<(Tensor, Vec<usize>)> {
    l.epoch(epoch, start, Device::Cpu)
        .map(|b| (b.images, b.indices))
        .collect()
}

#[test]
fn loader_is_seeded_shuffled_and_resumable() {
    let l = loader(7, true);
    assert_eq!(l.num_batches(), 5);
    let a = batches(&l, 0, 0);
    let b = batches(&loader(7, true), 0, 0);
    assert_eq!(a.len(), 5);
    assert_eq!(
        a[4].1.len(),
        300 - 4 * 64,
        "the last batch holds the remainder"
    );
    for ((ta, ia), (tb, ib)) in a.iter().zip(&b) {
        assert_eq!(ia, ib, "same seed, same order");
        assert!(ta.equal(tb), "same seed, same augmentation");
    }
    let mut all: Vec<usize> = a.iter().flat_map(|x| x.1.clone()).collect();
    assert_ne!(all[..64], (0..64).collect::<Vec<_>>()[..], "shuffled");
    all.sort_unstable();
    assert_eq!(
        all,
        (0..300).collect::<Vec<_>>(),
        "each sample exactly once per epoch"
    );
    let e1 = batches(&l, 1, 0);
    assert_ne!(a[0].1, e1[0].1, "another epoch, another order");
    let other = batches(&loader(8, true), 0, 0);
    assert_ne!(a[0].1, other[0].1, "another seed, another order");
    // Starting at batch 3 gives exactly batches 3.. of the full epoch.
    let tail = batches(&l, 0, 3);
    assert_eq!(tail.len(), 2);
    assert!(tail[0].0.equal(&a[3].0) && tail[0].1 == a[3].1);
    // Normalisation: without augmentation the mean is near 0.
    let plain = batches(&loader(7, false), 0, 0);
    let m = plain[0].0.mean(Kind::Float).double_value(&[]);
    assert!(m.abs() < 0.3, "normalised mean {m}");
}

#[test]
fn eval_resize_and_random_resized_crop_give_the_requested_size() {
    let set = Arc::new(data::read_mnist_dir(&mini(), Split::Test).unwrap().take(10));
    let norm = Normalize {
        mean: vec![0.5],
        std: vec![0.5],
    };
    let mk = |augment, eval_resize| {
        BatchLoader::new(
            Arc::clone(&set),
            LoaderConfig {
                batch_size: 10,
                shuffle: false,
                drop_last: false,
                augment,
                eval_resize,
                normalize: norm.clone(),
                seed: 1,
            },
        )
        .unwrap()
    };
    let l = mk(
        Some(Augment {
            crop_padding: 0,
            hflip: true,
            random_resized_crop: Some(20),
            scale: None,
        }),
        None,
    );
    assert_eq!(l.output_shape(), (1, 20, 20));
    assert_eq!(
        l.epoch(0, 0, Device::Cpu).next().unwrap().images.size(),
        vec![10, 1, 20, 20]
    );
    let l = mk(
        None,
        Some(EvalResize {
            resize: 32,
            crop: 24,
        }),
    );
    let b = l.epoch(0, 0, Device::Cpu).next().unwrap();
    assert_eq!(b.images.size(), vec![10, 1, 24, 24]);
    let bad = BatchLoader::new(
        Arc::clone(&set),
        LoaderConfig {
            batch_size: 4,
            shuffle: false,
            drop_last: false,
            augment: None,
            eval_resize: None,
            normalize: Normalize {
                mean: vec![0.5; 3],
                std: vec![0.5; 3],
            },
            seed: 0,
        },
    );
    assert!(bad.unwrap_err().to_string().contains("3 means"));
}

#[test]
fn accuracy_counts_top1_top5_and_per_class() {
    let logits = Tensor::from_slice(&[
        5.0f32, 1.0, 0.0, 0.0, 0.0, 0.0, //
        0.0, 5.0, 4.0, 0.0, 0.0, 0.0, //
        0.0, 0.0, 0.0, 0.0, 0.0, 9.0, //
    ])
    .view([3, 6]);
    let labels = Tensor::from_slice(&[0i64, 2, 0]);
    let mut acc = Accuracy::new(6);
    acc.update(&logits, &labels).unwrap();
    let r = acc.report();
    assert!((r.top1 - 100.0 / 3.0).abs() < 1e-9);
    // Sample 3: label 0 ties with four other zeros for ranks 2-6, so it may or may not be in
    // the top 5; samples 1 and 2 certainly are.
    assert!(r.top5 >= 200.0 / 3.0 - 1e-9);
    assert_eq!(r.per_class[0], 50.0);
    assert_eq!(r.per_class[2], 0.0);
    assert_eq!(r.samples, 3);
}

// ---- training-set edits of hard teacher pools (classification::labels) ----

fn labelled(labels: &[i64]) -> mtkd_vision_tasks::data::ImageSet {
    let n = labels.len();
    let images = ndarray::Array4::<u8>::from_shape_fn((n, 1, 2, 2), |(i, _, _, _)| i as u8);
    mtkd_vision_tasks::data::ImageSet::new(images, labels.to_vec(), 10).unwrap()
}

#[test]
fn label_edits_select_classes_flip_permute_and_add_noise() {
    use mtkd_vision_tasks::classification::labels::{apply, derangement, LabelEdits};
    let truth: Vec<i64> = (0..2000).map(|i| (i * 7 % 10) as i64).collect();
    let set = labelled(&truth);

    // A class subset keeps the samples (and their images) of those classes, in order; the data
    // subset is seeded and stratified (each class keeps its share).
    let (sub, rep) = apply(
        &set,
        &LabelEdits {
            classes: Some(vec![2, 5]),
            subset: Some(150),
            ..Default::default()
        },
        1,
    )
    .unwrap();
    assert_eq!(rep.samples, 150);
    assert_eq!(rep.changed, 0);
    assert!(sub.labels.iter().all(|&y| y == 2 || y == 5));
    assert_eq!(sub.labels.iter().filter(|&&y| y == 2).count(), 75);
    assert_eq!(sub.labels.iter().filter(|&&y| y == 5).count(), 75);

    // Pair flips swap exactly those labels.
    let (f, _) = apply(
        &set,
        &LabelEdits {
            flip_pairs: vec![[0, 6]],
            ..Default::default()
        },
        1,
    )
    .unwrap();
    for (a, b) in truth.iter().zip(&f.labels) {
        let want = match a {
            0 => 6,
            6 => 0,
            y => *y,
        };
        assert_eq!(*b, want);
    }

    // A permutation without fixed points changes every label, deterministically per seed.
    let p = derangement(10, 7);
    assert!(p.iter().enumerate().all(|(i, &v)| i != v));
    let mut sorted = p.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_eq!(p, derangement(10, 7));
    let (q, rep) = apply(
        &set,
        &LabelEdits {
            permute: true,
            ..Default::default()
        },
        7,
    )
    .unwrap();
    assert_eq!(rep.changed, truth.len());
    assert_eq!(rep.permutation.as_deref(), Some(&p[..]));
    assert!(q
        .labels
        .iter()
        .zip(&truth)
        .all(|(a, b)| *a == p[*b as usize] as i64));

    // Symmetric noise at 60%: about 60% drawn uniformly, so about 54% changed.
    let noisy = |seed| {
        apply(
            &set,
            &LabelEdits {
                noise: 0.6,
                ..Default::default()
            },
            seed,
        )
        .unwrap()
    };
    let (n1, rep) = noisy(3);
    let share = rep.changed as f64 / truth.len() as f64;
    assert!((0.49..0.59).contains(&share), "{share}");
    assert_eq!(n1.labels, noisy(3).0.labels);
    assert_ne!(n1.labels, noisy(4).0.labels);

    // Bad edits are errors naming the field.
    for (e, field) in [
        (
            LabelEdits {
                classes: Some(vec![11]),
                ..Default::default()
            },
            "classes",
        ),
        (
            LabelEdits {
                flip_pairs: vec![[1, 2], [2, 3]],
                ..Default::default()
            },
            "flip_pairs",
        ),
        (
            LabelEdits {
                noise: -0.1,
                ..Default::default()
            },
            "label_noise",
        ),
    ] {
        let err = apply(&set, &e, 0).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}

#[test]
fn a_bad_label_names_the_file_and_the_sample() {
    let dir = scratch("badlabel");
    // IDX: 3 images of 2x2 and labels 0, 12, 1 for a 10-class set.
    let mut img = vec![0u8, 0, 8, 3];
    for d in [3u32, 2, 2] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend_from_slice(&[0u8; 12]);
    let mut lab = vec![0u8, 0, 8, 1];
    lab.extend_from_slice(&3u32.to_be_bytes());
    lab.extend_from_slice(&[0, 12, 1]);
    std::fs::write(dir.join("i-idx3-ubyte"), &img).unwrap();
    std::fs::write(dir.join("l-idx1-ubyte"), &lab).unwrap();
    let err = data::read_idx_pair(&dir.join("i-idx3-ubyte"), &dir.join("l-idx1-ubyte"), 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("l-idx1-ubyte") && err.contains("sample 1 has label 12"),
        "{err}"
    );
    // CIFAR-10: the second record's label is 11.
    let mut bin = Vec::new();
    for label in [3u8, 11] {
        bin.push(label);
        bin.extend_from_slice(&[0u8; 3072]);
    }
    std::fs::write(dir.join("data_batch_1.bin"), &bin).unwrap();
    let err = data::read_cifar_files(&[dir.join("data_batch_1.bin")], 1, 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("record 1 has label 11"),
        "{err}"
    );
}

/// A dense specialist's training set (docs/METHOD.md section 12): the other classes lose their
/// annotations (mask pixels become background, objects are dropped), every image stays, and a
/// classification set is refused.
#[test]
fn keep_classes_unannotates_the_other_classes_of_dense_sets() {
    use mtkd_vision_tasks::data::{Annotations, ImageSet};
    use mtkd_vision_tasks::objects::{Object, IGNORE};
    use ndarray::{Array3, Array4};

    let images = Array4::<u8>::zeros((2, 1, 2, 3));
    let mut s = ImageSet::new(images.clone(), vec![1, 3], 4).unwrap();
    let masks =
        Array3::from_shape_vec((2, 2, 3), vec![0, 1, 2, 3, IGNORE, 1, 3, 3, 0, 2, 2, 2]).unwrap();
    s.annotations = Annotations::Masks(masks);
    let (kept, changed) = s.keep_classes(&[1, 3], false).unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(changed, 4, "the four pixels of class 2");
    assert_eq!(
        kept.annotations
            .masks()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 1, 0, 3, IGNORE, 1, 3, 3, 0, 0, 0, 0]
    );
    // `others = "ignore"`: the same pixels become unlabelled instead of background.
    let (kept, changed) = s.keep_classes(&[1, 3], true).unwrap();
    assert_eq!(changed, 4);
    assert_eq!(
        kept.annotations
            .masks()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 1, IGNORE, 3, IGNORE, 1, 3, 3, 0, IGNORE, IGNORE, IGNORE]
    );

    let mut d = ImageSet::new(images.clone(), vec![0, 2], 3).unwrap();
    let ob = |class| Object {
        class,
        bbox: [0.0, 0.0, 1.0, 1.0],
        area: 1.0,
    };
    d.annotations =
        Annotations::Objects(vec![vec![ob(0), ob(2), ob(0)], vec![ob(2), ob(2), ob(1)]]);
    let err = d.keep_classes(&[1, 2], true).unwrap_err().to_string();
    assert!(err.contains("no ignore regions"), "{err}");
    let (kept, changed) = d.keep_classes(&[1, 2], false).unwrap();
    assert_eq!(changed, 2);
    let objs = kept.annotations.objects().unwrap();
    assert_eq!(objs[0].iter().map(|o| o.class).collect::<Vec<_>>(), [2]);
    assert_eq!(objs[1].len(), 3);
    assert_eq!(
        kept.labels,
        vec![2, 2],
        "image labels follow the kept objects"
    );

    let c = ImageSet::new(images, vec![0, 1], 2).unwrap();
    assert!(c.keep_classes(&[0], false).is_err());
}

/// A dense teacher with swapped classes (docs/METHOD.md section 12): the pixels or objects of
/// each pair trade classes, unlabelled pixels and boxes stay, image labels follow; bad pairs and
/// classification sets are refused.
#[test]
fn swap_classes_trades_the_classes_of_each_pair_in_dense_sets() {
    use mtkd_vision_tasks::data::{Annotations, ImageSet};
    use mtkd_vision_tasks::objects::{Object, IGNORE};
    use ndarray::{Array3, Array4};

    let images = Array4::<u8>::zeros((2, 1, 2, 3));
    let mut s = ImageSet::new(images.clone(), vec![1, 3], 5).unwrap();
    let masks =
        Array3::from_shape_vec((2, 2, 3), vec![0, 1, 2, 3, IGNORE, 1, 3, 3, 0, 2, 4, 4]).unwrap();
    s.annotations = Annotations::Masks(masks);
    let (sw, changed) = s.swap_classes(&[[1, 3]]).unwrap();
    assert_eq!(changed, 5, "two pixels of class 1, three of class 3");
    assert_eq!(
        sw.annotations
            .masks()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 3, 2, 1, IGNORE, 3, 1, 1, 0, 2, 4, 4]
    );
    assert_eq!(
        sw.labels,
        vec![3, 1],
        "the most frequent foreground class after the swap"
    );
    // Swapping twice gives the set back.
    let (back, _) = sw.swap_classes(&[[3, 1]]).unwrap();
    assert_eq!(back.annotations.masks(), s.annotations.masks());
    for bad in [
        vec![[1, 1]],
        vec![[1, 5]],
        vec![[1, 2], [2, 3]],
        vec![[0, 1]],
    ] {
        let e = s.swap_classes(&bad).unwrap_err().to_string();
        assert!(e.contains("flip_pairs"), "{e}");
    }
    // Image labels are recomputed, ties to the smaller class: a tie of classes 1 and 2 is
    // labelled 1, and after 1 <-> 4 it is a tie of 2 and 4, labelled 2 (not 4).
    let mut tie = ImageSet::new(Array4::<u8>::zeros((1, 1, 1, 3)), vec![1], 5).unwrap();
    tie.annotations = Annotations::Masks(Array3::from_shape_vec((1, 1, 3), vec![1, 2, 0]).unwrap());
    assert_eq!(tie.swap_classes(&[[1, 4]]).unwrap().0.labels, vec![2]);

    let mut d = ImageSet::new(images.clone(), vec![0, 2], 3).unwrap();
    let ob = |class, x| Object {
        class,
        bbox: [x, 0.0, x + 1.0, 1.0],
        area: 1.0,
    };
    d.annotations = Annotations::Objects(vec![
        vec![ob(0, 0.0), ob(2, 1.0), ob(0, 2.0)],
        vec![ob(2, 0.0), ob(2, 1.0), ob(1, 2.0)],
    ]);
    let (sw, changed) = d.swap_classes(&[[0, 2]]).unwrap();
    assert_eq!(changed, 5);
    let objs = sw.annotations.objects().unwrap();
    assert_eq!(
        objs[0].iter().map(|o| o.class).collect::<Vec<_>>(),
        [2, 0, 2]
    );
    assert_eq!(
        objs[1].iter().map(|o| o.class).collect::<Vec<_>>(),
        [0, 0, 1]
    );
    assert_eq!(
        objs[0].iter().map(|o| o.bbox[0]).collect::<Vec<_>>(),
        [0.0, 1.0, 2.0],
        "boxes stay where they are"
    );
    assert_eq!(sw.labels, vec![2, 0]);

    let c = ImageSet::new(images, vec![0, 1], 2).unwrap();
    assert!(c.swap_classes(&[[0, 1]]).is_err());
}
