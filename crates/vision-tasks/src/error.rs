//! The error type of mtkd-vision-tasks.

use std::path::PathBuf;

/// Errors of datasets, loaders and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dataset file is missing or unreadable.
    /// (The cause is in the message and not chained as a source, so `{:#}` prints it once.)
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A dataset file exists but its content is not what the format says.
    #[error("{path} is not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// Inconsistent inputs (e.g. images and labels of different lengths).
    #[error("invalid dataset {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error(transparent)]
    Core(#[from] mtkd_distill_core::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias of mtkd-vision-tasks.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |error| Error::Io {
        path: path.to_path_buf(),
        error,
    }
}
