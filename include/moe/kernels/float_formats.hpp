// moe: exact scalar conversions between float and the compact floating formats (IEEE binary16,
// bfloat16, OCP FP8 E4M3), shared by the compact-weight kernels and the checkpoint reader.
//
// Decoding (compact -> float) is exact: every F16, BF16 and F8_E4M3 value is a float.
// Encoding (float or double -> compact) rounds to nearest, ties to even, in one step from the
// source value (a double is never rounded through float first, which could round twice).
#pragma once

#include <cstdint>
#include <cstring>

namespace moe::kernels {

namespace detail {

inline std::uint32_t float_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// Layout of a compact binary floating format: `exp_bits` exponent bits with bias `bias`,
/// `mant_bits` stored mantissa bits. `ieee` formats reserve the top exponent for inf/NaN;
/// otherwise (E4M3FN) only the all-ones pattern is NaN and there is no infinity.
struct SmallFloatFormat {
  int exp_bits;
  int mant_bits;
  int bias;
  bool ieee;
};

inline constexpr SmallFloatFormat kF16{5, 10, 15, true};
inline constexpr SmallFloatFormat kBF16{8, 7, 127, true};
inline constexpr SmallFloatFormat kE4M3{4, 3, 7, false};

/// Rounds `m >> shift` to nearest, ties to even (0 < shift < 64).
inline std::uint64_t shift_round_even(std::uint64_t m, int shift) {
  const std::uint64_t q = m >> shift;
  const std::uint64_t rem = m & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  return (rem > half || (rem == half && (q & 1))) ? q + 1 : q;
}

/// Encodes a double in `fmt`, round to nearest even. Overflow gives infinity for IEEE formats;
/// for E4M3FN it gives NaN, or the largest finite value when `saturate` is set (infinities too).
/// NaN keeps its sign and becomes a quiet NaN (the top payload bits are kept where they fit).
/// Returns the bit pattern in the low 1 + exp_bits + mant_bits bits.
inline std::uint32_t encode_small_float(double x, SmallFloatFormat fmt, bool saturate) {
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int width = 1 + fmt.exp_bits + fmt.mant_bits;
  const std::uint32_t sign = static_cast<std::uint32_t>(bits >> 63) << (width - 1);
  const std::uint64_t abs_bits = bits & ~(std::uint64_t{1} << 63);
  const std::uint32_t exp_all_ones = (std::uint32_t{1} << fmt.exp_bits) - 1;
  const std::uint32_t nan_code =
      fmt.ieee ? (exp_all_ones << fmt.mant_bits) | (std::uint32_t{1} << (fmt.mant_bits - 1))
               : (std::uint32_t{1} << (width - 1)) - 1;
  const std::uint32_t max_finite = fmt.ieee ? (exp_all_ones << fmt.mant_bits) - 1 : nan_code - 1;
  const std::uint32_t overflow_code =
      fmt.ieee ? (exp_all_ones << fmt.mant_bits) : (saturate ? max_finite : nan_code);

  constexpr std::uint64_t kExpMask = std::uint64_t{0x7FF} << 52;
  constexpr std::uint64_t kMantMask = (std::uint64_t{1} << 52) - 1;
  if ((abs_bits & kExpMask) == kExpMask) {
    if ((abs_bits & kMantMask) != 0) {  // NaN: quiet, keep what fits of the payload
      const std::uint32_t payload =
          fmt.ieee ? static_cast<std::uint32_t>((abs_bits & kMantMask) >> (52 - fmt.mant_bits)) : 0;
      return sign | nan_code | payload;
    }
    return sign | overflow_code;  // infinity
  }
  const int e = static_cast<int>(abs_bits >> 52);
  const std::uint64_t mant = abs_bits & kMantMask;
  // A double subnormal (e == 0) has no implicit bit and the exponent of e == 1.
  const std::uint64_t m = e == 0 ? mant : (mant | (std::uint64_t{1} << 52));
  const int target_exp = (e == 0 ? 1 : e) - 1023 + fmt.bias;
  std::uint64_t code;
  if (target_exp >= 1) {
    // Normal in the target: exponent field and mantissa, rounded; a carry out of the mantissa
    // correctly increments the exponent field.
    const std::uint64_t unrounded = (static_cast<std::uint64_t>(target_exp) << 52) | mant;
    code = shift_round_even(unrounded, 52 - fmt.mant_bits);
  } else {
    // Subnormal in the target: value / 2^(1 - bias - mant_bits), rounded. Rounding up to
    // 1 << mant_bits gives the smallest normal, which is the right encoding.
    const int shift = (52 - fmt.mant_bits) + (1 - target_exp);
    code = shift >= 54 ? 0 : shift_round_even(m, shift);  // m < 2^53 <= half: rounds to 0
  }
  if (code > max_finite) return sign | overflow_code;
  return sign | static_cast<std::uint32_t>(code);
}

}  // namespace detail

/// IEEE binary16 bits -> float (exact; NaN payloads are kept).
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 0x1F) return detail::bits_float(sign | 0x7F800000u | (mant << 13));
  return detail::bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

