# Fuzz targets (tests/fuzz/*_fuzzer.cc). Every build replays seeds and mutations through gtest;
# with -DMMDIT_FUZZERS=ON (CMakeLists.txt) and clang, each also builds as a libFuzzer binary:
#   CC=clang CXX=clang++ cmake --preset cpu -B build-fuzz -DMMDIT_FUZZERS=ON
#   cmake --build build-fuzz --target safetensors_fuzzer && build-fuzz/tests/safetensors_fuzzer
set(fuzz_targets
  "safetensors_fuzzer\;mmdit_kernels"
  "model_config_fuzzer\;mmdit_repository")
file(GLOB extra_fuzz_cmake CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/*.cmake)
foreach(f ${extra_fuzz_cmake})
  include(${f})  # appends to fuzz_targets
endforeach()
foreach(entry ${fuzz_targets})
  list(GET entry 0 name)
  list(GET entry 1 lib)
  mmdit_add_test(${name}_replay_test SOURCES fuzz/${name}.cc fuzz/fuzz_replay_test.cc LIBS ${lib})
  if(MMDIT_FUZZERS)
    add_executable(${name} fuzz/${name}.cc)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer)
    target_link_libraries(${name} PRIVATE ${lib})
  endif()
endforeach()
