// See atomic_file.hpp.
#include "atomic_file.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "rstr/runtime.hpp"

namespace rstr::io {
namespace {

/// One line: the target, the system's reason and what to do (the same fixes as rstr._io).
std::string failure(const std::filesystem::path& path, int err) {
  std::string fix = "choose another location";
  if (err == ENOSPC || err == EDQUOT) fix = "free some space or choose another location";
  if (err == EFBIG) fix = "the file system refuses a file this large; choose another location";
  if (err == EROFS) fix = "the file system is read-only; choose another location";
  if (err == EACCES || err == EPERM) fix = "choose a location you can write to";
  if (err == ENOENT || err == ENOTDIR) fix = "its folder does not exist; create it or choose another location";
  return "cannot write " + path.string() + ": " + std::strerror(err) + "; " + fix;
}

}  // namespace

void write_atomically(const std::filesystem::path& path, const std::function<void(std::FILE*)>& write) {
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const std::filesystem::path tmp = dir / ("." + path.filename().string() + "." + std::to_string(::getpid()) + ".tmp");
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(failure(path, errno));
  try {
    write(f);
  } catch (...) {
    std::fclose(f);
    std::remove(tmp.c_str());
    throw;
  }
  int err = 0;
  if (std::ferror(f)) err = errno ? errno : EIO;
  if (!err && std::fflush(f) != 0) err = errno;
  if (!err && ::fsync(::fileno(f)) != 0) err = errno;
  if (std::fclose(f) != 0 && !err) err = errno;
  if (!err && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err) {
    std::remove(tmp.c_str());
    throw Error(failure(path, err));
  }
}

}  // namespace rstr::io
