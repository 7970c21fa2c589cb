//! mtkd-distill-core: the shared vocabulary of multi-teacher distillation.
//!
//! - [`ModelOutput`] and the [`Teacher`] trait: what every network (teacher or student) gives.
//! - [`loss`]: cross-entropy, temperature KL and feature MSE, all per sample.
//! - [`signals`]: the detached per-sample, per-teacher signals a weighting strategy sees.
//! - [`weighting`]: the [`weighting::WeightingStrategy`] trait and the simple strategies.
//! - [`baselines`] and [`mmkd`]: the baseline weighting strategies of the comparison table.
//! - [`adapter`]: the trainable projector from the student's feature map to a teacher's.
//!
//! Every other library crate depends on this one and on no other workspace crate.

pub mod adapter;
pub mod baselines;
pub mod error;
pub mod loss;
pub mod mmkd;
pub mod signals;
pub mod weighting;

pub use error::{Error, Result};

use tch::Tensor;

/// What a network returns for a batch.
///
/// # Shapes
/// - `logits`: `[B, K]` for classification.
/// - `features`: the last convolutional feature map `[B, C, H, W]`, when the network exposes it.
#[derive(Debug)]
pub struct ModelOutput {
    pub logits: Tensor,
    pub features: Option<Tensor>,
}

impl ModelOutput {
    /// The global-average-pooled embedding `[B, C]` of the feature map.
    pub fn embedding(&self) -> Option<Tensor> {
        self.features
            .as_ref()
            .map(|f| f.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }

    /// A copy detached from the autograd graph.
    pub fn detach(&self) -> ModelOutput {
        ModelOutput {
            logits: self.logits.detach(),
            features: self.features.as_ref().map(Tensor::detach),
        }
    }
}

/// The number format a teacher computes in. Its outputs reach the losses as float32 either way.
///
/// `Bf16`: weights, activations and the input in bfloat16 (8 bits of mantissa). On a CPU with
/// native bfloat16 (AVX512-BF16 or AMX) and on recent GPUs the forward pass is about twice as
/// fast; elsewhere libtorch emulates it and it is many times slower (docs/PERF.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    /// The tensor kind the network computes in.
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::Fp32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }

    /// `images` in this precision (no copy when it already is).
    pub fn input(self, images: &Tensor) -> Tensor {
        if images.kind() == self.kind() {
            images.shallow_clone()
        } else {
            images.to_kind(self.kind())
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// `t` with channels-last strides (NHWC in memory, still indexed `[N, C, H, W]`): what
/// PyTorch's `contiguous(memory_format=torch.channels_last)` gives, made with a permuted copy
/// since tch has no memory-format argument. oneDNN's convolutions on the CPU prefer it.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether this machine's CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16, read from
/// `/proc/cpuinfo`; false where it cannot be read).
pub fn cpu_has_native_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.contains("avx512_bf16") || s.contains("amx_bf16"))
        .unwrap_or(false)
}

impl ModelOutput {
    /// The outputs as float32 (a teacher computing in another precision hands these on).
    pub fn into_float(self) -> ModelOutput {
        let f = |t: Tensor| {
            if t.kind() == tch::Kind::Float {
                t
            } else {
                t.to_kind(tch::Kind::Float)
            }
        };
        ModelOutput {
            logits: f(self.logits),
            features: self.features.map(f),
        }
    }
}

/// Shape of a feature map without the batch dimension: `(C, H, W)`.
pub type FeatureShape = (i64, i64, i64);

/// A frozen network whose outputs the student learns from.
///
/// Implementations run in evaluation mode and without gradient tracking; they are used through
/// this trait whatever their origin (a user's TorchScript file or a network trained by mtkd).
pub trait Teacher {
    /// A short name used in logs, errors and metrics.
    fn name(&self) -> &str;
    /// Number of classes of the logits.
    fn num_classes(&self) -> i64;
    /// Shape of the feature map, `None` for logits-only teachers.
    fn feature_shape(&self) -> Option<FeatureShape>;
    /// Forward a batch on the teacher's device; the result carries no gradient.
    fn forward(&self, images: &Tensor) -> Result<ModelOutput>;
}
