// Outputs that appear complete or not at all: written to ".NAME.PID.tmp" beside the target,
// every write, the flush, fsync and close checked, then renamed onto the target.  On any
// failure the temporary is removed and rstr::Error names the target and the fix (a full disk
// exits rstr-run non-zero with one line and leaves nothing behind).
#pragma once

#include <cstdio>
#include <filesystem>
#include <functional>

namespace rstr::io {

/// Calls `write` with a FILE* open on the temporary; it may write with stdio and throw.
void write_atomically(const std::filesystem::path& path, const std::function<void(std::FILE*)>& write);

}  // namespace rstr::io
