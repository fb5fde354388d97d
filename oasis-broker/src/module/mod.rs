//! Overlay code modules (paper §2.2.1, §3.3): an overlay's specification
//! may carry code that speaks the overlay's own protocol to its entry
//! nodes. It runs in [`sandbox`], fed by [`runner`]; the contract for
//! module authors is docs/modules.md.

pub mod runner;
pub mod sandbox;

pub use sandbox::{Action, Actions, ModuleError, ModuleLimits, Refusals, Running, Sandbox, Stop};

/// Largest module `overlay add` downloads.
pub const MAX_MODULE_BYTES: usize = 16 << 20;

/// The hex SHA-256 of `bytes`, as a specification's `sha256` gives it.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostile(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../overlays/modules/hostile")
            .join(format!("{name}.wat"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn start(name: &str, limits: &ModuleLimits) -> Running {
        let sandbox = Sandbox::new().unwrap();
        let module = sandbox.compile(&hostile(name)).unwrap();
        sandbox.instantiate(&module, name, 2, 4, limits).unwrap()
    }

    #[test]
    fn a_pass_through_module_sends_and_returns() {
        let mut module = start("pass", &ModuleLimits::default());
        let mut out = Actions::default();
        module.from_host(b"shim+packet", &mut out).unwrap();
        assert_eq!(out.list.len(), 1);
        let Action::Send { entry, at } = &out.list[0] else {
            panic!("{:?}", out.list)
        };
        assert_eq!((*entry, out.bytes(at)), (0, &b"shim+packet"[..]));
        // Events add to what a batch asked for.
        module.from_entry(1, b"answer", &mut out).unwrap();
        let Action::ToHost { at } = &out.list[1] else {
            panic!("{:?}", out.list)
        };
        assert_eq!(out.bytes(at), b"answer");
        // Many events, one buffer: nothing grows per packet.
        out.clear();
        module.from_host(b"shim+packet", &mut out).unwrap();
        let capacity = out.data.capacity();
        for _ in 0..1000 {
            out.clear();
            module.from_host(b"shim+packet", &mut out).unwrap();
        }
        assert_eq!(out.data.capacity(), capacity);
    }

    #[test]
    fn imports_the_sandbox_does_not_offer_are_refused_by_name() {
        let sandbox = Sandbox::new().unwrap();
        for (module, wanted) in [
            ("tcp", "wasi:sockets/tcp@0.2.0::[method]tcp-socket.start-connect"),
            ("file", "wasi_snapshot_preview1::path_open"),
        ] {
            let err = sandbox.compile(&hostile(module)).unwrap_err();
            assert!(matches!(err, ModuleError::Import { .. }), "{err}");
            assert!(err.to_string().contains(wanted), "{err}");
        }
        assert!(matches!(
            sandbox.compile(b"not wasm").unwrap_err(),
            ModuleError::Invalid(_)
        ));
        let no_exports = sandbox
            .compile(b"(module (memory (export \"memory\") 1))")
            .unwrap_err();
        assert!(
            matches!(
                no_exports,
                ModuleError::Export {
                    name: "oasis_buffer",
                    ..
                }
            ),
            "{no_exports}"
        );
        let bad_type = sandbox
            .compile(br#"(module (import "oasis" "send" (func (param i32))))"#)
            .unwrap_err();
        assert!(bad_type.to_string().contains("wrong type"), "{bad_type}");
    }

    #[test]
    fn sends_to_undeclared_entries_or_outside_memory_are_refused() {
        let mut module = start("address", &ModuleLimits::default());
        let mut out = Actions::default();
        module.from_host(b"packet", &mut out).unwrap();
        assert!(out.list.is_empty(), "{:?}", out.list);
        let refusals = module.refusals();
        assert_eq!((refusals.bad_entry, refusals.bad_buffer), (2, 1));
    }

    #[test]
    fn a_spinning_module_is_stopped_at_its_cpu_bound() {
        let limits = ModuleLimits {
            cpu_ms_per_call: 30,
            ..ModuleLimits::default()
        };
        let mut module = start("spin", &limits);
        let started = std::time::Instant::now();
        let stop = module.from_host(b"packet", &mut Actions::default()).unwrap_err();
        assert_eq!(stop, Stop::Spun);
        // The bound is epochs of 10 ms: generous against a loaded machine.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_memory_bomb_is_stopped_at_its_limit() {
        let limits = ModuleLimits {
            memory_bytes: 4 << 20,
            ..ModuleLimits::default()
        };
        let mut module = start("memory", &limits);
        let stop = module.from_host(b"packet", &mut Actions::default()).unwrap_err();
        assert_eq!(stop, Stop::Memory);
    }

    #[test]
    fn a_flood_is_cut_to_the_budget_then_stopped() {
        let limits = ModuleLimits {
            sends_per_event: 8,
            ..ModuleLimits::default()
        };
        let mut module = start("flood", &limits);
        let mut out = Actions::default();
        let stop = module.from_host(b"packet", &mut out).unwrap_err();
        assert_eq!(stop, Stop::Flood);
        assert!(out.list.is_empty(), "a stopped event's sends went out");
        assert!(module.refusals().over_budget > 0);
    }

    #[test]
    fn a_module_too_big_for_its_memory_limit_does_not_start() {
        let sandbox = Sandbox::new().unwrap();
        let module = sandbox.compile(&hostile("pass")).unwrap();
        let limits = ModuleLimits {
            memory_bytes: 64 << 10,
            ..ModuleLimits::default()
        };
        let Err(err) = sandbox.instantiate(&module, "pass", 1, 0, &limits) else {
            panic!("a module larger than its memory limit started");
        };
        assert!(matches!(err, ModuleError::Start(_)), "{err}");
    }

    #[test]
    fn compiled_code_is_kept_and_used_again() {
        let sandbox = Sandbox::new().unwrap();
        let module = sandbox.compile(&hostile("pass")).unwrap();
        let bytes = sandbox.serialize(&module).unwrap();
        // SAFETY: serialized just now by this sandbox.
        let again = unsafe { sandbox.deserialize(&bytes) }.expect("deserializes");
        let mut running = sandbox
            .instantiate(&again, "pass", 1, 0, &ModuleLimits::default())
            .unwrap();
        running.from_host(b"x", &mut Actions::default()).unwrap();
        // SAFETY: garbage is refused by wasmtime's own header check.
        assert!(unsafe { sandbox.deserialize(b"garbage") }.is_none());
    }

    #[test]
    fn digests_are_lowercase_hex_sha256() {
        assert_eq!(
            digest(b"test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
