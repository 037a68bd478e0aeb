// LoraRows: the per-row LoRA delta of the fused graph as one ONNX Runtime CPU kernel.
//
// The standard-op form of one adapted projection is Gather A, Gather B, MatMul, MatMul, Add: five nodes of
// microseconds of work each, whose thread-pool wake-ups and executor overhead cost more than the
// arithmetic (bench/step_profile.py: 510 LoRA nodes, ~8.5 ms of a 46 ms SmolLM2-135M decode step at B=8).
// This kernel does the same in one node, reading each row's slot straight out of the bank (no gathered
// copy) and skipping base-model rows.
//
//   inputs   y        float [B, S, Y]      the base projection's output (q|k|v packed, or one projection)
//            x        float [B, S, K]      the projection's input
//            lora_ids int64 [B, 1]         adapter slot per row, 0 = base model (its bank slot is zero)
//            a_bank   float [M, K, R]      A^T of every (layer, slot), M = layers * slots (N slots a layer,
//                                          slot 0 the base model): the runtime picks N, the bank carries it
//            b_bank   float [M, R, O]      B^T * scaling of every (layer, slot)
//            lora_ranks int64 [N] or [N, P] optional: the rank of each slot (slot 0, the base, 0), or of each
//                                          (slot, adapted module) pair (graph8: P modules, this node's column
//                                          rank_column); row b then uses only the first rank columns of A /
//                                          rows of B (zero-padded past them), so its work follows its own rank,
//                                          not R, and a module its adapter does not touch (rank 0) costs nothing
//   attrs    layer         int             this node's decoder layer: its bank rows are layer * N ..
//            num_layers    int             layer * N + N - 1 with N = M / num_layers, read from the bank's
//                                          shape at run time (so the slot count is the runtime's choice)
//            bank_offset   int             instead of layer/num_layers (graphs compiled before them): this
//                                          layer's first bank row, fixed at compile time (layer * slots)
//            column_offset int             where the O delta columns start inside Y
//            rank_column   int             with a [N, P] lora_ranks: this node's module's column (graph8)
//   output   float [B, S, Y] = y, plus (x[b, s] @ a_bank[off + id_b]) @ b_bank[off + id_b] in the columns
//            column_offset .. column_offset + O
//
// The library also holds SwiGlu (swiglu.h), the MLP's activation over a packed gate|up projection.
//
// Built by `make native` into loraflow/native/liblora_rows.so against ONNX Runtime's C API headers;
// loraflow/native/__init__.py loads it. Errors are ORT_INVALID_ARGUMENT naming the input and the value.

// The API table comes from the loading runtime (RegisterCustomOps), so nothing links libonnxruntime.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "op_shapes.h"
#include "swiglu.h"

