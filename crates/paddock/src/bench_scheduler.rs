//! `paddock bench scheduler`: how fast the scheduler hands queued actions to
//! workers. An embedded server (memory storage) gets `actions` distinct no-op
//! actions queued first (no worker connected, no client waiting), then `workers`
//! simulated workers connect in this process over the real worker protocol and
//! answer each assignment at once with a valid result. Measured while the queue
//! drains: the dispatch rate; in the scheduler, the time from a result's arrival to
//! the freed slot's next assignment (queue to worker); and, for each simulated
//! worker, the round trip from sending a result to receiving its next assignment
//! (which adds the transport and the simulation itself, all on the same cores).
//! Then, with the whole fleet idle, actions are executed a few at a time and each
//! is timed from the Execute call to its assignment reaching a worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use paddock_client::Remote;
use paddock_config::{Config, Span, StateBackend, StorageBackend};
use paddock_proto::worker::v1 as wire;
use paddock_proto::worker::v1::scheduler_client::SchedulerClient;
use paddock_reapi::proto::re::{Action, ActionResult, Command, ExecuteRequest};
use paddock_reapi::Digest;
use paddock_worker::SchedulerAddress;
use prost::Message;
use tokio::sync::mpsc;

use crate::farm::Embedded;

pub struct Options {
    pub workers: usize,
    pub capacity: usize,
    pub actions: usize,
    /// A PostgreSQL database for `[state]` (the shared queue, the ActionCache and
    /// workers' records).
    pub postgres: Option<String>,
    /// Servers sharing that database; workers and clients are spread over them.
    pub replicas: usize,
}

/// What the simulated workers saw.
#[derive(Default)]
struct Seen {
    assigned: AtomicUsize,
    /// Round trips while the queue drains.
    latencies: parking_lot::Mutex<Vec<Duration>>,
    /// Once the queue has drained: when each action's assignment arrived.
    arrivals: parking_lot::Mutex<std::collections::HashMap<String, Instant>>,
    drained: std::sync::atomic::AtomicBool,
}

/// Actions executed one by one (a few at a time) on the idle fleet.
const PROBES: usize = 2_000;
const PROBE_CONCURRENCY: usize = 4;

