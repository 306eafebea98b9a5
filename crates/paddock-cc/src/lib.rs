//! `paddock cc`: a compiler launcher (`CC="paddock cc gcc"`, CMake's
//! `CMAKE_C_COMPILER_LAUNCHER=paddock;cc`, or a `paddock-cc` link) and a masquerade
//! (links named `gcc`, `g++`, `cc`, `c++`, `clang`, `clang++` to Paddock early in
//! `PATH`; the real compiler is the next one in `PATH`).
//!
//! It owns the client side of C and C++ compiles on the farm: which invocations go
//! ([`args`]), what they read ([`scan`]), how the toolchain enters the cache key
//! ([`toolchain`]), the action ([`action`]), the modes (remote, cache-only, local;
//! [`config`]), and counters ([`stats`]). Never worse than local: whatever fails on
//! the way, the compile runs here, unchanged, and the build is told once.

pub mod action;
pub mod args;
pub mod config;
mod farm;
pub mod scan;
pub mod stats;
pub mod toolchain;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use config::{Config, Mode};
use stats::Stats;

/// Names under which this program stands in for a compiler.
pub const MASQUERADE: &[&str] = &["gcc", "g++", "cc", "c++", "clang", "clang++"];

/// What the command line asks of `paddock cc`.
#[derive(Debug)]
pub enum Invocation {
    Compile {
        compiler: OsString,
        args: Vec<OsString>,
        /// `--verbose`: say per file where it ran and why.
        verbose: bool,
    },
    Stats,
    ZeroStats,
    Help,
}

/// Whether this process is `paddock cc` (by its name or its first argument), and
/// what for. `args` is the whole command line, the program's name first.
pub fn invocation(args: &[OsString]) -> Option<Invocation> {
    let name = Path::new(args.first()?).file_name()?.to_str()?.to_owned();
    if MASQUERADE.contains(&name.as_str()) {
        return Some(Invocation::Compile {
            compiler: name.into(),
            args: args[1..].to_vec(),
            verbose: false,
        });
    }
    let rest = if name == "paddock-cc" {
        &args[1..]
    } else if args.get(1).map(|a| a == "cc").unwrap_or(false) {
        &args[2..]
    } else {
        return None;
    };
    let verbose = rest.first().is_some_and(|a| a == "--verbose");
    let rest = if verbose { &rest[1..] } else { rest };
    Some(match rest.first().and_then(|a| a.to_str()) {
        None | Some("--help") | Some("-h") => Invocation::Help,
        Some("--stats") | Some("-s") => Invocation::Stats,
        Some("--zero-stats") | Some("-z") => Invocation::ZeroStats,
        Some(_) => Invocation::Compile {
            compiler: rest[0].clone(),
            args: rest[1..].to_vec(),
            verbose,
        },
    })
}

const HELP: &str = "\
usage: paddock cc [--verbose] COMPILER ARGS...   compile on the farm (or from its cache)
       paddock cc --stats | --zero-stats

Environment: PADDOCK_REMOTE (grpc://host:port), PADDOCK_INSTANCE, PADDOCK_MODE
(remote, cache-only, local), PADDOCK_ROOT (the project root), PADDOCK_TOKEN_FILE,
PADDOCK_TLS_CA, PADDOCK_TLS_CERT, PADDOCK_TLS_KEY, PADDOCK_VERBOSE=1, PADDOCK_CC_DIR,
PADDOCK_CC_CONFIG (a TOML file with the same keys in lower case).
";

/// Runs `paddock cc`; returns the exit code.
pub fn main(invocation: Invocation) -> i32 {
    let config = Config::load();
    let cache_dir = match &config {
        Ok(c) => c.cache_dir.clone(),
        Err(_) => std::env::temp_dir().join("paddock-cc"),
    };
    match invocation {
        Invocation::Help => {
            print!("{HELP}");
            0
        }
        Invocation::Stats => match stats::load(&cache_dir) {
            Ok(s) => {
                print!("{}", s.render());
                0
            }
            Err(e) => {
                eprintln!("paddock cc: reading the statistics: {e}");
                1
            }
        },
        Invocation::ZeroStats => match stats::zero(&cache_dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("paddock cc: zeroing the statistics: {e}");
                1
            }
        },
        Invocation::Compile {
            compiler,
            args,
            verbose,
        } => {
            let started = Instant::now();
            let mut delta = Stats::default();
            let config = config.map(|mut c| {
                c.verbose |= verbose;
                c
            });
            let code = compile(config, &compiler, &args, &mut delta);
            delta.seconds = started.elapsed().as_secs_f64();
            let _ = stats::record(&cache_dir, &delta);
            code
        }
    }
}