namespace {

constexpr const char* kDomain = "ai.loraflow";
// Multiply-adds from which one node splits its rows over ONNX Runtime's intra-op threads. Reading each
// row's slot of the banks is memory-bound (~31 us per node for 8 rows of SmolLM2-135M's r=8 q/k/v/o on one
// core); a second thread halves that when the pool's threads spin, but waking sleeping ones costs more,
// so without spinning only prefill-sized work (many tokens per row) is split.
constexpr int64_t kParallelMinSpinning = 16384;
constexpr int64_t kParallelMinSleeping = 1000000;

struct Task {
  const float* x;
  const int64_t* ids;
  const float* a_bank;
  const float* b_bank;
  float* out;
  const int64_t* ranks;  // [N] or [N, P] (row id's rank at ranks[id * rank_stride]) or nullptr (all R columns)
  int64_t rank_stride;
  int64_t S, K, R, O, Y, bank_offset, column_offset;
};

// out[off:off+O] += sum_r xa[r] * B[r, :] for one token: one pass over the output, vectorised over o.
template <int R>
inline void AddXaB(const float* __restrict xa, const float* __restrict Bm, float* __restrict ys, int64_t O) {
  for (int64_t o = 0; o < O; ++o) {
    float sum = ys[o];
    for (int r = 0; r < R; ++r) sum += xa[r] * Bm[r * O + o];
    ys[o] = sum;
  }
}

// One row b with a compile-time width R (the first R columns of A's rows, which are t.R long): tokens four
// at a time share each load of A's row k (four independent accumulators of R lanes), then each token's R
// values multiply B's first R rows in one pass over its output. A slot of rank < R (rounded up to the next
// compiled width) zeroes xa past its rank, so what its bank holds there adds nothing.
template <int R>
void RowDeltaFixed(const Task& t, size_t b, const float* __restrict A, const float* __restrict Bm, int64_t rank) {
  constexpr int64_t kTile = 4;
  const int64_t K = t.K, O = t.O, stride = t.R;
  if (t.S == 1) {  // a decode row: four partial sums over k instead of four tokens
    alignas(32) float part[kTile][R] = {};
    const float* __restrict xs = t.x + static_cast<int64_t>(b) * K;
    int64_t k = 0;
    for (; k + kTile <= K; k += kTile) {
      for (int64_t i = 0; i < kTile; ++i) {
        const float xk = xs[k + i];
        const float* __restrict ak = A + (k + i) * stride;
        for (int r = 0; r < R; ++r) part[i][r] += xk * ak[r];
      }
    }
    for (; k < K; ++k) {
      for (int r = 0; r < R; ++r) part[0][r] += xs[k] * A[k * stride + r];
    }
    alignas(32) float xa[R];
    for (int r = 0; r < R; ++r) xa[r] = r < rank ? (part[0][r] + part[1][r]) + (part[2][r] + part[3][r]) : 0.0f;
    AddXaB<R>(xa, Bm, t.out + static_cast<int64_t>(b) * t.Y + t.column_offset, O);
    return;
  }
  for (int64_t s0 = 0; s0 < t.S; s0 += kTile) {
    const int64_t n = std::min(kTile, t.S - s0);
    alignas(32) float xa[kTile][R] = {};
    const float* xs[kTile];
    for (int64_t i = 0; i < kTile; ++i) xs[i] = t.x + (static_cast<int64_t>(b) * t.S + s0 + std::min(i, n - 1)) * K;
    for (int64_t k = 0; k < K; ++k) {
      const float* __restrict ak = A + k * stride;
      const float x0 = xs[0][k], x1 = xs[1][k], x2 = xs[2][k], x3 = xs[3][k];
      for (int r = 0; r < R; ++r) {
        const float a = ak[r];
        xa[0][r] += x0 * a;
        xa[1][r] += x1 * a;
        xa[2][r] += x2 * a;
        xa[3][r] += x3 * a;
      }
    }
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t r = rank; r < R; ++r) xa[i][r] = 0.0f;
    }
    for (int64_t i = 0; i < n; ++i) {
      float* ys = t.out + (static_cast<int64_t>(b) * t.S + s0 + i) * t.Y + t.column_offset;
      AddXaB<R>(xa[i], Bm, ys, O);
    }
  }
}

// Any other rank: the same arithmetic with runtime loops over the first ``rank`` columns.
void RowDeltaAny(const Task& t, size_t b, const float* A, const float* Bm, int64_t rank) {
  std::vector<float> xa(static_cast<size_t>(rank));
  for (int64_t s = 0; s < t.S; ++s) {
    const float* xs = t.x + (static_cast<int64_t>(b) * t.S + s) * t.K;
    float* ys = t.out + (static_cast<int64_t>(b) * t.S + s) * t.Y + t.column_offset;
    std::fill(xa.begin(), xa.end(), 0.0f);
    for (int64_t k = 0; k < t.K; ++k) {
      const float xk = xs[k];
      const float* ak = A + k * t.R;
      for (int64_t r = 0; r < rank; ++r) xa[r] += xk * ak[r];
    }
    for (int64_t r = 0; r < rank; ++r) {
      const float c = xa[r];
      const float* br = Bm + r * t.O;
      for (int64_t o = 0; o < t.O; ++o) ys[o] += c * br[o];
    }
  }
}

