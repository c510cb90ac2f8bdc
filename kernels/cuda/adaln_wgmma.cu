// The bf16 adaLN on warpgroup MMAs (D = 128, compute capability 9.0): the same product as
// AdaLnMmaKernel (adaln_kernel.cu), mod = silu(Y) W^T + b with both operands split into bf16 hi
// and lo parts (a_lo w_hi + a_hi w_lo + a_hi w_hi), laid out so that an SM keeps independent
// work in flight instead of one short chain per CTA:
// - the weights stream through a ring of shared-memory stages by bulk copies, issued as soon
//   as a stage is free, so the next columns' weights arrive while the current ones' products
//   run;
// - each warpgroup holds the A operand of its 64 samples in registers for all its columns, its
//   SiLU computed once per CTA, not once per column block;
// - CTAs are persistent: each takes one sample block (64 samples per warpgroup) and a run of
//   its 64-column chunks.
// The mma.sync kernel takes ~26 us at B = 256 (Nsight, H100) for work whose products are ~4 us
// of wgmma time and whose traffic is ~28 MB; this one 16 us (docs/BENCHMARKS.md, twelfth and
// thirteenth rounds).
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

constexpr int kD = 128;
constexpr int kSteps = kD / 16;
// One stage: the hi then the lo image of 64 columns, then their bias (forward_kernels.h,
// kAdaLnChunkBytes).
constexpr int kImageBytes = kAdaLnChunkColumns * kD * 2;
static_assert(2 * kImageBytes + kAdaLnChunkColumns * 4 == kAdaLnChunkBytes,
              "a chunk is its hi and lo images and its bias");
constexpr int kStepBytes = kAdaLnChunkColumns * 16 * 2;  // one k16 step of an image

// Two warpgroups of 64 samples each share every stage (half the weights' reads from the L2 of
// one per CTA); one CTA per SM, six stages (194 KB).
constexpr int kWgs = 2;
constexpr int kThreads = 128 * kWgs;
constexpr int kStages = 6;
// After the stages: their `full` mbarriers, then their release counters.
constexpr size_t kSmemBytes =
    size_t{kStages} * kAdaLnChunkBytes + (sizeof(uint64_t) + sizeof(unsigned)) * kStages;

// Row stride of the y rows staged in shared memory: 136 floats puts the 8 rows of a quad's
// 8-byte reads in different banks.
constexpr int kYStride = kD + 8;

// silu(y) of this thread's fragment rows r and r + 8 (zero where past the batch) as bf16 hi and
// lo A fragments of the m16n8k16 layout, one per k16 step, from the staged rows.
__device__ __forceinline__ void SiluFragments(const float* ys, bool valid0, bool valid1, int t,
                                              uint32_t (&a_hi)[kSteps][4],
                                              uint32_t (&a_lo)[kSteps][4]) {
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool valid = (e & 1) ? valid1 : valid0;  // padding rows: no SiLU, zero operands
      const float2 v = valid ? *reinterpret_cast<const float2*>(
                                   ys + 8 * (e & 1) * kYStride + 16 * ks + 2 * t + 8 * (e >> 1))
                             : make_float2(0.0f, 0.0f);
      const float s0 = valid ? SiluFast(v.x) : 0.0f;
      const float s1 = valid ? SiluFast(v.y) : 0.0f;
      __nv_bfloat162 hi, lo;
      SplitBf16(s0, hi.x, lo.x);
      SplitBf16(s1, hi.y, lo.y);
      a_hi[ks][e] = *reinterpret_cast<uint32_t*>(&hi);
      a_lo[ks][e] = *reinterpret_cast<uint32_t*>(&lo);
    }
}

