// Shared build script (included by each crate's build.rs): embeds libtorch's folder as an rpath
// and keeps `torch_cuda` linked, so binaries and tests run without LD_LIBRARY_PATH and use a GPU
// where one exists.
//
// `DEP_TCH_LIBTORCH_LIB` is exported by torch-sys (`links = "tch"`) to crates that depend on it
// directly, which is why every crate that runs libtorch code lists `torch-sys` itself.

include!("libtorch.rs");

fn main() {
    link_libtorch();
}
