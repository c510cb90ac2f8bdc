// The row kernel on warpgroup MMA (wgmma): bf16, D = 128, 64-token tiles, the large batches.
// It computes what the mma.sync row kernel (row_kernel.cu) computes, organised around the three
// costs that bound that kernel at B = 256 (docs/BENCHMARKS.md): every warp re-read the whole A
// tile from shared memory for each GEMM pass, every 64-token CTA re-read each weight from L2, and
// the row-wise norms went through shared memory between CTA-wide barriers. Here:
// - a CTA is three warpgroups, each owning one 64-token tile of the same stream, and the layer's
//   weights stream through a 3-deep ring of 32 KB chunks in shared memory (the bulk copy engine,
//   completing on an mbarrier), so each weight read from L2 serves 192 tokens;
// - a warpgroup computes whole 128-column rows (m64n128), so RMSNorm and LayerNorm reduce over
//   the four lanes of a quad in registers, and the accumulator of one GEMM, normalised, is the
//   A operand (registers) of the next: the m16n8 accumulator layout of two adjacent n8 tiles is
//   the A fragment of one k16 step;
// - after the start there is no CTA-wide barrier: each warp counts itself out of a ring slot
//   once its wgmma reads are done, and the last warp out refills the slot.
#include <atomic>
#include <cstddef>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

constexpr int kD = 128;
constexpr int kTileRows = 64;
constexpr int kWarpgroups = 3;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kStages = 3;
constexpr float kLayerNormEps = 1e-6f;
constexpr float kRmsNormEps = 1.1920929e-07f;
// Bytes of one k16 step of a B image: N rows x 16 values.
constexpr int kStepBytesN128 = 128 * 16 * 2;
constexpr int kStepBytesN64 = 64 * 16 * 2;

// Shared memory: the weight ring, each warpgroup's residual tile (fp32, in each thread's own
// order: every thread reads back only what it wrote), the ring's mbarriers and release counters,
// then the per-column vectors the epilogues read (global loads there were half of all stalls).
constexpr size_t kRingOffset = 0;
constexpr size_t kResidOffset = kRingOffset + size_t{kStages} * kWgmmaChunkBytes;
constexpr size_t kResidBytes = sizeof(float) * kTileRows * kD;
constexpr size_t kFullOffset = kResidOffset + kWarpgroups * kResidBytes;
constexpr size_t kReleasedOffset = kFullOffset + sizeof(uint64_t) * kStages;
constexpr size_t kVectorsOffset = kReleasedOffset + 16;
// Vectors of the layer's weights, for each stream: out_b, out_rms, down_b, qkv_b (3D), rms_q,
// rms_k, then up_b / 2 (F).
constexpr int kOutB = 0, kOutRms = kD, kDownB = 2 * kD, kQkvB = 3 * kD, kRmsQ = 6 * kD,
              kRmsK = 7 * kD, kUpB = 8 * kD;
// Modulation of each warpgroup's sample: out_rms * gate_attn, 1 + scale_mlp, shift_mlp,
// gate_mlp of post_layer, then 1 + scale_attn, shift_attn of qkv_layer.
constexpr int kGateAttn = 0, kScaleMlp = kD, kShiftMlp = 2 * kD, kGateMlp = 3 * kD,
              kScaleAttn = 4 * kD, kShiftAttn = 5 * kD, kModFloats = 6 * kD;
size_t SmemBytes(int dim_ff) {
  return kVectorsOffset + sizeof(float) * (2 * (kUpB + dim_ff) + kWarpgroups * kModFloats);
}

// Elements 8j + 2t, 8j + 2t + 1 of a vector in shared memory, for accumulator tile j of lane t.
// Model-dim vectors are stored in the kernel's feature order (WgmmaFeature): in natural order
// the lanes of a quad would read 4 features apart, two of them in one bank.
__device__ __forceinline__ float2 Cols(const float* v, int j, int t) {
  return *reinterpret_cast<const float2*>(v + 8 * j + 2 * t);
}

