#include "server/inference_service.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace mmdit {
namespace {

constexpr char kServerName[] = "mmdit-serve";
constexpr char kServerVersion[] = "0.1.0";
// How often a waiting handler looks at its call's cancellation (its deadline it waits for
// exactly). A cancelled call leaves the queue within this; shorter costs wake-ups on every
// waiting call, which add up with thousands of calls in flight.
constexpr absl::Duration kPollInterval = absl::Milliseconds(20);

absl::Time CallDeadline(const grpc::ServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

void FillResponseHeader(const ServedModel& model, const std::string& id,
                        inference::ModelInferResponse* response) {
  response->set_model_name(model.name());
  response->set_model_version(absl::StrCat(model.signature().version));
  response->set_id(id);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

InferenceService::InferenceService(const std::vector<ServedModel*>& models,
                                   ServerMetrics* metrics)
    : metrics_(metrics) {
  for (ServedModel* m : models) models_[m->name()] = m;
}

bool InferenceService::ready() const {
  if (draining()) return false;
  for (const auto& [name, model] : models_) {
    if (!model->ready()) return false;
  }
  return !models_.empty();
}

absl::StatusOr<ServedModel*> InferenceService::FindModel(const std::string& name,
                                                         const std::string& version) const {
  auto it = models_.find(name);
  if (it == models_.end()) {
    std::vector<std::string> names;
    for (const auto& [n, m] : models_) names.push_back(absl::StrCat("'", n, "'"));
    return absl::NotFoundError(absl::StrCat("unknown model '", name, "'; this server serves ",
                                            absl::StrJoin(names, ", ")));
  }
  const std::string served = absl::StrCat(it->second->signature().version);
  if (!version.empty() && version != served) {
    return absl::NotFoundError(absl::StrCat("model '", name, "' has no version '", version,
                                            "'; it serves version ", served));
  }
  return it->second;
}

grpc::Status InferenceService::ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                                          inference::ServerLiveResponse* response) {
  response->set_live(true);
  return grpc::Status::OK;
}

grpc::Status InferenceService::ServerReady(grpc::ServerContext*,
                                           const inference::ServerReadyRequest*,
                                           inference::ServerReadyResponse* response) {
  response->set_ready(ready());
  return grpc::Status::OK;
}

grpc::Status InferenceService::ModelReady(grpc::ServerContext*,
                                          const inference::ModelReadyRequest* request,
                                          inference::ModelReadyResponse* response) {
  absl::StatusOr<ServedModel*> model = FindModel(request->name(), request->version());
  if (!model.ok()) return ToGrpcStatus(model.status());
  response->set_ready(!draining() && (*model)->ready());
  return grpc::Status::OK;
}

grpc::Status InferenceService::ServerMetadata(grpc::ServerContext*,
                                              const inference::ServerMetadataRequest*,
                                              inference::ServerMetadataResponse* response) {
  response->set_name(kServerName);
  response->set_version(kServerVersion);
  // RepositoryIndex is answered too, but not the load/unload half of Triton's model_repository
  // extension, so it is not claimed.
  response->add_extensions("statistics");
  return grpc::Status::OK;
}

grpc::Status InferenceService::ModelMetadata(grpc::ServerContext*,
                                             const inference::ModelMetadataRequest* request,
                                             inference::ModelMetadataResponse* response) {
  absl::StatusOr<ServedModel*> model = FindModel(request->name(), request->version());
  if (!model.ok()) return ToGrpcStatus(model.status());
  const ModelSignature& sig = (*model)->signature();
  const int64_t D = sig.config.dim;
  response->set_name(sig.name);
  response->add_versions(absl::StrCat(sig.version));
  response->set_platform("mmdit");
  auto add = [](google::protobuf::RepeatedPtrField<
                    inference::ModelMetadataResponse::TensorMetadata>* list,
                const char* name, const char* datatype, std::vector<int64_t> shape) {
    auto* t = list->Add();
    t->set_name(name);
    t->set_datatype(datatype);
    for (int64_t d : shape) t->add_shape(d);
  };
  // FP16 and BF16 are accepted for the float tensors as well; the outputs follow x's type.
  add(response->mutable_inputs(), "x", "FP32", {-1, -1, D});
  add(response->mutable_inputs(), "y", "FP32", {-1, 1, D});
  add(response->mutable_inputs(), "context", "FP32", {-1, -1, D});
  add(response->mutable_inputs(), "attn_mask", "BOOL", {-1, -1, -1});
  add(response->mutable_inputs(), "start_pos", "INT64", {-1});
  add(response->mutable_outputs(), "x_out", "FP32", {-1, -1, D});
  add(response->mutable_outputs(), "context_out", "FP32", {-1, -1, D});
  return grpc::Status::OK;
}

void InferenceService::RecordEarlyFailure(ServedModel* model, const std::string& model_name,
                                          const absl::Status& status, absl::Time start) {
  const absl::Duration elapsed = absl::Now() - start;
  if (model != nullptr) {
    model->RecordRequest(status, elapsed, RequestTiming{});
  } else if (metrics_ != nullptr) {
    metrics_->RecordRequest(model_name, status, absl::ToDoubleSeconds(elapsed));
  }
}

absl::StatusOr<std::unique_ptr<InferRequest>> InferenceService::Prepare(
    grpc::ServerContext* context, std::shared_ptr<const inference::ModelInferRequest> request,
    absl::Time start, ServedModel** model_out) {
  *model_out = nullptr;
  absl::StatusOr<ServedModel*> model = FindModel(request->model_name(), request->model_version());
  if (!model.ok()) return model.status();
  *model_out = *model;
  if (draining()) {
    return absl::UnavailableError("the server is shutting down; retry on another replica");
  }
  if (!(*model)->ready()) {
    return absl::UnavailableError(
        absl::StrCat("model '", (*model)->name(), "' is not ready; retry later"));
  }
  absl::StatusOr<std::unique_ptr<InferRequest>> decoded =
      InferRequest::Decode(std::move(request), (*model)->signature());
  if (!decoded.ok()) return decoded.status();
  absl::Time deadline = CallDeadline(context);
  int64_t timeout = (*decoded)->timeout_micros();
  if (timeout == 0) timeout = (*model)->default_timeout_micros();
  if (timeout > 0) deadline = std::min(deadline, start + absl::Microseconds(timeout));
  (*decoded)->set_deadline(deadline);
  return decoded;
}

grpc::Status InferenceService::ModelInfer(grpc::ServerContext* context,
                                          const inference::ModelInferRequest* request,
                                          inference::ModelInferResponse* response) {
  const absl::Time start = absl::Now();
  ServedModel* model = nullptr;
  // The call owns the request for as long as this handler runs: a non-owning pointer suffices.
  std::shared_ptr<const inference::ModelInferRequest> view(std::shared_ptr<void>(), request);
  absl::StatusOr<std::unique_ptr<InferRequest>> prepared =
      Prepare(context, view, start, &model);
  if (!prepared.ok()) {
    RecordEarlyFailure(model, request->model_name(), prepared.status(), start);
    return ToGrpcStatus(prepared.status());
  }
  const absl::Time deadline = (*prepared)->deadline();

  struct Result {
    absl::Notification done;
    std::unique_ptr<InferRequest> request;
    absl::Status status;
    RequestTiming timing;
  } result;
  absl::StatusOr<uint64_t> id =
      model->Enqueue(*std::move(prepared), [&result](std::unique_ptr<InferRequest> r,
                                                    absl::Status s, const RequestTiming& t) {
        result.request = std::move(r);
        result.status = std::move(s);
        result.timing = t;
        result.done.Notify();
      });
  if (!id.ok()) {
    RecordEarlyFailure(model, request->model_name(), id.status(), start);
    return ToGrpcStatus(id.status());
  }

  while (!result.done.WaitForNotificationWithDeadline(
      std::min(deadline, absl::Now() + kPollInterval))) {
    absl::Status gave_up;
    if (absl::Now() >= deadline) {
      gave_up = absl::DeadlineExceededError(absl::StrCat(
          "model '", model->name(), "': the request's deadline passed while it was queued"));
    } else if (context->IsCancelled()) {
      gave_up = absl::CancelledError("the call was cancelled while queued");
    } else {
      continue;
    }
    if (model->Cancel(*id) != nullptr) {
      RequestTiming timing;
      timing.queued = true;
      timing.queue = absl::Now() - start;
      model->RecordRequest(gave_up, absl::Now() - start, timing);
      return ToGrpcStatus(gave_up);
    }
    // Already in a batch: the answer is moments away.
    result.done.WaitForNotification();
    break;
  }
  if (result.status.ok()) {
    FillResponseHeader(*model, result.request->id(), response);
    result.request->MoveOutputsTo(response);
  }
  model->RecordRequest(result.status, absl::Now() - start, result.timing);
  return ToGrpcStatus(result.status);
}

grpc::Status InferenceService::ModelStreamInfer(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
        stream) {
  // A reader thread takes requests off the stream and queues them; this thread writes every
  // answer, so that a client that stops reading stalls only its own call, never a worker.
  struct Shared {
    absl::Mutex mu;
    absl::CondVar cv;  // signalled (outside mu) when an answer is ready or reading ended
    std::deque<inference::ModelStreamInferResponse> ready ABSL_GUARDED_BY(mu);
    int outstanding ABSL_GUARDED_BY(mu) = 0;
    bool reading_done ABSL_GUARDED_BY(mu) = false;
    std::vector<std::pair<ServedModel*, uint64_t>> queued ABSL_GUARDED_BY(mu);
  };
  auto shared = std::make_shared<Shared>();

  auto error_response = [](const absl::Status& status, const inference::ModelInferRequest& req) {
    inference::ModelStreamInferResponse r;
    r.set_error_message(absl::StrCat(absl::StatusCodeToString(status.code()), ": ",
                                     status.message()));
    r.mutable_infer_response()->set_model_name(req.model_name());
    r.mutable_infer_response()->set_model_version(req.model_version());
    r.mutable_infer_response()->set_id(req.id());
    return r;
  };

  std::thread reader([&, shared] {
    while (true) {
      auto request = std::make_shared<inference::ModelInferRequest>();
      if (!stream->Read(request.get())) break;
      const absl::Time start = absl::Now();
      ServedModel* model = nullptr;
      absl::StatusOr<std::unique_ptr<InferRequest>> prepared =
          Prepare(context, request, start, &model);
      absl::Status status = prepared.status();
      if (status.ok()) {
        {
          absl::MutexLock lock(&shared->mu);
          ++shared->outstanding;
        }
        absl::StatusOr<uint64_t> id = model->Enqueue(
            *std::move(prepared), [shared, model, start, request](
                                      std::unique_ptr<InferRequest> r, absl::Status s,
                                      const RequestTiming& timing) {
              inference::ModelStreamInferResponse out;
              if (s.ok()) {
                FillResponseHeader(*model, r->id(), out.mutable_infer_response());
                r->MoveOutputsTo(out.mutable_infer_response());
              } else {
                out.set_error_message(
                    absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message()));
                out.mutable_infer_response()->set_id(request->id());
                out.mutable_infer_response()->set_model_name(model->name());
              }
              model->RecordRequest(s, absl::Now() - start, timing);
              {
                absl::MutexLock lock(&shared->mu);
                shared->ready.push_back(std::move(out));
                --shared->outstanding;
              }
              shared->cv.Signal();
            });
        if (id.ok()) {
          absl::MutexLock lock(&shared->mu);
          shared->queued.emplace_back(model, *id);
          continue;
        }
        status = id.status();
        absl::MutexLock lock(&shared->mu);
        --shared->outstanding;
      }
      RecordEarlyFailure(model, request->model_name(), status, start);
      inference::ModelStreamInferResponse out = error_response(status, *request);
      {
        absl::MutexLock lock(&shared->mu);
        shared->ready.push_back(std::move(out));
      }
      shared->cv.Signal();
    }
    {
      absl::MutexLock lock(&shared->mu);
      shared->reading_done = true;
    }
    shared->cv.Signal();
  });

  bool write_failed = false;
  while (true) {
    std::deque<inference::ModelStreamInferResponse> batch;
    bool finished = false;
    {
      absl::MutexLock lock(&shared->mu);
      if (shared->ready.empty() && !(shared->reading_done && shared->outstanding == 0)) {
        // Bounded, so that a cancelled call is noticed while nothing arrives.
        shared->cv.WaitWithTimeout(&shared->mu, kPollInterval);
      }
      batch.swap(shared->ready);
      finished = shared->reading_done && shared->outstanding == 0 && batch.empty();
    }
    for (inference::ModelStreamInferResponse& r : batch) {
      if (!write_failed && !stream->Write(r)) write_failed = true;
    }
    if (finished) break;
    if (context->IsCancelled() || write_failed) {
      // Nobody will read the answers: take what is still queued back out.
      std::vector<std::pair<ServedModel*, uint64_t>> queued;
      {
        absl::MutexLock lock(&shared->mu);
        queued.swap(shared->queued);
      }
      for (auto& [model, id] : queued) {
        if (model->Cancel(id) != nullptr) {
          model->RecordRequest(absl::CancelledError("stream cancelled"), absl::ZeroDuration(),
                               RequestTiming{});
          absl::MutexLock lock(&shared->mu);
          --shared->outstanding;
        }
        // Answers of requests already in a batch still arrive and are dropped above.
      }
    }
  }
  reader.join();
  if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  return grpc::Status::OK;
}

grpc::Status InferenceService::ModelStatistics(grpc::ServerContext*,
                                               const inference::ModelStatisticsRequest* request,
                                               inference::ModelStatisticsResponse* response) {
  if (request->name().empty()) {
    for (const auto& [name, model] : models_) model->FillStatistics(response->add_model_stats());
    return grpc::Status::OK;
  }
  absl::StatusOr<ServedModel*> model = FindModel(request->name(), request->version());
  if (!model.ok()) return ToGrpcStatus(model.status());
  (*model)->FillStatistics(response->add_model_stats());
  return grpc::Status::OK;
}

grpc::Status InferenceService::RepositoryIndex(grpc::ServerContext*,
                                               const inference::RepositoryIndexRequest* request,
                                               inference::RepositoryIndexResponse* response) {
  for (const auto& [name, model] : models_) {
    const bool ready = model->ready();
    if (request->ready() && !ready) continue;
    auto* entry = response->add_models();
    entry->set_name(name);
    entry->set_version(absl::StrCat(model->signature().version));
    entry->set_state(ready ? "READY" : "UNAVAILABLE");
  }
  return grpc::Status::OK;
}

}  // namespace mmdit
