#include "kernels/model_weights.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/half_float.h"
#include "tests/test_util.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

MmditConfig SmallConfig() {
  MmditConfig c;
  c.dim = 32;
  c.num_heads = 4;
  c.dim_feedforward = 64;
  c.num_layers = 2;
  return c;
}

// A state_dict file of `weights`, with an optional edit applied to the tensor list.
std::string Serialize(const ModelWeights& weights, const std::string& drop = "",
                      const std::string& extra = "", bool as_bf16 = false) {
  SafetensorsWriter w;
  for (const auto& [name, shape, data] : weights.NamedTensors()) {
    if (name == drop) continue;
    if (as_bf16) {
      std::vector<uint16_t> h(data->size());
      for (size_t i = 0; i < h.size(); ++i) h[i] = FloatToBf16((*data)[i]);
      w.Add(name, DType::kBF16, shape,
            absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(h.data()), h.size() * 2));
    } else {
      w.AddFloat(name, shape, *data);
    }
  }
  if (!extra.empty()) w.AddFloat(extra, {1}, std::vector<float>{0});
  return w.Serialize();
}

TEST(ModelWeightsTest, LoadsEveryFixture) {
  for (const std::string& name : testing::FixtureNames()) {
    testing::Fixture f = testing::LoadFixture(name);
    ASSERT_EQ(f.weights.layers.size(), static_cast<size_t>(f.config.num_layers)) << name;
    EXPECT_EQ(f.weights.layers[0].x.qkv_w.size(),
              static_cast<size_t>(3 * f.config.dim * f.config.dim));
  }
}

TEST(ModelWeightsTest, DeterministicIsReproducibleAndRoundTrips) {
  const MmditConfig c = SmallConfig();
  ModelWeights a = ModelWeights::Deterministic(c, 7), b = ModelWeights::Deterministic(c, 7);
  ModelWeights other = ModelWeights::Deterministic(c, 8);
  EXPECT_EQ(a.layers[1].context.mlp_down_w, b.layers[1].context.mlp_down_w);
  EXPECT_NE(a.layers[1].context.mlp_down_w, other.layers[1].context.mlp_down_w);
  auto file = SafetensorsFile::Parse(Serialize(a), "w.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto loaded = ModelWeights::FromSafetensors(*file, c);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->layers[1].x.adaln_w, a.layers[1].x.adaln_w);
  EXPECT_EQ(loaded->layers[0].context.out_rms, a.layers[0].context.out_rms);
}

TEST(ModelWeightsTest, ConvertsBf16FilesOnLoad) {
  const MmditConfig c = SmallConfig();
  ModelWeights a = ModelWeights::Deterministic(c, 3);
  auto file = SafetensorsFile::Parse(Serialize(a, "", "", /*as_bf16=*/true), "w.safetensors");
  ASSERT_TRUE(file.ok());
  auto loaded = ModelWeights::FromSafetensors(*file, c);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->layers[0].x.qkv_w[5], Bf16ToFloat(FloatToBf16(a.layers[0].x.qkv_w[5])));
}

TEST(ModelWeightsTest, NamesMissingTensor) {
  const MmditConfig c = SmallConfig();
  auto file = SafetensorsFile::Parse(
      Serialize(ModelWeights::Deterministic(c, 1), "blocks.1.cross_attn.c_rms_norm_k.weight"),
      "w.safetensors");
  ASSERT_TRUE(file.ok());
  auto loaded = ModelWeights::FromSafetensors(*file, c);
  EXPECT_THAT(std::string(loaded.status().message()),
              HasSubstr("w.safetensors: missing tensor 'blocks.1.cross_attn.c_rms_norm_k.weight'"));
}

TEST(ModelWeightsTest, NamesExtraTensor) {
  const MmditConfig c = SmallConfig();
  auto file = SafetensorsFile::Parse(
      Serialize(ModelWeights::Deterministic(c, 1), "", "blocks.2.mlp.0.bias"), "w.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_THAT(std::string(ModelWeights::FromSafetensors(*file, c).status().message()),
              HasSubstr("unexpected tensor 'blocks.2.mlp.0.bias' (config has num_layers 2"));
}

TEST(ModelWeightsTest, NamesShapeThatDisagreesWithConfig) {
  MmditConfig c = SmallConfig();
  auto file = SafetensorsFile::Parse(Serialize(ModelWeights::Deterministic(c, 1)), "w.safetensors");
  ASSERT_TRUE(file.ok());
  MmditConfig wider = c;
  wider.dim_feedforward = 128;
  EXPECT_THAT(std::string(ModelWeights::FromSafetensors(*file, wider).status().message()),
              HasSubstr("tensor 'blocks.0.mlp.0.weight' has shape [64, 32], expected [128, 32]"));
  MmditConfig fewer_layers = c;
  fewer_layers.num_layers = 1;
  EXPECT_THAT(std::string(ModelWeights::FromSafetensors(*file, fewer_layers).status().message()),
              HasSubstr("unexpected tensor 'blocks.1."));
}

TEST(ModelWeightsTest, ConfigValidationNamesField) {
  MmditConfig c = SmallConfig();
  c.num_heads = 5;
  EXPECT_THAT(std::string(c.Validate().message()), HasSubstr("dim must be divisible by num_heads"));
  c.num_heads = 32;  // head dim 1
  EXPECT_THAT(std::string(c.Validate().message()), HasSubstr("head dim (dim / num_heads) must be even"));
  c = SmallConfig();
  c.num_layers = 0;
  EXPECT_THAT(std::string(c.Validate().message()), HasSubstr("num_layers must be positive; was 0"));
}

}  // namespace
}  // namespace mmdit
