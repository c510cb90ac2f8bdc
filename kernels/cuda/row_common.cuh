// The row-local part of a layer on one tile of 16 or 64 tokens (mma.sync, eight warps), shared by
// the row kernel (row_kernel.cu, one launch per layer) and the fused small-batch forward
// (fused_forward.cu, all layers in one launch): output projection + RMSNorm + gated residual,
// modulated LayerNorm + MLP (the F-wide hidden in D-wide chunks in shared memory) + gated
// residual, modulated LayerNorm + q/k/v projection + q/k RMSNorm + RoPE. Unfused, these GEMMs are
// bound by activation traffic at K = 128 (PERF.md: 240 us per layer at B = 256 through cuBLAS);
// fused, a layer reads the attention output and the residual once and writes the residual and
// q/k/v once.
//
// For each D-wide output pass every warp owns D/8 columns of all tile rows, so each weight
// fragment is loaded once per CTA (from L2: the 14 MB of bf16 weights stay resident).
//
// Small batches split each 16-token tile over a cluster of kSplit = 2 or 4 CTAs: every CTA of the
// cluster computes the output projection and the norms of the whole tile (one pass), takes
// 1/kSplit of the MLP's hidden chunks and its share of the q, k and v passes; the MLP's partial
// down products are summed through distributed shared memory. A CTA's serial chain drops from 12
// GEMM passes to 4 (kSplit 4) or 7 (kSplit 2).
#pragma once

#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace row {

constexpr int kThreads = 256;
constexpr float kLayerNormEps = 1e-6f;
constexpr float kRmsNormEps = 1.1920929e-07f;

template <Precision P, int kD, int kMT>
struct RowShape {
  using T = typename Prec<P>::T;
  static constexpr int kM = 16 * kMT;     // tile rows
  static constexpr int kNT = kD / 64;     // n8 tiles per warp in one D-wide pass
  static constexpr int kXs = kD + 4;      // float32 row stride
  // Operand row stride, 4 words past a multiple of 32: conflict-free ldmatrix rows.
  static constexpr int kAs = P == Precision::kBf16 ? kD + 8 : kD + 4;
  static constexpr int kCols = kD / 32;   // columns per lane in the row passes
  static constexpr int kRowsPerWarp = kM / 8;
  // The residual tile, the GEMM output (whose space the MLP's hidden chunk reuses: it is dead
  // from the end of the projection's epilogue to the q/k/v GEMMs) and the GEMM operand; with a
  // cluster split, the CTA's partial down product (its peers read it).
  static constexpr size_t kOutBytes = sizeof(float) * kM * kXs > sizeof(T) * kM * kAs
                                         ? sizeof(float) * kM * kXs
                                         : sizeof(T) * kM * kAs;
  static constexpr size_t kSmemBytes =
      sizeof(float) * kM * kXs + kOutBytes + sizeof(T) * kM * kAs;
  // With a cluster split of `split` CTAs: one slot per rank for the partial down products
  // (RowTilePasses; bf16 sends them rounded to bf16, PartialUnits).
  static constexpr size_t kSlotBytes = sizeof(T) * kM * kD;
  __host__ __device__ static constexpr size_t ExchangeBytes(int split) {
    return split * kSlotBytes;
  }
};

// The per-column vectors of a launch, staged in shared memory after the tiles (each pass read
// them from global memory after its barrier: an L2 round trip on the critical path of every
// pass, twelve per launch). Offsets in units of D: the weights' vectors of the tile's stream,
// then the modulation of its sample (scales as 1 + scale), then up_b when F <= kMaxStagedFF.
enum VectorOffset {
  kVOutB = 0, kVOutRms = 1, kVDownB = 2, kVQkvB = 3, kVRmsQ = 6, kVRmsK = 7, kVGateAttn = 8,
  kVScaleMlp = 9, kVShiftMlp = 10, kVGateMlp = 11, kVScaleAttn = 12, kVShiftAttn = 13, kVUpB = 14
};
constexpr int kMaxStagedFF = 2048;
__host__ __device__ constexpr size_t VectorBytes(int dim, int dim_ff) {
  return sizeof(float) * (kVUpB * dim + (dim_ff <= kMaxStagedFF ? dim_ff : 0));
}

template <Precision P>
__device__ __forceinline__ float Silu(float v) {
  if constexpr (P == Precision::kBf16) {
    return __fdividef(v, 1.0f + __expf(-v));
  } else {
    return v / (1.0f + expf(-v));
  }
}

// Where one D-wide GEMM pass of a warp reads its weights: fragments of rows nt0*8.. and
// k-steps ks0.. of a matrix with ks_total k16 steps per row.
template <Precision P>
struct WDesc {
  const typename Prec<P>::W* wf;
  int ks_total;
  int nt0;
  int ks0;
};

// The bf16 weight fragments of one pass, in registers (32 for D = 128).
template <int kD>
struct WFrags {
  uint2 b[kD / 16][kD / 64];
};

template <int kD>
__device__ __forceinline__ void LoadFrags(WFrags<kD>& f, const WDesc<Precision::kBf16>& d) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kD / 16; ++i)
#pragma unroll
    for (int n = 0; n < kD / 64; ++n) {
      f.b[i][n] = __ldg(d.wf + ((size_t)(d.nt0 + n) * d.ks_total + d.ks0 + i) * 32 + lane);
    }
}

