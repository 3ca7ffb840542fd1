//! Test support for the kernels' argument structs (`src/mla/params.rs`, `src/fp8_gemm/params.rs`): reads the layout a
//! CUDA header pins with `static_assert(offsetof(T, field) == n, …)` and `static_assert(sizeof(T) == n, …)` lines,
//! so a test can compare it with the Rust twin's `offset_of!`.

/// `(fields in order with their offsets, size)` that `header` asserts for struct `ty`.
pub(crate) fn header_layout(header: &str, ty: &str) -> (Vec<(String, usize)>, usize) {
    let offset_prefix = format!("static_assert(offsetof({ty}, ");
    let size_prefix = format!("static_assert(sizeof({ty}) == ");
    let number = |s: &str| -> usize { s.split(',').next().unwrap().trim().parse().unwrap() };
    let mut fields = Vec::new();
    let mut size = 0;
    for line in header.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix(&offset_prefix) {
            let (field, rest) = rest.split_once(')').unwrap();
            fields.push((field.to_string(), number(rest.trim_start_matches(" == "))));
        } else if let Some(rest) = line.strip_prefix(&size_prefix) {
            size = number(rest);
        }
    }
    (fields, size)
}
