#include "kernels/cuda/cuda_forward.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <deque>
#include <list>
#include <vector>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/forward_kernels.h"
#include "kernels/half_float.h"
#include "kernels/thread_pool.h"

namespace mmdit {

using cuda::AttnTile;
using cuda::GroupTile;
using cuda::Precision;
using cuda::RowGroup;
using cuda::RowTile;
using cuda::SampleInfo;
using cuda::StreamWeightsDev;

namespace {

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// tf32 with round-to-nearest (ties away), as cvt.rna.tf32.f32.
float RoundTf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

// W [n][k] (PyTorch Linear layout) in the order in which a lane (g, t) of a warp reads its B
// fragment: for bf16 and each (n8 tile, k16 step) 4 values per lane, W[n][k + {0, 1, 8, 9}];
// for 3xTF32 and each (n8 tile, k16 step, k8 half) {hi, hi, lo, lo} of W[n][k + {0, 1}]. One
// coalesced 8- or 16-byte load per lane then feeds an mma.
std::vector<uint8_t> PackFragments(const std::vector<float>& w, int n, int k, Precision p) {
  const int ks_total = k / 16;
  std::vector<uint8_t> out;
  if (p == Precision::kBf16) {
    std::vector<uint16_t> v(static_cast<size_t>(n) * k);
    for (int nt = 0; nt < n / 8; ++nt)
      for (int ks = 0; ks < ks_total; ++ks)
        for (int lane = 0; lane < 32; ++lane) {
          const int row = nt * 8 + lane / 4, col = ks * 16 + 2 * (lane % 4);
          const size_t o = ((static_cast<size_t>(nt) * ks_total + ks) * 32 + lane) * 4;
          const float* src = &w[static_cast<size_t>(row) * k + col];
          v[o + 0] = FloatToBf16(src[0]);
          v[o + 1] = FloatToBf16(src[1]);
          v[o + 2] = FloatToBf16(src[8]);
          v[o + 3] = FloatToBf16(src[9]);
        }
    out.resize(v.size() * 2);
    std::memcpy(out.data(), v.data(), out.size());
  } else {
    std::vector<float> v(static_cast<size_t>(n) * k * 2);
    for (int nt = 0; nt < n / 8; ++nt)
      for (int ks = 0; ks < ks_total; ++ks)
        for (int h = 0; h < 2; ++h)
          for (int lane = 0; lane < 32; ++lane) {
            // k8 slots t and t + 4: the row kernel loads its A fragments with ldmatrix, in
            // the mma's own k order.
            const int row = nt * 8 + lane / 4, col = ks * 16 + 8 * h + lane % 4;
            const size_t o =
                (((static_cast<size_t>(nt) * ks_total + ks) * 2 + h) * 32 + lane) * 4;
            const float a = w[static_cast<size_t>(row) * k + col];
            const float b = w[static_cast<size_t>(row) * k + col + 4];
            v[o + 0] = RoundTf32(a);
            v[o + 1] = RoundTf32(b);
            v[o + 2] = RoundTf32(a - v[o + 0]);
            v[o + 3] = RoundTf32(b - v[o + 1]);
          }
    out.resize(v.size() * 4);
    std::memcpy(out.data(), v.data(), out.size());
  }
  return out;
}

// A B operand image of wgmma, rows x cols with value(n, k), in the K-major layout without
// swizzle: [k16 step][8-row group][k8 half][8 rows][8 values], i.e. 8 x 16-byte core matrices,
// 128 bytes apart along K and 256 bytes apart along N.
template <typename Value>
void PackWgmmaB(int rows, int cols, Value value, std::vector<uint16_t>& out) {
  for (int ks = 0; ks < cols / 16; ++ks)
    for (int j = 0; j < rows / 8; ++j)
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < 8; ++r)
          for (int e = 0; e < 8; ++e) {
            out.push_back(FloatToBf16(value(8 * j + r, 16 * ks + 8 * h + e)));
          }
}

// The chunks of one stream of one layer for the wgmma row kernel, in the order it uses them
// (forward_kernels.h, kWgmmaChunkBytes): out, then per kWgmmaHidden hidden units the up rows
// (halved: the kernel's SiLU takes v / 2) and the down columns, then q, k, v. Every model-dim
// index goes through cuda::WgmmaFeature (forward_kernels.h), the kernel's order of features.
std::vector<uint16_t> PackWgmmaChunks(const StreamWeights& w, int d, int f) {
  std::vector<uint16_t> out;
  out.reserve(static_cast<size_t>(cuda::WgmmaChunksPerLayer(f)) * cuda::kWgmmaChunkBytes / 2);
  auto at = [](const std::vector<float>& m, int cols, int r, int c) {
    return m[static_cast<size_t>(r) * cols + c];
  };
  using cuda::WgmmaFeature;
  PackWgmmaB(d, d, [&](int n, int k) { return at(w.out_w, d, WgmmaFeature(n), WgmmaFeature(k)); },
             out);
  for (int c = 0; c < f / cuda::kWgmmaHidden; ++c) {
    const int h0 = c * cuda::kWgmmaHidden;
    PackWgmmaB(cuda::kWgmmaHidden, d,
               [&](int n, int k) { return 0.5f * at(w.mlp_up_w, d, h0 + n, WgmmaFeature(k)); },
               out);
    PackWgmmaB(d, cuda::kWgmmaHidden,
               [&](int n, int k) { return at(w.mlp_down_w, f, WgmmaFeature(n), h0 + k); }, out);
  }
  for (int c = 0; c < 3; ++c) {
    PackWgmmaB(
        d, d,
        [&](int n, int k) { return at(w.qkv_w, d, c * d + WgmmaFeature(n), WgmmaFeature(k)); },
        out);
  }
  return out;
}

// The work list of the wgmma row kernel, whose CTAs (one per SM, `ctas` of them) take groups
// c, c + ctas, ...: as many full rounds of three-tile groups as the tiles fill, then the rest in
// groups of ceil(rest / ctas), so that the last round spreads over every SM instead of leaving
// most of them idle (B = 64: 256 tiles in 128 groups of two rather than 86 of three). A group
// never spans the x and the context streams (tiles [0, num_x) and [num_x, num_tiles)).
// by_sample (per-sample sync): the two streams' groups interleaved in the order of their first
// sample, so that each round of the kernel finishes whole samples early and late samples last;
// otherwise every x group, then every context group. Each tile carries its sample's attention
// item count (GroupTile::items_target: tiles of attn_tile_queries queries, one item per head).
std::vector<RowGroup> MakeRowGroups(int num_x, const RowTile* tiles, int num_tiles,
                                    const SampleInfo* samples, int ctas, bool by_sample,
                                    int attn_tile_queries, int heads) {
  const int full_groups = num_tiles / (3 * ctas) * ctas;
  const int rest = num_tiles - 3 * full_groups;
  const int tail = rest == 0 ? 3 : CeilDiv(rest, ctas);
  std::vector<RowGroup> groups;
  int next[2] = {0, num_x};
  const int end[2] = {num_x, num_tiles};
  while (next[0] < end[0] || next[1] < end[1]) {
    int stream = next[0] < end[0] ? 0 : 1;
    if (by_sample && next[0] < end[0] && next[1] < end[1] &&
        tiles[next[1]].sample < tiles[next[0]].sample) {
      stream = 1;
    }
    const int t = next[stream];
    const int size =
        std::min(static_cast<int>(groups.size()) < full_groups ? 3 : tail, end[stream] - t);
    RowGroup group{};
    group.count = size;
    group.stream = stream;
    for (int k = 0; k < size; ++k) {
      const RowTile& tile = tiles[t + k];
      const SampleInfo& si = samples[tile.sample];
      const int tokens = si.seq_len + si.ctx_len;
      group.tiles[k] = GroupTile{si.tok_off + (stream ? si.seq_len : 0) + tile.row0,
                                 tile.rows,
                                 tile.sample,
                                 si.start_pos + tile.row0,
                                 si.tok_off,
                                 tokens,
                                 CeilDiv(tokens, attn_tile_queries) * heads,
                                 0};
    }
    groups.push_back(group);
    next[stream] += size;
  }
  return groups;
}

// A host image of a device allocation: chunks appended at aligned offsets.
struct Blob {
  std::vector<uint8_t> bytes;
  size_t Add(const void* data, size_t n) {
    const size_t off = AlignUp(bytes.size());
    bytes.resize(off + n);
    if (data != nullptr && n != 0) std::memcpy(bytes.data() + off, data, n);
    return off;
  }
  size_t AddFloats(const std::vector<float>& v) { return Add(v.data(), v.size() * 4); }
};

}  // namespace

