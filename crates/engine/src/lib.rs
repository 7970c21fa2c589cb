//! mtkd-engine: the training engine (the `mtkd` binary is mtkd-cli's). It alone sees every other crate:
//! it resolves a [`config::Config`] into data, a student, a teacher pool, a weighting strategy
//! and an optimizer, and runs the loop in [`trainer`].

pub mod audit;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod doctor;
pub mod optim;
pub mod shared;
pub mod stop;
pub mod teacher_input;
pub mod trainer;

// Records, the atomic writer and the views of a run live in their own crates (no libtorch);
// their paths stay the engine's for the engine's own modules and for library users.
pub use mtkd_records::{fsio, record};
pub use mtkd_report::{html as report, plot};

pub use config::Config;
pub use trainer::{run, Observer, Outcome, RunOptions, Silent};
