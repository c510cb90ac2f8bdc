// mmdit-echo-server: a bare GRPCInferenceService that answers ModelInfer with the request's own
// x and context bytes as x_out and context_out (same names, shapes and datatype as mmdit-server
// at that shape), with no batching, no model and no compute. It is the floor that mmdit-server's
// overhead is measured against (PERF.md: served p50 at batch 1 within 1.3 × this echo's).
//
// The gRPC set-up is mmdit-server's (server/server.cc): the synchronous service on a default
// ServerBuilder, the same message size limits, the default health check service and reflection,
// so that the two differ only in what happens between receiving a request and answering it.
// ServerLive, ServerReady and ModelReady answer true (for any model name) and ModelMetadata
// describes the tensors, which is what mmdit-loadgen and mmdit-client need.
#include <csignal>
#include <cstdio>
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "proto/grpc_service.grpc.pb.h"

ABSL_FLAG(std::string, host, "127.0.0.1",
          "Address to bind: 127.0.0.1 for loopback only, 0.0.0.0 for every interface.");
ABSL_FLAG(int, grpc_port, 0, "gRPC port; 0 picks a free one (see --port_file).");
ABSL_FLAG(std::string, port_file, "",
          "If set, once listening write 'grpc_port=N' and 'http_port=-1' lines to this file "
          "(mmdit-server's format, for scripts and tests that start on port 0).");
ABSL_FLAG(int, max_receive_message_bytes, 256 << 20,
          "Largest gRPC request accepted (bytes); mmdit-server's default.");
ABSL_FLAG(int, max_send_message_bytes, 256 << 20,
          "Largest gRPC response sent (bytes); mmdit-server's default.");

namespace {

constexpr char kServiceName[] = "inference.GRPCInferenceService";

class EchoService final : public inference::GRPCInferenceService::Service {
 public:
  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse* response) override {
    response->set_live(true);
    return grpc::Status::OK;
  }
  grpc::Status ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse* response) override {
    response->set_ready(true);
    return grpc::Status::OK;
  }
  grpc::Status ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest*,
                          inference::ModelReadyResponse* response) override {
    response->set_ready(true);
    return grpc::Status::OK;
  }
  grpc::Status ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                              inference::ServerMetadataResponse* response) override {
    response->set_name("mmdit-echo-server");
    response->set_version("0.1.0");
    return grpc::Status::OK;
  }
  grpc::Status ModelMetadata(grpc::ServerContext*, const inference::ModelMetadataRequest* request,
                             inference::ModelMetadataResponse* response) override {
    response->set_name(request->name());
    response->add_versions("1");
    response->set_platform("echo");
    auto add = [](google::protobuf::RepeatedPtrField<
                      inference::ModelMetadataResponse::TensorMetadata>* list,
                  const char* name) {
      auto* t = list->Add();
      t->set_name(name);
      t->set_datatype("FP32");
      for (int i = 0; i < 3; ++i) t->add_shape(-1);
    };
    add(response->mutable_inputs(), "x");
    add(response->mutable_inputs(), "y");
    add(response->mutable_inputs(), "context");
    add(response->mutable_outputs(), "x_out");
    add(response->mutable_outputs(), "context_out");
    return grpc::Status::OK;
  }

  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest* request,
                          inference::ModelInferResponse* response) override {
    // The request message belongs to this call and is destroyed once the handler returns, so
    // its raw bytes move into the answer instead of being copied (mmdit-server likewise views
    // its FP32 inputs in place and moves its output buffers into the answer).
    auto* mutable_request = const_cast<inference::ModelInferRequest*>(request);
    const bool raw = request->raw_input_contents_size() > 0;
    if (raw && request->raw_input_contents_size() != request->inputs_size()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat(request->raw_input_contents_size(),
                                       " raw_input_contents for ", request->inputs_size(),
                                       " inputs"));
    }
    response->set_model_name(request->model_name());
    response->set_model_version(request->model_version().empty() ? "1"
                                                                  : request->model_version());
    response->set_id(request->id());
    for (const char* name : {"x", "context"}) {
      int index = -1;
      for (int i = 0; i < request->inputs_size(); ++i) {
        if (request->inputs(i).name() == name) index = i;
      }
      if (index < 0) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("missing input '", name, "'"));
      }
      const inference::ModelInferRequest::InferInputTensor& in = request->inputs(index);
      if (in.datatype() != "FP32") {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("input '", name, "' is ", in.datatype(),
                                         "; the echo answers FP32 only"));
      }
      auto* out = response->add_outputs();
      out->set_name(absl::StrCat(name, "_out"));
      out->set_datatype("FP32");
      *out->mutable_shape() = in.shape();
      std::string* bytes = response->add_raw_output_contents();
      if (raw) {
        bytes->swap(*mutable_request->mutable_raw_input_contents(index));
      } else {
        const auto& values = in.contents().fp32_contents();
        bytes->assign(reinterpret_cast<const char*>(values.data()),
                      values.size() * sizeof(float));
      }
    }
    return grpc::Status::OK;
  }
};

bool WritePortFile(const std::string& path, int grpc_port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << "grpc_port=" << grpc_port << "\nhttp_port=-1\n";
    if (!out) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "A bare Open Inference Protocol gRPC server that answers ModelInfer with the request's x "
      "and context bytes as x_out and context_out: the floor of mmdit-server's overhead.\n"
      "  mmdit-echo-server [--host=127.0.0.1] [--grpc_port=0] [--port_file=FILE]");
  // --help lists this file's flags: Abseil would look for a file named after the binary, whose
  // dashes are this file's underscores. It records paths without their leading '/'.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = [](absl::string_view path) {
    return absl::EndsWith(__FILE__, path);
  };
  usage.contains_help_flags = usage.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);

  // As mmdit-server: the stop signals are blocked before any thread starts and taken by
  // sigwait() below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const int port_flag = absl::GetFlag(FLAGS_grpc_port);
  if (port_flag < 0 || port_flag > 65535) {
    std::cerr << "mmdit-echo-server: --grpc_port must be in [0, 65535]; was " << port_flag
              << "\n";
    return 2;
  }
  const int max_receive = absl::GetFlag(FLAGS_max_receive_message_bytes);
  const int max_send = absl::GetFlag(FLAGS_max_send_message_bytes);
  if (max_receive < 1 || max_send < 1) {
    std::cerr << "mmdit-echo-server: message size limits must be positive\n";
    return 2;
  }

  EchoService service;
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", port_flag);
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(max_receive);
  builder.SetMaxSendMessageSize(max_send);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "mmdit-echo-server: cannot listen for gRPC on " << address << "\n";
    return 1;
  }
  if (grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService()) {
    health->SetServingStatus(true);
    health->SetServingStatus(kServiceName, true);
  }
  std::cerr << "mmdit-echo-server: grpc listening on " << absl::GetFlag(FLAGS_host) << ":"
            << port << std::endl;
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, port)) {
    std::cerr << "mmdit-echo-server: cannot write --port_file " << port_file << "\n";
    server->Shutdown();
    return 1;
  }
  std::cerr << "mmdit-echo-server: ready" << std::endl;

  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::cerr << "mmdit-echo-server: " << (signal == SIGTERM ? "SIGTERM" : "SIGINT")
            << ": stopping" << std::endl;
  // Answers take microseconds, so a second is ample for calls in flight; gRPC waits for that
  // deadline while a client keeps an idle connection open, so it is kept short.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server->Wait();
  std::cerr << "mmdit-echo-server: stopped" << std::endl;
  return 0;
}