class CudaForwardImpl {
 public:
  ~CudaForwardImpl() {
    cudaSetDevice(options.device);
    if (graph_exec) cudaGraphExecDestroy(graph_exec);
    for (const CachedGraph& g : graphs) cudaGraphExecDestroy(g.exec);
    for (cudaEvent_t e : chunk_fetched) {
      if (e) cudaEventDestroy(e);
    }
    for (void* p : device_allocs) cudaFree(p);
    if (host_io) cudaFreeHost(host_io);
    if (stream) cudaStreamDestroy(stream);
  }

  absl::Status Init(const ModelWeights& weights);
  absl::Status Stage(ForwardBatch batch);
  absl::Status RunStaged();
  absl::Status Fetch(ForwardBatch batch);
  // RunStaged() captured into a graph (not launched).
  absl::StatusOr<cudaGraphExec_t> Capture();
  // RunStaged(), or the staged shape's cached graph (CudaForwardOptions::graph_cache_size).
  absl::Status RunCached();

  absl::Status Alloc(void** p, size_t bytes) {
    CUDA_RETURN_IF_ERROR(cudaMalloc(p, bytes));
    device_allocs.push_back(*p);
    return absl::OkStatus();
  }

  CudaForwardOptions options;
  MmditConfig config;
  Precision precision = Precision::kBf16;
  int num_sms = 0;
  int l2_bytes = 0;
  cudaStream_t stream = nullptr;
  std::vector<void*> device_allocs;
  cudaGraphExec_t graph_exec = nullptr;  // CaptureGraph()'s
  // What RunStaged() launches with besides the buffers fixed at Init: two staged batches of the
  // same shape launch the same kernels with the same parameters (each kernel reads the batch's
  // own tiles, offsets and data from the device), so a graph captured for one runs the other.
  using LaunchShape = std::array<int, 13>;
  LaunchShape StagedShape() const {
    return {batch,      num_tokens,    num_row_tiles, num_x_row_tiles, num_row_groups,
            num_attn_tiles, tile_rows, tile_queries,  cluster_split,   fused,
            fused_layers,   head_major, sample_sync};
  }
  // Run()'s graphs, most recently used first, and the shapes run once so far without a graph (a
  // shape's graph is captured on its second run).
  struct CachedGraph {
    LaunchShape shape;
    cudaGraphExec_t exec;
  };
  std::list<CachedGraph> graphs;
  std::deque<LaunchShape> seen_once;
  static constexpr size_t kSeenShapes = 64;
  int64_t graph_runs = 0;
  std::function<void(const char*)> launch_hook;

  // The host copies between the caller's samples and the pinned staging block
  // (CudaForwardOptions::copy_threads): queued by Stage and Fetch, then run in pieces.
  struct HostCopy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  std::vector<HostCopy> host_copies;
  std::vector<HostCopy> copy_pieces;  // RunHostCopies' pieces, kept so that a run allocates nothing
  std::unique_ptr<ThreadPool> copy_pool;  // null: one thread
  // The part of host_copies whose side in the staging block's x section (dst when `into_block`,
  // src otherwise) lies in bytes [begin, end) of the section.
  void RunHostCopies(bool into_block, size_t begin, size_t end);
  // The x section moves between host and device in chunks, so that one chunk's transfer overlaps
  // the host copies of the next (Stage) or of the one before (Fetch). Sections that one thread
  // copies (RunHostCopies) go in 256 KB chunks; larger ones in chunks of 4 MB or more, so that
  // each chunk's copies are worth waking the pool for.
  static constexpr int kMaxChunks = 16;
  static constexpr size_t kParallelFrom = size_t{2} << 20;
  static size_t ChunkBytes(size_t section_bytes) {
    if (section_bytes < kParallelFrom) return size_t{256} << 10;
    return std::max(size_t{4} << 20, (section_bytes + kMaxChunks - 1) / kMaxChunks);
  }
  cudaEvent_t chunk_fetched[kMaxChunks] = {};
  void Launched(const char* what) {
    if (launch_hook) launch_hook(what);
  }

  // Weights.
  const StreamWeightsDev* d_stream_weights = nullptr;
  const void* d_adaln_w = nullptr;  // bf16: split fragments; fp32: transposed floats
  // bf16, D = 128 on compute capability 9.0 (CudaForwardOptions::wgmma_adaln), or null: the same
  // weights as the wgmma adaLN's chunks.
  const void* d_adaln_images = nullptr;
  const float* d_adaln_b = nullptr;
  const float2* d_rope = nullptr;
  const void* d_wgmma_images = nullptr;  // bf16, D = 128 on compute capability 9.0
  // The attention's score scale Dh^-0.5 * log2(e): in bf16 it is folded into the q RMSNorm
  // weights, so that the scores come out of the tensor cores as exp2 exponents.
  static float ScoreScaleLog2() {
    return static_cast<float>(1.4426950408889634 / std::sqrt(double(cuda::kHeadDim)));
  }
  bool QCarriesScale() const { return precision == Precision::kBf16; }
  // Per layer: AttentionParams::scores_bounded.
  std::vector<bool> scores_bounded;

  // Capacity.
  int max_tokens = 0, max_row_tiles = 0, max_attn_tiles = 0;
  size_t max_mask_words = 0;

  // Staging: one pinned host block mirrored by one device block with the same section offsets.
  size_t off_samples = 0, off_row_tiles = 0, off_row_groups = 0, off_attn_tiles = 0, off_y = 0,
         off_mask = 0, off_x = 0, io_bytes = 0;
  uint8_t* host_io = nullptr;
  uint8_t* dev_io = nullptr;
  float* d_act = nullptr;
  void* d_act_bf16 = nullptr;  // CudaForwardOptions::bf16_residual
  float* d_mod = nullptr;
  void* d_q = nullptr;
  void* d_k = nullptr;
  void* d_v = nullptr;
  void* d_attn = nullptr;

  // The staged batch.
  int batch = 0, num_tokens = 0, num_row_tiles = 0, num_x_row_tiles = 0, num_row_groups = 0,
      num_attn_tiles = 0;
  int tile_rows = 64, tile_queries = 128, cluster_split = 1;
  bool fused = false;  // the staged batch runs as one launch (fused_forward.cu)
  bool fused_layers = false;  // or as one launch per layer (the same kernel)
  bool head_major = false;  // its q/k/v and attention output head by head (RowParams::head_major)
  // The staged batch's row and attention kernels overlap, synchronised per sample
  // (CudaForwardOptions::per_sample_sync) through d_progress: [layer][2][max_batch_size]
  // counters, q/k/v rows done (even) and attention items done (odd).
  bool sample_sync = false;
  unsigned* d_progress = nullptr;
  bool clusters_supported = false;
  // The fused forward: its clusters that fit on the device at once (0: not available), and its
  // grid barrier's counters.
  int fused_capacity = 0;
  unsigned* d_sync = nullptr;
  void* d_fused_qkv_odd = nullptr;  // see FusedForwardParams::qkv_odd
  int fused_qkv_odd_tokens = 0;
};

