// A reader and writer of the safetensors format (an 8-byte little-endian header length, a JSON
// header of {name: {dtype, shape, data_offsets}} plus optional __metadata__, then the data).
// The reader checks everything and names the tensor and the problem.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace mmdit {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kBool, kU8 };

const char* DTypeName(DType dtype);  // safetensors spelling: "F32", "BF16", "BOOL", …
int DTypeSize(DType dtype);

struct TensorView {
  DType dtype;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> bytes;  // views the file's buffer
  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<SafetensorsFile> Read(const std::string& path);
  // `name` is used in error messages (a path, or "request").
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes, const std::string& name);

  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& name() const { return name_; }

  // Returns the tensor or NotFound naming it and the file.
  absl::StatusOr<TensorView> Get(const std::string& tensor) const;
  // The tensor converted to float32 (from F32, F16, BF16 or F64) after checking its shape.
  absl::StatusOr<std::vector<float>> GetFloat(const std::string& tensor,
                                              const std::vector<int64_t>& expected_shape) const;

  // The bytes of a tensor whose dtype and shape were checked; for integer and bool inputs.
  absl::StatusOr<TensorView> GetChecked(const std::string& tensor, DType dtype,
                                        const std::vector<int64_t>& expected_shape) const;

 private:
  SafetensorsFile() = default;
  std::string name_;
  // Heap-held so that the views in tensors_ stay valid when the file object moves.
  std::unique_ptr<const std::string> buffer_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Builds a safetensors file in memory; tensors are written in name order.
class SafetensorsWriter {
 public:
  void Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
           absl::Span<const uint8_t> bytes);
  void AddFloat(const std::string& name, std::vector<int64_t> shape, absl::Span<const float> v);
  void SetMetadata(const std::string& key, const std::string& value);
  std::string Serialize() const;
  absl::Status WriteFile(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

std::string ShapeString(absl::Span<const int64_t> shape);  // "[2, 186, 128]"

}  // namespace mmdit
