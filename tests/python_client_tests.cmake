# Cross-language interop: a plain Python gRPC client, with stubs generated from
# proto/grpc_service.proto when the test runs, against the real mmdit-server binary.
# It needs python3 with grpcio, protobuf and numpy (deploy/install-deps.sh); without them the test
# fails, it is never skipped.
if(NOT MMDIT_CLIENT_PYTHON)
  # The python3 first on PATH may be a separate installation without the Debian packages, so take
  # the first interpreter that has them.
  find_program(mmdit_path_python3 NAMES python3)
  set(mmdit_python_candidates ${mmdit_path_python3} /usr/bin/python3)
  list(REMOVE_ITEM mmdit_python_candidates mmdit_path_python3-NOTFOUND)
  list(REMOVE_DUPLICATES mmdit_python_candidates)
  foreach(py IN LISTS mmdit_python_candidates)
    execute_process(COMMAND ${py} -c "import grpc, google.protobuf, numpy"
                    RESULT_VARIABLE py_rc OUTPUT_QUIET ERROR_QUIET)
    if(py_rc EQUAL 0)
      set(MMDIT_CLIENT_PYTHON ${py} CACHE FILEPATH
          "python3 with grpcio, protobuf and numpy, for python_client_test")
      break()
    endif()
  endforeach()
endif()
if(MMDIT_CLIENT_PYTHON)
  set(mmdit_client_python ${MMDIT_CLIENT_PYTHON})
else()
  message(WARNING "No python3 with grpcio, protobuf and numpy; python_client_test will fail "
                  "until deploy/install-deps.sh has run and CMake is re-run")
  set(mmdit_client_python python3)
  if(mmdit_python_candidates)
    list(GET mmdit_python_candidates 0 mmdit_client_python)
  endif()
endif()

add_test(NAME python_client_test
         COMMAND ${mmdit_client_python} ${CMAKE_CURRENT_SOURCE_DIR}/python_client_test.py
                 --server=$<TARGET_FILE:mmdit-server>
                 --proto_dir=${CMAKE_SOURCE_DIR}/proto
                 --fixtures=${MMDIT_FIXTURES_DIR}
                 --protoc=$<TARGET_FILE:protobuf::protoc>)
set_tests_properties(python_client_test PROPERTIES
                     LABELS client
                     TIMEOUT 240
                     ENVIRONMENT "PYTHONDONTWRITEBYTECODE=1")
