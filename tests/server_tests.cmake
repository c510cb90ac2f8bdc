# The gRPC server: the dynamic batcher (fake clock), the server in-process over loopback gRPC,
# and the mmdit-server binary (start-up, SIGTERM drain). Labelled tsan so CI runs them under
# ThreadSanitizer too. (One label each: mmdit_add_test hands LABELS to gtest_discover_tests, which
# keeps only the first of several.)
mmdit_add_test(server_batcher_test
  SOURCES server_batcher_test.cc
  LIBS mmdit_server
  LABELS tsan)
mmdit_add_test(server_grpc_test
  SOURCES server_grpc_test.cc
  LIBS mmdit_server mmdit_test_util
  LABELS tsan)
mmdit_add_test(server_binary_test
  SOURCES server_binary_test.cc
  LIBS mmdit_proto mmdit_test_util mmdit_absl_tsan absl::strings absl::time
  LABELS tsan)
# The binary test runs the real server.
add_dependencies(server_binary_test mmdit-server)
mmdit_add_test(server_request_test
  SOURCES server_request_test.cc
  LIBS mmdit_server
  LABELS server)
