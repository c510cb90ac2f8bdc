#include "kernels/cpu/fast_forward.h"

#include <cblas.h>
#include <sched.h>
#include <strings.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cpu/fast_forward_kernels.h"
#include "kernels/thread_pool.h"

namespace mmdit {
namespace cpu_fast {

void Gemm(int m, int n, int k, const float* a, const float* w_t, float* c) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, w_t, n, 0.0f, c,
              n);
}

size_t ScratchFloats(const ModelParams& model, int rows) {
  return static_cast<size_t>(rows) *
         (2 * model.dim + std::max(3 * model.dim, model.dim_feedforward));
}

}  // namespace cpu_fast

namespace {

using cpu_fast::AttentionTask;
using cpu_fast::RowTask;
using cpu_fast::SampleWork;

// Tokens per sample the workspace is sized for at Create: the target shape (L = 186, C = 64).
constexpr int kPlannedTokensPerSample = 256;

// Rows of one stream of one sample handled by one task, through all of a layer's row-local
// steps with the intermediate activations in that thread's scratch (64 rows x 512 hidden =
// 128 KB: within the 512 KB L2 of the machines measured). OpenBLAS reaches 62 GFLOP/s on one
// core at M = 48 and 73 at M = 128 for [M x 128]·[128 x 384], so rows are kept together
// where there are enough tasks to go round.
constexpr int kMaxRowsPerTask = 128;
constexpr int kMinRowsPerTask = 48;
// Fewest queries of one head per attention task.
constexpr int kMinQueriesPerTask = 64;

// OpenBLAS's own entry points, weak so that any other CBLAS links too (they stay null then).
extern "C" {
void openblas_set_num_threads(int) __attribute__((weak));
char* openblas_get_corename() __attribute__((weak));
void gotoblas_dynamic_init() __attribute__((weak));
void gotoblas_dynamic_quit() __attribute__((weak));
}

bool CpuHasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}

// Once per process, before any GEMM of ours:
// - OpenBLAS runs single-threaded: its threads inside ours would oversubscribe the cores
//   (several CPU workers each run `threads` threads), so every GEMM is issued from a task.
// - Debian 12's OpenBLAS (0.3.21) picks its kernels by CPU model and does not know recent Xeons:
//   on a Xeon of model 207 (Emerald Rapids, under KVM) it chose "Prescott" (SSE3) kernels and
//   the forward ran 40 samples/s at batch 8 on 2 cores; with its SkylakeX (AVX-512) kernels,
//   105. Where the CPU has AVX-512, OpenBLAS chose a core without it, and the user has not
//   chosen one (OPENBLAS_CORETYPE), its core selection is re-run with SkylakeX forced.
void ConfigureBlas() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (openblas_set_num_threads != nullptr) openblas_set_num_threads(1);
    if (openblas_get_corename == nullptr || gotoblas_dynamic_init == nullptr ||
        gotoblas_dynamic_quit == nullptr || std::getenv("OPENBLAS_CORETYPE") != nullptr ||
        !CpuHasAvx512()) {
      return;
    }
    const char* core = openblas_get_corename();
    for (const char* avx512_core : {"SkylakeX", "Cooperlake", "SapphireRapids"}) {
      if (core != nullptr && strcasecmp(core, avx512_core) == 0) return;
    }
    setenv("OPENBLAS_CORETYPE", "SkylakeX", /*overwrite=*/0);
    gotoblas_dynamic_quit();
    gotoblas_dynamic_init();
  });
}

// Cores this process may run on (taskset, cpusets), which hardware_concurrency ignores.
int UsableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// The widest variant this CPU runs; MMDIT_CPU_KERNELS=avx2 or =generic picks a narrower one
// (the tests check every variant the machine can run).
const cpu_fast::Kernels& SelectKernels() {
  const char* force = std::getenv("MMDIT_CPU_KERNELS");
  const std::string forced = force != nullptr ? force : "";
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && CpuHasAvx512();
  if (forced == "generic") return cpu_fast::generic::kKernels;
  if (avx512 && forced != "avx2") return cpu_fast::avx512::kKernels;
  if (avx2) return cpu_fast::avx2::kKernels;
  return cpu_fast::generic::kKernels;
}