// Features 16m + 4t .. + 3 of one row (m = 0..7) as accumulator elements: tiles 2m and 2m + 1,
// elements +0, +1 for row r0, +2, +3 for row r1.
__device__ __forceinline__ float4 Quad(const float (&v)[64], int m, int row) {
  const int e = 2 * row;
  return make_float4(v[8 * m + e], v[8 * m + e + 1], v[8 * m + 4 + e], v[8 * m + 5 + e]);
}
__device__ __forceinline__ void SetQuad(float (&v)[64], int m, int row, float4 q) {
  const int e = 2 * row;
  v[8 * m + e] = q.x;
  v[8 * m + e + 1] = q.y;
  v[8 * m + 4 + e] = q.z;
  v[8 * m + 5 + e] = q.w;
}

__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// silu(v) = v * sigmoid(v) = h (1 + tanh(h)) with h = v / 2: one MUFU op instead of two (exp
// and reciprocal), and one FFMA, given h (the up weights and bias are stored halved).
// tanh.approx's error (~2^-11) is below the bf16 rounding that follows.
__device__ __forceinline__ float SiluOfHalf(float h) {
  float th;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(th) : "f"(h));
  return fmaf(h, th, h);
}

// The element of accumulator d[4j + e] is column 8j + 2t + (e & 1) of row r0 (e < 2) or r1.
// The ks-th k16 step of an A operand holds columns 16ks..16ks+15: tiles j = 2ks (a[0], a[1]) and
// 2ks + 1 (a[2], a[3]).

// v += this thread's residual rows, kept in shared memory (Quad(m, row) at
// resid[(2m + row) * 128]); each sum also goes to sink(m, row, sum) as it is made.
template <typename Sink>
__device__ __forceinline__ void AddResidual(float (&v)[64], const float4* resid, Sink sink) {
#pragma unroll
  for (int m = 0; m < 8; ++m) {
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      const float4 x = resid[(2 * m + row) * 128], q = Quad(v, m, row);
      const float4 y = make_float4(x.x + q.x, x.y + q.y, x.z + q.z, x.w + q.w);
      SetQuad(v, m, row, y);
      sink(m, row, y);
    }
  }
}

// Waits for this thread's residual copies; a bf16 residual (four values in the first 8 bytes of
// each slot) is widened in place, slot by slot, so that everything after reads fp32.
__device__ __forceinline__ void ResidualArrived(float4* resid, bool bf16) {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  if (!bf16) return;
#pragma unroll
  for (int slot = 0; slot < 16; ++slot) {
    const uint2 u = *reinterpret_cast<const uint2*>(resid + slot * 128);
    const float2 lo = UnpackBf16(u.x), hi = UnpackBf16(u.y);
    resid[slot * 128] = make_float4(lo.x, lo.y, hi.x, hi.y);
  }
}

// Sums over the 16 column tiles of this thread's two rows (e < 2: row r0, else r1) of f(value),
// in two independent partial sums (one chain of 16 dependent adds is a latency the three warps
// per scheduler cannot hide; four partial sums spill), then over the quad.
template <typename F>
__device__ __forceinline__ void RowSums(const float (&v)[64], F f, float& sum0, float& sum1) {
  float p0[2] = {}, p1[2] = {};
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    p0[j & 1] += f(v[4 * j]) + f(v[4 * j + 1]);
    p1[j & 1] += f(v[4 * j + 2]) + f(v[4 * j + 3]);
  }
  sum0 = QuadSum(p0[0] + p0[1]);
  sum1 = QuadSum(p1[0] + p1[1]);
}

