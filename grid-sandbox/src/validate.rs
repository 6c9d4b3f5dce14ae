//! Static checks on an untrusted module, before any compile work is spent on it.
//!
//! Everything here is linear in the module's size and allocates little: it walks the sections
//! with `wasmparser` and stops at the first problem, which it names in one line (the text after
//! `invalid: `). It bounds what the compiler will be asked to do — module size, function count,
//! body size, locals — and enforces the guest contract: a WASI preview 1 *command* (`_start`),
//! importing only `wasi_snapshot_preview1` functions (and Grid's `grid_gpu_v1`), with no shared memory, and declared minimum
//! memory and tables within the task's limits. Full validation happens when wasmtime compiles.

use crate::limits::Limits;
use wasmparser::{Parser, Payload, TypeRef};

/// Static caps on compile work. Runtimes (pinned by sha256) are exempt from `max_module_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileCaps {
    /// Default 64 MiB.
    pub max_module_bytes: u64,
    /// Defined functions. Default 200,000.
    pub max_functions: u32,
    /// Bytes of one function body. Default 2 MiB.
    pub max_function_body_bytes: u32,
    /// Locals of one function (wasmparser's own ceiling is 50,000). Default 50,000.
    pub max_locals: u32,
}

impl Default for CompileCaps {
    fn default() -> Self {
        Self {
            max_module_bytes: 64 << 20,
            max_functions: 200_000,
            max_function_body_bytes: 2 << 20,
            max_locals: 50_000,
        }
    }
}

/// Every function of WASI preview 1, the only imports a guest may have.
pub const WASI_P1_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

pub const WASI_P1_MODULE: &str = "wasi_snapshot_preview1";
const WASM_PAGE_BYTES: u64 = 64 * 1024;