absl::Status CudaForwardImpl::Init(const ModelWeights& weights) {
  const int d = config.dim, f = config.dim_feedforward, n = config.num_layers;
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  if (options.copy_threads > 1) copy_pool = std::make_unique<ThreadPool>(options.copy_threads);
  for (cudaEvent_t& e : chunk_fetched) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount,
                                              options.device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, options.device));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // Weights, converted and laid out once.
  Blob blob;
  struct Offsets {
    size_t qkv_w, out_w, up_w, down_w, qkv_b, rms_q, rms_k, out_b, out_rms, up_b, down_b;
  };
  int cc_major = 0, cc_minor = 0;
  CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, options.device));
  CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, options.device));
  clusters_supported = cc_major >= 9;
  // wgmma is in the sm_90a code only, which runs on compute capability 9.0 alone.
  const bool use_wgmma = options.use_wgmma && cc_major == 9 && cc_minor == 0 &&
              precision == Precision::kBf16 && d == 128 && f % cuda::kWgmmaHidden == 0 &&
              f <= cuda::kWgmmaMaxDimFF;
  const bool adaln_images = options.wgmma_adaln && cc_major == 9 && cc_minor == 0 &&
              precision == Precision::kBf16 && d == 128;
  std::vector<uint16_t> wgmma_images;
  // The largest |weight| of the q and k RMSNorms over each head's features, both streams.
  const int heads = d / cuda::kHeadDim;
  std::vector<float> q_gain(static_cast<size_t>(n) * heads), k_gain(q_gain.size());
  std::vector<Offsets> offs(2 * n);
  std::vector<float> adaln_b(static_cast<size_t>(2 * n) * 6 * d);
  for (int l = 0; l < n; ++l) {
    for (int s = 0; s < 2; ++s) {
      const StreamWeights& w = s == 0 ? weights.layers[l].x : weights.layers[l].context;
      Offsets& o = offs[2 * l + s];
      {
        auto v = PackFragments(w.qkv_w, 3 * d, d, precision);
        o.qkv_w = blob.Add(v.data(), v.size());
        v = PackFragments(w.out_w, d, d, precision);
        o.out_w = blob.Add(v.data(), v.size());
        v = PackFragments(w.mlp_up_w, f, d, precision);
        o.up_w = blob.Add(v.data(), v.size());
        v = PackFragments(w.mlp_down_w, d, f, precision);
        o.down_w = blob.Add(v.data(), v.size());
        if (use_wgmma) {
          const std::vector<uint16_t> chunks = PackWgmmaChunks(w, d, f);
          wgmma_images.insert(wgmma_images.end(), chunks.begin(), chunks.end());
        }
      }
      o.qkv_b = blob.AddFloats(w.qkv_b);
      if (QCarriesScale()) {
        std::vector<float> rms_q = w.rms_q;
        for (float& v : rms_q) v *= ScoreScaleLog2();
        o.rms_q = blob.AddFloats(rms_q);
      } else {
        o.rms_q = blob.AddFloats(w.rms_q);
      }
      for (int i = 0; i < d; ++i) {
        const size_t h = static_cast<size_t>(l) * heads + i / cuda::kHeadDim;
        q_gain[h] = std::max(q_gain[h], std::fabs(w.rms_q[i]));
        k_gain[h] = std::max(k_gain[h], std::fabs(w.rms_k[i]));
      }
      o.rms_k = blob.AddFloats(w.rms_k);
      o.out_b = blob.AddFloats(w.out_b);
      o.out_rms = blob.AddFloats(w.out_rms);
      o.up_b = blob.AddFloats(w.mlp_up_b);
      o.down_b = blob.AddFloats(w.mlp_down_b);
      std::copy(w.adaln_b.begin(), w.adaln_b.end(), adaln_b.begin() + (2 * l + s) * 6 * d);
    }
  }
  // adaLN: bf16 takes all layers' weights as one [N * 2 * 6D][D] matrix split into bf16 hi and
  // lo parts, in fragment order (hi fragments, then lo) and, for the wgmma kernel, as its chunks
  // (each kAdaLnChunkColumns rows' hi image, lo image and bias); fp32 the transposed float copy.
  size_t off_adaln_wt = 0, off_adaln_images = 0;
  if (precision == Precision::kBf16) {
    std::vector<float> hi, lo;
    hi.reserve(static_cast<size_t>(2 * n) * 6 * d * d);
    for (int l = 0; l < n; ++l) {
      for (const StreamWeights* w : {&weights.layers[l].x, &weights.layers[l].context}) {
        for (float v : w->adaln_w) {
          hi.push_back(Bf16ToFloat(FloatToBf16(v)));
          lo.push_back(v - hi.back());
        }
      }
    }
    if (adaln_images) {  // for batches from kAdaLnWgmmaMinBatch; the fragments below for the rest
      const int chunks = 2 * n * 6 * d / cuda::kAdaLnChunkColumns;
      std::vector<uint16_t> images;
      images.reserve(static_cast<size_t>(chunks) * cuda::kAdaLnChunkBytes / 2);
      for (int c = 0; c < chunks; ++c) {
        const int col0 = c * cuda::kAdaLnChunkColumns;
        for (const std::vector<float>* part : {&hi, &lo}) {
          PackWgmmaB(cuda::kAdaLnChunkColumns, d, [&](int r, int k) {
            return (*part)[static_cast<size_t>(col0 + r) * d + k];
          }, images);
        }
        const size_t at = images.size();
        images.resize(at + cuda::kAdaLnChunkColumns * 2);
        std::memcpy(images.data() + at, adaln_b.data() + col0, cuda::kAdaLnChunkColumns * 4);
      }
      off_adaln_images = blob.Add(images.data(), images.size() * 2);
    }
    std::vector<uint8_t> frags = PackFragments(hi, 2 * n * 6 * d, d, precision);
    const std::vector<uint8_t> lo_frags = PackFragments(lo, 2 * n * 6 * d, d, precision);
    frags.insert(frags.end(), lo_frags.begin(), lo_frags.end());
    off_adaln_wt = blob.Add(frags.data(), frags.size());
  } else {
    std::vector<float> adaln_wt(static_cast<size_t>(2 * n) * d * 6 * d);
    for (int l = 0; l < n; ++l) {
      for (int s = 0; s < 2; ++s) {
        const StreamWeights& w = s == 0 ? weights.layers[l].x : weights.layers[l].context;
        const size_t ls = 2 * l + s;
        for (int j = 0; j < 6 * d; ++j) {
          for (int k = 0; k < d; ++k) {
            adaln_wt[(ls * d + k) * 6 * d + j] = w.adaln_w[static_cast<size_t>(j) * d + k];
          }
        }
      }
    }
    off_adaln_wt = blob.AddFloats(adaln_wt);
  }
  const size_t off_adaln_b = blob.AddFloats(adaln_b);
  // q and k are RMS-normalised over all D features before the heads split, so a head's part of
  // either has norm at most sqrt(D) * its largest |weight| (RoPE rotates pairs and keeps it), and
  // a score is at most the product of the two norms times the scale. (1 + 2^-6) covers the
  // rounding of the stored bf16 values.
  scores_bounded.assign(n, false);
  if (QCarriesScale() && options.static_softmax_offsets) {
    for (int l = 0; l < n; ++l) {
      double bound = 0.0;
      for (int h = 0; h < heads; ++h) {
        const size_t i = static_cast<size_t>(l) * heads + h;
        bound = std::max(bound, double(d) * q_gain[i] * k_gain[i] * ScoreScaleLog2());
      }
      scores_bounded[l] = bound * (1.0 + 1.0 / 64) <= cuda::kBoundedScoreMax;
    }
  }
  const size_t off_streams = blob.Add(nullptr, sizeof(StreamWeightsDev) * 2 * n);
  const size_t off_wgmma = blob.Add(wgmma_images.data(), wgmma_images.size() * 2);
  void* d_blob = nullptr;
  if (absl::Status s = Alloc(&d_blob, blob.bytes.size()); !s.ok()) return s;
  const uint8_t* base = static_cast<const uint8_t*>(d_blob);
  std::vector<StreamWeightsDev> streams(2 * n);
  for (int i = 0; i < 2 * n; ++i) {
    const Offsets& o = offs[i];
    auto fp = [&](size_t off) { return reinterpret_cast<const float*>(base + off); };
    streams[i] = StreamWeightsDev{base + o.qkv_w,  base + o.out_w,   base + o.up_w,
                                  base + o.down_w, fp(o.qkv_b),      fp(o.rms_q),
                                  fp(o.rms_k),     fp(o.out_b),      fp(o.out_rms),
                                  fp(o.up_b),      fp(o.down_b)};
  }
  std::memcpy(blob.bytes.data() + off_streams, streams.data(),
              sizeof(StreamWeightsDev) * streams.size());
  CUDA_RETURN_IF_ERROR(cudaMemcpy(d_blob, blob.bytes.data(), blob.bytes.size(),
                                  cudaMemcpyHostToDevice));
  d_stream_weights = reinterpret_cast<const StreamWeightsDev*>(base + off_streams);
  if (use_wgmma) d_wgmma_images = base + off_wgmma;
  d_adaln_w = base + off_adaln_wt;
  if (adaln_images) d_adaln_images = base + off_adaln_images;
  d_adaln_b = reinterpret_cast<const float*>(base + off_adaln_b);
  {
    // RoPE (cos, sin) for every position the config allows: the angle in float32 as the
    // reference computes it (float32 pow and product), its cosine and sine in double.
    std::vector<float2> rope(static_cast<size_t>(config.max_seq_len) * (cuda::kHeadDim / 2));
    for (int pos = 0; pos < config.max_seq_len; ++pos) {
      for (int i = 0; i < cuda::kHeadDim / 2; ++i) {
        const float inv_freq = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) /
                                                             static_cast<float>(cuda::kHeadDim));
        const float angle = static_cast<float>(pos) * inv_freq;
        rope[static_cast<size_t>(pos) * (cuda::kHeadDim / 2) + i] =
            make_float2(static_cast<float>(std::cos(static_cast<double>(angle))),
                        static_cast<float>(std::sin(static_cast<double>(angle))));
      }
    }
    void* p = nullptr;
    if (absl::Status s = Alloc(&p, rope.size() * sizeof(float2)); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(
        cudaMemcpy(p, rope.data(), rope.size() * sizeof(float2), cudaMemcpyHostToDevice));
    d_rope = static_cast<const float2*>(p);
  }

  // Scratch for max_batch_size x the longest shapes, allocated once.
  const int mb = options.max_batch_size, ml = options.max_seq_len, mc = options.max_context_len;
  max_tokens = mb * (ml + mc);
  max_row_tiles = mb * (CeilDiv(ml, 16) + CeilDiv(mc, 16));
  // Groups of the wgmma row kernel hold 64-token tiles (at most one group per tile).
  const int max_row_groups = mb * (CeilDiv(ml, 64) + CeilDiv(mc, 64));
  max_attn_tiles = mb * CeilDiv(ml + mc, 16);
  const int64_t wl = CeilDiv(ml, 32);
  max_mask_words = static_cast<size_t>(std::min<int64_t>(
      static_cast<int64_t>(mb) * (ml + 2) * wl, options.max_mask_bytes / 4));
  off_samples = 0;
  off_row_tiles = AlignUp(off_samples + sizeof(SampleInfo) * mb);
  off_row_groups = AlignUp(off_row_tiles + sizeof(RowTile) * max_row_tiles);
  off_attn_tiles = AlignUp(off_row_groups + sizeof(RowGroup) * max_row_groups);
  off_y = AlignUp(off_attn_tiles + sizeof(AttnTile) * max_attn_tiles);
  off_mask = AlignUp(off_y + sizeof(float) * mb * d);
  off_x = AlignUp(off_mask + sizeof(uint32_t) * max_mask_words);
  io_bytes = AlignUp(off_x + sizeof(float) * static_cast<size_t>(max_tokens) * d);
  CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&host_io), io_bytes));
  void* p = nullptr;
  if (absl::Status s = Alloc(&p, io_bytes); !s.ok()) return s;
  dev_io = static_cast<uint8_t*>(p);
  const size_t act_bytes = sizeof(float) * static_cast<size_t>(max_tokens) * d;
  const size_t t_bytes =
      (precision == Precision::kBf16 ? 2 : 4) * static_cast<size_t>(max_tokens) * d;
  if (absl::Status s = Alloc(&p, act_bytes); !s.ok()) return s;
  d_act = static_cast<float*>(p);
  if (options.bf16_residual != 0 && d_wgmma_images != nullptr) {
    if (absl::Status s = Alloc(&d_act_bf16, act_bytes / 2); !s.ok()) return s;
  }
  if (precision == Precision::kBf16 && d_wgmma_images != nullptr) {
    if (absl::Status s = Alloc(&p, sizeof(unsigned) * 2 * n * static_cast<size_t>(mb)); !s.ok()) {
      return s;
    }
    d_progress = static_cast<unsigned*>(p);
  }
  const size_t mod_bytes = sizeof(float) * static_cast<size_t>(mb) * n * 2 * 6 * d;
  if (absl::Status s = Alloc(&p, mod_bytes); !s.ok()) return s;
  d_mod = static_cast<float*>(p);
  for (void** buf : {&d_q, &d_k, &d_v, &d_attn}) {
    if (absl::Status s = Alloc(buf, t_bytes); !s.ok()) return s;
  }
  static_assert(cuda::kFusedMaxLayers == kFusedForwardMaxLayers);
  if ((options.fused_forward || options.fused_layers) && precision == Precision::kBf16 &&
      d == 128 && clusters_supported && f <= cuda::kFusedMaxDimFF && n <= cuda::kFusedMaxLayers) {
    absl::StatusOr<int> capacity = cuda::FusedForwardCapacity();
    if (!capacity.ok()) return capacity.status();
    fused_capacity = *capacity;
    if (absl::Status s = Alloc(&p, 2 * sizeof(unsigned)); !s.ok()) return s;
    d_sync = static_cast<unsigned*>(p);
    CUDA_RETURN_IF_ERROR(cudaMemset(d_sync, 0, 2 * sizeof(unsigned)));
    // The odd layers' q, k and v: a fused batch has at most 16 tokens per cluster.
    fused_qkv_odd_tokens = 16 * fused_capacity;
    if (absl::Status s = Alloc(&d_fused_qkv_odd, 3 * sizeof(uint16_t) *
                                                     static_cast<size_t>(fused_qkv_odd_tokens) * d);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaForwardImpl::Stage(ForwardBatch b) {
  const int d = config.dim, h = config.num_heads;
  if (static_cast<int>(b.size()) > options.max_batch_size) {
    return absl::InvalidArgumentError(absl::StrCat("batch of ", b.size(),
                                                   " samples exceeds max_batch_size ",
                                                   options.max_batch_size));
  }
  if (absl::Status s = ValidateBatch(config, b); !s.ok()) return s;
  size_t mask_words = 0;
  int tiles64 = 0, tiles16 = 0, attn256 = 0, attn128 = 0, attn16 = 0;
  for (int i = 0; i < static_cast<int>(b.size()); ++i) {
    const ForwardSample& s = b[i];
    if (s.seq_len > options.max_seq_len || s.context_len > options.max_context_len) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sample ", i, ": L = ", s.seq_len, ", C = ", s.context_len,
          " exceed this CUDA forward's capacity (max_seq_len ", options.max_seq_len,
          ", max_context_len ", options.max_context_len, ")"));
    }
    if (s.attn_mask) mask_words += static_cast<size_t>(s.seq_len + 2) * CeilDiv(s.seq_len, 32);
    tiles64 += CeilDiv(s.seq_len, 64) + CeilDiv(s.context_len, 64);
    tiles16 += CeilDiv(s.seq_len, 16) + CeilDiv(s.context_len, 16);
    attn256 += CeilDiv(s.seq_len + s.context_len, 256);
    attn128 += CeilDiv(s.seq_len + s.context_len, 128);
    attn16 += CeilDiv(s.seq_len + s.context_len, 16);
  }
  if (mask_words > max_mask_words) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the attention masks of this batch need ", mask_words * 4, " bytes of mask bits; this ",
        "CUDA forward holds ", max_mask_words * 4, " (max_mask_bytes)"));
  }
  // Fewer 64-token tiles than multiprocessors leaves most of the chip idle: small batches take
  // 16-token tiles (D = 128 only; at B = 64 they cost 1.30 ms against 0.87 with 64). With the
  // wgmma row kernel (bf16) they pay only where they run on clusters (the split below is 2 or 4
  // up to one 16-token tile per SM): on single CTAs they took more than one wave from B = 17
  // (H100, bf16 graph ms, 64- against 16-token tiles: B = 12 0.296 / 0.306, B = 16 0.315 /
  // 0.318, B = 20 0.327 / 0.488, B = 24 0.337 / 0.500; docs/BENCHMARKS.md, 230a6b6).
  // Attention takes 64-query tiles at small batches, 128 otherwise: at B = 256 on an H100, bf16
  // took 3.52 ms with 128-query tiles against 3.67 with 64, and fp32 (three CTAs per SM) 8.98
  // against 9.42. Batches of a sample or two (bf16) take 16-query tiles with the keys split over
  // the CTA's warps: B = 1 0.179 ms against 0.211, B = 2 0.222 against 0.231; B = 4 0.305 against
  // 0.298.
  tile_rows = options.row_tile_rows;
  if (tile_rows == 0) {
    const bool small = d_wgmma_images != nullptr ? tiles16 <= num_sms : tiles64 < num_sms;
    tile_rows = d == 128 && small ? 16 : 64;
  }
  // 16-token tiles split over clusters of four or two CTAs while the split grid stays small (H100,
  // graph ms at the target shape, 16 tiles per sample, split 1 / 2 / 4): bf16 B = 2 0.283 / 0.202
  // / 0.225, B = 4 0.305 / 0.268 / 0.382, B = 8 0.314 / 0.288 / 0.591, B = 16 0.355 / 0.504 /
  // 0.962; fp32 B = 2 0.542 / 0.451 / 0.376, B = 4 0.579 / 0.469 / 0.627, B = 8 0.614 / 0.514 /
  // 0.892, B = 16 0.729 / 0.928 / 1.51. With the cheaper exchange of 8172412 (split 2 / 4): bf16
  // B = 2 0.187 / 0.184, B = 3 0.211 / 0.214, B = 4 0.240 / 0.297; fp32 B = 2 0.421 / 0.352, B = 3
  // 0.431 / 0.365, B = 4 0.429 / 0.534.
  cluster_split = options.row_cluster_split;
  if (cluster_split == 0) {
    const bool bf16 = precision == Precision::kBf16;
    cluster_split = 1;
    if (tiles16 * cuda::kClusterSplit <= (bf16 ? num_sms / 2 : num_sms * 3 / 2)) {
      cluster_split = cuda::kClusterSplit;
    } else if (tiles16 * 2 <= 2 * num_sms) {
      cluster_split = 2;
    }
  }
  if (tile_rows != 16 || !clusters_supported) cluster_split = 1;  // D = 64 has 64-token tiles
  // bf16 with bounded scores in every layer takes 256-query tiles once there are two items per
  // SM: at the target shape a sample's queries are one tile, so its keys and values are staged
  // once per head instead of twice (H100, graph ms, 128- against 256-query tiles: B = 32 0.360
  // / 0.357, B = 48 0.460 / 0.449, B = 64 0.500 / 0.489, B = 256 1.806 / 1.777, B = 512 3.751
  // / 3.531). The kernel runs two CTAs of 16 warps per SM at 64 registers, which needs the
  // bounded scores: with a running maximum it takes 127 registers, one CTA per SM.
  const bool all_bounded =
      std::all_of(scores_bounded.begin(), scores_bounded.end(), [](bool b) { return b; });
  tile_queries = options.attn_tile_queries;
  if (tile_queries == 0) {
    tile_queries = attn128 * h < 2 * num_sms ? 64 : 128;
    const bool persistent_bf16 = precision == Precision::kBf16 && options.persistent_attention;
    if (persistent_bf16 && attn16 * h <= 2 * num_sms) {
      tile_queries = 16;
    } else if (persistent_bf16 && tile_queries == 128 && all_bounded &&
               attn256 * h >= 2 * num_sms) {
      tile_queries = 256;
    }
  }

  auto* samples = reinterpret_cast<SampleInfo*>(host_io + off_samples);
  auto* row_tiles = reinterpret_cast<RowTile*>(host_io + off_row_tiles);
  auto* attn_tiles = reinterpret_cast<AttnTile*>(host_io + off_attn_tiles);
  auto* y = reinterpret_cast<float*>(host_io + off_y);
  auto* mask = reinterpret_cast<uint32_t*>(host_io + off_mask);
  auto* x = reinterpret_cast<float*>(host_io + off_x);
  int tok = 0, nrt = 0, nat = 0;
  size_t mw = 0;
  host_copies.clear();
  for (int i = 0; i < static_cast<int>(b.size()); ++i) {
    const ForwardSample& s = b[i];
    const int L = s.seq_len, C = s.context_len;
    SampleInfo info{};
    info.tok_off = tok;
    info.seq_len = L;
    info.ctx_len = C;
    info.start_pos = static_cast<int>(s.start_pos);
    info.mask_off = -1;
    if (s.attn_mask) {
      info.mask_off = static_cast<int>(mw);
      const int wl = CeilDiv(L, 32);
      uint32_t* bits = mask + mw;
      std::memset(bits, 0, sizeof(uint32_t) * (L + 2) * wl);
      uint32_t* row_any = bits + static_cast<size_t>(L) * wl;
      uint32_t* col_any = row_any + wl;
      for (int r = 0; r < L; ++r) {
        const uint8_t* m = s.attn_mask + static_cast<size_t>(r) * L;
        uint32_t* row = bits + static_cast<size_t>(r) * wl;
        for (int j = 0; j < L; ++j) {
          if (m[j]) row[j >> 5] |= 1u << (j & 31);
        }
        bool any = false;
        for (int w = 0; w < wl; ++w) {
          col_any[w] |= row[w];
          any |= row[w] != 0;
        }
        if (any) row_any[r >> 5] |= 1u << (r & 31);
      }
      mw += static_cast<size_t>(L + 2) * wl;
    }
    samples[i] = info;
    std::memcpy(y + static_cast<size_t>(i) * d, s.y, sizeof(float) * d);
    host_copies.push_back({x + static_cast<size_t>(tok) * d, s.x, sizeof(float) * L * d});
    host_copies.push_back(
        {x + static_cast<size_t>(tok + L) * d, s.context, sizeof(float) * C * d});
    for (int r = 0; r < L; r += tile_rows) {
      row_tiles[nrt++] = RowTile{i, 0, r, std::min(tile_rows, L - r)};
    }
    const int rows_target = CeilDiv(L, tile_rows) + CeilDiv(C, tile_rows);
    for (int q = 0; q < L + C; q += tile_queries) {
      attn_tiles[nat++] = AttnTile{tok, q, L, L + C, info.mask_off, i, rows_target, 0};
    }
    tok += L + C;
  }
  // The x section, chunk by chunk: each chunk's transfer runs while the next one is copied in.
  const size_t x_bytes = sizeof(float) * static_cast<size_t>(tok) * d;
  for (size_t c0 = 0, chunk = ChunkBytes(x_bytes); c0 < x_bytes; c0 += chunk) {
    const size_t c1 = std::min(c0 + chunk, x_bytes);
    RunHostCopies(/*into_block=*/true, c0, c1);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev_io + off_x + c0, host_io + off_x + c0, c1 - c0,
                                         cudaMemcpyHostToDevice, stream));
  }
  // Context tiles after every x tile (the wgmma row kernel groups tiles of one stream).
  num_x_row_tiles = nrt;
  for (int i = 0; i < static_cast<int>(b.size()); ++i) {
    const int C = b[i].context_len;
    for (int r = 0; r < C; r += tile_rows) {
      row_tiles[nrt++] = RowTile{i, 1, r, std::min(tile_rows, C - r)};
    }
  }
  batch = static_cast<int>(b.size());
  num_tokens = tok;
  num_row_tiles = nrt;
  num_attn_tiles = nat;
  // The attention computed by the row tiles' clusters (fused_forward.cu), in one launch or one
  // per layer, where the tiling is the one it fuses (16-token tiles on clusters of four, 16-query
  // attention) and every cluster fits on the device at once.
  const bool fusable = fused_capacity > 0 && tile_rows == 16 &&
                       cluster_split == cuda::kClusterSplit && tile_queries == 16 &&
                       num_row_tiles <= fused_capacity;
  fused = fusable && options.fused_forward;
  fused_layers = fusable && !fused && options.fused_layers;
  // q/k/v and the attention output head by head where the wgmma row kernel (wherever there are
  // wgmma images and 64-token tiles) and the persistent attention exchange them.
  head_major = options.head_major_attention && precision == Precision::kBf16 &&
               options.persistent_attention && tile_queries != 16 && d_wgmma_images != nullptr &&
               tile_rows == 64 && !fused;
  // Per-sample sync where they do so with 256-query attention tiles, and the row kernel has more
  // than three tiles per SM (CudaForwardOptions).
  sample_sync = head_major && d_progress != nullptr && options.per_sample_sync &&
                tile_queries == 256 && num_row_tiles > 3 * num_sms;
  auto copy = [&](size_t off, size_t bytes) {
    return cudaMemcpyAsync(dev_io + off, host_io + off, bytes, cudaMemcpyHostToDevice, stream);
  };
  CUDA_RETURN_IF_ERROR(copy(off_samples, sizeof(SampleInfo) * batch));
  CUDA_RETURN_IF_ERROR(copy(off_row_tiles, sizeof(RowTile) * nrt));
  num_row_groups = 0;
  if (d_wgmma_images != nullptr && tile_rows == 64) {
    const std::vector<RowGroup> groups =
        MakeRowGroups(num_x_row_tiles, row_tiles, nrt, samples, num_sms, sample_sync,
                      tile_queries, d / cuda::kHeadDim);
    num_row_groups = static_cast<int>(groups.size());
    std::memcpy(host_io + off_row_groups, groups.data(), sizeof(RowGroup) * groups.size());
    CUDA_RETURN_IF_ERROR(copy(off_row_groups, sizeof(RowGroup) * groups.size()));
  }
  CUDA_RETURN_IF_ERROR(copy(off_attn_tiles, sizeof(AttnTile) * nat));
  CUDA_RETURN_IF_ERROR(copy(off_y, sizeof(float) * batch * d));
  if (mw) CUDA_RETURN_IF_ERROR(copy(off_mask, sizeof(uint32_t) * mw));
  return absl::OkStatus();
}

