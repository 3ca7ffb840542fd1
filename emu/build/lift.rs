//! Lifts a preprocessed kernel translation unit (g++ -E with cpp/prelude.h force-included) into host C++ that runs
//! on the emulator:
//! - every GNU `asm` statement of the kernel sources becomes `r1k_emu::inline_ptx(site, "template", operands, n)`,
//!   operands numbered as GCC numbers them (outputs, then inputs), so the emulator executes the very PTX strings the
//!   GPU runs;
//! - every `__shared__` declaration becomes per-CTA storage (`static_smem` / `dynamic_smem`);
//! - every `extern "C" __global__` definition is registered by name with a trampoline for cuLaunchKernel's
//!   parameter array.
//!
//! Only code from files under the kernels directory is rewritten; system and CUDA headers pass through untouched.

use std::fmt::Write as _;

/// One lifted asm statement, for the build-time template check.
pub struct AsmSite {
    pub site: String,
    /// The template exactly as its C++ string-literal tokens (adjacent literals, not yet concatenated).
    pub template_literals: String,
    pub constraints: Vec<String>,
}

pub struct Lifted {
    pub code: String,
    pub kernels: Vec<String>,
    pub asm_sites: Vec<AsmSite>,
}

struct Scanner<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> u8 {
        *self.src.get(self.pos).unwrap_or(&0)
    }

    fn skip_ws(&mut self) {
        while self.pos < self.src.len() {
            let c = self.src[self.pos];
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if c == b'#' && self.at_line_start(self.pos) {
                self.skip_line();
            } else {
                break;
            }
        }
    }

    fn at_line_start(&self, at: usize) -> bool {
        let mut i = at;
        while i > 0 {
            let c = self.src[i - 1];
            if c == b'\n' {
                return true;
            }
            if c != b' ' && c != b'\t' {
                return false;
            }
            i -= 1;
        }
        true
    }

    fn skip_line(&mut self) {
        while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
            self.pos += 1;
        }
    }

    /// Skips a string or char literal starting at pos (which holds the quote).
    fn skip_literal(&mut self) {
        let quote = self.src[self.pos];
        self.pos += 1;
        while self.pos < self.src.len() {
            let c = self.src[self.pos];
            self.pos += 1;
            if c == b'\\' {
                self.pos += 1;
            } else if c == quote {
                return;
            }
        }
    }

    fn ident_at(&self, at: usize) -> Option<&'a str> {
        let is_start = |c: u8| c.is_ascii_alphabetic() || c == b'_';
        if at >= self.src.len() || !is_start(self.src[at]) {
            return None;
        }
        if at > 0 && (self.src[at - 1].is_ascii_alphanumeric() || self.src[at - 1] == b'_') {
            return None;
        }
        let mut end = at;
        while end < self.src.len() && (self.src[end].is_ascii_alphanumeric() || self.src[end] == b'_') {
            end += 1;
        }
        std::str::from_utf8(&self.src[at..end]).ok()
    }

    /// From an opening bracket at pos, returns the index of its matching closer (skipping literals).
    fn matching(&mut self, open: u8, close: u8) -> Result<usize, String> {
        let mut depth = 0usize;
        while self.pos < self.src.len() {
            let c = self.src[self.pos];
            if c == b'"' || c == b'\'' {
                self.skip_literal();
                continue;
            }
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(self.pos);
                }
            }
            self.pos += 1;
        }
        Err(format!("unbalanced '{}'", open as char))
    }
}

/// Tracks `# line "file"` markers to name source locations.
struct LineMap {
    /// (byte offset where the marker's next line starts, line number of that line, file)
    marks: Vec<(usize, usize, String)>,
}

impl LineMap {
    fn new(src: &str) -> LineMap {
        let mut marks = Vec::new();
        let mut offset = 0;
        for line in src.split_inclusive('\n') {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("# ") {
                let mut parts = rest.splitn(2, ' ');
                if let (Some(num), Some(tail)) = (parts.next(), parts.next()) {
                    if let (Ok(n), Some(q1)) = (num.parse::<usize>(), tail.find('"')) {
                        if let Some(q2) = tail[q1 + 1..].find('"') {
                            marks.push((offset + line.len(), n, tail[q1 + 1..q1 + 1 + q2].to_string()));
                        }
                    }
                }
            }
            offset += line.len();
        }
        LineMap { marks }
    }

    fn locate(&self, src: &str, at: usize) -> (String, usize) {
        let idx = self.marks.partition_point(|m| m.0 <= at);
        if idx == 0 {
            return ("?".into(), 0);
        }
        let (start, line, file) = &self.marks[idx - 1];
        let newlines = src.as_bytes()[*start..at].iter().filter(|&&c| c == b'\n').count();
        (file.clone(), line + newlines)
    }
}