// acc[kMT][kNT] += A[tile rows][kD] (shared, stride kAs) x W(cur)^T.
// bf16: the fragments of `cur` are already in `f`; as each k-step consumes its fragments, the
// same registers are refilled with the next pass's (`next`), so a pass's weight loads overlap
// the previous pass's MMAs instead of stalling on L2 after each barrier (19 us per row launch at
// B = 1, 12 such passes per launch, before this).
// fp32 (3xTF32): loads from `cur` a few k-steps ahead; `f` and `next` are unused.
template <Precision P, int kD, int kMT>
__device__ __forceinline__ void WarpGemm(float (&acc)[kMT][kD / 64][4],
                                         const typename Prec<P>::T* as, WFrags<kD>& f,
                                         const WDesc<P>& cur, const WDesc<P>& next) {
  using S = RowShape<P, kD, kMT>;
  constexpr int kNT = S::kNT;
  const int lane = threadIdx.x & 31;
  if constexpr (P == Precision::kBf16) {
    // With one m-tile a warp has only kNT accumulators, so consecutive k-steps would form one
    // dependent MMA chain per accumulator; k-step i goes to set i % kChains (summed at the end).
    constexpr int kChains = kMT == 1 ? 4 : 1;
    float extra[kChains > 1 ? kChains - 1 : 1][kNT][4] = {};
    // The refill's addresses once per pass, k-step i at a constant offset from them, and with no
    // next pass the current one's fragments reloaded (dead, but the loads stay unconditional):
    // computed and tested per k-step, the 64-bit index arithmetic and branches were most of a
    // pass's instructions, on the critical path of every small-batch layer.
    const WDesc<P>& src = next.wf != nullptr ? next : cur;
    const typename Prec<P>::W* refill[kNT];
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      refill[n] = src.wf + ((size_t)(src.nt0 + n) * src.ks_total + src.ks0) * 32 + lane;
    }
#pragma unroll
    for (int i = 0; i < kD / 16; ++i) {
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        uint32_t a[4];
        LdMatrixX4(a, as + (16 * m + (lane & 15)) * S::kAs + 16 * i + (lane >> 4) * 8);
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          if (kChains > 1 && i % kChains != 0) {
            MmaBf16(extra[i % kChains - 1][n], a, f.b[i][n].x, f.b[i][n].y);
          } else {
            MmaBf16(acc[m][n], a, f.b[i][n].x, f.b[i][n].y);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n) f.b[i][n] = __ldg(refill[n] + i * 32);
    }
    if constexpr (kChains > 1) {
#pragma unroll
      for (int c = 0; c < kChains - 1; ++c)
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[0][n][e] += extra[c][n][e];
    }
  } else {
    // The k8 steps fully unrolled, each step's weight fragments loaded kAhead steps before use
    // (loaded in the step itself, the MMAs waited on L2: a fifth of the stall samples).
    constexpr int kSteps = kD / 8, kAhead = 2;
    const float4* wb[kNT];
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      wb[n] = cur.wf + ((size_t)(cur.nt0 + n) * cur.ks_total + cur.ks0) * 2 * 32 + lane;
    }
    float4 b[kAhead + 1][kNT];
#pragma unroll
    for (int s = 0; s < kAhead; ++s)
#pragma unroll
      for (int n = 0; n < kNT; ++n) b[s][n] = __ldg(wb[n] + s * 32);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      if (s + kAhead < kSteps) {
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          b[(s + kAhead) % (kAhead + 1)][n] = __ldg(wb[n] + (s + kAhead) * 32);
        }
      }
      const float4(&bs)[kNT] = b[s % (kAhead + 1)];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        // ldmatrix on 32-bit elements: four 8 x 4 matrices (rows 0-7 / 8-15, k 0-3 / 4-7) are
        // exactly the tf32 A fragment, in one register quad.
        uint32_t ahi[4], alo[4];
        LdMatrixX4(ahi, as + (16 * m + (lane & 7) + 8 * ((lane >> 3) & 1)) * S::kAs + 8 * s +
                            4 * (lane >> 4));
#pragma unroll
        for (int e = 0; e < 4; ++e) alo[e] = Tf32Low(ahi[e]);
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          Mma3xTf32(acc[m][n], ahi, alo, __float_as_uint(bs[n].x), __float_as_uint(bs[n].y),
                    __float_as_uint(bs[n].z), __float_as_uint(bs[n].w));
        }
      }
    }
  }
}

template <int kMT, int kNT>
__device__ __forceinline__ void ZeroAcc(float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int m = 0; m < kMT; ++m)
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;
}

// ss[row][col] = acc + bias[col] for this warp's columns.
template <int kMT, int kNT, int kXs>
__device__ __forceinline__ void StoreAcc(float* ss, const float (&acc)[kMT][kNT][4],
                                         const float* bias, int warp) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    const int col = (warp * kNT + n) * 8 + 2 * t;
    const float b0 = bias[col], b1 = bias[col + 1];
#pragma unroll
    for (int m = 0; m < kMT; ++m) {
      Store2(ss + (16 * m + g) * kXs + col, acc[m][n][0] + b0, acc[m][n][1] + b1);
      Store2(ss + (16 * m + g + 8) * kXs + col, acc[m][n][2] + b0, acc[m][n][3] + b1);
    }
  }
}

