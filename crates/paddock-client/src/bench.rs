//! Benchmarks that drive a REAPI server through its public API, so the same figures
//! can be taken from Paddock and from any other server.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use paddock_reapi::proto::re::{
    content_addressable_storage_client::ContentAddressableStorageClient, ActionResult,
    ExecutedActionMetadata, FindMissingBlobsRequest, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};
use paddock_reapi::Digest;
use rand::RngCore;

use crate::transport::Transport;
use crate::{ClientError, Remote};

/// What the CAS benchmark measures, and how much of it.
#[derive(Debug, Clone)]
pub struct CasBenchOptions {
    /// Size of the blob streamed through ByteStream.
    pub large_blob: usize,
    /// How many times the large blob is written and read (a fresh blob each time).
    pub rounds: usize,
    /// How many small blobs BatchUpdateBlobs uploads.
    pub small_blobs: usize,
    /// Size of each small blob.
    pub small_blob_size: usize,
    /// How many FindMissingBlobs calls (each with every small digest) are timed.
    pub find_missing_calls: usize,
    /// How many GetActionResult calls are timed.
    pub action_result_calls: usize,
}

impl Default for CasBenchOptions {
    fn default() -> Self {
        CasBenchOptions {
            large_blob: 100 << 20,
            rounds: 3,
            small_blobs: 10_000,
            small_blob_size: 256,
            find_missing_calls: 50,
            action_result_calls: 2_000,
        }
    }
}

/// The figures the CAS benchmark took.
#[derive(Debug, Clone)]
pub struct CasBenchReport {
    pub target: String,
    pub options: CasBenchOptions,
    pub write_mib_s: Vec<f64>,
    pub read_mib_s: Vec<f64>,
    pub batch_update_blobs_s: f64,
    pub find_missing: Latencies,
    /// FindMissingBlobs of as many digests that nobody uploaded: all missing.
    pub find_missing_absent: Latencies,
    pub get_action_result: Latencies,
}

