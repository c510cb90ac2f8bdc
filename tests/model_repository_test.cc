#include "server/model_repository.h"

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Message(const absl::Status& s) { return std::string(s.message()); }

TEST(ModelRepositoryTest, LoadsFixtureModelAtHighestVersion) {
  testing::Fixture f = testing::LoadFixture("small");
  const std::string dir = testing::MakeTempDir("repo");
  testing::WriteModelRepository(dir, "small", f.config, f.weights_path(), 4, 1);
  testing::WriteModelRepository(dir, "small", f.config, f.weights_path(), 4, 3);
  fs::create_directories(fs::path(dir) / "small" / "notes");  // not a version: ignored
  auto models = ListModels(dir);
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(*models, std::vector<std::string>{"small"});
  auto loaded = LoadModel(dir, "small");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->version, 3);
  EXPECT_EQ(loaded->config.max_batch_size(), 4);
  EXPECT_EQ(loaded->config.precision(), "fp32");  // the default
  EXPECT_EQ(loaded->weights.config.num_heads, 4);
  EXPECT_EQ(loaded->weights.layers.size(), 2u);
  auto v1 = LoadModel(dir, "small", 1);
  ASSERT_TRUE(v1.ok());
  EXPECT_EQ(v1->version, 1);
  EXPECT_EQ(LoadModel(dir, "small", 2).status().code(), absl::StatusCode::kNotFound);
}

TEST(ModelRepositoryTest, ParsesTritonStyleFields) {
  auto config = ParseModelConfig(R"(
    name: "m"
    max_batch_size: 64
    precision: "bf16"
    mmdit { dim: 128 num_heads: 8 dim_feedforward: 512 num_layers: 12 }
    dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [16, 32]
                       max_queue_size: 100 default_timeout_microseconds: 20000 }
    instance_group [ { kind: KIND_GPU count: 2 gpus: [0, 1] }, { kind: KIND_CPU count: 1 } ]
  )", "config.pbtxt");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->mmdit().max_seq_len(), 4096);
  EXPECT_EQ(config->dynamic_batching().preferred_batch_size(1), 32);
  EXPECT_EQ(config->instance_group(0).kind(), ModelInstanceGroup::KIND_GPU);
  EXPECT_EQ(config->instance_group(0).gpus_size(), 2);
  EXPECT_EQ(ToMmditConfig(config->mmdit()).head_dim(), 16);
}

TEST(ModelRepositoryTest, BadConfigsNameFileAndField) {
  const std::string ok_mmdit = "mmdit { dim: 64 num_heads: 4 dim_feedforward: 256 num_layers: 2 }";
  struct Case {
    std::string text, expected;
  };
  const std::vector<Case> cases = {
      {"name: \"m\" max_batch_size: 0 " + ok_mmdit, "c.pbtxt: max_batch_size must be positive; was 0"},
      {"max_batch_size: 2 " + ok_mmdit, "c.pbtxt: name must be set"},
      {"name: \"m\" max_batch_size: 2", "c.pbtxt: mmdit { dim"},
      {"name: \"m\" max_batch_size: 2 mmdit { dim: 64 num_heads: 5 dim_feedforward: 256 num_layers: 2 }",
       "c.pbtxt: mmdit.dim must be divisible by num_heads"},
      {"name: \"m\" max_batch_size: 2 mmdit { dim: 60 num_heads: 4 dim_feedforward: 256 num_layers: 2 }",
       "c.pbtxt: mmdit.head dim (dim / num_heads) must be even for RoPE; was 15"},
      {"name: \"m\" max_batch_size: 2 precision: \"fp8\" " + ok_mmdit, "precision must be \"fp32\" or \"bf16\""},
      {"name: \"m\" max_batch_size: 2 dynamic_batching { preferred_batch_size: 4 } " + ok_mmdit,
       "dynamic_batching.preferred_batch_size 4 must be in [1, max_batch_size 2]"},
      {"name: \"m\" max_batch_size: 2 mmdit { dimm: 3 }", "c.pbtxt: line 1, column"},
      {"name: \"m\" max_batch_size: 2 instance_group { kind: KIND_TPU } " + ok_mmdit, "c.pbtxt: line 1"},
  };
  for (const Case& c : cases) {
    auto parsed = ParseModelConfig(c.text, "c.pbtxt");
    EXPECT_FALSE(parsed.ok()) << c.text;
    EXPECT_THAT(Message(parsed.status()), HasSubstr(c.expected)) << c.text;
  }
}

TEST(ModelRepositoryTest, WeightsThatDisagreeWithConfigNameTensorAndConfig) {
  testing::Fixture f = testing::LoadFixture("small");
  const std::string dir = testing::MakeTempDir("repo");
  MmditConfig wrong = f.config;
  wrong.dim_feedforward = 512;
  testing::WriteModelRepository(dir, "small", wrong, f.weights_path());
  auto loaded = LoadModel(dir, "small");
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(Message(loaded.status()), HasSubstr("model.safetensors: tensor 'blocks.0."));
  EXPECT_THAT(Message(loaded.status()), HasSubstr("config.pbtxt"));
}

TEST(ModelRepositoryTest, NameMustMatchFolderAndVersionMustExist) {
  testing::Fixture f = testing::LoadFixture("small");
  const std::string dir = testing::MakeTempDir("repo");
  testing::WriteModelRepository(dir, "small", f.config, f.weights_path());
  fs::rename(fs::path(dir) / "small", fs::path(dir) / "other");
  EXPECT_THAT(Message(LoadModel(dir, "other").status()), HasSubstr("differs from its folder"));
  const std::string empty = testing::MakeTempDir("repo");
  fs::create_directories(fs::path(empty) / "m");
  std::ofstream(fs::path(empty) / "m" / "config.pbtxt")
      << "name: \"m\" max_batch_size: 1 mmdit { dim: 64 num_heads: 4 dim_feedforward: 256 "
         "num_layers: 2 }";
  EXPECT_THAT(Message(LoadModel(empty, "m").status()), HasSubstr("no version folder"));
  EXPECT_EQ(ListModels("/nonexistent").status().code(), absl::StatusCode::kNotFound);
}

TEST(ModelRepositoryTest, BuiltinModelIsTheTargetConfig) {
  LoadedModel m = BuiltinModel();
  EXPECT_EQ(m.config.name(), "mmdit");
  EXPECT_TRUE(ValidateModelConfig(m.config, "builtin").ok());
  EXPECT_EQ(m.weights.config.dim, 128);
  EXPECT_EQ(m.weights.layers.size(), 12u);
  EXPECT_EQ(BuiltinModel().weights.layers[11].x.qkv_w, m.weights.layers[11].x.qkv_w);
}

}  // namespace
}  // namespace mmdit