// kCols consecutive floats from src into registers (one 16- or 8-byte load). The row passes
// load their per-column vectors once per pass, not once per row: re-read for every row, they
// made the row passes, not the GEMMs, most of the instructions (about 50 k of 60 k per CTA).
template <int kCols>
__device__ __forceinline__ void LoadCols(float (&dst)[kCols], const float* src) {
  if constexpr (kCols == 4) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
  } else {
    static_assert(kCols == 2, "kCols is 2 or 4");
    const float2 v = *reinterpret_cast<const float2*>(src);
    dst[0] = v.x, dst[1] = v.y;
  }
}

template <int kCols>
__device__ __forceinline__ void StoreCols(float* dst, const float (&v)[kCols]) {
  if constexpr (kCols == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
  }
}

// The row passes take a warp's rows two at a time: a row's reduction over the warp is a chain
// of five dependent shuffles, and two rows' chains interleaved take about as long as one (with
// the rows one after the other, the first norm pass alone was 30 dependent shuffles).
constexpr int kRowsAtOnce = 2;

// s[i] summed over the warp for each i, the butterflies interleaved.
template <int N>
__device__ __forceinline__ void WarpSums(float (&s)[N]) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] += __shfl_xor_sync(0xffffffffu, s[i], o);
}

// Rows of kCols columns per lane from col0 (R rows, mean[q] the mean of row q):
// out[q] = LN(x[q]) * scale1 + shift (scale1 = 1 + scale).
template <int R, int kCols, typename T>
__device__ __forceinline__ void LayerNormModulateRows(const float (&x)[R][kCols],
                                                      const float (&mean)[R],
                                                      const float (&scale1)[kCols],
                                                      const float (&shift)[kCols], int col0,
                                                      T* const (&out)[R]) {
  constexpr float kInvD = 1.0f / (kCols * 32);
  float s2[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    s2[q] = 0.0f;
#pragma unroll
    for (int j = 0; j < kCols; ++j) s2[q] += (x[q][j] - mean[q]) * (x[q][j] - mean[q]);
  }
  WarpSums(s2);
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const float rstd = rsqrtf(s2[q] * kInvD + kLayerNormEps);
#pragma unroll
    for (int j = 0; j < kCols; j += 2) {
      Store2(out[q] + col0 + j, (x[q][j] - mean[q]) * rstd * scale1[j] + shift[j],
             (x[q][j + 1] - mean[q]) * rstd * scale1[j + 1] + shift[j + 1]);
    }
  }
}

template <int R, int kCols>
__device__ __forceinline__ void RowMeans(const float (&x)[R][kCols], float (&mean)[R]) {
#pragma unroll
  for (int q = 0; q < R; ++q) {
    mean[q] = 0.0f;
#pragma unroll
    for (int j = 0; j < kCols; ++j) mean[q] += x[q][j];
  }
  WarpSums(mean);
#pragma unroll
  for (int q = 0; q < R; ++q) mean[q] *= 1.0f / (kCols * 32);
}

template <int R, int kCols>
__device__ __forceinline__ void RmsNormRows(float (&v)[R][kCols], const float (&w)[kCols]) {
  constexpr float kInvD = 1.0f / (kCols * 32);
  float s[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    s[q] = 0.0f;
#pragma unroll
    for (int j = 0; j < kCols; ++j) s[q] += v[q][j] * v[q][j];
  }
  WarpSums(s);
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const float r = rsqrtf(s[q] * kInvD + kRmsNormEps);
#pragma unroll
    for (int j = 0; j < kCols; ++j) v[q][j] = v[q][j] * r * w[j];
  }
}

// RoPE from a table of (cos, sin) per row and pair (the tile's rows, StageRopeRows); pairs
// (2i, 2i + 1).
template <int kCols>
__device__ __forceinline__ void RopeRow(float (&v)[kCols], const float2* rope, int pos,
                                        int col0) {
#pragma unroll
  for (int j = 0; j < kCols; j += 2) {
    const int pair = ((col0 + j) % kHeadDim) / 2;
    const float2 cs = rope[pos * (kHeadDim / 2) + pair];
    const float a = v[j], b = v[j + 1];
    v[j] = a * cs.x - b * cs.y;
    v[j + 1] = a * cs.y + b * cs.x;
  }
}

// The (cos, sin) rows of a tile's rows [0, kM) at positions pos0 + r, from the host-made table
// into shared memory (identity past `rows` or where `rope` is false), for RopeRow with row 0 at
// the tile's first row. Staged before the passes: read from the table by the q and k passes,
// those reads came after the exchange's cluster-scope acquire, which empties the L1, and each
// pass waited for an L2 trip.
template <int kM>
__device__ __forceinline__ void StageRopeRows(float2* dst, const float2* table, int pos0,
                                              int rows, bool rope) {
  constexpr int kPairs = kHeadDim / 2;
  for (int i = threadIdx.x; i < kM * kPairs; i += kThreads) {
    const int r = i / kPairs;
    dst[i] = rope && r < rows ? table[(pos0 + r) * kPairs + i % kPairs] : make_float2(1.0f, 0.0f);
  }
}

template <typename T, int kCols>
__device__ __forceinline__ void StoreRow(T* out, const float (&v)[kCols]) {
#pragma unroll
  for (int j = 0; j < kCols; j += 2) Store2(out + j, v[j], v[j + 1]);
}

