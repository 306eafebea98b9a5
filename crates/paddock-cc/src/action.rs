//! A compile as a REAPI action: its input tree (the sources and headers beneath the
//! project root, and the toolchain manifest), its command (the same arguments, run in
//! the same absolute directory), and the platform that pins the toolchain.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use paddock_client::Source;
use paddock_reapi::proto::re::{
    command::EnvironmentVariable, platform::Property, Action, Command, Directory, DirectoryNode,
    FileNode, Platform,
};
use paddock_reapi::Digest;

use crate::args::Compile;
use crate::toolchain::{self, Entry, HashCache};

/// Variables that change what a compiler reads or writes, passed on when set.
const PASSED_ON: &[&str] = &[
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "SOURCE_DATE_EPOCH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
];

/// Variables that make the compiler do what an action cannot (write files the
/// command line does not name): their compiles stay local.
pub const LOCAL_ONLY: &[&str] = &[
    "DEPENDENCIES_OUTPUT",
    "SUNPRO_DEPENDENCIES",
    "GCC_COMPARE_DEBUG",
    "GCC_EXEC_PREFIX",
    "COMPILER_PATH",
];

/// Top-level directories the farm will not mount a project in (the sandbox's list).
const RESERVED: &[&str] = &[
    "proc", "dev", "sys", "etc", "nix", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
    "opt", "run", "var",
];

/// A compile ready to send: the action's digest and every blob it needs.
pub struct Prepared {
    pub action: Digest,
    pub blobs: Vec<(Digest, Source)>,
    /// The outputs, relative to the working directory, as the Command lists them.
    pub outputs: Vec<String>,
}

/// Why a compile cannot be sent (it runs locally instead).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{0}")]
    Scan(#[from] crate::scan::ScanError),
    #[error("{0}")]
    Toolchain(#[from] toolchain::ToolchainError),
    #[error("{0}")]
    Layout(String),
}

impl PrepareError {
    /// A short name for statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            PrepareError::Scan(crate::scan::ScanError::Failed) => "the dependency scan failed",
            PrepareError::Scan(_) => "the dependency scan gave no answer",
            PrepareError::Toolchain(_) => "the toolchain could not be described",
            PrepareError::Layout(_) => "the project's layout",
        }
    }
}

/// `path` relative to `base`, without `..`; `None` if it is not beneath it.
fn beneath(path: &Path, base: &Path) -> Option<String> {
    let rel = path.strip_prefix(base).ok()?;
    rel.to_str().map(str::to_owned)
}

/// Whether the farm can mount a project at `root`: at least two levels deep, and
/// not in a directory the sandbox reserves.
fn mountable(root: &Path) -> bool {
    let Some(text) = root.to_str() else {
        return false;
    };
    let names: Vec<&str> = text.split('/').skip(1).collect();
    root.is_absolute()
        && names.len() >= 2
        && names.iter().all(|n| !n.is_empty())
        && !RESERVED.contains(&names[0])
}

/// The deepest directory holding both `a` and `b`.
fn common(a: &Path, b: &Path) -> PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// Where the project is, when it is not configured: the deepest directory holding
/// the working directory and every file the compile reads that is not the system's
/// (beneath a reserved directory such as `/usr` or `/nix`, or in the compiler's own
/// installation). If that is too shallow to mount, the deepest holding the working
/// directory and the source; what lies outside is then the toolchain.
fn discover_root(cwd: &Path, dependencies: &[PathBuf], source: &Path, compiler: &Path) -> PathBuf {
    let installation = compiler
        .parent()
        .and_then(Path::parent)
        .filter(|p| mountable(p));
    let system = |p: &Path| !mountable(p) || installation.is_some_and(|i| p.starts_with(i));
    let mut root = cwd.to_owned();
    for dependency in dependencies.iter().filter(|d| !system(d)) {
        root = common(&root, dependency.parent().unwrap_or(dependency));
    }
    if mountable(&root) {
        return root;
    }
    common(cwd, source.parent().unwrap_or(source))
}

