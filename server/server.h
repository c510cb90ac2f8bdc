// The whole inference server of one process: the served models (from a model repository, or the
// built-in model), the gRPC endpoint (Open Inference Protocol, grpc.health.v1, reflection), the
// HTTP endpoint (/metrics, /v2/health/*) and the drain on shutdown. mmdit-server's main() is a
// thin shell around it, and tests run it in-process.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/http_server.h"
#include "server/inference_service.h"
#include "server/model_repository.h"
#include "server/served_model.h"
#include "server/server_metrics.h"

namespace mmdit {

class Server {
 public:
  struct Options {
    // DIR/<model>/config.pbtxt + DIR/<model>/<version>/model.safetensors; empty: the built-in
    // model (MODEL.md's target config, deterministic weights).
    std::string model_repository;
    // Serve these instead of reading a repository (tests).
    std::vector<std::shared_ptr<const LoadedModel>> models;
    // Bind address of both endpoints: "0.0.0.0" for every interface, "127.0.0.1" for loopback.
    std::string address = "0.0.0.0";
    int grpc_port = 8001;  // 0: an ephemeral port, see grpc_port()
    int http_port = 8002;  // 0: an ephemeral port; -1: no HTTP endpoint
    // 256 MiB: a max_batch_size of 512 at L = 186, C = 64, D = 128 in FP32 with a mask is about
    // 83 MB in and 64 MB out.
    int max_receive_message_bytes = 256 << 20;
    int max_send_message_bytes = 256 << 20;
    int cpu_threads = 0;  // threads of each CPU worker; 0 = all cores
    // Requests waiting per model when a config sets no max_queue_size.
    int default_max_queue_size = 1024;
    // Builds workers instead of the configs' instance_group (tests: fake or failing workers).
    ServedModel::WorkerFactory worker_factory;
  };

  // Loads and checks every model and builds its workers; nothing listens yet.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const Options& options);
  ~Server();  // Shutdown(absl::ZeroDuration()) if still running

  // Starts both endpoints (live, not ready), warms every model up, then turns ready.
  absl::Status Start();
  // Stops taking requests (UNAVAILABLE, not ready), lets queued and running requests finish
  // within `timeout` (then cancels what is left), and closes the endpoints. Idempotent.
  void Shutdown(absl::Duration timeout);

  int grpc_port() const { return grpc_port_; }
  int http_port() const { return http_ != nullptr ? http_->port() : -1; }
  bool ready() const;
  std::vector<ServedModel*> models() const;
  ServerMetrics* metrics() const { return metrics_.get(); }

 private:
  explicit Server(const Options& options) : options_(options) {}
  void SetHealth(bool serving);

  const Options options_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::vector<std::unique_ptr<ServedModel>> models_;
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<HttpServer> http_;
  int grpc_port_ = 0;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace mmdit