// Distributed shared memory by address in the shared::cluster window, and the cluster barrier
// halves. The exchanges push their data into the peers' shared memory (st.async below, counted
// by the receiver's mbarrier), so the cluster barrier only orders phases: a peer's mbarrier is
// initialised, or a buffer no longer in use, before a CTA writes into it. Its arrivals are
// relaxed (a release arrive at cluster scope is a GPU-wide fence in SASS: MEMBAR.ALL.GPU and an
// error barrier that waits for every outstanding access).
__device__ __forceinline__ uint32_t MapShared(const void* p, int rank) {
  uint32_t r;
  asm("mapa.shared::cluster.u32 %0, %1, %2;\n"
      : "=r"(r)
      : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))), "r"(rank));
  return r;
}
// Arrival with no ordering of memory: an mbarrier's initialisation has its own fence
// (FenceMbarrierInit), and a buffer's last reads have been consumed, so they are complete.
__device__ __forceinline__ void ClusterArrive() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
// Wait for every CTA's arrival (then an acquire fence restricted to shared memory).
__device__ __forceinline__ void ClusterWait() {
  asm volatile(
      "barrier.cluster.wait.aligned;\n"
      "fence.acquire.sync_restrict::shared::cluster.cluster;\n" ::: "memory");
}

// 16 bytes into a peer's shared memory (shared::cluster addresses), counted in bytes by the peer's
// mbarrier `bar`: the peer sees the data once it sees the mbarrier's phase complete.
__device__ __forceinline__ void StoreAsyncCluster(uint32_t addr, uint4 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(addr),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(bar)
      : "memory");
}
// 4 bytes into a peer's shared memory, as StoreAsyncCluster.
__device__ __forceinline__ void StoreAsyncCluster(uint32_t addr, uint32_t v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(addr),
      "r"(v), "r"(bar)
      : "memory");
}
// A thread's partial down product (its kNT n8 tiles' accumulators) as the 16-byte units the
// cluster exchanges: fp32 one tile per unit; bf16 two tiles per unit, rounded to bf16. The
// exchange's time follows its bytes: at B = 1 it was ~1.3 us of a ~10 us layer with 24 KB sent
// per CTA in fp32, and half the bytes took ~0.5 us off. The rounding is the one the bf16 forward
// applies to every GEMM operand (the fixtures' errors did not move).
template <Precision P, int kNT>
struct PartialUnits {
  static constexpr int kTilesPerUnit = P == Precision::kBf16 ? 2 : 1;
  static constexpr int kUnits = kNT / kTilesPerUnit;
  static_assert(kUnits * kTilesPerUnit == kNT, "whole units");
  uint4 u[kUnits];

  __device__ __forceinline__ void Pack(const float (&acc)[kNT][4]) {
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      if constexpr (P == Precision::kBf16) {
        const float(&a)[4] = acc[2 * i];
        const float(&b)[4] = acc[2 * i + 1];
        u[i] = make_uint4(PackBf16(a[0], a[1]), PackBf16(a[2], a[3]), PackBf16(b[0], b[1]),
                          PackBf16(b[2], b[3]));
      } else {
        u[i] = make_uint4(__float_as_uint(acc[i][0]), __float_as_uint(acc[i][1]),
                          __float_as_uint(acc[i][2]), __float_as_uint(acc[i][3]));
      }
    }
  }
  __device__ __forceinline__ void AddTo(float (&acc)[kNT][4]) const {
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      if constexpr (P == Precision::kBf16) {
        const float2 v[4] = {UnpackBf16(u[i].x), UnpackBf16(u[i].y), UnpackBf16(u[i].z),
                             UnpackBf16(u[i].w)};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc[2 * i + h][0] += v[2 * h].x;
          acc[2 * i + h][1] += v[2 * h].y;
          acc[2 * i + h][2] += v[2 * h + 1].x;
          acc[2 * i + h][3] += v[2 * h + 1].y;
        }
      } else {
        acc[i][0] += __uint_as_float(u[i].x);
        acc[i][1] += __uint_as_float(u[i].y);
        acc[i][2] += __uint_as_float(u[i].z);
        acc[i][3] += __uint_as_float(u[i].w);
      }
    }
  }
};

// Where vs[i] (VectorOffset, the weights' part: below kVGateAttn, then up_b at kVUpB) comes from
// for the finishing layer's weights wp and the q/k/v layer's wq (copies; null pointers in
// them: zero).
template <int kD>
__device__ __forceinline__ const float* WeightVectorSource(int i, const StreamWeightsDev& wp,
                                                           const StreamWeightsDev& wq) {
  auto at = [](const float* v, int k) { return v != nullptr ? v + k : nullptr; };
  if (i >= kVGateAttn * kD) return at(wp.up_b, i - kVGateAttn * kD);
  const int k = i % kD;
  switch (i / kD) {
    case kVOutB: return at(wp.out_b, k);
    case kVOutRms: return at(wp.out_rms, k);
    case kVDownB: return at(wp.down_b, k);
    case kVRmsQ: return at(wq.rms_q, k);
    case kVRmsK: return at(wq.rms_k, k);
    default: return at(wq.qkv_b, i - kVQkvB * kD);  // q, k, v biases
  }
}

