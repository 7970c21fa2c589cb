//! Load a TorchScript teacher (or an exported student) with `mtkd-teachers` and classify image
//! files: what a program that depends on this crate alone does.
//!
//! ```text
//! cargo run --release -p mtkd-teachers --example classify -- MODEL.pt IMAGE... \
//!     [--channels 3] [--size 32] [--mean 0.5,0.5,0.5] [--std 0.25,0.25,0.25] [--classes 10]
//! ```
//! Images are resized to `size x size`, converted to `channels`, scaled to [0, 1] and
//! normalised with `mean`/`std`, which is how the model's training data must have been made.

use std::path::PathBuf;

use mtkd_teachers::{Expectation, Teacher, TorchScriptTeacher};
use tch::{Device, Kind, Tensor};

fn floats(s: &str) -> Vec<f32> {
    s.split(',').filter_map(|v| v.trim().parse().ok()).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut channels, mut size, mut classes) = (3usize, 32u32, 10i64);
    let (mut mean, mut std) = (None, None);
    let mut files: Vec<PathBuf> = Vec::new();
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--channels" => channels = value()?.parse()?,
            "--size" => size = value()?.parse()?,
            "--classes" => classes = value()?.parse()?,
            "--mean" => mean = Some(floats(&value()?)),
            "--std" => std = Some(floats(&value()?)),
            _ => files.push(PathBuf::from(a)),
        }
    }
    if files.len() < 2 {
        return Err("usage: classify MODEL.pt IMAGE... [--channels C] [--size S] [--mean m,..] [--std s,..] [--classes K]".into());
    }
    let model = files.remove(0);
    let mean = mean.unwrap_or(vec![0.5; channels]);
    let std = std.unwrap_or(vec![0.25; channels]);
    let teacher = TorchScriptTeacher::load(
        "model",
        &model,
        Device::Cpu,
        &Expectation {
            input: (channels as i64, i64::from(size), i64::from(size)),
            num_classes: classes,
            needs_features: false,
            dense: false,
            det_locations: None,
        },
    )?;
    for f in &files {
        let img = image::open(f)?.resize_exact(size, size, image::imageops::FilterType::Triangle);
        let (pixels, c) = if channels == 1 {
            (img.to_luma8().into_raw(), 1)
        } else {
            (img.to_rgb8().into_raw(), 3)
        };
        // HWC bytes -> [1, C, H, W] floats in [0, 1], normalised per channel.
        let x = Tensor::from_slice(&pixels)
            .to_kind(Kind::Float)
            .view([i64::from(size), i64::from(size), c])
            .permute([2, 0, 1])
            .unsqueeze(0)
            / 255.0;
        let m = Tensor::from_slice(&mean).view([1, c, 1, 1]);
        let s = Tensor::from_slice(&std).view([1, c, 1, 1]);
        let out = teacher.forward(&((x - m) / s))?;
        let probs = out.logits.softmax(1, Kind::Float);
        let (p, i) = probs.topk(3.min(classes), 1, true, true);
        let p = Vec::<f32>::try_from(&p.flatten(0, -1))?;
        let i = Vec::<i64>::try_from(&i.flatten(0, -1))?;
        let top: Vec<String> = i
            .iter()
            .zip(&p)
            .map(|(c, p)| format!("class {c} {:.1}%", 100.0 * p))
            .collect();
        println!("{}: {}", f.display(), top.join(", "));
    }
    Ok(())
}
