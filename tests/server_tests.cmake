# The gRPC server: the dynamic batcher (fake clock), the server in-process over loopback gRPC,
# and the mmdit-server binary (start-up, SIGTERM drain). Labelled tsan so CI runs them under
# ThreadSanitizer too.
mmdit_add_test(server_batcher_test
  SOURCES server_batcher_test.cc
  LIBS mmdit_server
  LABELS server tsan)
mmdit_add_test(server_grpc_test
  SOURCES server_grpc_test.cc
  LIBS mmdit_server mmdit_test_util
  LABELS server tsan)
mmdit_add_test(server_binary_test
  SOURCES server_binary_test.cc
  LIBS mmdit_proto mmdit_test_util mmdit_absl_tsan absl::strings absl::time
  LABELS server tsan)
# The binary test runs the real server.
add_dependencies(server_binary_test mmdit-server)
mmdit_add_test(server_request_test
  SOURCES server_request_test.cc
  LIBS mmdit_server
  LABELS server)
