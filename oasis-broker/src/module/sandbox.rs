//! The sandbox overlay code modules run in: WebAssembly core modules under
//! wasmtime, with nothing but the packet contract of docs/modules.md.
//!
//! A module can do only what its imports let it: send a datagram to one of
//! the overlay's entry nodes (by index: it never names an address), or, a
//! monitor module, a packet over one of the joined overlays (by index, its
//! names read-only); hand a packet back to this host, hand one to the
//! underlay, read a millisecond clock and log a line. No WASI: no files,
//! sockets, environment or fine clocks exist for it to ask for. Each call
//! into it runs under an epoch deadline (CPU), its memory is capped, and
//! each event may cause only so many sends; a module that breaks a limit is
//! stopped with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ModuleLimits;
use wasmtime::{
    Caller, Config, Engine, Extern, ExternType, FuncType, Linker, Memory, Module, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc, ValType,
};

/// Largest datagram a module receives or sends.
pub const MAX_DATAGRAM: usize = 65_535;

/// How often the epoch advances: the grain of the CPU bound.
const EPOCH: Duration = Duration::from_millis(10);

/// What a module is for, which decides the contract it must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// It carries an overlay: datagrams to and from its entry nodes.
    Overlay,
    /// It decides which carrier a metric rule's packets take: packets over
    /// the joined overlays (by index) or the underlay.
    Monitor,
}

impl Role {
    /// The imports the role may use, by name and type.
    fn imports(self) -> impl Iterator<Item = &'static Import> {
        let own = match self {
            Role::Overlay => OVERLAY_IMPORTS,
            Role::Monitor => MONITOR_IMPORTS,
        };
        COMMON_IMPORTS.iter().chain(own)
    }

    fn offered(self) -> String {
        self.imports()
            .map(|(name, _, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The export that receives datagrams from the far side.
    fn peer_export(self) -> &'static str {
        match self {
            Role::Overlay => "oasis_from_entry",
            Role::Monitor => "oasis_from_overlay",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Overlay => "overlay",
            Role::Monitor => "monitor",
        })
    }
}

/// Whom a module starts with: an overlay module, its overlay's entry
/// nodes (how many); a monitor module, the joined overlays' names by index.
#[derive(Clone, Copy, Debug)]
pub enum Peers<'a> {
    Entries(usize),
    Overlays(&'a [Option<String>]),
}

impl Peers<'_> {
    pub fn role(&self) -> Role {
        match self {
            Peers::Entries(_) => Role::Overlay,
            Peers::Overlays(_) => Role::Monitor,
        }
    }

    fn count(&self) -> usize {
        match self {
            Peers::Entries(count) => *count,
            Peers::Overlays(names) => names.len(),
        }
    }
}

/// Why a module was refused before it ran.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModuleError {
    #[error("the module is not valid WebAssembly: {0}")]
    Invalid(String),
    #[error(
        "the module imports {module}::{name}, which the sandbox does not offer to {role} modules \
         (only oasis::{offered} exist for them): {why}"
    )]
    Import {
        module: String,
        name: String,
        role: Role,
        offered: String,
        why: String,
    },
    #[error("the module does not export {name} as {wanted} (docs/modules.md lists what a module exports)")]
    Export { name: String, wanted: String },
    #[error(
        "the module has {count} {what}, more than the {limit} allowed (modules.{key} in the config \
         file); it was not compiled"
    )]
    TooBig {
        what: String,
        count: u64,
        limit: u64,
        key: String,
    },
    #[error("the module was refused: {0}")]
    Bounds(String),
    #[error("the module could not start: {0}")]
    Start(String),
}

/// Why a running module was stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// It ran past its CPU bound in one call.
    Spun,
    /// It asked for more memory than its limit.
    Memory,
    /// It tried to send far more than an event allows.
    Flood,
    /// It trapped (a bug in the module), or broke the contract otherwise.
    Trap(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Spun => f.write_str("ran past its CPU bound (an endless loop?)"),
            Stop::Memory => f.write_str("asked for more memory than its limit"),
            Stop::Flood => f.write_str("tried to send far more datagrams than an event allows"),
            Stop::Trap(why) => write!(f, "trapped: {why}"),
        }
    }
}