// One row b: out[b, s, off:off+O] += (x[b, s] @ A) @ B with row b's slot of the banks.
void RowDelta(const Task& t, size_t b) {
  const int64_t id = t.ids[b];
  if (id == 0) return;  // the base model: slot 0 of every bank is zero
  const float* A = t.a_bank + (t.bank_offset + id) * t.K * t.R;  // [K, R]
  const float* Bm = t.b_bank + (t.bank_offset + id) * t.R * t.O;  // [R, O]
  // The slot's rank (columns past it are zero padding), else all R; padding adds zeros, so either way the
  // sums agree up to rounding (each width is its own compiled loop).
  const int64_t rank = t.ranks ? t.ranks[id * t.rank_stride] : t.R;
  if (rank == 0) return;  // an empty slot, or a module its adapter does not touch: nothing to add
  // The narrowest compiled width that holds the rank and fits in the bank's rows (R columns).
  if (rank <= 4 && t.R >= 4) return RowDeltaFixed<4>(t, b, A, Bm, rank);
  if (rank <= 8 && t.R >= 8) return RowDeltaFixed<8>(t, b, A, Bm, rank);
  if (rank <= 16 && t.R >= 16) return RowDeltaFixed<16>(t, b, A, Bm, rank);
  if (rank <= 32 && t.R >= 32) return RowDeltaFixed<32>(t, b, A, Bm, rank);
  if (rank <= 64 && t.R >= 64) return RowDeltaFixed<64>(t, b, A, Bm, rank);
  return RowDeltaAny(t, b, A, Bm, rank);
}

void RowDeltaThunk(void* data, size_t b) { RowDelta(*static_cast<const Task*>(data), b); }

[[noreturn]] void Fail(std::string message) { throw Ort::Exception(std::move(message), ORT_INVALID_ARGUMENT); }

using loraflow_native::FullyDescribed;
using loraflow_native::Shape;

// An int attribute that may be absent: false (and value untouched) when the node does not carry it.
bool OptionalAttribute(const OrtKernelInfo* info, const char* name, int64_t* value) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, value);
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

