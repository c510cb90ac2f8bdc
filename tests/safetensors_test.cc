#include "kernels/safetensors.h"

#include <cstring>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mmdit {
namespace {

using ::testing::HasSubstr;

// A file from a header JSON and a data section, as a writer other than ours would lay it out.
std::string RawFile(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::string ParseError(const std::string& bytes) {
  auto file = SafetensorsFile::Parse(bytes, "t.safetensors");
  EXPECT_FALSE(file.ok());
  return file.ok() ? "" : std::string(file.status().message());
}

TEST(SafetensorsTest, RoundTripsTensorsAndMetadata) {
  SafetensorsWriter w;
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1e-3f};
  w.AddFloat("a", {2, 3}, a);
  const std::vector<int64_t> pos = {0, 11};
  w.Add("pos", DType::kI64, {2},
        absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(pos.data()), 16));
  w.SetMetadata("dim", "3");
  auto file = SafetensorsFile::Parse(w.Serialize(), "mem");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata().at("dim"), "3");
  auto got = file->GetFloat("a", {2, 3});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, a);
  auto p = file->GetChecked("pos", DType::kI64, {2});
  ASSERT_TRUE(p.ok()) << p.status();
  int64_t second;
  std::memcpy(&second, p->bytes.data() + 8, 8);
  EXPECT_EQ(second, 11);
}

TEST(SafetensorsTest, ViewsStayValidAfterMove) {
  SafetensorsWriter w;
  std::vector<float> a(64, 2.5f);
  w.AddFloat("a", {64}, a);
  auto file = SafetensorsFile::Parse(w.Serialize(), "mem");
  ASSERT_TRUE(file.ok());
  SafetensorsFile moved = *std::move(file);
  EXPECT_EQ(*moved.GetFloat("a", {64}), a);
}

TEST(SafetensorsTest, ConvertsHalfFloatsOnLoad) {
  // bf16 0x3fc0 = 1.5, fp16 0x3e00 = 1.5, fp16 0xc000 = -2.
  const std::string data = std::string("\xc0\x3f\x00\x3e\x00\xc0", 6);
  auto file = SafetensorsFile::Parse(
      RawFile(R"({"b":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},)"
              R"("h":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}})",
              data),
      "mem");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(*file->GetFloat("b", {1}), std::vector<float>({1.5f}));
  EXPECT_EQ(*file->GetFloat("h", {2}), std::vector<float>({1.5f, -2.0f}));
}

TEST(SafetensorsTest, RejectsTruncatedFile) {
  EXPECT_THAT(ParseError("abc"), HasSubstr("truncated"));
}

TEST(SafetensorsTest, RejectsHeaderLengthPastEnd) {
  std::string bytes = RawFile("{}", "");
  bytes[0] = 100;
  EXPECT_THAT(ParseError(bytes), HasSubstr("past the end"));
}

TEST(SafetensorsTest, RejectsBadJson) {
  EXPECT_THAT(ParseError(RawFile("{not json", "")), HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseError(RawFile("[1,2]", "")), HasSubstr("not a JSON object"));
}

TEST(SafetensorsTest, RejectsUnknownDtype) {
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})",
                                 std::string(1, '\0'))),
              HasSubstr("tensor 'w': unknown dtype F8"));
}

TEST(SafetensorsTest, RejectsOffsetsPastData) {
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                 std::string(4, '\0'))),
              HasSubstr("tensor 'w': data_offsets end 8 is past the data"));
}

TEST(SafetensorsTest, RejectsSizeNotMatchingShape) {
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                                 std::string(8, '\0'))),
              HasSubstr("tensor 'w': 8 bytes of data, but F32 [3] needs 12"));
}

TEST(SafetensorsTest, RejectsReversedOffsets) {
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})",
                                 std::string(4, '\0'))),
              HasSubstr("reversed"));
}

TEST(SafetensorsTest, RejectsOverlappingTensors) {
  EXPECT_THAT(ParseError(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                 std::string(12, '\0'))),
              HasSubstr("tensors 'a' and 'b' overlap"));
}

TEST(SafetensorsTest, RejectsMalformedEntries) {
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", std::string(4, 0))),
              HasSubstr("tensor 'w': missing or non-string dtype"));
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})",
                                 std::string(4, 0))),
              HasSubstr("non-negative"));
  EXPECT_THAT(ParseError(RawFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
                                 std::string(4, 0))),
              HasSubstr("data_offsets must be two"));
  EXPECT_THAT(ParseError(RawFile(R"({"__metadata__":{"a":1}})", "")), HasSubstr("not a string"));
}

TEST(SafetensorsTest, GetNamesMissingTensorAndWrongShape) {
  SafetensorsWriter w;
  w.AddFloat("a", {2}, std::vector<float>{1, 2});
  auto file = SafetensorsFile::Parse(w.Serialize(), "m.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_THAT(std::string(file->Get("b").status().message()),
              HasSubstr("m.safetensors: missing tensor 'b'"));
  EXPECT_THAT(std::string(file->GetFloat("a", {3}).status().message()),
              HasSubstr("tensor 'a' has shape [2], expected [3]"));
  EXPECT_THAT(std::string(file->GetChecked("a", DType::kI64, {2}).status().message()),
              HasSubstr("has dtype F32, expected I64"));
}

TEST(SafetensorsTest, ReadReportsMissingFile) {
  auto file = SafetensorsFile::Read("/nonexistent/x.safetensors");
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mmdit