/// What a module asked for during one event, in order. The bytes live in
/// `data`, which keeps its capacity from event to event.
#[derive(Debug, Default)]
pub struct Actions {
    pub data: Vec<u8>,
    pub list: Vec<Action>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A datagram to entry node `entry`.
    Send {
        entry: usize,
        at: std::ops::Range<usize>,
    },
    /// A monitor module's bare IP packet over joined overlay `overlay`.
    Via {
        overlay: usize,
        at: std::ops::Range<usize>,
    },
    /// `[shim][IP packet]` back to this host.
    ToHost { at: std::ops::Range<usize> },
    /// A bare IP packet for the underlay.
    ToUnderlay { at: std::ops::Range<usize> },
}

impl Actions {
    pub fn clear(&mut self) {
        self.data.clear();
        self.list.clear();
    }

    pub fn bytes(&self, at: &std::ops::Range<usize>) -> &[u8] {
        &self.data[at.clone()]
    }
}

/// What the sandbox refused a module, by reason, since it was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusals {
    /// Sends to an entry index the overlay does not have (or, from a
    /// monitor module, to an overlay index no joined overlay has).
    pub bad_entry: u64,
    /// Sends past the per-event budget.
    pub over_budget: u64,
    /// Pointers or lengths outside its memory, or datagrams too large.
    pub bad_buffer: u64,
    /// Log lines past the per-minute budget.
    pub log_dropped: u64,
}

/// The compiled-code engine all modules share. Its epoch ticker runs as
/// long as anything (a module, a running instance) still holds the engine.
pub struct Sandbox {
    engine: Engine,
}

impl Sandbox {
    pub fn new() -> Result<Arc<Sandbox>, ModuleError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Modules are small; reserving gigabytes of address space for each
        // memory would only look alarming in the daemon's numbers.
        config.memory_reservation(1 << 30);
        let engine = Engine::new(&config).map_err(|e| ModuleError::Invalid(e.to_string()))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("oasis-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|e| ModuleError::Start(format!("the epoch thread: {e}")))?;
        Ok(Arc::new(Sandbox { engine }))
    }

    /// Compiles `bytes` and checks they keep the contract of `role`:
    /// every import one the sandbox offers it, with its type, and the
    /// exports it needs.
    pub fn compile(&self, bytes: &[u8], role: Role) -> Result<Module, ModuleError> {
        let module = Module::new(&self.engine, bytes).map_err(|e| ModuleError::Invalid(format!("{e:#}")))?;
        check_contract(&module, role)?;
        Ok(module)
    }

    /// The compiled form to keep on disk, keyed by the module's digest.
    pub fn serialize(&self, module: &Module) -> Option<Vec<u8>> {
        module.serialize().ok()
    }

    /// A module compiled earlier by this daemon (see [`serialize`]); None
    /// when the bytes are from another wasmtime or machine.
    ///
    /// # Safety
    ///
    /// `bytes` must be what [`serialize`] produced, read back from a
    /// place only the daemon writes (wasmtime runs them as machine code).
    pub unsafe fn deserialize(&self, bytes: &[u8], role: Role) -> Option<Module> {
        // SAFETY: as the caller promises.
        let module = unsafe { Module::deserialize(&self.engine, bytes) }.ok()?;
        check_contract(&module, role).ok()?;
        Some(module)
    }

