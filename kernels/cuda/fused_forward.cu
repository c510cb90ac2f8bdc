// The forward of a small bf16 batch with every 16-token row tile on a cluster of kClusterSplit
// CTAs that computes the tile's attention as well as its rows. Per layer:
//   attention   the tile's 16 queries (joint rows of its sample), two heads per CTA, the keys
//               split over four warps per head (attention_split_keys.cuh);
//   gather      each CTA pushes its heads' attention rows into every CTA's operand buffer
//               (st.async, counted by the receiver's mbarrier);
//   row phase   the tile's passes (row_common.cuh): the end of the layer and the q/k/v of the
//               next (odd and even layers' in separate buffers: a CTA past its attention writes
//               the next layer's while others still read these).
// Two ways to launch it, both opt-in (CudaForwardOptions):
//   one launch per layer (after the row kernel's q/k/v of layer 0): the kernel boundary orders
//               every tile's q, k and v before the next layer's attention, and the residual
//               goes through global memory between layers. On an H100 at B = 1 within 1-2 % of
//               one launch per kernel (docs/BENCHMARKS.md, seventeenth round): a boundary less
//               per layer, but the attention on half the SMs (clusters of eight, one head per
//               CTA, were far slower: an H100 holds 15 such clusters at once, B = 1 needs 16);
//   one launch for the whole forward: the clusters stay resident for all layers, the
//               residual stays in shared memory, and a grid barrier replaces the boundary (the
//               next layer's vectors, modulation and first fragments load while it waits). The
//               barrier after the q/k/v stores costs what a boundary does: level with one launch
//               per kernel on an H100 at B = 1, not faster. Polling the q/k/v words themselves
//               instead (each carrying its layer's flag) was slower still: a CTA's polls move
//               twice its keys' bytes every round (docs/BENCHMARKS.md, seventeenth round).
// The grid barrier needs every CTA resident at once: that launch is cooperative (the driver
// refuses a grid that cannot be), and the host takes either path only for grids that fit.
#include <cuda_bf16.h>

#include <atomic>

#include "kernels/cuda/attention_split_keys.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/row_common.cuh"

