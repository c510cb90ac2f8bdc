// mmdit-run: one forward pass offline, no server. Reads x, y, context and optional attn_mask and
// start_pos from a .safetensors file, runs the model of a repository (or the built-in model), and
// writes x_out and context_out as float32.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/fast_forward.h"
#include "kernels/cpu/reference_forward.h"
#include "kernels/forward_sample.h"
#include "kernels/safetensors.h"
#include "server/model_repository.h"
#ifdef MMDIT_HAVE_CUDA
#include "kernels/cuda/cuda_forward.h"
#endif

ABSL_FLAG(std::string, model_repository, "",
          "Model repository folder (DIR/<model>/config.pbtxt, DIR/<model>/<version>/"
          "model.safetensors); empty: the built-in model");
ABSL_FLAG(std::string, model, "", "Model name in the repository; empty: the only model there");
ABSL_FLAG(int64_t, version, 0, "Model version; 0: the highest");
ABSL_FLAG(std::string, inputs, "", "Input .safetensors holding x, y, context [, attn_mask, start_pos]");
ABSL_FLAG(std::string, outputs, "", "Output .safetensors to write x_out and context_out to");
ABSL_FLAG(std::string, device, "auto", "Where to run: auto (a GPU if there is one), cpu or cuda");
ABSL_FLAG(std::string, cpu_forward, "fast",
          "CPU path: fast (blocked GEMMs, all cores) or reference (the plain oracle)");
ABSL_FLAG(int, cpu_threads, 0, "Threads of the fast CPU path; 0: every core");

namespace mmdit {
namespace {

struct Inputs {
  int batch = 0, seq_len = 0, context_len = 0;
  std::vector<float> x, y, context;
  std::vector<uint8_t> mask;       // empty: no mask
  std::vector<int64_t> start_pos;  // empty: zeros
};

absl::StatusOr<Inputs> ReadInputs(const SafetensorsFile& file, const MmditConfig& config) {
  const std::set<std::string> known = {"x", "y", "context", "attn_mask", "start_pos"};
  std::vector<std::string> ignored;
  for (const auto& [name, view] : file.tensors()) {
    if (known.count(name) == 0) ignored.push_back(name);
  }
  if (!ignored.empty()) {
    std::string list;
    for (const auto& n : ignored) list += (list.empty() ? "" : ", ") + n;
    std::fprintf(stderr, "mmdit-run: ignoring tensors not used as inputs: %s\n", list.c_str());
  }
  auto error = [&file](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(file.name(), ": ", parts...));
  };
  absl::StatusOr<TensorView> x = file.Get("x");
  if (!x.ok()) return x.status();
  if (x->shape.size() != 3 || x->shape[2] != config.dim) {
    return error("x must be [B, L, ", config.dim, "]; got ", ShapeString(x->shape));
  }
  absl::StatusOr<TensorView> context = file.Get("context");
  if (!context.ok()) return context.status();
  if (context->shape.size() != 3 || context->shape[0] != x->shape[0] ||
      context->shape[2] != config.dim) {
    return error("context must be [", x->shape[0], ", C, ", config.dim, "]; got ",
                 ShapeString(context->shape));
  }
  Inputs in;
  in.batch = static_cast<int>(x->shape[0]);
  in.seq_len = static_cast<int>(x->shape[1]);
  in.context_len = static_cast<int>(context->shape[1]);
  if (in.batch < 1) return error("x has batch size 0");

  auto floats = [&](const char* name, std::vector<int64_t> shape, std::vector<float>& out) {
    absl::StatusOr<std::vector<float>> v = file.GetFloat(name, shape);
    if (!v.ok()) return v.status();
    out = *std::move(v);
    return absl::OkStatus();
  };
  const int64_t b = in.batch, d = config.dim;
  if (absl::Status s = floats("x", {b, in.seq_len, d}, in.x); !s.ok()) return s;
  if (absl::Status s = floats("context", {b, in.context_len, d}, in.context); !s.ok()) return s;
  absl::StatusOr<TensorView> y = file.Get("y");
  if (!y.ok()) return y.status();
  if (y->shape != std::vector<int64_t>{b, 1, d} && y->shape != std::vector<int64_t>{b, d}) {
    return error("y must be [", b, ", 1, ", d, "] or [", b, ", ", d, "]; got ",
                 ShapeString(y->shape));
  }
  if (absl::Status s = floats("y", y->shape, in.y); !s.ok()) return s;

  if (file.tensors().count("attn_mask")) {
    const std::vector<int64_t> shape = {b, in.seq_len, in.seq_len};
    absl::StatusOr<TensorView> m = file.GetChecked("attn_mask", DType::kBool, shape);
    if (!m.ok()) return m.status();
    in.mask.assign(m->bytes.begin(), m->bytes.end());
  }
  if (file.tensors().count("start_pos")) {
    absl::StatusOr<TensorView> p = file.GetChecked("start_pos", DType::kI64, {b});
    if (!p.ok()) return p.status();
    in.start_pos.resize(b);
    std::memcpy(in.start_pos.data(), p->bytes.data(), b * 8);
  }
  return in;
}

absl::StatusOr<LoadedModel> Load() {
  const std::string repo = absl::GetFlag(FLAGS_model_repository);
  if (repo.empty()) return BuiltinModel();
  std::string model = absl::GetFlag(FLAGS_model);
  if (model.empty()) {
    absl::StatusOr<std::vector<std::string>> models = ListModels(repo);
    if (!models.ok()) return models.status();
    if (models->size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          repo, " holds ", models->size(), " models; choose one with --model"));
    }
    model = models->front();
  }
  return LoadModel(repo, model, absl::GetFlag(FLAGS_version));
}

