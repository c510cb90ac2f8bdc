// Joint attention for head dim 16, one CTA per (query tile, head): the fp32-accurate mode's
// kernel, and bf16's comparison kernel (attention_bf16.cu has bf16's default).
//
// Each warp owns 16 queries and streams
// every key of the sample (x keys, then context keys) in blocks of 64 through shared memory with
// an online softmax in exp2 (the Dh^-0.5 * log2 e scale folded in). With Dh = 16, Q K^T is one
// k-step of the tensor cores per 8 keys and the scores stay in registers, where their
// accumulator layout is the A operand of P V (FlashAttention-2's trick). The mask travels as bits.
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

// Keys per trip through shared memory: 4 blocks per barrier pair in bf16; 2 in fp32, whose K
// and V are stored split (tf32 hi and lo planes, split once by the loading thread instead of by
// each of the 8 warps that read them).
template <Precision P>
__host__ __device__ constexpr int StageKeys() { return P == Precision::kBf16 ? 256 : 128; }
constexpr int kKStride = 24;     // conflict-free K fragment loads (see mma.cuh)

// A warp per 16 queries. Three 256-thread CTAs per SM (80 registers), except fp32 with 64-query
// tiles (small batches), which keeps the registers it wants (161; B = 1 13.4 us per launch at 80
// registers and 72 bytes of spill against 11.0). fp32 with 128-query tiles at one CTA per SM had
// 18 % occupancy; at three, B = 256 takes 195 us per launch instead of 263 (H100).
template <Precision P, int kTileQueries>
__global__ void __launch_bounds__(P == Precision::kFp32 ? 2 * kTileQueries : 256,
                                  P == Precision::kFp32 && kTileQueries == 64 ? 1 : 3)
    AttentionKernel(const AttentionParams p) {
  using T = typename Prec<P>::T;
  constexpr int kStageKeys = StageKeys<P>();
  constexpr int kVStride = kStageKeys + 8;  // V^T rows, conflict-free for bf16 and float
  constexpr int kPlanes = P == Precision::kBf16 ? 1 : 2;
  __shared__ __align__(16) T ks[kPlanes * kStageKeys * kKStride];
  __shared__ __align__(16) T vt[kPlanes * kHeadDim * kVStride];
  // fp32: the lo planes follow the hi planes.
  const uint32_t* ks_u = reinterpret_cast<const uint32_t*>(ks);
  const uint32_t* vt_u = reinterpret_cast<const uint32_t*>(vt);
  constexpr int kKsLo = kStageKeys * kKStride, kVtLo = kHeadDim * kVStride;

  LaunchDependents();
  const AttnTile tile = p.tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int L = tile.seq_len, num_keys = tile.num_keys;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int r0 = tile.q0 + warp * 16 + g, r1 = r0 + 8;
  const bool active = tile.q0 + warp * 16 < num_keys;  // warp-uniform
  const int rr0 = min(r0, num_keys - 1), rr1 = min(r1, num_keys - 1);
  const size_t base = (size_t)tile.tok_off * p.dim + head * kHeadDim;
  const T* q = static_cast<const T*>(p.q) + base;
  const T* k = static_cast<const T*>(p.k) + base;
  const T* v = static_cast<const T*>(p.v) + base;
  const uint32_t* mask = tile.mask_off >= 0 ? p.mask_bits + tile.mask_off : nullptr;

  WaitForPredecessor();
  uint32_t qa[4];
  uint32_t qhi[2][4], qlo[2][4];
  if constexpr (P == Precision::kBf16) {
    qa[0] = *reinterpret_cast<const uint32_t*>(q + (size_t)rr0 * p.dim + 2 * t);
    qa[1] = *reinterpret_cast<const uint32_t*>(q + (size_t)rr1 * p.dim + 2 * t);
    qa[2] = *reinterpret_cast<const uint32_t*>(q + (size_t)rr0 * p.dim + 2 * t + 8);
    qa[3] = *reinterpret_cast<const uint32_t*>(q + (size_t)rr1 * p.dim + 2 * t + 8);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 a0 = *reinterpret_cast<const float2*>(q + (size_t)rr0 * p.dim + 8 * h + 2 * t);
      const float2 a1 = *reinterpret_cast<const float2*>(q + (size_t)rr1 * p.dim + 8 * h + 2 * t);
      SplitTf32(a0.x, qhi[h][0], qlo[h][0]);
      SplitTf32(a1.x, qhi[h][1], qlo[h][1]);
      SplitTf32(a0.y, qhi[h][2], qlo[h][2]);
      SplitTf32(a1.y, qhi[h][3], qlo[h][3]);
    }
  }

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float o[2][4] = {};
  float osum[4] = {};  // bf16: row sums of P (every column alike): rows g (0, 1) and g + 8 (2, 3)
  constexpr int kVec = 16 / sizeof(T);
  for (int kstage = 0; kstage < num_keys; kstage += kStageKeys) {
    __syncthreads();
    for (int i = threadIdx.x; i < kStageKeys * kHeadDim / kVec; i += blockDim.x) {
      const int j = i / (kHeadDim / kVec), c = (i % (kHeadDim / kVec)) * kVec;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
      if (kstage + j < num_keys) {
        kv = *reinterpret_cast<const uint4*>(k + (size_t)(kstage + j) * p.dim + c);
        vv = *reinterpret_cast<const uint4*>(v + (size_t)(kstage + j) * p.dim + c);
      }
      if constexpr (P == Precision::kBf16) {
        *reinterpret_cast<uint4*>(ks + j * kKStride + c) = kv;
        const T* ve = reinterpret_cast<const T*>(&vv);
#pragma unroll
        for (int e = 0; e < kVec; ++e) vt[(c + e) * kVStride + j] = ve[e];
      } else {
        uint32_t* ku = reinterpret_cast<uint32_t*>(ks);
        uint32_t* vu = reinterpret_cast<uint32_t*>(vt);
        const float* ke = reinterpret_cast<const float*>(&kv);
        const float* ve = reinterpret_cast<const float*>(&vv);
        uint4 khi, klo;
        SplitTf32(ke[0], khi.x, klo.x);
        SplitTf32(ke[1], khi.y, klo.y);
        SplitTf32(ke[2], khi.z, klo.z);
        SplitTf32(ke[3], khi.w, klo.w);
        *reinterpret_cast<uint4*>(ku + j * kKStride + c) = khi;
        *reinterpret_cast<uint4*>(ku + kKsLo + j * kKStride + c) = klo;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          uint32_t hi, lo;
          SplitTf32(ve[e], hi, lo);
          vu[(c + e) * kVStride + j] = hi;
          vu[kVtLo + (c + e) * kVStride + j] = lo;
        }
      }
    }
    __syncthreads();
    if (!active) continue;
  for (int kb = kstage; kb < min(num_keys, kstage + kStageKeys); kb += kKeyBlock) {
    const int kl = kb - kstage;  // block offset in shared memory
    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
      const T* kr = ks + (kl + 8 * j + g) * kKStride;
      if constexpr (P == Precision::kBf16) {
        MmaBf16(s[j], qa, *reinterpret_cast<const uint32_t*>(kr + 2 * t),
                *reinterpret_cast<const uint32_t*>(kr + 2 * t + 8));
      } else {
        const int ko = (kl + 8 * j + g) * kKStride + 2 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint2 khi = *reinterpret_cast<const uint2*>(ks_u + ko + 8 * h);
          const uint2 klo = *reinterpret_cast<const uint2*>(ks_u + kKsLo + ko + 8 * h);
          Mma3xTf32(s[j], qhi[h], qlo[h], khi.x, khi.y, klo.x, klo.y);
        }
      }
    }
    // Unmasked full blocks (almost all of them without a mask) skip the visibility bits.
    if (mask != nullptr || kb + kKeyBlock > num_keys) {
      MaskScoreBlock(s, mask, L, num_keys, rr0, rr1, kb, t);
    }
    float mx0, mx1;
    BlockRowMax(s, mx0, mx1);
    // Raw scores, the scale folded into one FFMA before each exp2.
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float b0 = mn0 == -INFINITY ? 0.0f : mn0 * p.scale_log2;
    const float b1 = mn1 == -INFINITY ? 0.0f : mn1 * p.scale_log2;
    const float al0 = Exp2(m0 * p.scale_log2 - b0), al1 = Exp2(m1 * p.scale_log2 - b1);
    m0 = mn0;
    m1 = mn1;
    ScaleRows(o, al0, al1);
    if constexpr (P == Precision::kBf16) {
      // Exponentials two at a time in bf16 (ex2.approx.ftz.bf16x2): the packed result is already
      // P's A operand, half the MUFU work of fp32 exp2 and no conversion after it. Row sums come
      // from the tensor cores as P times a column of ones, instead of 32 FADDs per lane per block
      // (the ALU and FMA pipes, not the tensor cores, bound this kernel: 45 % ALU in the profile).
      ScaleRows(osum, al0, al1);
      uint32_t pk[8][2];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        pk[j][0] = Exp2Bf16x2(PackBf16(fmaf(s[j][0], p.scale_log2, -b0),
                                       fmaf(s[j][1], p.scale_log2, -b0)));
        pk[j][1] = Exp2Bf16x2(PackBf16(fmaf(s[j][2], p.scale_log2, -b1),
                                       fmaf(s[j][3], p.scale_log2, -b1)));
      }
      constexpr uint32_t kOnes = 0x3f803f80u;  // bf16x2 (1, 1)
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        const uint32_t a[4] = {pk[2 * st][0], pk[2 * st][1], pk[2 * st + 1][0],
                               pk[2 * st + 1][1]};
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const T* vr = vt + (8 * n + g) * kVStride + kl + 16 * st + 2 * t;
          MmaBf16(o[n], a, *reinterpret_cast<const uint32_t*>(vr),
                  *reinterpret_cast<const uint32_t*>(vr + 8));
        }
        MmaBf16(osum, a, kOnes, kOnes);
      }
    } else {
      float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[j][e] = Exp2(fmaf(s[j][e], p.scale_log2, -b0));
          s[j][2 + e] = Exp2(fmaf(s[j][2 + e], p.scale_log2, -b1));
          rs0 += s[j][e];
          rs1 += s[j][2 + e];
        }
      }
      l0 = l0 * al0 + rs0;
      l1 = l1 * al1 + rs1;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        uint32_t ahi[4], alo[4];
        SplitTf32(s[u][0], ahi[0], alo[0]);
        SplitTf32(s[u][2], ahi[1], alo[1]);
        SplitTf32(s[u][1], ahi[2], alo[2]);
        SplitTf32(s[u][3], ahi[3], alo[3]);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int vo = (8 * n + g) * kVStride + kl + 8 * u + 2 * t;
          const uint2 vhi = *reinterpret_cast<const uint2*>(vt_u + vo);
          const uint2 vlo = *reinterpret_cast<const uint2*>(vt_u + kVtLo + vo);
          Mma3xTf32(o[n], ahi, alo, vhi.x, vhi.y, vlo.x, vlo.y);
        }
      }
    }
  }  // key blocks of this stage
  }  // stages
  if (!active) return;
  if constexpr (P == Precision::kBf16) {
    l0 = osum[0];
    l1 = osum[2];
  } else {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
  }
  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
  T* out = static_cast<T*>(p.out) + base;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const int col = 8 * n + 2 * t;
    if (r0 < num_keys) Store2(out + (size_t)r0 * p.dim + col, o[n][0] * inv0, o[n][1] * inv0);
    if (r1 < num_keys) Store2(out + (size_t)r1 * p.dim + col, o[n][2] * inv1, o[n][3] * inv1);
  }
}

}  // namespace

absl::Status LaunchAttention(const AttentionParams& params, Precision precision,
                             int tile_queries, cudaStream_t stream) {
  if (params.num_tiles == 0) return absl::OkStatus();
  if (tile_queries != 64 && tile_queries != 128) {
    return absl::UnimplementedError(
        absl::StrCat("attention tiles of ", tile_queries, " queries; supported: 64, 128"));
  }
  const dim3 grid(params.num_tiles, params.dim / kHeadDim);
  const bool bf16 = precision == Precision::kBf16;
  auto kernel = tile_queries == 64 ? (bf16 ? AttentionKernel<Precision::kBf16, 64>
                                           : AttentionKernel<Precision::kFp32, 64>)
                                   : (bf16 ? AttentionKernel<Precision::kBf16, 128>
                                           : AttentionKernel<Precision::kFp32, 128>);
  CUDA_RETURN_IF_ERROR(LaunchPdl(kernel, grid, dim3(2 * tile_queries), 0, stream, params));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace mmdit
