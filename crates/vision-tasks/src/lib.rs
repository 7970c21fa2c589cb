//! mtkd-vision-tasks: what is specific to a vision task — datasets, transforms, batch loading,
//! task losses and metrics. Classification is built; segmentation and detection plug in beside it
//! (see docs/ARCHITECTURE.md, "Tasks").

pub mod classification;
pub mod data;
pub mod error;
pub mod loader;
pub mod transform;

pub use error::{Error, Result};