// The weights' vectors of vs (VectorOffset, all but the modulation) for wp and wq (null: zeros);
// up_b only when F <= kMaxStagedFF. Loaded into registers, every load before the first store
// (one after the other's store, they were a chain of L2 trips: 2.5 us between two layers of the
// fused forward), and stored when the caller chooses.
template <int kD>
struct WeightVectors {
  static constexpr int kPerThread = (kVGateAttn * kD + kMaxStagedFF + kThreads - 1) / kThreads;
  float v[kPerThread];
  int count;  // entries of vs in this launch's layout

  __device__ __forceinline__ void Load(const StreamWeightsDev* wp, const StreamWeightsDev* wq,
                                       int dim_ff) {
    // Both tables of pointers first, in one L2 trip: read through wp and wq per value, each
    // value's load waited for its own pointer (thirteen trips in a row in the row kernel's
    // prologue).
    const StreamWeightsDev none = {};
    const StreamWeightsDev a = wp != nullptr ? *wp : none, b = wq != nullptr ? *wq : none;
    count = kVGateAttn * kD + (dim_ff <= kMaxStagedFF ? dim_ff : 0);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const float* src = i < count ? WeightVectorSource<kD>(i, a, b) : nullptr;
      v[j] = src != nullptr ? __ldg(src) : 0.0f;
    }
  }
  __device__ __forceinline__ void Store(float* vs) const {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < count) vs[i < kVGateAttn * kD ? i : kVUpB * kD + i - kVGateAttn * kD] = v[j];
    }
  }
};

// The residual rows of a tile (zeros past its rows), loaded into registers so that the caller can
// issue its other loads before the first store.
template <int kD, int kM>
struct ResidualTile {
  static constexpr int kPerThread = kM * kD / 4 / kThreads;  // float4s
  static_assert(kPerThread * 4 * kThreads == kM * kD, "the tile divides evenly over the threads");
  float4 v[kPerThread];

  __device__ __forceinline__ void Load(const float* x, int tok0, int rows) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int e = threadIdx.x + k * kThreads, r = e / (kD / 4), c = (e % (kD / 4)) * 4;
      v[k] = r < rows ? *reinterpret_cast<const float4*>(x + (size_t)(tok0 + r) * kD + c)
                      : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  __device__ __forceinline__ void Store(float* xs, int stride) const {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int e = threadIdx.x + k * kThreads, r = e / (kD / 4), c = (e % (kD / 4)) * 4;
      *reinterpret_cast<float4*>(xs + r * stride + c) = v[k];
    }
  }
};

// The modulation of one column (thread < D) of a tile: gate, scale, shift (attention) and gate
// (MLP) of the finishing layer, scale and shift (q/k/v) of the next; loaded into registers first
// so that the caller can issue its other loads before the first store.
struct TileModulation {
  float v[6];
};
// mod: the tile's sample's [N][2][6][D] block; a layer < 0 is absent (zeros).
template <int kD>
__device__ __forceinline__ TileModulation LoadModulation(const float* mod, int stream,
                                                         int post_layer, int qkv_layer) {
  TileModulation m = {};
  if (threadIdx.x < kD) {
    const int i = threadIdx.x;
    if (post_layer >= 0) {
      const float* mp = mod + ((size_t)post_layer * 2 + stream) * 6 * kD;
#pragma unroll
      for (int k = 0; k < 4; ++k) m.v[k] = mp[(2 + k) * kD + i];
    }
    if (qkv_layer >= 0) {
      const float* mq = mod + ((size_t)qkv_layer * 2 + stream) * 6 * kD;
      m.v[4] = mq[i];
      m.v[5] = mq[kD + i];
    }
  }
  return m;
}
template <int kD>
__device__ __forceinline__ void StoreModulation(float* vs, const TileModulation& m) {
  if (threadIdx.x < kD) {
    const int i = threadIdx.x;
    vs[kVGateAttn * kD + i] = m.v[0];
    vs[kVScaleMlp * kD + i] = 1.0f + m.v[1];
    vs[kVShiftMlp * kD + i] = m.v[2];
    vs[kVGateMlp * kD + i] = m.v[3];
    vs[kVScaleAttn * kD + i] = 1.0f + m.v[4];
    vs[kVShiftAttn * kD + i] = m.v[5];
  }
}

// Where a tile's passes read and write. The shared-memory regions are laid out by the kernel
// (RowShape); the tile is rows [tok0, tok0 + rows) of the activation buffers.
template <Precision P>
struct RowWork {
  using T = typename Prec<P>::T;
  float* xs;                     // residual tile, float32, kXs apart
  float* ss;                     // GEMM output before its row-wise epilogue
  T* as;                         // GEMM operand, kAs apart: the attention rows on entry
  float* vs;                     // vectors (VectorOffset)
  float* ps;                     // split: the exchange's slots (ExchangeBytes)
  uint64_t* exchange_bar;        // split: counts the peers' bytes into ps (one arrival)
  unsigned exchange_parity;      // split: its phase in this tile's exchange
  const StreamWeightsDev* wp;    // the finishing layer's weights; null: none
  const StreamWeightsDev* wq;    // the q/k/v layer's weights; null: none
  const float* up_b;             // the MLP's up bias (staged in vs, or global)
  int dim_ff;
  int rank;                      // in the cluster
  int tok0;
  int rows;
  bool rope;                     // the x stream: q and k get RoPE
  const float2* rope_rows;       // shared: tile row r's (cos, sin) pairs at r * kHeadDim / 2
                                 // (StageRopeRows)
  float* x_dst;                  // residual out; null: not written
  void* q;                       // [tokens][D], T-typed
  void* k;
  void* v;
};

