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

[[noreturn]] void Fail(std::string message) { throw Ort::Exception(std::move(message), ORT_INVALID_ARGUMENT); }

// Work is split into groups: up to kGroup tokens that use the same bank slot (a decode step's rows of one adapter,
// or four consecutive tokens of one prefill row). A group reads each row of A and of B once for all its tokens.
constexpr int kGroup = 4;

struct Group {
  int64_t id;  // the slot (> 0) and its rank in this node's module (> 0)
  int64_t rank;
  int n;       // tokens, 1..kGroup
  const float* x[kGroup];  // each token's [K] input
  float* y[kGroup];        // each token's output columns column_offset .. + O
};

// Vectors of W floats (GCC vector extensions: AVX with -march=native, two SSE halves on x86-64-v2).
// (A vector_size attribute on an alias template is dropped silently: the types are spelled out per width.)
template <int W>
struct VecOf;
template <>
struct VecOf<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct VecOf<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <int W>
using Vec = typename VecOf<W>::type;
static_assert(sizeof(Vec<8>) == 8 * sizeof(float) && sizeof(Vec<4>) == 4 * sizeof(float), "vector widths");

template <int W>
inline Vec<W> Load(const float* p) {
  Vec<W> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <int W>
inline void Store(float* p, Vec<W> v) { std::memcpy(p, &v, sizeof(v)); }

// One group with a compile-time width R (the first R columns of A's rows, which are t.R long) and N tokens:
//   xa[n] = x[n] @ A[:, :R]   (the R columns as R/W vectors; columns past the slot's rank zeroed afterwards)
//   y[n] += xa[n] @ B[:R, :]  (over r in order, vectorised over o; B's row r, vector o, loaded once for all N)
// Every token's sums run in the same order whatever N is, so a row's delta does not depend on which rows share
// its slot in a call.
// No contraction into FMAs here: g++ contracted the k loop's multiply-add for some N and not for others, so a
// row's bits depended on how many rows shared its slot (measured at width 4); the images' x86-64-v2 build has no
// FMA either. No auto-vectorising either: the vectors are written out above, and g++
// vectorised the loops around them as in-order reductions (strided gathers, one scalar add at a time).
template <int R, int N>
__attribute__((optimize("no-tree-vectorize", "fp-contract=off")))
void GroupDelta(const Task& t, const Group& g, const float* __restrict A, const float* __restrict Bm) {
  constexpr int W = R < 8 ? R : 8;
  constexpr int RV = R / W;
  const int64_t K = t.K, O = t.O, stride = t.R;
  // xa: four partial sums over k (k mod 4) per token, so four independent chains of adds are in flight even for
  // one token, then (p0 + p1) + (p2 + p3); A's row k is loaded once for the group's N tokens.
  constexpr int P = 4;
  Vec<W> part[N][P][RV];
  for (int n = 0; n < N; ++n)
    for (int p = 0; p < P; ++p)
      for (int j = 0; j < RV; ++j) part[n][p][j] = Vec<W>{};
  int64_t k = 0;
  for (; k + P <= K; k += P) {
    for (int p = 0; p < P; ++p) {
      Vec<W> a[RV];
      for (int j = 0; j < RV; ++j) a[j] = Load<W>(A + (k + p) * stride + j * W);
      for (int n = 0; n < N; ++n) {
        const float xk = g.x[n][k + p];
        for (int j = 0; j < RV; ++j) part[n][p][j] += xk * a[j];
      }
    }
  }
  for (; k < K; ++k) {
    for (int n = 0; n < N; ++n) {
      const float xk = g.x[n][k];
      for (int j = 0; j < RV; ++j) part[n][0][j] += xk * Load<W>(A + k * stride + j * W);
    }
  }
  alignas(64) float xa[N][R];
  for (int n = 0; n < N; ++n) {
    for (int j = 0; j < RV; ++j)
      Store<W>(xa[n] + j * W, (part[n][0][j] + part[n][1][j]) + (part[n][2][j] + part[n][3][j]));
    for (int r = static_cast<int>(g.rank); r < R; ++r) xa[n][r] = 0.0f;
  }
  // Two vectors of output columns at a time: each r then costs N broadcasts and two loads of B for 2N FMAs.
  constexpr int OW = 8;
  int64_t o = 0;
  for (; o + 2 * OW <= O; o += 2 * OW) {
    Vec<OW> lo[N], hi[N];
    for (int n = 0; n < N; ++n) {
      lo[n] = Load<OW>(g.y[n] + o);
      hi[n] = Load<OW>(g.y[n] + o + OW);
    }
    for (int r = 0; r < R; ++r) {
      const Vec<OW> b_lo = Load<OW>(Bm + r * O + o), b_hi = Load<OW>(Bm + r * O + o + OW);
      for (int n = 0; n < N; ++n) {
        lo[n] += xa[n][r] * b_lo;
        hi[n] += xa[n][r] * b_hi;
      }
    }
    for (int n = 0; n < N; ++n) {
      Store<OW>(g.y[n] + o, lo[n]);
      Store<OW>(g.y[n] + o + OW, hi[n]);
    }
  }
  for (; o + OW <= O; o += OW) {
    Vec<OW> sum[N];
    for (int n = 0; n < N; ++n) sum[n] = Load<OW>(g.y[n] + o);
    for (int r = 0; r < R; ++r) {
      const Vec<OW> b = Load<OW>(Bm + r * O + o);
      for (int n = 0; n < N; ++n) sum[n] += xa[n][r] * b;
    }
    for (int n = 0; n < N; ++n) Store<OW>(g.y[n] + o, sum[n]);
  }
  for (; o < O; ++o) {  // the last O % 8 columns, in the same order
    for (int n = 0; n < N; ++n) {
      float sum = g.y[n][o];
      for (int r = 0; r < R; ++r) sum += xa[n][r] * Bm[r * O + o];
      g.y[n][o] = sum;
    }
  }
}

// Tokens a group may hold at a compiled width (0: none, the runtime loop): N x R/W x 4 partial sums stay within 16
// vectors, so 4 tokens at widths 4 and 8, 2 at 16, 1 above.
constexpr int MaxTokens(int width) { return width <= 8 ? kGroup : (width == 16 ? 2 : 1); }

template <int R>
void GroupDeltaFixed(const Task& t, const Group& g, const float* A, const float* Bm) {
  switch (g.n) {
    case 1: return GroupDelta<R, 1>(t, g, A, Bm);
    case 2: if constexpr (MaxTokens(R) >= 2) return GroupDelta<R, 2>(t, g, A, Bm); break;
    case 3: if constexpr (MaxTokens(R) >= 3) return GroupDelta<R, 3>(t, g, A, Bm); break;
    case 4: if constexpr (MaxTokens(R) >= 4) return GroupDelta<R, 4>(t, g, A, Bm); break;
  }
  Fail("LoraRows: internal: a group of " + std::to_string(g.n) + " tokens at width " + std::to_string(R));
}

// Any other rank: the same arithmetic with runtime loops over the first ``rank`` columns, token by token.
void GroupDeltaAny(const Task& t, const Group& g, const float* A, const float* Bm) {
  std::vector<float> xa(static_cast<size_t>(g.rank));
  for (int n = 0; n < g.n; ++n) {
    std::fill(xa.begin(), xa.end(), 0.0f);
    for (int64_t k = 0; k < t.K; ++k) {
      const float xk = g.x[n][k];
      const float* ak = A + k * t.R;
      for (int64_t r = 0; r < g.rank; ++r) xa[r] += xk * ak[r];
    }
    for (int64_t o = 0; o < t.O; ++o) {
      float sum = g.y[n][o];
      for (int64_t r = 0; r < g.rank; ++r) sum += xa[r] * Bm[r * t.O + o];
      g.y[n][o] = sum;
    }
  }
}

// The narrowest compiled width that holds the group's rank and fits in the bank's rows (R columns); columns past
// the rank are zero padding, so any width that holds it gives the same sums up to rounding.
int CompiledWidth(int64_t rank, int64_t R) {
  for (int w : {4, 8, 16, 32, 64})
    if (rank <= w && R >= w) return w;
  return 0;
}

void GroupDeltaAt(const Task& t, const Group& g) {
  const float* A = t.a_bank + (t.bank_offset + g.id) * t.K * t.R;  // [K, R]
  const float* Bm = t.b_bank + (t.bank_offset + g.id) * t.R * t.O;  // [R, O]
  switch (CompiledWidth(g.rank, t.R)) {
    case 4: return GroupDeltaFixed<4>(t, g, A, Bm);
    case 8: return GroupDeltaFixed<8>(t, g, A, Bm);
    case 16: return GroupDeltaFixed<16>(t, g, A, Bm);
    case 32: return GroupDeltaFixed<32>(t, g, A, Bm);
    case 64: return GroupDeltaFixed<64>(t, g, A, Bm);
    default: return GroupDeltaAny(t, g, A, Bm);
  }
}

struct Work {
  const Task* task;
  const Group* groups;
};

void GroupThunk(void* data, size_t i) {
  const Work& w = *static_cast<const Work*>(data);
  GroupDeltaAt(*w.task, w.groups[i]);
}

// The groups of one call: rows on the base model or on a slot of rank 0 in this module are left out; a decode
// step (S = 1) puts rows of the same slot together (up to the width's token count), a prefill chunk takes each
// row's tokens four at a time.
std::vector<Group> Groups(const Task& t, int64_t B) {
  std::vector<Group> groups;
  auto rank_of = [&](int64_t id) { return t.ranks ? t.ranks[id * t.rank_stride] : t.R; };
  auto max_n = [&](int64_t rank) { return MaxTokens(CompiledWidth(rank, t.R)); };
  if (t.S == 1) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t id = t.ids[b], rank = id == 0 ? 0 : rank_of(id);
      if (rank == 0) continue;  // the base model, an empty slot, or a module this adapter does not touch
      int64_t at = static_cast<int64_t>(groups.size()) - 1;  // the slot's latest group: only it can have room
      while (at >= 0 && groups[at].id != id) --at;
      if (at < 0 || groups[at].n == max_n(rank)) {
        groups.push_back(Group{id, rank, 0, {}, {}});
        at = static_cast<int64_t>(groups.size()) - 1;
      }
      Group& g = groups[at];
      g.x[g.n] = t.x + b * t.K;
      g.y[g.n] = t.out + b * t.Y + t.column_offset;
      ++g.n;
    }
    return groups;
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t id = t.ids[b], rank = id == 0 ? 0 : rank_of(id);
    if (rank == 0) continue;
    const int n_max = max_n(rank);
    for (int64_t s0 = 0; s0 < t.S; s0 += n_max) {
      Group g{id, rank, static_cast<int>(std::min<int64_t>(n_max, t.S - s0)), {}, {}};
      for (int n = 0; n < g.n; ++n) {
        g.x[n] = t.x + (b * t.S + s0 + n) * t.K;
        g.y[n] = t.out + (b * t.S + s0 + n) * t.Y + t.column_offset;
      }
      groups.push_back(g);
    }
  }
  return groups;
}

