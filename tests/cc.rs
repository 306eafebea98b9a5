//! `paddock cc` against a real farm (`paddock up`, container workers): real make and
//! CMake + Ninja builds of C and C++ projects, compared byte for byte with local
//! builds in the same directory.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{paddock_bin, Farm};

/// A small C and C++ project: a library of three sources behind two headers, a
/// program in C and one in C++, and a Makefile with dependency files.
fn write_project(dir: &Path, sources: usize) {
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("include/shape.h", "#pragma once\nint area(int w, int h);\n");
    write(
        "include/greet.h",
        "#pragma once\nconst char *greeting(void);\n",
    );
    write(
        "src/shape.c",
        "#include \"shape.h\"\nint area(int w, int h) { return w * h; }\n",
    );
    write(
        "src/greet.c",
        "#include <stdio.h>\n#include \"greet.h\"\nconst char *greeting(void) { return \"hello from \" __FILE__; }\n",
    );
    let mut objects = vec!["obj/shape.o".to_owned(), "obj/greet.o".to_owned()];
    for i in 0..sources {
        write(
            &format!("src/extra{i}.c"),
            &format!("#include \"shape.h\"\n#include <string.h>\nint extra{i}(void) {{ return area({i}, 2) + (int)strlen(\"{i}\"); }}\n"),
        );
        objects.push(format!("obj/extra{i}.o"));
    }
    write(
        "src/main.c",
        "#include <stdio.h>\n#include \"shape.h\"\n#include \"greet.h\"\nint main(void) { printf(\"%s %d\\n\", greeting(), area(6, 7)); return 0; }\n",
    );
    write(
        "src/tool.cpp",
        "#include <iostream>\n#include <vector>\nextern \"C\" {\n#include \"shape.h\"\n}\nint main() { std::vector<int> v{area(2, 3)}; std::cout << v[0] << std::endl; }\n",
    );
    let objects = objects.join(" ");
    write(
        "Makefile",
        &format!(
            "CFLAGS ?= -O2 -g -Wall\nCPPFLAGS = -Iinclude\nOBJS = {objects}\n\
             all: bin/app bin/tool\n\
             bin/app: obj/main.o $(OBJS)\n\tmkdir -p bin\n\t$(CC) -o $@ $^\n\
             bin/tool: obj/tool.o obj/shape.o\n\tmkdir -p bin\n\t$(CXX) -o $@ $^\n\
             obj/%.o: src/%.c\n\tmkdir -p obj\n\t$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@\n\
             obj/%.o: src/%.cpp\n\tmkdir -p obj\n\t$(CXX) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@\n\
             clean:\n\trm -rf obj bin\n\
             -include $(wildcard obj/*.d)\n"
        ),
    );
}

