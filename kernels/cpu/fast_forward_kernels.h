// The per-task bodies of the CPU fast forward, compiled once per instruction set
// (fast_forward_avx512.cc, fast_forward_avx2.cc with AVX2+FMA, fast_forward_generic.cc for any
// x86-64) and picked at run time from the CPU's features, so the build itself never assumes more
// than x86-64.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mmdit::cpu_fast {

// One stream (x or context) of one layer, pointing into weights the forward owns. Linear
// weights are stored transposed, [in, out].
struct StreamParams {
  const float* qkv_w;       // [D, 3D]
  const float* qkv_b;       // [3D]
  const float* rms_q;       // [D]
  const float* rms_k;       // [D]
  const float* out_w;       // [D, D]
  const float* out_b;       // [D]
  const float* out_rms;     // [D]
  const float* mlp_up_w;    // [D, F]
  const float* mlp_up_b;    // [F]
  const float* mlp_down_w;  // [F, D]
  const float* mlp_down_b;  // [D]
};

struct ModelParams {
  int dim = 0, num_heads = 0, head_dim = 0, dim_feedforward = 0, num_layers = 0;
  std::vector<StreamParams> streams;  // [layer * 2 + stream], stream 0 = x, 1 = context
  const float* rope_cos = nullptr;    // [max_seq_len, head_dim / 2]
  const float* rope_sin = nullptr;
  float q_scale = 0;                  // head_dim^-0.5 * log2(e): softmax runs on exp2
};

// Keys are processed in blocks of this many; K and V rows are padded to a multiple of it.
inline constexpr int kKeyBlock = 16;
// Attention tasks split a head's queries on multiples of this (the largest micro-tile).
inline constexpr int kQueryTile = 8;

// One sample's place in the batch and its attention workspace.
struct SampleWork {
  int seq_len = 0, context_len = 0, tokens = 0, tokens_padded = 0;  // L, C, T = L + C, Tpad
  int64_t start_pos = 0;
  const float* x = nullptr;        // [L, D] input
  const float* context = nullptr;  // [C, D]
  float* x_res = nullptr;          // [L, D] residual stream (the caller's x_out)
  float* context_res = nullptr;    // [C, D] (the caller's context_out)
  const float* modulation = nullptr;  // [N, 2, 6D]
  float* q = nullptr;    // [H, T, Dh]     x tokens then context tokens, pre-scaled by q_scale
  float* k = nullptr;    // [H, Tpad, Dh]
  float* v = nullptr;    // [H, Tpad, Dh]
  float* att = nullptr;  // [T, D]         attention output, heads merged
  // Key visibility (nonzero = visible), rows of Tpad bytes with zeros past T. Without a mask
  // every query uses `visible_all`; with one, x query i uses visible_x + i * Tpad and every
  // context query uses visible_context.
  bool masked = false;
  const uint8_t* visible_all = nullptr;
  const uint8_t* visible_x = nullptr;
  const uint8_t* visible_context = nullptr;
};

// Rows [row0, row0 + rows) of one stream of one sample: finishes layer `layer_done` (output
// projection, gated residual, MLP; skipped when -1, where the input is copied in instead), then
// starts layer `layer_next` (LayerNorm + modulation, QKV, RMSNorm + RoPE, scatter for attention;
// skipped when it equals num_layers). `scratch` holds at least ScratchFloats(model, rows).
struct RowTask {
  SampleWork* sample;
  int stream;
  int row0, rows;
  int layer_done, layer_next;
};

// Queries [query0, query0 + queries) of one head of one sample, over all its keys. Needs
// head_dim * tokens_padded floats of scratch (the head's keys, transposed).
struct AttentionTask {
  SampleWork* sample;
  int head;
  int query0, queries;
};

size_t ScratchFloats(const ModelParams& model, int rows);

// Row-major C[m, n] = A[m, k] · Wt[k, n] (a Linear weight transposed); single-threaded BLAS.
void Gemm(int m, int n, int k, const float* a, const float* w_t, float* c);

struct Kernels {
  void (*run_rows)(const ModelParams& model, const RowTask& task, float* scratch);
  void (*run_attention)(const ModelParams& model, const AttentionTask& task, float* scratch);
  // modulation[s] = W · silu(y[s]) + b for `samples` rows of y (D each) into [samples, out].
  void (*silu_rows)(const float* in, int n, float* out);
  const char* name;
};

namespace avx512 {
extern const Kernels kKernels;
}
namespace avx2 {
extern const Kernels kKernels;
}
namespace generic {
extern const Kernels kKernels;
}

}  // namespace mmdit::cpu_fast