absl::Status CudaForwardImpl::RunStaged() {
  if (batch == 0) return absl::OkStatus();
  const int d = config.dim, n = config.num_layers;
  const auto* samples = reinterpret_cast<const SampleInfo*>(dev_io + off_samples);
  const float* x_in = reinterpret_cast<const float*>(dev_io + off_x);

  cuda::AdaLnParams ap{};
  ap.y = reinterpret_cast<const float*>(dev_io + off_y);
  ap.w_t = precision == Precision::kFp32 ? static_cast<const float*>(d_adaln_w) : nullptr;
  ap.w_frag = precision == Precision::kBf16 ? d_adaln_w : nullptr;
  ap.w_images = d_adaln_images;
  ap.num_sms = num_sms;
  ap.b = d_adaln_b;
  ap.mod = d_mod;
  ap.batch = batch;
  ap.dim = d;
  ap.num_layers = n;
  if (sample_sync) {
    ap.progress = d_progress;
    ap.progress_words = 2 * n * options.max_batch_size;
  }
  if (absl::Status s = cuda::LaunchAdaLn(ap, stream); !s.ok()) return s;
  Launched("adaln");

  cuda::RowParams rp{};
  rp.tiles = reinterpret_cast<const RowTile*>(dev_io + off_row_tiles);
  rp.samples = samples;
  rp.weights = d_stream_weights;
  rp.mod = d_mod;
  rp.attn = d_attn;
  rp.q = d_q;
  rp.k = d_k;
  rp.v = d_v;
  rp.num_tiles = num_row_tiles;
  rp.num_layers = n;
  rp.dim_ff = config.dim_feedforward;
  rp.rope = d_rope;
  rp.groups = reinterpret_cast<const RowGroup*>(dev_io + off_row_groups);
  rp.num_groups = num_row_groups;
  rp.num_sms = num_sms;
  rp.wgmma_images = d_wgmma_images;
  rp.cluster_split = cluster_split;

  cuda::AttentionParams tp{};
  tp.tiles = reinterpret_cast<const AttnTile*>(dev_io + off_attn_tiles);
  tp.mask_bits = reinterpret_cast<const uint32_t*>(dev_io + off_mask);
  tp.q = d_q;
  tp.k = d_k;
  tp.v = d_v;
  tp.out = d_attn;
  tp.num_tiles = num_attn_tiles;
  tp.dim = d;
  tp.scale_log2 = QCarriesScale() ? 1.0f : ScoreScaleLog2();
  tp.num_sms = num_sms;
  tp.keys_fit_l2 = static_cast<int64_t>(num_tokens) * d * 2 * 2 <= int64_t{l2_bytes} * 3 / 4;
  const bool persistent = precision == Precision::kBf16 && options.persistent_attention;
  rp.head_major = head_major;
  tp.head_major = head_major;
  const bool bf16_residual = d_act_bf16 != nullptr && tile_rows == 64 &&
                             (options.bf16_residual == 1 || num_row_tiles > 2 * num_sms);

  // The attention computed by the row tiles' clusters (fused_forward.cu): the whole forward in
  // one launch, or one launch per layer after layer 0's q/k/v below.
  cuda::FusedForwardParams fp{};
  if (fused || fused_layers) {
    fp.row = rp;
    fp.row.x_src = x_in;
    fp.row.x_dst = d_act;
    fp.mask_bits = tp.mask_bits;
    fp.scale_log2 = tp.scale_log2;
    fp.layer = -1;
    fp.sync = d_sync;
    fp.qkv_odd = d_fused_qkv_odd;
    fp.qkv_odd_tokens = fused_qkv_odd_tokens;
  }
  if (fused) {
    if (absl::Status s = cuda::LaunchFusedForward(fp, stream); !s.ok()) return s;
    Launched("fused");
    return absl::OkStatus();
  }

  // Layer 0's q/k/v from the input, then per layer: attention, and one row kernel that finishes
  // the layer and starts the next. The input block stays untouched, so a staged batch can run
  // again (benchmarks, graph replays) with the same result.
  rp.x_src = x_in;
  rp.x_dst = nullptr;
  rp.post_layer = -1;
  rp.qkv_layer = 0;
  // Per-sample sync: layer l's counters of q/k/v rows done and of attention items done.
  const int mb = options.max_batch_size;
  auto rows_done = [&](int l) { return l < 0 || !sample_sync ? nullptr : d_progress + 2 * l * mb; };
  auto items_done = [&](int l) {
    return l < 0 || !sample_sync ? nullptr : d_progress + (2 * l + 1) * mb;
  };
  rp.sample_sync = sample_sync;
  rp.rows_done = rows_done(0);
  if (absl::Status s = cuda::LaunchRow(rp, precision, d, tile_rows, stream); !s.ok()) return s;
  Launched("row");
  if (fused_layers) {
    // Each launch reads its tile's residual rows before any CTA of its cluster writes them (a
    // CTA writes after the cluster's exchange, which every peer joins after its reads), so the
    // layers update d_act in place.
    for (int l = 0; l < n; ++l) {
      fp.layer = l;
      fp.row.x_src = l == 0 ? x_in : d_act;
      if (absl::Status s = cuda::LaunchFusedForward(fp, stream); !s.ok()) return s;
      Launched("layer");
    }
    return absl::OkStatus();
  }
  for (int l = 0; l < n; ++l) {
    tp.scores_bounded = scores_bounded[l];
    tp.rows_done = rows_done(l);
    tp.items_done = items_done(l);
    if (absl::Status s =
            tile_queries == 16 ? cuda::LaunchAttentionSplitKeys(tp, stream)
            : persistent       ? cuda::LaunchAttentionBf16Persistent(tp, tile_queries, stream)
                               : cuda::LaunchAttention(tp, precision, tile_queries, stream);
        !s.ok()) {
      return s;
    }
    Launched("attention");
    rp.x_src = l == 0 ? x_in : d_act;
    rp.x_dst = d_act;
    if (bf16_residual) {  // the input and the last layer's output stay fp32
      rp.xb_src = l == 0 ? nullptr : d_act_bf16;
      rp.xb_dst = l + 1 < n ? d_act_bf16 : nullptr;
    }
    rp.post_layer = l;
    rp.qkv_layer = l + 1 < n ? l + 1 : -1;
    rp.items_done = items_done(l);
    rp.rows_done = rows_done(rp.qkv_layer);
    if (absl::Status s = cuda::LaunchRow(rp, precision, d, tile_rows, stream); !s.ok()) return s;
    Launched("row");
  }
  return absl::OkStatus();
}

