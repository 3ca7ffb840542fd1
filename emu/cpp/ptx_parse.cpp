#include "ptx_parse.h"

#include <cctype>
#include <cstdio>
#include <cstring>

namespace r1k_emu {
namespace {

std::string trim(const std::string& s) {
    size_t a = 0, b = s.size();
    while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
    while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
    return s.substr(a, b - a);
}

// Splits at top-level commas (outside [] and {}).
std::vector<std::string> split_top(const std::string& s) {
    std::vector<std::string> parts;
    int depth = 0;
    std::string cur;
    for (char c : s) {
        if (c == '[' || c == '{') ++depth;
        if (c == ']' || c == '}') --depth;
        if (c == ',' && depth == 0) {
            parts.push_back(trim(cur));
            cur.clear();
        } else {
            cur += c;
        }
    }
    if (!trim(cur).empty() || !parts.empty()) parts.push_back(trim(cur));
    return parts;
}

bool parse_operand(const std::string& text, const Program& prog, Operand* out, std::string* err) {
    const std::string t = trim(text);
    if (t.empty()) {
        *err = "empty operand";
        return false;
    }
    if (t == "_") {
        out->kind = OperandKind::Sink;
        return true;
    }
    if (t.rfind("%%", 0) == 0) {
        out->kind = OperandKind::Special;
        out->name = t.substr(2);
        return true;
    }
    if (t[0] == '%') {
        const std::string num = t.substr(1);
        if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos) {
            *err = "bad operand reference '" + t + "'";
            return false;
        }
        out->kind = OperandKind::AsmRef;
        out->index = std::stoi(num);
        return true;
    }
    if (t[0] == '[' || t[0] == '{') {
        const char close = t[0] == '[' ? ']' : '}';
        if (t.back() != close) {
            *err = "unbalanced '" + t + "'";
            return false;
        }
        out->kind = t[0] == '[' ? OperandKind::Address : OperandKind::Vector;
        for (const std::string& part : split_top(t.substr(1, t.size() - 2))) {
            Operand e;
            if (!parse_operand(part, prog, &e, err)) return false;
            out->elems.push_back(e);
        }
        if (out->kind == OperandKind::Address && (out->elems.empty() || out->elems.size() > 2)) {
            *err = "bad address operand '" + t + "'";
            return false;
        }
        return true;
    }
    if (std::isdigit(static_cast<unsigned char>(t[0])) || t[0] == '-') {
        char* end = nullptr;
        const long long v = std::strtoll(t.c_str(), &end, 0);
        if (*end != '\0') {
            *err = "bad immediate '" + t + "'";
            return false;
        }
        out->kind = OperandKind::Imm;
        out->imm = v;
        return true;
    }
    for (size_t i = 0; i < prog.locals.size(); ++i) {
        if (prog.locals[i] == t) {
            out->kind = OperandKind::Local;
            out->index = static_cast<int>(i);
            out->name = t;
            return true;
        }
    }
    *err = "unknown operand '" + t + "'";
    return false;
}

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

// Maps an opcode (with all modifiers) to the interpreter's instruction, decoding shape/type modifiers.
bool classify(Instr* in, std::string* err) {
    const std::string& o = in->opcode;
    struct Exact {
        const char* name;
        Op op;
    };
    static const Exact exact[] = {
        {"mbarrier.init.shared::cta.b64", Op::MbarInit},
        {"mbarrier.init.shared.b64", Op::MbarInit},
        {"mbarrier.arrive.shared::cta.b64", Op::MbarArrive},
        {"mbarrier.arrive.shared.b64", Op::MbarArrive},
        {"mbarrier.arrive.release.cta.shared::cta.b64", Op::MbarArrive},
        {"mbarrier.arrive.expect_tx.shared::cta.b64", Op::MbarArriveExpectTx},
        {"mbarrier.arrive.expect_tx.release.cta.shared::cta.b64", Op::MbarArriveExpectTx},
        {"mbarrier.arrive.release.cluster.shared::cluster.b64", Op::MbarArriveRemote},
        {"mbarrier.try_wait.parity.shared::cta.b64", Op::MbarTryWaitParity},
        {"mbarrier.try_wait.parity.acquire.cta.shared::cta.b64", Op::MbarTryWaitParity},
        {"fence.mbarrier_init.release.cluster", Op::FenceMbarrierInit},
        {"fence.proxy.async.shared::cta", Op::FenceProxyAsync},
        {"fence.proxy.async", Op::FenceProxyAsync},
        {"mov.u32", Op::MovSpecial},
        {"mov.u64", Op::MovSpecial},
        {"prefetch.tensormap", Op::PrefetchTensormap},
        {"barrier.cluster.arrive.release", Op::ClusterArrive},
        {"barrier.cluster.arrive", Op::ClusterArrive},
        {"barrier.cluster.wait.acquire", Op::ClusterWait},
        {"barrier.cluster.wait", Op::ClusterWait},
        {"mapa.shared::cluster.u32", Op::Mapa},
        {"wgmma.fence.sync.aligned", Op::WgmmaFence},
        {"wgmma.commit_group.sync.aligned", Op::WgmmaCommit},
        {"wgmma.wait_group.sync.aligned", Op::WgmmaWait},
        {"setmaxnreg.inc.sync.aligned.u32", Op::SetmaxnregInc},
        {"setmaxnreg.dec.sync.aligned.u32", Op::SetmaxnregDec},
        {"bar.sync", Op::BarSync},
        {"barrier.sync.aligned", Op::BarSync},
        {"cp.async.cg.shared.global", Op::CpAsync},
        {"cp.async.ca.shared.global", Op::CpAsync},
        {"cp.async.commit_group", Op::CpAsyncCommit},
        {"cp.async.wait_group", Op::CpAsyncWait},
        {"selp.u32", Op::Selp},
        {"selp.b32", Op::Selp},
    };
    for (const Exact& e : exact) {
        if (o == e.name) {
            in->op = e.op;
            return true;
        }
    }
    if (starts_with(o, "setp.")) {
        // setp.<cmp>.<type> with cmp eq/ne and a 32-bit integer type: what the wrappers use to make predicates.
        char cmp[8] = {0}, type[8] = {0};
        if (std::sscanf(o.c_str(), "setp.%7[a-z].%7[a-z0-9]", cmp, type) == 2 &&
            (!std::strcmp(cmp, "ne") || !std::strcmp(cmp, "eq")) &&
            (!std::strcmp(type, "b32") || !std::strcmp(type, "u32") || !std::strcmp(type, "s32")) &&
            o == std::string("setp.") + cmp + "." + type) {
            in->op = Op::Setp;
            in->cmp = cmp;
            return true;
        }
    }
    // cp.async.bulk.tensor.<n>d.shared::cluster.global[.tile].mbarrier::complete_tx::bytes[.multicast::cluster]
    if (starts_with(o, "cp.async.bulk.tensor.")) {
        unsigned dims = 0;
        char rest[160] = {0};
        if (std::sscanf(o.c_str(), "cp.async.bulk.tensor.%ud.%159s", &dims, rest) == 2 && dims >= 1 && dims <= 5) {
            std::string r = rest;
            const char* base = "shared::cluster.global.mbarrier::complete_tx::bytes";
            const char* base_tile = "shared::cluster.global.tile.mbarrier::complete_tx::bytes";
            for (const char* b : {base, base_tile}) {
                if (r == b || r == std::string(b) + ".multicast::cluster") {
                    in->op = Op::TmaLoad;
                    in->tma_dims = dims;
                    in->multicast = r != b;
                    return true;
                }
            }
        }
    }
    // wgmma.mma_async.sync.aligned.m64n<N>k<K>.f32.<atype>.<btype>
    if (starts_with(o, "wgmma.mma_async.sync.aligned.")) {
        unsigned m = 0, n = 0, k = 0;
        char at[8] = {0}, bt[8] = {0};
        if (std::sscanf(o.c_str(), "wgmma.mma_async.sync.aligned.m%un%uk%u.f32.%7[a-z0-9].%7[a-z0-9]", &m, &n, &k, at,
                        bt) == 5) {
            const std::string a = at, b = bt;
            const bool fp8 = (a == "e4m3" || a == "e5m2") && (b == "e4m3" || b == "e5m2");
            const bool half = (a == "bf16" && b == "bf16") || (a == "f16" && b == "f16");
            char canon[128];
            std::snprintf(canon, sizeof canon, "wgmma.mma_async.sync.aligned.m%un%uk%u.f32.%s.%s", m, n, k, at, bt);
            // PTX ISA, wgmma "Matrix Shape": m64nNk32 for .e4m3/.e5m2 and m64nNk16 for .f16/.bf16, N a multiple
            // of 8 (of 16 for... no: N = 8..256 step 8 for these types) up to 256.
            if (o == canon && m == 64 && n >= 8 && n <= 256 && n % 8 == 0 && ((fp8 && k == 32) || (half && k == 16))) {
                in->op = Op::WgmmaMma;
                in->wg_m = m;
                in->wg_n = n;
                in->wg_k = k;
                in->wg_atype = a;
                in->wg_btype = b;
                return true;
            }
        }
    }
    *err = "unsupported instruction '" + o + "'";
    return false;
}

}  // namespace

