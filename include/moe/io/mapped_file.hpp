// moe/io: the bytes of a checkpoint file, memory-mapped read-only or held in memory.
//
// Readers of binary formats (GGUF) parse and validate these bytes; the object owns the mapping
// (or the buffer), so pointers into data() live as long as it does.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "moe/error.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe::io {

/// A file's bytes: mapped read-only with mmap (open) or owned in memory (from_buffer).
/// Move-only; immutable after construction, so const members may be called from many threads.
/// If another process truncates a mapped file, reads fault (SIGBUS): treat model files as
/// read-only while they are open.
class MappedFile {
 public:
  /// Maps `path` read-only. An empty file gives size() == 0 and data() == nullptr.
  /// Throws io_error "moe: <path>: cannot open: <reason>", "...: not a regular file" or
  /// "...: cannot map N bytes: <reason>".
  static MappedFile open(const std::string& path) {
    MappedFile f;
    f.name_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      throw io_error(moe::detail::concat("moe: ", path, ": cannot open: ", std::strerror(errno)));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error(moe::detail::concat("moe: ", path, ": not a regular file"));
    }
    f.size_ = static_cast<std::size_t>(st.st_size);
    if (f.size_ > 0) {
      void* p = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw io_error(moe::detail::concat("moe: ", path, ": cannot map ", f.size_,
                                           " bytes: ", std::strerror(err)));
      }
      f.mapping_ = p;
      f.bytes_ = static_cast<const unsigned char*>(p);
    }
    ::close(fd);  // the mapping keeps the file alive
    return f;
  }

  /// Takes ownership of in-memory bytes (tests, fuzzing); `name` stands for the path in messages.
  static MappedFile from_buffer(std::vector<unsigned char> bytes, std::string name) {
    MappedFile f;
    f.name_ = std::move(name);
    f.buffer_ = std::move(bytes);
    f.bytes_ = f.buffer_.empty() ? nullptr : f.buffer_.data();
    f.size_ = f.buffer_.size();
    return f;
  }

  MappedFile(MappedFile&& other) noexcept { swap(other); }
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      MappedFile tmp(std::move(other));
      swap(tmp);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (mapping_ != nullptr) ::munmap(mapping_, size_);
  }

  /// The path given to open(), or the name given to from_buffer().
  const std::string& name() const { return name_; }
  /// First byte (nullptr for an empty file). Page-aligned when mapped.
  const unsigned char* data() const { return bytes_; }
  /// Byte count.
  std::size_t size() const { return size_; }
  /// True when the bytes are a mapping (open()), false when held in memory (from_buffer()).
  bool mapped() const { return mapping_ != nullptr; }

  /// Unmaps from this process the whole pages inside bytes [offset, offset + n) (madvise
  /// MADV_DONTNEED): they stay in the page cache, and a later read (a view, say) faults them back
  /// in with the same bytes, so this is only about what RSS counts. Readers call it after
  /// converting a range into memory of their own: without it a Mixtral-8x7B-shaped checkpoint
  /// (5.6 GB of bf16 experts) quantised to q4 on load peaked at 9.4 GB RSS for 1.6 GB of q4
  /// experts, the source pages still counted. No-op for in-memory bytes; thread-safe.
  void release(std::size_t offset, std::size_t n) const {
    if (mapping_ == nullptr || n == 0 || offset >= size_) return;
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t begin = (offset + page - 1) / page * page;
    const std::size_t end = (n > size_ - offset ? size_ : offset + n) / page * page;
    if (end > begin) {
      (void)::madvise(static_cast<char*>(mapping_) + begin, end - begin, MADV_DONTNEED);
    }
  }

 private:
  MappedFile() = default;

  void swap(MappedFile& o) noexcept {
    std::swap(name_, o.name_);
    std::swap(buffer_, o.buffer_);
    std::swap(mapping_, o.mapping_);
    std::swap(bytes_, o.bytes_);
    std::swap(size_, o.size_);
  }

  std::string name_;
  std::vector<unsigned char> buffer_;
  void* mapping_ = nullptr;
  const unsigned char* bytes_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace moe::io
