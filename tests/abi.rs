//! ABI drift check: the shim's `ffi.cdef` block (`lua/resty/counter/abi.lua`,
//! the one source of truth)
//! against the functions `src/ffi.rs` exports, by name, arity and C type.
//! A prototype that changes on one side only fails here, before LuaJIT
//! would call a function with the wrong arguments.

use std::collections::BTreeMap;

const SHIM: &str = include_str!("../lua/resty/counter/abi.lua");
const EXPORTS: &str = include_str!("../src/ffi.rs");
const STAGE_EXPORTS: &str = include_str!("../src/ffi_stage.rs");

/// name -> (return type, parameter types), types normalised to C spelling.
type Protos = BTreeMap<String, (String, Vec<String>)>;

fn squash(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(" *", "*")
}

fn cdef_block() -> &'static str {
    let start = SHIM
        .find("local CDEF = [[")
        .expect("CDEF block in the shim")
        + 15;
    let len = SHIM[start..].find("]]").expect("end of the CDEF block");
    &SHIM[start..start + len]
}

/// The cdef without its struct typedefs (their bodies hold `;` too).
fn cdef_functions() -> String {
    let mut s = cdef_block().to_string();
    while let Some(at) = s.find("typedef struct {") {
        let end = at + s[at..].find('}').expect("end of a struct") + 1;
        let semi = end + s[end..].find(';').expect("struct typedef name");
        s.replace_range(at..=semi, "");
    }
    s
}

/// Fields of the cdef's `typedef struct { ... } name;`, in order, as
/// (C type, field name).
fn cdef_struct(name: &str) -> Vec<(String, String)> {
    let block = cdef_block();
    let end = block
        .find(&format!("}} {name};"))
        .unwrap_or_else(|| panic!("struct {name} in the cdef"));
    let start = block[..end]
        .rfind("typedef struct {")
        .expect("struct start")
        + 16;
    let mut out = Vec::new();
    for decl in block[start..end].split(';').map(squash) {
        if decl.is_empty() {
            continue;
        }
        let (ty, names) = decl.split_once(' ').expect("type and fields");
        for field in names.split(',') {
            out.push((ty.to_string(), field.trim().to_string()));
        }
    }
    out
}

/// Fields of a `#[repr(C)] pub struct name` in src/ffi.rs or
/// src/ffi_stage.rs, as (C type, field name).
fn rust_struct(name: &str) -> Vec<(String, String)> {
    let head = format!(
        "#[repr(C)]\n#[derive(Debug, Clone, Copy, Default, PartialEq)]\npub struct {name} {{"
    );
    let (file, at) = [EXPORTS, STAGE_EXPORTS]
        .into_iter()
        .find_map(|f| f.find(&head).map(|at| (f, at)))
        .unwrap_or_else(|| panic!("#[repr(C)] struct {name} in src/ffi.rs or src/ffi_stage.rs"));
    let start = at + head.len();
    let body = &file[start..start + file[start..].find('}').unwrap()];
    body.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("pub "))
        .map(|l| {
            let (field, ty) = l["pub ".len()..]
                .trim_end_matches(',')
                .split_once(':')
                .unwrap();
            (rust_to_c(ty), field.trim().to_string())
        })
        .collect()
}

/// Prototypes from the cdef: `ret name(type a, type b);`.
fn cdef_protos() -> Protos {
    let mut out = Protos::new();
    for decl in cdef_functions().split(';').map(squash) {
        if decl.is_empty() || decl.starts_with("typedef") {
            continue;
        }
        let open = decl.find('(').expect("prototype");
        let head = &decl[..open];
        let name_at = head.rfind([' ', '*']).unwrap() + 1;
        let ret = squash(&head[..name_at]);
        let name = head[name_at..].to_string();
        let args = &decl[open + 1..decl.rfind(')').unwrap()];
        let params = if args.trim() == "void" {
            vec![]
        } else {
            args.split(',')
                .map(|p| {
                    // Drop the parameter name: the last identifier.
                    let p = squash(p);
                    let cut = p.rfind([' ', '*']).unwrap() + 1;
                    squash(&p[..cut])
                })
                .collect()
        };
        out.insert(name, (ret, params));
    }
    out
}

