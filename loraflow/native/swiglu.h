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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "op_shapes.h"

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace loraflow_native {

// exp(x) without a library call, so the loops below vectorise: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by
// its degree-6 Taylor polynomial (relative error below 2e-7 there), 2^n put straight into the exponent bits.
// n is rounded by adding 1.5 * 2^23 (the sum's low mantissa bits are then n: no float-to-int conversion), and
// ln2 is split in a part exact in float and the rest, so r keeps its bits. x is clamped to [-87, 87] so 2^n
// stays a normal float; silu only needs exp(-gate), and the clamp changes nothing a float result can hold.
__attribute__((always_inline)) inline float ExpClamped(float x) {
  constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
  x = std::min(std::max(x, -87.0f), 87.0f);
  const float shifted = x * 1.44269504088896341f + kRoundShift;
  const float n = shifted - kRoundShift;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
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

// Denormal results flushed to zero (FTZ) and denormal inputs read as zero (DAZ) while a token's loop runs; the
// caller's MXCSR is restored after. g++ vectorises the clamped exp by computing both sides of the clamp in every
// lane and blending: the side of gates below -87, gate * up / (1 + exp(87)), is a denormal for nearly every
// gate, and each vector of denormal results costs a microcode assist. That put SwiGlu at 5-8x ONNX Runtime's
// Split + QuickGelu + Mul (8 x 16384 floats: ~400 against ~50 us, 1B decode: 3.4 ms of a ~105 ms int4 step).
// Flushed, a real output changes only where it would have been a denormal itself (|silu(gate) * up| < 1.2e-38).
class DenormalsAreZero {
 public:
#if defined(__x86_64__)
  DenormalsAreZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~DenormalsAreZero() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;  // MXCSR bits 15 and 6
  unsigned saved_;
#endif
};

// One token: out[i] = gate[i] * up[i] / (1 + exp(-gate[i])).
LORAFLOW_SWIGLU_CLONES inline void SwiGluToken(const SwiGluTask& t, size_t token) {
  const DenormalsAreZero flushed;
  const float* __restrict gate = t.in + static_cast<int64_t>(token) * 2 * t.I;
  const float* __restrict up = gate + t.I;
  float* __restrict out = t.out + static_cast<int64_t>(token) * t.I;
  for (int64_t i = 0; i < t.I; ++i) out[i] = gate[i] * up[i] / (1.0f + ExpClamped(-gate[i]));
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

struct SwiGluOp : Ort::CustomOpBase<SwiGluOp, SwiGluKernel> {
  explicit SwiGluOp(int64_t parallel_min) : parallel_min_(parallel_min) {}
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* /*info*/) const {
    return new SwiGluKernel(parallel_min_);
  }
  const char* GetName() const { return "SwiGlu"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  // The output's shape for the graph's shape inference: the input's with the last dimension halved, so the
  // nodes behind it see a known rank. Only where every input dimension is a number or a named symbol: the
  // API shows an unnamed unknown dimension (and an input of unknown rank: rank 0) as -1, which it would
  // write back as a fixed -1; the output is then left unknown, as without this function.
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
    if (!FullyDescribed(shape) || !shape.back().IsInt()) return Ort::Status(nullptr);
    if (shape.back().AsInt() % 2 != 0)
      return Ort::Status(("SwiGlu: gate_up's last dimension " + std::to_string(shape.back().AsInt()) +
                          " is odd (gate | up needs an even one)").c_str(), ORT_INVALID_ARGUMENT);
    shape.back() = Ort::ShapeInferContext::SymbolicInteger(shape.back().AsInt() / 2);
    return ctx.SetOutputShape(0, shape);
  }

 private:
  int64_t parallel_min_;
};

}  // namespace loraflow_native