absl::StatusOr<cudaGraphExec_t> CudaForwardImpl::Capture() {
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  const absl::Status run = RunStaged();
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (!run.ok()) {
    if (graph) cudaGraphDestroy(graph);
    return run;
  }
  CUDA_RETURN_IF_ERROR(end);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_RETURN_IF_ERROR(inst);
  return exec;
}

absl::Status CudaForwardImpl::RunCached() {
  if (options.graph_cache_size == 0 || batch == 0) return RunStaged();
  const LaunchShape shape = StagedShape();
  for (auto it = graphs.begin(); it != graphs.end(); ++it) {
    if (it->shape == shape) {
      graphs.splice(graphs.begin(), graphs, it);
      CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->exec, stream));
      ++graph_runs;
      return absl::OkStatus();
    }
  }
  const auto seen = std::find(seen_once.begin(), seen_once.end(), shape);
  if (seen == seen_once.end()) {  // the first run of this shape: no capture yet
    if (seen_once.size() == kSeenShapes) seen_once.pop_front();
    seen_once.push_back(shape);
    return RunStaged();
  }
  seen_once.erase(seen);
  absl::StatusOr<cudaGraphExec_t> exec = Capture();
  if (!exec.ok()) {
    // The graph is an optimisation: a batch whose capture fails is launched as it always was
    // (and fails only if that fails too).
    cudaGetLastError();
    return RunStaged();
  }
  if (graphs.size() == static_cast<size_t>(options.graph_cache_size)) {
    cudaGraphExecDestroy(graphs.back().exec);
    graphs.pop_back();
  }
  graphs.push_front(CachedGraph{shape, *exec});
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(*exec, stream));
  ++graph_runs;
  return absl::OkStatus();
}

