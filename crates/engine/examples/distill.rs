//! Distil two teachers into a student with the engine as a library: a config built in code, the
//! teachers trained by mtkd (and cached), the run's folder written as `mtkd train` writes it.
//!
//! ```text
//! cargo run --release -p mtkd-engine --example distill -- DATA_DIR OUT_DIR
//! ```
//! `DATA_DIR` holds Fashion-MNIST's IDX files (e.g. the committed `data/fashion-mnist-mini`).

use std::path::PathBuf;

use mtkd_engine::{Config, Observer, RunOptions};

/// Prints each finished epoch (a program chooses what to show; the library prints nothing).
struct Print;
impl Observer for Print {
    fn phase(&mut self, message: &str) {
        eprintln!("{message}");
    }
    fn epoch_end(&mut self, r: &mtkd_engine::record::EpochRecord) {
        eprintln!(
            "epoch {}: test top-1 {:.2}%, teacher weights {:?}",
            r.epoch, r.test.value, r.teacher_weights
        );
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(data), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: distill DATA_DIR OUT_DIR");
    };
    let out = PathBuf::from(out);
    let text = format!(
        r#"
[run]
name = "library-example"
out_dir = "{out}"
teacher_cache = "{out}/teachers"
seed = 0

[data]
kind = "mnist"
root = "{data}"
train_subset = 1000
normalize = {{ mean = [0.2860], std = [0.3530] }}

[student]
arch = "cnn-small"

[train]
epochs = 1
batch_size = 64
lr = 0.05

[distill]
strategy = "mtkd-rl"
agent = {{ mode = "meta" }}

[[teachers]]
name = "small"
arch = "cnn-small"

[[teachers]]
name = "resnet8"
arch = "resnet8"

[teacher_training]
epochs = 1
batch_size = 64
lr = 0.05
"#,
        out = out.display()
    );
    let cfg = Config::parse(&text, std::path::Path::new("<example>"), &[])?;
    let dir = out.join("run");
    let outcome = mtkd_engine::run(&cfg, &dir, &RunOptions::default(), &mut Print)?;
    let s = &outcome.summary;
    println!(
        "student {}: test top-1 {:.2}% (strategy {}), folder {}",
        s.student,
        s.final_value,
        s.strategy,
        outcome.dir.display()
    );
    for t in &s.teachers {
        println!(
            "  teacher {}: {:.2}%",
            t.name,
            t.test_value.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
