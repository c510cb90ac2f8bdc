// A minimal HTTP/1.1 server for the endpoints Prometheus and Kubernetes probe: GET /metrics,
// GET /v2/health/live, GET /v2/health/ready. One thread runs a poll() loop over non-blocking
// sockets, so a slow or hostile client holds a connection slot, never the thread; requests are
// bounded in size and time and every response closes the connection.
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace mmdit {

class HttpServer {
 public:
  struct Options {
    // Address to bind: an IPv4 literal ("0.0.0.0" for every interface, "127.0.0.1" for loopback).
    std::string address = "0.0.0.0";
    // 0 binds an ephemeral port; port() tells which after Start().
    int port = 8002;
    // Returns the Prometheus exposition for GET /metrics. Unset: /metrics answers 404.
    std::function<std::string()> metrics;
    // GET /v2/health/ready answers 200 when this returns true, else 503. Unset: always ready.
    std::function<bool()> ready;
    // The request line plus headers; larger requests get 431. 8 KiB is what common servers allow.
    size_t max_request_bytes = 8192;
    // Connections served at once; more wait in the listen backlog until a slot frees.
    int max_connections = 64;
    // A connection that has not sent a whole request and received its answer by then is closed.
    absl::Duration connection_timeout = absl::Seconds(5);
  };

  static absl::StatusOr<std::unique_ptr<HttpServer>> Create(const Options& options);
  ~HttpServer();  // Shuts down.

  // Binds, listens and starts the serving thread. FailedPrecondition if already started.
  absl::Status Start();
  // Stops the thread and closes every socket; idempotent.
  void Shutdown();
  // The bound port (resolves port 0) once Start() returned OK; 0 before.
  int port() const { return bound_port_.load(); }

 private:
  explicit HttpServer(const Options& options);
  void Serve();

  const Options options_;
  std::atomic<int> bound_port_{0};
  int listen_fd_ = -1;
  int wake_fds_[2] = {-1, -1};  // a pipe that interrupts poll() on Shutdown
  std::thread thread_;
  std::mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace mmdit
