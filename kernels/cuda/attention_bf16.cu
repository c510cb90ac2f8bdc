// Joint attention, bf16, as a persistent kernel: the grid is as many CTAs as fit on the device
// at once, and each CTA walks a contiguous range of work items (a tile of queries of one sample,
// one head; under per-sample sync, chunks of them strided over the grid) while the next item's
// keys and values stream into the next of two or three stage buffers (cp.async). The
// one-item-per-CTA kernel (attention_kernel.cu) spent most of its time in each CTA's serial
// start: the tile and sample lookups, the Q loads and the K/V staging before the first MMA (96 us
// per layer at B = 256 against ~20 us of issued instructions, docs/BENCHMARKS.md).
//
// Per item: each warp owns 16 queries and streams every key of the sample (x keys, then context
// keys) through shared memory in stages of 256, in 64-key score blocks held in registers, with
// an online softmax in exp2 (scale folded in), or, where the weights bound the scores
// (AttentionParams::scores_bounded), exp2 of the products as they are. K and V are staged
// row-major as they are in global memory; ldmatrix gives the B fragments of Q K^T and,
// transposed, of P V.
#include <atomic>
#include <type_traits>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"

namespace mmdit {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kStageKeys = 256;

// kBufs stages of keys and values: two, with two CTA barriers per step (the copies are in; every
// warp is done with a buffer before its refill), or three where a CTA has the shared memory for
// them, with no CTA barrier: each buffer has an mbarrier that completes when every thread's
// copies into it have landed (`full`) and one that completes when every thread has read it
// (`empty`). A buffer is refilled two steps after it was read, so a warp waits only for the
// slowest to have finished the step before last, not the last one.
template <int kBufs>
struct StageBuffers {
  bf16 k[kBufs][kStageKeys * kBf16RowStride];
  bf16 v[kBufs][kStageKeys * kBf16RowStride];
  uint64_t full[kBufs];   // three buffers only
  uint64_t empty[kBufs];
  // Per-sample sync: the last item of the chunk whose last stage a buffer held, not yet counted
  // (-1: none, or the buffer held another stage or item).
  int done_item[kBufs];
};

// This thread's cp.async copies so far arrive on `bar` once they land (noinc: the arrival is
// one of the count `bar` was initialised with).
__device__ __forceinline__ void CpAsyncArriveOn(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(SmemAddr(bar))
               : "memory");
}
// Three for 256-query tiles (two CTAs per SM, 2 x 72 KB). On an H100 at B = 256 (docs/
// BENCHMARKS.md, eighth round): one CTA barrier per step instead of two, attention 65.4 -> 63.8
// us; none, with the mbarriers, the whole forward 1.627 -> 1.587 ms. Four 128-query CTAs per SM
// have no room.
template <int kWarps>
__host__ __device__ constexpr int StageBufferCount() {
  return kWarps == 16 ? 3 : 2;
}

// One work item: a query tile and a head.
struct Item : AttnTile {
  int head;
};

// Item `index` is head index % H of query tile index / H; H (a power of two) = 1 << log2_heads.
// (A division by the number of tiles here was ~30 emulation instructions per item.)
__device__ __forceinline__ Item DecodeItem(const AttentionParams& p, int index, int log2_heads) {
  Item it;
  static_cast<AttnTile&>(it) = p.tiles[index >> log2_heads];
  it.head = index & ((1 << log2_heads) - 1);
  return it;
}

// Per-sample sync: a CTA takes half of a tile's heads (H / 2 consecutive items) at a time, so that
// it loads the tile's fields, waits for its sample's rows and counts the items done (a memory
// barrier) once per chunk rather than once per item, while each sample is still spread over two
// CTAs that finish it at about the same time. H100, bf16 B = 256: the chunks took 0.9-1.4 % off
// in four calls, the one count per chunk another 1.7 % (docs/BENCHMARKS.md, eleventh round).
__host__ __device__ constexpr int SyncChunkLog2(int log2_heads) {
  return log2_heads > 0 ? log2_heads - 1 : 0;
}