bool parse_ptx(const char* ptx, Program* program, std::string* error) {
    Program prog;
    // Statements end at ';'. A '{' or '}' at the start of a statement opens/closes a scope; inside a statement
    // braces delimit vector operands.
    std::string text = ptx;
    size_t i = 0;
    while (i < text.size()) {
        while (i < text.size() && (std::isspace(static_cast<unsigned char>(text[i])) || text[i] == '{' || text[i] == '}'))
            ++i;
        if (i >= text.size()) break;
        int depth = 0;
        size_t j = i;
        while (j < text.size() && !(text[j] == ';' && depth == 0)) {
            if (text[j] == '{' || text[j] == '[') ++depth;
            if (text[j] == '}' || text[j] == ']') --depth;
            if (depth < 0) break;
            ++j;
        }
        if (j >= text.size() || text[j] != ';') {
            *error = "statement without ';': '" + trim(text.substr(i)) + "'";
            return false;
        }
        const std::string stmt = trim(text.substr(i, j - i));
        i = j + 1;
        if (stmt.empty()) continue;
        if (stmt[0] == '@') {
            *error = "predicated instructions are not supported: '" + stmt + "'";
            return false;
        }
        if (starts_with(stmt, ".reg")) {
            // .reg .pred p;  (only predicate locals are used by the wrappers)
            char type[16] = {0}, name[32] = {0};
            if (std::sscanf(stmt.c_str(), ".reg .%15s %31[A-Za-z0-9_]", type, name) != 2 || std::strcmp(type, "pred")) {
                *error = "unsupported declaration '" + stmt + "'";
                return false;
            }
            prog.locals.push_back(name);
            continue;
        }
        size_t sp = 0;
        while (sp < stmt.size() && !std::isspace(static_cast<unsigned char>(stmt[sp]))) ++sp;
        Instr in;
        in.opcode = stmt.substr(0, sp);
        if (!classify(&in, error)) return false;
        const std::string ops = trim(stmt.substr(sp));
        if (!ops.empty()) {
            for (const std::string& part : split_top(ops)) {
                Operand op;
                if (!parse_operand(part, prog, &op, error)) {
                    *error += " in '" + stmt + "'";
                    return false;
                }
                in.operands.push_back(op);
            }
        }
        prog.instrs.push_back(in);
    }
    *program = std::move(prog);
    return true;
}