absl::Status CudaForwardImpl::Fetch(ForwardBatch b) {
  if (static_cast<int>(b.size()) != batch) {
    return absl::InvalidArgumentError("Fetch takes the batch that was staged");
  }
  if (batch == 0) return absl::OkStatus();
  const int d = config.dim;
  float* x = reinterpret_cast<float*>(host_io + off_x);
  const size_t x_bytes = sizeof(float) * static_cast<size_t>(num_tokens) * d;
  const size_t chunk = ChunkBytes(x_bytes);
  int chunks = 0;
  for (size_t c0 = 0; c0 < x_bytes; c0 += chunk, ++chunks) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_io + off_x + c0, reinterpret_cast<char*>(d_act) + c0,
                                         std::min(chunk, x_bytes - c0), cudaMemcpyDeviceToHost,
                                         stream));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(chunk_fetched[chunks], stream));
  }
  size_t tok = 0;
  host_copies.clear();
  for (const ForwardSample& s : b) {
    host_copies.push_back({s.x_out, x + tok * d, sizeof(float) * s.seq_len * d});
    host_copies.push_back(
        {s.context_out, x + (tok + s.seq_len) * d, sizeof(float) * s.context_len * d});
    tok += s.seq_len + s.context_len;
  }
  // Each chunk copied out while the next one is still in transfer.
  for (int c = 0; c < chunks; ++c) {
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(chunk_fetched[c]));
    RunHostCopies(/*into_block=*/false, c * chunk, std::min((c + 1) * chunk, x_bytes));
  }
  return absl::OkStatus();
}

