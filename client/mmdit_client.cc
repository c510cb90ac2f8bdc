// mmdit-client: sends a .safetensors of inputs (x, y, context, optional attn_mask and start_pos)
// to a running mmdit-server, writes the outputs as .safetensors and prints the round-trip time.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/inference_client.h"
#include "kernels/safetensors.h"

ABSL_FLAG(std::string, server, "127.0.0.1:8001", "host:port of the server's gRPC endpoint");
ABSL_FLAG(std::string, model, "mmdit", "Name of the model to call");
ABSL_FLAG(std::string, inputs, "", "Input .safetensors: x, y, context [, attn_mask, start_pos]");
ABSL_FLAG(std::string, outputs, "", "Where to write the outputs (.safetensors); empty: not written");
ABSL_FLAG(bool, typed, false,
          "Send typed contents (fp32_contents, …) instead of raw_input_contents; FP32, BOOL and "
          "INT64 only");
ABSL_FLAG(int64_t, timeout_ms, 60000, "Deadline of the call in milliseconds; 0: none");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "mmdit-client: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Sends inputs to a running mmdit-server and writes its outputs.\n"
      "  mmdit-client --server=127.0.0.1:8001 --model=mmdit --inputs=IN.safetensors "
      "--outputs=OUT.safetensors [--typed] [--timeout_ms=N]");
  // --help lists this file's flags: Abseil would look for a file named after the binary, whose
  // dashes are this file's underscores. It records paths without their leading '/'.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view path) {
    return absl::EndsWith(__FILE__, path);
  };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  const std::string inputs_path = absl::GetFlag(FLAGS_inputs);
  if (inputs_path.empty()) return Fail("--inputs is required");
  const int64_t timeout_ms = absl::GetFlag(FLAGS_timeout_ms);
  if (timeout_ms < 0) return Fail("--timeout_ms must be >= 0");

  absl::StatusOr<mmdit::SafetensorsFile> file = mmdit::SafetensorsFile::Read(inputs_path);
  if (!file.ok()) return Fail(std::string(file.status().message()));
  std::vector<std::string> skipped;
  auto inputs = mmdit::InputsFromSafetensors(*file, &skipped);
  if (!inputs.ok()) return Fail(std::string(inputs.status().message()));
  if (!skipped.empty()) {
    std::fprintf(stderr, "mmdit-client: ignoring tensors %s of %s\n",
                 absl::StrJoin(skipped, ", ").c_str(), inputs_path.c_str());
  }
  const mmdit::TensorEncoding encoding =
      absl::GetFlag(FLAGS_typed) ? mmdit::TensorEncoding::kTyped : mmdit::TensorEncoding::kRaw;
  auto request = mmdit::BuildInferRequest(absl::GetFlag(FLAGS_model), *inputs, encoding);
  if (!request.ok()) return Fail(std::string(request.status().message()));

  mmdit::InferenceClient::Options options;
  options.address = absl::GetFlag(FLAGS_server);
  auto client = mmdit::InferenceClient::Create(options);
  if (!client.ok()) return Fail(std::string(client.status().message()));

  const absl::Duration timeout =
      timeout_ms == 0 ? absl::InfiniteDuration() : absl::Milliseconds(timeout_ms);
  const absl::Time start = absl::Now();
  auto response = (*client)->ModelInfer(*request, timeout);
  const absl::Duration round_trip = absl::Now() - start;
  if (!response.ok()) {
    return Fail(absl::StrCat(options.address, ": ", response.status().ToString()));
  }
  auto outputs = mmdit::DecodeInferResponse(*response);
  if (!outputs.ok()) return Fail(std::string(outputs.status().message()));

  for (const mmdit::InferTensor& t : *outputs) {
    std::printf("%s %s%s\n", t.name.c_str(), t.datatype.c_str(),
                mmdit::ShapeString(t.shape).c_str());
  }
  std::printf("round trip: %.3f ms\n", absl::ToDoubleMilliseconds(round_trip));
  const std::string outputs_path = absl::GetFlag(FLAGS_outputs);
  if (!outputs_path.empty()) {
    mmdit::SafetensorsWriter writer;
    if (absl::Status s = mmdit::AddToSafetensors(*outputs, &writer); !s.ok()) {
      return Fail(std::string(s.message()));
    }
    if (absl::Status s = writer.WriteFile(outputs_path); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  return 0;
}
