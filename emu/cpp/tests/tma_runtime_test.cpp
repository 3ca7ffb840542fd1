// Tests of tma.cpp (cp.async.bulk.tensor issue/completion, prefetch.tensormap, the emulated
// cuTensorMapEncodeTiled entry point) against a minimal stand-in for the execution engine: this file implements the
// parts of runtime.h that tma.cpp calls (a 2-CTA cluster with plain shared-memory buffers, a global allocation
// registry, a queue of async operations, recorded complete_tx and warnings). It does not link runtime.cpp, so it
// checks tma.cpp's own logic only. Build and run from the repository root:
//
//   g++ -std=c++17 -O1 -I/work/main/emu/cpp emu/cpp/tests/tma_runtime_test.cpp emu/cpp/tma.cpp emu/cpp/tma_core.cpp -o /tmp/tma_runtime_test && /tmp/tma_runtime_test
// selftest-sources: tma.cpp
//
// Prints one PASS/FAIL line per test and exits non-zero when any fails.
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "emu_api.h"
#include "runtime.h"
#include "tma.h"
#include "tma_core.h"

// ---------------------------------------------------------------------------------------------------------------
// Stand-in engine
// ---------------------------------------------------------------------------------------------------------------

struct r1k_emu::Cta {
    uint32_t rank = 0;
    bool running = true;
    std::vector<uint8_t> smem;
};

namespace {
struct Alloc {
    uint64_t p, n;
};
struct CompleteTx {
    r1k_emu::Cta* cta;
    uint32_t off, bytes;
};
r1k_emu::Cta g_cta[2];
uint32_t g_cluster = 2;
uint32_t g_exec = 0;  // rank of the "executing" CTA
std::vector<Alloc> g_allocs;
std::vector<std::unique_ptr<r1k_emu::AsyncOp>> g_pending;
std::vector<CompleteTx> g_tx;
std::vector<std::string> g_warnings;

void reset_engine(uint32_t cluster = 2) {
    g_cluster = cluster;
    g_exec = 0;
    for (uint32_t r = 0; r < 2; ++r) {
        g_cta[r].rank = r;
        g_cta[r].running = true;
        g_cta[r].smem.assign(16384, 0x11);
    }
    g_pending.clear();
    g_tx.clear();
    g_warnings.clear();
}
}  // namespace

namespace r1k_emu {
void fail(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    throw LaunchError(buf);
}
void warn(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_warnings.push_back(buf);
}
std::string where() { return "test thread"; }
uint32_t cluster_size() { return g_cluster; }
Cta* cluster_cta(uint32_t rank) {
    if (rank >= g_cluster) fail("stub: cluster_cta(%u) outside the cluster", rank);
    return &g_cta[rank];
}
Cta* shared_target(uint32_t addr) {
    const uint32_t r = (addr >> kClusterRankShift) & 0xF;
    return r == 0 ? &g_cta[g_exec] : cluster_cta(r - 1);
}
uint32_t shared_offset(uint32_t addr) { return addr & ((1u << kClusterRankShift) - 1); }
uint8_t* cta_shared_ptr(Cta* cta, uint32_t offset, uint32_t bytes, const char* what) {
    if (uint64_t(offset) + bytes > cta->smem.size())
        fail("stub: %s [0x%x, +%u) outside shared memory", what, offset, bytes);
    return cta->smem.data() + offset;
}
uint32_t cta_rank(const Cta* cta) { return cta->rank; }
bool cta_running(const Cta* cta) { return cta->running; }
void check_global(const void* p, uint64_t bytes, const char* what) {
    const uint64_t a = uint64_t(uintptr_t(p));
    for (const Alloc& al : g_allocs)
        if (a >= al.p && a + bytes <= al.p + al.n) return;
    fail("stub: %s [%p, +%llu) is not inside one allocation", what, p, (unsigned long long)bytes);
}
void poison(void* p, size_t bytes) { memset(p, kPoisonByte, bytes); }
void mbar_complete_tx(Cta* cta, uint32_t offset, uint32_t bytes, const char*) { g_tx.push_back({cta, offset, bytes}); }
void issue_async(std::unique_ptr<AsyncOp> op) { g_pending.push_back(std::move(op)); }
}  // namespace r1k_emu

// ---------------------------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------------------------

static int g_failed_tests = 0, g_test_failures = 0;
#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            ++g_test_failures;                                   \
            printf("    %s:%d: ", __FILE__, __LINE__);           \
            printf(__VA_ARGS__);                                 \
            printf("\n");                                        \
        }                                                        \
    } while (0)

static void run(const char* name, const std::function<void()>& fn) {
    g_test_failures = 0;
    reset_engine();
    try {
        fn();
    } catch (const std::exception& e) {
        ++g_test_failures;
        printf("    unexpected exception: %s\n", e.what());
    }
    printf("%s %s\n", g_test_failures ? "FAIL" : "PASS", name);
    if (g_test_failures) ++g_failed_tests;
}

