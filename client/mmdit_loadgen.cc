// mmdit-loadgen: N concurrent clients send requests of one shape to one mmdit-server until a
// request count or a duration runs out; prints throughput and latency percentiles.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "client/inference_client.h"
#include "client/load_generator.h"

ABSL_FLAG(std::string, server, "127.0.0.1:8001",
          "host:port of the server's gRPC endpoint; the only address requests go to");
ABSL_FLAG(std::string, model, "mmdit", "Name of the model to call");
ABSL_FLAG(int, concurrency, 4, "Clients sending at once, each on its own connection");
ABSL_FLAG(int64_t, requests, 1000, "Stop after this many requests in all");
ABSL_FLAG(double, duration_s, 30, "Stop after this many seconds, whichever bound comes first");
ABSL_FLAG(int, batch, 1, "Samples (B) per request");
ABSL_FLAG(int, seq_len, 186, "x tokens per sample (L)");
ABSL_FLAG(int, context_len, 64, "Context tokens per sample (C)");
ABSL_FLAG(int, dim, 128, "Model dimension (D) of the served model");
ABSL_FLAG(bool, typed, false, "Send typed fp32_contents instead of raw_input_contents");
ABSL_FLAG(int64_t, timeout_ms, 60000, "Deadline of each request in milliseconds");
ABSL_FLAG(double, wait_ready_s, 30,
          "Wait this long for the server to be ready, and as long again for every client's "
          "connection, before the clock starts");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Load test for mmdit-server.\n"
      "  mmdit-loadgen --server=127.0.0.1:8001 --concurrency=8 --requests=1000 --batch=4");
  // --help lists this file's flags: Abseil would look for a file named after the binary, whose
  // dashes are this file's underscores. It records paths without their leading '/'.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view path) {
    return absl::EndsWith(__FILE__, path);
  };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  mmdit::LoadGenerator::Options options;
  options.address = absl::GetFlag(FLAGS_server);
  options.model = absl::GetFlag(FLAGS_model);
  options.concurrency = absl::GetFlag(FLAGS_concurrency);
  options.max_requests = absl::GetFlag(FLAGS_requests);
  options.max_duration = absl::Seconds(absl::GetFlag(FLAGS_duration_s));
  options.batch_size = absl::GetFlag(FLAGS_batch);
  options.seq_len = absl::GetFlag(FLAGS_seq_len);
  options.context_len = absl::GetFlag(FLAGS_context_len);
  options.dim = absl::GetFlag(FLAGS_dim);
  options.encoding =
      absl::GetFlag(FLAGS_typed) ? mmdit::TensorEncoding::kTyped : mmdit::TensorEncoding::kRaw;
  options.timeout = absl::Milliseconds(absl::GetFlag(FLAGS_timeout_ms));
  options.connect_timeout = absl::Seconds(absl::GetFlag(FLAGS_wait_ready_s));

  auto generator = mmdit::LoadGenerator::Create(options);
  if (!generator.ok()) {
    std::fprintf(stderr, "mmdit-loadgen: %s\n", generator.status().ToString().c_str());
    return 1;
  }
  mmdit::InferenceClient::Options client_options;
  client_options.address = options.address;
  auto probe = mmdit::InferenceClient::Create(client_options);
  if (!probe.ok()) {
    std::fprintf(stderr, "mmdit-loadgen: %s\n", probe.status().ToString().c_str());
    return 1;
  }
  if (absl::Status s = (*probe)->WaitForReady(absl::Seconds(absl::GetFlag(FLAGS_wait_ready_s)));
      !s.ok()) {
    std::fprintf(stderr, "mmdit-loadgen: %s: %s\n", options.address.c_str(),
                 s.ToString().c_str());
    return 1;
  }
  auto report = (*generator)->Run();
  if (!report.ok()) {
    std::fprintf(stderr, "mmdit-loadgen: %s\n", report.status().ToString().c_str());
    return 1;
  }
  std::fputs(mmdit::FormatReport(options, *report).c_str(), stdout);
  return report->succeeded > 0 ? 0 : 1;
}
