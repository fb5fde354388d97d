//! Compiling a module within bounds. A module is someone else's code: a
//! specification can hand over 16 MiB of WebAssembly built to make the
//! compiler take minutes and gigabytes (a million tiny functions did).
//! So before anything is compiled its sections are counted against the
//! `modules:` limits, and the compile itself runs in a child process of
//! the daemon's own binary (`oasis compile-module`, hidden) under an
//! address-space limit and a wall-clock deadline. The daemon takes the
//! compiled code back through wasmtime's serialization, and a compile that
//! overruns is killed: the daemon never grows with it, and stops at once
//! on SIGTERM (the child dies with it).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasmparser::{Parser, Payload};
use wasmtime::Module;

use super::{ModuleError, ModuleLimits, Role, Sandbox};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "compile-module";

/// Exit code of a child that refused the module (its error on stdout).
const REFUSED: i32 = 3;

/// Where modules are compiled.
#[derive(Clone, Debug)]
pub enum Compiler {
    /// In this process (tests, and platforms without the child).
    InProcess,
    /// In a child process running `exe compile-module`.
    Child(PathBuf),
}

impl Compiler {
    /// The daemon's own binary as the compiler. On Linux `/proc/self/exe`,
    /// which still runs when the file was replaced by an upgrade.
    pub fn child_of_this_process() -> Compiler {
        if cfg!(target_os = "linux") {
            return Compiler::Child(PathBuf::from("/proc/self/exe"));
        }
        match std::env::current_exe() {
            Ok(exe) => Compiler::Child(exe),
            Err(_) => Compiler::InProcess,
        }
    }

    /// Checks `bytes` against the limits, compiles them and checks the
    /// contract of `role`.
    pub fn compile(
        &self,
        sandbox: &Sandbox,
        bytes: &[u8],
        role: Role,
        limits: &ModuleLimits,
    ) -> Result<Module, ModuleError> {
        // The text format (WAT) is accepted too, as the sandbox does; the
        // counting and the compiler see its binary form.
        let bytes = wat::parse_bytes(bytes).map_err(|e| ModuleError::Invalid(e.to_string()))?;
        check_sizes(&bytes, limits)?;
        match self {
            Compiler::InProcess => sandbox.compile(&bytes, role),
            Compiler::Child(exe) => compile_in_child(exe, sandbox, &bytes, role, limits),
        }
    }
}

/// Counts what compiling `bytes` would have to chew through, and refuses a
/// module past a limit, naming the limit, before any compiling starts.
pub fn check_sizes(bytes: &[u8], limits: &ModuleLimits) -> Result<(), ModuleError> {
    let invalid = |e: wasmparser::BinaryReaderError| ModuleError::Invalid(e.to_string());
    let (mut functions, mut code, mut tables, mut data) = (0u64, 0u64, 0u64, 0u64);
    let over = |what: &str, count: u64, limit: u64, key: &str| {
        (count > limit).then(|| ModuleError::TooBig {
            what: what.into(),
            count,
            limit,
            key: key.into(),
        })
    };
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::FunctionSection(section) => functions += u64::from(section.count()),
            Payload::CodeSectionStart { size, .. } => code += u64::from(size),
            Payload::TableSection(section) => {
                for table in section {
                    tables = tables.saturating_add(table.map_err(invalid)?.ty.initial);
                }
            }
            Payload::DataSection(section) => {
                for segment in section {
                    data += segment.map_err(invalid)?.data.len() as u64;
                }
            }
            // Function bodies are not looked into: their sizes are counted.
            Payload::CodeSectionEntry(_) => {}
            _ => {}
        }
        let refused = over(
            "functions",
            functions,
            u64::from(limits.max_functions),
            "max_functions",
        )
        .or_else(|| over("bytes of code", code, limits.max_code_bytes, "max_code_bytes"))
        .or_else(|| {
            over(
                "table elements",
                tables,
                u64::from(limits.max_table_elements),
                "max_table_elements",
            )
        })
        .or_else(|| over("bytes of data", data, limits.max_data_bytes, "max_data_bytes"));
        if let Some(refused) = refused {
            return Err(refused);
        }
    }
    Ok(())
}

/// What the child prints when it refuses a module.
#[derive(serde::Serialize, serde::Deserialize)]
struct Refused {
    error: ModuleError,
}