// Runs fn and returns the LaunchError message ("" when none was thrown).
static std::string launch_error(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const r1k_emu::LaunchError& e) {
        return e.what();
    }
    return "";
}
#define CHECK_FAILS(expr, substring)                                                                          \
    do {                                                                                                      \
        std::string msg_ = launch_error([&] { expr; });                                                       \
        CHECK(!msg_.empty() && msg_.find(substring) != std::string::npos, "%s: got \"%s\", want \"%s\"", #expr, \
              msg_.c_str(), substring);                                                                       \
    } while (0)

// A registered "device" tensor: rows x cols bytes (u8), row stride = cols, non-zero contents.
struct Global {
    std::vector<uint8_t> buf;
    uint8_t* p;
    Global(size_t bytes) : buf(bytes + 64) {
        p = reinterpret_cast<uint8_t*>((uintptr_t(buf.data()) + 63) / 64 * 64);
        for (size_t i = 0; i < bytes; ++i) p[i] = uint8_t(1 + (i * 131 + i / 7) % 251);
        g_allocs.push_back({uint64_t(uintptr_t(p)), bytes});
    }
    ~Global() { g_allocs.pop_back(); }
};

alignas(64) static uint8_t g_map[128];

static int encode_u8_2d(void* map, void* ptr, uint64_t cols, uint64_t rows, uint32_t box_cols, uint32_t box_rows,
                        int swizzle, char* err = nullptr, size_t err_len = 0) {
    const uint64_t dims[2] = {cols, rows}, strides[1] = {cols};
    const uint32_t box[2] = {box_cols, box_rows}, es[2] = {1, 1};
    return r1k_emu_tensor_map_encode_tiled(map, 0 /*UINT8*/, 2, ptr, dims, strides, box, es, 0, swizzle, 3, 0, err,
                                           err_len);
}

static r1k_emu::TmaLoad load_op(uint32_t dst, uint32_t mbar, int32_t x, int32_t y) {
    r1k_emu::TmaLoad op{};
    op.dims = 2;
    op.dst = dst;
    op.map = g_map;
    op.coords[0] = x;
    op.coords[1] = y;
    op.mbar = mbar;
    return op;
}

// The expected shared image of a u8 box, computed with tma_core (tested against CuTe in tma_test.cpp).
static std::vector<uint8_t> expected(const uint8_t* g, int32_t x, int32_t y, uint32_t dst, uint32_t bytes) {
    r1k_emu::tma::TensorMapParams p;
    CHECK(r1k_emu::tma::decode(g_map, &p).empty(), "map decodes");
    int32_t c[5] = {x, y, 0, 0, 0};
    std::vector<uint8_t> img(bytes);
    r1k_emu::tma::box_copy(p, c, dst, g, img.data());
    return img;
}

static bool all_poison(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (p[i] != r1k_emu::kPoisonByte) return false;
    return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

static void test_encode_entry_point() {
    Global g(512 * 64);
    char err[256];
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 128, 64, 3, err, sizeof err) == 0, "valid map refused: %s", err);
    CHECK(err[0] == '\0', "err not cleared on success");
    // An invalid one: CUDA_ERROR_INVALID_VALUE and the reason.
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 256, 64, 3, err, sizeof err) == 1, "256-byte box with 128B swizzle");
    CHECK(strstr(err, "span") != nullptr, "reason: %s", err);
    // Bad rank: the arrays are not read (NULL is fine) and the rank is reported.
    CHECK(r1k_emu_tensor_map_encode_tiled(g_map, 0, 0, g.p, nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0, err,
                                          sizeof err) == 1 &&
              strstr(err, "tensorRank") != nullptr,
          "rank 0: %s", err);
    CHECK(r1k_emu_tensor_map_encode_tiled(g_map, 0, 6, g.p, nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0, err,
                                          sizeof err) == 1,
          "rank 6");
    const uint64_t d[2] = {512, 64};
    const uint32_t b[2] = {128, 8}, es[2] = {1, 1};
    CHECK(r1k_emu_tensor_map_encode_tiled(g_map, 0, 2, g.p, d, nullptr, b, es, 0, 0, 0, 0, err, sizeof err) == 1 &&
              strstr(err, "NULL") != nullptr,
          "null strides: %s", err);
    CHECK(r1k_emu_tensor_map_encode_tiled(nullptr, 0, 2, g.p, d, d, b, es, 0, 0, 0, 0, err, sizeof err) == 1,
          "null map");
    // A short err buffer is truncated, not overrun.
    char small[8];
    memset(small, 'x', sizeof small);
    CHECK(encode_u8_2d(g_map + 8, g.p, 512, 64, 128, 64, 3, small, 5) == 1 && small[4] == '\0' && small[5] == 'x',
          "short err buffer");
}