__global__ void __launch_bounds__(kThreads, 1) AdaLnWgmmaKernel(const AdaLnParams p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + size_t{kStages} * kAdaLnChunkBytes);
  unsigned* released = reinterpret_cast<unsigned*>(full + kStages);
  // The first row kernel's launch may start now: it waits for this grid's completion before it
  // reads the modulation, and its CTAs cannot share an SM with this one's shared memory anyway,
  // so they only take the SMs this grid leaves.
  LaunchDependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (p.progress != nullptr) {  // the forward's first kernel: every later one runs after it
    const int threads = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.progress_words; i += threads) {
      p.progress[i] = 0;
    }
  }
  const int n_total = p.num_layers * 2 * 6 * kD;
  const int n_chunks = n_total / kAdaLnChunkColumns;
  // CTA = (sample block, run of chunks): the host launches a whole number of CTAs per block.
  const int per_block = gridDim.x / ((p.batch + 64 * kWgs - 1) / (64 * kWgs));
  const int block = blockIdx.x / per_block, run = blockIdx.x % per_block;
  const int c0 = run * n_chunks / per_block, c1 = (run + 1) * n_chunks / per_block;
  const int row0 = block * 64 * kWgs, rows = min(64 * kWgs, p.batch - row0);
  const int wg = threadIdx.x >> 7, g = lane >> 2, t = lane & 3;
  const int r = wg * 64 + 16 * (warp & 3) + g;  // this thread's first fragment row in the block

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarrierInit(&full[s], 1);
      released[s] = 0;
    }
    FenceMbarrierInit();
  }
  __syncthreads();
  const uint8_t* images = static_cast<const uint8_t*>(p.w_images);
  auto issue = [&](int i) {
    BulkLoad(smem + static_cast<size_t>(i % kStages) * kAdaLnChunkBytes,
             images + size_t(c0 + i) * kAdaLnChunkBytes, kAdaLnChunkBytes, &full[i % kStages]);
  };

  // The block's rows of y, staged in the last kYStages stages (they take their weights once the
  // SiLU has read y). All of y's loads go out at once and before any weights: behind the CTAs'
  // bulk copies they waited for the whole stream, and loaded to registers one by one, each waited
  // for its L2 trip before the next issued (~9 us at B = 256, by clock stamps). The first stages'
  // weights load meanwhile.
  constexpr int kYStages = 3;
  static_assert(64 * kWgs * kYStride * sizeof(float) <= kYStages * size_t{kAdaLnChunkBytes},
                "the staged rows fit in their stages");
  float* ys = reinterpret_cast<float*>(smem + size_t{kStages - kYStages} * kAdaLnChunkBytes);
  for (int i = threadIdx.x; i < rows * (kD / 4); i += blockDim.x) {
    const int row = i / (kD / 4), q = i % (kD / 4);
    CpAsync16OrZero(ys + row * kYStride + 4 * q, p.y + (size_t)(row0 + row) * kD + 4 * q, true);
  }
  CpAsyncCommit();
  constexpr int kEarlyStages = kStages - kYStages;  // ~3 us less at B = 256 (Nsight, H100)
  if (threadIdx.x == 0) {
    for (int i = 0; i < min(kEarlyStages, c1 - c0); ++i) issue(i);
  }
  // The bias of a chunk is read from the images in global memory one chunk ahead, not from the
  // stage: the stages are then read by the MMAs alone. (Read from the stage, compute-sanitizer's
  // racecheck reported the bias reads against the refilling bulk copy, with the refill ordered
  // after them by an mbarrier or by counted releases alike.)
  // bias[j] is columns 8j + 2t and 8j + 2t + 1 of the chunk.
  auto load_bias = [&](int i, float2(&bias)[kAdaLnChunkColumns / 8]) {
    const float* src = reinterpret_cast<const float*>(
        images + static_cast<size_t>(c0 + i) * kAdaLnChunkBytes + 2 * kImageBytes);
#pragma unroll
    for (int j = 0; j < kAdaLnChunkColumns / 8; ++j) {
      bias[j] = __ldg(reinterpret_cast<const float2*>(src + 8 * j + 2 * t));
    }
  };
  float2 next_bias[kAdaLnChunkColumns / 8];
  if (c1 > c0) load_bias(0, next_bias);
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  uint32_t a_hi[kSteps][4], a_lo[kSteps][4];
  SiluFragments(ys + r * kYStride, r < rows, r + 8 < rows, t, a_hi, a_lo);
  __syncthreads();  // the staged rows are read: their space is the stages' from here

  // The other stages' first copies, now that the staged rows are read; each later copy is
  // issued by the last warp to release the stage's previous chunk (below). A producer warp of its
  // own would make nine warps, three on some schedulers, and cap the registers at 168 (the three
  // accumulators spilled).
  if (threadIdx.x == 0) {
    // The generic proxy's accesses to the staged rows before the bulk copies' writes over them.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    for (int i = kEarlyStages; i < min(kStages, c1 - c0); ++i) issue(i);
  }

  for (int i = 0; i < c1 - c0; ++i) {
    const int chunk = c0 + i;
    float2 bias[kAdaLnChunkColumns / 8];
#pragma unroll
    for (int j = 0; j < kAdaLnChunkColumns / 8; ++j) bias[j] = next_bias[j];
    if (i + 1 < c1 - c0) load_bias(i + 1, next_bias);
    const int s = i % kStages;
    const uint8_t* stage = smem + static_cast<size_t>(s) * kAdaLnChunkBytes;
    MbarrierWait(&full[s], (i / kStages) & 1);
    // One accumulator per product, so that three chains of eight wgmmas overlap: one chain of
    // 24 took ~1.2 us per chunk, each N = 64 product waiting for the one before.
    float acc[3][kAdaLnChunkColumns / 2];
    const uint64_t hi = SmemDesc(stage, 128, 256);
    const uint64_t lo = hi + (kImageBytes >> 4);
    WgmmaFence();
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const uint64_t step = static_cast<uint64_t>(ks * (kStepBytes >> 4));
      WgmmaM64N64K16(acc[0], a_lo[ks], hi + step, ks > 0);
      WgmmaM64N64K16(acc[1], a_hi[ks], lo + step, ks > 0);
      WgmmaM64N64K16(acc[2], a_hi[ks], hi + step, ks > 0);
    }
    WgmmaCommit();
    WgmmaWaitAll();
    FenceRegs(acc[0]);
    FenceRegs(acc[1]);
    FenceRegs(acc[2]);
    FenceRegs(a_hi);
    FenceRegs(a_lo);
    // out = bias + (the small terms first, as the mma.sync kernel) + hi x hi; acc[.][4j + e] is
    // column 8j + 2t + (e & 1).
    float out[kAdaLnChunkColumns / 2];
