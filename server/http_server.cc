#include "server/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace mmdit {
namespace {

constexpr char kMetricsContentType[] = "text/plain; version=0.0.4; charset=utf-8";
constexpr char kTextContentType[] = "text/plain; charset=utf-8";

struct Response {
  int code = 200;
  std::string content_type = kTextContentType;
  std::string body;
  std::string extra_headers;
};

const char* ReasonPhrase(int code) {
  switch (code) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
  }
  return "Error";
}

std::string Serialize(const Response& r, bool head_only) {
  std::string out = absl::StrCat("HTTP/1.1 ", r.code, " ", ReasonPhrase(r.code),
                                 "\r\nContent-Type: ", r.content_type,
                                 "\r\nContent-Length: ", r.body.size(),
                                 "\r\nConnection: close\r\n", r.extra_headers, "\r\n");
  if (!head_only) out += r.body;
  return out;
}

Response Error(int code, absl::string_view detail) {
  Response r;
  r.code = code;
  r.body = absl::StrCat(code, " ", ReasonPhrase(code), ": ", detail, "\n");
  return r;
}

bool SetNonBlocking(int fd) {
  const int flags = fcntl(fd, F_GETFL, 0);
  return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

// Where the header block ends (index past the blank line), or npos. Bare "\n\n" is accepted as
// well, since RFC 9112 lets a server treat a lone LF as a line terminator.
size_t HeaderEnd(const std::string& buf) {
  const size_t crlf = buf.find("\r\n\r\n");
  const size_t lf = buf.find("\n\n");
  if (crlf == std::string::npos && lf == std::string::npos) return std::string::npos;
  if (lf == std::string::npos || (crlf != std::string::npos && crlf + 2 < lf)) return crlf + 4;
  return lf + 2;
}

bool IsToken(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (c <= 32 || c >= 127) return false;
    if (std::strchr("()<>@,;:\\\"/[]?={}", c) != nullptr) return false;
  }
  return true;
}

}  // namespace

// One client connection: bytes read so far, the answer once decided, and how much of it left.
struct HttpConnection {
  int fd = -1;
  absl::Time deadline;
  std::string in;
  std::string out;
  size_t out_sent = 0;
  bool responding = false;
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Create(const Options& options) {
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("port must be in [0, 65535]; was ", options.port));
  }
  in_addr addr;
  if (inet_pton(AF_INET, options.address.c_str(), &addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address must be an IPv4 literal such as 0.0.0.0 or 127.0.0.1; was \"", options.address,
        "\""));
  }
  if (options.max_request_bytes < 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_request_bytes must be at least 64; was ", options.max_request_bytes));
  }
  if (options.max_connections <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_connections must be positive; was ", options.max_connections));
  }
  if (options.connection_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "connection_timeout must be positive; was ",
        absl::FormatDuration(options.connection_timeout)));
  }
  return std::unique_ptr<HttpServer>(new HttpServer(options));
}

HttpServer::HttpServer(const Options& options) : options_(options) {}

HttpServer::~HttpServer() { Shutdown(); }

absl::Status HttpServer::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return absl::FailedPreconditionError("HTTP server already started");
  if (stopped_) return absl::FailedPreconditionError("HTTP server was shut down");

  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(options_.port));
  inet_pton(AF_INET, options_.address.c_str(), &sa.sin_addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(absl::StrCat("HTTP server cannot bind ", options_.address, ":",
                                               options_.port, ": ", std::strerror(err)));
  }
  if (listen(fd, 128) != 0 || !SetNonBlocking(fd)) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("listen: ", std::strerror(err)));
  }
  socklen_t len = sizeof(sa);
  getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  if (pipe2(wake_fds_, O_CLOEXEC | O_NONBLOCK) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(err)));
  }
  listen_fd_ = fd;
  bound_port_.store(ntohs(sa.sin_port));
  started_ = true;
  thread_ = std::thread([this] { Serve(); });
  return absl::OkStatus();
}

void HttpServer::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    if (!started_) return;
  }
  const char byte = 0;
  // The serving thread exits once it sees the pipe readable.
  (void)!write(wake_fds_[1], &byte, 1);
  if (thread_.joinable()) thread_.join();
  close(listen_fd_);
  close(wake_fds_[0]);
  close(wake_fds_[1]);
  listen_fd_ = -1;
}

namespace {

// Decides the answer to a complete header block `head` (request line and headers).
Response Handle(absl::string_view head, const HttpServer::Options& options, bool* head_only) {
  *head_only = false;
  const size_t eol = head.find('\n');
  absl::string_view line = head.substr(0, eol);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  // request-line = method SP request-target SP HTTP-version
  const size_t sp1 = line.find(' ');
  if (sp1 == absl::string_view::npos) return Error(400, "malformed request line");
  const size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == absl::string_view::npos || line.find(' ', sp2 + 1) != absl::string_view::npos) {
    return Error(400, "malformed request line");
  }
  const absl::string_view method = line.substr(0, sp1);
  absl::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const absl::string_view version = line.substr(sp2 + 1);
  if (!IsToken(method)) return Error(400, "malformed method");
  if (!absl::StartsWith(version, "HTTP/")) return Error(400, "malformed HTTP version");
  if (version != "HTTP/1.1" && version != "HTTP/1.0") {
    return Error(505, "only HTTP/1.0 and HTTP/1.1 are served");
  }
  if (target.empty() || target.front() != '/') return Error(400, "malformed request target");
  for (char c : target) {
    if (c <= 32 || c >= 127) return Error(400, "malformed request target");
  }
  // Header lines must each hold a colon; their values are not needed.
  absl::string_view rest = eol == absl::string_view::npos ? "" : head.substr(eol + 1);
  while (!rest.empty()) {
    const size_t next = rest.find('\n');
    absl::string_view header = rest.substr(0, next);
    rest = next == absl::string_view::npos ? "" : rest.substr(next + 1);
    if (!header.empty() && header.back() == '\r') header.remove_suffix(1);
    if (header.empty()) break;
    const size_t colon = header.find(':');
    if (colon == absl::string_view::npos || colon == 0 ||
        !IsToken(header.substr(0, colon))) {
      return Error(400, "malformed header line");
    }
  }