fn rust_to_c(ty: &str) -> String {
    let ty = ty.trim();
    let c = match ty {
        "" | "()" => "void",
        "u32" => "uint32_t",
        "i32" => "int32_t",
        "f64" => "double",
        "usize" => "size_t",
        "*const c_char" => "const char*",
        "*const u8" => "const unsigned char*",
        "*const *const u8" => "const unsigned char**",
        "*const usize" => "const size_t*",
        "*const f64" => "const double*",
        "*mut c_void" => "void*",
        "*mut FlusherHandle" => "resty_counter_flusher*",
        "*mut StageHandle" => "resty_counter_stage*",
        "*mut i32" => "int32_t*",
        "*mut f64" => "double*",
        "*mut CStats" => "resty_counter_stats*",
        "*mut SyncResult" => "resty_counter_sync_result*",
        "*mut StageReport" => "resty_counter_stage_report*",
        "*mut AttachResult" => "resty_counter_attach_result*",
        "*mut FoldResult" => "resty_counter_fold_result*",
        other => panic!("no C spelling for Rust type {other}: extend rust_to_c"),
    };
    c.to_string()
}

/// Prototypes of every `extern "C" fn` in src/ffi.rs and src/ffi_stage.rs
/// outside their tests.
fn rust_protos() -> Protos {
    let mut out = Protos::new();
    for file in [EXPORTS, STAGE_EXPORTS] {
        file_protos(file, &mut out);
    }
    out
}

fn file_protos(file: &str, out: &mut Protos) {
    let src = &file[..file.find("#[cfg(test)]").unwrap_or(file.len())];
    for (at, _) in src.match_indices("extern \"C\" fn ") {
        let rest = &src[at + 14..];
        let open = rest.find('(').unwrap();
        let name = rest[..open].to_string();
        let close = rest.find(')').unwrap();
        let params = rest[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| rust_to_c(p.split_once(':').unwrap().1))
            .collect();
        let after = &rest[close + 1..rest.find('{').unwrap()];
        let ret = rust_to_c(after.trim().trim_start_matches("->"));
        out.insert(name, (ret, params));
    }
}

#[test]
fn cdef_and_exports_agree() {
    let lua = cdef_protos();
    let rust = rust_protos();
    assert!(
        lua.len() >= 10,
        "parsed too few prototypes from the cdef: {lua:?}"
    );
    assert_eq!(
        lua.keys().collect::<Vec<_>>(),
        rust.keys().collect::<Vec<_>>(),
        "function names differ between the cdef and src/ffi.rs + src/ffi_stage.rs"
    );
    for (name, proto) in &lua {
        assert_eq!(Some(proto), rust.get(name), "prototype of {name} differs");
    }
}

#[test]
fn cdef_and_exports_agree_on_the_stats_struct() {
    let lua = cdef_struct("resty_counter_stats");
    assert!(lua.len() >= 13, "parsed too few fields: {lua:?}");
    assert_eq!(
        lua,
        rust_struct("CStats"),
        "resty_counter_stats (cdef) and CStats (src/ffi.rs) differ in field order, name or type"
    );
}

/// The names of the shim's `local STATS_FIELDS = { "a", "b", ... }`, in
/// order: the fields `stats()` copies from `resty_counter_stats`.
fn lua_stats_fields() -> Vec<String> {
    let start = SHIM
        .find("local STATS_FIELDS = {")
        .expect("STATS_FIELDS in the shim")
        + 22;
    let len = SHIM[start..].find('}').expect("end of STATS_FIELDS");
    SHIM[start..start + len]
        .split(',')
        .map(|f| f.trim().trim_matches('"').to_string())
        .filter(|f| !f.is_empty())
        .collect()
}

