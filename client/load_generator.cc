#include "client/load_generator.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace mmdit {
namespace {

InferTensor RandomFloats(const std::string& name, std::vector<int64_t> shape, std::mt19937* rng) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> values(n);
  for (float& v : values) v = dist(*rng);
  InferTensor t;
  t.name = name;
  t.datatype = "FP32";
  t.shape = std::move(shape);
  t.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

// Nearest-rank percentile of sorted values.
absl::Duration Percentile(const std::vector<absl::Duration>& sorted, double p) {
  if (sorted.empty()) return absl::ZeroDuration();
  size_t rank = static_cast<size_t>(p / 100.0 * sorted.size() + 0.999999);
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoadGenerator>> LoadGenerator::Create(const Options& options) {
  auto positive = [](const char* name, int64_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(name, " must be positive; was ", v));
  };
  for (absl::Status s : {positive("concurrency", options.concurrency),
                         positive("max_requests", options.max_requests),
                         positive("batch_size", options.batch_size),
                         positive("seq_len", options.seq_len),
                         positive("context_len", options.context_len),
                         positive("dim", options.dim)}) {
    if (!s.ok()) return s;
  }
  if (options.max_duration <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_duration must be positive; was ", absl::FormatDuration(options.max_duration)));
  }
  if (options.concurrency > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency must be at most 4096; was ", options.concurrency));
  }
  if (options.connect_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "connect_timeout must be positive; was ", absl::FormatDuration(options.connect_timeout)));
  }
  if (options.address.empty()) return absl::InvalidArgumentError("address is empty");
  return std::unique_ptr<LoadGenerator>(new LoadGenerator(options));
}

absl::StatusOr<LoadGenerator::Report> LoadGenerator::Run() {
  const Options& o = options_;
  std::vector<std::unique_ptr<InferenceClient>> clients;
  std::vector<inference::ModelInferRequest> requests;
  for (int i = 0; i < o.concurrency; ++i) {
    InferenceClient::Options client_options;
    client_options.address = o.address;
    client_options.own_connection = true;
    auto client = InferenceClient::Create(client_options);
    if (!client.ok()) return client.status();
    clients.push_back(*std::move(client));
    // Each client sends its own inputs, so that batches mix different data.
    std::mt19937 rng(static_cast<uint32_t>(o.seed + i));
    const std::vector<InferTensor> inputs = {
        RandomFloats("x", {o.batch_size, o.seq_len, o.dim}, &rng),
        RandomFloats("y", {o.batch_size, 1, o.dim}, &rng),
        RandomFloats("context", {o.batch_size, o.context_len, o.dim}, &rng)};
    auto request = BuildInferRequest(o.model, inputs, o.encoding);
    if (!request.ok()) return request.status();
    requests.push_back(*std::move(request));
  }

  // A call on a channel whose first connection attempt failed would fail at once, and its thread
  // would use up the run's requests in a tight loop (seen once: 21 of 24 requests failed in
  // 12 ms on a busy machine); waiting here lets gRPC retry the connection instead.
  const absl::Time connect_deadline = absl::Now() + o.connect_timeout;
  for (const std::unique_ptr<InferenceClient>& client : clients) {
    const absl::Duration left = std::max(absl::ZeroDuration(), connect_deadline - absl::Now());
    if (absl::Status s = client->WaitForConnected(left); !s.ok()) return s;
  }

  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::vector<absl::Duration> latencies;
  Report report;
  const absl::Time start = absl::Now();
  const absl::Time stop = start + o.max_duration;
  std::vector<std::thread> threads;
  for (int i = 0; i < o.concurrency; ++i) {
    threads.emplace_back([&, i] {
      std::vector<absl::Duration> mine;
      int64_t failed = 0;
      std::map<std::string, int64_t> failures;
      std::string first_error;
      while (next.fetch_add(1) < o.max_requests) {
        const absl::Time now = absl::Now();
        if (now >= stop) break;
        // The deadline never outlives the run's bound by more than the request timeout.
        auto response = clients[i]->ModelInfer(requests[i], o.timeout);
        const absl::Duration latency = absl::Now() - now;
        if (response.ok()) {
          mine.push_back(latency);
        } else {
          ++failed;
          ++failures[absl::StatusCodeToString(response.status().code())];
          if (first_error.empty()) first_error = response.status().ToString();
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      latencies.insert(latencies.end(), mine.begin(), mine.end());
      report.failed += failed;
      for (const auto& [code, n] : failures) report.failures[code] += n;
      if (report.first_error.empty()) report.first_error = first_error;
    });
  }
  for (std::thread& t : threads) t.join();
  report.elapsed = absl::Now() - start;

  std::sort(latencies.begin(), latencies.end());
  report.succeeded = static_cast<int64_t>(latencies.size());
  const double seconds = std::max(1e-9, absl::ToDoubleSeconds(report.elapsed));
  report.requests_per_second = report.succeeded / seconds;
  report.samples_per_second = report.succeeded * static_cast<double>(o.batch_size) / seconds;
  if (!latencies.empty()) {
    absl::Duration total;
    for (absl::Duration d : latencies) total += d;
    report.latency_mean = total / static_cast<int64_t>(latencies.size());
    report.latency_p50 = Percentile(latencies, 50);
    report.latency_p90 = Percentile(latencies, 90);
    report.latency_p99 = Percentile(latencies, 99);
    report.latency_max = latencies.back();
  }
  return report;
}

std::string FormatReport(const LoadGenerator::Options& o, const LoadGenerator::Report& r) {
  auto ms = [](absl::Duration d) { return absl::ToDoubleMilliseconds(d); };
  std::string out = absl::StrFormat(
      "target %s model %s: %d clients, batch %d, L=%d, C=%d, D=%d, %s\n"
      "requests: %d ok, %d failed in %.3f s\n"
      "throughput: %.2f requests/s, %.2f samples/s\n"
      "latency (ms): mean %.3f  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n",
      o.address, o.model, o.concurrency, o.batch_size, o.seq_len, o.context_len, o.dim,
      o.encoding == TensorEncoding::kRaw ? "raw" : "typed", r.succeeded, r.failed,
      absl::ToDoubleSeconds(r.elapsed), r.requests_per_second, r.samples_per_second,
      ms(r.latency_mean), ms(r.latency_p50), ms(r.latency_p90), ms(r.latency_p99),
      ms(r.latency_max));
  for (const auto& [code, n] : r.failures) absl::StrAppend(&out, "failed ", code, ": ", n, "\n");
  if (!r.first_error.empty()) absl::StrAppend(&out, "first error: ", r.first_error, "\n");
  return out;
}

}  // namespace mmdit
