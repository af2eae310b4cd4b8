// moe/io: a Hugging Face checkpoint directory, single-file or sharded.
//
//   DIR/model.safetensors                      one file, or
//   DIR/model.safetensors.index.json           {"weight_map": {"tensor name": "shard file", ...}}
//   DIR/model-00001-of-00002.safetensors ...   the shards it names
#pragma once

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moe/error.hpp"
#include "moe/io/json.hpp"
#include "moe/io/safetensors_reader.hpp"
#include "moe/tensor.hpp"

namespace moe::io {

/// Parses the text of a model.safetensors.index.json: returns its "weight_map" (tensor name ->
/// shard file name). Other top-level keys ("metadata") are ignored. `index_name` names the file
/// in messages. Throws io_error when the text is not a JSON object (or repeats a key), has no
/// "weight_map" object, maps a name to a non-string, or names a shard that is not a plain file
/// name in the same directory (empty, ".", "..", or containing '/' or '\\').
inline std::map<std::string, std::string> parse_weight_map(const std::string& text,
                                                           const std::string& index_name) {
  const std::string where = "moe: " + index_name;
  const nlohmann::json index = detail::parse_untrusted_json(text.data(), text.data() + text.size(),
                                                            where, /*max_depth=*/16, "key");
  if (!index.is_object()) {
    throw io_error(where + ": index is " + detail::json_kind(index) + ", expected an object");
  }
  const auto it = index.find("weight_map");
  if (it == index.end()) throw io_error(where + ": index has no 'weight_map'");
  if (!it->is_object()) {
    throw io_error(where + ": 'weight_map' is " + detail::json_kind(*it) +
                   ", expected an object of tensor name -> shard file");
  }
  std::map<std::string, std::string> out;
  for (const auto& [name, shard] : it->items()) {
    if (!shard.is_string()) {
      throw io_error(where + ": 'weight_map' entry of '" + name + "' is " +
                     detail::json_kind(shard) + ", expected a shard file name");
    }
    const auto& file = shard.get_ref<const std::string&>();
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\\') != std::string::npos || file.find('\0') != std::string::npos) {
      throw io_error(where + ": 'weight_map' entry of '" + name + "' is " +
                     detail::json_brief(shard) + ", expected a file name in the same directory");
    }
    out.emplace(name, file);
  }
  return out;
}

/// The tensors of a checkpoint directory, found by name across shards. Every shard is mapped and
/// validated once, at open_directory; afterwards the object is immutable (const members are
/// thread-safe). Move-only; references returned by file_of() and views from map_matrix() live
/// as long as the Checkpoint, or as long as a share_file() pointer to their file.
class Checkpoint {
 public:
  /// Opens DIR/model.safetensors.index.json when it exists, else DIR/model.safetensors.
  /// Throws io_error when neither exists, when the index is malformed (see parse_weight_map),
  /// when a shard is missing or malformed, or when a tensor listed in the index is absent from
  /// its shard (the message names the index file).
  static Checkpoint open_directory(const std::string& dir) {
    namespace fs = std::filesystem;
    Checkpoint c;
    c.dir_ = dir;
    const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
    const fs::path single_path = fs::path(dir) / "model.safetensors";
    std::error_code ec;
    if (fs::is_regular_file(index_path, ec)) {
      const std::string index_name = index_path.string();
      std::ifstream in(index_path, std::ios::binary);
      if (!in) throw io_error("moe: " + index_name + ": cannot open");
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      if (in.bad()) throw io_error("moe: " + index_name + ": read failed");
      const auto weight_map = parse_weight_map(text, index_name);
      std::map<std::string, std::size_t> shard_ids;  // shard file -> index in files_
      for (const auto& [name, shard] : weight_map) {
        auto found = shard_ids.find(shard);
        if (found == shard_ids.end()) {
          const fs::path shard_path = fs::path(dir) / shard;
          if (!fs::is_regular_file(shard_path, ec)) {
            throw io_error("moe: " + index_name + ": shard '" + shard + "' of tensor '" + name +
                           "' does not exist");
          }
          c.files_.push_back(
              std::make_shared<const SafetensorsFile>(SafetensorsFile::open(shard_path.string())));
          found = shard_ids.emplace(shard, c.files_.size() - 1).first;
        }
        if (!c.files_[found->second]->contains(name)) {
          throw io_error("moe: " + index_name + ": tensor '" + name + "' is listed in shard '" +
                         shard + "', which does not contain it");
        }
        c.where_.emplace(name, found->second);
      }
      return c;
    }
    if (fs::is_regular_file(single_path, ec)) {
      c.files_.push_back(
          std::make_shared<const SafetensorsFile>(SafetensorsFile::open(single_path.string())));
      for (const auto& name : c.files_[0]->names()) c.where_.emplace(name, 0);
      return c;
    }
    throw io_error("moe: " + dir +
                   ": neither model.safetensors.index.json nor model.safetensors exists");
  }

  /// The directory given to open_directory.
  const std::string& directory() const { return dir_; }

  /// Every tensor name, sorted (for an index: the names its weight_map lists).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(where_.size());
    for (const auto& kv : where_) out.push_back(kv.first);
    return out;
  }

  /// Number of distinct files (1 without an index).
  std::size_t num_files() const { return files_.size(); }

  /// True when `name` is in the checkpoint (for an index: listed in its weight_map).
  bool contains(const std::string& name) const { return where_.count(name) != 0; }

  /// The file holding `name`. Throws io_error "moe: <dir>: no tensor named 'x'".
  const SafetensorsFile& file_of(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) {
      throw io_error("moe: " + dir_ + ": no tensor named '" + name + "'");
    }
    return *files_[it->second];
  }

  /// The file holding `name`, shared: a view into its mapping stays valid as long as the
  /// returned pointer (or a copy) lives, even after this Checkpoint is gone. Throws as file_of.
  std::shared_ptr<const SafetensorsFile> share_file(const std::string& name) const {
    file_of(name);  // throws for an unknown name
    return files_[where_.find(name)->second];
  }

  /// See SafetensorsFile::info; throws io_error for an unknown name.
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }

  /// See SafetensorsFile::read_matrix ([1 x n] for 1-D, [prod(leading) x last] for rank > 2).
  template <class T>
  RowMatrix<T> read_matrix(const std::string& name) const {
    return file_of(name).template read_matrix<T>(name);
  }

  /// See SafetensorsFile::read_vector (flattened, any rank).
  template <class T>
  std::vector<T> read_vector(const std::string& name) const {
    return file_of(name).template read_vector<T>(name);
  }

  /// See SafetensorsFile::map_matrix (zero-copy; exact dtype only; valid while *this lives).
  template <class T>
  ConstMap<T> map_matrix(const std::string& name) const {
    return file_of(name).template map_matrix<T>(name);
  }

 private:
  Checkpoint() = default;

  std::string dir_;
  // Shared: stable addresses across moves, and a file outlives the Checkpoint while a view of
  // its mapping (share_file) is held.
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, std::size_t> where_;             // tensor name -> index in files_
};

}  // namespace moe::io
