// A project binary run as a child process in tests: stdout and stderr into a log file, exit code
// and signals, and the ports it writes to its --port_file. Killed when the object goes away.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/time/time.h"

namespace mmdit::testing {

class ChildProcess {
 public:
  // Starts `binary` with `args`; its output goes to `log_path`.
  ChildProcess(const std::string& binary, std::vector<std::string> args,
               const std::string& log_path);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // The exit code once the process ended within `timeout`; -1 otherwise (or on a signal).
  int Wait(absl::Duration timeout);
  bool running();
  void Signal(int sig);
  std::string log() const;

  // Waits (bounded, and only while the process runs) for `key=N` ("grpc_port", "http_port") in
  // `port_file`; N, or 0 if it never came.
  int WaitForPort(const std::string& port_file, const std::string& key,
                  absl::Duration timeout = absl::Seconds(90));

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  std::string log_;
};

std::string ReadWholeFile(const std::string& path);  // "" when missing

}  // namespace mmdit::testing