/// Builds the action for `compile`, run by `compiler` (absolute) in `cwd`, with the
/// project at `configured_root`, or where [`discover_root`] finds it.
pub fn prepare(
    compile: &Compile,
    compiler: &Path,
    cwd: &Path,
    configured_root: Option<&Path>,
    hashes: &HashCache,
) -> Result<Prepared, PrepareError> {
    let layout = |why: String| PrepareError::Layout(why);
    let dependencies = crate::scan::dependencies(compiler, &compile.scan_args, cwd)?;
    let canonical = std::fs::canonicalize(compiler)
        .map_err(|e| layout(format!("{}: {e}", compiler.display())))?;
    let root = match configured_root {
        Some(root) => root.to_owned(),
        None => discover_root(
            cwd,
            &dependencies,
            &crate::scan::normal(&cwd.join(&compile.source)),
            &canonical,
        ),
    };
    let root = root.as_path();
    if !mountable(root) {
        return Err(layout(format!(
            "the project root {} cannot be mounted on the farm (set PADDOCK_ROOT)",
            root.display()
        )));
    }
    let working_directory = beneath(cwd, root).ok_or_else(|| {
        layout(format!(
            "the working directory is outside the project root {}",
            root.display()
        ))
    })?;
    let mut outputs = Vec::new();
    for output in [
        Some(&compile.object),
        compile.dependency_file.as_ref(),
        compile.split_dwarf.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let absolute = crate::scan::normal(&cwd.join(output));
        let rel = beneath(&absolute, cwd)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                layout(format!(
                    "{} is outside the working directory",
                    output.display()
                ))
            })?;
        outputs.push(rel);
    }
    outputs.sort();
    outputs.dedup();

    let nix = toolchain::store_path_of(&canonical);
    let mut files: BTreeMap<String, (Digest, bool, Source)> = BTreeMap::new();
    let mut pinned: BTreeSet<Entry> = BTreeSet::new();
    let in_closure = |p: &Path| nix.is_some() && p.starts_with("/nix/store");
    for dependency in &dependencies {
        if let Some(rel) = beneath(dependency, root).filter(|r| !r.is_empty()) {
            let (sha256, size) = hashes.sha256(dependency)?;
            let digest = Digest::parse(&sha256, size as i64)
                .map_err(|e| layout(format!("{}: {e}", dependency.display())))?;
            files.insert(rel, (digest, false, Source::File(dependency.clone())));
        } else if !in_closure(dependency) {
            pinned.extend(toolchain::entries_for(dependency, hashes)?);
        }
    }
    let mut properties = vec![("input-root-path".to_owned(), root.display().to_string())];
    let search_path = "/usr/local/bin:/usr/bin:/bin";
    match &nix {
        Some(store_path) => {
            properties.push((
                "nix-store-paths".to_owned(),
                toolchain::nix_closure(store_path)?.join(" "),
            ));
        }
        None => {
            pinned.extend(toolchain::entries_for(compiler, hashes)?);
            for helper in toolchain::helpers(compiler, search_path, hashes.dir()) {
                pinned.extend(toolchain::entries_for(&helper, hashes)?);
            }
        }
    }
    let mut blobs = Vec::new();
    if !pinned.is_empty() {
        let manifest = Bytes::from(toolchain::manifest(&pinned)?);
        let digest = Digest::of(&manifest);
        files.insert(
            toolchain::MANIFEST_NAME.to_owned(),
            (digest, false, Source::Memory(manifest)),
        );
        properties.push((
            "toolchain-manifest".to_owned(),
            toolchain::MANIFEST_NAME.to_owned(),
        ));
    }
    let root_digest = tree(files, &working_directory, &mut blobs);

    let compiler_dir = compiler
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut environment = vec![("PATH".to_owned(), format!("{compiler_dir}:{search_path}"))];
    for name in PASSED_ON {
        if let Ok(value) = std::env::var(name) {
            environment.push(((*name).to_owned(), value));
        }
    }
    environment.sort();
    properties.sort();
    let platform = Platform {
        properties: properties
            .into_iter()
            .map(|(name, value)| Property { name, value })
            .collect(),
    };
    let mut arguments = vec![compiler.display().to_string()];
    arguments.extend(compile.args.iter().cloned());
    #[allow(deprecated)] // Command.platform, for REAPI 2.0 servers.
    let command = Command {
        arguments,
        environment_variables: environment
            .into_iter()
            .map(|(name, value)| EnvironmentVariable { name, value })
            .collect(),
        output_paths: outputs.clone(),
        output_files: outputs.clone(),
        working_directory,
        platform: Some(platform.clone()),
        ..Default::default()
    };
    let (command_digest, command_bytes) = Digest::of_message(&command);
    blobs.push((command_digest, Source::Memory(Bytes::from(command_bytes))));
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root_digest.to_proto()),
        platform: Some(platform),
        ..Default::default()
    };
    let (action_digest, action_bytes) = Digest::of_message(&action);
    blobs.push((action_digest, Source::Memory(Bytes::from(action_bytes))));
    Ok(Prepared {
        action: action_digest,
        blobs,
        outputs,
    })
}