namespace {

struct Checker {
    const char* const* constraints;
    int count;
    std::string err;

    // Letter of operand `i`'s constraint ('r', 'l', 'h', 'f', 'n') and whether it is an output.
    char letter(int i, bool* output) const {
        const char* c = constraints[i];
        *output = (*c == '=' || *c == '+');
        while (*c == '=' || *c == '+' || *c == '&') ++c;
        return *c;
    }

    bool ref(const Operand& o, const char* allowed, bool want_output, const Instr& in, const char* what) {
        if (o.kind != OperandKind::AsmRef) {
            err = std::string(what) + " of '" + in.opcode + "' must be an asm operand";
            return false;
        }
        if (o.index < 0 || o.index >= count) {
            err = "operand %" + std::to_string(o.index) + " of '" + in.opcode + "' does not exist (" +
                  std::to_string(count) + " operands)";
            return false;
        }
        bool output = false;
        const char l = letter(o.index, &output);
        if (!std::strchr(allowed, l)) {
            err = std::string(what) + " of '" + in.opcode + "' (%" + std::to_string(o.index) + ") has constraint '" +
                  constraints[o.index] + "', expected one of \"" + allowed + "\"";
            return false;
        }
        if (want_output && !output) {
            err = std::string(what) + " of '" + in.opcode + "' is written but %" + std::to_string(o.index) +
                  " is an input";
            return false;
        }
        return true;
    }
    // A value operand: an asm input/in-out reference or an immediate.
    bool value(const Operand& o, const char* allowed, const Instr& in, const char* what) {
        if (o.kind == OperandKind::Imm) return true;
        return ref(o, allowed, false, in, what);
    }
    bool address(const Operand& o, const Instr& in, size_t parts) {
        if (o.kind != OperandKind::Address || o.elems.size() != parts) {
            err = "'" + in.opcode + "' needs an address operand [..]";
            return false;
        }
        return ref(o.elems[0], "rl", false, in, "address");
    }
    bool arity(const Instr& in, size_t n) {
        if (in.operands.size() != n) {
            err = "'" + in.opcode + "' takes " + std::to_string(n) + " operands, got " +
                  std::to_string(in.operands.size());
            return false;
        }
        return true;
    }
    bool pred_local(const Operand& o, const Instr& in) {
        if (o.kind != OperandKind::Local) {
            err = "'" + in.opcode + "' needs a predicate register declared in the template";
            return false;
        }
        return true;
    }
    bool imm(const Operand& o, const Instr& in, const char* what) {
        if (o.kind == OperandKind::Imm) return true;
        if (o.kind == OperandKind::AsmRef && o.index >= 0 && o.index < count) {
            bool output = false;
            if (letter(o.index, &output) == 'n') return true;
        }
        err = std::string(what) + " of '" + in.opcode + "' must be an immediate";
        return false;
    }

