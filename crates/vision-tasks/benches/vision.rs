//! Criterion benchmarks of the vision hot paths: class-aware NMS, COCO AP, and the loader's
//! epoch (augmentation, normalisation, batching) on a CIFAR-sized set.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ndarray::Array4;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use mtkd_vision_tasks::data::ImageSet;
use mtkd_vision_tasks::detection::boxes::batched_nms;
use mtkd_vision_tasks::detection::eval::{evaluate, DetBox, GtBox};
use mtkd_vision_tasks::loader::{BatchLoader, LoaderConfig};
use mtkd_vision_tasks::transform::{Augment, Normalize};

fn random_boxes(n: i64, side: f64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(0);
    let xy = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * side;
    let wh = Tensor::rand([n, 2], (Kind::Float, Device::Cpu)) * (side / 4.0) + 2.0;
    let boxes = Tensor::cat(&[&xy, &(&xy + &wh)], 1);
    let scores = Tensor::rand([n], (Kind::Float, Device::Cpu));
    let classes = Tensor::randint(10, [n], (Kind::Int64, Device::Cpu));
    (boxes, scores, classes)
}

fn coco_case(images: u64, per_image: usize) -> (Vec<GtBox>, Vec<DetBox>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut gts, mut dets) = (Vec::new(), Vec::new());
    for image in 0..images {
        for _ in 0..3 {
            let (x, y, w, h) = (
                rng.gen_range(0.0..30.0),
                rng.gen_range(0.0..30.0),
                rng.gen_range(8.0..18.0),
                rng.gen_range(8.0..18.0),
            );
            let category = rng.gen_range(0..10);
            gts.push(GtBox {
                image,
                category,
                bbox: [x, y, w, h],
                area: w * h,
            });
            for _ in 0..per_image / 3 {
                let jit: [f64; 4] = std::array::from_fn(|_| rng.gen_range(-3.0..3.0));
                let category = if rng.gen_bool(0.8) {
                    category
                } else {
                    rng.gen_range(0..10)
                };
                dets.push(DetBox {
                    image,
                    category,
                    bbox: [x + jit[0], y + jit[1], w + jit[2], h + jit[3]],
                    score: rng.gen_range(0.05..1.0),
                });
            }
        }
    }
    (gts, dets)
}

fn bench(c: &mut Criterion) {
    tch::set_num_threads(1);
    let mut g = c.benchmark_group("vision-tasks");
    for n in [1000i64, 5000] {
        let (b, s, k) = random_boxes(n, 48.0);
        g.bench_with_input(BenchmarkId::new("batched_nms", n), &n, |bch, _| {
            bch.iter(|| batched_nms(&b, &s, &k, 0.6).unwrap())
        });
    }
    let (gts, dets) = coco_case(300, 30);
    g.bench_function("coco_ap_300_images", |bch| {
        bch.iter(|| evaluate(&gts, &dets, 10))
    });
    // The loader: 2,048 CIFAR-sized images, crop + flip + normalise, batches of 64.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n = 2048usize;
    let pixels: Vec<u8> = (0..n * 3 * 32 * 32).map(|_| rng.gen()).collect();
    let images = Array4::from_shape_vec((n, 3, 32, 32), pixels).unwrap();
    let labels = (0..n).map(|i| (i % 100) as i64).collect();
    let set = std::sync::Arc::new(ImageSet::new(images, labels, 100).unwrap());
    let loader = BatchLoader::new(
        set,
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            drop_last: false,
            augment: Some(Augment {
                crop_padding: 4,
                hflip: true,
                ..Default::default()
            }),
            eval_resize: None,
            normalize: Normalize {
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            },
            seed: 0,
        },
    )
    .unwrap();
    g.sample_size(10);
    g.bench_function("loader_epoch_2048_cifar_images", |bch| {
        bch.iter(|| loader.epoch(0, 0, Device::Cpu).count())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