// The q/k/v passes [QkvBegin, QkvEnd) of a cluster CTA.
__device__ __forceinline__ int QkvBegin(int rank, int split) {
  return (3 * rank + split - 1) / split;
}
__device__ __forceinline__ int QkvEnd(int rank, int split) {
  return (3 * (rank + 1) + split - 1) / split;
}

// The weights of one D-wide pass of this warp: the output projection, hidden chunk fc of the MLP's
// up and down matrices, and q, k or v (c = 0, 1, 2).
template <Precision P, int kD>
__device__ __forceinline__ WDesc<P> OutPass(const StreamWeightsDev* w, int warp) {
  return WDesc<P>{static_cast<const typename Prec<P>::W*>(w->out_w), kD / 16, warp * (kD / 64), 0};
}
template <Precision P, int kD>
__device__ __forceinline__ WDesc<P> UpPass(const StreamWeightsDev* w, int fc, int warp) {
  return WDesc<P>{static_cast<const typename Prec<P>::W*>(w->up_w), kD / 16,
                  fc * (kD / 8) + warp * (kD / 64), 0};
}
template <Precision P, int kD>
__device__ __forceinline__ WDesc<P> DownPass(const StreamWeightsDev* w, int fc, int warp,
                                             int dim_ff) {
  return WDesc<P>{static_cast<const typename Prec<P>::W*>(w->down_w), dim_ff / 16,
                  warp * (kD / 64), fc * (kD / 16)};
}
template <Precision P, int kD>
__device__ __forceinline__ WDesc<P> QkvPass(const StreamWeightsDev* w, int c, int warp) {
  return WDesc<P>{static_cast<const typename Prec<P>::W*>(w->qkv_w), kD / 16,
                  c * (kD / 8) + warp * (kD / 64), 0};
}

// The weights of a tile's first pass (what the kernel loads into the fragments before the passes).
template <Precision P, int kD, int kSplit>
__device__ __forceinline__ WDesc<P> FirstPass(const RowWork<P>& w) {
  const int warp = threadIdx.x >> 5;
  if (w.wp != nullptr) return OutPass<P, kD>(w.wp, warp);
  if (w.wq != nullptr && QkvBegin(w.rank, kSplit) < QkvEnd(w.rank, kSplit)) {
    return QkvPass<P, kD>(w.wq, QkvBegin(w.rank, kSplit), warp);
  }
  return WDesc<P>{nullptr, 0, 0, 0};
}