/// Every file under `dir/sub` (objects, dependency files, binaries) by path.
fn snapshot(dir: &Path, subs: &[&str]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack: Vec<PathBuf> = subs.iter().map(|s| dir.join(s)).collect();
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(
                    path.strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    files
}

/// Asserts two snapshots hold the same files with the same bytes, naming any that
/// differ.
fn assert_same(have: &BTreeMap<PathBuf, Vec<u8>>, want: &BTreeMap<PathBuf, Vec<u8>>) {
    let differing: Vec<&PathBuf> = have
        .keys()
        .chain(want.keys())
        .filter(|p| have.get(*p) != want.get(*p))
        .collect();
    assert!(
        differing.is_empty(),
        "these differ from the local build: {differing:?}"
    );
}

struct Client {
    project: PathBuf,
    cache: PathBuf,
    remote: String,
}

impl Client {
    /// A project directory and a `paddock cc` cache under `dir`, for `farm`.
    fn new(dir: &Path, farm: &Farm) -> Client {
        Client {
            project: dir.join("project"),
            cache: dir.join("cc-cache"),
            remote: farm.url.clone(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.project)
            .env("PADDOCK_REMOTE", &self.remote)
            .env("PADDOCK_CC_DIR", &self.cache)
            .env("PADDOCK_ROOT", &self.project)
            .env_remove("PADDOCK_MODE")
            .env_remove("PADDOCK_VERBOSE");
        command
    }

    fn make(&self, args: &[&str], cc: &str, cxx: &str) -> Output {
        let out = self
            .command("make")
            .args(["-j4", &format!("CC={cc}"), &format!("CXX={cxx}")])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn stats(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.cache.join("stats.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::json!({}))
    }

    fn count(&self, key: &str) -> u64 {
        self.stats()[key].as_u64().unwrap_or(0)
    }

    fn fallbacks(&self) -> u64 {
        self.stats()["fallbacks"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0)
    }
}

fn wrapper(compiler: &str) -> String {
    format!("{} cc {compiler}", paddock_bin().display())
}

#[test]
fn make_builds_on_the_farm_match_local_builds_and_hit_the_cache_after_clean() {
    let farm = Farm::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(tmp.path(), &farm);
    write_project(&client.project, 4);
    // The reference: a plain local build in the same directory.
    client.make(&[], "gcc", "g++");
    let local = snapshot(&client.project, &["obj", "bin"]);
    assert_eq!(
        local.len(),
        2 * 8 + 2,
        "objects, dependency files and binaries"
    );
    client.make(&["clean"], "gcc", "g++");

    // On the farm: every compile runs remotely, and the results are identical.
    client.make(&[], &wrapper("gcc"), &wrapper("g++"));
    let compiles = 8;
    assert_eq!(client.count("remote"), compiles, "{}", client.stats());
    assert_eq!(client.fallbacks(), 0, "{}", client.stats());
    assert_same(&snapshot(&client.project, &["obj", "bin"]), &local);

    // After a clean, every compile is a cache hit; the outputs are the same again.
    client.make(&["clean"], "gcc", "g++");
    client.make(&[], &wrapper("gcc"), &wrapper("g++"));
    assert_eq!(client.count("hits"), compiles, "{}", client.stats());
    assert_eq!(client.count("remote"), compiles);
    assert_same(&snapshot(&client.project, &["obj", "bin"]), &local);

    // A header change recompiles exactly its dependants: greet.h is read by
    // greet.c and main.c only.
    std::fs::write(
        client.project.join("include/greet.h"),
        "#pragma once\n/* changed */\nconst char *greeting(void);\n",
    )
    .unwrap();
    client.make(&[], &wrapper("gcc"), &wrapper("g++"));
    assert_eq!(client.count("remote"), compiles + 2, "{}", client.stats());
    assert_eq!(client.count("hits"), compiles);

    // The masquerade: links named after the compilers, first in PATH.
    let links = tmp.path().join("masquerade");
    std::fs::create_dir(&links).unwrap();
    for name in ["gcc", "g++", "cc", "c++"] {
        std::os::unix::fs::symlink(paddock_bin(), links.join(name)).unwrap();
    }
    std::fs::write(
        client.project.join("include/greet.h"),
        "#pragma once\n/* changed again */\nconst char *greeting(void);\n",
    )
    .unwrap();
    let path = format!("{}:{}", links.display(), std::env::var("PATH").unwrap());
    let out = client
        .command("make")
        .env("PATH", &path)
        .args(["-j4", "CC=cc", "CXX=c++"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(client.count("remote"), compiles + 4, "{}", client.stats());
    let links_ran: u64 = client.stats()["local_reasons"]["not a compile"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        links_ran >= 1,
        "the link ran locally through the masquerade"
    );
}

#[test]
fn compile_errors_and_warnings_come_back_exactly_as_a_local_compile_prints_them() {
    let farm = Farm::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(tmp.path(), &farm);
    write_project(&client.project, 0);
    std::fs::write(
        client.project.join("src/broken.c"),
        "#include \"shape.h\"\nint broken(void) { int unused; return area(1); }\n",
    )
    .unwrap();
    std::fs::write(
        client.project.join("src/warned.c"),
        "#include \"shape.h\"\nint warned(void) { int unused; return area(1, 2); }\n",
    )
    .unwrap();
    std::fs::create_dir_all(client.project.join("obj")).unwrap();
    for source in ["broken", "warned"] {
        let args = [
            "-Wall",
            "-Iinclude",
            "-c",
            &format!("src/{source}.c"),
            "-o",
            &format!("obj/{source}.o"),
        ];
        let local = client.command("gcc").args(args).output().unwrap();
        let local_object = std::fs::read(client.project.join(format!("obj/{source}.o"))).ok();
        let remote = client
            .command(paddock_bin().to_str().unwrap())
            .args(["cc", "gcc"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(remote.status.code(), local.status.code(), "{source}");
        assert_eq!(
            String::from_utf8_lossy(&remote.stderr),
            String::from_utf8_lossy(&local.stderr),
            "{source}"
        );
        assert!(!local.stderr.is_empty(), "{source} has something to say");
        assert_eq!(
            std::fs::read(client.project.join(format!("obj/{source}.o"))).ok(),
            local_object,
            "{source}: the same object, or none"
        );
    }
    assert_eq!(
        client.count("remote"),
        2,
        "both ran on the farm: {}",
        client.stats()
    );

    // Split debug info comes back beside the object, as gcc names it.
    let split = [
        "-g",
        "-gsplit-dwarf",
        "-O2",
        "-Iinclude",
        "-c",
        "src/shape.c",
        "-o",
        "obj/split.o",
    ];
    let outputs = || {
        let read = |name: &str| std::fs::read(client.project.join(name)).unwrap();
        let both = (read("obj/split.o"), read("obj/split.dwo"));
        std::fs::remove_file(client.project.join("obj/split.o")).unwrap();
        std::fs::remove_file(client.project.join("obj/split.dwo")).unwrap();
        both
    };
    assert!(client
        .command("gcc")
        .args(split)
        .status()
        .unwrap()
        .success());
    let local = outputs();
    let remote = client
        .command(paddock_bin().to_str().unwrap())
        .args(["cc", "gcc"])
        .args(split)
        .status()
        .unwrap();
    assert!(remote.success());
    assert_eq!(outputs(), local);
    assert_eq!(client.count("remote"), 3, "{}", client.stats());
}

#[test]
fn a_worker_whose_toolchain_differs_never_serves_and_the_compile_runs_locally() {
    let farm = Farm::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(tmp.path(), &farm);
    write_project(&client.project, 0);
    // A system header outside the project that the worker does not have: it is part
    // of the toolchain, which the worker checks before running.
    let system = tmp.path().join("system-include");
    std::fs::create_dir_all(&system).unwrap();
    std::fs::write(system.join("vendor.h"), "#define VENDOR 41\n").unwrap();
    std::fs::write(
        client.project.join("src/vendor.c"),
        "#include <vendor.h>\nint vendor(void) { return VENDOR + 1; }\n",
    )
    .unwrap();
    std::fs::create_dir_all(client.project.join("obj")).unwrap();
    let args = [
        "-isystem",
        system.to_str().unwrap(),
        "-c",
        "src/vendor.c",
        "-o",
        "obj/vendor.o",
    ];
    let local = client.command("gcc").args(args).output().unwrap();
    assert!(local.status.success());
    let expected = std::fs::read(client.project.join("obj/vendor.o")).unwrap();
    std::fs::remove_file(client.project.join("obj/vendor.o")).unwrap();
    for _ in 0..2 {
        let out = client
            .command(paddock_bin().to_str().unwrap())
            .args(["cc", "gcc"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(client.project.join("obj/vendor.o")).unwrap(),
            expected
        );
    }
    let stats = client.stats();
    assert_eq!(client.count("remote"), 0, "no worker served it: {stats}");
    assert_eq!(client.count("hits"), 0, "{stats}");
    assert_eq!(stats["fallbacks"]["the farm refused"], 2, "{stats}");
    let log = farm.log();
    assert!(
        log.contains("declined it: toolchain file") && log.contains("vendor.h"),
        "the worker names the differing file:\n{log}"
    );
    assert!(
        !log.contains("quarantine"),
        "declining is not held against the worker:\n{log}"
    );
}

#[test]
fn the_farm_stopped_mid_build_the_build_finishes_locally_and_says_so_once() {
    let mut farm = Farm::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(tmp.path(), &farm);
    write_project(&client.project, 24);
    client.make(&[], "gcc", "g++");
    let local = snapshot(&client.project, &["obj", "bin"]);
    client.make(&["clean"], "gcc", "g++");

    let make = client
        .command("make")
        .args([
            "-j2",
            &format!("CC={}", wrapper("gcc")),
            &format!("CXX={}", wrapper("g++")),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.count("remote") < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    farm.stop();
    let out = make.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_same(&snapshot(&client.project, &["obj", "bin"]), &local);
    let stats = client.stats();
    assert!(client.count("remote") >= 3, "{stats}");
    let unreachable = stats["fallbacks"]["the farm is unreachable"]
        .as_u64()
        .unwrap_or(0);
    assert!(unreachable >= 10, "the rest ran locally: {stats}");
    assert_eq!(
        stderr.matches("compiling locally").count(),
        1,
        "said once per build, not once per file:\n{stderr}"
    );
}

#[test]
fn cmake_and_ninja_build_through_the_launcher_and_cache_only_mode_shares_results() {
    let farm = Farm::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(tmp.path(), &farm);
    write_project(&client.project, 2);
    std::fs::write(
        client.project.join("CMakeLists.txt"),
        "cmake_minimum_required(VERSION 3.16)\nproject(demo C CXX)\n\
         include_directories(include)\n\
         add_library(shapes STATIC src/shape.c src/greet.c src/extra0.c src/extra1.c)\n\
         add_executable(app src/main.c)\ntarget_link_libraries(app shapes)\n\
         add_executable(tool src/tool.cpp)\ntarget_link_libraries(tool shapes)\n",
    )
    .unwrap();
    let build = |dir: &str, launcher: Option<&str>, mode: &str| {
        // No PADDOCK_ROOT: the root is found from what the compiles read.
        let mut configure = client.command("cmake");
        configure.env_remove("PADDOCK_ROOT");
        configure.args([
            "-G",
            "Ninja",
            "-S",
            ".",
            "-B",
            dir,
            "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        ]);
        if let Some(launcher) = launcher {
            configure.arg(format!("-DCMAKE_C_COMPILER_LAUNCHER={launcher}"));
            configure.arg(format!("-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}"));
        }
        let out = configure.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = client
            .command("ninja")
            .env_remove("PADDOCK_ROOT")
            .env("PADDOCK_MODE", mode)
            .args(["-C", dir])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let launcher = format!("{};cc", paddock_bin().display());
    build("build", None, "remote");
    let local = snapshot(&client.project, &["build/CMakeFiles"]);
    let objects = |files: &BTreeMap<PathBuf, Vec<u8>>| {
        files
            .iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "o" || e == "d"))
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    std::fs::remove_dir_all(client.project.join("build")).unwrap();
    build("build", Some(&launcher), "remote");
    assert_eq!(client.count("remote"), 6, "{}", client.stats());
    assert_eq!(
        objects(&snapshot(&client.project, &["build/CMakeFiles"])),
        objects(&local),
        "objects and dependency files as a local build's"
    );

    // Cache-only: a fresh build directory elsewhere in the project compiles locally
    // and uploads; the next one is served from the cache, without the farm running
    // anything.
    build("build-a", Some(&launcher), "cache-only");
    assert_eq!(client.count("uploads"), 6, "{}", client.stats());
    std::fs::remove_dir_all(client.project.join("build-a")).unwrap();
    build("build-a", Some(&launcher), "cache-only");
    assert_eq!(client.count("hits"), 6, "{}", client.stats());
    assert_eq!(client.count("remote"), 6, "nothing more ran on the farm");
}

/// A gcc in the Nix store, made here from the machine's own: its binaries, the shared
/// libraries they load and the headers a small project needs in one store path, and
/// in a second one (which refers to the first) a `gcc` that runs them through that
/// path's dynamic loader. Nothing of `/usr` is used when it runs.
fn nix_gcc(dir: &Path) -> String {
    let run = |command: &mut Command| -> String {
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let host = |program: &str| -> PathBuf {
        let named = run(Command::new("gcc").arg(format!("-print-prog-name={program}")));
        let path = if named.contains('/') {
            PathBuf::from(named)
        } else {
            PathBuf::from(run(
                Command::new("sh").args(["-c", &format!("command -v {named}")])
            ))
        };
        std::fs::canonicalize(path).unwrap()
    };
    let t = dir.join("gcc-parts");
    for sub in ["bin", "lib", "libexec", "include", "gcc-include"] {
        std::fs::create_dir_all(t.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", t.join("bin/busybox")).expect("busybox-static");
    std::os::unix::fs::symlink("busybox", t.join("bin/sh")).unwrap();
    let driver =
        std::fs::canonicalize(run(Command::new("sh").args(["-c", "command -v gcc"]))).unwrap();
    let cc1 = host("cc1");
    let assembler = host("as");
    std::fs::copy(&driver, t.join("bin/gcc")).unwrap();
    std::fs::copy(&cc1, t.join("libexec/cc1")).unwrap();
    std::fs::copy(&assembler, t.join("libexec/as")).unwrap();
    let mut loader = String::new();
    for binary in [&driver, &cc1, &assembler] {
        for line in run(Command::new("ldd").arg(binary)).lines() {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
                None => line.split_whitespace().next().unwrap_or(""),
            };
            if !path.starts_with('/') {
                continue;
            }
            let name = Path::new(path)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if name.starts_with("ld-linux") {
                loader = name.clone();
            }
            std::fs::copy(path, t.join("lib").join(&name)).unwrap();
        }
    }
    assert!(!loader.is_empty(), "the dynamic loader was found");
    let gcc_include = cc1.parent().unwrap().join("include");
    run(Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", gcc_include.display()))
        .arg(t.join("gcc-include")));
    // The C library's headers the project reads, with the directories they pull in.
    let probe = dir.join("probe.c");
    std::fs::write(
        &probe,
        "#include <stdio.h>\n#include <string.h>\n#include <stdlib.h>\n",
    )
    .unwrap();
    let deps = run(Command::new("gcc")
        .args(["-O2", "-g", "-M", "-MT", "x"])
        .arg(&probe));
    let multiarch = run(Command::new("gcc").arg("-print-multiarch"));
    for header in deps
        .split_whitespace()
        .filter(|w| w.starts_with("/usr/include/"))
    {
        let rel = header.strip_prefix("/usr/include/").unwrap();
        let to = t.join("include").join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(header, to).unwrap();
    }
    for sub in ["bits", "gnu", "sys", "asm"] {
        let from = Path::new("/usr/include").join(&multiarch).join(sub);
        if from.is_dir() {
            let to = t.join("include").join(&multiarch);
            std::fs::create_dir_all(&to).unwrap();
            run(Command::new("cp").arg("-r").arg(&from).arg(&to));
        }
    }
    let parts = run(common::nix_command("nix-store").arg("--add").arg(&t));
    let expression = dir.join("gcc.nix");
    let script = format!(
        "#!${{t}}/bin/sh\\nexec ${{t}}/lib/{loader} --library-path ${{t}}/lib ${{t}}/bin/gcc \
         -wrapper ${{t}}/lib/{loader},--library-path,${{t}}/lib -B${{t}}/libexec/ -nostdinc \
         -isystem ${{t}}/gcc-include -isystem ${{t}}/include/{multiarch} -isystem ${{t}}/include \\\"$@\\\"\\n"
    );
    std::fs::write(
        &expression,
        format!(
            r#"let t = builtins.storePath "{parts}"; in
derivation {{
  name = "nix-gcc";
  system = builtins.currentSystem;
  builder = "${{t}}/bin/sh";
  PATH = "${{t}}/bin";
  args = [ "-c" "busybox mkdir -p $out/bin; printf '{script}' > $out/bin/gcc; busybox chmod +x $out/bin/gcc" ];
}}
"#
        ),
    )
    .unwrap();
    let gcc = run(common::nix_command("nix-build")
        .arg(&expression)
        .arg("--no-out-link"));
    format!("{gcc}/bin/gcc")
}

#[test]
fn a_compiler_from_a_nix_store_path_runs_in_exactly_its_closure() {
    let farm = Farm::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let gcc = nix_gcc(tmp.path());
    let client = Client::new(tmp.path(), &farm);
    write_project(&client.project, 2);
    let objects = [
        "obj/shape.o",
        "obj/greet.o",
        "obj/main.o",
        "obj/extra0.o",
        "obj/extra1.o",
    ];
    let make = |cc: &str| {
        let out = client
            .command("make")
            .envs(common::nix_env())
            .args(["-j2", &format!("CC={cc}")])
            .args(objects)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    make(&gcc);
    let local = snapshot(&client.project, &["obj"]);
    std::fs::remove_dir_all(client.project.join("obj")).unwrap();
    make(&wrapper(&gcc));
    assert_eq!(client.count("remote"), 5, "{}", client.stats());
    assert_eq!(client.fallbacks(), 0, "{}", client.stats());
    assert_same(&snapshot(&client.project, &["obj"]), &local);
    std::fs::remove_dir_all(client.project.join("obj")).unwrap();
    make(&wrapper(&gcc));
    assert_eq!(client.count("hits"), 5, "{}", client.stats());
    assert_same(&snapshot(&client.project, &["obj"]), &local);

    // What it reads of the C library is its own, in the store, also on the farm.
    let probe = [
        "-Iinclude",
        "-O2",
        "-g",
        "-MD",
        "-c",
        "src/greet.c",
        "-o",
        "probe.o",
    ];
    let compile = |program: &str, first: &[&str]| {
        let out = client
            .command(program)
            .envs(common::nix_env())
            .args(first)
            .args(probe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |name: &str| std::fs::read(client.project.join(name)).unwrap();
        let outputs = (read("probe.o"), read("probe.d"));
        std::fs::remove_file(client.project.join("probe.o")).unwrap();
        std::fs::remove_file(client.project.join("probe.d")).unwrap();
        outputs
    };
    let (object, dependencies) = compile(&gcc, &[]);
    let listed = String::from_utf8_lossy(&dependencies).into_owned();
    assert!(
        listed.contains("/nix/store/") && !listed.contains("/usr/include"),
        "{listed}"
    );
    let remote = compile(paddock_bin().to_str().unwrap(), &["cc", &gcc]);
    assert_eq!(remote, (object, dependencies));
    assert_eq!(client.count("remote"), 6, "{}", client.stats());
}