  if (const size_t q = target.find('?'); q != absl::string_view::npos) target = target.substr(0, q);
  const bool get = method == "GET";
  *head_only = method == "HEAD";
  const bool known = target == "/metrics" || target == "/v2/health/live" ||
                     target == "/v2/health/ready";
  if (!known || (target == "/metrics" && !options.metrics)) return Error(404, "no such path");
  if (!get && !*head_only) {
    Response r = Error(405, "only GET and HEAD are served");
    r.extra_headers = "Allow: GET, HEAD\r\n";
    return r;
  }
  Response r;
  if (target == "/metrics") {
    r.content_type = kMetricsContentType;
    r.body = options.metrics();
  } else if (target == "/v2/health/live") {
    r.body = "live\n";
  } else {
    const bool ready = !options.ready || options.ready();
    r.code = ready ? 200 : 503;
    r.body = ready ? "ready\n" : "not ready\n";
  }
  return r;
}

}  // namespace

void HttpServer::Serve() {
  std::vector<HttpConnection> conns;
  std::vector<pollfd> fds;
  char buf[4096];

  auto respond = [](HttpConnection& c, const Response& r, bool head_only) {
    c.out = Serialize(r, head_only);
    c.out_sent = 0;
    c.responding = true;
  };

  for (;;) {
    fds.clear();
    fds.push_back({wake_fds_[0], POLLIN, 0});
    const bool room = static_cast<int>(conns.size()) < options_.max_connections;
    // While every slot is taken, new connections wait in the listen backlog.
    fds.push_back({listen_fd_, static_cast<short>(room ? POLLIN : 0), 0});
    absl::Time now = absl::Now();
    absl::Time earliest = absl::InfiniteFuture();
    for (const HttpConnection& c : conns) {
      fds.push_back({c.fd, static_cast<short>(c.responding ? POLLOUT : POLLIN), 0});
      earliest = std::min(earliest, c.deadline);
    }
    int timeout_ms = -1;
    if (earliest != absl::InfiniteFuture()) {
      timeout_ms = static_cast<int>(
          std::max<int64_t>(0, absl::ToInt64Milliseconds(earliest - now) + 1));
    }
    const int n = poll(fds.data(), fds.size(), timeout_ms);
    if (n < 0 && errno != EINTR) break;
    if (fds[0].revents != 0) break;  // Shutdown
    now = absl::Now();

    // Existing connections first, so that a new one appended below is not indexed into fds.
    for (size_t i = 0; i < conns.size(); ++i) {
      HttpConnection& c = conns[i];
      const short revents = fds[i + 2].revents;
      bool done = false;
      if (revents & (POLLERR | POLLNVAL)) {
        done = true;
      } else if (!c.responding && (revents & (POLLIN | POLLHUP))) {
        const ssize_t got = recv(c.fd, buf, sizeof(buf), 0);
        if (got > 0) {
          c.in.append(buf, got);
          const size_t end = HeaderEnd(c.in);
          if (end != std::string::npos && end <= options_.max_request_bytes) {
            bool head_only = false;
            const Response r = Handle(absl::string_view(c.in).substr(0, end), options_,
                                      &head_only);
            respond(c, r, head_only);
          } else if (c.in.size() > options_.max_request_bytes) {
            respond(c, Error(431, "request too large"), false);
          }
        } else if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          done = true;  // peer closed before a whole request, or a socket error
        }
      } else if (c.responding && (revents & (POLLOUT | POLLHUP))) {
        const ssize_t sent =
            send(c.fd, c.out.data() + c.out_sent, c.out.size() - c.out_sent, MSG_NOSIGNAL);
        if (sent > 0) {
          c.out_sent += sent;
          if (c.out_sent == c.out.size()) done = true;
        } else if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          done = true;
        }
      }
      if (!done && now >= c.deadline) {
        if (!c.responding && !c.in.empty()) {
          // One best-effort 408 for a client that started a request and stalled.
          const std::string r = Serialize(Error(408, "request not received in time"), false);
          (void)!send(c.fd, r.data(), r.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        done = true;
      }
      if (done) {
        if (c.responding) {
          shutdown(c.fd, SHUT_WR);
          // Unread input makes close() send a reset, which can destroy the answer in flight.
          for (int k = 0; k < 16 && recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT) > 0; ++k) {
          }
        }
        close(c.fd);
        c.fd = -1;
      }
    }
    conns.erase(std::remove_if(conns.begin(), conns.end(),
                               [](const HttpConnection& c) { return c.fd < 0; }),
                conns.end());

    if (fds[1].revents & POLLIN) {
      while (static_cast<int>(conns.size()) < options_.max_connections) {
        const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) break;
        HttpConnection c;
        c.fd = fd;
        c.deadline = now + options_.connection_timeout;
        conns.push_back(std::move(c));
      }
    }
  }
  for (HttpConnection& c : conns) close(c.fd);
}

}  // namespace mmdit