/// Checks `bytes` against the guest contract and the caps; `Err` is the one-line reason text.
pub fn check_module(bytes: &[u8], limits: &Limits, caps: &CompileCaps) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("empty module (0 bytes)".into());
    }
    if bytes.len() as u64 > caps.max_module_bytes {
        return Err(format!(
            "module is {} bytes, over the cap of {} bytes",
            bytes.len(),
            caps.max_module_bytes
        ));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no \\0asm header); pass a .wasm file built for wasm32-wasip1".into());
    }
    if bytes.len() < 8 {
        return Err("truncated module: header is cut short".into());
    }
    if Parser::is_component(bytes) {
        return Err("a component, not a core module: build for wasm32-wasip1".into());
    }

    let mut has_start = false;
    let mut memory_min_bytes: u64 = 0;
    let mut table_min_elements: u64 = 0;
    let mut check_memory =
        |min_pages: u64, shared: bool, page_size_log2: Option<u32>| -> Result<(), String> {
            if shared {
                return Err("shared memory (threads) is not supported".into());
            }
            let page = page_size_log2.map_or(WASM_PAGE_BYTES, |log2| 1u64 << log2.min(16));
            memory_min_bytes = memory_min_bytes.saturating_add(min_pages.saturating_mul(page));
            if memory_min_bytes > limits.memory_bytes {
                return Err(format!(
                    "declared minimum memory of {} exceeds the task's memory limit of {}",
                    grid_proto::units::size_text(memory_min_bytes),
                    grid_proto::units::size_text(limits.memory_bytes)
                ));
            }
            Ok(())
        };

    for payload in Parser::new(0).parse_all(bytes) {
        let payload =
            payload.map_err(|e| format!("malformed or truncated module: {}", e.message()))?;
        match payload {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import =
                        import.map_err(|e| format!("malformed import section: {}", e.message()))?;
                    let known = (import.module == WASI_P1_MODULE
                        && WASI_P1_FUNCTIONS.contains(&import.name))
                        || (import.module == crate::gpu_binding::MODULE
                            && crate::gpu_binding::FUNCTIONS.contains(&import.name));
                    if !known || !matches!(import.ty, TypeRef::Func(_)) {
                        return Err(format!(
                            "unknown import {}::{} (only WASI preview 1 and {} functions may be imported)",
                            import.module,
                            import.name,
                            crate::gpu_binding::MODULE
                        ));
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader {
                    let m =
                        memory.map_err(|e| format!("malformed memory section: {}", e.message()))?;
                    check_memory(m.initial, m.shared, m.page_size_log2)?;
                }
            }
            Payload::TableSection(reader) => {
                if reader.count() > crate::sandbox::MAX_TABLES {
                    return Err(format!(
                        "{} tables, over the cap of {}",
                        reader.count(),
                        crate::sandbox::MAX_TABLES
                    ));
                }
                for table in reader {
                    let t =
                        table.map_err(|e| format!("malformed table section: {}", e.message()))?;
                    if t.ty.shared {
                        return Err("shared tables (threads) are not supported".into());
                    }
                    table_min_elements = table_min_elements.saturating_add(t.ty.initial);
                    if table_min_elements > limits.table_elements {
                        return Err(format!(
                            "declared minimum table size of {table_min_elements} elements exceeds the task's table limit of {}",
                            limits.table_elements
                        ));
                    }
                }
            }
            Payload::FunctionSection(reader) if reader.count() > caps.max_functions => {
                return Err(format!(
                    "{} functions, over the cap of {}",
                    reader.count(),
                    caps.max_functions
                ));
            }
            Payload::CodeSectionEntry(body) => {
                let range = body.range();
                let body_bytes = range.end - range.start;
                if body_bytes as u64 > caps.max_function_body_bytes as u64 {
                    return Err(format!(
                        "a function body of {body_bytes} bytes, over the cap of {}",
                        caps.max_function_body_bytes
                    ));
                }
                let mut locals: u64 = 0;
                let reader = body
                    .get_locals_reader()
                    .map_err(|e| format!("malformed function locals: {}", e.message()))?;
                for local in reader {
                    let (count, _) =
                        local.map_err(|e| format!("malformed function locals: {}", e.message()))?;
                    locals = locals.saturating_add(count as u64);
                }
                if locals > caps.max_locals as u64 {
                    return Err(format!(
                        "a function with {locals} locals, over the cap of {}",
                        caps.max_locals
                    ));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export =
                        export.map_err(|e| format!("malformed export section: {}", e.message()))?;
                    if export.name == "_start" && export.kind == wasmparser::ExternalKind::Func {
                        has_start = true;
                    }
                }
            }
            _ => {}
        }
    }
    if !has_start {
        return Err("no `_start` export: not a WASI command module (build a binary for wasm32-wasip1, not a library)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(wat: &str) -> Result<(), String> {
        check_module(
            &wat::parse_str(wat).unwrap(),
            &Limits::default(),
            &CompileCaps::default(),
        )
    }

    #[test]
    fn a_minimal_command_passes() {
        check(r#"(module (func (export "_start")))"#).unwrap();
    }

    #[test]
    fn problems_are_named() {
        assert!(check("(module)").unwrap_err().contains("no `_start`"));
        assert!(
            check(r#"(module (import "env" "f" (func)) (func (export "_start")))"#)
                .unwrap_err()
                .contains("unknown import env::f")
        );
        assert!(
            check(r#"(module (memory 1 1 shared) (func (export "_start")))"#)
                .unwrap_err()
                .contains("shared memory")
        );
        assert_eq!(
            check(r#"(module (memory 65536) (func (export "_start")))"#).unwrap_err(),
            "declared minimum memory of 4 GiB exceeds the task's memory limit of 512 MiB",
            "in the units people write limits in"
        );
        assert!(
            check_module(b"\0asm\x01", &Limits::default(), &CompileCaps::default())
                .unwrap_err()
                .contains("truncated")
        );
        assert!(
            check_module(b"hello", &Limits::default(), &CompileCaps::default())
                .unwrap_err()
                .contains("not a WebAssembly module")
        );
        // As many tables as a pooled task slot holds pass; one more is named.
        let tables = |n: u32| {
            let defs = "(table 1 funcref)".repeat(n as usize);
            format!(r#"(module {defs} (func (export "_start")))"#)
        };
        check(&tables(crate::sandbox::MAX_TABLES)).unwrap();
        assert_eq!(
            check(&tables(crate::sandbox::MAX_TABLES + 1)).unwrap_err(),
            format!(
                "{} tables, over the cap of {}",
                crate::sandbox::MAX_TABLES + 1,
                crate::sandbox::MAX_TABLES
            )
        );
    }
}
