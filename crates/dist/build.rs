//! Build script: embed the libtorch rpath and keep torch_cuda linked (shared code).
include!("../../build-support/link_libtorch.rs");
