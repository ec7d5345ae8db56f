// The CUDA C dialect of kernels/, mapped onto host C++ (C++17, g++ or clang++)
// so the kiln CUDA emulator can compile those files unmodified.
//
// Each CUDA thread runs as a stackful coroutine scheduled from Rust. The
// calls that make threads meet — __syncthreads, __syncwarp, shuffles and
// votes — go through `kiln_emu_runtime`, a table of Rust callbacks installed
// when the module is loaded, and suspend the calling thread until its
// partners arrive. Everything else is plain host code: device pointers are
// host addresses, atomics are ordinary read-modify-writes (threads only
// switch at those calls, so nothing can interleave inside one).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// ---- keywords -----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// The emulator reads the bound from the source text (see the generated
// kernel table); here it only has to disappear.
#define __launch_bounds__(...)
// Static shared memory: one copy per module, in its own section so the
// emulator can poison it before every block (blocks run one at a time).
#define __shared__ static __attribute__((section("kiln_shared"), aligned(16)))

// ---- built-in variables ---------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

struct kiln_emu_thread_state {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    // Racecheck: a new epoch starts with every block and every released
    // __syncthreads; a warp's epoch moves on with every warp operation it
    // completes. Accesses in different epochs are ordered.
    unsigned epoch;
    unsigned warp_epoch[32];
    int racecheck;
};

// Written by the scheduler before it resumes a thread.
extern "C" kiln_emu_thread_state kiln_emu_state;

#define threadIdx (kiln_emu_state.thread_idx)
#define blockIdx (kiln_emu_state.block_idx)
#define blockDim (kiln_emu_state.block_dim)
#define gridDim (kiln_emu_state.grid_dim)
#define warpSize 32

// ---- the Rust side --------------------------------------------------------
enum kiln_emu_warp_op : int {
    KILN_EMU_SHFL_IDX = 0,
    KILN_EMU_SHFL_UP = 1,
    KILN_EMU_SHFL_DOWN = 2,
    KILN_EMU_SHFL_XOR = 3,
    KILN_EMU_VOTE_BALLOT = 4,
    KILN_EMU_VOTE_ANY = 5,
    KILN_EMU_VOTE_ALL = 6,
    KILN_EMU_SYNCWARP = 7,
};

struct kiln_emu_runtime {
    void (*syncthreads)(const char* file, int line);
    // A warp-level rendezvous of the lanes in `mask`: returns the value this
    // lane receives (shuffles) or the vote's result.
    uint64_t (*warp_op)(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
    // Stops the calling thread's kernel with an error; never returns.
    void (*fault)(const char* message);
};

extern "C" kiln_emu_runtime kiln_emu_runtime_table;

// A compiler barrier: memory written before a rendezvous is written to
// memory (and read again after it), so other threads see it.
#define KILN_EMU_MEMORY_BARRIER() __asm__ __volatile__("" ::: "memory")

#define __syncthreads()                                             \
    do {                                                            \
        KILN_EMU_MEMORY_BARRIER();                                  \
        kiln_emu_runtime_table.syncthreads(__FILE__, __LINE__);     \
        KILN_EMU_MEMORY_BARRIER();                                  \
    } while (0)

namespace kiln_emu {

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move values of up to 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

inline uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    KILN_EMU_MEMORY_BARRIER();
    uint64_t result = kiln_emu_runtime_table.warp_op(op, mask, value, arg, width, file, line);
    KILN_EMU_MEMORY_BARRIER();
    return result;
}

template <typename T>
inline T shuffle(int op, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
    return from_bits<T>(warp_op(op, mask, to_bits(v), arg, width, file, line));
}

// __syncwarp() and __syncwarp(mask) from one macro: the call site is
// captured first, the optional mask is the call's argument.
struct SyncWarpAt {
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const { warp_op(KILN_EMU_SYNCWARP, mask, 0, 0, 32, file, line); }
};

}  // namespace kiln_emu

