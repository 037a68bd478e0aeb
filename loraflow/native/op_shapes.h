// Shapes for loraflow's ONNX Runtime kernels (lora_rows.cc, swiglu.h): error text and shape inference.

#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace loraflow_native {

// "[d0, d1, ...]", for error messages that name a tensor's shape.
inline std::string Shape(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Whether shape inference may pass a shape on: a known rank, each dimension a number or a named symbol (the
// API shows an unnamed unknown dimension, and an input of unknown rank as rank 0, which it would write back
// as a fixed -1).
inline bool FullyDescribed(const Ort::ShapeInferContext::Shape& shape) {
  if (shape.empty()) return false;
  for (const auto& dim : shape) {
    if (dim.IsInt() && dim.AsInt() < 0) return false;
  }
  return true;
}

}  // namespace loraflow_native