fn compile_in_child(
    exe: &PathBuf,
    sandbox: &Sandbox,
    bytes: &[u8],
    role: Role,
    limits: &ModuleLimits,
) -> Result<Module, ModuleError> {
    let bounds = |why: String| ModuleError::Bounds(why);
    let mut command = Command::new(exe);
    command
        .args([SUBCOMMAND, "--role", &role.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let memory = limits.compile_memory_bytes;
        // CPU seconds count every thread's: the compiler uses all cores.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let cpu = limits.compile_secs.saturating_mul(threads).saturating_add(1);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setrlimit, prctl) on values computed before the fork.
        unsafe {
            command.pre_exec(move || {
                let limit = |resource, value: u64| {
                    let rlimit = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                limit(libc::RLIMIT_AS, memory)?;
                limit(libc::RLIMIT_CPU, cpu)?;
                limit(libc::RLIMIT_CORE, 0)?;
                // The compile dies with the daemon, whatever stops it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| bounds(format!("cannot start the compiler ({}): {e}", exe.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let input = bytes.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let errors = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stderr.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(limits.compile_secs);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(bounds(format!(
                    "compiling it took longer than {} s (modules.compile_secs)",
                    limits.compile_secs
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(bounds(format!("waiting for the compiler: {e}"))),
        }
    };
    let _ = feeder.join();
    let out = reader.join().unwrap_or_default();
    let said = errors.join().unwrap_or_default();
    if status.success() {
        // SAFETY: the child is this very binary, with the same wasmtime and
        // engine configuration, and wrote nothing but its serialization.
        return unsafe { sandbox.deserialize(&out, role) }
            .ok_or_else(|| bounds("the compiler's output could not be loaded".into()));
    }
    if status.code() == Some(REFUSED) {
        let refused: Refused = serde_json::from_slice(&out)
            .map_err(|e| bounds(format!("the compiler's refusal could not be read: {e}")))?;
        return Err(refused.error);
    }
    let said = said.trim();
    let cause = match exit_signal(&status) {
        Some(CPU_LIMIT) => format!(
            "compiling it used more CPU than {} s on each core (modules.compile_secs)",
            limits.compile_secs
        ),
        _ if said.contains("memory allocation") || said.contains("out of memory") => format!(
            "compiling it needed more memory than {} MiB (modules.compile_memory_bytes)",
            limits.compile_memory_bytes >> 20
        ),
        _ => format!("the compiler failed ({status}): {said}"),
    };
    Err(bounds(cause))
}

/// The signal a process gets past its CPU time limit.
#[cfg(unix)]
const CPU_LIMIT: i32 = libc::SIGXCPU;
#[cfg(not(unix))]
const CPU_LIMIT: i32 = -1;

#[cfg(unix)]
fn exit_signal(status: &std::process::ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(status)
}

#[cfg(not(unix))]
fn exit_signal(_: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// The child's side (`oasis compile-module --role ROLE`): the module's
/// bytes on stdin, its compiled code on stdout; a refusal as JSON on stdout
/// with exit code 3.
pub fn child_main(role: Role) -> std::process::ExitCode {
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("reading the module: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = Sandbox::new().and_then(|sandbox| {
        let module = sandbox.compile(&bytes, role)?;
        sandbox
            .serialize(&module)
            .ok_or_else(|| ModuleError::Invalid("its compiled code could not be serialized".into()))
    });
    let mut stdout = std::io::stdout().lock();
    match result {
        Ok(compiled) => match stdout.write_all(&compiled).and_then(|()| stdout.flush()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing the compiled module: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(error) => {
            let _ = serde_json::to_writer(&mut stdout, &Refused { error });
            std::process::ExitCode::from(REFUSED as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module of `functions` empty functions.
    fn many_functions(functions: usize) -> Vec<u8> {
        let mut wat = String::from("(module\n");
        for _ in 0..functions {
            wat.push_str("(func)\n");
        }
        wat.push(')');
        wat::parse_str(&wat).unwrap()
    }

    #[test]
    fn modules_past_a_limit_are_refused_before_compiling_naming_the_limit() {
        let limits = ModuleLimits {
            max_functions: 100,
            ..ModuleLimits::default()
        };
        assert_eq!(check_sizes(&many_functions(100), &limits), Ok(()));
        let err = check_sizes(&many_functions(101), &limits).unwrap_err();
        assert!(
            matches!(
                &err,
                ModuleError::TooBig { what, count: 101, limit: 100, .. } if what == "functions"
            ),
            "{err}"
        );
        assert!(err.to_string().contains("modules.max_functions"), "{err}");

        let tables = wat::parse_str("(module (table 200000 funcref))").unwrap();
        let err = check_sizes(&tables, &ModuleLimits::default()).unwrap_err();
        assert!(err.to_string().contains("max_table_elements"), "{err}");

        let data = wat::parse_str(format!(
            "(module (memory 1) (data (i32.const 0) \"{}\"))",
            "a".repeat(2000)
        ))
        .unwrap();
        let small = ModuleLimits {
            max_data_bytes: 1000,
            ..ModuleLimits::default()
        };
        let err = check_sizes(&data, &small).unwrap_err();
        assert!(err.to_string().contains("2000 bytes of data"), "{err}");

        let code = ModuleLimits {
            max_code_bytes: 50,
            ..ModuleLimits::default()
        };
        assert!(check_sizes(&many_functions(100), &code).is_err());
        assert!(matches!(
            check_sizes(b"\0asm\x01\0\0\0\x0a\xff", &ModuleLimits::default()),
            Err(ModuleError::Invalid(_))
        ));
    }

    #[test]
    fn a_refusal_crosses_from_the_child_intact() {
        let error = ModuleError::Export {
            name: "oasis_buffer".into(),
            wanted: "a function () -> i32".into(),
        };
        let text = serde_json::to_vec(&Refused { error: error.clone() }).unwrap();
        let back: Refused = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.error, error);
    }
}
