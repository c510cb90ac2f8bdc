// Plain loops over one sample at a time, in MODEL.md's order. Storage is float32; dot products
// and norms accumulate in double so that the oracle sits closer to the float64 fixtures than any
// fast path it checks.
#include "kernels/cpu/reference_forward.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace mmdit {
namespace {

constexpr float kLayerNormEps = 1e-6f;
constexpr float kRmsNormEps = 1.1920929e-07f;  // float32 machine epsilon, 2^-23
constexpr float kRopeBase = 10000.0f;

float Silu(float v) { return v / (1.0f + std::exp(-v)); }

// out[n, m] = in[n, k] · w[m, k]ᵀ + b[m]  (PyTorch Linear layout)
void Linear(const float* in, int n, int k, const std::vector<float>& w, const std::vector<float>& b,
            int m, float* out) {
  for (int r = 0; r < n; ++r) {
    for (int o = 0; o < m; ++o) {
      double acc = b[o];
      for (int i = 0; i < k; ++i) acc += static_cast<double>(in[r * k + i]) * w[o * k + i];
      out[r * m + o] = static_cast<float>(acc);
    }
  }
}

// out = LN(in) * (1 + scale) + shift, per row of d; LayerNorm without affine, biased variance.
void LayerNormModulate(const float* in, int n, int d, const float* scale, const float* shift,
                       float* out) {
  for (int r = 0; r < n; ++r) {
    const float* row = in + r * d;
    double mean = 0, var = 0;
    for (int i = 0; i < d; ++i) mean += row[i];
    mean /= d;
    for (int i = 0; i < d; ++i) var += (row[i] - mean) * (row[i] - mean);
    var /= d;
    const double inv = 1.0 / std::sqrt(var + kLayerNormEps);
    for (int i = 0; i < d; ++i) {
      out[r * d + i] = static_cast<float>((row[i] - mean) * inv * (1.0 + scale[i]) + shift[i]);
    }
  }
}

// In place: v = v * rsqrt(mean(v²) + eps) * w for each row of d.
void RmsNorm(float* v, int n, int d, const std::vector<float>& w) {
  for (int r = 0; r < n; ++r) {
    float* row = v + r * d;
    double ms = 0;
    for (int i = 0; i < d; ++i) ms += static_cast<double>(row[i]) * row[i];
    const double inv = 1.0 / std::sqrt(ms / d + kRmsNormEps);
    for (int i = 0; i < d; ++i) row[i] = static_cast<float>(row[i] * inv * w[i]);
  }
}

// Rotates adjacent pairs (2i, 2i+1) of every head of rows [n, d] by (start_pos + row) · inv_freq.
void Rope(float* v, int n, int d, int head_dim, int64_t start_pos) {
  for (int r = 0; r < n; ++r) {
    const float pos = static_cast<float>(start_pos + r);
    for (int i = 0; i < head_dim / 2; ++i) {
      const float inv_freq =
          1.0f / std::pow(kRopeBase, static_cast<float>(2 * i) / static_cast<float>(head_dim));
      const float angle = pos * inv_freq;  // float32, as the original precomputes it
      const double c = std::cos(static_cast<double>(angle));
      const double s = std::sin(static_cast<double>(angle));
      for (int h = 0; h < d / head_dim; ++h) {
        float* pair = v + r * d + h * head_dim + 2 * i;
        const double a = pair[0], b = pair[1];
        pair[0] = static_cast<float>(a * c - b * s);
        pair[1] = static_cast<float>(a * s + b * c);
      }
    }
  }
}

// Per-stream activations of one sample.
struct Stream {
  int n = 0;                       // tokens
  std::vector<float> act;          // [n, D] the residual stream
  std::vector<float> mod;          // [6D] modulation chunks
  std::vector<float> h;            // [n, D] modulated norm
  std::vector<float> qkv;          // [n, 3D]
  std::vector<float> q, k, v;      // [n, D] each
  std::vector<float> att;          // [n, D] attention output (heads merged)
  std::vector<float> proj;         // [n, D]
  std::vector<float> hidden;       // [n, F]
};

enum Chunk { kScaleAttn = 0, kShiftAttn, kGateAttn, kScaleMlp, kShiftMlp, kGateMlp };

// Steps 1–3: modulation, modulated LayerNorm, q/k/v with their RMSNorms.
void Project(const StreamWeights& w, const MmditConfig& c, const std::vector<float>& silu_y,
             Stream& s) {
  const int d = c.dim;
  s.mod.resize(6 * d);
  Linear(silu_y.data(), 1, d, w.adaln_w, w.adaln_b, 6 * d, s.mod.data());
  s.h.resize(s.n * d);
  LayerNormModulate(s.act.data(), s.n, d, &s.mod[kScaleAttn * d], &s.mod[kShiftAttn * d],
                    s.h.data());
  s.qkv.resize(s.n * 3 * d);
  Linear(s.h.data(), s.n, d, w.qkv_w, w.qkv_b, 3 * d, s.qkv.data());
  s.q.resize(s.n * d);
  s.k.resize(s.n * d);
  s.v.resize(s.n * d);
  for (int t = 0; t < s.n; ++t) {
    std::copy_n(&s.qkv[t * 3 * d], d, &s.q[t * d]);
    std::copy_n(&s.qkv[t * 3 * d + d], d, &s.k[t * d]);
    std::copy_n(&s.qkv[t * 3 * d + 2 * d], d, &s.v[t * d]);
  }
  RmsNorm(s.q.data(), s.n, d, w.rms_q);
  RmsNorm(s.k.data(), s.n, d, w.rms_k);
}

// Step 6: softmax(q kᵀ / sqrt(Dh) + mask) v over the joint token list [x (L), context (C)].
void JointAttention(const MmditConfig& c, const ForwardSample& sample, Stream& xs, Stream& cs) {
  const int d = c.dim, dh = c.head_dim(), L = xs.n, C = cs.n, T = L + C;
  const uint8_t* m = sample.attn_mask;
  std::vector<uint8_t> row_any(L, 1), col_any(L, 1);
  if (m != nullptr) {
    for (int i = 0; i < L; ++i) {
      row_any[i] = col_any[i] = 0;
    }
    for (int i = 0; i < L; ++i) {
      for (int j = 0; j < L; ++j) {
        if (m[i * L + j]) row_any[i] = col_any[j] = 1;
      }
    }
  }
  auto visible = [&](int i, int j) -> bool {
    if (m == nullptr) return true;
    if (i < L && j < L) return m[i * L + j] != 0;
    if (i < L) return row_any[i] != 0;
    if (j < L) return col_any[j] != 0;
    return true;
  };
  auto token = [&](const std::vector<float>& xv, const std::vector<float>& cv, int t) {
    return t < L ? &xv[t * d] : &cv[(t - L) * d];
  };
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  xs.att.assign(L * d, 0.0f);
  cs.att.assign(C * d, 0.0f);
  std::vector<double> score(T);
  for (int head = 0; head < d / dh; ++head) {
    const int off = head * dh;
    for (int i = 0; i < T; ++i) {
      const float* q = token(xs.q, cs.q, i) + off;
      double max_score = -INFINITY;
      for (int j = 0; j < T; ++j) {
        if (!visible(i, j)) {
          score[j] = -INFINITY;
          continue;
        }
        const float* k = token(xs.k, cs.k, j) + off;
        double dot = 0;
        for (int e = 0; e < dh; ++e) dot += static_cast<double>(q[e]) * k[e];
        score[j] = dot * scale;
        max_score = std::max(max_score, score[j]);
      }
      double denom = 0;
      for (int j = 0; j < T; ++j) {
        score[j] = score[j] == -INFINITY ? 0.0 : std::exp(score[j] - max_score);
        denom += score[j];
      }
      float* out = (i < L ? &xs.att[i * d] : &cs.att[(i - L) * d]) + off;
      for (int e = 0; e < dh; ++e) {
        double acc = 0;
        for (int j = 0; j < T; ++j) acc += score[j] * token(xs.v, cs.v, j)[off + e];
        out[e] = static_cast<float>(acc / denom);
      }
    }
  }
}

// Steps 7–9: output projection + RMSNorm + gated residual, then the gated MLP residual.
void Finish(const StreamWeights& w, const MmditConfig& c, Stream& s) {
  const int d = c.dim, f = c.dim_feedforward;
  s.proj.resize(s.n * d);
  Linear(s.att.data(), s.n, d, w.out_w, w.out_b, d, s.proj.data());
  RmsNorm(s.proj.data(), s.n, d, w.out_rms);
  const float* gate_attn = &s.mod[kGateAttn * d];
  for (int t = 0; t < s.n; ++t) {
    for (int i = 0; i < d; ++i) s.act[t * d + i] += s.proj[t * d + i] * gate_attn[i];
  }
  LayerNormModulate(s.act.data(), s.n, d, &s.mod[kScaleMlp * d], &s.mod[kShiftMlp * d],
                    s.h.data());
  s.hidden.resize(s.n * f);
  Linear(s.h.data(), s.n, d, w.mlp_up_w, w.mlp_up_b, f, s.hidden.data());
  for (float& v : s.hidden) v = Silu(v);
  Linear(s.hidden.data(), s.n, f, w.mlp_down_w, w.mlp_down_b, d, s.proj.data());
  const float* gate_mlp = &s.mod[kGateMlp * d];
  for (int t = 0; t < s.n; ++t) {
    for (int i = 0; i < d; ++i) s.act[t * d + i] += s.proj[t * d + i] * gate_mlp[i];
  }
}

void ForwardOne(const ModelWeights& weights, const ForwardSample& sample) {
  const MmditConfig& c = weights.config;
  const int d = c.dim;
  Stream xs, cs;
  xs.n = sample.seq_len;
  cs.n = sample.context_len;
  xs.act.assign(sample.x, sample.x + xs.n * d);
  cs.act.assign(sample.context, sample.context + cs.n * d);
  std::vector<float> silu_y(d);
  for (int i = 0; i < d; ++i) silu_y[i] = Silu(sample.y[i]);

  for (const LayerWeights& layer : weights.layers) {
    Project(layer.x, c, silu_y, xs);
    Project(layer.context, c, silu_y, cs);
    Rope(xs.q.data(), xs.n, d, c.head_dim(), sample.start_pos);  // x stream only
    Rope(xs.k.data(), xs.n, d, c.head_dim(), sample.start_pos);
    JointAttention(c, sample, xs, cs);
    Finish(layer.x, c, xs);
    Finish(layer.context, c, cs);
  }
  std::copy(xs.act.begin(), xs.act.end(), sample.x_out);
  std::copy(cs.act.begin(), cs.act.end(), sample.context_out);
}

}  // namespace

absl::Status ReferenceForward(const ModelWeights& weights, ForwardBatch batch) {
  if (absl::Status s = ValidateBatch(weights.config, batch); !s.ok()) return s;
  for (const ForwardSample& sample : batch) ForwardOne(weights, sample);
  return absl::OkStatus();
}

}  // namespace mmdit