// Runs `batch` on the chosen device; returns where it ran ("cpu", "cuda:0 bf16", …).
absl::StatusOr<std::string> Forward(const LoadedModel& model, const std::string& device,
                                    int seq_len, int context_len, ForwardBatch batch) {
#ifdef MMDIT_HAVE_CUDA
  if (device == "cuda" || (device == "auto" && CudaForward::DeviceCount() > 0)) {
    if (CudaForward::DeviceCount() == 0) {
      return absl::FailedPreconditionError("--device=cuda but no CUDA device is visible");
    }
    CudaForwardOptions options;
    options.max_batch_size = static_cast<int>(batch.size());
    options.max_seq_len = seq_len;
    options.max_context_len = context_len;
    const bool bf16 = model.config.precision() == "bf16";
    options.precision = bf16 ? CudaPrecision::kBf16 : CudaPrecision::kFp32Accurate;
    absl::StatusOr<std::unique_ptr<CudaForward>> forward = CudaForward::Create(model.weights, options);
    if (!forward.ok()) return forward.status();
    if (absl::Status s = (*forward)->Run(batch); !s.ok()) return s;
    return std::string(bf16 ? "cuda:0 bf16" : "cuda:0 fp32");
  }
#else
  (void)seq_len;
  (void)context_len;
  if (device == "cuda") {
    return absl::UnimplementedError("this build has no CUDA forward; use --device=cpu");
  }
#endif
  if (absl::GetFlag(FLAGS_cpu_forward) == "reference") {
    if (absl::Status s = ReferenceForward(model.weights, batch); !s.ok()) return s;
    return std::string("cpu (reference)");
  }
  CpuForwardOptions options;
  options.threads = absl::GetFlag(FLAGS_cpu_threads);
  options.max_batch_size = static_cast<int>(batch.size());
  absl::StatusOr<std::unique_ptr<CpuFastForward>> forward =
      CpuFastForward::Create(model.weights, options);
  if (!forward.ok()) return forward.status();
  if (absl::Status s = (*forward)->Run(batch); !s.ok()) return s;
  return std::string("cpu");
}

absl::Status Run() {
  const std::string inputs_path = absl::GetFlag(FLAGS_inputs);
  const std::string outputs_path = absl::GetFlag(FLAGS_outputs);
  if (inputs_path.empty() || outputs_path.empty()) {
    return absl::InvalidArgumentError("--inputs and --outputs are required");
  }
  const std::string device = absl::GetFlag(FLAGS_device);
  const std::string cpu_forward = absl::GetFlag(FLAGS_cpu_forward);
  if (cpu_forward != "fast" && cpu_forward != "reference") {
    return absl::InvalidArgumentError(
        absl::StrCat("--cpu_forward must be fast or reference; was \"", cpu_forward, "\""));
  }
  if (device != "auto" && device != "cpu" && device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be auto, cpu or cuda; was \"", device, "\""));
  }
  absl::StatusOr<LoadedModel> model = Load();
  if (!model.ok()) return model.status();
  const MmditConfig& config = model->weights.config;
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Read(inputs_path);
  if (!file.ok()) return file.status();
  absl::StatusOr<Inputs> in = ReadInputs(*file, config);
  if (!in.ok()) return in.status();

  const int64_t d = config.dim;
  std::vector<float> x_out(in->x.size()), context_out(in->context.size());
  std::vector<ForwardSample> batch(in->batch);
  for (int b = 0; b < in->batch; ++b) {
    ForwardSample& s = batch[b];
    s.seq_len = in->seq_len;
    s.context_len = in->context_len;
    s.x = &in->x[b * in->seq_len * d];
    s.y = &in->y[b * d];
    s.context = &in->context[b * in->context_len * d];
    s.attn_mask = in->mask.empty() ? nullptr : &in->mask[int64_t{b} * in->seq_len * in->seq_len];
    s.start_pos = in->start_pos.empty() ? 0 : in->start_pos[b];
    s.x_out = &x_out[b * in->seq_len * d];
    s.context_out = &context_out[b * in->context_len * d];
  }
  if (absl::Status s = ValidateBatch(config, batch); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(inputs_path, ": ", s.message()));
  }
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::string> ran_on = Forward(*model, device, in->seq_len, in->context_len, batch);
  if (!ran_on.ok()) return ran_on.status();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

  SafetensorsWriter writer;
  writer.AddFloat("x_out", {in->batch, in->seq_len, d}, x_out);
  writer.AddFloat("context_out", {in->batch, in->context_len, d}, context_out);
  if (absl::Status s = writer.WriteFile(outputs_path); !s.ok()) return s;
  std::fprintf(stderr, "mmdit-run: %s v%lld on %s, batch %d, L %d, C %d: %.1f ms -> %s\n",
               model->config.name().c_str(), static_cast<long long>(model->version),
               ran_on->c_str(), in->batch,
               in->seq_len, in->context_len, ms, outputs_path.c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace mmdit

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Offline forward pass: mmdit-run --model_repository DIR --model NAME "
      "--inputs IN.safetensors --outputs OUT.safetensors [--device auto|cpu|cuda]");
  // --help lists this file's flags: Abseil would look for a file named after the binary, whose
  // dashes are this file's underscores. It records paths without their leading '/'.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view path) {
    return absl::EndsWith(__FILE__, path);
  };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  absl::Status status = mmdit::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "mmdit-run: error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