// 64-byte aligned float storage that only grows. Reserve returns null when memory runs out.
class Workspace {
 public:
  float* Reserve(size_t floats) {
    if (floats > size_) {
      data_.reset(static_cast<float*>(
          std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64)));
      size_ = data_ != nullptr ? floats : 0;
    }
    return data_.get();
  }
  float* data() { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  size_t size_ = 0;
};

size_t RoundUp16(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace

class CpuFastForward::Impl {
 public:
  ModelWeights weights;
  cpu_fast::ModelParams params;
  const cpu_fast::Kernels* kernels = nullptr;
  std::unique_ptr<ThreadPool> pool;
  int max_batch_size = 1;

  std::vector<float> adaln_w;  // [N * 2 * 6D, D]: every layer's modulation in one GEMM
  std::vector<float> adaln_b;  // [N * 2 * 6D]
  std::vector<float> rope_cos, rope_sin;
  std::vector<std::vector<float>> transposed;  // Linear weights as [in, out]
  const float* Transposed(const std::vector<float>& w, int out, int in) {
    std::vector<float>& t = transposed.emplace_back(w.size());
    for (int o = 0; o < out; ++o) {
      for (int i = 0; i < in; ++i) t[static_cast<size_t>(i) * out + o] = w[static_cast<size_t>(o) * in + i];
    }
    return t.data();
  }

  Workspace attention;  // q, k, v, att of every sample
  Workspace scratch;    // per thread, ScratchFloats(kMaxRowsPerTask)
  size_t scratch_floats = 0;
  std::vector<float> silu_y, modulation;
  std::vector<uint8_t> visible;
  std::vector<SampleWork> samples;
  std::vector<RowTask> row_tasks;
  std::vector<AttentionTask> attention_tasks;

  absl::Status Run(ForwardBatch batch);
};

CpuFastForward::CpuFastForward(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CpuFastForward::~CpuFastForward() = default;

absl::StatusOr<std::unique_ptr<CpuFastForward>> CpuFastForward::Create(
    const ModelWeights& weights, const CpuForwardOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("threads must be >= 0 (0 = every core); was %d", options.threads));
  }
  if (options.max_batch_size <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "max_batch_size must be positive; was %d", options.max_batch_size));
  }
  const MmditConfig& config = weights.config;
  if (absl::Status st = config.Validate(); !st.ok()) return st;
  const int d = config.dim, f = config.dim_feedforward, n = config.num_layers;
  if (static_cast<int>(weights.layers.size()) != n) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights hold %d layers; config.num_layers is %d", weights.layers.size(), n));
  }

  auto impl = std::make_unique<Impl>();
  impl->transposed.reserve(static_cast<size_t>(n) * 2 * 4);  // pointers into it must stay put
  impl->weights = weights;
  impl->max_batch_size = options.max_batch_size;
  impl->kernels = &SelectKernels();
  int threads = options.threads;
  if (threads == 0) threads = UsableCores();
  impl->pool = std::make_unique<ThreadPool>(threads);
  ConfigureBlas();

  cpu_fast::ModelParams& p = impl->params;
  p.dim = d;
  p.num_heads = config.num_heads;
  p.head_dim = config.head_dim();
  p.dim_feedforward = f;
  p.num_layers = n;
  p.q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.head_dim)) /
                                 std::log(2.0));
  impl->adaln_w.resize(static_cast<size_t>(n) * 2 * 6 * d * d);
  impl->adaln_b.resize(static_cast<size_t>(n) * 2 * 6 * d);
  for (int l = 0; l < n; ++l) {
    for (int st = 0; st < 2; ++st) {
      const StreamWeights& w = st == 0 ? impl->weights.layers[l].x : impl->weights.layers[l].context;
      const size_t ls = static_cast<size_t>(l) * 2 + st;
      if (w.adaln_w.size() != static_cast<size_t>(6 * d * d) || w.qkv_w.size() != static_cast<size_t>(3 * d * d) ||
          w.mlp_up_w.size() != static_cast<size_t>(f) * d || w.mlp_down_w.size() != static_cast<size_t>(f) * d) {
        return absl::InvalidArgumentError(
            absl::StrFormat("layer %d stream %d: weight sizes do not match the config", l, st));
      }
      std::copy(w.adaln_w.begin(), w.adaln_w.end(), impl->adaln_w.begin() + ls * 6 * d * d);
      std::copy(w.adaln_b.begin(), w.adaln_b.end(), impl->adaln_b.begin() + ls * 6 * d);
      p.streams.push_back({impl->Transposed(w.qkv_w, 3 * d, d), w.qkv_b.data(), w.rms_q.data(),
                           w.rms_k.data(), impl->Transposed(w.out_w, d, d), w.out_b.data(),
                           w.out_rms.data(), impl->Transposed(w.mlp_up_w, f, d),
                           w.mlp_up_b.data(), impl->Transposed(w.mlp_down_w, d, f),
                           w.mlp_down_b.data()});
    }
  }

  // RoPE table: inv_freq and the angle p * inv_freq rounded to float32 as the original does,
  // then cos/sin of that float angle.
  const int half = p.head_dim / 2;
  impl->rope_cos.resize(static_cast<size_t>(config.max_seq_len) * half);
  impl->rope_sin.resize(impl->rope_cos.size());
  for (int pos = 0; pos < config.max_seq_len; ++pos) {
    for (int i = 0; i < half; ++i) {
      const float inv_freq =
          1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / static_cast<float>(p.head_dim));
      const float angle = static_cast<float>(pos) * inv_freq;
      impl->rope_cos[static_cast<size_t>(pos) * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      impl->rope_sin[static_cast<size_t>(pos) * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
  p.rope_cos = impl->rope_cos.data();
  p.rope_sin = impl->rope_sin.data();

  // Workspace for max_batch_size samples of the target shape; Run grows it (and only then
  // allocates) when a batch carries more tokens than any before.
  const int b = options.max_batch_size;
  const size_t tokens = static_cast<size_t>(b) * kPlannedTokensPerSample;
  impl->scratch_floats = RoundUp16(cpu_fast::ScratchFloats(p, kMaxRowsPerTask));
  if (impl->attention.Reserve(4 * tokens * d + static_cast<size_t>(b) * 4 * 16) == nullptr ||
      impl->scratch.Reserve(impl->scratch_floats * threads) == nullptr) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "CPU forward: no memory for the workspace of max_batch_size %d", b));
  }
  impl->silu_y.resize(static_cast<size_t>(b) * d);
  impl->modulation.resize(static_cast<size_t>(b) * n * 2 * 6 * d);
  impl->visible.reserve(static_cast<size_t>(b) * kPlannedTokensPerSample);
  impl->samples.reserve(b);
  impl->row_tasks.reserve(static_cast<size_t>(b) * 8);
  impl->attention_tasks.reserve(static_cast<size_t>(b) * p.num_heads * 4);
  return std::unique_ptr<CpuFastForward>(new CpuFastForward(std::move(impl)));
}

