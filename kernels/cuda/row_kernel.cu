// The row kernel: one launch per layer (see row_common.cuh for the passes), one CTA, or a
// cluster of kSplit CTAs, per tile of 16 or 64 tokens of one stream of one sample. The tile's
// start (residual and attention rows from global memory) is here; the passes are shared with the
// fused small-batch forward.
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/row_common.cuh"

namespace mmdit {
namespace cuda {
namespace {

using namespace row;  // NOLINT: the row kernel's own building blocks

template <Precision P, int kD, int kMT, int kSplit>
__global__ void __launch_bounds__(kThreads, 2) RowKernel(const RowParams p) {
  using S = RowShape<P, kD, kMT>;
  using T = typename Prec<P>::T;
  constexpr int kM = S::kM, kXs = S::kXs, kAs = S::kAs;
  extern __shared__ __align__(16) unsigned char smem[];
  RowWork<P> w;
  w.xs = reinterpret_cast<float*>(smem);
  w.ss = w.xs + kM * kXs;
  w.as = reinterpret_cast<T*>(smem + sizeof(float) * kM * kXs + S::kOutBytes);
  w.vs = reinterpret_cast<float*>(w.as + kM * kAs);
  // Split: the exchange's slots after the vectors (VectorBytes at kMaxStagedFF).
  w.ps = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(w.vs) +
                                  VectorBytes(kD, kMaxStagedFF));
  __shared__ uint64_t exchange_bar;
  w.exchange_bar = &exchange_bar;
  w.exchange_parity = 0;
  w.rank = blockIdx.x % kSplit;  // in the cluster: its CTAs are consecutive in x
  // The exchange's mbarrier, and the arrival that makes it visible to the peers before the
  // passes' exchange of partial products (RowTilePasses).
  if constexpr (kSplit > 1) {
    if (p.post_layer >= 0) {
      if (threadIdx.x == 0) {
        MbarrierInit(&exchange_bar, 1);
        FenceMbarrierInit();
      }
      ClusterArrive();
    }
  }