#[test]
fn stats_copies_every_field_of_the_stats_struct() {
    let names: Vec<String> = cdef_struct("resty_counter_stats")
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    let fields = lua_stats_fields();
    assert!(fields.len() >= 10, "parsed too few names: {fields:?}");
    let mut sorted = fields.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), fields.len(), "a name twice in STATS_FIELDS");
    let mut want = names.clone();
    want.sort();
    assert_eq!(
        sorted, want,
        "STATS_FIELDS (lua/resty/counter/abi.lua) and the fields of resty_counter_stats (its cdef) differ: stats() would miss a field or read one that does not exist"
    );
}

#[test]
fn cdef_and_exports_agree_on_the_sync_result_struct() {
    let lua = cdef_struct("resty_counter_sync_result");
    assert!(lua.len() >= 7, "parsed too few fields: {lua:?}");
    assert_eq!(
        lua,
        rust_struct("SyncResult"),
        "resty_counter_sync_result (cdef) and SyncResult (src/ffi.rs) differ"
    );
}

#[test]
fn cdef_and_exports_agree_on_the_stage_report_struct() {
    let lua = cdef_struct("resty_counter_stage_report");
    assert!(lua.len() >= 17, "parsed too few fields: {lua:?}");
    assert_eq!(
        lua,
        rust_struct("StageReport"),
        "resty_counter_stage_report (cdef) and StageReport (src/ffi_stage.rs) differ"
    );
}

#[test]
fn cdef_and_exports_agree_on_the_attach_and_fold_structs() {
    for (c, rust, fields) in [
        ("resty_counter_attach_result", "AttachResult", 2),
        ("resty_counter_fold_result", "FoldResult", 3),
    ] {
        let lua = cdef_struct(c);
        assert_eq!(lua.len(), fields, "parsed too few fields: {lua:?}");
        assert_eq!(
            lua,
            rust_struct(rust),
            "{c} (cdef) and {rust} (src/ffi_stage.rs) differ"
        );
    }
}

/// The shim's codes: `local RC_A, STAGE_B = 0, 1` lines of the shim's
/// ABI file, as (name, value).
fn lua_codes() -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for line in SHIM.lines() {
        let Some((lhs, rhs)) = line
            .strip_prefix("local ")
            .and_then(|l| l.split_once(" = "))
        else {
            continue;
        };
        let names: Vec<&str> = lhs.split(", ").collect();
        if !names
            .iter()
            .all(|n| n.starts_with("RC_") || n.starts_with("STAGE"))
        {
            continue;
        }
        let rhs = rhs.split("--").next().unwrap().trim();
        let values: Vec<i32> = rhs.split(", ").map(|v| v.parse().unwrap()).collect();
        assert_eq!(names.len(), values.len(), "{line}");
        out.extend(names.iter().map(|n| n.to_string()).zip(values));
    }
    out
}

/// `pub const name: i32 = value;` in src/ffi.rs or src/ffi_stage.rs.
fn rust_code(name: &str) -> Option<i32> {
    let head = format!("pub const {name}: i32 = ");
    [EXPORTS, STAGE_EXPORTS].into_iter().find_map(|f| {
        let at = f.find(&head)? + head.len();
        f[at..at + f[at..].find(';')?].parse().ok()
    })
}

#[test]
fn the_shims_codes_are_rusts() {
    let lua = lua_codes();
    assert!(lua.len() >= 6, "parsed too few codes: {lua:?}");
    for (name, value) in &lua {
        assert_eq!(
            rust_code(name),
            Some(*value),
            "{name} in the shim and in src/ffi.rs or src/ffi_stage.rs differ"
        );
    }
}

#[test]
fn abi_rules_hold() {
    for (name, (_, params)) in cdef_protos() {
        assert!(
            name.starts_with("resty_counter_"),
            "{name}: no library prefix"
        );
        assert!(params.len() <= 8, "{name}: more than 8 parameters");
    }
    let version = EXPORTS
        .split("pub const ABI_VERSION: u32 = ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .expect("ABI_VERSION in src/ffi.rs");
    assert!(
        SHIM.contains(&format!("local ABI_VERSION = {version}\n")),
        "the shim checks a different ABI version than src/ffi.rs exports"
    );
}