__device__ __forceinline__ void CpAsyncWaitPrior() {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

// Where the item's head starts in q, k, v and the output, and the distance between its rows:
// token-major ([token][D]) or head-major within the sample ([head][token][Dh],
// AttentionParams::head_major). 32-bit element offsets: Create bounds a batch's activations to
// 2^30 elements.
struct HeadRows {
  int base;
  int stride;
};
__device__ __forceinline__ HeadRows ItemRows(const AttentionParams& p, const Item& it) {
  return p.head_major ? HeadRows{it.tok_off * p.dim + it.head * kHeadDim * it.num_keys, kHeadDim}
                      : HeadRows{it.tok_off * p.dim + it.head * kHeadDim, p.dim};
}

// Keys [st * kStageKeys, +kStageKeys) of the item's head: K and V rows of 16 values.
template <int kThreads>
__device__ __forceinline__ void StageKeys(const AttentionParams& p, const Item& it, int st,
                                          bf16* ks, bf16* vs) {
  const int key0 = st * kStageKeys;
  const HeadRows rows = ItemRows(p, it);
  const bf16* k = static_cast<const bf16*>(p.k);
  const bf16* v = static_cast<const bf16*>(p.v);
#pragma unroll
  for (int i = threadIdx.x; i < 2 * kStageKeys; i += kThreads) {
    const int j = i >> 1, h = (i & 1) * 8;
    const bool valid = key0 + j < it.num_keys;
    const int src = rows.base + (valid ? key0 + j : 0) * rows.stride + h;
    CpAsync16OrZero(ks + j * kBf16RowStride + h, k + src, valid);
    CpAsync16OrZero(vs + j * kBf16RowStride + h, v + src, valid);
  }
}

// A fragment of the warp's 16 queries (rows clamped to the sample).
__device__ __forceinline__ void LoadQuery(const AttentionParams& p, const Item& it, int warp,
                                          uint32_t (&qa)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int r0 = min(it.q0 + warp * 16 + g, it.num_keys - 1);
  const int r1 = min(it.q0 + warp * 16 + g + 8, it.num_keys - 1);
  const HeadRows rows = ItemRows(p, it);
  const bf16* q = static_cast<const bf16*>(p.q) + rows.base + 2 * t;
  qa[0] = *reinterpret_cast<const uint32_t*>(q + r0 * rows.stride);
  qa[1] = *reinterpret_cast<const uint32_t*>(q + r1 * rows.stride);
  qa[2] = *reinterpret_cast<const uint32_t*>(q + r0 * rows.stride + 8);
  qa[3] = *reinterpret_cast<const uint32_t*>(q + r1 * rows.stride + 8);
}

// kSynced: per-sample sync (AttentionParams::rows_done set), as a template parameter so that the
// kernels without it keep their registers.
template <int kWarps, int kMinBlocks, bool kBounded, bool kSynced>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    AttentionBf16Kernel(const AttentionParams p) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kBufs = StageBufferCount<kWarps>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  StageBuffers<kBufs>& sb = *reinterpret_cast<StageBuffers<kBufs>*>(smem_raw);
  LaunchDependents();
  const int num_items = p.num_tiles * (p.dim / kHeadDim);
  const int log2_heads = __ffs(p.dim / kHeadDim) - 1;
  // Contiguous ranges, or with per-sample sync every gridDim.x-th chunk (AttentionParams).
  const int chunk_log2 = kSynced ? SyncChunkLog2(log2_heads) : 0;
  const int chunk_mask = (1 << chunk_log2) - 1;  // an item's place in its chunk
  const int begin =
      kSynced ? (int)blockIdx.x << chunk_log2 : (int)((int64_t)blockIdx.x * num_items / gridDim.x);
  const int end = kSynced ? num_items : (int)((int64_t)(blockIdx.x + 1) * num_items / gridDim.x);
  if (begin >= end) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint32_t k_lane = KRowOffset(lane), v_lane = VRowOffset(lane);

  int index = begin, st = 0;
  Item it = DecodeItem(p, index, log2_heads);
  if constexpr (!kSynced) WaitForPredecessor();
  int step = 0;  // steps so far: step s reads buffer s % kBufs, in its (s / kBufs)th use
  if constexpr (kBufs == 3) {
    if (threadIdx.x == 0) {
      for (int b = 0; b < kBufs; ++b) {
        MbarrierInit(&sb.full[b], kThreads);
        MbarrierInit(&sb.empty[b], kThreads);
        sb.done_item[b] = -1;
      }
    }
    __syncthreads();
  }
  // Per-sample sync, thread 0 only: counts the chunk whose last stage buffer `b` held, once every
  // thread has arrived on the buffer's `empty` barrier after its stores (the release at GPU scope
  // then covers them all, and the chunk's earlier items too). One count per chunk and CTA:
  // releases by every warp (a memory barrier each) or by every thread were slower than the whole
  // kernel's wait.
  auto signal_buffer = [&](int b) {
    const int done = sb.done_item[b];
    if (done >= 0) {
      AddRelease(p.items_done + __ldg(&p.tiles[done >> log2_heads].sample), 1u << chunk_log2);
      sb.done_item[b] = -1;
    }
  };
  // Per-sample sync: every thread waits (its own acquire: one request per warp) for the q/k/v of
  // an item's sample before it stages or reads any of them. (One lane's or one warp's acquire
  // instead, passed on by a warp barrier or an mbarrier, cost 90 bytes more of spills in the
  // 64-register kernel, in its loop: slower than whole-kernel waits.)
  auto wait_rows = [&](int item) {
    const AttnTile& tile = p.tiles[item >> log2_heads];
    WaitUntilAtLeast(p.rows_done + __ldg(&tile.sample), __ldg(&tile.rows_target));
  };
  if constexpr (kSynced) wait_rows(index);
  StageKeys<kThreads>(p, it, 0, sb.k[0], sb.v[0]);
  if constexpr (kBufs == 3) {
    CpAsyncArriveOn(&sb.full[0]);
  } else {
    CpAsyncCommit();
  }
  uint32_t qa[4];
  LoadQuery(p, it, warp, qa);

  float m0 = -INFINITY, m1 = -INFINITY;  // softmax offsets of rows g, g + 8 (raw scores)
  float b0 = 0.0f, b1 = 0.0f;            // the same times scale_log2 (0 while -inf)
  const float lazy = kLazyLog2 / p.scale_log2;
  float o[2][4] = {};
  float osum[4] = {};  // row sums of P: rows g (0, 1) and g + 8 (2, 3)
  while (true) {
    const int buf = step % kBufs, next_buf = (step + 1) % kBufs;
    // The next step: the next stage of this item, or the first of the next item.
    int next_index = index, next_st = st + 1;
    if (next_st * kStageKeys >= it.num_keys) {
      next_index = index + 1;
      if (kSynced && (next_index & chunk_mask) == 0) {  // the chunk's end
        next_index += ((int)gridDim.x - 1) << chunk_log2;
      }
      next_st = 0;
    }
    const bool has_next = next_index < end;
    Item next = it;
    if (has_next) {
      // Consecutive items are mostly heads of one query tile: its fields are reused, the load
      // (whose latency every thread waited for before staging) only where the tile changes.
      // Not at four CTAs per SM (64 registers, spilling): there it cost more than it saved
      // (H100, B = 256: 1.784 -> 1.802 ms), at three it saves (B = 512: 3.817 -> 3.749 ms).
      constexpr bool kReuseTile = kMinBlocks < 4;
      if (!kReuseTile || (next_index >> log2_heads) != (index >> log2_heads)) {
        next = DecodeItem(p, next_index, log2_heads);
        if constexpr (kSynced) wait_rows(next_index);  // a new tile: a new sample
      } else {
        next.head = next_index & ((1 << log2_heads) - 1);
      }
      if constexpr (kBufs == 3) {
        // Its last readers were step + 1 - 3: wait until every thread is done with them.
        if (step + 1 >= kBufs) {
          MbarrierWait(&sb.empty[next_buf], ((step + 1) / kBufs - 1) & 1);
          if (kSynced && threadIdx.x == 0) signal_buffer(next_buf);
        }
      }
      StageKeys<kThreads>(p, next, next_st, sb.k[next_buf], sb.v[next_buf]);
      if constexpr (kBufs == 3) CpAsyncArriveOn(&sb.full[next_buf]);
    }
    if constexpr (kBufs == 3) {
      MbarrierWait(&sb.full[buf], (step / kBufs) & 1);
    } else {
      CpAsyncCommit();
      CpAsyncWaitPrior();
      __syncthreads();
    }

    const int r0 = it.q0 + warp * 16 + g, r1 = r0 + 8;
    const bool active = it.q0 + warp * 16 < it.num_keys;  // warp-uniform
    const int rr0 = min(r0, it.num_keys - 1), rr1 = min(r1, it.num_keys - 1);
    const uint32_t* mask = it.mask_off >= 0 ? p.mask_bits + it.mask_off : nullptr;
    const int kstage = st * kStageKeys;
    // Shared-memory addresses of this lane's ldmatrix rows in this stage's buffers.
    const uint32_t k_base = k_lane + static_cast<uint32_t>(__cvta_generic_to_shared(sb.k[buf]));
    const uint32_t v_base = v_lane + static_cast<uint32_t>(__cvta_generic_to_shared(sb.v[buf]));
    // One 64-key block at key kb; kMode 0: every key visible (full blocks without a mask), 1:
    // keys past the sample's last hidden (its last block), 2: the mask's visibility bits.
    auto block = [&](int kb, auto mode) {
      constexpr int kMode = decltype(mode)::value;
      const uint32_t kl_bytes = (kb - kstage) * kBf16RowStride * 2;
      float s[8][4];
      ScoreBlockBf16(s, qa, k_base + kl_bytes);
      if constexpr (kMode == 2) {
        MaskScoreBlock(s, mask, it.seq_len, it.num_keys, rr0, rr1, kb, t);
      } else if constexpr (kMode == 1) {
        // Whole 8-key tiles are tested first (warp-uniform), single keys only where needed.
        const int lim = it.num_keys - kb;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (8 * j + 8 > lim) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (8 * j + 2 * t + e >= lim) s[j][e] = s[j][2 + e] = -INFINITY;
            }
          }
        }
      }
      if constexpr (!kBounded) {
        float mx0, mx1;
        BlockRowMax(s, mx0, mx1);
        LazyRescale(mx0, mx1, lazy, p.scale_log2, m0, m1, b0, b1, o, osum);
        ToExponents(s, b0, b1, p.scale_log2);
      }
      AccumulatePV(s, v_base + kl_bytes, o, osum);
    };
    if (active) {
      const int kend = min(it.num_keys, kstage + kStageKeys);
      if (mask != nullptr) {
        for (int kb = kstage; kb < kend; kb += kKeyBlock)
          block(kb, std::integral_constant<int, 2>{});
      } else {
        int kb = kstage;
        for (; kb + kKeyBlock <= kend; kb += kKeyBlock) block(kb, std::integral_constant<int, 0>{});
        if (kb < kend) block(kb, std::integral_constant<int, 1>{});
      }
    }

    const bool last_stage = next_index != index || !has_next;
    if (last_stage) {
      if (active) {
        // Approximate reciprocals: the output is rounded to bf16.
        const float inv0 = __fdividef(1.0f, osum[0]), inv1 = __fdividef(1.0f, osum[2]);
        const HeadRows rows = ItemRows(p, it);
        bf16* out = static_cast<bf16*>(p.out) + rows.base + 2 * t;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          if (r0 < it.num_keys) {
            Store2(out + r0 * rows.stride + 8 * n, o[n][0] * inv0, o[n][1] * inv0);
          }
          if (r1 < it.num_keys) {
            Store2(out + r1 * rows.stride + 8 * n, o[n][2] * inv1, o[n][3] * inv1);
          }
        }
      }
      if (has_next) LoadQuery(p, next, warp, qa);
      m0 = m1 = -INFINITY;
      b0 = b1 = 0.0f;
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][e] = o[1][e] = osum[e] = 0.0f;
    }
    if (!has_next) {
      if constexpr (kSynced) {  // this item and those of the last two steps
        __syncthreads();
        if (threadIdx.x == 0) {
          sb.done_item[buf] = index;
          for (int b = 0; b < kBufs; ++b) signal_buffer(b);
        }
      }
      break;
    }
    if constexpr (kBufs == 2) {
      __syncthreads();  // every warp is done with `buf` before it is refilled
    } else {
      // This thread's reads of `buf` are done. (Without the __syncwarp, which orders nothing
      // here, ptxas spills 376 bytes instead of 168. With one arrival per warp after it,
      // racecheck reported each refill against the other lanes' reads.)
      if (kSynced && threadIdx.x == 0) {
        const bool chunk_done = last_stage && (index & chunk_mask) == chunk_mask;
        sb.done_item[buf] = chunk_done ? index : -1;
      }
      __syncwarp();
      MbarrierArrive(&sb.empty[buf]);
    }
    ++step;
    index = next_index;
    st = next_st;
    it = next;
  }
}

