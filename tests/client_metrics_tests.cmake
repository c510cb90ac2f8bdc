# Metrics, the HTTP endpoints, Prometheus scraping, and the client.
mmdit_add_test(server_metrics_test
  SOURCES server_metrics_test.cc
  LIBS mmdit_metrics nlohmann_json::nlohmann_json
  LABELS metrics tsan)
mmdit_add_test(server_http_test
  SOURCES server_http_test.cc
  LIBS mmdit_http absl::strings absl::time
  LABELS metrics tsan)
mmdit_add_test(prometheus_scrape_test
  SOURCES prometheus_scrape_test.cc
  LIBS mmdit_server mmdit_client mmdit_test_util nlohmann_json::nlohmann_json
  LABELS metrics)
mmdit_add_test(client_test
  SOURCES client_test.cc
  LIBS mmdit_client mmdit_server mmdit_test_util
  LABELS client)
add_dependencies(client_test mmdit-client mmdit-loadgen)
mmdit_add_test(server_metrics_e2e_test
  SOURCES server_metrics_e2e_test.cc
  LIBS mmdit_server mmdit_client mmdit_test_util
  LABELS metrics)
