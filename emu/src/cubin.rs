//! A reader for the parts of an sm_90a cubin (an ELF64 image) the driver needs: which kernels it contains
//! (sections `.text.<name>`) and what the loader would learn about each from `.nv.info*`: parameter layout, launch
//! bounds, required cluster shape, registers, static shared memory and stack frame.
//!
//! cuModuleLoadData receives a bare pointer, so the image's extent comes from its own headers, as in the real
//! driver; every read after that is bounds-checked against that extent.

use std::collections::BTreeMap;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_CUDA: u16 = 190;
const ELF_HEADER_BYTES: usize = 64;
const SECTION_HEADER_BYTES: usize = 64;
const SHT_NOBITS: u32 = 8;
/// A fatbinary container starts with this (little-endian) word.
const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// Images larger than this are not cubins of this crate; refusing them bounds what a corrupt header can make the
/// reader touch.
const MAX_IMAGE_BYTES: u64 = 1 << 30;

// .nv.info attribute formats and the attributes read here (as cuobjdump names them).
const EIFMT_NVAL: u8 = 0x01;
const EIFMT_BVAL: u8 = 0x02;
const EIFMT_HVAL: u8 = 0x03;
const EIFMT_SVAL: u8 = 0x04;
const EIATTR_MAX_THREADS: u8 = 0x05;
const EIATTR_REQNTID: u8 = 0x10;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const EIATTR_KPARAM_INFO: u8 = 0x17;
const EIATTR_CBANK_PARAM_SIZE: u8 = 0x19;
const EIATTR_REGCOUNT: u8 = 0x2f;
const EIATTR_CTA_PER_CLUSTER: u8 = 0x3d;
const EIATTR_EXPLICIT_CLUSTER: u8 = 0x3e;

/// What loading an image found wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// PTX source text: the emulator runs cubins only.
    PtxText,
    /// A fatbinary container rather than a bare cubin.
    Fatbinary,
    /// A cubin for another architecture.
    WrongArch(u32),
    /// Not a well-formed CUDA ELF image.
    Malformed(String),
}

/// What the cubin says about one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelInfo {
    /// (offset, size) in bytes of each parameter in the parameter bank, by ordinal; empty when the cubin records
    /// no parameter layout.
    pub params: Vec<ParamSlot>,
    /// Total size of the parameter bank.
    pub param_bytes: u32,
    /// `__launch_bounds__` maximum threads per block (x·y·z of .maxntid).
    pub max_threads: Option<u32>,
    /// Required block shape (.reqntid).
    pub required_block: Option<[u32; 3]>,
    /// Compile-time cluster shape (`__cluster_dims__`).
    pub required_cluster: Option<[u32; 3]>,
    /// The kernel must be launched with a cluster.
    pub explicit_cluster: bool,
    pub registers: Option<u32>,
    pub static_smem_bytes: u32,
    pub frame_bytes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSlot {
    pub offset: u32,
    pub size: u32,
}

/// Kernels of a cubin by name.
#[derive(Debug, Clone, Default)]
pub struct Cubin {
    pub kernels: BTreeMap<String, KernelInfo>,
}

#[derive(Debug, Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    info: u32,
}