/// The Merkle tree of `files` (paths relative to the root) with the directory
/// `working_directory` present, its blobs added to `blobs`.
fn tree(
    files: BTreeMap<String, (Digest, bool, Source)>,
    working_directory: &str,
    blobs: &mut Vec<(Digest, Source)>,
) -> Digest {
    #[derive(Default)]
    struct Node {
        files: BTreeMap<String, (Digest, bool)>,
        dirs: BTreeMap<String, Node>,
    }
    fn node_at<'a>(mut node: &'a mut Node, dir: &str) -> &'a mut Node {
        for name in dir.split('/').filter(|n| !n.is_empty()) {
            node = node.dirs.entry(name.to_owned()).or_default();
        }
        node
    }
    fn seal(node: Node, blobs: &mut Vec<(Digest, Source)>) -> Digest {
        let mut directory = Directory::default();
        for (name, child) in node.dirs {
            let digest = seal(child, blobs);
            directory.directories.push(DirectoryNode {
                name,
                digest: Some(digest.to_proto()),
            });
        }
        for (name, (digest, executable)) in node.files {
            directory.files.push(FileNode {
                name,
                digest: Some(digest.to_proto()),
                is_executable: executable,
                ..Default::default()
            });
        }
        let (digest, bytes) = Digest::of_message(&directory);
        blobs.push((digest, Source::Memory(Bytes::from(bytes))));
        digest
    }
    let mut root = Node::default();
    node_at(&mut root, working_directory);
    for (path, (digest, executable, source)) in files {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", &path));
        node_at(&mut root, dir)
            .files
            .insert(name.to_owned(), (digest, executable));
        blobs.push((digest, source));
    }
    seal(root, blobs)
}

/// Where `compiler` (as the user named it) is: a path, or a name in `PATH` other
/// than this program.
pub fn locate_compiler(compiler: &str, cwd: &Path) -> Option<PathBuf> {
    if compiler.contains('/') {
        let path = crate::scan::normal(&cwd.join(compiler));
        return path.is_file().then_some(path);
    }
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| std::fs::canonicalize(p).ok());
    let search = std::env::var("PATH").unwrap_or_default();
    toolchain::find_in_path(compiler, &search, me.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_holds_the_project_and_not_the_system() {
        let compiler = Path::new("/usr/bin/x86_64-linux-gnu-gcc-12");
        let deps: Vec<PathBuf> = [
            "/tmp/t/project/src/a.c",
            "/tmp/t/project/include/a.h",
            "/usr/include/stdio.h",
            "/nix/store/abc-headers/include/x.h",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let cwd = Path::new("/tmp/t/project/build");
        let source = Path::new("/tmp/t/project/src/a.c");
        assert_eq!(
            discover_root(cwd, &deps, source, compiler),
            PathBuf::from("/tmp/t/project")
        );
        // A header elsewhere would make the root too shallow: it stays toolchain.
        let mut far = deps.clone();
        far.push("/home/me/include/far.h".into());
        assert_eq!(
            discover_root(cwd, &far, source, compiler),
            PathBuf::from("/tmp/t/project")
        );
        // The compiler's own installation is the toolchain, wherever it is.
        let mut own = deps.clone();
        own.push("/tmp/t/gcc/lib/gcc/include/stddef.h".into());
        let installed = Path::new("/tmp/t/gcc/bin/gcc");
        assert_eq!(
            discover_root(cwd, &own, source, installed),
            PathBuf::from("/tmp/t/project")
        );
        assert!(!mountable(Path::new("/tmp")) && !mountable(Path::new("/usr/src/x")));
    }
}
