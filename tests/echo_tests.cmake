# mmdit-echo-server, the bare gRPC echo that mmdit-server's overhead is measured against: started
# as a child process on loopback, it answers the client library with the request's own bytes.
mmdit_add_test(echo_server_test
  SOURCES echo_server_test.cc
  LIBS mmdit_client mmdit_test_util absl::strings absl::time
  LABELS client)
add_dependencies(echo_server_test mmdit-echo-server)