void CudaForwardImpl::RunHostCopies(bool into_block, size_t begin, size_t end) {
  // Pieces of up to 256 KB, taken in order by the pool's threads; below kParallelFrom in all,
  // the caller copies alone (waking the workers costs more than it saves).
  constexpr size_t kPiece = size_t{256} << 10;
  const char* const block = reinterpret_cast<const char*>(host_io + off_x);
  std::vector<HostCopy>& pieces = copy_pieces;
  pieces.clear();
  size_t total = 0;
  for (const HostCopy& c : host_copies) {
    const char* side = static_cast<const char*>(into_block ? c.dst : c.src);
    const size_t off = static_cast<size_t>(side - block);
    const size_t from = std::max(off, begin), to = std::min(off + c.bytes, end);
    for (size_t at = from; at < to; at += kPiece) {
      const size_t skip = at - off;
      pieces.push_back({static_cast<char*>(c.dst) + skip, static_cast<const char*>(c.src) + skip,
                        std::min(kPiece, to - at)});
      total += pieces.back().bytes;
    }
  }
  if (copy_pool == nullptr || total < kParallelFrom) {
    for (const HostCopy& p : pieces) std::memcpy(p.dst, p.src, p.bytes);
    return;
  }
  copy_pool->ParallelFor(static_cast<int>(pieces.size()), [&](int task, int) {
    std::memcpy(pieces[task].dst, pieces[task].src, pieces[task].bytes);
  });
}

