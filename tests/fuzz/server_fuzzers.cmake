list(APPEND fuzz_targets "infer_request_fuzzer\;mmdit_server")
