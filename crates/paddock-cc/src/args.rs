//! Reading a compiler's command line: whether it is a compile the farm can run, and
//! if so, what it reads and writes.
//!
//! Only what is understood goes remote: a single C or C++ source compiled with `-c`
//! by flags on the list below. Anything else (links, preprocessing, assembler
//! sources, response files, flags that read or write files the command line does not
//! name) runs locally, unchanged.

use std::path::{Path, PathBuf};

/// A compile the farm can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compile {
    /// The arguments after the compiler, unchanged: they run as given.
    pub args: Vec<String>,
    pub source: PathBuf,
    /// The object, as named (`-o`) or as the compiler would name it.
    pub object: PathBuf,
    /// The dependency file `-MD`/`-MMD` ask for.
    pub dependency_file: Option<PathBuf>,
    /// The split debug info `-gsplit-dwarf` asks for.
    pub split_dwarf: Option<PathBuf>,
    /// The arguments for asking the compiler what it reads: these, without what
    /// names outputs or dependency files.
    pub scan_args: Vec<String>,
}

/// Why a command runs locally, by kind, with the detail for `--verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// A link, preprocessing, `-S`: not a compile to an object.
    NotACompile(String),
    /// A flag not on the list of understood ones.
    UnknownFlag(String),
    /// A compile with something the farm does not take (a response file, an
    /// assembler source, a flag that writes files the command line does not name).
    Unsupported(String),
}

impl Local {
    /// A short name for statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Local::NotACompile(_) => "not a compile",
            Local::UnknownFlag(_) => "an unknown flag",
            Local::Unsupported(_) => "not for the farm",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Local::NotACompile(d) | Local::Unsupported(d) => d.clone(),
            Local::UnknownFlag(flag) => format!("unknown flag {flag}"),
        }
    }
}

/// Flags that take their value as the next argument (or joined), kept as they are.
const WITH_VALUE: &[&str] = &[
    "-I",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-include",
    "-imacros",
    "-D",
    "-U",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
];

/// Flags with a value that names a dependency-file detail: kept for the compile,
/// dropped for the scan.
const DEPENDENCY_WITH_VALUE: &[&str] = &["-MF", "-MT", "-MQ"];

/// Prefixes of single-argument flags understood to change only how the source is
/// compiled, not what else is read or written.
const UNDERSTOOD_PREFIXES: &[&str] = &[
    "-O",
    "-g",
    "-std=",
    "-W",
    "-f",
    "-m",
    "-pedantic",
    "-D",
    "-U",
    "-I",
    "-isystem",
    "-iquote",
    "-idirafter",
    "-include",
    "-imacros",
    "-nostdinc",
];

const UNDERSTOOD: &[&str] = &["-pipe", "-pthread", "-w", "-ansi", "-P", "-C", "-CC", "-H"];

/// Flags and prefixes that read or write files beyond the command line's, or change
/// what the compiler does beyond compiling: local.
const LOCAL_PREFIXES: &[&str] = &[
    "-save-temps",
    "-fprofile-use",
    "-fprofile-instr-use",
    "-fauto-profile",
    "-fplugin",
    "-fdump-",
    "-fstack-usage",
    "-fcallgraph-info",
    "-ftest-coverage",
    "-fcoverage",
    "-fmodules",
    "-fcreate-profile",
    "-fopt-info",
    "-frecord-gcc-switches-file",
    "-Wp,",
    "-Wa,",
    "-specs",
    "-B",
    "--sysroot",
    "-isysroot",
    "-print-",
    "-fdiagnostics-format=sarif",
    "-fsave-optimization-record",
    "-ftime-trace",
    "-fsanitize-blacklist",
    "-fsanitize-ignorelist",
    "-fprofile-list",
];

const SOURCE_SUFFIXES: &[&str] = &["c", "cc", "cpp", "cxx", "c++", "cp", "C", "CPP", "i", "ii"];