struct LoraRowsKernel {
  LoraRowsKernel(const OrtKernelInfo* info, int64_t parallel_min) : parallel_min_(parallel_min) {
    Ort::ConstKernelInfo ki(info);
    column_offset_ = ki.GetAttribute<int64_t>("column_offset");
    // graph6 on: layer + num_layers (the offset follows the bank's slot count); before: a fixed bank_offset.
    if (OptionalAttribute(info, "layer", &layer_)) {
      if (!OptionalAttribute(info, "num_layers", &num_layers_) || num_layers_ < 1 || layer_ < 0 ||
          layer_ >= num_layers_)
        Fail("LoraRows: attribute layer " + std::to_string(layer_) + " needs num_layers > layer, got " +
             std::to_string(num_layers_));
    } else {
      bank_offset_ = ki.GetAttribute<int64_t>("bank_offset");
    }
    if (OptionalAttribute(info, "rank_column", &rank_column_) && rank_column_ < 0)
      Fail("LoraRows: attribute rank_column " + std::to_string(rank_column_) + " is negative");
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    auto y = ctx.GetInput(0), x = ctx.GetInput(1), ids = ctx.GetInput(2);
    auto a = ctx.GetInput(3), bb = ctx.GetInput(4);
    const auto ys = y.GetTensorTypeAndShapeInfo().GetShape();
    const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const auto is = ids.GetTensorTypeAndShapeInfo().GetShape();
    const auto as = a.GetTensorTypeAndShapeInfo().GetShape();
    const auto bs = bb.GetTensorTypeAndShapeInfo().GetShape();
    if (ys.size() != 3 || xs.size() != 3 || as.size() != 3 || bs.size() != 3)
      Fail("LoraRows: y, x, a_bank and b_bank must be rank 3, got y " + Shape(ys) + ", x " + Shape(xs) +
           ", a_bank " + Shape(as) + ", b_bank " + Shape(bs));
    const int64_t B = ys[0], S = ys[1], Y = ys[2], K = xs[2], R = as[2], O = bs[2], M = as[0];
    if (xs[0] != B || xs[1] != S) Fail("LoraRows: x " + Shape(xs) + " does not match y " + Shape(ys));
    if (is.empty() || is[0] != B || ids.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(B))
      Fail("LoraRows: lora_ids " + Shape(is) + " is not [B, 1] for B=" + std::to_string(B));
    if (as[1] != K) Fail("LoraRows: a_bank " + Shape(as) + " does not take x's " + std::to_string(K) + " features");
    if (bs[0] != M || bs[1] != R) Fail("LoraRows: b_bank " + Shape(bs) + " does not match a_bank " + Shape(as));
    if (column_offset_ < 0 || column_offset_ + O > Y)
      Fail("LoraRows: column_offset " + std::to_string(column_offset_) + " + " + std::to_string(O) +
           " columns do not fit y's " + std::to_string(Y));
    const int64_t* id = ids.GetTensorData<int64_t>();
    int64_t bank_offset = bank_offset_;
    if (num_layers_ > 0) {  // N slots a layer, from the bank: [L*N, K, R]
      if (M % num_layers_ != 0)
        Fail("LoraRows: a_bank " + Shape(as) + " is not num_layers=" + std::to_string(num_layers_) +
             " layers of equal slots (" + std::to_string(M) + " rows)");
      const int64_t N = M / num_layers_;
      bank_offset = layer_ * N;
      for (int64_t b = 0; b < B; ++b) {
        if (id[b] < 0 || id[b] >= N)
          Fail("lora_ids: row " + std::to_string(b) + " has slot " + std::to_string(id[b]) + ", outside 0.." +
               std::to_string(N - 1) + " (the banks hold " + std::to_string(N) + " slots a layer)");
      }
    }
    if (num_layers_ == 0) {  // a fixed bank_offset: each row's bank row must lie inside the bank
      for (int64_t b = 0; b < B; ++b) {
        if (id[b] < 0 || bank_offset + id[b] >= M || bank_offset < 0)
          Fail("lora_ids: row " + std::to_string(b) + " has slot " + std::to_string(id[b]) + ", bank row " +
               std::to_string(bank_offset + id[b]) + " is outside 0.." + std::to_string(M - 1));
      }
    }
    // Optional lora_ranks [N] (a rank per slot) or [N, P] (per slot and module, this node's column
    // rank_column): absent (graphs compiled before it, or left unfed) every row uses all R columns.
    const int64_t* ranks = nullptr;
    int64_t rank_stride = 1;
    int64_t row_ranks = B * R;  // sum of the ranks the rows use (the work, with K + O per rank and token)
    if (ctx.GetInputCount() > 5) {
      auto rk = ctx.GetInput(5);
      if (static_cast<const OrtValue*>(rk) != nullptr) {
        const auto rs = rk.GetTensorTypeAndShapeInfo().GetShape();
        const int64_t N = rs.size() == 1 || rs.size() == 2 ? rs[0] : -1;
        if (N < 0) Fail("LoraRows: lora_ranks " + Shape(rs) + " is not [N] or [N, P]");
        ranks = rk.GetTensorData<int64_t>();
        if (rs.size() == 2) {  // [N, P]: this node's module is column rank_column
          if (rank_column_ < 0 || rank_column_ >= rs[1])
            Fail("LoraRows: lora_ranks " + Shape(rs) + " is per module but this node's rank_column is " +
                 (rank_column_ < 0 ? std::string("not set") : std::to_string(rank_column_)));
          rank_stride = rs[1];
          ranks += rank_column_;
        }
        row_ranks = 0;
        for (int64_t b = 0; b < B; ++b) {
          if (id[b] >= N)
            Fail("lora_ranks: row " + std::to_string(b) + " has slot " + std::to_string(id[b]) +
                 " but lora_ranks " + Shape(rs) + " covers slots 0.." + std::to_string(N - 1));
          const int64_t r = ranks[id[b] * rank_stride];
          if (r < 0 || r > R)
            Fail("lora_ranks: slot " + std::to_string(id[b]) + " has rank " + std::to_string(r) +
                 ", outside 0.." + std::to_string(R) + " (the banks' R)");
          row_ranks += r;
        }
      }
    }
    auto out = ctx.GetOutput(0, ys);
    float* o = out.GetTensorMutableData<float>();
    // ONNX Runtime may hand y's own buffer over as the output (GetMayInplace below: y feeds only this node):
    // then base rows and the columns outside the delta are already in place.
    const float* y_data = y.GetTensorData<float>();
    if (o != y_data) std::memcpy(o, y_data, static_cast<size_t>(B * S * Y) * sizeof(float));
    Task task{x.GetTensorData<float>(), id, a.GetTensorData<float>(), bb.GetTensorData<float>(), o, ranks,
              rank_stride, S, K, R, O, Y, bank_offset, column_offset_};
    // A decode step (a few thousand multiply-adds per row) runs inline: waking the pool costs more.
    // Prefill chunks (S tokens per row) are split by row over ONNX Runtime's intra-op threads.
    if (B > 1 && S * row_ranks * (K + O) >= parallel_min_) {
      ctx.ParallelFor(RowDeltaThunk, static_cast<size_t>(B), 0, &task);
    } else {
      for (int64_t b = 0; b < B; ++b) RowDelta(task, static_cast<size_t>(b));
    }
  }