// a = bf16(LN(v) * scale1 + shift), per row over its 128 columns (scale1 = 1 + scale).
// One pass for mean and variance: in fp32 over 128 values of a residual stream it loses nothing
// that bf16 operands keep.
__device__ __forceinline__ void LayerNormToA(const float (&v)[64], const float* scale1,
                                             const float* shift, int t, uint32_t (&a)[8][4]) {
  float s0, s1, q0, q1;
  RowSums(
      v, [](float x) { return x; }, s0, s1);
  RowSums(
      v, [](float x) { return x * x; }, q0, q1);
  const float m0 = s0 * (1.0f / kD), m1 = s1 * (1.0f / kD);
  const float rs0 = rsqrtf(fmaxf(q0 * (1.0f / kD) - m0 * m0, 0.0f) + kLayerNormEps);
  const float rs1 = rsqrtf(fmaxf(q1 * (1.0f / kD) - m1 * m1, 0.0f) + kLayerNormEps);
  const float n0 = -m0 * rs0, n1 = -m1 * rs1;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float2 sc = Cols(scale1, j, t), sh = Cols(shift, j, t);
    // ((v - m) * rs) * sc + sh
    a[j / 2][2 * (j & 1)] = PackBf16(fmaf(fmaf(v[4 * j], rs0, n0), sc.x, sh.x),
                                     fmaf(fmaf(v[4 * j + 1], rs0, n0), sc.y, sh.y));
    a[j / 2][2 * (j & 1) + 1] = PackBf16(fmaf(fmaf(v[4 * j + 2], rs1, n1), sc.x, sh.x),
                                         fmaf(fmaf(v[4 * j + 3], rs1, n1), sc.y, sh.y));
  }
}

// d = the per-column vector `bias` in every row: a GEMM's bias as its accumulator's start, so
// the tensor cores add it (instead of an FADD per element after the wait).
template <int kN>
__device__ __forceinline__ void SetColumns(float (&d)[kN], const float* bias, int t) {
#pragma unroll
  for (int j = 0; j < kN / 4; ++j) {
    const float2 b = Cols(bias, j, t);
    d[4 * j] = b.x;
    d[4 * j + 1] = b.y;
    d[4 * j + 2] = b.x;
    d[4 * j + 3] = b.y;
  }
}

// r = rsqrt(mean(v^2) + eps) per row (RMSNorm without its weight).
__device__ __forceinline__ void Rms(const float (&v)[64], float& r0, float& r1) {
  float s0, s1;
  RowSums(
      v, [](float x) { return x * x; }, s0, s1);
  r0 = rsqrtf(s0 * (1.0f / kD) + kRmsNormEps);
  r1 = rsqrtf(s1 * (1.0f / kD) + kRmsNormEps);
}

// v *= the per-column vector `w`, and row r0's elements by s0, row r1's by s1.
__device__ __forceinline__ void ScaleColumns(float (&v)[64], const float* w, int t,
                                             float s0 = 1.0f, float s1 = 1.0f) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float2 ww = Cols(w, j, t);
    v[4 * j] *= s0 * ww.x;
    v[4 * j + 1] *= s0 * ww.y;
    v[4 * j + 2] *= s1 * ww.x;
    v[4 * j + 3] *= s1 * ww.y;
  }
}

// v = RMSNorm(v, w).
__device__ __forceinline__ void RmsNorm(float (&v)[64], const float* w, int t) {
  float r0, r1;
  Rms(v, r0, r1);
  ScaleColumns(v, w, t, r0, r1);
}

// d += A x B for a 64-row tile: kSteps k16 steps, B images of kStepBytes per step. (Every
// GEMM here starts from its bias in d: SetColumns.)
template <int kN, int kSteps>
__device__ __forceinline__ void IssueGemm(float (&d)[kN / 2], const uint32_t (&a)[kSteps][4],
                                          const uint8_t* b) {
  constexpr int kStepBytes = kN == 128 ? kStepBytesN128 : kStepBytesN64;
  // K-major without swizzle: core matrices 128 bytes apart along K, 8-row groups 256 apart.
  // The steps' descriptors differ only in the start address (bits 0-13, 16-byte units), which
  // cannot carry into the next field (shared memory ends below 2^18 bytes): one add per step
  // instead of building each descriptor (five dependent uniform instructions before every wgmma).
  const uint64_t desc0 = SmemDesc(b, 128, 256);
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
    const uint64_t desc = desc0 + static_cast<uint64_t>(ks * (kStepBytes >> 4));
    if constexpr (kN == 128) {
      WgmmaM64N128K16(d, a[ks], desc, 1);
    } else {
      WgmmaM64N64K16(d, a[ks], desc, 1);
    }
  }
}

