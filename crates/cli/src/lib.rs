//! mtkd-cli: the applications on top of the engine. The `mtkd` binary (argument parsing,
//! progress bars, logs, signals), the orchestration of a comparison ([`compare`]: one config,
//! many strategies and seeds, one table) and the use of a trained student ([`inference`]:
//! `mtkd eval` and `mtkd predict` for every task, through the engine's own evaluation) and the
//! data-parallel scaling report ([`scaling`]).

pub mod compare;
pub mod inference;
pub mod scaling;