using loraflow_native::InferredShape;
using loraflow_native::ReadInputShape;
using loraflow_native::WriteOutputShape;
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
    const std::vector<Group> groups = Groups(task, B);
    // A decode step (a few thousand multiply-adds per row) runs inline: waking the pool costs more.
    // Prefill chunks (S tokens per row) and large decode steps are split by group over ONNX Runtime's threads.
    if (groups.size() > 1 && S * row_ranks * (K + O) >= parallel_min_) {
      Work work{&task, groups.data()};
      ctx.ParallelFor(GroupThunk, groups.size(), 0, &work);
    } else {
      for (const Group& g : groups) GroupDeltaAt(task, g);
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

// The output is y with deltas added: y's shape, for the graph's shape inference (and so for the reuse below,
// which ONNX Runtime grants only where it knows both shapes are the same).
OrtStatus* ORT_API_CALL OutputShapeIsY(const OrtCustomOp* /*op*/, OrtShapeInferContext* ctx) {
  try {
    InferredShape shape;
    if (!ReadInputShape(ctx, 0, &shape)) return nullptr;
    return WriteOutputShape(ctx, 0, shape);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}

// The output may reuse y's buffer (input 0): each element of out is y's at the same index plus a delta computed
// from x and the banks only, so writing in place reads nothing it has overwritten; then the copy of [B, S, Y] is
// skipped (a node whose y feeds another node too still gets a buffer of its own).
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
    OrtCustomOp::InferOutputShapeFn = OutputShapeIsY;
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
