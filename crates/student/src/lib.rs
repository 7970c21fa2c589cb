//! mtkd-student: student architectures with feature taps (last feature map, pooled embedding,
//! logits), built on `tch::nn` with PyTorch `state_dict` parameter names, plus weight files
//! and the frozen-network [`NativeTeacher`] wrapper that lets a network trained by mtkd teach.

pub mod arch;
pub mod head;
pub mod layers;
mod mobilenetv2;
mod resnet;
mod shufflenetv2;
mod small;
mod teacher;
mod wrn;

pub use arch::{Arch, Network};
pub use head::HeadKind;
pub use mtkd_distill_core::to_channels_last;
pub use teacher::NativeTeacher;

/// Errors of the student crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown architecture `{name}`; known: {known}")]
    UnknownArch { name: String, known: String },
    #[error("cannot {action} weights {path}: {source}")]
    Weights {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: tch::TchError,
    },
    /// A weights file that does not fit the network it is loaded into (checked before
    /// libtorch is asked, whose own refusal is a C++ backtrace).
    #[error("{path}{reason}")]
    WeightsMismatch {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("teacher `{name}` cannot run in {precision}: {reason}")]
    Precision {
        name: String,
        precision: String,
        reason: String,
    },
    #[error(transparent)]
    Core(#[from] mtkd_distill_core::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias of the student crate.
pub type Result<T> = std::result::Result<T, Error>;