  const RowTile tile = p.tiles[blockIdx.x / kSplit];
  const SampleInfo si = p.samples[tile.sample];
  w.tok0 = si.tok_off + (tile.stream ? si.seq_len : 0) + tile.row0;
  w.rows = tile.rows;
  w.wp = p.post_layer >= 0 ? &p.weights[p.post_layer * 2 + tile.stream] : nullptr;
  w.wq = p.qkv_layer >= 0 ? &p.weights[p.qkv_layer * 2 + tile.stream] : nullptr;
  w.dim_ff = p.dim_ff;
  w.rope = tile.stream == 0;
  __shared__ float2 rope_rows[kM * (kHeadDim / 2)];  // StageRopeRows, before the wait
  w.rope_rows = rope_rows;
  w.x_dst = p.x_dst;
  w.q = p.q;
  w.k = p.k;
  w.v = p.v;
  WFrags<kD> frags;
  if constexpr (P == Precision::kBf16) {
    const WDesc<P> first = FirstPass<P, kD, kSplit>(w);
    if (first.wf != nullptr) LoadFrags(frags, first);
  }
  // The weights' vectors (read-only: before the wait), then the modulation.
  {
    WeightVectors<kD> vectors;
    vectors.Load(w.wp, w.wq, p.dim_ff);
    vectors.Store(w.vs);
  }
  w.up_b = p.dim_ff <= kMaxStagedFF ? w.vs + kVUpB * kD : (w.wp ? w.wp->up_b : nullptr);
  StageRopeRows<kM>(rope_rows, p.rope, si.start_pos + tile.row0, w.rows, w.rope);
  WaitForPredecessor();
  // Every load of the tile's start is issued before the first store into shared memory: with
  // in-order issue, each store held the loads after it behind its own L2 trip (three trips, the
  // modulation, the residual and the attention rows, instead of one).
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kALoads = kM * kD / kVec / kThreads;  // 16 bytes of attention output per thread
  static_assert(kALoads * kVec * kThreads == kM * kD, "tile loads divide evenly over the threads");
  const TileModulation mv =
      LoadModulation<kD>(p.mod + tile.sample * (size_t)p.num_layers * 2 * 6 * kD, tile.stream,
                         p.post_layer, p.qkv_layer);
  ResidualTile<kD, kM> x;
  x.Load(p.x_src, w.tok0, w.rows);
  uint4 av[kALoads];
  if (p.post_layer >= 0) {  // the attention output, the projection's operand
    const T* attn = static_cast<const T*>(p.attn);
#pragma unroll
    for (int k = 0; k < kALoads; ++k) {
      const int e = threadIdx.x + k * kThreads, r = e / (kD / kVec), c = (e % (kD / kVec)) * kVec;
      av[k] = r < w.rows
                  ? *reinterpret_cast<const uint4*>(attn + (size_t)(w.tok0 + r) * kD + c)
                  : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  StoreModulation<kD>(w.vs, mv);
  x.Store(w.xs, kXs);
  if (p.post_layer >= 0) {
#pragma unroll
    for (int k = 0; k < kALoads; ++k) {
      const int e = threadIdx.x + k * kThreads, r = e / (kD / kVec), c = (e % (kD / kVec)) * kVec;
      *reinterpret_cast<uint4*>(w.as + r * kAs + c) = av[k];
    }
  }
  __syncthreads();  // the row passes read rows that other warps loaded
  // The next kernel may launch from here, when this tile's inputs are in: its CTAs then wait
  // resident for a shorter time. Launched at this kernel's start, they arrived while this kernel
  // still waited for the one before, and at B = 1 launched per kernel the forward took 0.127
  // instead of 0.121-0.123 ms (docs/BENCHMARKS.md, fifteenth round).
  LaunchDependents();
  // No cluster barrier at the end: the peers only write into this CTA's shared memory, and it
  // waits for all of their stores before it goes on.
  RowTilePasses<P, kD, kMT, kSplit>(w, frags);
}

template <Precision P, int kD, int kMT, int kSplit>
absl::Status LaunchRowT(const RowParams& params, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_set{0};
  using S = RowShape<P, kD, kMT>;
  constexpr size_t kPartial = kSplit > 1 ? S::ExchangeBytes(kSplit) : 0;
  const void* func = reinterpret_cast<const void*>(&RowKernel<P, kD, kMT, kSplit>);
  // The limit is raised once, to what the largest staged F needs; a launch asks for its own
  // (with a split, the exchange sits after the largest vectors).
  const size_t max_smem = S::kSmemBytes + VectorBytes(kD, kMaxStagedFF) + kPartial;
  if (absl::Status s = AllowDynamicSmem(func, max_smem, smem_set); !s.ok()) return s;
  const size_t smem =
      kSplit > 1 ? max_smem : S::kSmemBytes + VectorBytes(kD, params.dim_ff);
  CUDA_RETURN_IF_ERROR(LaunchPdl(RowKernel<P, kD, kMT, kSplit>,
                                 dim3(params.num_tiles * kSplit), dim3(kThreads), smem, stream,
                                 params, kSplit));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchRow(const RowParams& params, Precision precision, int dim, int tile_rows,
                       cudaStream_t stream) {
  if (params.num_tiles == 0) return absl::OkStatus();
  const bool bf16 = precision == Precision::kBf16;
  if (dim == 128 && tile_rows == 64) {
    if (bf16 && params.wgmma_images != nullptr) return LaunchRowWgmma(params, stream);
    return bf16 ? LaunchRowT<Precision::kBf16, 128, 4, 1>(params, stream)
                : LaunchRowT<Precision::kFp32, 128, 4, 1>(params, stream);
  }
  if (dim == 128 && tile_rows == 16 && params.cluster_split == kClusterSplit) {
    return bf16 ? LaunchRowT<Precision::kBf16, 128, 1, kClusterSplit>(params, stream)
                : LaunchRowT<Precision::kFp32, 128, 1, kClusterSplit>(params, stream);
  }
  if (dim == 128 && tile_rows == 16 && params.cluster_split == 2) {
    return bf16 ? LaunchRowT<Precision::kBf16, 128, 1, 2>(params, stream)
                : LaunchRowT<Precision::kFp32, 128, 1, 2>(params, stream);
  }
  if (dim == 128 && tile_rows == 16) {
    return bf16 ? LaunchRowT<Precision::kBf16, 128, 1, 1>(params, stream)
                : LaunchRowT<Precision::kFp32, 128, 1, 1>(params, stream);
  }
  if (dim == 64 && tile_rows == 64) {
    return bf16 ? LaunchRowT<Precision::kBf16, 64, 4, 1>(params, stream)
                : LaunchRowT<Precision::kFp32, 64, 4, 1>(params, stream);
  }
  return absl::UnimplementedError(absl::StrCat("no row kernel for dim ", dim, " and tiles of ",
                                               tile_rows, " rows"));
}

}  // namespace cuda
}  // namespace mmdit
