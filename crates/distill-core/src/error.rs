//! The error type of mtkd-distill-core.

/// Errors of the distillation core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor did not have the shape an operation needs.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        what: String,
        expected: String,
        got: String,
    },
    /// A configuration value is outside what the operation accepts.
    #[error("invalid value for {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// A loss or signal became NaN or infinite.
    #[error("non-finite value in {what}")]
    NonFinite { what: String },
    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result alias of mtkd-distill-core.
pub type Result<T> = std::result::Result<T, Error>;

/// Check that `t` has exactly `expected` dimensions (`-1` matches any size).
pub fn check_shape(what: &str, t: &tch::Tensor, expected: &[i64]) -> Result<()> {
    let got = t.size();
    let ok = got.len() == expected.len() && got.iter().zip(expected).all(|(g, e)| *e < 0 || g == e);
    if ok {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what: what.to_owned(),
            expected: format!("{expected:?}"),
            got: format!("{got:?}"),
        })
    }
}