namespace mmdit {
namespace cuda {
namespace {

using namespace row;  // NOLINT: the row passes' building blocks
using bf16 = __nv_bfloat16;

constexpr Precision kP = Precision::kBf16;
constexpr int kD = 128;
constexpr int kSplit = kClusterSplit;
using Shape = RowShape<kP, kD, 1>;
constexpr int kHeadsPerCta = kD / kHeadDim / kSplit;
constexpr int kKeyWarps = kThreads / 32 / kHeadsPerCta;  // warps splitting one head's keys
static_assert(kHeadsPerCta * kKeyWarps * 32 == kThreads, "the CTA's warps cover its heads");
static_assert(kFusedMaxDimFF <= kMaxStagedFF, "the MLP's up bias is staged");

struct AttentionSmem {
  SplitKeysBuffers warp[kThreads / 32];
  SplitKeysPartial part[kThreads / 32][32];
};

// Shared memory: the row passes' regions (as the row kernel lays them out), then the slots of the
// partial down products (written by the peers), whose space the attention phase's buffers reuse,
// then the RoPE rows of the tile.
constexpr size_t kXsBytes = sizeof(float) * Shape::kM * Shape::kXs;
constexpr size_t kAsOffset = kXsBytes + Shape::kOutBytes;
constexpr size_t kVsOffset = kAsOffset + sizeof(bf16) * Shape::kM * Shape::kAs;
constexpr size_t kPsOffset = kVsOffset + VectorBytes(kD, kMaxStagedFF);
constexpr size_t kRopeOffset =
    kPsOffset + (Shape::ExchangeBytes(kSplit) > sizeof(AttentionSmem)
                     ? Shape::ExchangeBytes(kSplit)
                     : sizeof(AttentionSmem));
constexpr size_t kSmemBytes = kRopeOffset + sizeof(float2) * Shape::kM * (kHeadDim / 2);
static_assert(kPsOffset % 16 == 0 && kRopeOffset % 16 == 0 && Shape::kAs * sizeof(bf16) % 16 == 0,
              "16-byte aligned regions and rows");
// The bytes of attention rows a CTA receives per layer: its peers' heads, 16 rows each.
constexpr unsigned kGatherBytes =
    (kSplit - 1) * kHeadsPerCta * Shape::kM * kHeadDim * sizeof(bf16);

// The grid barrier: arrivals count up through the launch (the target of layer l's barrier is
// (l + 1) x grid); each CTA then counts its departure after its last barrier, and the last one
// zeroes both, so the next launch starts from zero.
__device__ __forceinline__ void GridArrive(unsigned* arrivals) {
  __syncthreads();  // the CTA's stores are ordered before thread 0's release
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(arrivals) : "memory");
  }
}
__device__ __forceinline__ void GridWait(const unsigned* arrivals, unsigned target) {
  if (threadIdx.x == 0) {
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(arrivals) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}
__device__ __forceinline__ void GridDepart(unsigned* sync) {
  if (threadIdx.x == 0) {
    unsigned prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(prev)
                 : "l"(sync + 1)
                 : "memory");
    if (prev == gridDim.x - 1) {
      sync[0] = 0;
      sync[1] = 0;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) FusedForwardKernel(const FusedForwardParams fp) {
  const RowParams& p = fp.row;
  extern __shared__ __align__(128) unsigned char smem[];
  RowWork<kP> w;
  w.xs = reinterpret_cast<float*>(smem);
  w.ss = w.xs + Shape::kM * Shape::kXs;
  w.as = reinterpret_cast<bf16*>(smem + kAsOffset);
  w.vs = reinterpret_cast<float*>(smem + kVsOffset);
  w.ps = reinterpret_cast<float*>(smem + kPsOffset);
  // Outside the attention's buffers, which reuse the slots: the mbarriers keep their phases.
  __shared__ uint64_t exchange_bar, gather_bar;
  w.exchange_bar = &exchange_bar;
  AttentionSmem& attn = *reinterpret_cast<AttentionSmem*>(smem + kPsOffset);
  float2* rope = reinterpret_cast<float2*>(smem + kRopeOffset);
  w.rank = blockIdx.x % kSplit;
  // The layers this launch finishes: all of them after layer 0's q/k/v (one launch), or one whose
  // q, k and v the launch before wrote.
  const bool whole = fp.layer < 0;
  const int first = whole ? 0 : fp.layer, last = whole ? p.num_layers : fp.layer + 1;

  // At its start: launched per layer, letting the next launch start after the wait, after the
  // attention or after the gather instead measured the same on an H100 (docs/BENCHMARKS.md,
  // sixteenth round).
  LaunchDependents();
  const RowTile tile = p.tiles[blockIdx.x / kSplit];
  const SampleInfo si = p.samples[tile.sample];
  const int num_keys = si.seq_len + si.ctx_len;
  const int q0 = (tile.stream ? si.seq_len : 0) + tile.row0;  // the tile's first joint row
  w.tok0 = si.tok_off + q0;
  w.rows = tile.rows;
  w.dim_ff = p.dim_ff;
  w.up_b = w.vs + kVUpB * kD;  // the host takes this path for F <= kMaxStagedFF only
  w.rope = tile.stream == 0;
  w.rope_rows = rope;
  w.exchange_parity = 0;
  // q, k and v by layer parity (FusedForwardParams::qkv_odd).
  bf16* const qkv[2][3] = {
      {static_cast<bf16*>(p.q), static_cast<bf16*>(p.k), static_cast<bf16*>(p.v)},
      {static_cast<bf16*>(fp.qkv_odd), static_cast<bf16*>(fp.qkv_odd) + fp.qkv_odd_tokens * kD,
       static_cast<bf16*>(fp.qkv_odd) + 2 * (size_t)fp.qkv_odd_tokens * kD}};
  auto use_qkv_of = [&](int layer) {
    w.q = qkv[layer & 1][0];
    w.k = qkv[layer & 1][1];
    w.v = qkv[layer & 1][2];
  };
  // The tile's stream's weight pointers of every layer, in shared memory: each layer's first
  // loads (vectors, fragments) would otherwise wait on an L2 trip for the pointers.
  __shared__ StreamWeightsDev weights[kFusedMaxLayers];
  for (int l = threadIdx.x; l < p.num_layers; l += kThreads) {
    weights[l] = p.weights[2 * l + tile.stream];
  }
  __syncthreads();
  // The row phase that finishes `layer` (-1: none) and computes the q/k/v of the next.
  auto finish = [&](int layer) {
    w.wp = layer >= 0 ? &weights[layer] : nullptr;
    w.wq = layer + 1 < p.num_layers ? &weights[layer + 1] : nullptr;
    w.x_dst = layer + 1 == last ? p.x_dst : nullptr;
    use_qkv_of(layer + 1);
  };
  const float* mod = p.mod + tile.sample * (size_t)p.num_layers * 2 * 6 * kD;
  auto modulation = [&](int layer) {
    return LoadModulation<kD>(mod, tile.stream, layer, layer + 1 < p.num_layers ? layer + 1 : -1);
  };

  // Before the wait on the kernel before: the tile's RoPE rows, the first row phase's vectors and
  // first fragments.
  StageRopeRows<Shape::kM>(rope, p.rope, si.start_pos + tile.row0, w.rows, w.rope);
  finish(whole ? -1 : first);
  WFrags<kD> frags;
  {
    const WDesc<kP> first_pass = FirstPass<kP, kD, kSplit>(w);
    if (first_pass.wf != nullptr) LoadFrags(frags, first_pass);
  }
  WeightVectors<kD> vectors;
  vectors.Load(w.wp, w.wq, p.dim_ff);
  vectors.Store(w.vs);
  // The mbarriers before the wait: after it, thread 0's fence waited for its tile loads, and a CTA
  // barrier then held every warp's attention behind that L2 trip.
  if (threadIdx.x == 0) {
    MbarrierInit(&exchange_bar, 1);
    MbarrierInit(&gather_bar, 1);
    FenceMbarrierInit();
  }
  ClusterArrive();  // the first gather waits for it: every CTA's mbarriers are initialised
  WaitForPredecessor();
  TileModulation mv = modulation(whole ? -1 : first);
  // The residual rows stay in registers until they are needed: launched per layer, stored before
  // the attention, they held its loads behind their own L2 trip.
  ResidualTile<kD, Shape::kM> x;
  x.Load(p.x_src, w.tok0, w.rows);
  if (whole) {  // layer 0's q, k and v
    x.Store(w.xs, Shape::kXs);
    StoreModulation<kD>(w.vs, mv);
    __syncthreads();
    RowTilePasses<kP, kD, 1, kSplit>(w, frags);
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int head = w.rank * kHeadsPerCta + warp / kKeyWarps;
  const int head_base = si.tok_off * kD + head * kHeadDim;
  const uint32_t* mask = si.mask_off >= 0 ? fp.mask_bits + si.mask_off : nullptr;
  const AttnTile at{si.tok_off, q0, si.seq_len, num_keys, si.mask_off, {}};
  for (int l = first; l < last; ++l) {
    const unsigned parity = (l - first) & 1;  // of this launch's l - first th gather and exchange
    if (whole) {
      // Layer l's q, k and v are out: arrive, set up the next row phase while the others finish,
      // then wait for all of them.
      GridArrive(fp.sync);
      finish(l);
      vectors.Load(w.wp, w.wq, p.dim_ff);
      mv = modulation(l);
      {
        const WDesc<kP> first_pass = FirstPass<kP, kD, kSplit>(w);
        LoadFrags(frags, first_pass);
      }
      GridWait(fp.sync, (l + 1) * gridDim.x);
      if (l + 1 == last) GridDepart(fp.sync);
    }

    // Attention of the tile's rows for this CTA's heads.
    // With a running maximum in every layer: without it where the scores are bounded (as the
    // attention kernels do) it measured the same here.
    attn.part[warp][lane] = SplitKeysWarp<false>(
        at, q0, qkv[l & 1][0] + head_base, qkv[l & 1][1] + head_base, qkv[l & 1][2] + head_base,
        kD, mask, fp.scale_log2, warp % kKeyWarps, kKeyWarps, attn.warp[warp]);
    // The next row phase's vectors, stored here rather than before the grid barrier's wait: there
    // thread 0's stores waited for their loads' L2 trip before it polled the barrier.
    if (whole) vectors.Store(w.vs);
    if (threadIdx.x == 0) MbarrierArriveExpectTx(&gather_bar, kGatherBytes);
    __syncthreads();
    if (l == first) ClusterWait();  // the peers' gather mbarriers are initialised
    if (warp % kKeyWarps == 0) {
      // The head's rows into this CTA's operand buffer and into each peer's. Their operand
      // buffers are free: every CTA finished its row phase before the grid barrier (one launch)
      // or the launch began.
      float out[2][4];
      CombineSplitKeys(attn.part + warp, kKeyWarps, fp.scale_log2, out);
      uint32_t bars[kSplit];
#pragma unroll
      for (int q = 0; q < kSplit; ++q) bars[q] = MapShared(&gather_bar, q);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          bf16* dst = w.as + (g + 8 * h) * Shape::kAs + head * kHeadDim + 8 * n + 2 * t;
          const uint32_t v = PackBf16(out[n][2 * h], out[n][2 * h + 1]);
          *reinterpret_cast<uint32_t*>(dst) = v;
#pragma unroll
          for (int q = 0; q < kSplit; ++q) {
            if (q != w.rank) StoreAsyncCluster(MapShared(dst, q), v, bars[q]);
          }
        }
    }
    MbarrierWait</*kCluster=*/true>(&gather_bar, parity);
    // Pairs with the exchange's wait: by then every CTA of the cluster has its rows, so each is
    // done with the attention's buffers, where the peers' partials go.
    ClusterArrive();
    if (!whole) x.Store(w.xs, Shape::kXs);
    StoreModulation<kD>(w.vs, mv);
    __syncthreads();
    w.exchange_parity = parity;
    RowTilePasses<kP, kD, 1, kSplit>(w, frags);
  }
}

// A launch of `ctas` CTAs in clusters of kSplit; `launch`: also programmatic serialization (the
// prologue overlaps the kernel before), and `cooperative` (every CTA resident at once, or the
// launch fails: the one-launch forward's grid barrier needs it).
struct FusedLaunchConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[3];
  FusedLaunchConfig(int ctas, cudaStream_t stream, bool launch, bool cooperative = false) {
    config.gridDim = dim3(ctas);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = kSmemBytes;
    config.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kSplit;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    attr[2].id = cudaLaunchAttributeCooperative;
    attr[2].val.cooperative = 1;
    config.attrs = attr;
    config.numAttrs = launch ? (cooperative ? 3 : 2) : 1;
  }
};

absl::Status AllowFusedSmem() {
  static std::atomic<uint64_t> smem_set{0};
  return AllowDynamicSmem(reinterpret_cast<const void*>(&FusedForwardKernel), kSmemBytes,
                          smem_set);
}

}  // namespace

absl::StatusOr<int> FusedForwardCapacity() {
  if (absl::Status s = AllowFusedSmem(); !s.ok()) return s;
  FusedLaunchConfig launch(kSplit, nullptr, /*launch=*/false);
  int clusters = 0;
  CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveClusters(&clusters, FusedForwardKernel, &launch.config));
  return clusters;
}

absl::Status LaunchFusedForward(const FusedForwardParams& params, cudaStream_t stream) {
  if (params.row.num_tiles == 0) return absl::OkStatus();
  if (absl::Status s = AllowFusedSmem(); !s.ok()) return s;
  FusedLaunchConfig launch(params.row.num_tiles * kSplit, stream, /*launch=*/true,
                           /*cooperative=*/params.layer < 0);
  CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&launch.config, FusedForwardKernel, params));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace mmdit
