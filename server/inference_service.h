// The Open Inference Protocol gRPC service (proto/grpc_service.proto) over the served models.
// This is the one place where absl::Status becomes grpc::Status. Handlers decode a request,
// queue it on its model's batcher and wait for the batch; a call that is cancelled or whose
// deadline (Triton's "timeout" parameter or the gRPC deadline) passes while it is still queued
// leaves the queue at once.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/grpc_service.grpc.pb.h"
#include "server/served_model.h"
#include "server/server_metrics.h"

namespace mmdit {

// The gRPC status of an absl::Status (same codes, same message).
grpc::Status ToGrpcStatus(const absl::Status& status);

class InferenceService final : public inference::GRPCInferenceService::Service {
 public:
  // `models` and `metrics` (may be null) outlive the service.
  InferenceService(const std::vector<ServedModel*>& models, ServerMetrics* metrics);

  // While draining, new inference requests get UNAVAILABLE and readiness is false.
  void set_draining(bool draining) { draining_.store(draining); }
  bool draining() const { return draining_.load(); }
  // Not draining and every model ready.
  bool ready() const;

  grpc::Status ServerLive(grpc::ServerContext* context, const inference::ServerLiveRequest* request,
                          inference::ServerLiveResponse* response) override;
  grpc::Status ServerReady(grpc::ServerContext* context,
                           const inference::ServerReadyRequest* request,
                           inference::ServerReadyResponse* response) override;
  grpc::Status ModelReady(grpc::ServerContext* context, const inference::ModelReadyRequest* request,
                          inference::ModelReadyResponse* response) override;
  grpc::Status ServerMetadata(grpc::ServerContext* context,
                              const inference::ServerMetadataRequest* request,
                              inference::ServerMetadataResponse* response) override;
  grpc::Status ModelMetadata(grpc::ServerContext* context,
                             const inference::ModelMetadataRequest* request,
                             inference::ModelMetadataResponse* response) override;
  grpc::Status ModelInfer(grpc::ServerContext* context, const inference::ModelInferRequest* request,
                          inference::ModelInferResponse* response) override;
  grpc::Status ModelStreamInfer(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
          stream) override;
  grpc::Status ModelStatistics(grpc::ServerContext* context,
                               const inference::ModelStatisticsRequest* request,
                               inference::ModelStatisticsResponse* response) override;
  grpc::Status RepositoryIndex(grpc::ServerContext* context,
                               const inference::RepositoryIndexRequest* request,
                               inference::RepositoryIndexResponse* response) override;

 private:
  // The model a request names, or NOT_FOUND naming the model (and version) and what is served.
  absl::StatusOr<ServedModel*> FindModel(const std::string& name, const std::string& version) const;
  // Everything of ModelInfer up to the queue: draining check, model lookup, decode, deadline.
  absl::StatusOr<std::unique_ptr<InferRequest>> Prepare(
      grpc::ServerContext* context, std::shared_ptr<const inference::ModelInferRequest> request,
      absl::Time start, ServedModel** model);
  // Records a request that failed before it reached a model's queue.
  void RecordEarlyFailure(ServedModel* model, const std::string& model_name,
                          const absl::Status& status, absl::Time start);

  std::map<std::string, ServedModel*> models_;
  ServerMetrics* const metrics_;
  std::atomic<bool> draining_{false};
};

}  // namespace mmdit