#define __shfl_sync(...) ::kiln_emu::shuffle(KILN_EMU_SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::kiln_emu::shuffle(KILN_EMU_SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::kiln_emu::shuffle(KILN_EMU_SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::kiln_emu::shuffle(KILN_EMU_SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, predicate) \
    ((unsigned)::kiln_emu::warp_op(KILN_EMU_VOTE_BALLOT, (mask), (predicate) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, predicate) \
    ((int)::kiln_emu::warp_op(KILN_EMU_VOTE_ANY, (mask), (predicate) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, predicate) \
    ((int)::kiln_emu::warp_op(KILN_EMU_VOTE_ALL, (mask), (predicate) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __syncwarp(...) (::kiln_emu::SyncWarpAt{__FILE__, __LINE__}(__VA_ARGS__))

// ---- atomics ----------------------------------------------------------------
// Threads switch only at rendezvous calls, so a read-modify-write is atomic.
// Not instrumented for racecheck: concurrent atomics are not a race.
#define KILN_EMU_NO_RACECHECK __attribute__((no_sanitize_thread))
#define KILN_EMU_ATOMIC(name, updated)             \
    template <typename T>                          \
    KILN_EMU_NO_RACECHECK __device__ inline T name(T* address, T value) { \
        T old = *address;                          \
        *address = (updated);                      \
        return old;                                \
    }
KILN_EMU_ATOMIC(atomicAdd, old + value)
KILN_EMU_ATOMIC(atomicSub, old - value)
KILN_EMU_ATOMIC(atomicMax, old > value ? old : value)
KILN_EMU_ATOMIC(atomicMin, old < value ? old : value)
KILN_EMU_ATOMIC(atomicOr, old | value)
KILN_EMU_ATOMIC(atomicAnd, old & value)
KILN_EMU_ATOMIC(atomicExch, value)
template <typename T>
KILN_EMU_NO_RACECHECK __device__ inline T atomicCAS(T* address, T compare, T value) {
    T old = *address;
    if (old == compare) *address = value;
    return old;
}
__device__ inline void __threadfence() { KILN_EMU_MEMORY_BARRIER(); }
__device__ inline void __threadfence_block() { KILN_EMU_MEMORY_BARRIER(); }

// ---- vector types -----------------------------------------------------------
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) int2 {
    int x, y;
};
struct __attribute__((aligned(16))) int4 {
    int x, y, z, w;
};
__device__ inline float2 make_float2(float x, float y) { return float2{x, y}; }
__device__ inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
__device__ inline int2 make_int2(int x, int y) { return int2{x, y}; }
__device__ inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ---- bit casts and intrinsics -----------------------------------------------
__device__ inline float __int_as_float(int v) { return kiln_emu::from_bits<float>((uint32_t)v); }
__device__ inline int __float_as_int(float v) { return (int)(uint32_t)kiln_emu::to_bits(v); }
__device__ inline float __uint_as_float(unsigned v) { return kiln_emu::from_bits<float>(v); }
__device__ inline unsigned __float_as_uint(float v) { return (uint32_t)kiln_emu::to_bits(v); }
__device__ inline double __longlong_as_double(long long v) { return kiln_emu::from_bits<double>((uint64_t)v); }
__device__ inline long long __double_as_longlong(double v) { return (long long)kiln_emu::to_bits(v); }
// Fast-math intrinsics computed exactly: the emulator checks logic, not ulps.
__device__ inline float __expf(float x) { return expf(x); }
__device__ inline float __logf(float x) { return logf(x); }
__device__ inline float __fdividef(float a, float b) { return a / b; }
__device__ inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
__device__ inline double rsqrt(double x) { return 1.0 / sqrt(x); }
__device__ inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
__device__ inline int __popc(unsigned v) { return __builtin_popcount(v); }
__device__ inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
__device__ inline int __ffs(int v) { return __builtin_ffs(v); }
// CUDA's classification functions are global; <cmath> puts them in std.
using std::isfinite;
using std::isinf;
using std::isnan;

// ---- tensor cores -------------------------------------------------------------
// mma_m16n8k16 (kernels/half.cuh issues it as `mma.sync.aligned.m16n8k16`
// PTX on the GPU): D += A·B for one warp, A 16×16 and B 16×8 of bf16 (kind 0)
// or f16 (kind 1) packed two per 32-bit register, D in f32. Each lane leaves
// its fragments in a per-warp scratch, the warp meets, every lane rebuilds
// the two matrices from all 32 lanes' fragments with the PTX ISA's layout
// and computes its own four outputs, and the warp meets again before the
// scratch can be reused. Products are summed in f32 in k order (the
// hardware's order and internal precision are its own: parity tests allow
// for it).
namespace kiln_emu {
struct MmaFragments {
    unsigned a[4];
    unsigned b[2];
};
// One slot per lane of every warp of the running block (blocks run one at a time).
static MmaFragments mma_scratch[32][32];

inline float half_bits_to_float(unsigned bits, unsigned kind) {
    if (kind == 0) return from_bits<float>(bits << 16);
    const unsigned sign = (bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1Fu, mantissa = bits & 0x3FFu;
    if (exponent == 0x1Fu) return from_bits<float>(sign | 0x7F800000u | (mantissa << 13));
    if (exponent == 0) {
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return from_bits<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// The 16-bit half `index` (0: low) of a register.
inline unsigned half_of(unsigned reg, int index) { return (reg >> (16 * index)) & 0xFFFFu; }
}  // namespace kiln_emu

__device__ inline void mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2], unsigned kind) {
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned warp = linear / 32, lane = linear % 32;
    kiln_emu::MmaFragments& mine = kiln_emu::mma_scratch[warp][lane];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    for (int i = 0; i < 2; ++i) mine.b[i] = b[i];
    __syncwarp();
    const kiln_emu::MmaFragments* warp_fragments = kiln_emu::mma_scratch[warp];
    // A[r][q] lives in lane (r%8)·4 + (q%8)/2, register (r≥8) + 2·(q≥8), half q%2;
    // B[q][n] in lane n·4 + (q%8)/2, register (q≥8), half q%2.
    auto a_at = [&](int r, int q) {
        const unsigned reg = warp_fragments[(r % 8) * 4 + (q % 8) / 2].a[(r >= 8 ? 1 : 0) + (q >= 8 ? 2 : 0)];
        return kiln_emu::half_bits_to_float(kiln_emu::half_of(reg, q % 2), kind);
    };
    auto b_at = [&](int q, int n) {
        const unsigned reg = warp_fragments[n * 4 + (q % 8) / 2].b[q >= 8 ? 1 : 0];
        return kiln_emu::half_bits_to_float(kiln_emu::half_of(reg, q % 2), kind);
    };
    const int group = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = group + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float sum = 0.0f;
        for (int q = 0; q < 16; ++q) sum += a_at(row, q) * b_at(q, col);
        d[e] += sum;
    }
    __syncwarp();
}

// ---- sanitizer hooks ----------------------------------------------------------
// Kernels are compiled with -fsanitize=alignment,bounds; these definitions
// replace the UBSan runtime and turn a finding into a kernel fault.
namespace kiln_emu {
struct SourceLocation {
    const char* file;
    uint32_t line;
    uint32_t column;
};
struct TypeDescriptor {
    uint16_t kind;
    uint16_t info;
    char name[1];
};
struct TypeMismatchData {
    SourceLocation location;
    const TypeDescriptor* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};
struct OutOfBoundsData {
    SourceLocation location;
    const TypeDescriptor* array_type;
    const TypeDescriptor* index_type;
};

[[noreturn]] inline void fault(const char* message) {
    kiln_emu_runtime_table.fault(message);
    std::abort();
}
}  // namespace kiln_emu

extern "C" __attribute__((visibility("default"))) void __ubsan_handle_type_mismatch_v1(
    kiln_emu::TypeMismatchData* data, uintptr_t pointer) {
    char message[512];
    const unsigned long alignment = 1ul << data->log_alignment;
    if (pointer == 0) {
        snprintf(message, sizeof message, "null pointer access of type %s at %s:%u", data->type->name,
                 data->location.file, data->location.line);
    } else if (pointer % alignment != 0) {
        snprintf(message, sizeof message,
                 "misaligned access: address 0x%lx is not a multiple of %lu bytes, as type %s requires, at %s:%u",
                 (unsigned long)pointer, alignment, data->type->name, data->location.file, data->location.line);
    } else {
        snprintf(message, sizeof message, "invalid access of type %s at 0x%lx at %s:%u", data->type->name,
                 (unsigned long)pointer, data->location.file, data->location.line);
    }
    kiln_emu::fault(message);
}

extern "C" __attribute__((visibility("default"))) void __ubsan_handle_type_mismatch_v1_abort(
    kiln_emu::TypeMismatchData* data, uintptr_t pointer) {
    __ubsan_handle_type_mismatch_v1(data, pointer);
}

extern "C" __attribute__((visibility("default"))) void __ubsan_handle_out_of_bounds(kiln_emu::OutOfBoundsData* data,
                                                                                    uintptr_t index) {
    char message[512];
    snprintf(message, sizeof message, "array index %ld out of bounds for type %s at %s:%u", (long)index,
             data->array_type->name, data->location.file, data->location.line);
    kiln_emu::fault(message);
}

extern "C" __attribute__((visibility("default"))) void __ubsan_handle_out_of_bounds_abort(
    kiln_emu::OutOfBoundsData* data, uintptr_t index) {
    __ubsan_handle_out_of_bounds(data, index);
}

// ---- the kernel table the emulator loads ------------------------------------------
namespace kiln_emu {
struct KernelInfo {
    const char* name;
    size_t param_size;
    unsigned max_threads_per_block;
    size_t static_shared_bytes;
    void (*invoke)(const void* params);
};

template <typename K>
struct KernelTraits;
template <typename P>
struct KernelTraits<void (*)(P)> {
    using Params = typename std::remove_cv<P>::type;
};

// Copies the launch's parameter bytes into the kernel's own struct and runs
// one thread of it.
template <auto Kernel>
void invoke(const void* raw) {
    typename KernelTraits<decltype(Kernel)>::Params params;
    std::memcpy(&params, raw, sizeof params);
    Kernel(params);
}

template <auto Kernel>
constexpr size_t param_size() {
    return sizeof(typename KernelTraits<decltype(Kernel)>::Params);
}
}  // namespace kiln_emu

#define KILN_EMU_KERNEL(name, max_threads, shared_bytes) \
    {#name, ::kiln_emu::param_size<&name>(), (unsigned)(max_threads), (size_t)(shared_bytes), &::kiln_emu::invoke<&name>},

extern "C" char __start_kiln_shared[] __attribute__((weak));
extern "C" char __stop_kiln_shared[] __attribute__((weak));

// ---- racecheck: shared-memory hazards between barriers ------------------------------
// Kernels are compiled with -fsanitize=thread, which calls the __tsan_*
// hooks below around every load and store; these keep, for each 2-byte unit
// of the module's shared memory (the smallest element kernels store there:
// bf16/f16 tiles), its last writer and two of its readers in
// the current epoch. Another thread's write after a read or write, or read
// after a write, in the same epoch (no barrier between, and for lanes of
// one warp no warp operation between) is a race: the kernel stops with both
// call sites.
namespace kiln_emu {
struct SharedAccess {
    unsigned epoch;
    unsigned warp_epoch;
    unsigned thread;  // linear id + 1; 0 = nobody
    uintptr_t pc;
};
struct ShadowWord {
    SharedAccess write, first_read, other_read;
};
// Bytes of shared memory per ShadowWord.
constexpr uintptr_t SHADOW_UNIT = 2;

extern ShadowWord* shadow;

KILN_EMU_NO_RACECHECK inline bool unordered(const SharedAccess& before, const SharedAccess& now) {
    if (before.thread == 0 || before.thread == now.thread || before.epoch != now.epoch) return false;
    const bool same_warp = (before.thread - 1) / 32 == (now.thread - 1) / 32;
    return !(same_warp && before.warp_epoch != now.warp_epoch);
}

KILN_EMU_NO_RACECHECK inline void describe_thread(char* out, size_t size, unsigned linear) {
    const dim3 b = kiln_emu_state.block_dim;
    snprintf(out, size, "(%u,%u,%u)", linear % b.x, linear / b.x % b.y, linear / (b.x * b.y));
}

[[noreturn]] KILN_EMU_NO_RACECHECK inline void report_race(const SharedAccess& before, const char* before_kind,
                                                          const SharedAccess& now, const char* now_kind,
                                                          uintptr_t offset) {
    char first[48], second[48], message[512];
    describe_thread(first, sizeof first, before.thread - 1);
    describe_thread(second, sizeof second, now.thread - 1);
    snprintf(message, sizeof message,
             "shared-memory race (racecheck): thread %s %s @shared:0x%lx@ at @pc:0x%lx@ after "
             "thread %s %s it at @pc:0x%lx@, with no __syncthreads between",
             second, now_kind, (unsigned long)offset, (unsigned long)now.pc, first, before_kind,
             (unsigned long)before.pc);
    fault(message);
}

KILN_EMU_NO_RACECHECK inline void shared_access(uintptr_t offset, unsigned size, bool write, void* pc) {
    const kiln_emu_thread_state& s = kiln_emu_state;
    const dim3 b = s.block_dim;
    const unsigned linear = s.thread_idx.x + b.x * (s.thread_idx.y + b.y * s.thread_idx.z);
    const SharedAccess now{s.epoch, s.warp_epoch[linear / 32], linear + 1, (uintptr_t)pc};
    for (uintptr_t word = offset / SHADOW_UNIT; word <= (offset + size - 1) / SHADOW_UNIT; ++word) {
        ShadowWord& w = shadow[word];
        if (unordered(w.write, now)) report_race(w.write, "wrote", now, write ? "writes" : "reads", offset);
        if (write) {
            if (unordered(w.first_read, now)) report_race(w.first_read, "read", now, "writes", offset);
            if (unordered(w.other_read, now)) report_race(w.other_read, "read", now, "writes", offset);
            w.write = now;
        } else if (w.first_read.epoch != now.epoch || w.first_read.thread == 0) {
            w.first_read = now;
            w.other_read = SharedAccess{};
        } else if (w.first_read.thread != now.thread) {
            w.other_read = now;
        }
    }
}

KILN_EMU_NO_RACECHECK inline void check(const void* address, unsigned size, bool write, void* pc) {
    const uintptr_t offset = (uintptr_t)address - (uintptr_t)__start_kiln_shared;
    if (offset >= (uintptr_t)(__stop_kiln_shared - __start_kiln_shared) || !kiln_emu_state.racecheck) return;
    shared_access(offset, size, write, pc);
}
}  // namespace kiln_emu

#define KILN_EMU_TSAN_HOOKS(n)                                                                                       \
    extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_read##n(void* p) {          \
        ::kiln_emu::check(p, n, false, __builtin_return_address(0));                                                 \
    }                                                                                                                \
    extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_write##n(void* p) {         \
        ::kiln_emu::check(p, n, true, __builtin_return_address(0));                                                  \
    }                                                                                                                \
    extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_unaligned_read##n(void* p) { \
        ::kiln_emu::check(p, n, false, __builtin_return_address(0));                                                 \
    }                                                                                                                \
    extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_unaligned_write##n(void* p) { \
        ::kiln_emu::check(p, n, true, __builtin_return_address(0));                                                  \
    }                                                                                                                \
    extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_volatile_read##n(void* p) { \
        ::kiln_emu::check(p, n, false, __builtin_return_address(0));                                                 \
    }                                                                                                                \
    extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_volatile_write##n(void* p) { \
        ::kiln_emu::check(p, n, true, __builtin_return_address(0));                                                  \
    }
