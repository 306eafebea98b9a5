//! `paddock bench web`: how long the web pages take with a large invocation. An
//! embedded farm (memory storage, host-runner workers) runs `actions` distinct small
//! actions under one invocation id, through the public protocol, so that the history
//! holds them as it would a real build's; then each page is fetched `fetches` times
//! over HTTP and the times are reported (the server renders; the client only reads).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use paddock_client::exec::{execute, ExecSpec};
use paddock_client::Remote;
use paddock_config::{Config, RunnerKind, WorkerConfig};

use crate::farm::Embedded;

/// The invocation the actions belong to.
const INVOCATION: &str = "bench-web-invocation";
/// Actions in flight at once.
const CONCURRENCY: usize = 64;

/// Fetches `path` over HTTP/1.1; the time to the last byte, and the status line.
fn fetch(address: &str, path: &str) -> Result<(Duration, String, usize)> {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or("").to_owned();
    Ok((elapsed, status, response.len()))
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

pub async fn run(actions: usize, fetches: usize) -> Result<()> {
    let mut config = Config::default();
    config.history.max_actions_per_invocation =
        config.history.max_actions_per_invocation.max(actions);
    config.auth.quotas.max_executions = config.auth.quotas.max_executions.max(actions * 2);
    let worker = WorkerConfig {
        runner: RunnerKind::Host,
        capacity: Some(8),
        ..WorkerConfig::default()
    };
    let faults = vec![paddock_worker::Faults::default(); 2];
    let farm = Embedded::start_with(config, &worker, faults, None).await?;
    let remote = Remote::connect(&farm.url(), "").await?;

    let started = Instant::now();
    let ran = futures::stream::iter((0..actions).map(|i| {
        let remote = remote.clone();
        async move {
            let spec = ExecSpec {
                arguments: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo \"$0\" > out.txt".into(),
                    format!("action {i}"),
                ],
                environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
                output_paths: vec!["out.txt".into()],
                invocation: INVOCATION.into(),
                ..ExecSpec::default()
            };
            execute(&remote, &spec).await
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    let failed = ran.iter().filter(|r| r.is_err()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} actions failed: {:?}",
        ran.iter().find(|r| r.is_err())
    );
    println!(
        "paddock bench web: {actions} actions run in {:.1} s under invocation {INVOCATION}",
        started.elapsed().as_secs_f64()
    );

    let pages_url = farm.pages_url();
    let address = pages_url
        .strip_prefix("http://")
        .context("the embedded farm serves its pages over plain HTTP")?
        .to_owned();
    let action = {
        let (_, _, _) = fetch(&address, "/")?;
        // The invocation page links its actions; take the first one's page.
        let mut stream = std::net::TcpStream::connect(&address)?;
        write!(
            stream,
            "GET /invocation/{INVOCATION} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut page = String::new();
        stream.read_to_string(&mut page)?;
        let at = page
            .find("href=\"/action/")
            .context("the invocation page links no action")?;
        let rest = &page[at + 6..];
        rest[..rest.find('"').context("an unterminated link")?].replace("&amp;", "&")
    };
    let last_page = actions.div_ceil(100).saturating_sub(1);
    let pages = [
        ("overview", "/".to_owned()),
        ("invocations", "/invocations".to_owned()),
        (
            "invocation, first page",
            format!("/invocation/{INVOCATION}"),
        ),
        (
            "invocation, last page",
            format!("/invocation/{INVOCATION}?page={last_page}"),
        ),
        ("action (with the cache-miss search)", action),
        ("workers", "/workers".to_owned()),
    ];
    println!(
        "{:<38} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "page", "min ms", "p50 ms", "p95 ms", "max ms", "bytes"
    );
    for (name, path) in pages {
        let mut times = Vec::with_capacity(fetches);
        let mut size = 0;
        for _ in 0..fetches.max(1) {
            let (elapsed, status, bytes) = tokio::task::spawn_blocking({
                let (address, path) = (address.clone(), path.clone());
                move || fetch(&address, &path)
            })
            .await??;
            anyhow::ensure!(status.contains(" 200 "), "{path}: {status}");
            times.push(elapsed);
            size = bytes;
        }
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "{name:<38} {:>8} {:>8} {:>8} {:>8} {size:>9}",
            millis(times[0]),
            millis(at(0.5)),
            millis(at(0.95)),
            millis(times[times.len() - 1])
        );
    }
    Ok(())
}
