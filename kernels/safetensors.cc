#include "kernels/safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/half_float.h"
#include "nlohmann/json.hpp"

namespace mmdit {
namespace {

// A header larger than this is not a model file (MODEL.md's 12-layer stack needs ~20 KB).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

struct DTypeInfo {
  DType dtype;
  const char* name;
  int size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kF32, "F32", 4},  {DType::kF16, "F16", 2},  {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},  {DType::kI64, "I64", 8},  {DType::kI32, "I32", 4},
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},
};

const DTypeInfo* FindDType(const std::string& name) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

}  // namespace

const char* DTypeName(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

int DTypeSize(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.size;
  }
  return 0;
}

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return Parse(std::move(ss).str(), path);
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes, const std::string& name) {
  auto error = [&name](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", parts...));
  };
  if (bytes.size() < 8) {
    return error("truncated: ", bytes.size(), " bytes, shorter than the 8-byte header length");
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | static_cast<uint8_t>(bytes[i]);
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return error("header length ", header_len, " runs past the end of the file (",
                 bytes.size(), " bytes)");
  }
  nlohmann::json header = nlohmann::json::parse(bytes.begin() + 8,
                                                bytes.begin() + 8 + header_len, nullptr,
                                                /*allow_exceptions=*/false);
  if (header.is_discarded()) return error("header is not valid JSON");
  if (!header.is_object()) return error("header is not a JSON object");

  SafetensorsFile file;
  file.name_ = name;
  const size_t data_begin = 8 + header_len;
  const uint64_t data_size = bytes.size() - data_begin;
  struct Range {
    uint64_t begin, end;
    std::string tensor;
  };
  std::vector<Range> ranges;
  std::map<std::string, std::pair<DType, std::vector<int64_t>>> specs;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& entry = it.value();
    if (key == "__metadata__") {
      if (!entry.is_object()) return error("__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) return error("__metadata__ value '", m.key(), "' is not a string");
        file.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!entry.is_object()) return error("tensor '", key, "': entry is not an object");
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return error("tensor '", key, "': missing or non-string dtype");
    }
    const DTypeInfo* info = FindDType(dtype_it->get<std::string>());
    if (info == nullptr) {
      return error("tensor '", key, "': unknown dtype ", dtype_it->get<std::string>());
    }
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return error("tensor '", key, "': missing or non-array shape");
    }
    std::vector<int64_t> shape;
    uint64_t elements = 1;
    for (const auto& d : *shape_it) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return error("tensor '", key, "': shape entries must be non-negative integers");
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && elements > (uint64_t{1} << 48) / dim) {
        return error("tensor '", key, "': shape is too large");
      }
      elements *= dim;
      shape.push_back(static_cast<int64_t>(dim));
    }
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
      return error("tensor '", key, "': data_offsets must be two non-negative integers");
    }
    const uint64_t begin = (*offsets_it)[0].get<uint64_t>();
    const uint64_t end = (*offsets_it)[1].get<uint64_t>();
    if (begin > end) return error("tensor '", key, "': data_offsets [", begin, ", ", end, "] are reversed");
    if (end > data_size) {
      return error("tensor '", key, "': data_offsets end ", end, " is past the data (", data_size,
                   " bytes; file truncated?)");
    }
    if (end - begin != elements * info->size) {
      return error("tensor '", key, "': ", end - begin, " bytes of data, but ", info->name, " ",
                   ShapeString(shape), " needs ", elements * info->size);
    }
    ranges.push_back({begin, end, key});
    specs[key] = {info->dtype, std::move(shape)};
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      return error("tensors '", ranges[i - 1].tensor, "' and '", ranges[i].tensor,
                   "' overlap in the data");
    }
  }

  file.buffer_ = std::make_unique<const std::string>(std::move(bytes));
  const uint8_t* data = reinterpret_cast<const uint8_t*>(file.buffer_->data()) + data_begin;
  for (const Range& r : ranges) {
    auto& spec = specs[r.tensor];
    file.tensors_[r.tensor] =
        TensorView{spec.first, std::move(spec.second),
                   absl::Span<const uint8_t>(data + r.begin, r.end - r.begin)};
  }
  return file;
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& tensor) const {
  auto it = tensors_.find(tensor);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(name_, ": missing tensor '", tensor, "'"));
  }
  return it->second;
}

absl::StatusOr<TensorView> SafetensorsFile::GetChecked(
    const std::string& tensor, DType dtype, const std::vector<int64_t>& expected_shape) const {
  absl::StatusOr<TensorView> view = Get(tensor);
  if (!view.ok()) return view.status();
  if (view->dtype != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": tensor '", tensor, "' has dtype ",
                                                   DTypeName(view->dtype), ", expected ",
                                                   DTypeName(dtype)));
  }
  if (view->shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": tensor '", tensor, "' has shape ", ShapeString(view->shape), ", expected ",
        ShapeString(expected_shape)));
  }
  return view;
}

absl::StatusOr<std::vector<float>> SafetensorsFile::GetFloat(
    const std::string& tensor, const std::vector<int64_t>& expected_shape) const {
  absl::StatusOr<TensorView> view = Get(tensor);
  if (!view.ok()) return view.status();
  if (view->shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": tensor '", tensor, "' has shape ", ShapeString(view->shape), ", expected ",
        ShapeString(expected_shape)));
  }
  const int64_t n = view->num_elements();
  std::vector<float> out(n);
  const uint8_t* p = view->bytes.data();
  switch (view->dtype) {
    case DType::kF32:
      std::memcpy(out.data(), p, n * 4);
      break;
    case DType::kF64:
      for (int64_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, p + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
      break;
    case DType::kBF16:
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = view->dtype == DType::kBF16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
      }
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(name_, ": tensor '", tensor, "' has dtype ",
                                                     DTypeName(view->dtype),
                                                     ", expected a float type (F32, F16, BF16)"));
  }
  return out;
}

void SafetensorsWriter::Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            absl::Span<const uint8_t> bytes) {
  entries_[name] = Entry{dtype, std::move(shape),
                         std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size())};
}

void SafetensorsWriter::AddFloat(const std::string& name, std::vector<int64_t> shape,
                                 absl::Span<const float> v) {
  Add(name, DType::kF32, std::move(shape),
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4));
}

void SafetensorsWriter::SetMetadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

std::string SafetensorsWriter::Serialize() const {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", DTypeName(e.dtype)},
                    {"shape", e.shape},
                    {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  std::string json = header.dump();
  // Pad with spaces so the data starts 8-byte aligned, as PyTorch's writer does.
  while ((json.size() + 8) % 8 != 0) json.push_back(' ');
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
  for (const auto& [name, e] : entries_) out += e.bytes;
  return out;
}

absl::Status SafetensorsWriter::WriteFile(const std::string& path) const {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  const std::string bytes = Serialize();
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("error writing ", path));
  return absl::OkStatus();
}

}  // namespace mmdit
