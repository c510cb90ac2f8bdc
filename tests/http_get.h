// A plain HTTP/1.1 GET over loopback for tests that read /metrics or Prometheus' API: one
// connection per request, bounded in time, no dependencies beyond POSIX sockets.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace mmdit {
namespace testing {

struct HttpAnswer {
  int code = 0;  // 0: no answer (connection refused, timeout, garbage)
  std::string body;
};

inline HttpAnswer HttpGet(int port, const std::string& path,
                          absl::Duration timeout = absl::Seconds(10)) {
  HttpAnswer answer;
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return answer;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    close(fd);
    return answer;
  }
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    close(fd);
    return answer;
  }
  std::string raw;
  const absl::Time deadline = absl::Now() + timeout;
  char buf[8192];
  while (absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now())) + 1;
    if (poll(&p, 1, ms) <= 0) break;
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    raw.append(buf, n);
  }
  close(fd);
  // "HTTP/1.1 200 OK\r\n...\r\n\r\nbody"; chunked answers are not expected from the servers
  // these tests talk to (ours and Prometheus' API both send Content-Length).
  const size_t head_end = raw.find("\r\n\r\n");
  if (raw.compare(0, 5, "HTTP/") != 0 || head_end == std::string::npos) return answer;
  const size_t sp = raw.find(' ');
  int code = 0;
  if (sp == std::string::npos || !absl::SimpleAtoi(raw.substr(sp + 1, 3), &code)) return answer;
  answer.code = code;
  answer.body = raw.substr(head_end + 4);
  return answer;
}

// A port free on 127.0.0.1 at the time of the call (bound to 0, read back, released).
inline int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = 0;
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0) {
    socklen_t len = sizeof(sa);
    getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
    port = ntohs(sa.sin_port);
  }
  close(fd);
  return port;
}

// Percent-encodes a query parameter value.
inline std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out += absl::StrCat("%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

}  // namespace testing
}  // namespace mmdit