fn short_file(file: &str, kernels_dir: &str) -> String {
    match file.find(kernels_dir) {
        Some(i) => format!("kernels{}", &file[i + kernels_dir.len()..]),
        None => file.to_string(),
    }
}

fn c_ident(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// Lifts one preprocessed TU. `kernels_dir` is the absolute kernels directory (only files below it are rewritten);
/// `stem` names the TU (used in generated identifiers).
pub fn lift(src: &str, kernels_dir: &str, stem: &str) -> Result<Lifted, String> {
    let lines = LineMap::new(src);
    let bytes = src.as_bytes();
    let mut sc = Scanner { src: bytes, pos: 0 };
    let mut kernels = Vec::new();
    let mut asm_sites = Vec::new();
    // (start, end, replacement), applied at the end in order.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let mut shared_count = 0usize;

    while sc.pos < bytes.len() {
        let c = bytes[sc.pos];
        if c == b'"' || c == b'\'' {
            sc.skip_literal();
            continue;
        }
        if c == b'#' && sc.at_line_start(sc.pos) {
            sc.skip_line();
            continue;
        }
        let Some(word) = sc.ident_at(sc.pos) else {
            sc.pos += 1;
            continue;
        };
        let start = sc.pos;
        if !matches!(word, "asm" | "__asm__" | "__asm" | "__r1k_shared__" | "__r1k_global__") {
            sc.pos += word.len();
            continue;
        }
        let (file, line) = lines.locate(src, start);
        if !file.contains(kernels_dir) {
            sc.pos += word.len();
            continue;
        }
        let site = format!("{}:{}", short_file(&file, kernels_dir), line);
        match word {
            "asm" | "__asm__" | "__asm" => {
                let (replacement, end, asm_site) = lift_asm(&mut sc, start, word.len(), &site)?;
                edits.push((start, end, replacement));
                sc.pos = end;
                asm_sites.push(asm_site);
            }
            "__r1k_shared__" => {
                shared_count += 1;
                let (decl_start, replacement, end) = lift_shared(&mut sc, start, &site, shared_count)?;
                let resume = format!("{replacement}\n# {} \"{}\"\n", lines.locate(src, end).1, file);
                edits.push((decl_start, end, resume));
                sc.pos = end;
            }
            "__r1k_global__" => {
                let after = start + word.len();
                edits.push((start, after, String::new()));
                if let Some((name, body_end)) = kernel_definition(&mut sc, start, after)? {
                    let at = body_end + 1;
                    let (_, resume_line) = lines.locate(src, at);
                    edits.push((
                        at,
                        at,
                        format!(
                            "\nstatic const bool r1k_emu_registered_{name} = ::r1k_emu::register_kernel(\"{name}\", \
                             [](void** p) {{ ::r1k_emu::invoke_kernel(&{name}, p); }}, \
                             decltype(::r1k_emu::param_sizes_of(&{name}))::count, \
                             decltype(::r1k_emu::param_sizes_of(&{name}))::sizes);\n# {resume_line} \"{file}\"\n"
                        ),
                    ));
                    kernels.push(name);
                }
                sc.pos = after;
            }
            _ => unreachable!(),
        }
    }
    edits.sort_by_key(|e| (e.0, e.1));
    let mut out = String::with_capacity(src.len() + src.len() / 4);
    let mut copied = 0usize;
    for (start, end, text) in edits {
        if start < copied {
            return Err(format!("{stem}: overlapping rewrites at byte {start}"));
        }
        out.push_str(&src[copied..start]);
        out.push_str(&text);
        copied = end;
    }
    out.push_str(&src[copied..]);
    let _ = write!(out, "\nextern \"C\" void r1k_emu_tu_{}() {{}}\n", c_ident(stem));
    Ok(Lifted { code: out, kernels, asm_sites })
}

/// Returns (replacement, end offset, site record) for the asm statement whose keyword starts at `start`.
fn lift_asm(sc: &mut Scanner, start: usize, kw_len: usize, site: &str) -> Result<(String, usize, AsmSite), String> {
    let src = sc.src;
    sc.pos = start + kw_len;
    sc.skip_ws();
    while let Some(q) = sc.ident_at(sc.pos) {
        if matches!(q, "volatile" | "__volatile__" | "__volatile" | "inline" | "goto") {
            if q == "goto" {
                return Err(format!("{site}: asm goto is not supported"));
            }
            sc.pos += q.len();
            sc.skip_ws();
        } else {
            break;
        }
    }
    if sc.peek() != b'(' {
        return Err(format!("{site}: expected '(' after asm"));
    }
    let open = sc.pos;
    let close = sc.matching(b'(', b')')?;
    let inner = &src[open + 1..close];
    // Split at top-level ':' (operand expressions are inside parentheses, so their '::' never is).
    let sections = split_top_level(inner, b':');
    let text = |r: (usize, usize)| String::from_utf8_lossy(&inner[r.0..r.1]).trim().to_string();
    let template = text(sections[0]);
    if !template.starts_with('"') {
        return Err(format!("{site}: asm template is not a string literal: {template}"));
    }
    let outputs = sections.get(1).map(|&r| split_operands(&inner[r.0..r.1])).transpose()?.unwrap_or_default();
    let inputs = sections.get(2).map(|&r| split_operands(&inner[r.0..r.1])).transpose()?.unwrap_or_default();
    if sections.len() > 4 {
        return Err(format!("{site}: asm with goto labels is not supported"));
    }
    // The statement must end with ';'.
    sc.pos = close + 1;
    sc.skip_ws();
    if sc.peek() != b';' {
        return Err(format!("{site}: asm statement not followed by ';'"));
    }
    let end = sc.pos + 1;

    let mut constraints = Vec::new();
    let mut ops = Vec::new();
    for (constraint, expr) in &outputs {
        let bare = constraint.trim_matches('"');
        if !(bare.starts_with('=') || bare.starts_with('+')) {
            return Err(format!("{site}: output operand constraint {constraint} is neither '=' nor '+'"));
        }
        constraints.push(bare.to_string());
        ops.push(format!("::r1k_emu::asm_out({constraint}, {expr})"));
    }
    for (constraint, expr) in &inputs {
        constraints.push(constraint.trim_matches('"').to_string());
        ops.push(format!("::r1k_emu::asm_in({constraint}, {expr})"));
    }
    let call = if ops.is_empty() {
        format!("::r1k_emu::inline_ptx(\"{site}\", {template}, nullptr, 0)")
    } else {
        format!(
            "::r1k_emu::AsmOperand r1k_emu_ops[] = {{{}}}; ::r1k_emu::inline_ptx(\"{site}\", {template}, r1k_emu_ops, {})",
            ops.join(", "),
            ops.len()
        )
    };
    // Keep the statement on one line so the following line numbers stay right.
    let replacement = format!("{{ {call}; }}").replace('\n', " ");
    let newlines = src[start..end].iter().filter(|&&c| c == b'\n').count();
    let replacement = replacement + &"\n".repeat(newlines);
    Ok((replacement, end, AsmSite { site: site.to_string(), template_literals: template, constraints }))
}

/// Byte ranges of `text` between occurrences of `sep` outside brackets and string or char literals.
fn split_top_level(text: &[u8], sep: u8) -> Vec<(usize, usize)> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        let c = text[i];
        if c == b'"' || c == b'\'' {
            let mut s = Scanner { src: text, pos: i };
            s.skip_literal();
            i = s.pos;
            continue;
        }
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ if c == sep && depth == 0 => {
                parts.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push((start, text.len()));
    parts
}

/// Splits `"c"(expr), "c"(expr)` into (constraint literal, expr) pairs.
fn split_operands(sec: &[u8]) -> Result<Vec<(String, String)>, String> {
    let parts = split_top_level(sec, b',').into_iter().map(|(a, b)| &sec[a..b]);
    let mut out = Vec::new();
    for p in parts {
        let s = String::from_utf8_lossy(p).trim().to_string();
        if s.is_empty() {
            continue;
        }
        if s.starts_with('[') {
            return Err(format!("named asm operands are not supported: {s}"));
        }
        let close_q = s[1..].find('"').ok_or_else(|| format!("bad asm operand: {s}"))? + 1;
        let constraint = s[..=close_q].to_string();
        let rest = s[close_q + 1..].trim();
        if !(rest.starts_with('(') && rest.ends_with(')')) {
            return Err(format!("bad asm operand expression: {s}"));
        }
        out.push((constraint, rest[1..rest.len() - 1].to_string()));
    }
    Ok(out)
}

/// Rewrites the `__shared__` declaration containing the marker at `marker`. Returns (start of the declaration,
/// replacement, end offset after its ';').
fn lift_shared(sc: &mut Scanner, marker: usize, site: &str, serial: usize) -> Result<(usize, String, usize), String> {
    let src = sc.src;
    // Declaration start: back up over `extern` / `static` directly before the marker.
    let mut decl_start = marker;
    let mut is_extern = false;
    {
        let before = String::from_utf8_lossy(&src[marker.saturating_sub(40)..marker]).to_string();
        let trimmed = before.trim_end();
        for kw in ["extern", "static"] {
            if trimmed.ends_with(kw) {
                let kw_pos = marker.saturating_sub(40) + trimmed.len() - kw.len();
                decl_start = kw_pos;
                is_extern = kw == "extern";
            }
        }
    }
    let mut end = marker;
    while end < src.len() && src[end] != b';' {
        if src[end] == b'{' || src[end] == b'=' {
            return Err(format!("{site}: initialized or unusual __shared__ declaration"));
        }
        end += 1;
    }
    let decl = String::from_utf8_lossy(&src[marker + "__r1k_shared__".len()..end]).replace('\n', " ");
    // Pull out __attribute__((...)) groups, remembering an aligned(n).
    let mut rest = decl.trim().to_string();
    let mut align: Option<String> = None;
    while let Some(p) = rest.find("__attribute__") {
        let open = rest[p..].find("((").ok_or_else(|| format!("{site}: bad __attribute__"))? + p;
        let mut depth = 0;
        let mut close = open;
        for (i, ch) in rest[open..].char_indices() {
            if ch == '(' {
                depth += 1;
            } else if ch == ')' {
                depth -= 1;
                if depth == 0 {
                    close = open + i;
                    break;
                }
            }
        }
        let attr = rest[open + 2..close - 1].to_string();
        if let Some(a) = attr.trim().strip_prefix("aligned(").and_then(|a| a.strip_suffix(')')) {
            align = Some(a.to_string());
        }
        rest = format!("{} {}", &rest[..p], &rest[close + 1..]);
    }
    let rest = rest.trim();
    // rest = "<type tokens> <name><dims>"
    let name_end = rest.find('[').unwrap_or(rest.len());
    let head = rest[..name_end].trim_end();
    let dims = rest[name_end..].trim();
    let name_start = head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map(|i| i + 1).unwrap_or(0);
    let name = &head[name_start..];
    let ty = head[..name_start].trim();
    if name.is_empty() || ty.is_empty() {
        return Err(format!("{site}: cannot parse __shared__ declaration `{rest}`"));
    }
    let align_expr = match &align {
        Some(a) => format!("(alignof({ty}) > ({a}) ? alignof({ty}) : ({a}))"),
        None => format!("alignof({ty})"),
    };
    let replacement = if is_extern {
        if dims != "[]" {
            return Err(format!("{site}: extern __shared__ must be an array of unknown bound"));
        }
        format!("\n#undef {name}\n#define {name} (reinterpret_cast<{ty}*>(::r1k_emu::dynamic_smem()))\n",)
    } else {
        let id = format!("{site}:{name}#{serial}");
        if dims.is_empty() {
            format!(
                "{ty}& {name} = *reinterpret_cast<{ty}*>(::r1k_emu::static_smem(\"{id}\", sizeof({ty}), {align_expr}));"
            )
        } else {
            format!(
                "{ty} (&{name}){dims} = *reinterpret_cast<{ty} (*){dims}>(::r1k_emu::static_smem(\"{id}\", \
                 sizeof({ty}{dims}), {align_expr}));"
            )
        }
    };
    Ok((decl_start, replacement, end + 1))
}

/// After `__r1k_global__`, finds `<ret> <name>(params) {` and returns the kernel name and the offset of the body's
/// closing brace, if this is an `extern "C"` definition.
fn kernel_definition(sc: &mut Scanner, marker: usize, after: usize) -> Result<Option<(String, usize)>, String> {
    let src = sc.src;
    let look_back = String::from_utf8_lossy(&src[marker.saturating_sub(64)..marker]).to_string();
    if !look_back.contains("extern \"C\"") {
        return Ok(None);
    }
    sc.pos = after;
    let mut name = None;
    while sc.pos < src.len() {
        sc.skip_ws();
        if sc.peek() == b'(' {
            break;
        }
        if let Some(w) = sc.ident_at(sc.pos) {
            name = Some(w.to_string());
            sc.pos += w.len();
        } else {
            sc.pos += 1;
        }
    }
    let name = name.ok_or("kernel without a name")?;
    sc.matching(b'(', b')')?;
    sc.pos += 1;
    sc.skip_ws();
    if sc.peek() != b'{' {
        return Ok(None); // a declaration
    }
    let body_end = sc.matching(b'{', b'}')?;
    Ok(Some((name, body_end)))
}