fn malformed(what: impl Into<String>) -> ImageError {
    ImageError::Malformed(what.into())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the image at `image`, reading only as far as its own headers say it extends.
///
/// # Safety
/// `image` must point to a loadable module image (cubin, fatbinary or NUL-terminated PTX), readable over the extent
/// its headers describe, as cuModuleLoadData requires.
pub unsafe fn parse_image_at(image: *const u8) -> Result<Cubin, ImageError> {
    // Read the magic byte by byte, stopping at a NUL: a short PTX string may end before 4 bytes.
    let mut magic = Vec::with_capacity(4);
    for i in 0..4 {
        // SAFETY: bytes up to the first NUL (or the first 4) are readable for any module image.
        let byte = unsafe { *image.add(i) };
        if byte == 0 {
            break;
        }
        magic.push(byte);
    }
    if magic.as_slice() != ELF_MAGIC {
        if magic.len() < 4 {
            return Err(malformed("an empty or 1-3 byte string is not a module image"));
        }
        // SAFETY: not ELF, so a fatbinary or NUL-terminated text; its first 4 bytes were readable above.
        return Err(unsafe { classify_non_elf(image) });
    }
    // SAFETY: an ELF image starts with its 64-byte header.
    let header = unsafe { std::slice::from_raw_parts(image, ELF_HEADER_BYTES) };
    let extent = image_extent(header, |offset, len| {
        // SAFETY: the section header table lies inside the image per the caller's contract (the header says where).
        unsafe { std::slice::from_raw_parts(image.add(offset), len) }.to_vec()
    })?;
    // SAFETY: the extent is what the image's own headers describe.
    let bytes = unsafe { std::slice::from_raw_parts(image, extent) };
    parse_cubin(bytes)
}

/// Fatbinary or text: which refusal applies.
///
/// # Safety
/// `image` must be a fatbinary or NUL-terminated text, with 4 readable bytes.
unsafe fn classify_non_elf(image: *const u8) -> ImageError {
    // SAFETY: 4 bytes are readable (checked by the caller).
    let word = u32::from_le_bytes(unsafe { [*image, *image.add(1), *image.add(2), *image.add(3)] });
    if word == FATBIN_MAGIC {
        return ImageError::Fatbinary;
    }
    // SAFETY: not a fatbinary, so per the contract it is NUL-terminated text.
    let text = unsafe { std::ffi::CStr::from_ptr(image.cast()) }.to_string_lossy();
    let trimmed = text.trim_start();
    if trimmed.starts_with("//") || trimmed.starts_with(".version") || trimmed.contains(".entry") {
        ImageError::PtxText
    } else {
        malformed("neither an ELF cubin, a fatbinary nor PTX text")
    }
}

/// Bytes the image spans: the furthest of its section header table and its sections' contents.
fn image_extent(header: &[u8], read: impl Fn(usize, usize) -> Vec<u8>) -> Result<usize, ImageError> {
    check_header(header)?;
    let shoff = u64_at(header, 0x28).unwrap_or(0);
    let shentsize = u16_at(header, 0x3a).unwrap_or(0) as u64;
    let shnum = u16_at(header, 0x3c).unwrap_or(0) as u64;
    if shentsize != SECTION_HEADER_BYTES as u64 {
        return Err(malformed(format!("section header entries of {shentsize} bytes (expected 64)")));
    }
    let table_end = shoff.checked_add(shnum * shentsize).filter(|&e| e <= MAX_IMAGE_BYTES);
    let Some(table_end) = table_end else {
        return Err(malformed("section header table beyond 1 GiB"));
    };
    let table = read(shoff as usize, (shnum * shentsize) as usize);
    let mut extent = table_end.max(ELF_HEADER_BYTES as u64);
    for i in 0..shnum as usize {
        let s = section_at(&table, i * SECTION_HEADER_BYTES).ok_or_else(|| malformed("truncated section table"))?;
        if s.kind != SHT_NOBITS {
            let end = s.offset.checked_add(s.size).filter(|&e| e <= MAX_IMAGE_BYTES);
            extent = extent.max(end.ok_or_else(|| malformed(format!("section {i} extends beyond 1 GiB")))?);
        }
    }
    Ok(extent as usize)
}

fn check_header(h: &[u8]) -> Result<(), ImageError> {
    if h.len() < ELF_HEADER_BYTES || &h[..4] != ELF_MAGIC {
        return Err(malformed("no ELF header"));
    }
    if h[4] != ELFCLASS64 || h[5] != ELFDATA2LSB {
        return Err(malformed("not a little-endian ELF64 image"));
    }
    let machine = u16_at(h, 18).unwrap_or(0);
    if machine != EM_CUDA {
        return Err(malformed(format!("ELF machine {machine}, not EM_CUDA (190)")));
    }
    let sm = target_sm(h);
    if sm != 90 {
        return Err(ImageError::WrongArch(sm));
    }
    Ok(())
}

/// The SM the cubin was compiled for. ELF ABI version 8 (CUDA 12.8+) moved it from flags bits 0-7 to bits 8-15.
fn target_sm(h: &[u8]) -> u32 {
    let abi_version = h[8];
    let flags = u32_at(h, 48).unwrap_or(0);
    if abi_version >= 8 {
        (flags >> 8) & 0xff
    } else {
        flags & 0xff
    }
}

fn section_at(table: &[u8], at: usize) -> Option<Section> {
    Some(Section {
        name: u32_at(table, at)?,
        kind: u32_at(table, at + 4)?,
        offset: u64_at(table, at + 24)?,
        size: u64_at(table, at + 32)?,
        info: u32_at(table, at + 44)?,
    })
}

/// Parses a whole cubin held in memory.
pub fn parse_cubin(bytes: &[u8]) -> Result<Cubin, ImageError> {
    check_header(bytes)?;
    let shoff = u64_at(bytes, 0x28).unwrap_or(0) as usize;
    let shnum = u16_at(bytes, 0x3c).unwrap_or(0) as usize;
    let shstrndx = u16_at(bytes, 0x3e).unwrap_or(0) as usize;
    let sections: Vec<Section> = (0..shnum)
        .map(|i| section_at(bytes, shoff + i * SECTION_HEADER_BYTES))
        .collect::<Option<_>>()
        .ok_or_else(|| malformed("truncated section table"))?;
    let contents = |s: &Section| -> Result<&[u8], ImageError> {
        if s.kind == SHT_NOBITS {
            return Ok(&[]);
        }
        bytes.get(s.offset as usize..(s.offset + s.size) as usize).ok_or_else(|| malformed("section beyond image"))
    };
    let names = contents(sections.get(shstrndx).ok_or_else(|| malformed("no section name table"))?)?;
    let name_of = |s: &Section| -> Result<&str, ImageError> {
        let tail = names.get(s.name as usize..).ok_or_else(|| malformed("section name beyond name table"))?;
        let end = tail.iter().position(|&b| b == 0).ok_or_else(|| malformed("unterminated section name"))?;
        std::str::from_utf8(&tail[..end]).map_err(|_| malformed("section name is not UTF-8"))
    };

    let mut cubin = Cubin::default();
    // Symbol index of each kernel (the .text section's sh_info), which global .nv.info entries are keyed by.
    let mut by_symbol: BTreeMap<u32, String> = BTreeMap::new();
    for s in &sections {
        if let Some(kernel) = name_of(s)?.strip_prefix(".text.") {
            cubin.kernels.insert(kernel.to_string(), KernelInfo::default());
            by_symbol.insert(s.info & 0x00ff_ffff, kernel.to_string());
        }
    }
    for s in &sections {
        let name = name_of(s)?;
        if let Some(kernel) = name.strip_prefix(".nv.info.") {
            if let Some(info) = cubin.kernels.get_mut(kernel) {
                read_kernel_info(contents(s)?, info).map_err(|e| malformed(format!("{name}: {e}")))?;
            }
        } else if name == ".nv.info" {
            let global = contents(s)?;
            for_each_attribute(global, |attr, value| {
                let (Some(symbol), Some(n)) = (u32_at(value, 0), u32_at(value, 4)) else { return };
                let Some(info) = by_symbol.get(&symbol).and_then(|k| cubin.kernels.get_mut(k)) else { return };
                match attr {
                    EIATTR_REGCOUNT => info.registers = Some(n),
                    EIATTR_FRAME_SIZE => info.frame_bytes = n,
                    _ => {}
                }
            })
            .map_err(|e| malformed(format!(".nv.info: {e}")))?;
        } else if let Some(kernel) = name.strip_prefix(".nv.shared.") {
            if let Some(info) = cubin.kernels.get_mut(kernel) {
                info.static_smem_bytes = s.size as u32;
            }
        }
    }
    Ok(cubin)
}

/// Calls `visit(attribute, value bytes)` for each entry of an .nv.info section.
fn for_each_attribute(section: &[u8], mut visit: impl FnMut(u8, &[u8])) -> Result<(), String> {
    let mut at = 0;
    while at < section.len() {
        let (Some(&format), Some(&attr)) = (section.get(at), section.get(at + 1)) else {
            return Err("truncated attribute".into());
        };
        match format {
            EIFMT_SVAL => {
                let len = u16_at(section, at + 2).ok_or("truncated attribute")? as usize;
                let value = section.get(at + 4..at + 4 + len).ok_or("attribute value beyond section")?;
                visit(attr, value);
                at += 4 + len;
            }
            EIFMT_NVAL | EIFMT_BVAL | EIFMT_HVAL => {
                let value = section.get(at + 2..at + 4).ok_or("truncated attribute")?;
                visit(attr, value);
                at += 4;
            }
            other => return Err(format!("unknown attribute format {other:#x} at byte {at}")),
        }
    }
    Ok(())
}

fn read_kernel_info(section: &[u8], info: &mut KernelInfo) -> Result<(), String> {
    let mut params: BTreeMap<u16, ParamSlot> = BTreeMap::new();
    let dims = |v: &[u8]| -> Option<[u32; 3]> { Some([u32_at(v, 0)?, u32_at(v, 4)?, u32_at(v, 8)?]) };
    for_each_attribute(section, |attr, value| match attr {
        EIATTR_KPARAM_INFO => {
            // index u32, ordinal u16, offset u16, then a word whose top 14 bits are the size.
            if let (Some(ordinal), Some(offset), Some(word)) = (u16_at(value, 4), u16_at(value, 6), u32_at(value, 8)) {
                params.insert(ordinal, ParamSlot { offset: offset as u32, size: word >> 18 });
            }
        }
        EIATTR_CBANK_PARAM_SIZE => info.param_bytes = u16_at(value, 0).unwrap_or(0) as u32,
        EIATTR_MAX_THREADS => info.max_threads = dims(value).map(|[x, y, z]| x * y * z),
        EIATTR_REQNTID => info.required_block = dims(value),
        EIATTR_CTA_PER_CLUSTER => info.required_cluster = dims(value),
        EIATTR_EXPLICIT_CLUSTER => info.explicit_cluster = true,
        _ => {}
    })?;
    // Ordinals must be 0..n without gaps to describe a signature.
    if params.keys().enumerate().any(|(i, &ordinal)| i != ordinal as usize) {
        return Err(format!("parameter ordinals {:?} have gaps", params.keys().collect::<Vec<_>>()));
    }
    info.params = params.into_values().collect();
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    //! A builder of small synthetic cubins, for tests that must not depend on the crate's compiled kernels.

    /// One kernel of a synthetic cubin.
    pub struct FakeKernel<'a> {
        pub name: &'a str,
        pub param_sizes: &'a [u32],
        pub max_threads: Option<u32>,
        pub static_smem: u32,
        pub registers: Option<u32>,
    }

    fn attr_sval(out: &mut Vec<u8>, attr: u8, value: &[u8]) {
        out.extend([0x04, attr]);
        out.extend((value.len() as u16).to_le_bytes());
        out.extend(value);
    }

    /// An ELF64 EM_CUDA sm_90 image with `.text.<name>`, `.nv.info.<name>` and `.nv.shared.<name>` per kernel.
    pub fn build(kernels: &[FakeKernel]) -> Vec<u8> {
        struct Sec {
            name: String,
            kind: u32,
            info: u32,
            data: Vec<u8>,
            nobits_size: u64,
        }
        let mut secs: Vec<Sec> = Vec::new();
        let mut global = Vec::new();
        for (i, k) in kernels.iter().enumerate() {
            let symbol = 10 + i as u32;
            let mut info = Vec::new();
            let mut offset = 0u32;
            for (ordinal, &size) in k.param_sizes.iter().enumerate() {
                let align = size.min(8).next_power_of_two();
                offset = offset.div_ceil(align) * align;
                let mut v = 0u32.to_le_bytes().to_vec();
                v.extend((ordinal as u16).to_le_bytes());
                v.extend((offset as u16).to_le_bytes());
                v.extend(((size << 18) | 0x1f000).to_le_bytes());
                attr_sval(&mut info, 0x17, &v);
                offset += size;
            }
            info.extend([0x03, 0x19]);
            info.extend((offset as u16).to_le_bytes());
            if let Some(t) = k.max_threads {
                let v: Vec<u8> = [t, 1, 1].iter().flat_map(|d| d.to_le_bytes()).collect();
                attr_sval(&mut info, 0x05, &v);
            }
            if let Some(r) = k.registers {
                let v: Vec<u8> = [symbol, r].iter().flat_map(|d| d.to_le_bytes()).collect();
                attr_sval(&mut global, 0x2f, &v);
            }
            secs.push(Sec {
                name: format!(".text.{}", k.name),
                kind: 1,
                info: symbol,
                data: vec![0; 16],
                nobits_size: 0,
            });
            secs.push(Sec {
                name: format!(".nv.info.{}", k.name),
                kind: 0x7000_0000,
                info: 0,
                data: info,
                nobits_size: 0,
            });
            if k.static_smem > 0 {
                let name = format!(".nv.shared.{}", k.name);
                secs.push(Sec { name, kind: 8, info: 0, data: Vec::new(), nobits_size: k.static_smem as u64 });
            }
        }
        secs.push(Sec { name: ".nv.info".into(), kind: 0x7000_0000, info: 0, data: global, nobits_size: 0 });
        // Section 0 is the null section; the last is .shstrtab.
        let mut shstrtab = vec![0u8];
        let mut name_offsets = Vec::new();
        for s in &secs {
            name_offsets.push(shstrtab.len() as u32);
            shstrtab.extend(s.name.as_bytes());
            shstrtab.push(0);
        }
        let shstrtab_name = shstrtab.len() as u32;
        shstrtab.extend(b".shstrtab\0");

        let mut image = vec![0u8; 64];
        let mut headers = vec![[0u8; 64]];
        let mut push_section = |image: &mut Vec<u8>, name: u32, kind: u32, info: u32, data: &[u8], size: u64| {
            let offset = image.len() as u64;
            image.extend(data);
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[44..48].copy_from_slice(&info.to_le_bytes());
            headers.push(h);
        };
        for (s, &name) in secs.iter().zip(&name_offsets) {
            let size = if s.kind == 8 { s.nobits_size } else { s.data.len() as u64 };
            push_section(&mut image, name, s.kind, s.info, &s.data, size);
        }
        push_section(&mut image, shstrtab_name, 3, 0, &shstrtab, shstrtab.len() as u64);
        while !image.len().is_multiple_of(8) {
            image.push(0);
        }
        let shoff = image.len() as u64;
        for h in &headers {
            image.extend(h);
        }
        image[0..4].copy_from_slice(b"\x7fELF");
        image[4] = 2; // ELFCLASS64
        image[5] = 1; // little-endian
        image[6] = 1; // EV_CURRENT
        image[7] = 0x41; // ELFOSABI_CUDA
        image[8] = 8; // ABI version 8: SM in flags bits 8-15
        image[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        image[18..20].copy_from_slice(&190u16.to_le_bytes());
        image[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        image[48..52].copy_from_slice(&((90u32 << 8) | 0x04).to_le_bytes());
        image[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        image[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        image[0x3c..0x3e].copy_from_slice(&(headers.len() as u16).to_le_bytes());
        image[0x3e..0x40].copy_from_slice(&((headers.len() - 1) as u16).to_le_bytes());
        image
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{build, FakeKernel};
    use super::*;

    fn one_kernel() -> Vec<u8> {
        build(&[FakeKernel {
            name: "scale_rows",
            param_sizes: &[8, 8, 4, 128],
            max_threads: Some(256),
            static_smem: 1024,
            registers: Some(40),
        }])
    }

    #[test]
    fn reads_kernels_and_their_info() {
        let cubin = parse_cubin(&one_kernel()).unwrap();
        let k = &cubin.kernels["scale_rows"];
        let sizes: Vec<u32> = k.params.iter().map(|p| p.size).collect();
        assert_eq!(sizes, [8, 8, 4, 128]);
        assert_eq!(k.max_threads, Some(256));
        assert_eq!(k.static_smem_bytes, 1024);
        assert_eq!(k.registers, Some(40));
    }

    #[test]
    fn extent_comes_from_headers() {
        let image = one_kernel();
        let mut padded = image.clone();
        padded.extend([0xAB; 100]);
        // SAFETY: `padded` holds the whole image.
        let cubin = unsafe { parse_image_at(padded.as_ptr()) }.unwrap();
        assert!(cubin.kernels.contains_key("scale_rows"));
    }

    #[test]
    fn refuses_other_archs_ptx_and_fatbins() {
        let mut image = one_kernel();
        image[48..52].copy_from_slice(&((80u32 << 8) | 0x04).to_le_bytes());
        assert_eq!(parse_cubin(&image).unwrap_err(), ImageError::WrongArch(80));
        let ptx = b"//\n// Generated by NVIDIA NVVM Compiler\n.version 8.5\n.target sm_80\n\0";
        // SAFETY: NUL-terminated text.
        assert_eq!(unsafe { parse_image_at(ptx.as_ptr()) }.unwrap_err(), ImageError::PtxText);
        let fatbin = [0x50u8, 0xed, 0x55, 0xba, 1, 0, 0x10, 0];
        // SAFETY: 8 readable bytes; the reader stops after the magic word.
        assert_eq!(unsafe { parse_image_at(fatbin.as_ptr()) }.unwrap_err(), ImageError::Fatbinary);
        assert!(matches!(parse_cubin(&image[..40]), Err(ImageError::Malformed(_))));
    }
}
