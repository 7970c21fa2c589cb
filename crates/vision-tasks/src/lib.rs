//! mtkd-vision-tasks: what is specific to a vision task — datasets, transforms, batch loading,
//! task losses and metrics, and the [`task::Task`] trait through which the engine's loop sees
//! them: classification, semantic segmentation and object detection (see
//! docs/ARCHITECTURE.md, "Tasks").

pub mod classification;
pub mod data;
pub mod detection;
pub mod error;
pub mod kind;
pub mod loader;
pub mod objects;
pub mod segmentation;
pub mod source;
pub mod task;
pub mod transform;

pub use error::{Error, Result};
