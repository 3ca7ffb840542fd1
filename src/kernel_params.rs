//! The kernels' argument structs. Every kernel takes its scalars and pointers as one `__grid_constant__` struct
//! declared in a `kernels/common/*_params.cuh` header; its Rust twin is declared with [`kernel_params!`], which states
//! every field's byte offset and the size and checks them at compile time. The header pins the same numbers with
//! `static_assert(offsetof(T, field) == n, …)` lines, and each params module's test reads those lines
//! ([`assert_header_pins`]) so the two sides cannot drift: a field added, removed, reordered or retyped on one side
//! only fails to build or fails that test.

/// A kernel argument struct declared by [`kernel_params!`].
#[cfg(test)]
pub(crate) trait KernelParams {
    /// The struct's name, as the header spells it.
    const NAME: &'static str;
    /// `(field, byte offset)` of every field, in declaration order.
    const LAYOUT: &'static [(&'static str, usize)];
    /// `size_of::<Self>()`.
    const SIZE: usize;
}

/// Declares a `#[repr(C)]` kernel argument struct with the byte offset of each field and its size, all checked at
/// compile time, and implements `DeviceRepr` (it is passed by value) and [`KernelParams`] for it.
///
/// ```ignore
/// kernel_params! {
///     /// Docs.
///     pub(crate) struct AddParams = 24 bytes {
///         a: u64 @ 0,
///         n: i64 @ 16,
///     }
/// }
/// ```
macro_rules! kernel_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident = $size:literal bytes {
        $($field:ident: $ty:ident @ $offset:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        $vis struct $name {
            $(pub $field: $ty,)+
        }

        // SAFETY: plain old data (integers, floats and device addresses) whose C layout is checked below, field by
        // field, against the offsets the kernels' header pins.
        unsafe impl cudarc::driver::DeviceRepr for $name {}

        const _: () = {
            assert!(std::mem::size_of::<$name>() == $size);
            $(assert!(std::mem::offset_of!($name, $field) == $offset);)+
        };

        #[cfg(test)]
        impl $crate::kernel_params::KernelParams for $name {
            const NAME: &'static str = stringify!($name);
            const LAYOUT: &'static [(&'static str, usize)] = &[$((stringify!($field), $offset)),+];
            const SIZE: usize = $size;
        }
    };
}
pub(crate) use kernel_params;

/// `(fields in order with their offsets, size)` that `header` asserts for struct `ty`.
#[cfg(test)]
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

/// Panics unless `header` pins exactly `P`'s fields, in order, at `P`'s offsets, and `P`'s size.
#[cfg(test)]
pub(crate) fn assert_header_pins<P: KernelParams>(header_path: &str, header: &str) {
    let (fields, size) = header_layout(header, P::NAME);
    let ours: Vec<(String, usize)> = P::LAYOUT.iter().map(|&(f, o)| (f.to_string(), o)).collect();
    assert_eq!(fields, ours, "{header_path} and the Rust {} disagree on the fields", P::NAME);
    assert_eq!(size, P::SIZE, "{header_path} and the Rust {} disagree on the size", P::NAME);
}

#[cfg(test)]
mod tests {
    use super::*;

    kernel_params! {
        struct Sample = 24 bytes {
            ptr: u64 @ 0,
            n: i32 @ 8,
            scale: f32 @ 12,
            len: i64 @ 16,
        }
    }

    const HEADER: &str =
        "struct Sample {\n    const void* ptr;\n    int n;\n    float scale;\n    long long len;\n};\n\
        static_assert(sizeof(Sample) == 24, \"Sample layout: size\");\n\
        static_assert(offsetof(Sample, ptr) == 0, \"Sample layout: ptr\");\n\
        static_assert(offsetof(Sample, n) == 8, \"Sample layout: n\");\n\
        static_assert(offsetof(Sample, scale) == 12, \"Sample layout: scale\");\n\
        static_assert(offsetof(Sample, len) == 16, \"Sample layout: len\");\n";

    #[test]
    fn a_matching_header_passes() {
        assert_header_pins::<Sample>("sample.cuh", HEADER);
    }

    #[test]
    #[should_panic(expected = "disagree on the fields")]
    fn a_reordered_header_fails() {
        let swapped = HEADER
            .replace("(Sample, n) == 8", "(Sample, n) == 12")
            .replace("(Sample, scale) == 12", "(Sample, scale) == 8");
        assert_header_pins::<Sample>("sample.cuh", &swapped);
    }

    #[test]
    #[should_panic(expected = "disagree on the fields")]
    fn a_header_missing_a_field_fails() {
        let missing: String =
            HEADER.lines().filter(|l| !l.contains("(Sample, len)")).map(|l| format!("{l}\n")).collect();
        assert_header_pins::<Sample>("sample.cuh", &missing);
    }

    #[test]
    #[should_panic(expected = "disagree on the size")]
    fn a_header_of_another_size_fails() {
        assert_header_pins::<Sample>("sample.cuh", &HEADER.replace("sizeof(Sample) == 24", "sizeof(Sample) == 32"));
    }
}
