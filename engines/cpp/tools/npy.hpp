// NumPy .npy files (format 1.0 written; 1.0, 2.0 and 3.0 read) holding little-endian,
// C-order float32 ('<f4') or int64 ('<i8') arrays -- the two dtypes of an rstr bundle.
#pragma once

#include <filesystem>

#include "rstr/runtime.hpp"

namespace rstr::npy {

/// Throws rstr::InputError naming the file and the problem (dtype, order, truncation).
Tensor read(const std::filesystem::path& path);

/// Writes atomically (atomic_file.hpp); throws rstr::Error naming the file and the fix when it cannot.
void write(const std::filesystem::path& path, const Tensor& tensor);

}  // namespace rstr::npy