CudaForward::CudaForward(std::unique_ptr<CudaForwardImpl> impl) : impl_(std::move(impl)) {}
CudaForward::~CudaForward() = default;

int CudaForward::DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear it: no driver or no device is not an error here
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<CudaForward>> CudaForward::Create(
    const ModelWeights& weights, const CudaForwardOptions& options) {
  const MmditConfig& c = weights.config;
  if (absl::Status s = c.Validate(); !s.ok()) return s;
  if (options.max_batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_size must be positive; was ", options.max_batch_size));
  }
  if (options.max_seq_len < 1 || options.max_context_len < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_seq_len and max_context_len must be positive; were ", options.max_seq_len, ", ",
        options.max_context_len));
  }
  if (static_cast<int64_t>(options.max_batch_size) *
          (options.max_seq_len + options.max_context_len) >
      (int64_t{1} << 30) / c.dim) {
    return absl::InvalidArgumentError("max_batch_size x (max_seq_len + max_context_len) is too "
                                      "large for one CUDA forward");
  }
  if (options.row_tile_rows != 0 && options.row_tile_rows != 16 && options.row_tile_rows != 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("row_tile_rows must be 0, 16 or 64; was ", options.row_tile_rows));
  }
  if (options.row_cluster_split != 0 && options.row_cluster_split != 1 &&
      options.row_cluster_split != 2 && options.row_cluster_split != cuda::kClusterSplit) {
    return absl::InvalidArgumentError(absl::StrCat("row_cluster_split must be 0, 1, 2 or ",
                                                   cuda::kClusterSplit, "; was ",
                                                   options.row_cluster_split));
  }
  if (options.copy_threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("copy_threads must be 1 or more; was ", options.copy_threads));
  }
  if (options.graph_cache_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("graph_cache_size must be 0 or more; was ", options.graph_cache_size));
  }
  if (options.bf16_residual < -1 || options.bf16_residual > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("bf16_residual must be -1, 0 or 1; was ", options.bf16_residual));
  }
  if (options.attn_tile_queries == 16 && options.precision != CudaPrecision::kBf16) {
    return absl::InvalidArgumentError("attn_tile_queries 16 (keys split over warps) is bf16 only");
  }
  if (options.attn_tile_queries == 256 &&
      (options.precision != CudaPrecision::kBf16 || !options.persistent_attention)) {
    return absl::InvalidArgumentError("attn_tile_queries 256 is the persistent bf16 kernel's only");
  }
  if (options.attn_tile_queries != 0 && options.attn_tile_queries != 16 &&
      options.attn_tile_queries != 64 && options.attn_tile_queries != 128 &&
      options.attn_tile_queries != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("attn_tile_queries must be 0, 16, 64, 128 or 256; was ",
                     options.attn_tile_queries));
  }
  if (c.head_dim() != cuda::kHeadDim || (c.dim != 128 && c.dim != 64) ||
      c.dim_feedforward % c.dim != 0 || (c.dim == 64 && options.row_tile_rows == 16)) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA forward supports head_dim 16, dim 64 or 128 and dim_feedforward a multiple of "
        "dim; the model has dim ", c.dim, ", ", c.num_heads, " heads, dim_feedforward ",
        c.dim_feedforward));
  }
  if (static_cast<int>(weights.layers.size()) != c.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("weights hold ", weights.layers.size(),
                                                   " layers; the config says ", c.num_layers));
  }
  const int count = DeviceCount();
  if (options.device < 0 || options.device >= count) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", options.device,
                                                      " does not exist (", count, " found)"));
  }
  auto impl = std::make_unique<CudaForwardImpl>();
  impl->options = options;
  impl->config = c;
  impl->precision =
      options.precision == CudaPrecision::kBf16 ? Precision::kBf16 : Precision::kFp32;
  if (absl::Status s = impl->Init(weights); !s.ok()) return s;
  return std::unique_ptr<CudaForward>(new CudaForward(std::move(impl)));
}

absl::Status CudaForward::Run(ForwardBatch batch) {
  if (absl::Status s = Stage(batch); !s.ok()) return s;
  if (absl::Status s = impl_->RunCached(); !s.ok()) return s;
  return FetchStaged(batch);
}

int64_t CudaForward::graph_runs() const { return impl_->graph_runs; }
int CudaForward::cached_graphs() const { return static_cast<int>(impl_->graphs.size()); }

absl::Status CudaForward::Stage(ForwardBatch batch) {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->options.device));
  if (impl_->graph_exec) {
    cudaGraphExecDestroy(impl_->graph_exec);
    impl_->graph_exec = nullptr;
  }
  return impl_->Stage(batch);
}

absl::Status CudaForward::RunStaged() {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->options.device));
  return impl_->RunStaged();
}

absl::Status CudaForward::FetchStaged(ForwardBatch batch) {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->options.device));
  return impl_->Fetch(batch);
}

absl::Status CudaForward::CaptureGraph() {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->options.device));
  if (impl_->graph_exec) {
    cudaGraphExecDestroy(impl_->graph_exec);
    impl_->graph_exec = nullptr;
  }
  absl::StatusOr<cudaGraphExec_t> exec = impl_->Capture();
  if (!exec.ok()) return exec.status();
  impl_->graph_exec = *exec;
  return absl::OkStatus();
}

absl::Status CudaForward::ReplayGraph() {
  if (!impl_->graph_exec) return absl::FailedPreconditionError("no graph captured");
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(impl_->graph_exec, impl_->stream));
  return absl::OkStatus();
}

CUstream_st* CudaForward::stream() const { return impl_->stream; }
void CudaForward::set_launch_hook(std::function<void(const char*)> hook) {
  impl_->launch_hook = std::move(hook);
}
const CudaForwardOptions& CudaForward::options() const { return impl_->options; }
int CudaForward::tile_rows() const { return impl_->tile_rows; }
int CudaForward::row_cluster_split() const { return impl_->cluster_split; }
int CudaForward::tile_queries() const { return impl_->tile_queries; }
bool CudaForward::fused() const { return impl_->fused; }
bool CudaForward::fused_layers() const { return impl_->fused_layers; }
bool CudaForward::per_sample_sync() const { return impl_->sample_sync; }
bool CudaForward::wgmma_adaln() const {
  return cuda::AdaLnOnWgmma(impl_->d_adaln_images, impl_->batch);
}
int CudaForward::bounded_score_layers() const {
  return static_cast<int>(
      std::count(impl_->scores_bounded.begin(), impl_->scores_bounded.end(), true));
}

}  // namespace mmdit
