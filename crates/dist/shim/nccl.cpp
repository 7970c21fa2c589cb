// The NCCL backend of mtkd-dist (cargo feature `nccl`): libtorch's own c10d::ProcessGroupNCCL
// over a c10d::TCPStore rendezvous, behind a C API that crates/dist/src/nccl_backend.rs calls.
// Tensors arrive as tch's `C_tensor` (a `torch::Tensor*`). Every collective is waited for (the
// current CUDA stream waits on NCCL's), and every C++ exception becomes an error string that
// the caller frees with mtkd_nccl_free_error.

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
};

char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception in the NCCL backend");
  }
  return 1;
}

}  // namespace

extern "C" {

// A process group of `world` ranks meeting at host:port (rank 0 hosts the store unless
// `client_only`, as under torchrun's agent store), on CUDA device `device`.
void* mtkd_nccl_new(const char* host, int port, int rank, int world, int device,
                    int timeout_s, int client_only, char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0 && client_only == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = client_only == 0;
    opts.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s) * 1000);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    // Under torchrun, one key space per restart attempt (as torch's rendezvous does), so that
    // a restarted job never reads the last attempt's NCCL ids.
    if (const char* attempt = std::getenv("TORCHELASTIC_RESTART_COUNT")) {
      store = c10::make_intrusive<c10d::PrefixStore>(
          std::string("/worker/attempt_") + attempt, store);
    }
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s) * 1000);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
    out = new Group{store, pg};
  });
  return out;
}

void mtkd_nccl_delete(void* group) { delete static_cast<Group*>(group); }

void mtkd_nccl_free_error(char* err) { std::free(err); }

// In place: the element-wise sum over ranks.
int mtkd_nccl_all_reduce_sum(void* group, at::Tensor* t, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    static_cast<Group*>(group)->pg->allreduce(ts, o)->wait();
  });
}

// `output` (world x the input's numel) receives every rank's `input`, in rank order.
int mtkd_nccl_all_gather(void* group, at::Tensor* output, at::Tensor* input, char** err) {
  return guarded(err, [&] {
    static_cast<Group*>(group)->pg->_allgather_base(*output, *input)->wait();
  });
}

// In place: rank `root`'s values.
int mtkd_nccl_broadcast(void* group, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Group*>(group)->pg->broadcast(ts, o)->wait();
  });
}

}  // extern "C"
