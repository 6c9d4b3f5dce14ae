//! Rewiring a guest's writing WASI calls through checks that run *before* and *after* them.
//!
//! wasmtime-wasi has no hook for a disk quota, and its preview 1 functions find the guest's
//! memory through the calling instance, so a host function cannot simply wrap them. Instead the
//! sandbox puts a tiny generated wasm module, the *guard*, between the guest and WASI:
//!
//! ```text
//!  guest ──imports──► grid_guard::fd_write ─► grid_hooks::pre_fd_write   (check: may refuse)
//!    │                (a wasm function)    ─► wasi_snapshot_preview1::fd_write (wasmtime-wasi)
//!    │                                     ─► grid_hooks::post            (check sizes)
//!    └──imports──► grid_guard::memory  (the guard defines and exports the memory the guest used
//!                                       to define, so WASI and the hooks see the guest's memory)
//! ```
//!
//! At load time the guest module is rewritten once (and cached compiled): imports of the guarded
//! functions move from `wasi_snapshot_preview1` to `grid_guard`, and its memory definition
//! becomes an import of the same type from `grid_guard`. No function or memory index changes,
//! so every other section is copied byte for byte. A guest that imports none of the guarded
//! functions cannot write files and runs unmodified.

use wasm_encoder::{
    CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection, ImportSection,
    MemorySection, MemoryType, Module, RawSection, TypeSection, ValType,
};
use wasmparser::{BinaryReader, ImportSectionReader, MemorySectionReader, TypeRef};

pub const GUARD_MODULE: &str = "grid_guard";
pub const HOOKS_MODULE: &str = "grid_hooks";
const WASI: &str = crate::validate::WASI_P1_MODULE;

use ValType::{I32, I64};

/// The WASI functions that can add bytes or entries to `/out`, or rebind the standard streams.
/// All return an errno (`i32`).
pub const GUARDED: &[(&str, &[ValType])] = &[
    ("fd_write", &[I32, I32, I32, I32]),
    ("fd_pwrite", &[I32, I32, I32, I64, I32]),
    ("fd_allocate", &[I32, I64, I64]),
    ("fd_filestat_set_size", &[I32, I64]),
    ("path_open", &[I32, I32, I32, I32, I32, I64, I64, I32, I32]),
    ("path_create_directory", &[I32, I32, I32]),
    ("path_symlink", &[I32, I32, I32, I32, I32]),
    ("path_link", &[I32, I32, I32, I32, I32, I32, I32]),
    ("fd_renumber", &[I32, I32]),
];

fn is_guarded(module: &str, name: &str) -> bool {
    module == WASI && GUARDED.iter().any(|(n, _)| *n == name)
}

/// A guest module with its guarded imports rewired, and the memory type the guard must define.
pub struct Guarded {
    pub module: Vec<u8>,
    pub memory: MemoryType,
}

/// Rewires `bytes` (already validated) through the guard; `None` if it imports nothing guarded.
pub fn rewrite(bytes: &[u8]) -> Result<Option<Guarded>, String> {
    let sections = split_sections(bytes)?;
    let mut imports = None;
    let mut memory = None;
    for &(id, offset, data) in &sections {
        match id {
            2 => {
                let reader = ImportSectionReader::new(BinaryReader::new(data, offset))
                    .map_err(|e| e.message().to_string())?;
                let mut list = Vec::new();
                for import in reader.into_imports() {
                    let i = import.map_err(|e| e.message().to_string())?;
                    let TypeRef::Func(ty) = i.ty else {
                        return Err(format!("import {}::{} is not a function", i.module, i.name));
                    };
                    list.push((i.module.to_string(), i.name.to_string(), ty));
                }
                imports = Some(list);
            }
            5 => {
                let reader = MemorySectionReader::new(BinaryReader::new(data, offset))
                    .map_err(|e| e.message().to_string())?;
                let mut found = Vec::new();
                for m in reader {
                    found.push(m.map_err(|e| e.message().to_string())?);
                }
                if found.len() > 1 {
                    return Err("more than one memory (multi-memory) is not supported".into());
                }
                memory = found.pop();
            }
            _ => {}
        }
    }
    let Some(imports) = imports else {
        return Ok(None);
    };
    if !imports.iter().any(|(m, n, _)| is_guarded(m, n)) {
        return Ok(None);
    }
    let Some(mem) = memory else {
        return Err("the module defines no memory, but WASI calls need one".into());
    };
    let memory = MemoryType {
        minimum: mem.initial,
        maximum: mem.maximum,
        memory64: mem.memory64,
        shared: mem.shared,
        page_size_log2: mem.page_size_log2,
    };

    let mut out = Module::new();
    for &(id, _, data) in &sections {
        match id {
            2 => {
                let mut section = ImportSection::new();
                for (module, name, ty) in &imports {
                    let module = if is_guarded(module, name) {
                        GUARD_MODULE
                    } else {
                        module.as_str()
                    };
                    section.import(module, name, EntityType::Function(*ty));
                }
                section.import(GUARD_MODULE, "memory", EntityType::Memory(memory));
                out.section(&section);
            }
            5 => {}
            _ => {
                out.section(&RawSection { id, data });
            }
        }
    }
    Ok(Some(Guarded {
        module: out.finish(),
        memory,
    }))
}