template <int kWarps, int kMinBlocks, bool kBounded, bool kSynced = false>
absl::Status LaunchPersistent(const AttentionParams& params, cudaStream_t stream) {
  constexpr size_t kSmem = sizeof(StageBuffers<StageBufferCount<kWarps>()>);
  constexpr auto kernel = AttentionBf16Kernel<kWarps, kMinBlocks, kBounded, kSynced>;
  static std::atomic<uint64_t> smem_allowed{0};
  if (absl::Status s =
          AllowDynamicSmem(reinterpret_cast<const void*>(kernel), kSmem, smem_allowed);
      !s.ok()) {
    return s;
  }
  static std::atomic<int> ctas_per_sm{0};
  int per_sm = ctas_per_sm.load(std::memory_order_relaxed);
  if (per_sm == 0) {
    CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kernel, kWarps * 32, kSmem));
    per_sm = max(per_sm, 1);
    ctas_per_sm.store(per_sm, std::memory_order_relaxed);
  }
  const int heads = params.dim / kHeadDim;
  const int items = params.num_tiles * heads;
  const int chunks = kSynced ? items >> SyncChunkLog2(__builtin_ctz(heads)) : items;
  const int grid = min(chunks, per_sm * params.num_sms);
  CUDA_RETURN_IF_ERROR(
      LaunchPdl(kernel, dim3(grid), dim3(kWarps * 32), kSmem, stream, params));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchAttentionBf16Persistent(const AttentionParams& params, int tile_queries,
                                           cudaStream_t stream) {
  if (params.num_tiles == 0) return absl::OkStatus();
  if (params.rows_done != nullptr && tile_queries != 256) {
    return absl::UnimplementedError("per-sample sync takes 256-query attention tiles");
  }
  // Three 256-thread CTAs per SM (80 registers): 84.8 us per layer at B = 256 against 95.5 with
  // two (128 registers). Bounded scores need fewer registers: four CTAs (64 registers, some
  // spilled) took 66.0 us against 68.5 with three (H200), the loop being latency-bound, where the
  // keys and values fit in the L2 (AttentionParams::keys_fit_l2).
  if (tile_queries == 128) {
    if (!params.scores_bounded) return LaunchPersistent<8, 3, false>(params, stream);
    return params.keys_fit_l2 ? LaunchPersistent<8, 4, true>(params, stream)
                              : LaunchPersistent<8, 3, true>(params, stream);
  }
  if (tile_queries == 256) {
    if (params.rows_done != nullptr) {
      return params.scores_bounded ? LaunchPersistent<16, 2, true, true>(params, stream)
                                   : LaunchPersistent<16, 1, false, true>(params, stream);
    }
    return params.scores_bounded ? LaunchPersistent<16, 2, true>(params, stream)
                                 : LaunchPersistent<16, 1, false>(params, stream);
  }
  if (tile_queries == 64) {
    return params.scores_bounded ? LaunchPersistent<4, 6, true>(params, stream)
                                 : LaunchPersistent<4, 6, false>(params, stream);
  }
  return absl::UnimplementedError(
      absl::StrCat("attention tiles of ", tile_queries, " queries; supported: 64, 128, 256"));
}

}  // namespace cuda
}  // namespace mmdit