pub async fn run(options: Options) -> Result<()> {
    let mut config = Config::default();
    config.storage.backend = StorageBackend::Memory;
    // Nobody waits on the operations and no worker is there while they queue: the
    // scheduler must keep them regardless.
    config.scheduler.orphan_grace = Span::secs(86_400);
    config.scheduler.unsatisfiable_grace = Span::secs(86_400);
    config.auth.quotas.max_executions = options.actions * 2;
    config.auth.quotas.max_finished_operations = options.actions * 2;
    if let Some(url) = &options.postgres {
        config.state.backend = StateBackend::Postgres;
        config.state.url = Some(url.clone());
    }
    let replicas = match options.postgres {
        Some(_) => options.replicas.max(1),
        None => 1,
    };
    let mut farms = Vec::new();
    let mut remotes = Vec::new();
    for _ in 0..replicas {
        let farm =
            Embedded::start_with(config.clone(), &Default::default(), Vec::new(), None).await?;
        remotes.push(Remote::connect(&farm.url(), "").await?);
        farms.push(farm);
    }
    // Each server has its own CAS: every one gets the blobs.
    let actions = upload_actions(&remotes, options.actions).await?;

    let queued = Instant::now();
    let submitted = futures::stream::iter(actions.iter().enumerate().map(|(i, digest)| {
        let mut execution = remotes[i % replicas].execution();
        let request = ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            ..Default::default()
        };
        async move {
            let mut stream = execution.execute(request).await?.into_inner();
            // The first answer says it is queued; nobody needs to follow it further.
            stream.message().await?;
            Ok::<(), tonic::Status>(())
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    let queueing = queued.elapsed();
    let refused = submitted.iter().filter(|r| r.is_err()).count();
    anyhow::ensure!(
        refused == 0,
        "{refused} Execute calls failed: {:?}",
        submitted.iter().find(|r| r.is_err())
    );

    let mut locals = Vec::new();
    for farm in &farms {
        let SchedulerAddress::Local(local) = farm.scheduler() else {
            anyhow::bail!("the embedded farm has no scheduler in this process");
        };
        locals.push(local);
    }
    let seen = Arc::new(Seen::default());
    let started = Instant::now();
    for i in 0..options.workers {
        let channel = locals[i % replicas].channel().await?;
        let (seen, capacity) = (seen.clone(), options.capacity);
        tokio::spawn(async move {
            let _ = simulated_worker(channel, i, capacity, seen).await;
        });
    }
    let waited = tokio::time::timeout(Duration::from_secs(1_800), async {
        while seen.assigned.load(Ordering::Relaxed) < options.actions {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let draining = started.elapsed();
    waited.context("the queue did not drain within 30 minutes")?;
    seen.drained.store(true, Ordering::Relaxed);
    let refill = Histogram::read("paddock_slot_refill_seconds");

    let mut latencies = seen.latencies.lock().clone();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let store = match &options.postgres {
        Some(_) => format!("PostgreSQL state, {replicas} server(s)"),
        None => "memory state".to_owned(),
    };
    println!(
        "scheduler, {store}: {} actions queued in {:.2} s ({:.0}/s); {} workers x {} slots \
         drained them in {:.2} s: {:.0} dispatches/s",
        options.actions,
        queueing.as_secs_f64(),
        options.actions as f64 / queueing.as_secs_f64(),
        options.workers,
        options.capacity,
        draining.as_secs_f64(),
        options.actions as f64 / draining.as_secs_f64(),
    );
    // With a shared queue, freed slots are filled by claims from the database, not
    // at the result's arrival: only the round trip below applies.
    if refill.count > 0 {
        println!(
            "queue to worker in the scheduler (result arrived to the freed slot's next assignment sent), \
             {} samples: p50 {:.3} ms, p99 {:.3} ms (interpolated within histogram buckets)",
            refill.count,
            refill.quantile(0.5) * 1e3,
            refill.quantile(0.99) * 1e3,
        );
    }
    println!(
        "round trip at a simulated worker (result sent to next assignment received), {} samples: \
         p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        latencies.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );

    // The fleet is idle: Execute to assignment, a few at a time.
    let probes = upload_actions(&remotes, PROBES).await?;
    let sent = futures::stream::iter(probes.iter().enumerate().map(|(i, digest)| {
        let mut execution = remotes[i % replicas].execution();
        let request = ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            ..Default::default()
        };
        async move {
            let at = Instant::now();
            let mut stream = execution.execute(request).await?.into_inner();
            stream.message().await?;
            Ok::<_, tonic::Status>((digest.hash_hex(), at))
        }
    }))
    .buffer_unordered(PROBE_CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    tokio::time::timeout(Duration::from_secs(300), async {
        while seen.arrivals.lock().len() < PROBES {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .context("not every probe reached a worker")?;
    let arrivals = seen.arrivals.lock().clone();
    let mut waits = Vec::with_capacity(PROBES);
    for probe in sent {
        let (hash, at) = probe?;
        waits.push(arrivals[&hash].saturating_duration_since(at));
    }
    waits.sort();
    let quantile = |q: f64| waits[((waits.len() as f64 * q) as usize).min(waits.len() - 1)];
    let kept = match options.postgres {
        Some(_) => "each queued in the database",
        None => "each journaled before Execute answers",
    };
    println!(
        "Execute to assignment with {} idle workers, {PROBES} actions {PROBE_CONCURRENCY} at a time \
         ({kept}): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        options.workers,
        quantile(0.5).as_secs_f64() * 1e3,
        quantile(0.99).as_secs_f64() * 1e3,
        waits.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Uploads `count` distinct no-op actions (a cache hit or a merge would not reach
/// the scheduler's queue) to every server and returns their digests.
async fn upload_actions(remotes: &[Remote], count: usize) -> Result<Vec<Digest>> {
    let empty = Digest::of(b"");
    let mut blobs = Vec::new();
    let mut actions = Vec::with_capacity(count);
    let nonce = rand::random::<u64>();
    for i in 0..count {
        let command = Command {
            arguments: vec!["true".into(), format!("{nonce}-{i}")],
            ..Default::default()
        }
        .encode_to_vec();
        let command_digest = Digest::of(&command);
        let action = Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(empty.to_proto()),
            do_not_cache: true,
            ..Default::default()
        }
        .encode_to_vec();
        let action_digest = Digest::of(&action);
        blobs.push((command_digest, Bytes::from(command)));
        blobs.push((action_digest, Bytes::from(action)));
        actions.push(action_digest);
    }
    for remote in remotes {
        for chunk in blobs.chunks(20_000) {
            remote.upload(chunk.to_vec()).await?;
        }
    }
    Ok(actions)
}

/// A histogram as this process's metrics recorder renders it.
struct Histogram {
    /// (upper bound, cumulative count), ascending.
    buckets: Vec<(f64, u64)>,
    count: u64,
}

impl Histogram {
    fn read(name: &str) -> Histogram {
        let text = paddock_telemetry::metrics().render();
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((bound, count)) = rest.split_once("\"} ") else {
                continue;
            };
            let bound = match bound {
                "+Inf" => f64::INFINITY,
                b => b.parse().unwrap_or(f64::INFINITY),
            };
            buckets.push((bound, count.trim().parse().unwrap_or(0)));
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let count = buckets.last().map_or(0, |b| b.1);
        Histogram { buckets, count }
    }

    /// The `q` quantile, interpolated linearly within its bucket (as Prometheus's
    /// `histogram_quantile` does).
    fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, cumulative) in &self.buckets {
            if cumulative as f64 >= rank {
                if bound.is_infinite() {
                    return lower.0;
                }
                let within = (cumulative - lower.1).max(1) as f64;
                return lower.0 + (bound - lower.0) * (rank - lower.1 as f64) / within;
            }
            lower = (bound, cumulative);
        }
        lower.0
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker that answers every assignment at once with an empty, successful result.
async fn simulated_worker(
    channel: tonic::transport::Channel,
    index: usize,
    capacity: usize,
    seen: Arc<Seen>,
) -> Result<()> {
    use wire::scheduler_message::Message as S;
    use wire::worker_message::Message as W;
    let (tx, rx) = mpsc::channel::<wire::WorkerMessage>(1024);
    tx.send(wire::WorkerMessage {
        message: Some(W::Register(wire::Register {
            name: format!("simulated-{index}"),
            properties: Vec::new(),
            capacity: capacity as u32,
        })),
    })
    .await?;
    let mut inbound = SchedulerClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let result = Bytes::from(
        ActionResult {
            exit_code: 0,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    // When a slot was last freed (a result sent), to time the next assignment.
    let mut freed: Vec<Instant> = Vec::new();
    // Heartbeats, as a real worker sends them (it runs nothing between messages).
    let beats = tx.clone();
    let heartbeat = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(2));
        loop {
            every.tick().await;
            let beat = wire::WorkerMessage {
                message: Some(W::Heartbeat(wire::Heartbeat::default())),
            };
            if beats.send(beat).await.is_err() {
                return;
            }
        }
    });
    let _stop_beating = AbortOnDrop(heartbeat);
    while let Some(message) = inbound.message().await? {
        let Some(S::Assignment(assignment)) = message.message else {
            continue;
        };
        if seen.drained.load(Ordering::Relaxed) {
            let hash = assignment.action_digest.as_ref().map(|d| d.hash.clone());
            seen.arrivals
                .lock()
                .insert(hash.unwrap_or_default(), Instant::now());
        } else if let Some(at) = freed.pop() {
            seen.latencies.lock().push(at.elapsed());
        }
        seen.assigned.fetch_add(1, Ordering::Relaxed);
        tx.send(wire::WorkerMessage {
            message: Some(W::Finished(wire::Finished {
                assignment_id: assignment.assignment_id,
                outcome: Some(wire::finished::Outcome::Completed(wire::Completed {
                    action_result: result.to_vec(),
                    ..Default::default()
                })),
            })),
        })
        .await?;
        freed.push(Instant::now());
    }
    Ok(())
}
