// SwiGlu: the SwiGLU MLP's activation over a packed gate|up projection as one ONNX Runtime CPU kernel.
//
// The standard-op form is Split, Sigmoid, Mul, Mul (ONNX Runtime fuses the middle two into QuickGelu):
// three kernels and a copy of both halves for a few thousand elements per row (bench/step_profile.py,
// SmolLM2-135M decode at B=8: the Split alone ~0.5 ms of a ~35 ms step, the fused pair ~0.6 ms more).
// This kernel reads the packed projection once and writes the product.
//
//   input   gate_up  float [B, S, 2I]   gate in columns 0..I-1, up in I..2I-1 (the packed gate|up projection)
//   output  float [B, S, I] = silu(gate) * up = gate * up / (1 + exp(-gate))
//
// Included by lora_rows.cc, which registers it in the ai.loraflow domain beside LoraRows.

#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "op_shapes.h"

namespace loraflow_native {

// Eight floats (GCC vector extensions: one AVX register, or two SSE halves in the x86-64-v2 build's default clone).
typedef float SwiGluVec __attribute__((vector_size(32)));
typedef int32_t SwiGluInts __attribute__((vector_size(32)));
constexpr int kSwiGluWidth = 8;

// exp(x) of eight lanes without a library call: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial (relative error below 2e-7 there), 2^n put straight into the exponent bits. n is rounded by adding
// 1.5 * 2^23 (the sum's low mantissa bits are then n: no float-to-int conversion), and ln2 is split in a part exact
// in float and the rest, so r keeps its bits. x is clamped to [-87, 87] so 2^n stays a normal float; silu only needs
// exp(-gate), and the clamp changes nothing a float result can hold.
// Written on vectors, the clamp is two blends. Written per float (as it was), g++ turned the clamp into three cases
// and, vectorising, evaluated the x = 87 case, gate * up / (1 + e^87), in every lane and blended it away: a
// denormal quotient in nearly every lane, each a microcode assist (8 x 1536 elements took 85-97 us instead of 5).
__attribute__((always_inline)) inline SwiGluVec ExpClamped(SwiGluVec x) {
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
  const SwiGluVec lo = SwiGluVec{} - 87.0f, hi = SwiGluVec{} + 87.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const SwiGluVec shifted = x * 1.44269504088896341f + kRoundShift;
  const SwiGluVec n = shifted - kRoundShift;
  const SwiGluVec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  SwiGluVec p = SwiGluVec{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  SwiGluInts bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n
  SwiGluVec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct SwiGluTask {
  const float* in;  // [T, 2I]
  float* out;       // [T, I]
  int64_t I;
};

// A library built for a baseline without AVX2 (the images: NATIVE_MARCH=x86-64-v2) also carries an
// x86-64-v3 clone of the token loop, picked at load time where the CPU has it (SSE alone ran it ~3x slower
// than ONNX Runtime's own AVX2 kernels). A build for the host's own -march needs none (and could not inline
// ExpClamped, compiled for more than x86-64-v3, into one).
#if defined(__x86_64__) && !defined(__AVX2__)
#define LORAFLOW_SWIGLU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LORAFLOW_SWIGLU_CLONES
#endif

// One token: out[i] = gate[i] * up[i] / (1 + exp(-gate[i])), eight columns at a time (the last I % 8 through a
// zero-padded vector: 0 * 0 / (1 + 1) in the unused lanes).
LORAFLOW_SWIGLU_CLONES inline void SwiGluToken(const SwiGluTask& t, size_t token) {
  const float* gate = t.in + static_cast<int64_t>(token) * 2 * t.I;
  const float* up = gate + t.I;
  float* out = t.out + static_cast<int64_t>(token) * t.I;
  int64_t i = 0;
  for (; i + kSwiGluWidth <= t.I; i += kSwiGluWidth) {
    SwiGluVec g, u;
    std::memcpy(&g, gate + i, sizeof g);
    std::memcpy(&u, up + i, sizeof u);
    const SwiGluVec o = g * u / (1.0f + ExpClamped(-g));
    std::memcpy(out + i, &o, sizeof o);
  }
  if (i < t.I) {
    const size_t rest = static_cast<size_t>(t.I - i) * sizeof(float);
    SwiGluVec g{}, u{};
    std::memcpy(&g, gate + i, rest);
    std::memcpy(&u, up + i, rest);
    const SwiGluVec o = g * u / (1.0f + ExpClamped(-g));
    std::memcpy(out + i, &o, rest);
  }
}

inline void SwiGluThunk(void* data, size_t token) { SwiGluToken(*static_cast<const SwiGluTask*>(data), token); }

struct SwiGluKernel {
  explicit SwiGluKernel(int64_t parallel_min) : parallel_min_(parallel_min) {}

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    auto in = ctx.GetInput(0);
    const auto shape = in.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() % 2 != 0) {
      throw Ort::Exception("SwiGlu: gate_up " + Shape(shape) + " needs an even last dimension (gate | up)",
                           ORT_INVALID_ARGUMENT);
    }
    std::vector<int64_t> out_shape(shape);
    out_shape.back() /= 2;
    int64_t tokens = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) tokens *= shape[i];
    auto out = ctx.GetOutput(0, out_shape);
    SwiGluTask task{in.GetTensorData<float>(), out.GetTensorMutableData<float>(), out_shape.back()};
    // A decode step's few rows run inline (waking the pool costs more than the arithmetic); prefill-sized
    // work is split by token over ONNX Runtime's intra-op threads.
    if (tokens > 1 && tokens * task.I >= parallel_min_) {
      ctx.ParallelFor(SwiGluThunk, static_cast<size_t>(tokens), 0, &task);
    } else {
      for (int64_t t = 0; t < tokens; ++t) SwiGluToken(task, static_cast<size_t>(t));
    }
  }

 private:
  int64_t parallel_min_;
};

// The output's shape for the graph's shape inference: the input's with the last dimension halved, so the nodes
// behind it see its shape (op_shapes.h: left unknown where the input's is).
inline OrtStatus* ORT_API_CALL OutputShapeIsHalfOfInput(const OrtCustomOp* /*op*/, OrtShapeInferContext* ctx) {
  try {
    InferredShape shape;
    if (!ReadInputShape(ctx, 0, &shape) || shape.dims.back() < 0) return nullptr;
    if (shape.dims.back() % 2 != 0)
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT,
                                        ("SwiGlu: gate_up's last dimension " + std::to_string(shape.dims.back()) +
                                         " is odd (gate | up needs an even one)").c_str());
    shape.dims.back() /= 2;
    return WriteOutputShape(ctx, 0, shape);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}

struct SwiGluOp : Ort::CustomOpBase<SwiGluOp, SwiGluKernel> {
  explicit SwiGluOp(int64_t parallel_min) : parallel_min_(parallel_min) {
    OrtCustomOp::InferOutputShapeFn = OutputShapeIsHalfOfInput;
  }
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/) const {
    return new SwiGluKernel(parallel_min_);
  }
  const char* GetName() const { return "SwiGlu"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  int64_t parallel_min_;
};

}  // namespace loraflow_native