    /// Instantiates `module` and runs its `oasis_start`, with the entry
    /// nodes or (a monitor module) the overlays it starts with; a
    /// monitor's overlays change later through [`Running::set_overlays`].
    pub fn instantiate(
        &self,
        module: &Module,
        name: &str,
        peers: Peers<'_>,
        shim_len: usize,
        limits: &ModuleLimits,
    ) -> Result<Running, ModuleError> {
        let role = peers.role();
        let host = Host {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .memories(1)
                .tables(4)
                .table_elements(limits.max_table_elements as usize)
                .instances(1)
                .trap_on_grow_failure(true)
                .build(),
            entries: match peers {
                Peers::Entries(count) => count,
                Peers::Overlays(_) => 0,
            },
            overlays: match peers {
                Peers::Entries(_) => Vec::new(),
                Peers::Overlays(names) => names.to_vec(),
            },
            actions: Actions::default(),
            budget: 0,
            attempts: 0,
            sends_per_event: limits.sends_per_event,
            refusals: Refusals::default(),
            started: Instant::now(),
            name: name.to_string(),
            log_minute: Instant::now(),
            log_lines: 0,
            log_lines_per_minute: limits.log_lines_per_minute,
            flooded: false,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|host| &mut host.limits);
        store.epoch_deadline_trap();
        let ticks = limits.cpu_ms_per_call.div_ceil(EPOCH.as_millis() as u64).max(1);
        store.set_epoch_deadline(ticks);
        let linker = linker(&self.engine).map_err(|e| ModuleError::Start(e.to_string()))?;
        let instance = linker
            .instantiate(&mut store, module)
            .map_err(|e| ModuleError::Start(describe(&e, &store).to_string()))?;
        let export = |name: &str, wanted: &str| ModuleError::Export {
            name: name.into(),
            wanted: wanted.into(),
        };
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(export("memory", "a memory"))?;
        let buffer_of = instance
            .get_typed_func::<(), i32>(&mut store, "oasis_buffer")
            .map_err(|_| export("oasis_buffer", "a function () -> i32"))?;
        let from_host = instance
            .get_typed_func::<i32, ()>(&mut store, "oasis_from_host")
            .map_err(|_| export("oasis_from_host", "a function (i32) -> ()"))?;
        let from_peer = instance
            .get_typed_func::<(i32, i32), ()>(&mut store, role.peer_export())
            .map_err(|_| export(role.peer_export(), "a function (i32, i32) -> ()"))?;
        let tick = instance.get_typed_func::<i64, ()>(&mut store, "oasis_tick").ok();
        let mut running = Running {
            store,
            memory,
            buffer: 0,
            from_host,
            from_peer,
            tick,
            ticks,
        };
        let buffer = running
            .call(|store| buffer_of.call(store, ()))
            .map_err(|stop| ModuleError::Start(stop.to_string()))?;
        let buffer = usize::try_from(buffer).unwrap_or(usize::MAX);
        if buffer
            .checked_add(MAX_DATAGRAM)
            .is_none_or(|end| end > running.memory.data_size(&running.store))
        {
            return Err(ModuleError::Start(format!(
                "oasis_buffer() gave {buffer}, which leaves no room for a {MAX_DATAGRAM}-byte datagram in its memory"
            )));
        }
        running.buffer = buffer;
        if let Ok(start) = instance.get_typed_func::<(i32, i32), i32>(&mut running.store, "oasis_start") {
            let code = running
                .call(|store| start.call(store, (peers.count() as i32, shim_len as i32)))
                .map_err(|stop| ModuleError::Start(stop.to_string()))?;
            if code != 0 {
                return Err(ModuleError::Start(format!("oasis_start returned {code}")));
            }
        }
        running.store.data_mut().actions.clear();
        Ok(running)
    }
}

/// What the host functions see.
struct Host {
    limits: StoreLimits,
    /// An overlay module's entry nodes.
    entries: usize,
    /// A monitor module's view of the joined overlays, by index: None
    /// where an overlay was left (indices are never reused).
    overlays: Vec<Option<String>>,
    actions: Actions,
    /// Sends left in this event, and sends tried in it.
    budget: u32,
    attempts: u32,
    sends_per_event: u32,
    refusals: Refusals,
    started: Instant,
    name: String,
    log_minute: Instant,
    log_lines: u32,
    log_lines_per_minute: u32,
    /// Set when a send loop went on far past its budget: the call ends.
    flooded: bool,
}

/// A module instance, ready for events.
pub struct Running {
    store: Store<Host>,
    memory: Memory,
    buffer: usize,
    from_host: TypedFunc<i32, ()>,
    /// `oasis_from_entry`, or a monitor's `oasis_from_overlay`.
    from_peer: TypedFunc<(i32, i32), ()>,
    tick: Option<TypedFunc<i64, ()>>,
    ticks: u64,
}

impl Running {
    /// A packet from this host for the overlay: `[shim][IP packet]`.
    pub fn from_host(&mut self, packet: &[u8], out: &mut Actions) -> Result<(), Stop> {
        let len = self.load(packet)?;
        let func = self.from_host.clone();
        self.event(out, |store| func.call(store, len))
    }

