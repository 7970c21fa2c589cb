//! mtkd-report: the views of a run's records. [`html`] writes a run folder's self-contained
//! audit page (`report.html`), [`plot`] its PNG plots (accuracy curves, teacher weights,
//! segmentation overlays, detection boxes, per-class bars), [`bench`] the performance report's
//! markdown (`docs/PERF.md`) from the raw timings. It reads records and writes files; it never
//! trains or runs a model, and builds without libtorch.

pub mod bench;
pub mod html;
pub mod plot;