// kHeadMajor: RowParams::head_major, as a template parameter so that neither layout carries
// the other's address arithmetic.
template <bool kHeadMajor>
__global__ void __launch_bounds__(kThreads, 1) RowKernelWgmma(const RowParams p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint8_t* ring = smem + kRingOffset;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kFullOffset);
  unsigned* released = reinterpret_cast<unsigned*>(smem + kReleasedOffset);
  float* vec = reinterpret_cast<float*>(smem + kVectorsOffset);

  const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
  const int warp = tid >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool has_post = p.post_layer >= 0, has_qkv = p.qkv_layer >= 0;
  // With per-sample sync the next kernel (attention) may start before this one ends, so the
  // first row kernel lets it launch only once the adaLN (which zeroes the counters) is done.
  const bool first_synced = p.sample_sync && !has_post;
  if (!first_synced) LaunchDependents();
  // This CTA takes groups blockIdx.x, + gridDim.x, ... of the host's list (the grid is at most
  // one CTA per SM), one round each.
  const int rounds = (p.num_groups - blockIdx.x + gridDim.x - 1) / gridDim.x;
  auto group_stream = [&](int round) { return p.groups[blockIdx.x + round * gridDim.x].stream; };

  // Each round streams the chunks [out, mlp...] of post_layer, then [q, k, v] of qkv_layer, of
  // its group's stream; `chunk` counts them over all rounds.
  const int num_mlp = p.dim_ff / kWgmmaHidden;
  const int per_layer = WgmmaChunksPerLayer(p.dim_ff);
  const int pos0 = has_post ? 0 : 1 + num_mlp;
  const int per_round = (has_qkv ? per_layer : 1 + num_mlp) - pos0;
  const int num_chunks = rounds * per_round;
  auto chunk_src = [&](int i) {
    const int pos = pos0 + i % per_round;
    const int layer = pos < 1 + num_mlp ? p.post_layer : p.qkv_layer;
    return static_cast<const uint8_t*>(p.wgmma_images) +
           ((size_t)(layer * 2 + group_stream(i / per_round)) * per_layer + pos) * kWgmmaChunkBytes;
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarrierInit(&full[s], 1);
      released[s] = 0;
    }
    FenceMbarrierInit();
    // Weights are read-only: their first chunks load while the previous kernel finishes.
    for (int i = 0; i < min(kStages, num_chunks); ++i) {
      BulkLoad(ring + i * kWgmmaChunkBytes, chunk_src(i), kWgmmaChunkBytes, &full[i]);
    }
  }
  // The weights' vectors of both streams, also before the wait. Each value waits here for its
  // pointer's L2 trip and the next loads for its store; with every load issued at once the
  // forward measured 1-4 % slower at B = 16-256 (docs/BENCHMARKS.md, sixteenth round): this
  // prologue runs beside the kernel before, and its loads then compete with that kernel's.
  const int vec_floats = kUpB + p.dim_ff;
  for (int i = threadIdx.x; i < 2 * vec_floats; i += kThreads) {
    const int st = i / vec_floats, k = i % vec_floats;
    const StreamWeightsDev* wp = has_post ? &p.weights[p.post_layer * 2 + st] : nullptr;
    const StreamWeightsDev* wq = has_qkv ? &p.weights[p.qkv_layer * 2 + st] : nullptr;
    float v = 0.0f;
    const int f = WgmmaFeature(k % kD);
    if (k >= kUpB) {
      if (wp) v = 0.5f * wp->up_b[k - kUpB];  // halved, as the up weights; hidden units in order
    } else if (k < kQkvB) {
      if (wp) v = (k < kOutRms ? wp->out_b : k < kDownB ? wp->out_rms : wp->down_b)[f];
    } else if (wq) {
      v = k < kRmsQ   ? wq->qkv_b[(k - kQkvB) / kD * kD + f]
          : k < kRmsK ? wq->rms_q[f]
                      : wq->rms_k[f];
    }
    vec[i] = v;
  }
  float* mod = vec + 2 * vec_floats + wg * kModFloats;
  const __nv_bfloat16* xb_src = static_cast<const __nv_bfloat16*>(p.xb_src);
  __nv_bfloat16* xb_dst = static_cast<__nv_bfloat16*>(p.xb_dst);
  // This thread's residual features: four at a time, slot 2m + row (Quad) at resid[slot * 128].
  float4* resid = reinterpret_cast<float4*>(smem + kResidOffset + wg * kResidBytes) + tid;
  // A round's group and this warpgroup's tile; the first before the wait (the list is written
  // before the forward starts).
  // As 16-byte loads: header (count, stream, ...) and this warpgroup's GroupTile (its sample's
  // extent and items_target only where q/k/v and the attention output are head-major).
  static_assert(offsetof(RowGroup, count) == 0 && offsetof(RowGroup, stream) == 4 &&
                    offsetof(RowGroup, tiles) == 16 && sizeof(GroupTile) == 32 &&
                    offsetof(GroupTile, sample_tok0) == 16 &&
                    offsetof(GroupTile, sample_tokens) == 20 &&
                    offsetof(GroupTile, items_target) == 24,
                "RowGroup's layout, as loaded here");
  int4 header, mine, extent = make_int4(0, 0, 0, 0);
  auto load_group = [&](int round) {
    const RowGroup& gr = p.groups[blockIdx.x + round * gridDim.x];
    header = __ldg(reinterpret_cast<const int4*>(&gr));
    mine = __ldg(reinterpret_cast<const int4*>(&gr.tiles[wg]));
    if constexpr (kHeadMajor) extent = __ldg(reinterpret_cast<const int4*>(&gr.tiles[wg]) + 1);
  };
  if (rounds > 0) load_group(0);
  if (!p.sample_sync || !has_post) WaitForPredecessor();
  if (first_synced) LaunchDependents();
  __syncthreads();

  auto acquire = [&](int i) {
    MbarrierWait(&full[i % kStages], (i / kStages) & 1);
    return static_cast<const uint8_t*>(ring + (i % kStages) * kWgmmaChunkBytes);
  };
  // Called by every warp of the CTA for every chunk, in order, once its wgmma reads of it are
  // complete (a warpgroup with no tile in a round passes its chunks through).
  auto release = [&](int i) {
    __syncwarp();
    const int s = i % kStages;
    if (lane == 0 && i + kStages < num_chunks &&
        LastToReleaseStage(&released[s], (i / kStages + 1) * (kThreads / 32))) {
      BulkLoad(ring + s * kWgmmaChunkBytes, chunk_src(i + kStages), kWgmmaChunkBytes, &full[s]);
    }
  };
  // The 128 threads of this warpgroup (named barrier 1 + wg; 0 is __syncthreads).
  auto warpgroup_sync = [&] { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };
  // Per-sample sync: the sample whose q/k/v this warpgroup stored last and has not yet counted.
  // It is counted one round late, once those stores have long completed, so that the release
  // does not wait for them (each call follows a warpgroup barrier that orders every thread's
  // stores before it).
  int unsignalled = -1;
  auto signal_rows = [&] {
    if (unsignalled >= 0 && tid == 0) AddRelease(p.rows_done + unsignalled);
    unsignalled = -1;
  };
  int chunk = 0;
  for (int round = 0; round < rounds; ++round) {
    if (round > 0) load_group(round);
    const GroupTile tile{mine.x, mine.y, mine.z, mine.w, extent.x, extent.y, extent.z, 0};
    const int count = header.x, stream = header.y;
    if (wg >= count) {
      if (unsignalled >= 0) {
        warpgroup_sync();
        signal_rows();
      }
      for (int c = 0; c < per_round; ++c, ++chunk) {
        acquire(chunk);
        release(chunk);
      }
      continue;
    }
    const float* sv = vec + stream * vec_floats;
    const int tok0 = tile.tok0;
    const int r0 = 16 * warp + g, r1 = r0 + 8;
    const bool ok0 = r0 < tile.rows, ok1 = r1 < tile.rows;
    const size_t off0 = (size_t)(tok0 + (ok0 ? r0 : 0)) * kD;
    const size_t off1 = (size_t)(tok0 + (ok1 ? r1 : 0)) * kD;
    float acc[64];     // GEMM accumulator; between GEMMs the residual rows
    uint32_t a[8][4];  // A operand, K = 128
    // Where row r0 of head 0 is in the attention output and q/k/v (row r1 is 8 rows on; rows
    // past the tile are neither loaded nor stored), and the distance between heads: token-major
    // ([token][D]), or head-major within the sample ([head][token][Dh], RowParams::
    // head_major). 32-bit: Create bounds a batch's activations to 2^30 elements.
    constexpr int kRowStride = kHeadMajor ? kHeadDim : kD;
    int head0 = (tok0 + r0) * kD, head_stride = kHeadDim;
    if constexpr (kHeadMajor) {
      head0 = tile.sample_tok0 * kD + (tok0 - tile.sample_tok0 + r0) * kHeadDim;
      head_stride = tile.sample_tokens * kHeadDim;
    }
    // Issued first: the first GEMM waits for these, the rest of the setup does not. Attention
    // output rows straight into A fragments: features 16ks + 4t .. + 3 are a[ks][0], a[ks][2]
    // (row r0) and a[ks][1], a[ks][3] (row r1).
    if (has_post) {
      if (p.sample_sync) {
        if (tid == 0) WaitUntilAtLeast(p.items_done + tile.sample, tile.items_target);
        warpgroup_sync();
      }
      // Coherent loads (not the read-only path): with per-sample sync another kernel may still
      // be writing this buffer.
      const __nv_bfloat16* at = static_cast<const __nv_bfloat16*>(p.attn) + head0 + 4 * t;
#pragma unroll
      for (int ks = 0; ks < 8; ++ks) {  // ks: head
        const __nv_bfloat16* h = at + ks * head_stride;
        const uint2 u0 = ok0 ? __ldcg(reinterpret_cast<const uint2*>(h)) : make_uint2(0u, 0u);
        const uint2 u1 =
            ok1 ? __ldcg(reinterpret_cast<const uint2*>(h + 8 * kRowStride)) : make_uint2(0u, 0u);
        a[ks][0] = u0.x, a[ks][2] = u0.y, a[ks][1] = u1.x, a[ks][3] = u1.y;
      }
    }
    {
      // This warpgroup's modulation vectors, and its residual rows (cp.async, consumed after
      // the first GEMM).
      const size_t per_sample = (size_t)p.num_layers * 2 * 6 * kD;
      const float* mp =
          p.mod + tile.sample * per_sample + ((size_t)p.post_layer * 2 + stream) * 6 * kD;
      const float* mq =
          p.mod + tile.sample * per_sample + ((size_t)p.qkv_layer * 2 + stream) * 6 * kD;
      // Every load (the modulation into registers, the residual's copies) is issued before the
      // first store into shared memory: with in-order issue, the stores of post_layer's vectors
      // held the loads of qkv_layer's and the residual's copies behind their L2 trip.
      static_assert(kD == 128, "one feature of the modulation per thread of the warpgroup");
      const int f = WgmmaFeature(tid);
      float mv[6] = {};
      if (has_post) {
#pragma unroll
        for (int k = 0; k < 4; ++k) mv[k] = mp[(2 + k) * kD + f];
      }
      if (has_qkv) {
        mv[4] = mq[f];
        mv[5] = mq[kD + f];
      }
      if (xb_src != nullptr) {
#pragma unroll
        for (int m = 0; m < 8; ++m) {
          CpAsync8OrZero(resid + (2 * m) * 128, xb_src + off0 + 16 * m + 4 * t, ok0);
          CpAsync8OrZero(resid + (2 * m + 1) * 128, xb_src + off1 + 16 * m + 4 * t, ok1);
        }
      } else {
#pragma unroll
        for (int m = 0; m < 8; ++m) {
          CpAsync16OrZero(resid + (2 * m) * 128, p.x_src + off0 + 16 * m + 4 * t, ok0);
          CpAsync16OrZero(resid + (2 * m + 1) * 128, p.x_src + off1 + 16 * m + 4 * t, ok1);
        }
      }
      CpAsyncCommit();
      warpgroup_sync();  // the previous round's reads of mod are done
      if (has_post) {
        mod[kGateAttn + tid] = mv[0] * sv[kOutRms + tid];
        mod[kScaleMlp + tid] = 1.0f + mv[1];
        mod[kShiftMlp + tid] = mv[2];
        mod[kGateMlp + tid] = mv[3];
      }
      if (has_qkv) {
        mod[kScaleAttn + tid] = 1.0f + mv[4];
        mod[kShiftAttn + tid] = mv[5];
      }
      signal_rows();  // after the barrier above
      // No barrier here: the first reads of mod come after the first GEMM (has_post) or the
      // residual's wait, so its loads run under them. (The residual needs none: each thread
      // reads back only what it copied.)
    }

    // acc = bias + a x the next chunk (N = 128, K = 128), waited for; the chunk is released.
    auto gemm_n128 = [&](const float* bias) {
      SetColumns(acc, bias, t);
      const uint8_t* b = acquire(chunk);
      WgmmaFence();
      IssueGemm<128, 8>(acc, a, b);
      WgmmaCommit();
      WgmmaWaitAll();
      FenceRegs(acc);
      FenceRegs(a);
      release(chunk++);
    };
    if (has_post) {
      gemm_n128(sv + kOutB);
      warpgroup_sync();  // mod is written
      // Output projection + RMSNorm, gated residual (kept in shared memory for the MLP's); the
      // RMSNorm weight is folded into the gate.
      float rn0, rn1;
      Rms(acc, rn0, rn1);
      ResidualArrived(resid, xb_src != nullptr);
      ScaleColumns(acc, mod + kGateAttn, t, rn0, rn1);
      AddResidual(acc, resid, [&](int m, int row, float4 y) { resid[(2 * m + row) * 128] = y; });
      LayerNormToA(acc, mod + kScaleMlp, mod + kShiftMlp, t, a);
      SetColumns(acc, sv + kDownB, t);  // the down GEMMs accumulate onto the bias

      // MLP, kWgmmaHidden hidden units per chunk: up (N = 64) -> SiLU -> A operand -> down
      // (K = 64) accumulated into acc. (Leaving down(c) in flight while up(c + 1) is issued, one
      // wait per chunk: no spills, but 92 against 85 us per launch at B = 256.)
      for (int c = 0; c < num_mlp; ++c) {
        float hid[32];
        SetColumns(hid, sv + kUpB + c * kWgmmaHidden, t);  // hidden units in natural order
        const uint8_t* b = acquire(chunk);
        WgmmaFence();
        IssueGemm<64, 8>(hid, a, b);
        WgmmaCommit();
        WgmmaWaitAll();
        FenceRegs(hid);
        FenceRegs(a);
        uint32_t a2[4][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          a2[j / 2][2 * (j & 1)] = PackBf16(SiluOfHalf(hid[4 * j]), SiluOfHalf(hid[4 * j + 1]));
          a2[j / 2][2 * (j & 1) + 1] =
              PackBf16(SiluOfHalf(hid[4 * j + 2]), SiluOfHalf(hid[4 * j + 3]));
        }
        WgmmaFence();
        IssueGemm<128, 4>(acc, a2, b + kWgmmaChunkBytes / 2);
        WgmmaCommit();
        WgmmaWaitAll();
        FenceRegs(acc);
        FenceRegs(a2);
        release(chunk++);
      }
      // Gated residual of the MLP: the layer's output rows.
      ScaleColumns(acc, mod + kGateMlp, t);
      AddResidual(acc, resid, [&](int m, int row, float4 y) {
        if (!(row == 0 ? ok0 : ok1)) return;
        const size_t at = (row == 0 ? off0 : off1) + 16 * m + 4 * t;
        if (xb_dst != nullptr) {
          *reinterpret_cast<uint2*>(xb_dst + at) =
              make_uint2(PackBf16(y.x, y.y), PackBf16(y.z, y.w));
        } else if (p.x_dst != nullptr) {
          *reinterpret_cast<float4*>(p.x_dst + at) = y;
        }
      });
    } else {
      ResidualArrived(resid, xb_src != nullptr);
      warpgroup_sync();  // mod is written
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        SetQuad(acc, m, 0, resid[(2 * m) * 128]);
        SetQuad(acc, m, 1, resid[(2 * m + 1) * 128]);
      }
    }

    if (has_qkv) {
      LayerNormToA(acc, mod + kScaleAttn, mod + kShiftAttn, t, a);
      // Positions of this thread's rows for RoPE (x stream), clamped for rows past the tile.
      const int pos0 = tile.pos0 + (ok0 ? r0 : 0);
      const int pos1 = tile.pos0 + (ok1 ? r1 : 0);
      // q, k, v: one GEMM each (from its bias), then RMSNorm and RoPE for q and k, and the store.
      auto pass = [&](auto which) {
        constexpr int c = decltype(which)::value;
        gemm_n128(sv + kQkvB + c * kD);
        if constexpr (c < 2) {
          RmsNorm(acc, sv + (c == 0 ? kRmsQ : kRmsK), t);
          if (stream == 0) {
            // Features 16 (j / 2) + 4t + 2 (j % 2), + 1 are pair 2t + j % 2 of their head: one
            // 16-byte load per row holds both pairs of this lane.
            const float4 q0 =
                __ldg(reinterpret_cast<const float4*>(p.rope + pos0 * (kHeadDim / 2)) + t);
            const float4 q1 =
                __ldg(reinterpret_cast<const float4*>(p.rope + pos1 * (kHeadDim / 2)) + t);
            const float2 e0 = make_float2(q0.x, q0.y), o0 = make_float2(q0.z, q0.w);
            const float2 e1 = make_float2(q1.x, q1.y), o1 = make_float2(q1.z, q1.w);
            auto rotate = [&](int j, float2 c0, float2 c1) {
              const float u0 = acc[4 * j], u1 = acc[4 * j + 1];
              acc[4 * j] = u0 * c0.x - u1 * c0.y;
              acc[4 * j + 1] = u0 * c0.y + u1 * c0.x;
              const float w0 = acc[4 * j + 2], w1 = acc[4 * j + 3];
              acc[4 * j + 2] = w0 * c1.x - w1 * c1.y;
              acc[4 * j + 3] = w0 * c1.y + w1 * c1.x;
            };
#pragma unroll
            for (int j = 0; j < 16; j += 2) {
              rotate(j, e0, e1);
              rotate(j + 1, o0, o1);
            }
          }
        }
        __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(c == 0 ? p.q : c == 1 ? p.k : p.v);
#pragma unroll
        for (int m = 0; m < 8; ++m) {  // features 16m + 4t .. + 3: tiles 2m, 2m + 1
          __nv_bfloat16* head = dst + head0 + m * head_stride + 4 * t;
          if (ok0) {
            *reinterpret_cast<uint2*>(head) = make_uint2(PackBf16(acc[8 * m], acc[8 * m + 1]),
                                                         PackBf16(acc[8 * m + 4], acc[8 * m + 5]));
          }
          if (ok1) {
            *reinterpret_cast<uint2*>(head + 8 * kRowStride) =
                make_uint2(PackBf16(acc[8 * m + 2], acc[8 * m + 3]),
                           PackBf16(acc[8 * m + 6], acc[8 * m + 7]));
          }
        }
      };
      pass(std::integral_constant<int, 0>{});
      pass(std::integral_constant<int, 1>{});
      pass(std::integral_constant<int, 2>{});
      if (p.sample_sync) unsignalled = tile.sample;
    }
  }
  if (unsignalled >= 0) {
    warpgroup_sync();
    signal_rows();
  }
}

}  // namespace

absl::Status LaunchRowWgmma(const RowParams& params, cudaStream_t stream) {
  if (params.num_tiles == 0 || params.num_groups == 0) return absl::OkStatus();
  if (params.dim_ff % kWgmmaHidden != 0 || params.dim_ff > kWgmmaMaxDimFF) {
    return absl::UnimplementedError(
        absl::StrCat("the wgmma row kernel takes dim_feedforward a "
                     "multiple of 64 up to 2048; was ",
                     params.dim_ff));
  }
  // Raised once to what the largest F needs; each launch asks for what its F needs.
  static std::atomic<uint64_t> smem_set[2];
  auto* kernel = params.head_major ? RowKernelWgmma<true> : RowKernelWgmma<false>;
  if (absl::Status s = AllowDynamicSmem(reinterpret_cast<const void*>(kernel),
                                        SmemBytes(kWgmmaMaxDimFF),
                                        smem_set[params.head_major]);
      !s.ok()) {
    return s;
  }
  CUDA_RETURN_IF_ERROR(LaunchPdl(kernel, dim3(min(params.num_groups, params.num_sms)),
                                 dim3(kThreads), SmemBytes(params.dim_ff), stream, params));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace mmdit