// The passes of one tile, in order: [out, (up, down) x F/D] with w.wp, then [q, k, v] with w.wq.
// On entry the residual is in xs, the attention rows (w.wp) in as, the vectors in vs, and (bf16)
// `frags` holds FirstPass's fragments, all visible to every thread. A split CTA takes hidden
// chunks rank, rank + kSplit, ... and the q/k/v passes [QkvBegin, QkvEnd). With w.wp and a
// split, the exchange of partial products starts with a wait on the cluster barrier, which the
// caller arrives at before: by then w.exchange_bar is initialised and visible to the peers, and
// this CTA no longer uses the memory of w.ps's slots for anything else.
template <Precision P, int kD, int kMT, int kSplit>
__device__ __forceinline__ void RowTilePasses(const RowWork<P>& w, WFrags<kD>& frags) {
  using S = RowShape<P, kD, kMT>;
  using T = typename Prec<P>::T;
  constexpr int kM = S::kM, kNT = S::kNT, kXs = S::kXs, kAs = S::kAs, kCols = S::kCols;
  float* const xs = w.xs;
  float* const ss = w.ss;
  T* const as = w.as;
  T* const hs = reinterpret_cast<T*>(ss);  // the MLP hidden chunk
  const float* const vs = w.vs;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int col0 = lane * kCols;
  const int rank = w.rank;
  const int num_fc = w.dim_ff / kD;
  const int qkv_begin = QkvBegin(rank, kSplit), qkv_end = QkvEnd(rank, kSplit);
  const bool has_qkv = w.wq != nullptr && qkv_begin < qkv_end;
  const WDesc<P> none{nullptr, 0, 0, 0};
  // The matrices' addresses in registers from here on. Read where each pass began, the q/k/v
  // pass's came after the exchange's cluster-scope acquire, which empties the L1 (CCTL.IVALL),
  // and the pass's first refill load waited for that L2 trip.
  StreamWeightsDev mp = {}, mq = {};
  if (w.wp != nullptr) {
    mp.out_w = w.wp->out_w;
    mp.up_w = w.wp->up_w;
    mp.down_w = w.wp->down_w;
  }
  if (w.wq != nullptr) mq.qkv_w = w.wq->qkv_w;
  auto up_d = [&](int fc) { return UpPass<P, kD>(&mp, fc, warp); };
  auto down_d = [&](int fc) { return DownPass<P, kD>(&mp, fc, warp, w.dim_ff); };
  auto qkv_d = [&](int c) { return QkvPass<P, kD>(&mq, c, warp); };

  float acc[kMT][kNT][4];
  uint64_t* const exchange_bar = w.exchange_bar;
  if (w.wp != nullptr) {
    if constexpr (kSplit > 1) {
      // Armed now (one arrival, and the bytes the peers will send), the wait below completes once
      // all the peers' partials are in.
      if (threadIdx.x == 0) {
        MbarrierArriveExpectTx(exchange_bar, (kSplit - 1) * static_cast<unsigned>(S::kSlotBytes));
      }
    }
    ZeroAcc(acc);
    WarpGemm<P, kD, kMT>(acc, as, frags, OutPass<P, kD>(&mp, warp),
                         rank < num_fc ? up_d(rank) : (has_qkv ? qkv_d(qkv_begin) : none));
    StoreAcc<kMT, kNT, kXs>(ss, acc, vs + kVOutB * kD, warp);
    __syncthreads();
    // RMSNorm of the projection, gated residual, modulated LayerNorm for the MLP.
    float rms_w[kCols], gate[kCols], scale1[kCols], shift[kCols];
    LoadCols<kCols>(rms_w, vs + kVOutRms * kD + col0);
    LoadCols<kCols>(gate, vs + kVGateAttn * kD + col0);
    LoadCols<kCols>(scale1, vs + kVScaleMlp * kD + col0);
    LoadCols<kCols>(shift, vs + kVShiftMlp * kD + col0);
    // One reduction round gives both the RMS of the projection and the mean of the new
    // residual: sum(x) = sum(x_old) + r sum(v w gate) for x = x_old + (v r w) gate.
    for (int rr = 0; rr < S::kRowsPerWarp; rr += kRowsAtOnce) {
      const int r0 = warp * S::kRowsPerWarp + rr;
      float v[kRowsAtOnce][kCols], x[kRowsAtOnce][kCols];
      float sums[3 * kRowsAtOnce], mean[kRowsAtOnce];
#pragma unroll
      for (int q = 0; q < kRowsAtOnce; ++q) {
        LoadCols<kCols>(v[q], ss + (r0 + q) * kXs + col0);
        LoadCols<kCols>(x[q], xs + (r0 + q) * kXs + col0);
        sums[3 * q] = sums[3 * q + 1] = sums[3 * q + 2] = 0.0f;
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          sums[3 * q] += v[q][j] * v[q][j];
          sums[3 * q + 1] += x[q][j];
          sums[3 * q + 2] += v[q][j] * rms_w[j] * gate[j];
        }
      }
      WarpSums(sums);
      T* out[kRowsAtOnce];
#pragma unroll
      for (int q = 0; q < kRowsAtOnce; ++q) {
        constexpr float kInvD = 1.0f / kD;
        const float rms = rsqrtf(sums[3 * q] * kInvD + kRmsNormEps);
        mean[q] = (sums[3 * q + 1] + rms * sums[3 * q + 2]) * kInvD;
#pragma unroll
        for (int j = 0; j < kCols; ++j) x[q][j] += v[q][j] * rms * rms_w[j] * gate[j];
        StoreCols<kCols>(xs + (r0 + q) * kXs + col0, x[q]);
        out[q] = as + (r0 + q) * kAs;
      }
      LayerNormModulateRows<kRowsAtOnce, kCols>(x, mean, scale1, shift, col0, out);
    }
    __syncthreads();
    float acc2[kMT][kNT][4];
    ZeroAcc(acc2);
    for (int fc = rank; fc < num_fc; fc += kSplit) {
      ZeroAcc(acc);
      WarpGemm<P, kD, kMT>(acc, as, frags, up_d(fc), down_d(fc));
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        const int col = (warp * kNT + n) * 8 + 2 * t;
        const float b0 = w.up_b[fc * kD + col], b1 = w.up_b[fc * kD + col + 1];
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          Store2(hs + (16 * m + g) * kAs + col, Silu<P>(acc[m][n][0] + b0),
                 Silu<P>(acc[m][n][1] + b1));
          Store2(hs + (16 * m + g + 8) * kAs + col, Silu<P>(acc[m][n][2] + b0),
                 Silu<P>(acc[m][n][3] + b1));
        }
      }
      __syncthreads();
      WarpGemm<P, kD, kMT>(
          acc2, hs, frags, down_d(fc),
          fc + kSplit < num_fc ? up_d(fc + kSplit) : (has_qkv ? qkv_d(qkv_begin) : none));
      // The next chunk's up pass rewrites hs. After the last chunk nothing rewrites hs or as
      // before the barrier after the residual's update.
      if (fc + kSplit < num_fc) __syncthreads();
    }
    if constexpr (kSplit > 1) {
      // Each CTA pushes its partial down product into slot `rank` of every peer (st.async, which
      // the peer's mbarrier counts), waits for the peers' partials in its own slots, and sums the
      // kSplit partials in rank order, as every CTA of the cluster does, so that the residual
      // stays identical across the cluster. (Pulling the partials from the peers' shared memory
      // after a cluster barrier took a barrier round trip and then a remote load round trip:
      // the remote loads alone were a seventh of the row kernel's stall samples at B = 1.)
      // The partials are in fragment order, each thread's units (PartialUnits) 32 apart.
      static_assert(kSplit == 1 || kMT == 1, "split tiles have one m-tile");
      using Units = PartialUnits<P, kNT>;
      constexpr int kSlotUnits = S::kSlotBytes / sizeof(uint4);
      static_assert(kSlotUnits == kThreads * Units::kUnits, "a slot holds every thread's units");
      uint4* const slots = reinterpret_cast<uint4*>(w.ps) + warp * Units::kUnits * 32 + lane;
      Units own;
      own.Pack(acc2[0]);
      ClusterWait();
#pragma unroll
      for (int d = 1; d < kSplit; ++d) {
        const int peer = (rank + d) % kSplit;
        const uint32_t bar = MapShared(exchange_bar, peer);
#pragma unroll
        for (int i = 0; i < Units::kUnits; ++i) {
          StoreAsyncCluster(MapShared(slots + rank * kSlotUnits + i * 32, peer), own.u[i], bar);
        }
      }
      MbarrierWait</*kCluster=*/true>(exchange_bar, w.exchange_parity);
      Units part[kSplit];
#pragma unroll
      for (int q = 0; q < kSplit; ++q)
#pragma unroll
        for (int i = 0; i < Units::kUnits; ++i) {
          part[q].u[i] = q == rank ? own.u[i] : slots[q * kSlotUnits + i * 32];
        }
      ZeroAcc(acc2);
#pragma unroll
      for (int q = 0; q < kSplit; ++q) part[q].AddTo(acc2[0]);
    }
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      const int col = (warp * kNT + n) * 8 + 2 * t;
      const float b0 = vs[kVDownB * kD + col], b1 = vs[kVDownB * kD + col + 1];
      const float g0 = vs[kVGateMlp * kD + col], g1 = vs[kVGateMlp * kD + col + 1];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        float* x0 = xs + (16 * m + g) * kXs + col;
        float* x1 = x0 + 8 * kXs;
        x0[0] += (acc2[m][n][0] + b0) * g0;
        x0[1] += (acc2[m][n][1] + b1) * g1;
        x1[0] += (acc2[m][n][2] + b0) * g0;
        x1[1] += (acc2[m][n][3] + b1) * g1;
      }
    }
    __syncthreads();
    if (w.x_dst != nullptr) {
      // A split tile's CTAs hold the same residual: each writes its share.
      for (int i = threadIdx.x + rank * kThreads; i < kM * kD / 4; i += kThreads * kSplit) {
        const int r = i / (kD / 4), c = (i % (kD / 4)) * 4;
        if (r < w.rows) {
          *reinterpret_cast<float4*>(w.x_dst + (size_t)(w.tok0 + r) * kD + c) =
              *reinterpret_cast<const float4*>(xs + r * kXs + c);
        }
      }
    }
  }

  if (has_qkv) {
    {
      float scale1[kCols], shift[kCols];
      LoadCols<kCols>(scale1, vs + kVScaleAttn * kD + col0);
      LoadCols<kCols>(shift, vs + kVShiftAttn * kD + col0);
      for (int rr = 0; rr < S::kRowsPerWarp; rr += kRowsAtOnce) {
        const int r0 = warp * S::kRowsPerWarp + rr;
        float x[kRowsAtOnce][kCols], mean[kRowsAtOnce];
        T* out[kRowsAtOnce];
#pragma unroll
        for (int q = 0; q < kRowsAtOnce; ++q) {
          LoadCols<kCols>(x[q], xs + (r0 + q) * kXs + col0);
          out[q] = as + (r0 + q) * kAs;
        }
        RowMeans(x, mean);
        LayerNormModulateRows<kRowsAtOnce, kCols>(x, mean, scale1, shift, col0, out);
      }
    }
    __syncthreads();
    T* const dst[3] = {static_cast<T*>(w.q), static_cast<T*>(w.k), static_cast<T*>(w.v)};
    for (int c = qkv_begin; c < qkv_end; ++c) {
      ZeroAcc(acc);
      WarpGemm<P, kD, kMT>(acc, as, frags, qkv_d(c), c + 1 < qkv_end ? qkv_d(c + 1) : none);
      StoreAcc<kMT, kNT, kXs>(ss, acc, vs + (kVQkvB + c) * kD, warp);
      __syncthreads();
      float qk_w[kCols];
      if (c < 2) LoadCols<kCols>(qk_w, vs + (c == 0 ? kVRmsQ : kVRmsK) * kD + col0);
      for (int rr = 0; rr < S::kRowsPerWarp; rr += kRowsAtOnce) {
        const int r0 = warp * S::kRowsPerWarp + rr;
        if (r0 >= w.rows) break;  // warp-uniform
        float v[kRowsAtOnce][kCols];
#pragma unroll
        for (int q = 0; q < kRowsAtOnce; ++q) LoadCols<kCols>(v[q], ss + (r0 + q) * kXs + col0);
        if (c < 2) {
          RmsNormRows(v, qk_w);
          if (w.rope) {
#pragma unroll
            for (int q = 0; q < kRowsAtOnce; ++q) {
              RopeRow<kCols>(v[q], w.rope_rows, r0 + q, col0);
            }
          }
        }
#pragma unroll
        for (int q = 0; q < kRowsAtOnce; ++q) {
          if (r0 + q < w.rows) {
            StoreRow<T, kCols>(dst[c] + (size_t)(w.tok0 + r0 + q) * kD + col0, v[q]);
          }
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace row
}  // namespace cuda
}  // namespace mmdit