KILN_EMU_TSAN_HOOKS(1)
KILN_EMU_TSAN_HOOKS(2)
KILN_EMU_TSAN_HOOKS(4)
KILN_EMU_TSAN_HOOKS(8)
KILN_EMU_TSAN_HOOKS(16)
extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_read_range(void* p, unsigned long n) {
    ::kiln_emu::check(p, (unsigned)n, false, __builtin_return_address(0));
}
extern "C" KILN_EMU_NO_RACECHECK __attribute__((visibility("default"))) void __tsan_write_range(void* p, unsigned long n) {
    ::kiln_emu::check(p, (unsigned)n, true, __builtin_return_address(0));
}
extern "C" __attribute__((visibility("default"))) void __tsan_init() {}
extern "C" __attribute__((visibility("default"))) void __tsan_func_entry(void*) {}
extern "C" __attribute__((visibility("default"))) void __tsan_func_exit() {}

// Everything the emulator looks up in a compiled module. The generated file
// defines the table with KILN_EMU_DEFINE_MODULE.
struct kiln_emu_module {
    const kiln_emu::KernelInfo* kernels;
    size_t kernel_count;
    kiln_emu_thread_state* state;
    kiln_emu_runtime* runtime;
    char* shared_begin;
    char* shared_end;
};

#define KILN_EMU_DEFINE_MODULE(...)                                                                        \
    kiln_emu_thread_state kiln_emu_state;                                                                  \
    kiln_emu_runtime kiln_emu_runtime_table;                                                               \
    kiln_emu::ShadowWord* kiln_emu::shadow = (kiln_emu::ShadowWord*)calloc(                                \
        (size_t)(__stop_kiln_shared - __start_kiln_shared) / kiln_emu::SHADOW_UNIT + 1,               \
        sizeof(kiln_emu::ShadowWord));         \
    static const kiln_emu::KernelInfo kiln_emu_kernel_table[] = {__VA_ARGS__};                             \
    extern "C" __attribute__((visibility("default"))) kiln_emu_module kiln_emu_module_info() {             \
        return kiln_emu_module{kiln_emu_kernel_table, sizeof kiln_emu_kernel_table / sizeof(kiln_emu::KernelInfo), \
                               &kiln_emu_state, &kiln_emu_runtime_table, __start_kiln_shared, __stop_kiln_shared}; \
    }