/// bfloat16 bits -> float (exact: bf16 is the top half of a float).
inline float bf16_to_float(std::uint16_t b) {
  return detail::bits_float(static_cast<std::uint32_t>(b) << 16);
}

/// F8_E4M3 (E4M3FN) bits -> float (exact). 0x7F and 0xFF are NaN; 0x7E is 448; 0x01 is 2^-9.
inline float e4m3_to_float(std::uint8_t v) {
  const std::uint32_t sign = static_cast<std::uint32_t>(v & 0x80u) << 24;
  const std::uint32_t exp = (v >> 3) & 0xFu;
  const std::uint32_t mant = v & 0x7u;
  if (exp == 0xF && mant == 0x7) return detail::bits_float(sign | 0x7FC00000u);
  if (exp == 0) {  // zero or subnormal: mant * 2^-9
    const float v_abs = static_cast<float>(mant) * 0.001953125f;
    return sign ? -v_abs : v_abs;
  }
  return detail::bits_float(sign | ((exp + 120) << 23) | (mant << 20));
}

/// double -> IEEE binary16 bits, round to nearest even. |x| >= 65520 gives infinity; results
/// below 2^-14 are subnormal (smallest 2^-24); NaN gives a quiet NaN of the same sign.
inline std::uint16_t double_to_f16(double x) {
  return static_cast<std::uint16_t>(detail::encode_small_float(x, detail::kF16, false));
}
/// float -> IEEE binary16 bits, round to nearest even (see double_to_f16).
inline std::uint16_t float_to_f16(float x) { return double_to_f16(static_cast<double>(x)); }

/// double -> bfloat16 bits, round to nearest even (subnormals included). Values that round past
/// the largest bf16 (about 3.39e38) give infinity; NaN gives a quiet NaN of the same sign (never
/// infinity, which plain truncation of a small-payload NaN would produce).
inline std::uint16_t double_to_bf16(double x) {
  return static_cast<std::uint16_t>(detail::encode_small_float(x, detail::kBF16, false));
}
/// float -> bfloat16 bits, round to nearest even (see double_to_bf16).
inline std::uint16_t float_to_bf16(float x) { return double_to_bf16(static_cast<double>(x)); }

/// double -> F8_E4M3 (E4M3FN) bits, round to nearest even; subnormals down to 2^-9.
/// Overflow: |x| > 464 (which would round beyond 448; 464 itself ties to even, to 448) and
/// infinities give NaN (0x7F / 0xFF), as PyTorch's float8_e4m3fn conversion does, unless
/// `saturate` is true, in which case they give +-448. NaN always gives NaN.
inline std::uint8_t double_to_e4m3(double x, bool saturate = false) {
  return static_cast<std::uint8_t>(detail::encode_small_float(x, detail::kE4M3, saturate));
}
/// float -> F8_E4M3 bits, round to nearest even (see double_to_e4m3).
inline std::uint8_t float_to_e4m3(float x, bool saturate = false) {
  return double_to_e4m3(static_cast<double>(x), saturate);
}

}  // namespace moe::kernels