static void test_load_unicast() {
    Global g(512 * 64);
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 128, 8, 3) == 0, "encode");
    const uint32_t dst = 2048 + 384, mbar = 64;  // 128-aligned, not 1024-aligned
    r1k_emu::tma_load(load_op(dst, mbar, 128, 16));
    CHECK(all_poison(&g_cta[0].smem[dst], 1024), "destination poisoned at issue");
    CHECK(g_cta[0].smem[dst - 1] == 0x11 && g_cta[0].smem[dst + 1024] == 0x11, "poison only covers the box");
    CHECK(g_pending.size() == 1 && g_tx.empty(), "one pending op, no complete_tx before completion");
    CHECK(g_warnings.empty(), "no warning for an in-bounds box");
    CHECK(g_pending[0]->describe().find("cp.async.bulk.tensor.2d") != std::string::npos, "describe: %s",
          g_pending[0]->describe().c_str());
    g_pending[0]->complete();
    CHECK(memcmp(&g_cta[0].smem[dst], expected(g.p, 128, 16, dst, 1024).data(), 1024) == 0, "box image");
    // Spot check against the data directly: box row r, byte b lands at swizzle(dst + 128 r + b).
    for (uint32_t r = 0; r < 8; ++r)
        for (uint32_t bb = 0; bb < 128; ++bb) {
            const uint32_t a = dst + 128 * r + bb;
            const uint32_t s = a ^ (((a >> 7) & 7) << 4);
            CHECK(g_cta[0].smem[s] == g.p[(16 + r) * 512 + 128 + bb], "row %u byte %u", r, bb);
        }
    CHECK(g_tx.size() == 1 && g_tx[0].cta == &g_cta[0] && g_tx[0].off == mbar && g_tx[0].bytes == 1024,
          "complete_tx of 1024 bytes on the mbarrier");
    CHECK(g_cta[1].smem[dst] == 0x11, "the other CTA is untouched");
}

static void test_load_to_peer_and_multicast() {
    Global g(512 * 64);
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 128, 8, 3) == 0, "encode");
    // Unicast into the peer CTA (shared::cluster address with rank 1 + 1 in bits 24-27); mbarrier there too.
    const uint32_t peer = 2u << r1k_emu::kClusterRankShift;
    r1k_emu::tma_load(load_op(peer | 4096, peer | 8, 0, 0));
    CHECK(all_poison(&g_cta[1].smem[4096], 1024) && g_cta[0].smem[4096] == 0x11, "peer poisoned, own untouched");
    g_pending.back()->complete();
    CHECK(g_tx.size() == 1 && g_tx[0].cta == &g_cta[1] && g_tx[0].off == 8, "complete_tx on the peer's mbarrier");
    CHECK(memcmp(&g_cta[1].smem[4096], expected(g.p, 0, 0, 4096, 1024).data(), 1024) == 0, "peer image");
    // Multicast to both CTAs: same offsets in each, complete_tx in each.
    g_tx.clear();
    r1k_emu::TmaLoad op = load_op(8192, 16, 256, 8);
    op.multicast = true;
    op.cta_mask = 0x3;
    r1k_emu::tma_load(op);
    CHECK(all_poison(&g_cta[0].smem[8192], 1024) && all_poison(&g_cta[1].smem[8192], 1024), "both poisoned");
    g_pending.back()->complete();
    const std::vector<uint8_t> want = expected(g.p, 256, 8, 8192, 1024);
    CHECK(memcmp(&g_cta[0].smem[8192], want.data(), 1024) == 0, "rank 0 image");
    CHECK(memcmp(&g_cta[1].smem[8192], want.data(), 1024) == 0, "rank 1 image");
    CHECK(g_tx.size() == 2 && g_tx[0].cta == &g_cta[0] && g_tx[1].cta == &g_cta[1] && g_tx[0].off == 16 &&
              g_tx[1].off == 16 && g_tx[0].bytes == 1024,
          "complete_tx on each destination CTA");
    // Multicast to the peer only.
    g_tx.clear();
    op.cta_mask = 0x2;
    r1k_emu::tma_load(op);
    g_pending.back()->complete();
    CHECK(g_tx.size() == 1 && g_tx[0].cta == &g_cta[1], "mask 0x2: only rank 1");
}