/// Reads `args` (those after the compiler's name).
pub fn parse(args: &[String]) -> Result<Compile, Local> {
    let local = |why: String| Err(Local::Unsupported(why));
    let mut compile_only = false;
    let mut object: Option<PathBuf> = None;
    let mut sources: Vec<PathBuf> = Vec::new();
    let mut others: Vec<&str> = Vec::new();
    let mut dependencies = false;
    let mut dependency_file: Option<PathBuf> = None;
    let mut split_dwarf = false;
    let mut scan_args = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let next = || args.get(i + 1).cloned();
        if arg.starts_with('@') {
            return local(format!("response file {arg}"));
        }
        if arg == "-" {
            return local("a source read from standard input".into());
        }
        if !arg.starts_with('-') || arg.len() == 1 {
            let path = PathBuf::from(arg);
            let suffix = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !SOURCE_SUFFIXES.contains(&suffix) {
                others.push(arg);
                i += 1;
                continue;
            }
            sources.push(path);
            scan_args.push(arg.to_owned());
            i += 1;
            continue;
        }
        if LOCAL_PREFIXES.iter().any(|p| arg.starts_with(p)) || arg == "--coverage" {
            return local(format!("{arg} is done locally"));
        }
        match arg {
            "-c" => {
                compile_only = true;
                scan_args.push(arg.to_owned());
            }
            "-E" | "-S" | "-M" | "-MM" | "-fsyntax-only" => {
                return Err(Local::NotACompile(format!(
                    "{arg}: not a compile to an object"
                )))
            }
            "-v" | "-###" | "--version" | "--help" => return local(arg.to_string()),
            "-o" => {
                let Some(value) = next() else {
                    return local("-o without a file".into());
                };
                object = Some(value.into());
                i += 1;
            }
            "-MD" | "-MMD" => dependencies = true,
            "-MP" => {}
            "-gsplit-dwarf" => {
                split_dwarf = true;
                scan_args.push(arg.to_owned());
            }
            "-x" => {
                let language = next().unwrap_or_default();
                if !matches!(language.as_str(), "c" | "c++") {
                    return local(format!("-x {language}"));
                }
                scan_args.extend([arg.to_owned(), language]);
                i += 1;
            }
            _ if arg.starts_with("-x") => {
                if !matches!(&arg[2..], "c" | "c++") {
                    return local(arg.to_string());
                }
                scan_args.push(arg.to_owned());
            }
            _ if DEPENDENCY_WITH_VALUE.contains(&arg) => {
                let Some(value) = next() else {
                    return local(format!("{arg} without a value"));
                };
                if arg == "-MF" {
                    dependency_file = Some(value.into());
                }
                i += 1;
            }
            _ if DEPENDENCY_WITH_VALUE.iter().any(|p| arg.starts_with(p)) => {
                if let Some(file) = arg.strip_prefix("-MF") {
                    dependency_file = Some(file.into());
                }
            }
            _ if arg.starts_with("-o") => object = Some(arg[2..].into()),
            _ if WITH_VALUE.contains(&arg) => {
                let Some(value) = next() else {
                    return local(format!("{arg} without a value"));
                };
                scan_args.extend([arg.to_owned(), value]);
                i += 1;
            }
            _ if UNDERSTOOD.contains(&arg)
                || UNDERSTOOD_PREFIXES.iter().any(|p| arg.starts_with(p)) =>
            {
                scan_args.push(arg.to_owned());
            }
            _ => return Err(Local::UnknownFlag(arg.to_owned())),
        }
        i += 1;
    }
    if !compile_only {
        return Err(Local::NotACompile("not a compile (-c)".into()));
    }
    if let Some(other) = others.first() {
        return local(format!("{other} is not a C or C++ source"));
    }
    let source = match sources.as_slice() {
        [one] => one.clone(),
        [] => return local("no source file".into()),
        _ => return local("more than one source file".into()),
    };
    let object = object.unwrap_or_else(|| {
        let stem = source.file_stem().unwrap_or_default();
        PathBuf::from(stem).with_extension("o")
    });
    let dependency_file =
        dependencies.then(|| dependency_file.unwrap_or_else(|| replace_suffix(&object, "d")));
    let split_dwarf = split_dwarf.then(|| replace_suffix(&object, "dwo"));
    Ok(Compile {
        args: args.to_vec(),
        source,
        object,
        dependency_file,
        split_dwarf,
        scan_args,
    })
}

/// `dir/name.o` as `dir/name.SUFFIX`, as gcc names dependency and `.dwo` files.
fn replace_suffix(object: &Path, suffix: &str) -> PathBuf {
    object.with_extension(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn a_compile_with_dependency_files_is_understood() {
        let c = parse(&args(
            "-O2 -g -Iinclude -D X=1 -MD -MT obj/a.o -MF obj/a.d -c src/a.c -o obj/a.o",
        ))
        .unwrap();
        assert_eq!(c.source, PathBuf::from("src/a.c"));
        assert_eq!(c.object, PathBuf::from("obj/a.o"));
        assert_eq!(c.dependency_file, Some(PathBuf::from("obj/a.d")));
        assert_eq!(
            c.scan_args,
            args("-O2 -g -Iinclude -D X=1 -c src/a.c"),
            "outputs and dependency flags are not for the scan"
        );
    }

    #[test]
    fn default_names_follow_the_compiler() {
        let c = parse(&args("-c dir/b.cpp -MMD -gsplit-dwarf")).unwrap();
        assert_eq!(c.object, PathBuf::from("b.o"));
        assert_eq!(c.dependency_file, Some(PathBuf::from("b.d")));
        assert_eq!(c.split_dwarf, Some(PathBuf::from("b.dwo")));
        let c = parse(&args("-c a.c -o out/a.o -MD")).unwrap();
        assert_eq!(c.dependency_file, Some(PathBuf::from("out/a.d")));
    }

    #[test]
    fn everything_else_is_local() {
        for line in [
            "a.o b.o -o prog",
            "-E a.c",
            "-c a.c b.c",
            "-c @flags a.c",
            "-c -save-temps a.c",
            "-c a.s",
            "-c - -o a.o",
            "-c a.c --frobnicate",
            "-c a.c -Wp,-MD,x.d",
            "-c a.c -fprofile-use=x.gcda",
            "-c -x assembler a.c",
            "-c a.c -o",
        ] {
            assert!(parse(&args(line)).is_err(), "{line} would go remote");
        }
    }
}
