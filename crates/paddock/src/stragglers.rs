//! `paddock bench stragglers`: how much sooner a build finishes with speculative
//! execution when one worker is slow.

use std::time::{Duration, Instant};

use anyhow::Result;
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_config::{RunnerKind, SchedulerConfig, Span, SpeculationConfig, WorkerConfig};
use paddock_worker::Faults;

use crate::farm::Embedded;

pub struct Options {
    pub actions: usize,
    pub workers: usize,
    pub delay: Duration,
    pub action_time: Duration,
}

/// One build: every action submitted at once, the time until the last answer.
async fn build(speculation: bool, options: &Options) -> Result<(Duration, String)> {
    let scheduler = SchedulerConfig {
        speculation: SpeculationConfig {
            enabled: speculation,
            multiple: 3.0,
            min_runtime: Span::secs(1),
            min_samples: 5,
            max_fraction: 0.25,
        },
        ..Default::default()
    };
    let worker = WorkerConfig {
        capacity: Some(2),
        runner: RunnerKind::Host,
        ..Default::default()
    };
    let mut faults = vec![Faults::default(); options.workers.max(2)];
    faults[0].delay = options.delay;
    let config = paddock_config::Config {
        scheduler,
        ..Default::default()
    };
    let farm = Embedded::start_with(config, &worker, faults, None).await?;
    let remote = Remote::connect(&farm.url(), "").await?;
    let nonce = rand::random::<u32>();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..options.actions {
        let remote = remote.clone();
        let spec = ExecSpec {
            arguments: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "sleep {:.3}; echo {nonce}-{i}",
                    options.action_time.as_secs_f64()
                ),
            ],
            environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move { execute(&remote, &spec).await }));
    }
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for task in tasks {
        let response = task.await??;
        let worker = response
            .result
            .and_then(|r| r.execution_metadata)
            .map(|m| m.worker)
            .unwrap_or_default();
        *by_worker.entry(worker).or_default() += 1;
    }
    let took = started.elapsed();
    let spread: Vec<String> = by_worker.iter().map(|(w, n)| format!("{w}: {n}")).collect();
    Ok((took, spread.join(", ")))
}

pub async fn run(options: Options) -> Result<()> {
    let (without, spread_without) = build(false, &options).await?;
    let (with, spread_with) = build(true, &options).await?;
    println!(
        "Stragglers: {} actions of {:.1} s on {} workers (2 slots each, host runner), \
         bench-0 delayed by {:.0} s per action",
        options.actions,
        options.action_time.as_secs_f64(),
        options.workers.max(2),
        options.delay.as_secs_f64()
    );
    println!(
        "  without speculation  {:>7.2} s   answers by worker: {spread_without}",
        without.as_secs_f64()
    );
    println!(
        "  with speculation     {:>7.2} s   answers by worker: {spread_with}",
        with.as_secs_f64()
    );
    println!(
        "  the build finished {:.1}x sooner",
        without.as_secs_f64() / with.as_secs_f64()
    );
    Ok(())
}
