//! mtkd-engine: the training engine and the `mtkd` binary. It alone sees every other crate:
//! it resolves a [`config::Config`] into data, a student, a teacher pool, a weighting strategy
//! and an optimizer, and runs the loop in [`trainer`].

pub mod audit;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod dataset;
pub mod doctor;
pub mod fsio;
pub mod inference;
pub mod optim;
pub mod plot;
pub mod record;
pub mod report;
pub mod shared;
pub mod stop;
pub mod teacher_input;
pub mod trainer;

pub use config::Config;
pub use trainer::{run, Observer, Outcome, RunOptions, Silent};