    bool check(const Instr& in) {
        const auto& ops = in.operands;
        switch (in.op) {
            case Op::MbarInit:
                return arity(in, 2) && address(ops[0], in, 1) && value(ops[1], "r", in, "count");
            case Op::MbarArrive:
            case Op::MbarArriveRemote:
                if (ops.size() != 2 || ops[0].kind != OperandKind::Sink) {
                    err = "'" + in.opcode + "' is supported with a sink state operand '_' only";
                    return false;
                }
                return address(ops[1], in, 1);
            case Op::MbarArriveExpectTx:
                if (ops.size() != 3 || ops[0].kind != OperandKind::Sink) {
                    err = "'" + in.opcode + "' is supported with a sink state operand '_' only";
                    return false;
                }
                return address(ops[1], in, 1) && value(ops[2], "r", in, "tx count");
            case Op::MbarTryWaitParity:
                return arity(in, 3) && pred_local(ops[0], in) && address(ops[1], in, 1) &&
                       value(ops[2], "r", in, "parity");
            case Op::FenceMbarrierInit:
            case Op::FenceProxyAsync:
            case Op::ClusterArrive:
            case Op::ClusterWait:
            case Op::WgmmaFence:
            case Op::WgmmaCommit:
            case Op::CpAsyncCommit:
                return arity(in, 0);
            case Op::MovSpecial: {
                if (!arity(in, 2)) return false;
                if (ops[1].kind != OperandKind::Special) {
                    err = "'" + in.opcode + "' is supported with a special-register source only";
                    return false;
                }
                static const char* const u32[] = {"cluster_ctarank", "clusterid.x", "clusterid.y", "clusterid.z",
                                                  "nclusterid.x", "nclusterid.y", "nclusterid.z", "cluster_nctarank"};
                const bool is64 = in.opcode == "mov.u64";
                bool known = false;
                if (is64) known = ops[1].name == "globaltimer";
                else
                    for (const char* s : u32) known |= ops[1].name == s;
                if (!known) {
                    err = "special register %" + ops[1].name + " is not supported with '" + in.opcode + "'";
                    return false;
                }
                return ref(ops[0], is64 ? "l" : "r", true, in, "destination");
            }
            case Op::PrefetchTensormap:
                return arity(in, 1) && address(ops[0], in, 1);
            case Op::TmaLoad: {
                const size_t n = in.multicast ? 4 : 3;
                if (!arity(in, n) || !address(ops[0], in, 1) || !address(ops[1], in, 2) || !address(ops[2], in, 1))
                    return false;
                const Operand& coords = ops[1].elems[1];
                if (coords.kind != OperandKind::Vector || coords.elems.size() != in.tma_dims) {
                    err = "'" + in.opcode + "' needs " + std::to_string(in.tma_dims) + " coordinates";
                    return false;
                }
                for (const Operand& c : coords.elems)
                    if (!value(c, "r", in, "coordinate")) return false;
                return !in.multicast || value(ops[3], "h", in, "cta mask");
            }
            case Op::Mapa:
                return arity(in, 3) && ref(ops[0], "r", true, in, "destination") && value(ops[1], "r", in, "address") &&
                       value(ops[2], "r", in, "rank");
            case Op::WgmmaWait:
                return arity(in, 1) && imm(ops[0], in, "group count");
            case Op::SetmaxnregInc:
            case Op::SetmaxnregDec:
                return arity(in, 1) && imm(ops[0], in, "register count");
            case Op::BarSync:
                if (ops.size() != 1 && ops.size() != 2) return arity(in, 2);
                for (const Operand& o : ops)
                    if (!value(o, "r", in, "barrier operand")) return false;
                return true;
            case Op::CpAsync:
                if (ops.size() != 3 && ops.size() != 4) return arity(in, 4);
                return address(ops[0], in, 1) && address(ops[1], in, 1) && imm(ops[2], in, "copy size") &&
                       (ops.size() == 3 || value(ops[3], "r", in, "source size"));
            case Op::CpAsyncWait:
                return arity(in, 1) && imm(ops[0], in, "group count");
            case Op::Setp:
                return arity(in, 3) && pred_local(ops[0], in) && value(ops[1], "r", in, "a") && value(ops[2], "r", in, "b");
            case Op::Selp:
                return arity(in, 4) && ref(ops[0], "r", true, in, "destination") && value(ops[1], "r", in, "a") &&
                       value(ops[2], "r", in, "b") && pred_local(ops[3], in);
            case Op::WgmmaMma: {
                // d, a-desc or {a regs}, b-desc, scale-d, imm-scale-a, imm-scale-b[, imm-trans-a, imm-trans-b]
                const bool half = in.wg_atype == "bf16" || in.wg_atype == "f16";
                if (ops.size() < 6) return arity(in, 6);
                const Operand& d = ops[0];
                if (d.kind != OperandKind::Vector || d.elems.size() != in.wg_n / 2) {
                    err = "'" + in.opcode + "' needs " + std::to_string(in.wg_n / 2) + " accumulator registers";
                    return false;
                }
                for (const Operand& r : d.elems)
                    if (!ref(r, "f", true, in, "accumulator")) return false;
                const bool a_regs = ops[1].kind == OperandKind::Vector;
                if (a_regs) {
                    if (!half || ops[1].elems.size() != 4) {
                        err = "register-A '" + in.opcode + "' needs 4 A registers (and .f16/.bf16)";
                        return false;
                    }
                    for (const Operand& r : ops[1].elems)
                        if (!ref(r, "r", false, in, "A register")) return false;
                } else if (!ref(ops[1], "l", false, in, "A descriptor")) {
                    return false;
                }
                if (!ref(ops[2], "l", false, in, "B descriptor")) return false;
                if (ops[3].kind != OperandKind::Local) {
                    if (!value(ops[3], "rn", in, "scale-d")) return false;
                }
                // PTX ISA wgmma.mma_async: imm-trans-a/imm-trans-b exist only for .f16/.bf16; register A takes
                // only imm-trans-b.
                const size_t expect = half ? (a_regs ? 7 : 8) : 6;
                if (ops.size() != expect) return arity(in, expect);
                for (size_t i = 4; i < ops.size(); ++i)
                    if (!imm(ops[i], in, "immediate flag")) return false;
                return true;
            }
        }
        err = "unhandled instruction";
        return false;
    }
};

}  // namespace

std::string validate_program(const Program& program, const char* const* constraints, int count) {
    Checker c{constraints, count, {}};
    for (const Instr& in : program.instrs) {
        if (!c.check(in)) return c.err;
    }
    return {};
}

int check_template_sites(const TemplateSite* sites, int count) {
    int bad = 0;
    for (int i = 0; i < count; ++i) {
        Program p;
        std::string err;
        if (parse_ptx(sites[i].ptx, &p, &err)) err = validate_program(p, sites[i].constraints, sites[i].count);
        if (!err.empty()) {
            std::printf("  %s: %s\n      template: %s\n", sites[i].site, err.c_str(), sites[i].ptx);
            ++bad;
        }
    }
    if (bad) std::printf("%d of %d inline-PTX statements are not supported by the emulator\n", bad, count);
    return bad ? 1 : 0;
}

}  // namespace r1k_emu