/// One raw section: id, offset of its contents in the module, contents.
type Section<'a> = (u8, usize, &'a [u8]);

/// Every section after the 8-byte header.
fn split_sections(bytes: &[u8]) -> Result<Vec<Section<'_>>, String> {
    let mut sections = Vec::new();
    let mut reader = BinaryReader::new(bytes.get(8..).ok_or("truncated module")?, 8);
    while !reader.eof() {
        let id = reader.read_u8().map_err(|e| e.message().to_string())?;
        let len = reader.read_var_u32().map_err(|e| e.message().to_string())? as usize;
        let offset = reader.original_position();
        let data = reader
            .read_bytes(len)
            .map_err(|e| e.message().to_string())?;
        sections.push((id, offset, data));
    }
    Ok(sections)
}

/// The guard module for a guest whose memory has type `memory`.
///
/// Function indices: originals `0..n`, pre-hooks `n..2n`, post-hook `2n`, wrappers after it.
pub fn guard_module(memory: MemoryType) -> Vec<u8> {
    let n = GUARDED.len() as u32;
    let mut types = TypeSection::new();
    for (_, params) in GUARDED {
        types.ty().function(params.iter().copied(), [I32]);
    }
    types.ty().function([], []);

    let mut imports = ImportSection::new();
    for (i, (name, _)) in GUARDED.iter().enumerate() {
        imports.import(WASI, name, EntityType::Function(i as u32));
    }
    for (i, (name, _)) in GUARDED.iter().enumerate() {
        imports.import(
            HOOKS_MODULE,
            &format!("pre_{name}"),
            EntityType::Function(i as u32),
        );
    }
    imports.import(HOOKS_MODULE, "post", EntityType::Function(n));

    let mut functions = FunctionSection::new();
    let mut code = CodeSection::new();
    let mut exports = ExportSection::new();
    let post = 2 * n;
    for (i, (name, params)) in GUARDED.iter().enumerate() {
        let i = i as u32;
        functions.function(i);
        let errno = params.len() as u32;
        let mut f = Function::new([(1, I32)]);
        let mut body = f.instructions();
        for p in 0..errno {
            body.local_get(p);
        }
        body.call(n + i)
            .local_tee(errno)
            .if_(wasm_encoder::BlockType::Empty);
        body.local_get(errno).return_().end();
        for p in 0..errno {
            body.local_get(p);
        }
        body.call(i).call(post).end();
        code.function(&f);
        exports.export(name, ExportKind::Func, post + 1 + i);
    }
    let mut memories = MemorySection::new();
    memories.memory(memory);
    exports.export("memory", ExportKind::Memory, 0);

    let mut module = Module::new();
    module
        .section(&types)
        .section(&imports)
        .section(&functions)
        .section(&memories)
        .section(&exports)
        .section(&code);
    module.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_module_is_valid_wasm() {
        let m = guard_module(MemoryType {
            minimum: 1,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        wasmparser::Validator::new().validate_all(&m).unwrap();
    }

    #[test]
    fn rewriting_moves_guarded_imports_and_the_memory() {
        let guest = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                (memory (export "memory") 2 10)
                (func (export "_start")))"#,
        )
        .unwrap();
        let g = rewrite(&guest).unwrap().unwrap();
        assert_eq!(g.memory.minimum, 2);
        assert_eq!(g.memory.maximum, Some(10));
        let text = wasmprinter_like(&g.module);
        assert!(text.contains(&("grid_guard".to_string(), "fd_write".to_string())));
        assert!(text.contains(&(
            "wasi_snapshot_preview1".to_string(),
            "proc_exit".to_string()
        )));
        assert!(text.contains(&("grid_guard".to_string(), "memory".to_string())));
        let mut features = wasmparser::WasmFeatures::default();
        features.insert(wasmparser::WasmFeatures::MULTI_MEMORY);
        wasmparser::Validator::new_with_features(features)
            .validate_all(&g.module)
            .unwrap();
    }

    fn wasmprinter_like(bytes: &[u8]) -> Vec<(String, String)> {
        let mut names = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(bytes) {
            if let Ok(wasmparser::Payload::ImportSection(r)) = payload {
                for i in r.into_imports() {
                    let i = i.unwrap();
                    names.push((i.module.to_string(), i.name.to_string()));
                }
            }
        }
        names
    }
}
