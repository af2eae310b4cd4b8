// moe/io: JSON helpers shared by the safetensors header, the shard index and config.json parsers:
// strict parsing of untrusted text (no repeated keys, bounded nesting) and short descriptions of
// values for error messages.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"

namespace moe::io::detail {

/// "a JSON number", "a JSON array", ... for messages about a value of the wrong type.
inline std::string json_kind(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return "JSON null";
    case nlohmann::json::value_t::object:
      return "a JSON object";
    case nlohmann::json::value_t::array:
      return "a JSON array";
    case nlohmann::json::value_t::string:
      return "a JSON string";
    case nlohmann::json::value_t::boolean:
      return "a JSON boolean";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
      return "a JSON number";
    default:
      return "an unexpected JSON value";
  }
}

/// A scalar for a message: its JSON text; a container only by its kind (a dump of a deeply
/// nested untrusted value could be huge).
inline std::string json_brief(const nlohmann::json& j) {
  if (j.is_number() || j.is_boolean() || j.is_null()) return j.dump();
  if (j.is_string()) {
    const auto& s = j.get_ref<const std::string&>();
    return s.size() <= 64 ? j.dump() : "a long JSON string";
  }
  return json_kind(j);
}

/// The value of a JSON integer >= 0 (not a float, even an integral one), else nullopt.
inline std::optional<std::uint64_t> json_non_negative_integer(const nlohmann::json& j) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (v >= 0) return static_cast<std::uint64_t>(v);
  }
  return std::nullopt;
}

/// Parses untrusted JSON text with nlohmann-json, rejecting what nlohmann would silently accept:
/// a key repeated in one object (nlohmann keeps the last) and nesting deeper than `max_depth`.
/// `where` starts every message ("moe: file: header"); `top_level_noun` names a top-level key
/// in them ("tensor" for a safetensors header). Throws io_error.
inline nlohmann::json parse_untrusted_json(const char* begin, const char* end,
                                           const std::string& where, int max_depth,
                                           const char* top_level_noun) {
  // Keys seen in each open object, innermost last (hashed: a weight_map may hold 10^5 names);
  // the current top-level key names the entry in messages.
  std::vector<std::unordered_set<std::string>> open_keys;
  std::string top_key;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (depth > max_depth) {
      throw io_error(moe::detail::concat(where, " nests deeper than ", max_depth, " levels"));
    }
    if (event == E::object_start) {
      open_keys.emplace_back();
    } else if (event == E::object_end) {
      if (!open_keys.empty()) open_keys.pop_back();
    } else if (event == E::key && !open_keys.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_keys.back().insert(key).second) {
        if (open_keys.size() == 1) {
          throw io_error(
              moe::detail::concat(where, ": ", top_level_noun, " '", key, "' appears twice"));
        }
        throw io_error(
            moe::detail::concat(where, ": key '", key, "' appears twice in '", top_key, "'"));
      }
      if (open_keys.size() == 1) top_key = key;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(begin, end, callback, /*allow_exceptions=*/true);
  } catch (const nlohmann::json::exception& e) {
    throw io_error(moe::detail::concat(where, " is not valid JSON: ", e.what()));
  }
}

/// config.json value of `key`, or nullptr when absent or JSON null (HF writes "head_dim": null).
/// `text` with the literals Python's json.dumps writes for non-finite floats (Infinity,
/// -Infinity, NaN; HF config.json files carry them, e.g. Nemotron-H time_step_limit) replaced by
/// null outside strings, so a strict JSON parser reads the file. No MoE key takes such a value.
inline std::string python_literals_to_null(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      out += ch;
      if (ch == '\\' && i + 1 < text.size()) {
        out += text[++i];
      } else if (ch == '"') {
        in_string = false;
      }
      continue;
    }
    if (ch == '"') in_string = true;
    bool replaced = false;
    for (const char* lit : {"-Infinity", "Infinity", "NaN"}) {
      const std::size_t n = std::char_traits<char>::length(lit);
      if (text.compare(i, n, lit) == 0) {
        out += "null";
        i += n - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += ch;
  }
  return out;
}

inline const nlohmann::json* find_key(const nlohmann::json& j, const std::string& key) {
  const auto it = j.find(key);
  if (it != j.end()) return it->is_null() ? nullptr : &*it;
  // A dotted key reads nested objects (DBRX "ffn_config.moe_top_k").
  const std::size_t dot = key.find('.');
  if (dot == std::string::npos) return nullptr;
  const auto outer = j.find(key.substr(0, dot));
  if (outer == j.end() || !outer->is_object()) return nullptr;
  return find_key(*outer, key.substr(dot + 1));
}

}  // namespace moe::io::detail