    /// A datagram from entry node `entry`.
    pub fn from_entry(&mut self, entry: usize, datagram: &[u8], out: &mut Actions) -> Result<(), Stop> {
        let len = self.load(datagram)?;
        let func = self.from_peer.clone();
        self.event(out, |store| func.call(store, (entry as i32, len)))
    }

    /// A monitor module's answer: `packet` came back over overlay
    /// `overlay`. The module gets it behind `shim_len` zero bytes, the
    /// form `to_host` takes, so it can hand it on as it is.
    pub fn from_overlay(
        &mut self,
        overlay: usize,
        shim_len: usize,
        packet: &[u8],
        out: &mut Actions,
    ) -> Result<(), Stop> {
        let len = (shim_len + packet.len()).min(MAX_DATAGRAM);
        let buffer = self.buffer;
        let room = self
            .memory
            .data_mut(&mut self.store)
            .get_mut(buffer..buffer + len)
            .ok_or_else(|| Stop::Trap("its buffer moved out of its memory".into()))?;
        let (shim, rest) = room.split_at_mut(shim_len.min(len));
        shim.fill(0);
        rest.copy_from_slice(&packet[..rest.len()]);
        let func = self.from_peer.clone();
        self.event(out, |store| func.call(store, (overlay as i32, len as i32)))
    }

    /// A monitor module's view of the joined overlays changed: names by
    /// index, None for one left.
    pub fn set_overlays(&mut self, overlays: &[Option<String>]) {
        let host = self.store.data_mut();
        host.overlays.clear();
        host.overlays.extend_from_slice(overlays);
    }

    /// Time passes (every 100 ms): probes, timeouts.
    pub fn tick(&mut self, out: &mut Actions) -> Result<(), Stop> {
        let Some(func) = self.tick.clone() else {
            return Ok(());
        };
        let now = self.store.data().started.elapsed().as_millis() as i64;
        self.event(out, |store| func.call(store, now))
    }

    pub fn refusals(&self) -> &Refusals {
        &self.store.data().refusals
    }

    fn load(&mut self, bytes: &[u8]) -> Result<i32, Stop> {
        let len = bytes.len().min(MAX_DATAGRAM);
        let buffer = self.buffer;
        self.memory
            .data_mut(&mut self.store)
            .get_mut(buffer..buffer + len)
            .ok_or_else(|| Stop::Trap("its buffer moved out of its memory".into()))?
            .copy_from_slice(&bytes[..len]);
        Ok(len as i32)
    }

    /// Runs one event with a fresh send budget; what it asks for is
    /// added to `out` (a stopped event adds nothing), so a batch of
    /// events can be sent together.
    fn event(
        &mut self,
        out: &mut Actions,
        call: impl FnOnce(&mut Store<Host>) -> wasmtime::Result<()>,
    ) -> Result<(), Stop> {
        let (data, list) = (out.data.len(), out.list.len());
        {
            let host = self.store.data_mut();
            std::mem::swap(&mut host.actions, out);
            host.budget = host.sends_per_event;
            host.attempts = 0;
        }
        let result = self.call(call);
        std::mem::swap(&mut self.store.data_mut().actions, out);
        if result.is_err() {
            out.data.truncate(data);
            out.list.truncate(list);
        }
        result
    }

    fn call<T>(&mut self, call: impl FnOnce(&mut Store<Host>) -> wasmtime::Result<T>) -> Result<T, Stop> {
        self.store.set_epoch_deadline(self.ticks);
        call(&mut self.store).map_err(|e| describe(&e, &self.store))
    }
}

fn describe(error: &wasmtime::Error, store: &Store<Host>) -> Stop {
    if store.data().flooded {
        return Stop::Flood;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Stop::Spun,
        _ => {
            let text = format!("{error:#}");
            if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
                Stop::Memory
            } else {
                Stop::Trap(text.lines().next().unwrap_or_default().to_string())
            }
        }
    }
}

