//! mtkd-records: what a run records and how it is written. Epoch records, summaries and audits
//! ([`record`]), an evaluation's figures ([`metric::MetricReport`]), and [`fsio`], the one
//! atomic, fsynced writer every output goes through with the run-folder lock. Plain data and
//! files: no libtorch, so the report crate and tools build on it cheaply.

pub mod fsio;
pub mod metric;
pub mod picture;
pub mod record;
