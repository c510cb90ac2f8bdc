// The adaLN modulation of all layers and both streams, for every sample of the batch, in one
// launch: mod[b][layer][stream][6D] = Linear_adaLN(silu(y_b)), as one matrix product
// silu(Y) [B x D] x W^T [D x N * 2 * 6D] whose output rows are exactly mod's layout.
// - bf16 mode: mma.sync with fp32 accumulation on operands split into bf16 hi and lo parts
//   (a_hi w_hi + a_hi w_lo + a_lo w_hi, ~16 bits of each operand): the modulation scales every
//   activation, and rounded to plain bf16 it raised the forward's error by 40 %. Weights in
//   fragment order (one 8-byte load per lane per n8 x k16 block). The fp32 kernel below took
//   80 us at B = 256 and ~10 us at B = 1, where it is the first kernel of the forward.
// - fp32-accurate: float32 FMAs, one thread per output for 16 samples at a time, so that each
//   weight is read from L2 once per 16 samples (0.1 % of the forward's FLOPs).
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

constexpr int kMmaSamples = 64;   // samples per CTA: 4 m16 tiles
constexpr int kMmaColumns = 128;  // outputs per CTA: 8 warps x 16
constexpr int kMmaThreads = 256;

template <int kD>
__global__ void __launch_bounds__(kMmaThreads) AdaLnMmaKernel(const AdaLnParams p) {
  constexpr int kAs = kD + 8;  // bf16 row stride of silu(y): conflict-free ldmatrix rows
  __shared__ __align__(16) __nv_bfloat16 as[2][kMmaSamples * kAs];  // hi, lo
  // No LaunchDependents: with it the first row kernel launches during this one (its prologue
  // overlapped), and each later kernel's CTAs in turn arrive early and wait resident. On an H100
  // that took B = 2 from 0.154 to 0.186 ms and B = 1 launched per kernel from 0.127 to 0.141
  // (docs/BENCHMARKS.md, fifteenth round).
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (p.progress != nullptr) {  // the forward's first kernel: every later one runs after it
    const int threads = gridDim.x * gridDim.y * kMmaThreads;
    for (int i = (blockIdx.y * gridDim.x + blockIdx.x) * kMmaThreads + threadIdx.x;
         i < p.progress_words; i += threads) {
      p.progress[i] = 0;
    }
  }
  const int b0 = blockIdx.y * kMmaSamples;
  const int ns = min(kMmaSamples, p.batch - b0);
  const int n_total = p.num_layers * 2 * 6 * kD;
  const int col0 = blockIdx.x * kMmaColumns + warp * 16;
  uint2 bf[2][kD / 16][2];  // hi, lo
  const uint2* wf = static_cast<const uint2*>(p.w_frag);
  // The bias with the weights: loaded in the store loop, the stores waited for its L2 trip after
  // the products.
  float2 bias[2];
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    bias[n] = __ldg(reinterpret_cast<const float2*>(p.b + col0 + 8 * n + 2 * t));
  }
  const size_t lo_offset = (size_t)n_total * kD / 4;  // uint2 per 4 values
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks)
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const size_t f = ((size_t)(col0 / 8 + n) * (kD / 16) + ks) * 32 + lane;
      bf[0][ks][n] = __ldg(wf + f);
      bf[1][ks][n] = __ldg(wf + lo_offset + f);
    }
  // Only the m-tiles that hold samples, padding rows as zeros: at B = 1 the 63 padding rows' SiLU
  // (a division of zero, on the slow path) was most of the kernel's 13 us. Every load of y is
  // issued before the first SiLU (one at a time, they were half of the stalls at B = 256).
  const int m_tiles = (ns + 15) / 16;  // CTA-uniform: a batch of one runs one m-tile
  constexpr int kQuads = kMmaSamples * kD / 4 / kMmaThreads;
  float4 y[kQuads];
#pragma unroll
  for (int j = 0; j < kQuads; ++j) {
    const int i = 4 * (threadIdx.x + j * kMmaThreads), s = i / kD;
    y[j] = s < ns ? __ldg(reinterpret_cast<const float4*>(p.y + (size_t)(b0 + s) * kD + i % kD))
                  : make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int j = 0; j < kQuads; ++j) {
    const int i = 4 * (threadIdx.x + j * kMmaThreads), s = i / kD, k = i % kD;
    if (s >= m_tiles * 16) break;
    const float in[4] = {y[j].x, y[j].y, y[j].z, y[j].w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      // Every column CTA computes the SiLU of its samples (SiluFast, mma.cuh).
      SplitBf16(s < ns ? SiluFast(in[e]) : 0.0f, as[0][s * kAs + k + e], as[1][s * kAs + k + e]);
    }
  }
  __syncthreads();
  float acc[kMmaSamples / 16][2][4] = {};