/// An import the sandbox offers: name, parameters, results.
type Import = (&'static str, &'static [ValType], &'static [ValType]);

const I32_3: &[ValType] = &[ValType::I32, ValType::I32, ValType::I32];
const I32_2: &[ValType] = &[ValType::I32, ValType::I32];

/// What every module may import.
const COMMON_IMPORTS: &[Import] = &[
    ("to_host", I32_2, &[ValType::I32]),
    ("to_underlay", I32_2, &[ValType::I32]),
    ("now_ms", &[], &[ValType::I64]),
    ("log", I32_2, &[]),
];

/// What only an overlay module may import: its entry nodes.
const OVERLAY_IMPORTS: &[Import] = &[("send", I32_3, &[ValType::I32])];

/// What only a monitor module may import: the joined overlays, read-only,
/// and a way over each.
const MONITOR_IMPORTS: &[Import] = &[
    ("via", I32_3, &[ValType::I32]),
    ("overlays", &[], &[ValType::I32]),
    ("overlay_name", I32_3, &[ValType::I32]),
];

fn check_contract(module: &Module, role: Role) -> Result<(), ModuleError> {
    for import in module.imports() {
        let refuse = |why: String| ModuleError::Import {
            module: import.module().to_string(),
            name: import.name().to_string(),
            role,
            offered: role.offered(),
            why,
        };
        if import.module() != "oasis" {
            return Err(refuse("only the oasis module's functions can be imported".into()));
        }
        let Some((_, params, results)) = role.imports().find(|(name, _, _)| *name == import.name()) else {
            return Err(refuse("no such function".into()));
        };
        let ExternType::Func(ty) = import.ty() else {
            return Err(refuse("not a function".into()));
        };
        if !same_type(&ty, params, results) {
            return Err(refuse(format!("wrong type {ty}")));
        }
    }
    let exported = |name: &str| module.exports().find(|e| e.name() == name).map(|e| e.ty());
    let func =
        |name: &'static str, params: &[ValType], results: &[ValType], wanted: &'static str| match exported(
            name,
        ) {
            Some(ExternType::Func(ty)) if same_type(&ty, params, results) => Ok(()),
            _ => Err(ModuleError::Export {
                name: name.into(),
                wanted: wanted.into(),
            }),
        };
    if !matches!(exported("memory"), Some(ExternType::Memory(_))) {
        return Err(ModuleError::Export {
            name: "memory".into(),
            wanted: "a memory".into(),
        });
    }
    func("oasis_buffer", &[], &[ValType::I32], "a function () -> i32")?;
    func("oasis_from_host", &[ValType::I32], &[], "a function (i32) -> ()")?;
    func(role.peer_export(), I32_2, &[], "a function (i32, i32) -> ()")?;
    if exported("oasis_tick").is_some() {
        func("oasis_tick", &[ValType::I64], &[], "a function (i64) -> ()")?;
    }
    if exported("oasis_start").is_some() {
        func(
            "oasis_start",
            &[ValType::I32, ValType::I32],
            &[ValType::I32],
            "a function (i32, i32) -> i32",
        )?;
    }
    Ok(())
}

fn same_type(ty: &FuncType, params: &[ValType], results: &[ValType]) -> bool {
    let same = |a: &mut dyn ExactSizeIterator<Item = ValType>, b: &[ValType]| {
        a.len() == b.len() && a.zip(b).all(|(x, y)| ValType::eq(&x, y))
    };
    same(&mut ty.params(), params) && same(&mut ty.results(), results)
}

/// Where a module's call hands bytes over: `len` bytes at `ptr` of its
/// memory, bounded.
fn bytes<'a>(caller: &'a mut Caller<'_, Host>, ptr: i32, len: i32) -> Option<(&'a [u8], &'a mut Host)> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return None;
    };
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    if len > MAX_DATAGRAM {
        return None;
    }
    let (data, host) = memory.data_and_store_mut(caller);
    Some((data.get(ptr..ptr.checked_add(len)?)?, host))
}

