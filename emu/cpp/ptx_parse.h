// Parser for the inline-PTX templates of the kernels: turns one asm template (after GCC's %-substitution rules:
// %N is operand N, %% a literal %) into a small program of instructions, and decides whether the interpreter
// supports it. Pure (no engine dependency): the build runs it over every template of every kernel and fails on
// anything unsupported, and the engine parses each template once at its first execution.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace r1k_emu {

enum class OperandKind {
    AsmRef,   // %N: the asm statement's operand N
    Special,  // %%name: a special register (%globaltimer, %cluster_ctarank, ...)
    Local,    // a register declared inside the template (.reg .pred p)
    Imm,      // integer immediate
    Sink,     // _
    Vector,   // {a, b, ...}
    Address,  // [a] or [a, {coords}]
};

struct Operand {
    OperandKind kind = OperandKind::Imm;
    int index = -1;     // AsmRef: operand number; Local: index into Program::locals
    int64_t imm = 0;
    std::string name;   // Special / Local
    std::vector<Operand> elems;  // Vector elements; Address: base (and a Vector of coordinates)
};

enum class Op {
    MbarInit,
    MbarArrive,
    MbarArriveExpectTx,
    MbarArriveRemote,   // mbarrier.arrive.release.cluster.shared::cluster
    MbarTryWaitParity,
    FenceMbarrierInit,
    FenceProxyAsync,
    MovSpecial,
    PrefetchTensormap,
    TmaLoad,
    ClusterArrive,
    ClusterWait,
    Mapa,
    WgmmaFence,
    WgmmaCommit,
    WgmmaWait,
    WgmmaMma,
    SetmaxnregInc,
    SetmaxnregDec,
    BarSync,
    CpAsync,
    CpAsyncCommit,
    CpAsyncWait,
    Setp,
    Selp,
};

struct Instr {
    Op op;
    std::string opcode;          // full opcode with modifiers, e.g. "mbarrier.try_wait.parity.shared::cta.b64"
    std::vector<Operand> operands;
    // Decoded modifiers
    uint32_t tma_dims = 0;       // TmaLoad: 2..5
    bool multicast = false;      // TmaLoad
    uint32_t wg_m = 0, wg_n = 0, wg_k = 0;  // WgmmaMma shape
    std::string wg_atype, wg_btype;         // "e4m3", "bf16", ...
    std::string cmp;             // Setp: "ne", "eq", ...
};

struct Program {
    std::vector<Instr> instrs;
    std::vector<std::string> locals;  // declared .reg .pred names
};

// Parses `ptx`; on failure returns false and says why in *error.
bool parse_ptx(const char* ptx, Program* program, std::string* error);

// Checks a parsed program against the asm statement's operand constraints ("=r", "l", "+f", "n", ...): operand
// numbers in range, register widths that fit each instruction's operand types, outputs where the instruction
// writes. Returns an empty string when the interpreter supports it, else what is wrong.
std::string validate_program(const Program& program, const char* const* constraints, int count);

// One asm statement of the kernels, for the build-time check.
struct TemplateSite {
    const char* site;
    const char* ptx;
    const char* constraints[192];
    int count;
};
// Prints every unsupported template with its site; returns the process exit code (0 when all are supported).
int check_template_sites(const TemplateSite* sites, int count);

}  // namespace r1k_emu
