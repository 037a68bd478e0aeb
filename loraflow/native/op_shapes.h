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

// A tensor's shape as graph shape inference knows it: each dimension a number (symbol "") or a named symbol
// (number -1).
struct InferredShape {
  std::vector<int64_t> dims;
  std::vector<std::string> symbols;
};

// Input `index`'s shape, or false where inference cannot pass it on: an unknown rank (the API shows it as
// rank 0) or an unnamed unknown dimension (-1 without a symbol, which written back would be a fixed -1).
inline bool ReadInputShape(OrtShapeInferContext* ctx, size_t index, InferredShape* shape) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(ctx, index, &info));
  size_t rank = 0;
  Ort::ThrowOnError(api.GetDimensionsCount(info, &rank));
  if (rank == 0) return false;
  shape->dims.assign(rank, 0);
  std::vector<const char*> symbols(rank, nullptr);
  Ort::ThrowOnError(api.GetDimensions(info, shape->dims.data(), rank));
  Ort::ThrowOnError(api.GetSymbolicDimensions(info, symbols.data(), rank));
  shape->symbols.assign(rank, "");
  for (size_t i = 0; i < rank; ++i) {
    if (symbols[i] != nullptr && symbols[i][0] != '\0') {
      shape->symbols[i] = symbols[i];
      shape->dims[i] = -1;
    } else if (shape->dims[i] < 0) {
      return false;
    }
  }
  return true;
}

// Output `index` is float with `shape`. Through the C API rather than the 1.21 headers' C++ SetOutputShape,
// which marks a named dimension -2: ONNX Runtime 1.32 refuses that ("dim_values must be -1 (symbolic
// dimension) or larger"), so the output of every node fed symbolic B and S stayed unknown, every node
// behind it saw unknown shapes, and the allocation planner could not let LoraRows' output reuse y's buffer
// (it compares the two shapes' dimensions, numbers or names).
inline OrtStatus* WriteOutputShape(OrtShapeInferContext* ctx, size_t index, const InferredShape& shape) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatus* status = api.CreateTensorTypeAndShapeInfo(&info);
  std::vector<const char*> symbols;
  for (const std::string& s : shape.symbols) symbols.push_back(s.c_str());
  if (status == nullptr) status = api.SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (status == nullptr) status = api.SetDimensions(info, shape.dims.data(), shape.dims.size());
  if (status == nullptr) status = api.SetSymbolicDimensions(info, symbols.data(), symbols.size());
  if (status == nullptr) status = api.ShapeInferContext_SetOutputTypeShape(ctx, index, info);
  if (info != nullptr) api.ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

}  // namespace loraflow_native