/// Records one datagram the module hands over, within its budget.
fn hand_over(
    caller: &mut Caller<'_, Host>,
    ptr: i32,
    len: i32,
    action: impl FnOnce(std::ops::Range<usize>) -> Action,
) -> wasmtime::Result<i32> {
    {
        let host = caller.data_mut();
        host.attempts += 1;
        if host.budget == 0 {
            host.refusals.over_budget += 1;
            // A loop that will not stop sending: end the call, and the
            // module with it.
            if host.attempts > host.sends_per_event.saturating_mul(4).max(64) {
                host.flooded = true;
                return Err(wasmtime::format_err!("send flood"));
            }
            return Ok(-2);
        }
    }
    let Some((data, host)) = bytes(caller, ptr, len) else {
        caller.data_mut().refusals.bad_buffer += 1;
        return Ok(-3);
    };
    let start = host.actions.data.len();
    host.actions.data.extend_from_slice(data);
    let end = host.actions.data.len();
    host.actions.list.push(action(start..end));
    host.budget -= 1;
    Ok(0)
}

fn linker(engine: &Engine) -> wasmtime::Result<Linker<Host>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(
        "oasis",
        "send",
        |mut caller: Caller<'_, Host>, entry: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let entries = caller.data().entries;
            match usize::try_from(entry).ok().filter(|e| *e < entries) {
                Some(entry) => hand_over(&mut caller, ptr, len, |at| Action::Send { entry, at }),
                None => {
                    caller.data_mut().refusals.bad_entry += 1;
                    Ok(-1)
                }
            }
        },
    )?;
    linker.func_wrap(
        "oasis",
        "via",
        |mut caller: Caller<'_, Host>, overlay: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let known = |host: &Host, i: usize| host.overlays.get(i).is_some_and(Option::is_some);
            match usize::try_from(overlay).ok().filter(|i| known(caller.data(), *i)) {
                Some(overlay) => hand_over(&mut caller, ptr, len, |at| Action::Via { overlay, at }),
                None => {
                    caller.data_mut().refusals.bad_entry += 1;
                    Ok(-1)
                }
            }
        },
    )?;
    linker.func_wrap("oasis", "overlays", |caller: Caller<'_, Host>| -> i32 {
        caller.data().overlays.len() as i32
    })?;
    linker.func_wrap(
        "oasis",
        "overlay_name",
        |mut caller: Caller<'_, Host>, overlay: i32, ptr: i32, cap: i32| -> i32 {
            let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
                return -3;
            };
            let (data, host) = memory.data_and_store_mut(&mut caller);
            let name = usize::try_from(overlay)
                .ok()
                .and_then(|i| host.overlays.get(i))
                .and_then(Option::as_deref);
            let Some(name) = name else {
                return -1;
            };
            // Like snprintf: the name's length, written only where it fits.
            let len = name.len();
            if usize::try_from(cap).is_ok_and(|cap| cap < len) {
                return len as i32;
            }
            let room = usize::try_from(ptr)
                .ok()
                .and_then(|ptr| data.get_mut(ptr..ptr.checked_add(len)?));
            match room {
                Some(room) => {
                    room.copy_from_slice(name.as_bytes());
                    len as i32
                }
                None => {
                    host.refusals.bad_buffer += 1;
                    -3
                }
            }
        },
    )?;
    linker.func_wrap(
        "oasis",
        "to_host",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            hand_over(&mut caller, ptr, len, |at| Action::ToHost { at })
        },
    )?;
    linker.func_wrap(
        "oasis",
        "to_underlay",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            hand_over(&mut caller, ptr, len, |at| Action::ToUnderlay { at })
        },
    )?;
    linker.func_wrap("oasis", "now_ms", |caller: Caller<'_, Host>| -> i64 {
        caller.data().started.elapsed().as_millis() as i64
    })?;
    linker.func_wrap(
        "oasis",
        "log",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| {
            let len = len.min(512);
            let Some((data, host)) = bytes(&mut caller, ptr, len) else {
                caller.data_mut().refusals.bad_buffer += 1;
                return;
            };
            if host.log_minute.elapsed() >= Duration::from_secs(60) {
                host.log_minute = Instant::now();
                host.log_lines = 0;
            }
            if host.log_lines >= host.log_lines_per_minute {
                host.refusals.log_dropped += 1;
                return;
            }
            host.log_lines += 1;
            let text = String::from_utf8_lossy(data);
            tracing::info!(module = %host.name, "{}", text.trim_end());
        },
    )?;
    Ok(linker)
}