 private:
  int64_t parallel_min_;
  int64_t bank_offset_ = 0;  // graphs before graph6 (num_layers_ == 0)
  int64_t layer_ = 0;
  int64_t num_layers_ = 0;  // > 0: the offset is layer_ * (bank rows / num_layers_)
  int64_t column_offset_ = 0;
  int64_t rank_column_ = -1;  // graph8: this node's module's column of a [N, P] lora_ranks
};

// The output may reuse y's buffer (input 0): each element of out is y's at the same index plus a delta computed
// from x and the banks only, so writing in place reads nothing it has overwritten. Saves a copy of [B, S, Y] a node
// (a prefill chunk's packed q|k|v went through three).
size_t ORT_API_CALL OutputMayReuseY(int** input_index, int** output_index) {
  *input_index = new int[1]{0};
  *output_index = new int[1]{0};
  return 1;
}

void ORT_API_CALL ReleaseReuseMap(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

struct LoraRowsOp : Ort::CustomOpBase<LoraRowsOp, LoraRowsKernel> {
  explicit LoraRowsOp(int64_t parallel_min) : parallel_min_(parallel_min) {
    OrtCustomOp::GetMayInplace = OutputMayReuseY;
    OrtCustomOp::ReleaseMayInplace = ReleaseReuseMap;
  }
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* info) const {
    return new LoraRowsKernel(info, parallel_min_);
  }
  const char* GetName() const { return "LoraRows"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 || index == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  // lora_ranks (input 5) is optional: a node with five inputs (graphs compiled before it) runs as before.
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 5 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                      : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  // The output is y with deltas added: y's shape, for the graph's shape inference, where the API can pass it
  // on unchanged (FullyDescribed; else it stays unknown).
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) {
    const Ort::ShapeInferContext::Shape& shape = ctx.GetInputShape(0);
    if (!FullyDescribed(shape)) return Ort::Status(nullptr);
    return ctx.SetOutputShape(0, shape);
  }

 private:
  int64_t parallel_min_;
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // Must outlive every session that uses them; which one a session gets follows its spinning setting
  // (set it on the SessionOptions before registering this library).
  static LoraRowsOp spinning_op(kParallelMinSpinning), sleeping_op(kParallelMinSleeping);
  // SwiGlu's elementwise work: a prefill chunk's tokens are worth a second thread only once they are many.
  static loraflow_native::SwiGluOp spinning_swiglu(1 << 15), sleeping_swiglu(1 << 19);
  OrtStatus* status = nullptr;
  try {
    const bool spinning =
        Ort::ConstSessionOptions(options).GetConfigEntryOrDefault("session.intra_op.allow_spinning", "1") == "1";
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(spinning ? &spinning_op : &sleeping_op);
    domain.Add(spinning ? &spinning_swiglu : &sleeping_swiglu);
    Ort::UnownedSessionOptions(options).Add(domain);
    domain.release();  // the session options keep the domain alive from here on
  } catch (const Ort::Exception& e) {
    status = Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return status;
}