#pragma unroll
  for (int m = 0; m < kMmaSamples / 16; ++m) {
    if (m >= m_tiles) break;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const int off = (16 * m + (lane & 15)) * kAs + 16 * ks + (lane >> 4) * 8;
      uint32_t a_hi[4], a_lo[4];
      LdMatrixX4(a_hi, as[0] + off);
      LdMatrixX4(a_lo, as[1] + off);
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        MmaBf16(acc[m][n], a_lo, bf[0][ks][n].x, bf[0][ks][n].y);
        MmaBf16(acc[m][n], a_hi, bf[1][ks][n].x, bf[1][ks][n].y);
        MmaBf16(acc[m][n], a_hi, bf[0][ks][n].x, bf[0][ks][n].y);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMmaSamples / 16; ++m) {
    if (m >= m_tiles) break;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int col = col0 + 8 * n + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int s = 16 * m + g + 8 * h;
        if (s < ns) {
          *reinterpret_cast<float2*>(p.mod + (size_t)(b0 + s) * n_total + col) =
              make_float2(acc[m][n][2 * h] + bias[n].x, acc[m][n][2 * h + 1] + bias[n].y);
        }
      }
    }
  }
}

constexpr int kAdaLnSamples = 16;
constexpr int kAdaLnOutputs = 128;  // outputs (threads) per CTA

// fp32: one thread per output j of one (layer, stream) for up to 16 samples. The first version
// looped a 256-thread CTA over all 6D outputs: 24 CTAs at B = 1, 67 us, bound by the latency of its
// serial weight loads; this grid has 6x the CTAs and 8 to 32 loads in flight per thread.
__global__ void __launch_bounds__(kAdaLnOutputs) AdaLnKernel(const AdaLnParams p) {
  extern __shared__ __align__(16) float silu_y[];  // [D][kAdaLnSamples]: 4 float4 per weight
  LaunchDependents();
  const int ls = blockIdx.x;  // layer * 2 + stream
  const int j = blockIdx.y * kAdaLnOutputs + threadIdx.x;
  const int b0 = blockIdx.z * kAdaLnSamples;
  const int d = p.dim, n6 = 6 * p.dim;
  const int ns = min(kAdaLnSamples, p.batch - b0);
  for (int i = threadIdx.x; i < kAdaLnSamples * d; i += blockDim.x) {
    const int s = i / d, k = i % d;
    float v = 0.0f;  // padding: no SiLU of zero (a slow-path division)
    if (s < ns) {
      const float y = p.y[(size_t)(b0 + s) * d + k];
      v = y / (1.0f + expf(-y));
    }
    silu_y[k * kAdaLnSamples + s] = v;
  }
  __syncthreads();
  if (j >= n6) return;
  const float* w = p.w_t + (size_t)ls * d * n6 + j;
  const float bias = p.b[(size_t)ls * n6 + j];
  float* out = p.mod + ((size_t)b0 * p.num_layers * 2 + ls) * n6 + j;
  const size_t out_stride = (size_t)p.num_layers * 2 * n6;
  if (ns == 1) {
    float acc = 0.0f;
#pragma unroll 32
    for (int kk = 0; kk < d; ++kk) {
      acc = fmaf(__ldg(w + (size_t)kk * n6), silu_y[kk * kAdaLnSamples], acc);
    }
    out[0] = acc + bias;
    return;
  }
  float acc[kAdaLnSamples];
#pragma unroll
  for (int s = 0; s < kAdaLnSamples; ++s) acc[s] = 0.0f;
#pragma unroll 8
  for (int kk = 0; kk < d; ++kk) {
    const float wv = __ldg(w + (size_t)kk * n6);
    const float4* sy = reinterpret_cast<const float4*>(silu_y + kk * kAdaLnSamples);
#pragma unroll
    for (int q = 0; q < kAdaLnSamples / 4; ++q) {
      const float4 v = sy[q];  // a broadcast: every thread reads the same 16 bytes
      acc[4 * q] = fmaf(wv, v.x, acc[4 * q]);
      acc[4 * q + 1] = fmaf(wv, v.y, acc[4 * q + 1]);
      acc[4 * q + 2] = fmaf(wv, v.z, acc[4 * q + 2]);
      acc[4 * q + 3] = fmaf(wv, v.w, acc[4 * q + 3]);
    }
  }
#pragma unroll
  for (int s = 0; s < kAdaLnSamples; ++s) {
    if (s < ns) out[s * out_stride] = acc[s] + bias;
  }
}

}  // namespace

absl::Status LaunchAdaLn(const AdaLnParams& params, cudaStream_t stream) {
  if (params.batch == 0) return absl::OkStatus();
  if (AdaLnOnWgmma(params.w_images, params.batch)) {
    return LaunchAdaLnWgmma(params, stream);
  }
  const int n_total = params.num_layers * 2 * 6 * params.dim;
  if (params.w_frag != nullptr) {
    if ((params.dim != 64 && params.dim != 128) || n_total % kMmaColumns != 0) {
      return absl::UnimplementedError(absl::StrCat("no bf16 adaLN kernel for dim ", params.dim));
    }
    const dim3 grid(n_total / kMmaColumns, (params.batch + kMmaSamples - 1) / kMmaSamples);
    if (params.dim == 128) {
      AdaLnMmaKernel<128><<<grid, kMmaThreads, 0, stream>>>(params);
    } else {
      AdaLnMmaKernel<64><<<grid, kMmaThreads, 0, stream>>>(params);
    }
  } else {
    const dim3 grid(params.num_layers * 2, (6 * params.dim + kAdaLnOutputs - 1) / kAdaLnOutputs,
                    (params.batch + kAdaLnSamples - 1) / kAdaLnSamples);
    const size_t smem = sizeof(float) * kAdaLnSamples * params.dim;
    AdaLnKernel<<<grid, kAdaLnOutputs, smem, stream>>>(params);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace mmdit