absl::Status CpuFastForward::Run(ForwardBatch batch) { return impl_->Run(batch); }

absl::Status CpuFastForward::Impl::Run(ForwardBatch batch) {
  const MmditConfig& config = weights.config;
  if (absl::Status st = ValidateBatch(config, batch); !st.ok()) return st;
  const int b = static_cast<int>(batch.size());
  if (b == 0) return absl::OkStatus();
  if (b > max_batch_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "batch of %d samples exceeds max_batch_size %d", b, max_batch_size));
  }
  const int d = params.dim, n = params.num_layers, heads = params.num_heads;

  // Plan: workspace offsets, key-visibility rows, tasks.
  size_t floats = 0, visible_bytes = 0;
  int total_rows = 0;
  for (const ForwardSample& fs : batch) {
    const size_t t = fs.seq_len + fs.context_len;
    const size_t tpad = (t + cpu_fast::kKeyBlock - 1) / cpu_fast::kKeyBlock * cpu_fast::kKeyBlock;
    floats += RoundUp16(t * d) * 2 + RoundUp16(tpad * d) * 2;
    visible_bytes += tpad * (1 + (fs.attn_mask != nullptr ? fs.seq_len + 1 : 0));
    total_rows += static_cast<int>(t);
  }
  float* ws = attention.Reserve(floats);
  if (ws == nullptr) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "CPU forward: no memory for the workspace of %d samples (%d tokens)", b, total_rows));
  }
  size_t max_tpad = 0;
  for (const ForwardSample& fs : batch) {
    max_tpad = std::max<size_t>(max_tpad, fs.seq_len + fs.context_len);
  }
  max_tpad = (max_tpad + cpu_fast::kKeyBlock - 1) / cpu_fast::kKeyBlock * cpu_fast::kKeyBlock;
  scratch_floats = std::max(scratch_floats, RoundUp16(max_tpad * params.head_dim));
  if (scratch.Reserve(scratch_floats * pool->num_threads()) == nullptr) {
    return absl::ResourceExhaustedError("CPU forward: no memory for per-thread scratch");
  }
  visible.resize(visible_bytes);
  samples.resize(b);
  size_t vis_off = 0;
  for (int i = 0; i < b; ++i) {
    const ForwardSample& fs = batch[i];
    SampleWork& s = samples[i];
    s.seq_len = fs.seq_len;
    s.context_len = fs.context_len;
    s.tokens = fs.seq_len + fs.context_len;
    s.tokens_padded = (s.tokens + cpu_fast::kKeyBlock - 1) / cpu_fast::kKeyBlock * cpu_fast::kKeyBlock;
    s.start_pos = fs.start_pos;
    s.x = fs.x;
    s.context = fs.context;
    s.x_res = fs.x_out;
    s.context_res = fs.context_out;
    s.modulation = modulation.data() + static_cast<size_t>(i) * n * 2 * 6 * d;
    const size_t t = s.tokens, tpad = s.tokens_padded, l = s.seq_len;
    s.q = ws;
    ws += RoundUp16(t * d);
    s.k = ws;
    ws += RoundUp16(tpad * d);
    s.v = ws;
    ws += RoundUp16(tpad * d);
    s.att = ws;
    ws += RoundUp16(t * d);
    // Padded keys: zero K and V so that masked lanes can never carry NaN from old memory.
    for (int h = 0; h < heads; ++h) {
      std::fill_n(s.k + (static_cast<size_t>(h) * tpad + t) * params.head_dim,
                  (tpad - t) * params.head_dim, 0.0f);
      std::fill_n(s.v + (static_cast<size_t>(h) * tpad + t) * params.head_dim,
                  (tpad - t) * params.head_dim, 0.0f);
    }
    uint8_t* vis = visible.data() + vis_off;
    std::fill_n(vis, t, 1);
    std::fill_n(vis + t, tpad - t, 0);
    s.visible_all = vis;
    s.masked = fs.attn_mask != nullptr;
    if (s.masked) {
      uint8_t* vx = vis + tpad;
      uint8_t* vc = vx + l * tpad;
      std::fill_n(vc, tpad, 0);
      for (size_t qi = 0; qi < l; ++qi) {
        uint8_t* row = vx + qi * tpad;
        const uint8_t* m = fs.attn_mask + qi * l;
        for (size_t j = 0; j < l; ++j) {
          row[j] = m[j] != 0;
          vc[j] |= row[j];
        }
        // Every row has a visible x key (ValidateBatch), so every x query sees the context.
        std::fill_n(row + l, t - l, 1);
        std::fill_n(row + t, tpad - t, 0);
      }
      std::fill_n(vc + l, t - l, 1);
      s.visible_x = vx;
      s.visible_context = vc;
      vis_off += tpad * (l + 1);
    }
    vis_off += tpad;
  }

  // Fewer rows per task when the batch is small, so every thread has work.
  const int threads = pool->num_threads();
  int rows_per_task = total_rows / (threads * 2);
  rows_per_task = std::clamp(rows_per_task, kMinRowsPerTask, kMaxRowsPerTask);
  row_tasks.clear();
  attention_tasks.clear();
  for (SampleWork& s : samples) {
    for (int st = 0; st < 2; ++st) {
      const int rows = st == 0 ? s.seq_len : s.context_len;
      const int pieces = (rows + rows_per_task - 1) / rows_per_task;
      for (int k = 0; k < pieces; ++k) {
        const int r0 = static_cast<int>(static_cast<int64_t>(rows) * k / pieces);
        const int r1 = static_cast<int>(static_cast<int64_t>(rows) * (k + 1) / pieces);
        row_tasks.push_back({&s, st, r0, r1 - r0, -1, 0});
      }
    }
    // Each task transposes its head's keys once, so heads are split only when there are too
    // few (sample, head) pairs to keep every thread busy.
    const int pieces = std::clamp((2 * threads + b * heads - 1) / (b * heads), 1,
                                  (s.tokens + kMinQueriesPerTask - 1) / kMinQueriesPerTask);
    for (int h = 0; h < heads; ++h) {
      for (int k = 0; k < pieces; ++k) {
        // Split on multiples of the query tile so only the last piece has a ragged end.
        const int q0 = s.tokens * k / pieces / cpu_fast::kQueryTile * cpu_fast::kQueryTile;
        const int q1 = k + 1 == pieces ? s.tokens
                                       : s.tokens * (k + 1) / pieces / cpu_fast::kQueryTile *
                                             cpu_fast::kQueryTile;
        attention_tasks.push_back({&s, h, q0, q1 - q0});
      }
    }
  }
  // Largest first, so the last tasks to be picked up are short (std::sort: stable_sort may
  // allocate a buffer).
  std::sort(row_tasks.begin(), row_tasks.end(), [](const RowTask& a, const RowTask& c) {
    if (a.rows != c.rows) return a.rows > c.rows;
    if (a.sample != c.sample) return a.sample < c.sample;
    if (a.stream != c.stream) return a.stream < c.stream;
    return a.row0 < c.row0;
  });

  // Modulation of every layer and stream from silu(y): one GEMM per layer.
  for (int i = 0; i < b; ++i) kernels->silu_rows(batch[i].y, d, silu_y.data() + static_cast<size_t>(i) * d);
  const int mod_cols = 2 * 6 * d;
  pool->ParallelFor(n, [&](int l, int) {
    const size_t ld = static_cast<size_t>(n) * mod_cols;
    // [b, 12D] block of layer l inside the [b, N * 12D] modulation, written row by row.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b, mod_cols, d, 1.0f, silu_y.data(), d,
                adaln_w.data() + static_cast<size_t>(l) * mod_cols * d, d, 0.0f,
                modulation.data() + static_cast<size_t>(l) * mod_cols, static_cast<int>(ld));
    for (int i = 0; i < b; ++i) {
      float* m = modulation.data() + i * ld + static_cast<size_t>(l) * mod_cols;
      const float* bias = adaln_b.data() + static_cast<size_t>(l) * mod_cols;
      for (int c = 0; c < mod_cols; ++c) m[c] += bias[c];
    }
  });

  float* scratch_base = scratch.data();
  auto run_rows = [&](int layer_done) {
    pool->ParallelFor(static_cast<int>(row_tasks.size()), [&](int k, int thread) {
      RowTask task = row_tasks[k];
      task.layer_done = layer_done;
      task.layer_next = layer_done + 1;
      kernels->run_rows(params, task, scratch_base + thread * scratch_floats);
    });
  };
  run_rows(-1);
  for (int l = 0; l < n; ++l) {
    pool->ParallelFor(static_cast<int>(attention_tasks.size()),
                      [&](int k, int thread) {
                        kernels->run_attention(params, attention_tasks[k],
                                               scratch_base + thread * scratch_floats);
                      });
    run_rows(l);
  }
  return absl::OkStatus();
}

}  // namespace mmdit
