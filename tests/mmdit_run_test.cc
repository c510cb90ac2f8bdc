// mmdit-run as a user runs it: a subprocess with files in and out.
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/safetensors.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

struct Result {
  int exit_code;
  std::string output;  // stdout and stderr
};

Result RunTool(const std::string& args) {
  const std::string cmd = std::string(MMDIT_BINARY_DIR) + "/server/mmdit-run " + args + " 2>&1";
  Result r{-1, ""};
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

class MmditRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("run");
    fixture_ = testing::LoadFixture("small");
    testing::WriteModelRepository(dir_ + "/repo", "small", fixture_.config,
                                  fixture_.weights_path());
  }
  std::string Flags(const std::string& inputs) const {
    return "--model_repository " + dir_ + "/repo --model small --device cpu --inputs " + inputs +
           " --outputs " + dir_ + "/out.safetensors";
  }
  // Writes the fixture's inputs with one tensor replaced or dropped.
  std::string WriteInputs(const std::string& name, const std::string& drop,
                          const std::string& replace = "", std::vector<int64_t> shape = {},
                          std::vector<float> values = {}) {
    auto io = SafetensorsFile::Read(fixture_.io_path());
    EXPECT_TRUE(io.ok());
    SafetensorsWriter w;
    for (const auto& [key, view] : io->tensors()) {
      if (key == drop || key == replace) continue;
      w.Add(key, view.dtype, view.shape, view.bytes);
    }
    if (!replace.empty()) w.AddFloat(replace, shape, values);
    const std::string path = dir_ + "/" + name;
    EXPECT_TRUE(w.WriteFile(path).ok());
    return path;
  }
  std::string dir_;
  testing::Fixture fixture_;
};

class MmditRunFixtureTest : public MmditRunTest,
                            public ::testing::WithParamInterface<std::string> {};

TEST_P(MmditRunFixtureTest, ReproducesEveryFixtureWithin1e5) {
  for (const std::string& name : testing::FixtureNames()) {
    testing::Fixture f = testing::LoadFixture(name);
    testing::WriteModelRepository(dir_ + "/repo_" + name, name, f.config, f.weights_path());
    const std::string out = dir_ + "/" + name + "_out.safetensors";
    Result r = RunTool("--model_repository " + dir_ + "/repo_" + name + " --inputs " +
                       f.io_path() + " --outputs " + out + " --device cpu --cpu_forward " + GetParam());
    ASSERT_EQ(r.exit_code, 0) << r.output;
    // The fixture files also hold the expected outputs: those are reported as ignored.
    EXPECT_THAT(r.output, HasSubstr("ignoring tensors not used as inputs: context_out"));
    auto file = SafetensorsFile::Read(out);
    ASSERT_TRUE(file.ok()) << file.status();
    const int64_t d = f.config.dim;
    auto x_out = file->GetFloat("x_out", {f.batch, f.seq_len, d});
    auto c_out = file->GetFloat("context_out", {f.batch, f.context_len, d});
    ASSERT_TRUE(x_out.ok() && c_out.ok());
    EXPECT_LE(testing::RelativeError(*x_out, f.x_out_f64), 1e-5) << name;
    EXPECT_LE(testing::RelativeError(*c_out, f.context_out_f64), 1e-5) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(CpuPaths, MmditRunFixtureTest, ::testing::Values("fast", "reference"));

TEST_F(MmditRunTest, AcceptsYAsTwoDimensional) {
  const int64_t b = fixture_.batch, d = fixture_.config.dim;
  const std::string in = WriteInputs("y2d.safetensors", "", "y", {b, d}, fixture_.y);
  Result r = RunTool(Flags(in));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto file = SafetensorsFile::Read(dir_ + "/out.safetensors");
  auto x_out = file->GetFloat("x_out", {b, fixture_.seq_len, d});
  EXPECT_LE(testing::RelativeError(*x_out, fixture_.x_out_f64), 1e-5);
}

TEST_F(MmditRunTest, BadInputsFailWithAClearMessage) {
  const int64_t b = fixture_.batch, d = fixture_.config.dim;
  struct Case {
    std::string args, expected;
  };
  std::vector<float> bad_mask(b * fixture_.seq_len * fixture_.seq_len, 1.0f);
  const std::vector<Case> cases = {
      {Flags(dir_ + "/missing.safetensors"), "cannot open"},
      {Flags(WriteInputs("no_x.safetensors", "x")), "missing tensor 'x'"},
      {Flags(WriteInputs("bad_y.safetensors", "", "y", {b, 3}, std::vector<float>(b * 3))),
       "y must be [3, 1, 64] or [3, 64]; got [3, 3]"},
      {Flags(WriteInputs("bad_x.safetensors", "", "x", {b, 4, d + 1},
                         std::vector<float>(b * 4 * (d + 1)))),
       "x must be [B, L, 64]; got [3, 4, 65]"},
      {Flags(WriteInputs("float_mask.safetensors", "", "attn_mask",
                         {b, fixture_.seq_len, fixture_.seq_len}, bad_mask)),
       "tensor 'attn_mask' has dtype F32, expected BOOL"},
      {"--model_repository " + dir_ + "/repo --inputs " + fixture_.io_path(),
       "--inputs and --outputs are required"},
      {Flags(fixture_.io_path()) + " --device tpu", "--device must be auto, cpu or cuda"},
      {Flags(fixture_.io_path()) + " --cpu_forward slow", "--cpu_forward must be fast or reference"},
      {"--model_repository " + dir_ + "/nothing --inputs a --outputs b", "is not a directory"},
  };
  for (const Case& c : cases) {
    Result r = RunTool(c.args);
    EXPECT_EQ(r.exit_code, 1) << c.args << "\n" << r.output;
    EXPECT_THAT(r.output, HasSubstr(c.expected)) << c.args;
    EXPECT_THAT(r.output, HasSubstr("mmdit-run: error: "));
  }
}

TEST_F(MmditRunTest, HelpListsEveryFlagWithItsDefault) {
  Result r = RunTool("--help");
  for (const char* flag : {"--model_repository", "--model ", "--version", "--inputs", "--outputs",
                           "--device", "--cpu_forward", "--cpu_threads"}) {
    EXPECT_THAT(r.output, HasSubstr(flag)) << r.output;
  }
  EXPECT_THAT(r.output, HasSubstr("default: \"auto\""));
}

TEST_F(MmditRunTest, MaskRowWithoutVisibleKeyIsAnError) {
  auto io = SafetensorsFile::Read(fixture_.io_path());
  SafetensorsWriter w;
  for (const auto& [key, view] : io->tensors()) {
    if (key == "attn_mask") {
      std::vector<uint8_t> mask(view.bytes.begin(), view.bytes.end());
      const int L = fixture_.seq_len;
      std::fill_n(mask.begin() + (1 * L + 5) * L, L, 0);  // sample 1, row 5
      w.Add(key, view.dtype, view.shape, mask);
    } else {
      w.Add(key, view.dtype, view.shape, view.bytes);
    }
  }
  ASSERT_TRUE(w.WriteFile(dir_ + "/empty_row.safetensors").ok());
  Result r = RunTool(Flags(dir_ + "/empty_row.safetensors"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("sample 1: attn_mask row 5 has no visible key"));
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/out.safetensors"));
}

}  // namespace
}  // namespace mmdit
