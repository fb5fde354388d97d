//! What a module may use: the `modules:` section of the config file.

/// Limits per module: checked before its code is compiled, while it
/// compiles, and while it runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleLimits {
    /// Linear memory, bytes.
    pub memory_bytes: usize,
    /// Longest one call into the module may run.
    pub cpu_ms_per_call: u64,
    /// Datagrams one event (a packet in, a tick) may send, all kinds.
    pub sends_per_event: u32,
    /// Log lines a minute; more are dropped and counted.
    pub log_lines_per_minute: u32,
    /// Bytes a module may send to its entry nodes (or, a monitor module,
    /// over overlays) for each byte this host handed it.
    pub send_ratio: u32,
    /// Bytes a second it may send beyond that, for its own protocol
    /// (keepalives, measurements); a second's worth may be saved up.
    pub own_bytes_per_second: u32,
    /// Functions a module may define; more is refused before compiling.
    pub max_functions: u32,
    /// Bytes of function bodies, all together.
    pub max_code_bytes: u64,
    /// Elements of its tables, all together (initial sizes, and what it
    /// may grow them to at run time).
    pub max_table_elements: u32,
    /// Bytes of its data segments, all together.
    pub max_data_bytes: u64,
    /// Longest compiling a module may take, wall clock.
    pub compile_secs: u64,
    /// Address space the compiler may use, bytes.
    pub compile_memory_bytes: u64,
}

impl Default for ModuleLimits {
    fn default() -> Self {
        ModuleLimits {
            memory_bytes: 64 << 20,
            cpu_ms_per_call: 100,
            sends_per_event: 64,
            log_lines_per_minute: 60,
            send_ratio: 4,
            own_bytes_per_second: 16 << 10,
            max_functions: 50_000,
            max_code_bytes: 8 << 20,
            max_table_elements: 100_000,
            max_data_bytes: 16 << 20,
            compile_secs: 60,
            compile_memory_bytes: 4 << 30,
        }
    }
}
