// The contract of a fuzz target in tests/fuzz/: a libFuzzer entry point plus seed inputs. Built
// with clang's -fsanitize=fuzzer (MMDIT_FUZZERS=ON) it runs under libFuzzer; in every build it
// also links into a gtest that replays the seeds and a bounded set of mutations of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace mmdit::fuzz {
// Valid inputs to start from: mutations of them reach deep into the parser.
std::vector<std::string> Seeds();
}  // namespace mmdit::fuzz
