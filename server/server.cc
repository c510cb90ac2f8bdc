#include "server/server.h"

#include <chrono>
#include <iostream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "proto/health.pb.h"

namespace mmdit {
namespace {

constexpr char kServiceName[] = "inference.GRPCInferenceService";

std::string Describe(const LoadedModel& m) {
  const MmditConfig& c = m.weights.config;
  return absl::StrCat("'", m.config.name(), "' version ", m.version, " (D=", c.dim,
                      ", H=", c.num_heads, ", F=", c.dim_feedforward, ", N=", c.num_layers,
                      ", max_seq_len=", c.max_seq_len,
                      ", max_batch_size=", m.config.max_batch_size(), ")");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const Options& options) {
  if (options.grpc_port < 0 || options.grpc_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("grpc_port must be in [0, 65535]; was ", options.grpc_port));
  }
  if (options.http_port < -1 || options.http_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("http_port must be in [-1, 65535]; was ", options.http_port));
  }
  if (options.max_receive_message_bytes < 1 || options.max_send_message_bytes < 1) {
    return absl::InvalidArgumentError("message size limits must be positive");
  }
  if (options.cpu_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu_threads must not be negative; was ", options.cpu_threads));
  }
  std::unique_ptr<Server> server(new Server(options));
  absl::StatusOr<std::unique_ptr<ServerMetrics>> metrics =
      ServerMetrics::Create(ServerMetrics::Options{});
  if (!metrics.ok()) return metrics.status();
  server->metrics_ = *std::move(metrics);

  std::vector<std::shared_ptr<const LoadedModel>> loaded = options.models;
  if (loaded.empty() && options.model_repository.empty()) {
    loaded.push_back(std::make_shared<LoadedModel>(BuiltinModel()));
    std::cerr << "mmdit-server: no --model_repository; serving the built-in model "
              << Describe(*loaded.back()) << " with deterministic weights\n";
  } else if (loaded.empty()) {
    absl::StatusOr<std::vector<std::string>> names = ListModels(options.model_repository);
    if (!names.ok()) return names.status();
    if (names->empty()) {
      return absl::NotFoundError(absl::StrCat("model repository ", options.model_repository,
                                              " holds no model (no <model>/config.pbtxt)"));
    }
    for (const std::string& name : *names) {
      absl::StatusOr<LoadedModel> model = LoadModel(options.model_repository, name);
      if (!model.ok()) return model.status();
      loaded.push_back(std::make_shared<LoadedModel>(*std::move(model)));
      std::cerr << "mmdit-server: loaded model " << Describe(*loaded.back()) << " from "
                << options.model_repository << "/" << name << "\n";
    }
  }

  std::vector<ServedModel*> served;
  for (std::shared_ptr<const LoadedModel>& model : loaded) {
    for (ServedModel* existing : served) {
      if (existing->name() == model->config.name()) {
        return absl::InvalidArgumentError(
            absl::StrCat("two models are named '", model->config.name(), "'"));
      }
    }
    ServedModel::Options model_options;
    model_options.cpu_threads = options.cpu_threads;
    model_options.default_max_queue_size = options.default_max_queue_size;
    model_options.metrics = server->metrics_.get();
    model_options.worker_factory = options.worker_factory;
    absl::StatusOr<std::unique_ptr<ServedModel>> m = ServedModel::Create(model, model_options);
    if (!m.ok()) return m.status();
    std::cerr << "mmdit-server: model '" << (*m)->name() << "' on workers "
              << absl::StrJoin((*m)->worker_names(), ", ") << "\n";
    served.push_back(m->get());
    server->models_.push_back(*std::move(m));
  }
  server->service_ = std::make_unique<InferenceService>(served, server->metrics_.get());
  return server;
}

Server::~Server() { Shutdown(absl::ZeroDuration()); }

bool Server::ready() const { return service_ != nullptr && service_->ready(); }

std::vector<ServedModel*> Server::models() const {
  std::vector<ServedModel*> out;
  for (const auto& m : models_) out.push_back(m.get());
  return out;
}

void Server::SetHealth(bool serving) {
  if (grpc_server_ == nullptr) return;
  grpc::HealthCheckServiceInterface* health = grpc_server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  health->SetServingStatus(kServiceName, serving);
}

absl::Status Server::Start() {
  {
    absl::MutexLock lock(&mu_);
    if (started_) return absl::FailedPreconditionError("the server was already started");
    started_ = true;
  }
  // gRPC's built-in health service carries no protobuf descriptor; naming ours links it in, so
  // that reflection clients (grpcurl) can describe and call grpc.health.v1.Health too.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string grpc_address = absl::StrCat(options_.address, ":", options_.grpc_port);
  builder.AddListeningPort(grpc_address, grpc::InsecureServerCredentials(), &grpc_port_);
  builder.SetMaxReceiveMessageSize(options_.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_send_message_bytes);
  builder.RegisterService(service_.get());
  grpc_server_ = builder.BuildAndStart();
  if (grpc_server_ == nullptr || grpc_port_ == 0) {
    grpc_server_.reset();
    return absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ", grpc_address));
  }
  SetHealth(false);
  std::cerr << "mmdit-server: grpc listening on " << options_.address << ":" << grpc_port_
            << std::endl;

  if (options_.http_port >= 0) {
    HttpServer::Options http_options;
    http_options.address = options_.address;
    http_options.port = options_.http_port;
    http_options.metrics = [this] { return metrics_->Exposition(); };
    http_options.ready = [this] { return ready(); };
    absl::StatusOr<std::unique_ptr<HttpServer>> http = HttpServer::Create(http_options);
    if (!http.ok()) return http.status();
    if (absl::Status s = (*http)->Start(); !s.ok()) return s;
    http_ = *std::move(http);
    std::cerr << "mmdit-server: http listening on " << options_.address << ":" << http_->port()
              << std::endl;
  }

  for (const std::unique_ptr<ServedModel>& model : models_) {
    const absl::Time start = absl::Now();
    if (absl::Status s = model->WarmUp(); !s.ok()) return s;
    std::cerr << "mmdit-server: model '" << model->name() << "' warmed up on "
              << model->workers_in_service() << " worker(s) in "
              << absl::FormatDuration(absl::Trunc(absl::Now() - start, absl::Milliseconds(1)))
              << "; ready" << std::endl;
  }
  SetHealth(true);
  return absl::OkStatus();
}

void Server::Shutdown(absl::Duration timeout) {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  const absl::Time deadline = absl::Now() + timeout;
  if (service_ != nullptr) service_->set_draining(true);
  SetHealth(false);
  if (grpc_server_ != nullptr) {
    // While the accepted requests finish, the endpoint stays open so that new calls get a clean
    // UNAVAILABLE from the service (gRPC itself cancels calls that arrive once it shuts down).
    auto pending = [this] {
      int64_t n = 0;
      for (const std::unique_ptr<ServedModel>& m : models_) n += m->pending();
      return n;
    };
    while (pending() > 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
    // Then waits for the calls still in flight until the deadline and cancels the rest; their
    // handlers take them off the queues.
    grpc_server_->Shutdown(absl::ToChronoTime(deadline));
    grpc_server_->Wait();
  }
  for (const std::unique_ptr<ServedModel>& model : models_) model->Stop();
  if (http_ != nullptr) http_->Shutdown();
}

}  // namespace mmdit