#pragma unroll
    for (int j = 0; j < kAdaLnChunkColumns / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out[4 * j + e] = (acc[0][4 * j + e] + acc[1][4 * j + e]) + acc[2][4 * j + e] +
                         ((e & 1) ? bias[j].y : bias[j].x);
      }
    }
    // The warp is done with the stage (its wgmma reads waited for): it counts itself out, and
    // the last of the CTA's warps refills the stage, as the row kernel's ring does.
    __syncwarp();
    if (lane == 0 && i + kStages < c1 - c0 &&
        LastToReleaseStage(&released[s], (i / kStages + 1) * (kThreads / 32))) {
      issue(i + kStages);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r + 8 * h;
      if (row >= p.batch) continue;
      float* dst = p.mod + (size_t)row * n_total + chunk * kAdaLnChunkColumns + 2 * t;
#pragma unroll
      for (int j = 0; j < kAdaLnChunkColumns / 8; ++j) {
        Store2(dst + 8 * j, out[4 * j + 2 * h], out[4 * j + 2 * h + 1]);
      }
    }
  }
}

}  // namespace

absl::Status LaunchAdaLnWgmma(const AdaLnParams& params, cudaStream_t stream) {
  if (params.batch == 0) return absl::OkStatus();
  if (params.dim != kD || params.num_sms <= 0) {
    return absl::UnimplementedError(
        absl::StrCat("the wgmma adaLN takes dim 128; was ", params.dim));
  }
  static std::atomic<uint64_t> smem_set;
  if (absl::Status s =
          AllowDynamicSmem(reinterpret_cast<const void*>(AdaLnWgmmaKernel), kSmemBytes, smem_set);
      !s.ok()) {
    return s;
  }
  // Each sample block gets an equal share of the SMs (at least one CTA), each CTA a run of its
  // chunks, so that a CTA stages and converts one block's y.
  const int n_chunks = params.num_layers * 2 * 6 * kD / kAdaLnChunkColumns;
  const int blocks = (params.batch + 64 * kWgs - 1) / (64 * kWgs);
  const int per_block = std::clamp(params.num_sms / blocks, 1, n_chunks);
  AdaLnWgmmaKernel<<<blocks * per_block, kThreads, kSmemBytes, stream>>>(params);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace mmdit
