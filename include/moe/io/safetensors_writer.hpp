// moe/io: a safetensors writer (the layout of the Python library: tensors by decreasing dtype
// size then name, header padded so every tensor is aligned) and make_tensor, which converts a
// matrix to any stored dtype exactly or refuses.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"
#include "moe/io/dtype.hpp"
#include "moe/io/tensor_info.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// A tensor to write: `bytes` holds numel * dtype_size(dtype) bytes, row-major, little-endian.
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};

/// Writes a safetensors file readable by SafetensorsFile and by the Python library. Tensors are
/// laid out as the Python writer does (by decreasing dtype size, then name), with no gaps, and
/// the header is padded with spaces to a multiple of 8 bytes, so every tensor is aligned to its
/// element size. Throws io_error for a duplicate or reserved name ("__metadata__"), a negative
/// dim, a byte count that disagrees with the shape, or a failed write (the file is then removed).
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  detail::check_little_endian();
  const std::string where = "moe: " + path + ": ";
  std::vector<const TensorToWrite*> order;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") throw io_error(where + "'__metadata__' is not a tensor name");
    if (!seen.insert(t.name).second) throw io_error(where + "tensor '" + t.name + "' given twice");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const std::size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json md = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) md[k] = v;
    header["__metadata__"] = std::move(md);
  }
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    const TensorToWrite& t = *order[i];
    // Byte count with overflow saturating at UINT64_MAX (which no vector can hold).
    constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
    std::uint64_t need = dtype_size(t.dtype);
    bool zero = false;
    for (std::int64_t d : t.shape) {
      if (d < 0) {
        throw io_error(where + "tensor '" + t.name + "' has a negative dim in shape " +
                       detail::shape_str(t.shape));
      }
      const auto ud = static_cast<std::uint64_t>(d);
      zero = zero || ud == 0;
      need = (ud != 0 && need > kMax / ud) ? kMax : need * ud;
    }
    if (zero) need = 0;
    if (t.bytes.size() != need) {
      throw io_error(moe::detail::concat(
          where, "tensor '", t.name, "' has ", t.bytes.size(), " bytes, but shape ",
          detail::shape_str(t.shape), " of ", dtype_name(t.dtype), " needs ",
          need == kMax ? std::string("more than 2^64") : std::to_string(need)));
    }
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = dtype_name(t.dtype);
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, offset + need};
    header[t.name] = std::move(e);
    offset += need;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len[8];
  std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw io_error(where + "cannot create: " + std::strerror(errno));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const TensorToWrite* t : order) {
    out.write(reinterpret_cast<const char*>(t->bytes.data()),
              static_cast<std::streamsize>(t->bytes.size()));
  }
  out.close();
  if (!out) {
    std::remove(path.c_str());
    throw io_error(where + "write failed");
  }
}

/// Converts a row-major matrix to a tensor of dtype `stored` with shape [rows, cols]: floating
/// dtypes round to nearest even in one step (E4M3 overflow gives NaN, see double_to_e4m3);
/// integer dtypes and BOOL need every value integral and in range (BOOL: 0 or 1). Throws
/// io_error otherwise (message names the tensor and the first offending element).
template <class T>
TensorToWrite make_tensor(std::string name, const RowMatrix<T>& m,
                          Dtype stored = detail::native_dtype<T>()) {
  static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                "moe::io: write from a floating or integer type");
  TensorToWrite t;
  t.name = std::move(name);
  t.dtype = stored;
  t.shape = {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())};
  const std::size_t n = static_cast<std::size_t>(m.size());
  const std::size_t es = dtype_size(stored);
  t.bytes.resize(n * es);
  unsigned char* out = t.bytes.data();
  auto store = [&](std::size_t i, auto v) { std::memcpy(out + i * es, &v, sizeof v); };
  for (std::size_t i = 0; i < n; ++i) {
    const T v = m.data()[i];
    const double d = static_cast<double>(v);
    switch (stored) {
      case Dtype::F64:
        store(i, d);
        continue;
      case Dtype::F32:
        store(i, static_cast<float>(v));
        continue;
      case Dtype::F16:
        store(i, double_to_f16(d));
        continue;
      case Dtype::BF16:
        store(i, double_to_bf16(d));
        continue;
      case Dtype::F8_E4M3:
        store(i, double_to_e4m3(d));
        continue;
      default:
        break;
    }
    // Integer dtypes: exact values only.
    std::int64_t lo = 0, hi = 1;
    switch (stored) {
      case Dtype::I64:
        lo = std::numeric_limits<std::int64_t>::min();
        hi = std::numeric_limits<std::int64_t>::max();
        break;
      case Dtype::I32:
        lo = std::numeric_limits<std::int32_t>::min();
        hi = std::numeric_limits<std::int32_t>::max();
        break;
      case Dtype::I16:
        lo = std::numeric_limits<std::int16_t>::min();
        hi = std::numeric_limits<std::int16_t>::max();
        break;
      case Dtype::I8:
        lo = std::numeric_limits<std::int8_t>::min();
        hi = std::numeric_limits<std::int8_t>::max();
        break;
      case Dtype::U8:
        hi = 255;
        break;
      default:  // BOOL
        break;
    }
    std::int64_t iv = 0;
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      // [-2^63, 2^63) is exactly representable as double bounds.
      ok = std::isfinite(d) && d == std::trunc(d) && d >= -9223372036854775808.0 &&
           d < 9223372036854775808.0;
      if (ok) iv = static_cast<std::int64_t>(d);
    } else if constexpr (std::is_unsigned_v<T>) {
      ok = static_cast<std::uint64_t>(v) <=
           static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      iv = static_cast<std::int64_t>(v);
    } else {
      ok = true;
      iv = static_cast<std::int64_t>(v);
    }
    ok = ok && iv >= lo && iv <= hi;
    if (!ok) {
      throw io_error(moe::detail::concat("moe: tensor '", t.name, "': element ", i, " = ", v,
                                         " cannot be stored exactly as ", dtype_name(stored)));
    }
    switch (stored) {
      case Dtype::I64:
        store(i, iv);
        break;
      case Dtype::I32:
        store(i, static_cast<std::int32_t>(iv));
        break;
      case Dtype::I16:
        store(i, static_cast<std::int16_t>(iv));
        break;
      case Dtype::I8:
        store(i, static_cast<std::int8_t>(iv));
        break;
      default:  // U8, BOOL
        store(i, static_cast<std::uint8_t>(iv));
        break;
    }
  }
  return t;
}

}  // namespace moe::io