static void test_load_out_of_bounds() {
    Global g(208 * 20);
    CHECK(encode_u8_2d(g_map, g.p, 208, 20, 128, 8, 3) == 0, "encode");
    // Crossing the right and bottom edges: full box bytes, zero fill, one warning.
    r1k_emu::tma_load(load_op(1024, 0, 100, 16));
    g_pending.back()->complete();
    CHECK(g_tx.size() == 1 && g_tx[0].bytes == 1024, "full box bytes for a partially out-of-bounds box");
    CHECK(memcmp(&g_cta[0].smem[1024], expected(g.p, 100, 16, 1024, 1024).data(), 1024) == 0, "zero-filled image");
    CHECK(g_warnings.size() == 1 && g_warnings[0].find("full box") != std::string::npos, "warned once");
    // Entirely outside: nothing is read (no global check), the box is zeros.
    r1k_emu::tma_load(load_op(2048, 8, -128, 0));
    g_pending.back()->complete();
    bool zeros = true;
    for (int i = 0; i < 1024; ++i) zeros = zeros && g_cta[0].smem[2048 + i] == 0;
    CHECK(zeros && g_tx.back().bytes == 1024, "fully out-of-bounds box: zeros, full bytes");
}

static void test_load_errors() {
    Global g(512 * 64);
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 128, 8, 3) == 0, "encode");
    r1k_emu::TmaLoad op = load_op(1024, 0, 0, 0);
    // Not a tensor map / corrupted map.
    uint8_t junk[128] = {1, 2, 3};
    op.map = junk;
    CHECK_FAILS(r1k_emu::tma_load(op), "magic");
    op.map = g_map;
    g_map[20] ^= 1;
    CHECK_FAILS(r1k_emu::tma_load(op), "checksum");
    g_map[20] ^= 1;
    // Rank mismatch, unsupported dimensionality.
    op.dims = 3;
    CHECK_FAILS(r1k_emu::tma_load(op), "rank 2");
    op.dims = 7;
    CHECK_FAILS(r1k_emu::tma_load(op), "dimensionality");
    op.dims = 2;
    // Destination alignment, mbarrier alignment and placement.
    op.dst = 1024 + 64;
    CHECK_FAILS(r1k_emu::tma_load(op), "128-byte aligned");
    op.dst = 1024;
    op.mbar = 4;
    CHECK_FAILS(r1k_emu::tma_load(op), "8-byte aligned");
    op.mbar = (2u << r1k_emu::kClusterRankShift) | 8;
    CHECK_FAILS(r1k_emu::tma_load(op), "same CTA");
    op.mbar = 16;
    // Destination outside shared memory.
    op.dst = 16384 - 512;
    CHECK_FAILS(r1k_emu::tma_load(op), "outside shared memory");
    op.dst = 1024;
    // Multicast masks.
    op.multicast = true;
    op.cta_mask = 0;
    CHECK_FAILS(r1k_emu::tma_load(op), "ctaMask is 0");
    op.cta_mask = 0x5;
    CHECK_FAILS(r1k_emu::tma_load(op), "outside the cluster");
    op.multicast = false;
    // Source outside any allocation: a map over memory that is not registered.
    static uint8_t unregistered[512 * 64 + 64];
    uint8_t* u = reinterpret_cast<uint8_t*>((uintptr_t(unregistered) + 63) / 64 * 64);
    CHECK(encode_u8_2d(g_map, u, 512, 64, 128, 8, 3) == 0, "encode");
    CHECK_FAILS(r1k_emu::tma_load(op), "not inside one allocation");
    // No op was queued by any refused load.
    CHECK(g_pending.empty(), "refused loads queue nothing (%zu queued)", g_pending.size());
}

static void test_completion_into_exited_cta() {
    Global g(512 * 64);
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 128, 8, 3) == 0, "encode");
    r1k_emu::TmaLoad op = load_op(1024, 0, 0, 0);
    op.multicast = true;
    op.cta_mask = 0x3;
    r1k_emu::tma_load(op);
    g_cta[1].running = false;
    CHECK_FAILS(g_pending.back()->complete(), "has exited");
}

static void test_prefetch() {
    Global g(512 * 64);
    CHECK(encode_u8_2d(g_map, g.p, 512, 64, 128, 8, 3) == 0, "encode");
    r1k_emu::tma_prefetch(g_map);
    uint8_t junk[128] = {};
    CHECK_FAILS(r1k_emu::tma_prefetch(junk), "prefetch.tensormap");
}

int main() {
    run("r1k_emu_tensor_map_encode_tiled: success, reasons, NULL arrays, short err buffer", test_encode_entry_point);
    run("unicast load: poison at issue, swizzled image and complete_tx at completion", test_load_unicast);
    run("load into the peer CTA and multicast to both CTAs", test_load_to_peer_and_multicast);
    run("out-of-bounds boxes: zero fill, full box bytes, one warning", test_load_out_of_bounds);
    run("refused loads (map, rank, alignment, mbarrier, mask, global range)", test_load_errors);
    run("completion into an exited CTA fails", test_completion_into_exited_cta);
    run("prefetch.tensormap validates the map", test_prefetch);
    if (g_failed_tests) {
        printf("FAILED: %d test(s)\n", g_failed_tests);
        return 1;
    }
    printf("ALL PASS\n");
    return 0;
}
