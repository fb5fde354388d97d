//! Overlay code modules (paper §2.2.1, §3.3): an overlay's specification
//! may carry code that speaks the overlay's own protocol to its entry
//! nodes. It runs in [`sandbox`], fed by [`runner`]; the contract for
//! module authors is docs/modules.md.

pub mod compiler;
pub mod confine;
pub mod limits;
pub mod runner;
pub mod sandbox;

pub use limits::ModuleLimits;
pub use sandbox::{Action, Actions, ModuleError, Peers, Refusals, Role, Running, Sandbox, Stop};

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
        let module = sandbox.compile(&hostile(name), Role::Overlay).unwrap();
        sandbox
            .instantiate(&module, name, Peers::Entries(2), 4, limits)
            .unwrap()
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
            let err = sandbox.compile(&hostile(module), Role::Overlay).unwrap_err();
            assert!(matches!(err, ModuleError::Import { .. }), "{err}");
            assert!(err.to_string().contains(wanted), "{err}");
        }
        assert!(matches!(
            sandbox.compile(b"not wasm", Role::Overlay).unwrap_err(),
            ModuleError::Invalid(_)
        ));
        let no_exports = sandbox
            .compile(b"(module (memory (export \"memory\") 1))", Role::Overlay)
            .unwrap_err();
        assert!(
            matches!(&no_exports, ModuleError::Export { name, .. } if name == "oasis_buffer"),
            "{no_exports}"
        );
        let bad_type = sandbox
            .compile(
                br#"(module (import "oasis" "send" (func (param i32))))"#,
                Role::Overlay,
            )
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
        let module = sandbox.compile(&hostile("pass"), Role::Overlay).unwrap();
        let limits = ModuleLimits {
            memory_bytes: 64 << 10,
            ..ModuleLimits::default()
        };
        let Err(err) = sandbox.instantiate(&module, "pass", Peers::Entries(1), 0, &limits) else {
            panic!("a module larger than its memory limit started");
        };
        assert!(matches!(err, ModuleError::Start(_)), "{err}");
    }

    #[test]
    fn compiled_code_is_kept_and_used_again() {
        let sandbox = Sandbox::new().unwrap();
        let module = sandbox.compile(&hostile("pass"), Role::Overlay).unwrap();
        let bytes = sandbox.serialize(&module).unwrap();
        // SAFETY: serialized just now by this sandbox.
        let again = unsafe { sandbox.deserialize(&bytes, Role::Overlay) }.expect("deserializes");
        let mut running = sandbox
            .instantiate(&again, "pass", Peers::Entries(1), 0, &ModuleLimits::default())
            .unwrap();
        running.from_host(b"x", &mut Actions::default()).unwrap();
        // Kept code is checked against the contract of the role it is
        // loaded for.
        // SAFETY: as above.
        assert!(unsafe { sandbox.deserialize(&bytes, Role::Monitor) }.is_none());
        // SAFETY: garbage is refused by wasmtime's own header check.
        assert!(unsafe { sandbox.deserialize(b"garbage", Role::Overlay) }.is_none());
    }

    /// The monitor module whose metric names the overlay to take.
    fn by_name() -> Vec<u8> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/modules/wat/by-name.wat");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_monitor_module_sends_over_overlays_it_finds_by_name() {
        let sandbox = Sandbox::new().unwrap();
        let module = sandbox.compile(&by_name(), Role::Monitor).unwrap();
        let mut running = sandbox
            .instantiate(&module, "mon", Peers::Overlays(&[]), 4, &ModuleLimits::default())
            .unwrap();
        let mut out = Actions::default();
        // No overlay called `fast` yet: the underlay.
        running.from_host(b"fastIP-1", &mut out).unwrap();
        let Action::ToUnderlay { at } = &out.list[0] else {
            panic!("{:?}", out.list)
        };
        assert_eq!(out.bytes(at), b"IP-1");
        out.clear();
        running.set_overlays(&[Some("slow".into()), None, Some("fast".into())]);
        running.from_host(b"fastIP-2", &mut out).unwrap();
        running.from_host(b"lossIP-3", &mut out).unwrap();
        let Action::Via { overlay, at } = &out.list[0] else {
            panic!("{:?}", out.list)
        };
        assert_eq!((*overlay, out.bytes(at)), (2, &b"IP-2"[..]));
        let Action::ToUnderlay { at } = &out.list[1] else {
            panic!("{:?}", out.list)
        };
        assert_eq!(out.bytes(at), b"IP-3");
        // An answer over an overlay comes behind a zeroed shim of the
        // monitor's own length, ready for to_host.
        out.clear();
        running.from_overlay(2, 4, b"answer", &mut out).unwrap();
        let Action::ToHost { at } = &out.list[0] else {
            panic!("{:?}", out.list)
        };
        assert_eq!(out.bytes(at), b"\0\0\0\0answer");
        // The overlay was left: its index is no longer valid, and sends
        // over it are refused.
        out.clear();
        running.set_overlays(&[Some("slow".into()), None, None]);
        running.from_host(b"fastIP-4", &mut out).unwrap();
        assert!(
            matches!(out.list[..], [Action::ToUnderlay { .. }]),
            "{:?}",
            out.list
        );
        let stale = sandbox
            .compile(
                br#"(module
                  (import "oasis" "via" (func $via (param i32 i32 i32) (result i32)))
                  (memory (export "memory") 2)
                  (func (export "oasis_buffer") (result i32) (i32.const 0))
                  (func (export "oasis_from_host") (param i32)
                    (drop (call $via (i32.const 2) (i32.const 0) (local.get 0)))
                    (drop (call $via (i32.const -1) (i32.const 0) (local.get 0))))
                  (func (export "oasis_from_overlay") (param i32 i32)))"#,
                Role::Monitor,
            )
            .unwrap();
        let mut stale = sandbox
            .instantiate(&stale, "stale", Peers::Overlays(&[]), 0, &ModuleLimits::default())
            .unwrap();
        stale.set_overlays(&[Some("slow".into()), None, None]);
        out.clear();
        stale.from_host(b"packet", &mut out).unwrap();
        assert!(out.list.is_empty(), "{:?}", out.list);
        assert_eq!(stale.refusals().bad_entry, 2);
    }

    #[test]
    fn each_role_gets_its_own_imports_and_exports() {
        let sandbox = Sandbox::new().unwrap();
        // A monitor has no entry nodes to send to, and an overlay module
        // no overlays to choose from.
        let err = sandbox.compile(&hostile("pass"), Role::Monitor).unwrap_err();
        assert!(err.to_string().contains("oasis::send"), "{err}");
        assert!(err.to_string().contains("monitor modules"), "{err}");
        let err = sandbox.compile(&by_name(), Role::Overlay).unwrap_err();
        assert!(err.to_string().contains("oasis::via"), "{err}");
        let no_answers = String::from_utf8(by_name())
            .unwrap()
            .replace("oasis_from_overlay", "oasis_from_entry");
        let err = sandbox.compile(no_answers.as_bytes(), Role::Monitor).unwrap_err();
        assert!(
            matches!(&err, ModuleError::Export { name, .. } if name == "oasis_from_overlay"),
            "{err}"
        );
    }

    #[test]
    fn digests_are_lowercase_hex_sha256() {
        assert_eq!(
            digest(b"test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
