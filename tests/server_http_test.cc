// HttpServer over real loopback sockets: the three endpoints, the error answers, malformed and
// oversized requests, stalled clients, and many clients at once.
#include "server/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Reads until the peer closes or `timeout` passes; returns what arrived.
std::string ReadAll(int fd, absl::Duration timeout = absl::Seconds(10)) {
  std::string out;
  const absl::Time deadline = absl::Now() + timeout;
  char buf[4096];
  while (absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now())) + 1;
    if (poll(&p, 1, ms) <= 0) break;
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, n);
  }
  return out;
}

// Sends `request` as is and returns the whole answer.
std::string Exchange(int port, const std::string& request) {
  const int fd = Connect(port);
  if (fd < 0) return "<connect failed>";
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += n;
  }
  std::string answer = ReadAll(fd);
  close(fd);
  return answer;
}

std::string Get(int port, const std::string& path) {
  return Exchange(port, absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
}

std::string Body(const std::string& answer) {
  const size_t end = answer.find("\r\n\r\n");
  return end == std::string::npos ? "" : answer.substr(end + 4);
}

class HttpServerTest : public ::testing::Test {
 protected:
  void StartServer(HttpServer::Options options) {
    options.address = "127.0.0.1";
    options.port = 0;
    auto server = HttpServer::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_TRUE(server_->Start().ok());
    port_ = server_->port();
    ASSERT_GT(port_, 0);
  }
  HttpServer::Options DefaultOptions() {
    HttpServer::Options options;
    options.metrics = [this] {
      ++scrapes_;
      return std::string("# TYPE x_total counter\nx_total 1\n");
    };
    options.ready = [this] { return ready_.load(); };
    return options;
  }

  std::atomic<int> scrapes_{0};
  std::atomic<bool> ready_{false};
  std::unique_ptr<HttpServer> server_;
  int port_ = 0;
};

TEST_F(HttpServerTest, ServesMetrics) {
  StartServer(DefaultOptions());
  const std::string answer = Get(port_, "/metrics");
  EXPECT_THAT(answer, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(answer, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(answer, HasSubstr("Content-Length: 33\r\n"));
  EXPECT_THAT(answer, HasSubstr("Connection: close\r\n"));
  EXPECT_EQ(Body(answer), "# TYPE x_total counter\nx_total 1\n");
  EXPECT_EQ(scrapes_.load(), 1);
  // A query string does not change the path.
  EXPECT_THAT(Get(port_, "/metrics?name[]=x"), StartsWith("HTTP/1.1 200 OK\r\n"));
  // HTTP/1.0 and bare-LF line ends are served too.
  EXPECT_THAT(Exchange(port_, "GET /metrics HTTP/1.0\n\n"), StartsWith("HTTP/1.1 200 OK\r\n"));
}

TEST_F(HttpServerTest, HealthEndpointsFollowReadiness) {
  StartServer(DefaultOptions());
  EXPECT_THAT(Get(port_, "/v2/health/live"), StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(Get(port_, "/v2/health/ready"), StartsWith("HTTP/1.1 503 Service Unavailable\r\n"));
  ready_ = true;
  EXPECT_THAT(Get(port_, "/v2/health/ready"), StartsWith("HTTP/1.1 200 OK\r\n"));
  ready_ = false;
  EXPECT_THAT(Get(port_, "/v2/health/ready"), StartsWith("HTTP/1.1 503"));
}

TEST_F(HttpServerTest, UnsetCallbacks) {
  StartServer(HttpServer::Options{});  // no metrics callback, no readiness callback
  EXPECT_THAT(Get(port_, "/metrics"), StartsWith("HTTP/1.1 404"));
  EXPECT_THAT(Get(port_, "/v2/health/ready"), StartsWith("HTTP/1.1 200 OK\r\n"));
}

TEST_F(HttpServerTest, HeadHasNoBody) {
  StartServer(DefaultOptions());
  const std::string answer = Exchange(port_, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(answer, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(answer, HasSubstr("Content-Length: 33\r\n"));
  EXPECT_EQ(Body(answer), "");
}

TEST_F(HttpServerTest, ErrorAnswers) {
  StartServer(DefaultOptions());
  EXPECT_THAT(Get(port_, "/"), StartsWith("HTTP/1.1 404 Not Found\r\n"));
  EXPECT_THAT(Get(port_, "/v2/health/liveness"), StartsWith("HTTP/1.1 404"));
  EXPECT_THAT(Get(port_, "/metrics/"), StartsWith("HTTP/1.1 404"));
  const std::string post =
      Exchange(port_, "POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
  EXPECT_THAT(post, StartsWith("HTTP/1.1 405 Method Not Allowed\r\n"));
  EXPECT_THAT(post, HasSubstr("Allow: GET, HEAD\r\n"));
  EXPECT_THAT(Exchange(port_, "DELETE /v2/health/live HTTP/1.1\r\n\r\n"),
              StartsWith("HTTP/1.1 405"));
  EXPECT_THAT(Exchange(port_, "GET /metrics HTTP/2.0\r\n\r\n"), StartsWith("HTTP/1.1 505"));
  EXPECT_EQ(scrapes_.load(), 0);
}

TEST_F(HttpServerTest, MalformedRequestsGet400) {
  StartServer(DefaultOptions());
  const std::vector<std::string> bad = {
      "\r\n\r\n",
      "GET\r\n\r\n",
      "GET /metrics\r\n\r\n",
      "GET  /metrics HTTP/1.1\r\n\r\n",
      "GET /metrics HTTP/1.1 extra\r\n\r\n",
      "GET metrics HTTP/1.1\r\n\r\n",
      "GET /metrics FTP/1.1\r\n\r\n",
      "G(T /metrics HTTP/1.1\r\n\r\n",
      "GET /met\x01rics HTTP/1.1\r\n\r\n",
      "GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
      "GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
      std::string("GET /metrics\0 HTTP/1.1\r\n\r\n", 26),
      std::string("\xff\xfe\x00\x80garbage\r\n\r\n", 15),
  };
  for (const std::string& request : bad) {
    EXPECT_THAT(Exchange(port_, request), StartsWith("HTTP/1.1 400 Bad Request\r\n"))
        << "request: " << absl::CEscape(request);
  }
  EXPECT_EQ(scrapes_.load(), 0);
  EXPECT_THAT(Get(port_, "/v2/health/live"), StartsWith("HTTP/1.1 200"));
}

TEST_F(HttpServerTest, OversizedRequestGets431) {
  HttpServer::Options options = DefaultOptions();
  options.max_request_bytes = 1024;
  StartServer(options);
  const std::string big =
      absl::StrCat("GET /metrics HTTP/1.1\r\nX-Filler: ", std::string(4000, 'a'), "\r\n\r\n");
  EXPECT_THAT(Exchange(port_, big), StartsWith("HTTP/1.1 431"));
  // Endless header bytes with no blank line: answered once the bound is passed.
  EXPECT_THAT(Exchange(port_, std::string(5000, 'G')), StartsWith("HTTP/1.1 431"));
  EXPECT_THAT(Get(port_, "/metrics"), StartsWith("HTTP/1.1 200"));
}

TEST_F(HttpServerTest, StalledClientsTimeOutWithoutBlockingOthers) {
  HttpServer::Options options = DefaultOptions();
  options.connection_timeout = absl::Milliseconds(300);
  StartServer(options);
  const int idle = Connect(port_);       // sends nothing
  const int partial = Connect(port_);    // sends half a request
  ASSERT_GE(idle, 0);
  ASSERT_GE(partial, 0);
  ASSERT_EQ(send(partial, "GET /metr", 9, MSG_NOSIGNAL), 9);
  // Others are answered at once meanwhile.
  const absl::Time start = absl::Now();
  EXPECT_THAT(Get(port_, "/v2/health/live"), StartsWith("HTTP/1.1 200"));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(250));
  // The stalled ones are closed after the timeout; the partial one gets a 408.
  EXPECT_EQ(ReadAll(idle, absl::Seconds(5)), "");
  EXPECT_THAT(ReadAll(partial, absl::Seconds(5)), StartsWith("HTTP/1.1 408"));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(250));
  close(idle);
  close(partial);
}

TEST_F(HttpServerTest, ConnectionLimitQueuesExtraClients) {
  HttpServer::Options options = DefaultOptions();
  options.max_connections = 1;
  options.connection_timeout = absl::Milliseconds(300);
  StartServer(options);
  const int idle = Connect(port_);
  ASSERT_GE(idle, 0);
  absl::SleepFor(absl::Milliseconds(50));  // let the server take the idle one first
  // Served once the idle connection times out and frees the only slot.
  EXPECT_THAT(Get(port_, "/v2/health/live"), StartsWith("HTTP/1.1 200"));
  close(idle);
}

TEST_F(HttpServerTest, ClientsThatHangUpEarly) {
  StartServer(DefaultOptions());
  for (int i = 0; i < 20; ++i) {
    const int fd = Connect(port_);
    ASSERT_GE(fd, 0);
    if (i % 2 == 0) send(fd, "GET /metrics HTTP/1.1\r\n\r\n", 25, MSG_NOSIGNAL);
    close(fd);  // before reading the answer
  }
  EXPECT_THAT(Get(port_, "/metrics"), StartsWith("HTTP/1.1 200"));
}

TEST_F(HttpServerTest, ManyConcurrentClients) {
  StartServer(DefaultOptions());
  ready_ = true;
  constexpr int kThreads = 8;
  constexpr int kRequests = 25;
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRequests; ++i) {
        const char* path = (i + t) % 3 == 0   ? "/metrics"
                           : (i + t) % 3 == 1 ? "/v2/health/live"
                                              : "/v2/health/ready";
        if (absl::StartsWith(Get(port_, path), "HTTP/1.1 200 OK\r\n")) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kThreads * kRequests);
}

TEST(HttpServerLifecycleTest, OptionsAreValidated) {
  HttpServer::Options options;
  options.port = 70000;
  EXPECT_EQ(HttpServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.address = "localhost";
  EXPECT_EQ(HttpServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.max_connections = 0;
  EXPECT_EQ(HttpServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.max_request_bytes = 10;
  EXPECT_EQ(HttpServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.connection_timeout = absl::ZeroDuration();
  EXPECT_EQ(HttpServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HttpServerLifecycleTest, StartShutdownAndPortInUse) {
  HttpServer::Options options;
  options.address = "127.0.0.1";
  options.port = 0;
  auto first = HttpServer::Create(options);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ((*first)->port(), 0);
  ASSERT_TRUE((*first)->Start().ok());
  const int port = (*first)->port();
  ASSERT_GT(port, 0);
  EXPECT_EQ((*first)->Start().code(), absl::StatusCode::kFailedPrecondition);

  options.port = port;
  auto second = HttpServer::Create(options);
  ASSERT_TRUE(second.ok());
  const absl::Status in_use = (*second)->Start();
  EXPECT_EQ(in_use.code(), absl::StatusCode::kUnavailable) << in_use;
  EXPECT_THAT(std::string(in_use.message()), HasSubstr(absl::StrCat(port)));

  (*first)->Shutdown();
  (*first)->Shutdown();  // idempotent
  EXPECT_EQ(Connect(port), -1);
  EXPECT_EQ((*first)->Start().code(), absl::StatusCode::kFailedPrecondition);
  // Shutdown without Start, then destruction.
  (*second)->Shutdown();
}

}  // namespace
}  // namespace mmdit
