// The CPU extension's Python bindings (pybind: a torch.library custom op would add ~10 us per call,
// a large share of a decode step of a small model). Built by tandem/kernels/cpu.py.
#include <torch/extension.h>

#include "thread_pool.h"

torch::Tensor ggml_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                          const torch::Tensor& m);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor tables,
                           torch::Tensor lengths);
torch::Tensor fused_layer(torch::Tensor x, torch::Tensor norm1, torch::Tensor norm2, double eps,
                           std::vector<torch::Tensor> qkv_w, std::vector<torch::Tensor> o_w,
                           std::vector<torch::Tensor> gate_up_w, std::vector<torch::Tensor> down_w,
                           torch::Tensor cos, torch::Tensor sin, torch::Tensor k_pool, torch::Tensor v_pool,
                           torch::Tensor slots, torch::Tensor tables, torch::Tensor row_table, torch::Tensor first,
                           torch::Tensor end, int64_t H, int64_t Hkv, std::vector<torch::Tensor> lora);
void lora_add(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
              const std::vector<int64_t>& part_ends, const torch::Tensor& order, const torch::Tensor& runs,
              const torch::Tensor& scaling);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor tables,
                              torch::Tensor row_table, torch::Tensor first, torch::Tensor end);

// Every kernel releases the GIL while it runs (as torch's own ops do): a worker's gRPC threads
// stream tokens and take requests while its engine thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using release = py::call_guard<py::gil_scoped_release>;
  module.def("ggml_linear", &ggml_linear, release(),
             "x (M, K) f32 @ packed GGML blocks (qs (N/16, K/32, 4|8, 16, 4) u8, d, m (N/16, K/32, 16) f16)^T -> (M, N) f32");
  module.def("set_num_threads", [](int n) { tandem::ThreadPool::get().set_threads(n); },
             "threads each kernel uses, the caller's included (0: the CPU count, the default)");
  module.def("num_threads", [] { return tandem::ThreadPool::get().threads(); });
  module.def("rms_norm", &rms_norm, release(), "x (M, K) f32, w (K,) f32, eps -> (M, K) f32");
  module.def("paged_decode", &paged_decode, release(),
             "q (B, H, D), k/v pools (blocks, block_size, Hkv, D), tables (B, max_blocks), lengths (B,) -> (B, H, D)");
  module.def("paged_attention", &paged_attention, release(),
             "q (N, H, D), k/v pools, tables (R, max_blocks), row_table, first, end (N,): row n over keys [first, end)");
  module.def("fused_layer", &fused_layer, release(),
             "a Llama decoder layer over a flat batch with GGML projections (and the step's LoRA adapters)");
  module.def("lora_add", &lora_add, release(),
             "y (N, O) += scaling[s] (x A[s]^T) B[s]^T by part for the tokens order[b:e] of each run (s, b, e)");
}
