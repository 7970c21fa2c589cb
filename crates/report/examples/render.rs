//! Regenerate the views of finished run folders from their records: `report.html` (the audit
//! page) and the curve plots under `plots/` (`loss.png`, `accuracy.png` and, with teachers,
//! `teacher_weights.png`), with the code of this build. Useful after a change to the page or the
//! charts, to look at the result on real runs without training again.
//!
//! ```text
//! cargo run -p mtkd-report --example render -- RUN_DIR...
//! ```
//! Each `RUN_DIR` needs `metrics.jsonl` and `summary.json` (`config.toml`, `audit.json` and the
//! sibling runs are read when present, as `mtkd` reads them). The files are overwritten in place:
//! run it on a copy to keep the originals. The other plots (`overlays.png`, `boxes.png`,
//! `class_*.png`) need the model and the data, so they are left as they are.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    anyhow::ensure!(
        !dirs.is_empty(),
        "usage: cargo run -p mtkd-report --example render -- RUN_DIR..."
    );
    for dir in &dirs {
        let inputs = mtkd_report::html::load(dir)?;
        let teachers = inputs.teacher_names();
        mtkd_report::plot::plot_run(&dir.join("plots"), &inputs.metrics, &teachers)?;
        let page = mtkd_report::html::write_report(dir)?;
        println!("{}", page.display());
    }
    Ok(())
}