/// Latency percentiles of many timed calls.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub count: usize,
    /// The first call's: for a server that caches what it was asked, the one that
    /// found nothing cached.
    pub first: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latencies {
    /// Of `samples` in the order they were taken.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        let first = samples.first().copied().unwrap_or_default();
        samples.sort();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        Latencies {
            count: samples.len(),
            first,
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn random_bytes(len: usize) -> Bytes {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    Bytes::from(data)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the CAS benchmark: writes through `remote`; reads, FindMissingBlobs and
/// GetActionResult through `reader` (the same server, or another sharing its
/// storage, to measure one that did not see the writes).
pub async fn cas(
    remote: &Remote,
    reader: &Remote,
    options: CasBenchOptions,
) -> Result<CasBenchReport, ClientError> {
    let mut write_mib_s = Vec::new();
    let mut read_mib_s = Vec::new();
    let mib = options.large_blob as f64 / (1 << 20) as f64;
    for _ in 0..options.rounds {
        let data = random_bytes(options.large_blob);
        let digest = Digest::of(&data);
        let started = Instant::now();
        remote.write_blob(&digest, data).await?;
        write_mib_s.push(mib / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let mut stream = std::pin::pin!(reader.read_stream(&digest, 0).await?);
        let mut received = 0usize;
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            received += chunk?.len();
        }
        read_mib_s.push(mib / started.elapsed().as_secs_f64());
        if received != options.large_blob {
            return Err(ClientError::Protocol(format!(
                "read {received} of {} bytes",
                options.large_blob
            )));
        }
    }

    let small: Vec<(Digest, Bytes)> = (0..options.small_blobs)
        .map(|_| {
            let data = random_bytes(options.small_blob_size);
            (Digest::of(&data), data)
        })
        .collect();
    let digests: Vec<Digest> = small.iter().map(|(d, _)| *d).collect();
    let started = Instant::now();
    remote.upload(small).await?;
    let batch_update_blobs_s = options.small_blobs as f64 / started.elapsed().as_secs_f64();

    // The request is built once: the figure is the server's and the wire's, not the
    // cost of this client formatting ten thousand digests.
    let request = FindMissingBlobsRequest {
        instance_name: remote.instance().to_owned(),
        blob_digests: digests.iter().map(Digest::to_proto).collect(),
        digest_function: 0,
    };
    let mut cas = reader.cas();
    let find_missing = time_find_missing(
        &mut cas,
        &request,
        options.find_missing_calls,
        0,
        "freshly uploaded blobs",
    )
    .await?;

    // As many digests nobody uploaded: a server that remembers what it found listed
    // has nothing to remember of these, so each call asks its store (or index).
    let request = FindMissingBlobsRequest {
        instance_name: remote.instance().to_owned(),
        blob_digests: (0..options.small_blobs)
            .map(|_| Digest::of(random_bytes(32).as_ref()).to_proto())
            .collect(),
        digest_function: 0,
    };
    let find_missing_absent = time_find_missing(
        &mut cas,
        &request,
        options.find_missing_calls,
        options.small_blobs,
        "digests nobody uploaded",
    )
    .await?;

    let action = Digest::of(random_bytes(64).as_ref());
    let result = ActionResult {
        output_files: digests
            .iter()
            .take(10)
            .enumerate()
            .map(|(i, d)| OutputFile {
                path: format!("out/file{i}"),
                digest: Some(d.to_proto()),
                ..Default::default()
            })
            .collect(),
        execution_metadata: Some(ExecutedActionMetadata {
            worker: "bench".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            instance_name: remote.instance().to_owned(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await?;
    let mut client = reader.action_cache();
    let mut samples = Vec::new();
    for _ in 0..options.action_result_calls {
        let started = Instant::now();
        client
            .get_action_result(GetActionResultRequest {
                instance_name: remote.instance().to_owned(),
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await?;
        samples.push(started.elapsed());
    }

    Ok(CasBenchReport {
        target: String::new(),
        options,
        write_mib_s,
        read_mib_s,
        batch_update_blobs_s,
        find_missing,
        find_missing_absent,
        get_action_result: Latencies::of(samples),
    })
}

/// Times `calls` FindMissingBlobs of `request`; each must report `missing` digests
/// missing (`what` names them in the error).
async fn time_find_missing(
    cas: &mut ContentAddressableStorageClient<Transport>,
    request: &FindMissingBlobsRequest,
    calls: usize,
    missing: usize,
    what: &str,
) -> Result<Latencies, ClientError> {
    let request_len = request.blob_digests.len();
    let mut samples = Vec::new();
    for _ in 0..calls {
        // Copied before the clock starts: the figure is the server's and the wire's.
        let request = request.clone();
        let started = Instant::now();
        let answer = cas.find_missing_blobs(request).await?.into_inner();
        samples.push(started.elapsed());
        let reported = answer.missing_blob_digests.len();
        if reported != missing {
            return Err(ClientError::Protocol(format!(
                "{reported} of {} {what} are reported missing, not {missing}",
                request_len
            )));
        }
    }
    Ok(Latencies::of(samples))
}

impl fmt::Display for CasBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(f, "CAS benchmark against {}", self.target)?;
        writeln!(
            f,
            "  ByteStream write, {} MiB blob:  median {:.0} MiB/s  (rounds: {})",
            o.large_blob >> 20,
            median(&self.write_mib_s),
            self.write_mib_s
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "  ByteStream read,  {} MiB blob:  median {:.0} MiB/s  (rounds: {})",
            o.large_blob >> 20,
            median(&self.read_mib_s),
            self.read_mib_s
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "  BatchUpdateBlobs, {} blobs of {} B:  {:.0} blobs/s",
            o.small_blobs, o.small_blob_size, self.batch_update_blobs_s
        )?;
        let find_missing = |f: &mut fmt::Formatter<'_>, what: &str, l: &Latencies| {
            writeln!(
                f,
                "  FindMissingBlobs, {} {what}:  first {}  p50 {}  p99 {}  ({} calls)",
                o.small_blobs,
                ms(l.first),
                ms(l.p50),
                ms(l.p99),
                l.count
            )
        };
        find_missing(f, "digests", &self.find_missing)?;
        find_missing(f, "never uploaded", &self.find_missing_absent)?;
        write!(
            f,
            "  GetActionResult:  p50 {}  p99 {}  max {}  ({} calls)",
            ms(self.get_action_result.p50),
            ms(self.get_action_result.p99),
            ms(self.get_action_result.max),
            self.get_action_result.count
        )
    }
}

/// What one configuration of a server costs against another (TLS with a token
/// against plain text, say), from two runs of the CAS benchmark.
#[derive(Debug, Clone)]
pub struct CasComparison {
    /// The share of ByteStream throughput lost, write and read (medians), in percent.
    pub write_loss_percent: f64,
    pub read_loss_percent: f64,
    /// What GetActionResult's p50 gains.
    pub get_action_result_p50_added: Duration,
    pub find_missing_p50_added: Duration,
}

impl CasComparison {
    pub fn of(base: &CasBenchReport, other: &CasBenchReport) -> CasComparison {
        let loss = |a: &[f64], b: &[f64]| {
            let (a, b) = (median(a), median(b));
            if a > 0.0 {
                (a - b) / a * 100.0
            } else {
                0.0
            }
        };
        CasComparison {
            write_loss_percent: loss(&base.write_mib_s, &other.write_mib_s),
            read_loss_percent: loss(&base.read_mib_s, &other.read_mib_s),
            get_action_result_p50_added: other
                .get_action_result
                .p50
                .saturating_sub(base.get_action_result.p50),
            find_missing_p50_added: other.find_missing.p50.saturating_sub(base.find_missing.p50),
        }
    }
}

impl fmt::Display for CasComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "What TLS with a bearer token costs against plain text:")?;
        writeln!(
            f,
            "  ByteStream throughput: {:.1}% of write, {:.1}% of read",
            self.write_loss_percent, self.read_loss_percent
        )?;
        write!(
            f,
            "  p50 latency added: GetActionResult {}, FindMissingBlobs {}",
            ms(self.get_action_result_p50_added),
            ms(self.find_missing_p50_added)
        )
    }
}

/// What the execution benchmark measures, and how much of it.
#[derive(Debug, Clone)]
pub struct ExecBenchOptions {
    /// The no-op command each action runs.
    pub command: Vec<String>,
    /// Sequential cache-miss actions timed one by one.
    pub misses: usize,
    /// Sequential cache hits timed one by one.
    pub hits: usize,
    /// Actions run by concurrent clients for the throughput figure.
    pub parallel_actions: usize,
    pub parallel_clients: usize,
    /// Actions submitted at once to measure the scheduler with a deep queue.
    pub burst: usize,
}

impl Default for ExecBenchOptions {
    fn default() -> Self {
        ExecBenchOptions {
            command: vec!["/bin/true".into()],
            misses: 200,
            hits: 500,
            parallel_actions: 400,
            parallel_clients: 8,
            burst: 2000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecBenchReport {
    pub target: String,
    pub options: ExecBenchOptions,
    pub miss: Latencies,
    pub hit: Latencies,
    pub parallel_per_second: f64,
    pub burst_per_second: f64,
}

/// A unique no-op action: the nonce in its environment makes its digest new.
fn noop(options: &ExecBenchOptions, run: &str, nonce: usize) -> crate::exec::ExecSpec {
    crate::exec::ExecSpec {
        arguments: options.command.clone(),
        environment: vec![
            ("PADDOCK_BENCH".into(), format!("{run}-{nonce}")),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ],
        ..Default::default()
    }
}

/// Uploads and runs one action, failing unless it succeeded.
async fn run_once(remote: &Remote, spec: &crate::exec::ExecSpec) -> Result<bool, ClientError> {
    let response = crate::exec::execute(remote, spec).await?;
    let status = response.status.unwrap_or_default();
    if status.code != 0 || response.result.as_ref().is_none_or(|r| r.exit_code != 0) {
        return Err(ClientError::Protocol(format!(
            "a benchmark action failed: {} {}",
            status.code, status.message
        )));
    }
    Ok(response.cached_result)
}

/// Runs the execution benchmark against `remote`, which must have workers.
pub async fn exec(
    remote: &Remote,
    options: ExecBenchOptions,
) -> Result<ExecBenchReport, ClientError> {
    let run = uuid::Uuid::new_v4().to_string();
    // Warm up connections and the worker's cache of the empty input root.
    run_once(remote, &noop(&options, &run, usize::MAX)).await?;

    let mut samples = Vec::new();
    for i in 0..options.misses {
        let spec = noop(&options, &run, i);
        let started = Instant::now();
        let cached = run_once(remote, &spec).await?;
        samples.push(started.elapsed());
        if cached {
            return Err(ClientError::Protocol(
                "a fresh action was a cache hit".into(),
            ));
        }
    }
    let miss = Latencies::of(samples);

    // Hits: the same action again, already uploaded; time the Execute call alone.
    let spec = noop(&options, &run, 0);
    let prepared = crate::exec::prepare(&spec).await?;
    let mut samples = Vec::new();
    for _ in 0..options.hits {
        let started = Instant::now();
        let response = crate::exec::execute_digest(remote, &prepared.digest, &spec).await?;
        samples.push(started.elapsed());
        if !response.cached_result {
            return Err(ClientError::Protocol(
                "a repeated action was not a cache hit".into(),
            ));
        }
    }
    let hit = Latencies::of(samples);

    let parallel_per_second = concurrent(
        remote,
        &options,
        &run,
        1_000_000,
        options.parallel_actions,
        options.parallel_clients,
    )
    .await?;
    let burst_per_second = concurrent(
        remote,
        &options,
        &run,
        2_000_000,
        options.burst,
        options.burst,
    )
    .await?;

    Ok(ExecBenchReport {
        target: String::new(),
        options,
        miss,
        hit,
        parallel_per_second,
        burst_per_second,
    })
}

/// Runs `count` fresh actions from `clients` concurrent clients; returns actions/s.
async fn concurrent(
    remote: &Remote,
    options: &ExecBenchOptions,
    run: &str,
    base: usize,
    count: usize,
    clients: usize,
) -> Result<f64, ClientError> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (remote, options, run, next) = (
                remote.clone(),
                options.clone(),
                run.to_owned(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return Ok::<(), ClientError>(());
                    }
                    run_once(&remote, &noop(&options, &run, base + i)).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

impl fmt::Display for ExecBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "Execution benchmark against {} (command: {})",
            self.target,
            o.command.join(" ")
        )?;
        writeln!(
            f,
            "  cache miss, end to end (upload + Execute):  p50 {}  p99 {}  ({} actions, one at a time)",
            ms(self.miss.p50),
            ms(self.miss.p99),
            self.miss.count
        )?;
        writeln!(
            f,
            "  cache hit (Execute):  p50 {}  p99 {}  ({} calls)",
            ms(self.hit.p50),
            ms(self.hit.p99),
            self.hit.count
        )?;
        writeln!(
            f,
            "  throughput, {} clients:  {:.0} actions/s  ({} actions)",
            o.parallel_clients, self.parallel_per_second, o.parallel_actions
        )?;
        write!(
            f,
            "  burst of {} actions queued at once:  {:.0} actions/s",
            o.burst, self.burst_per_second
        )
    }
}

/// How the input benchmark sizes its trees.
#[derive(Debug, Clone)]
pub struct InputsBenchOptions {
    /// Files in the largest tree; smaller trees of a tenth and a half of it show
    /// whether the time grows linearly.
    pub files: usize,
    /// Files per directory.
    pub per_directory: usize,
}

/// Materialisation times for one tree, as the worker measured them.
#[derive(Debug, Clone)]
pub struct InputsRun {
    pub files: usize,
    pub directories: usize,
    /// From an empty worker cache: fetching every blob, then laying out the tree.
    pub cold: Duration,
    /// With every blob in the worker's cache: laying out the tree alone.
    pub warm: Duration,
}

#[derive(Debug, Clone)]
pub struct InputsBenchReport {
    pub target: String,
    pub runs: Vec<InputsRun>,
}

/// The worker's own account of how long it took to lay out an action's inputs.
fn input_fetch_time(response: &paddock_reapi::proto::re::ExecuteResponse) -> Option<Duration> {
    let metadata = response.result.as_ref()?.execution_metadata.as_ref()?;
    let start = paddock_reapi::time::system_time(metadata.input_fetch_start_timestamp.as_ref()?)?;
    let end = paddock_reapi::time::system_time(metadata.input_fetch_completed_timestamp.as_ref()?)?;
    end.duration_since(start).ok()
}

/// Writes a tree of `files` small files (each different), `per_directory` to a
/// directory.
fn write_tree(dir: &std::path::Path, files: usize, per_directory: usize) -> std::io::Result<usize> {
    let per_directory = per_directory.max(1);
    let directories = files.div_ceil(per_directory);
    for d in 0..directories {
        let sub = dir.join(format!("d{d:05}"));
        std::fs::create_dir_all(&sub)?;
        for f in 0..per_directory.min(files - d * per_directory) {
            std::fs::write(
                sub.join(format!("f{f:04}.c")),
                format!("int v_{d}_{f} = {f};\n"),
            )?;
        }
    }
    Ok(directories)
}

/// Measures how long a worker takes to materialise trees of many small files, cold
/// and warm, through the public protocol (the worker's timestamps in the result).
/// `fresh_worker` is called before each cold run and must return a server whose
/// worker's cache is empty.
pub async fn inputs<F, Fut>(
    options: InputsBenchOptions,
    mut fresh_worker: F,
) -> Result<InputsBenchReport, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Remote, ClientError>>,
{
    let mut runs = Vec::new();
    for files in [options.files / 10, options.files / 2, options.files] {
        let files = files.max(1);
        let tree = tempfile::tempdir()?;
        let directories = write_tree(tree.path(), files, options.per_directory)?;
        let remote = fresh_worker().await?;
        let nonce = uuid::Uuid::new_v4();
        let mut times = Vec::new();
        for run in ["cold", "warm"] {
            let spec = crate::exec::ExecSpec {
                arguments: vec!["/bin/true".into()],
                environment: vec![("PADDOCK_BENCH".into(), format!("{nonce}-{run}"))],
                input: Some(tree.path().to_owned()),
                skip_cache_lookup: true,
                ..Default::default()
            };
            let response = crate::exec::execute(&remote, &spec).await?;
            let status = response.status.clone().unwrap_or_default();
            if status.code != 0 {
                return Err(ClientError::Protocol(format!(
                    "the benchmark action failed: {}",
                    status.message
                )));
            }
            times.push(input_fetch_time(&response).ok_or_else(|| {
                ClientError::Protocol("the result has no input fetch timestamps".into())
            })?);
        }
        runs.push(InputsRun {
            files,
            directories,
            cold: times[0],
            warm: times[1],
        });
    }
    Ok(InputsBenchReport {
        target: String::new(),
        runs,
    })
}

impl fmt::Display for InputsBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Input materialisation on {} (the worker's own timestamps)",
            self.target
        )?;
        writeln!(
            f,
            "  {:>8} {:>6}  {:>12} {:>10}  {:>12} {:>10}",
            "files", "dirs", "cold", "per file", "warm", "per file"
        )?;
        for run in &self.runs {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / run.files as f64;
            writeln!(
                f,
                "  {:>8} {:>6}  {:>9.1} ms {:>7.1} µs  {:>9.1} ms {:>7.1} µs",
                run.files,
                run.directories,
                run.cold.as_secs_f64() * 1000.0,
                per(run.cold),
                run.warm.as_secs_f64() * 1000.0,
                per(run.warm),
            )?;
        }
        Ok(())
    }
}