/// Runs the compiler here, as asked, and returns its exit code.
fn run_locally(compiler: &Path, args: &[OsString]) -> i32 {
    match std::process::Command::new(compiler).args(args).status() {
        Ok(status) => exit_code(status),
        Err(e) => {
            eprintln!("paddock cc: running {}: {e}", compiler.display());
            127
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn compile(
    config: Result<Config, String>,
    compiler: &OsString,
    args: &[OsString],
    delta: &mut Stats,
) -> i32 {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let name = compiler.to_string_lossy().into_owned();
    let Some(compiler_path) = action::locate_compiler(&name, &cwd) else {
        eprintln!("paddock cc: cannot find the compiler {name:?} in PATH");
        return 127;
    };
    let local = |delta: &mut Stats, why: &str| {
        delta.local += 1;
        *delta.local_reasons.entry(why.to_owned()).or_default() += 1;
        run_locally(&compiler_path, args)
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("paddock cc: {e}; compiling locally");
            return local(delta, "the configuration is unreadable");
        }
    };
    let verbose = |what: &str| {
        if config.verbose {
            eprintln!("paddock cc: {what}");
        }
    };
    if config.mode == Mode::Local {
        verbose("local mode: compiling locally");
        return local(delta, "local mode");
    }
    if config.remote.is_none() {
        return local(delta, "no PADDOCK_REMOTE");
    }
    let Some(text_args) = args
        .iter()
        .map(|a| a.to_str().map(str::to_owned))
        .collect::<Option<Vec<String>>>()
    else {
        return local(delta, "arguments that are not UTF-8");
    };
    let parsed = match args::parse(&text_args) {
        Ok(c) => c,
        Err(why) => {
            verbose(&format!("{}: running locally", why.detail()));
            return local(delta, why.kind());
        }
    };
    if let Some(variable) = action::LOCAL_ONLY
        .iter()
        .find(|v| std::env::var_os(v).is_some())
    {
        verbose(&format!("{variable} is set: compiling locally"));
        return local(delta, "an environment the farm does not take");
    }
    let source = parsed.source.display().to_string();
    let fallback = |delta: &mut Stats, kind: &str, detail: &str| {
        *delta.fallbacks.entry(kind.to_owned()).or_default() += 1;
        if config.verbose {
            eprintln!("paddock cc: {source}: {detail}; compiling locally");
        } else if stats::notice_due(&config.cache_dir, &notice_name(kind), config.retry_after) {
            eprintln!("paddock cc: {detail}; compiling locally (said once per build)");
        }
        run_locally(&compiler_path, args)
    };
    if stats::recently(
        &config.cache_dir,
        &notice_name(farm::UNREACHABLE),
        config.retry_after,
    ) {
        *delta
            .fallbacks
            .entry(farm::UNREACHABLE.to_owned())
            .or_default() += 1;
        return run_locally(&compiler_path, args);
    }
    let root = config.root_for(&cwd);
    let hashes = toolchain::HashCache::new(config.cache_dir.join("hashes"));
    let prepared = match action::prepare(&parsed, &compiler_path, &cwd, root.as_deref(), &hashes) {
        Ok(p) => p,
        Err(e) => return fallback(delta, e.kind(), &e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fallback(delta, "the client could not start", &e.to_string()),
    };
    let served = runtime.block_on(farm::serve(
        &config,
        &prepared,
        &cwd,
        &compiler_path,
        args,
        delta,
    ));
    match served {
        Ok(code) => {
            verbose(&format!("{source}: {}", farm::describe(delta)));
            code
        }
        Err(failure) => fallback(delta, failure.kind(), &failure.to_string()),
    }
}

fn notice_name(kind: &str) -> String {
    kind.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn invocations_are_recognised_by_name_and_first_argument() {
        assert!(matches!(
            invocation(&os(&["/x/bin/g++", "-c", "a.cc"])),
            Some(Invocation::Compile { compiler, args, verbose: false }) if compiler == "g++" && args.len() == 2
        ));
        assert!(matches!(
            invocation(&os(&["paddock", "cc", "gcc", "-c", "a.c"])),
            Some(Invocation::Compile { compiler, .. }) if compiler == "gcc"
        ));
        assert!(matches!(
            invocation(&os(&["paddock-cc", "--stats"])),
            Some(Invocation::Stats)
        ));
        assert!(matches!(
            invocation(&os(&["paddock", "cc", "--verbose", "gcc", "-c", "a.c"])),
            Some(Invocation::Compile { compiler, verbose: true, .. }) if compiler == "gcc"
        ));
        assert!(invocation(&os(&["paddock", "up"])).is_none());
    }
}
