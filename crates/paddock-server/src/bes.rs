//! The Build Event Service (`google.devtools.build.v1.PublishBuildEvent`): Bazel's
//! `--bes_backend` streams its build events here, and what they say of targets,
//! tests and the build's outcome goes into the farm's history under the invocation's
//! id, the same id Bazel sends with its remote calls.
//!
//! Publishing needs `execute` on some instance. The history keeps each identity's
//! invocations apart, so events under someone else's invocation id make an
//! invocation of the sender's own and never change another's build. What one
//! invocation's events may hold is bounded (patterns, label and URI lengths, logs per
//! test, and the history's count of targets and tests).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use paddock_config::Permission;
use paddock_history::{clip, BuildReport, History, MAX_NAME, MAX_TEXT};
use paddock_proto::build_event_stream::{
    self as bep, build_event::Payload, build_event_id::Id, BUILD_EVENT,
};
use paddock_proto::google::devtools::build::v1::{
    build_event::Event, publish_build_event_server::PublishBuildEvent, OrderedBuildEvent,
    PublishBuildToolEventStreamRequest, PublishBuildToolEventStreamResponse,
    PublishLifecycleEventRequest,
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{method, principal, require};
use crate::invalid;

/// The longest invocation id accepted (Bazel's are UUIDs).
const MAX_INVOCATION_ID: usize = 256;
/// Target patterns kept per invocation.
const MAX_PATTERNS: usize = 100;
/// Logs kept per test.
const MAX_LOGS: usize = 10;

pub struct BuildEventService {
    history: Arc<History>,
}

impl BuildEventService {
    pub fn new(history: Arc<History>) -> Self {
        BuildEventService { history }
    }
}

/// Checks that the caller may publish at all; its name.
fn publisher<T>(request: &Request<T>) -> Result<String, Status> {
    let caller = principal(request)?;
    if !caller.may_somewhere(Permission::Execute) {
        require(&caller, method(request), Permission::Execute, "")?;
    }
    Ok(caller.name().to_owned())
}

fn invocation_id(event: &OrderedBuildEvent) -> Result<String, Status> {
    let id = event
        .stream_id
        .as_ref()
        .map(|s| s.invocation_id.as_str())
        .unwrap_or_default();
    if id.is_empty() || id.len() > MAX_INVOCATION_ID || id.chars().any(|c| c.is_control()) {
        return Err(invalid(format!(
            "stream_id.invocation_id must be 1 to {MAX_INVOCATION_ID} printable characters"
        )));
    }
    Ok(id.to_owned())
}

/// The longest time span a build event may give (more is taken as nonsense).
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A span from seconds and nanoseconds (or milliseconds), if it is sensible.
fn span(seconds: i64, nanos: i32, millis: i64) -> Option<Duration> {
    let span = if seconds > 0 || nanos > 0 {
        let nanos = u64::try_from(nanos).ok()?.min(999_999_999);
        Duration::from_secs(u64::try_from(seconds).ok()?)
            .checked_add(Duration::from_nanos(nanos))?
    } else if millis > 0 {
        Duration::from_millis(millis as u64)
    } else {
        return None;
    };
    (span <= MAX_SPAN).then_some(span)
}

fn time(timestamp: Option<&prost_types::Timestamp>, millis: i64) -> Option<SystemTime> {
    let (seconds, nanos) = timestamp.map_or((0, 0), |t| (t.seconds, t.nanos));
    SystemTime::UNIX_EPOCH.checked_add(span(seconds, nanos, millis)?)
}

fn duration(d: Option<&prost_types::Duration>, millis: i64) -> Option<Duration> {
    let (seconds, nanos) = d.map_or((0, 0), |d| (d.seconds, d.nanos));
    span(seconds, nanos, millis)
}

fn status_word(status: i32) -> String {
    bep::TestStatus::try_from(status)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("STATUS_{status}"))
}

/// What one of Bazel's events says, applied to the invocation's report.
fn apply(event: bep::BuildEvent, report: &mut BuildReport) {
    let id = event.id.and_then(|id| id.id);
    match (id, event.payload) {
        (_, Some(Payload::Started(started))) => {
            report.command = clip(&started.command, MAX_NAME);
            report.tool_version = clip(&started.build_tool_version, MAX_NAME);
            report.started = time(started.start_time.as_ref(), started.start_time_millis);
        }
        (Some(Id::Pattern(pattern)), _) => {
            let room = MAX_PATTERNS.saturating_sub(report.patterns.len());
            let patterns = pattern.pattern.iter().take(room);
            report.patterns.extend(patterns.map(|p| clip(p, MAX_TEXT)));
        }
        (Some(Id::TargetConfigured(id)), Some(Payload::Configured(configured))) => {
            report
                .targets
                .entry(clip(&id.label, MAX_TEXT))
                .or_default()
                .kind = clip(&configured.target_kind, MAX_NAME);
        }
        (Some(Id::TargetCompleted(id)), Some(Payload::Completed(completed))) => {
            let target = report.targets.entry(clip(&id.label, MAX_TEXT)).or_default();
            target.success = Some(completed.success);
        }
        (Some(Id::TestResult(id)), Some(Payload::TestResult(result))) => {
            let test = report.tests.entry(clip(&id.label, MAX_TEXT)).or_default();
            test.status = status_word(result.status);
            test.attempts = test.attempts.max(id.attempt.max(1) as u32);
            test.cached = result.cached_locally;
            test.duration = duration(
                result.test_attempt_duration.as_ref(),
                result.test_attempt_duration_millis,
            );
            test.logs = result
                .test_action_output
                .into_iter()
                .filter_map(|file| match file.file {
                    Some(bep::file::File::Uri(uri)) => {
                        Some((clip(&file.name, MAX_NAME), clip(&uri, MAX_TEXT)))
                    }
                    _ => None,
                })
                .take(MAX_LOGS)
                .collect();
        }
        (Some(Id::TestSummary(id)), Some(Payload::TestSummary(summary))) => {
            let test = report.tests.entry(clip(&id.label, MAX_TEXT)).or_default();
            test.status = status_word(summary.overall_status);
            test.attempts = test.attempts.max(summary.attempt_count.max(0) as u32);
            if let Some(total) = duration(
                summary.total_run_duration.as_ref(),
                summary.total_run_duration_millis,
            ) {
                test.duration = Some(total);
            }
        }
        (_, Some(Payload::Finished(finished))) => {
            report.finished = time(finished.finish_time.as_ref(), finished.finish_time_millis);
            report.exit = Some(match finished.exit_code {
                Some(exit) if !exit.name.is_empty() => clip(&exit.name, MAX_NAME),
                _ if finished.overall_success => "SUCCESS".to_owned(),
                _ => "FAILED".to_owned(),
            });
        }
        _ => {}
    }
}

impl BuildEventService {
    /// Takes one event of the stream into the history; its acknowledgement.
    fn take(
        &self,
        identity: &str,
        request: PublishBuildToolEventStreamRequest,
    ) -> Result<PublishBuildToolEventStreamResponse, Status> {
        let ordered = request
            .ordered_build_event
            .ok_or_else(|| invalid("ordered_build_event is required"))?;
        let invocation = invocation_id(&ordered)?;
        let bazel_event = match ordered.event.as_ref().and_then(|e| e.event.as_ref()) {
            Some(Event::BazelEvent(any)) if any.type_url.ends_with(BUILD_EVENT) => Some(
                bep::BuildEvent::decode(any.value.as_slice())
                    .map_err(|e| invalid(format!("a bazel_event that does not decode: {e}")))?,
            ),
            _ => None,
        };
        if let Some(event) = bazel_event {
            self.history
                .build_event(&invocation, identity, |report| apply(event, report));
        }
        Ok(PublishBuildToolEventStreamResponse {
            stream_id: ordered.stream_id,
            sequence_number: ordered.sequence_number,
        })
    }
}

type AckStream =
    Pin<Box<dyn Stream<Item = Result<PublishBuildToolEventStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PublishBuildEvent for BuildEventService {
    async fn publish_lifecycle_event(
        &self,
        request: Request<PublishLifecycleEventRequest>,
    ) -> Result<Response<()>, Status> {
        publisher(&request)?;
        Ok(Response::new(()))
    }

    type PublishBuildToolEventStreamStream = AckStream;

    async fn publish_build_tool_event_stream(
        &self,
        request: Request<Streaming<PublishBuildToolEventStreamRequest>>,
    ) -> Result<Response<Self::PublishBuildToolEventStreamStream>, Status> {
        let identity = publisher(&request)?;
        let history = self.history.clone();
        let events = request.into_inner();
        let acks = events
            .map(move |event| {
                let service = BuildEventService {
                    history: history.clone(),
                };
                event.and_then(|event| service.take(&identity, event))
            })
            // The first bad event ends the stream: Bazel retries or reports it.
            .scan(false, |failed, ack| {
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = ack.is_err();
                futures::future::ready(Some(ack))
            });
        Ok(Response::new(Box::pin(acks)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_proto::build_event_stream::{build_event_id, BuildEventId};

    fn event(id: Id, payload: Payload) -> bep::BuildEvent {
        bep::BuildEvent {
            id: Some(BuildEventId { id: Some(id) }),
            payload: Some(payload),
            ..Default::default()
        }
    }

    #[test]
    fn nonsense_times_are_dropped_not_panicked_on() {
        let huge = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 2_000_000_000,
        };
        assert_eq!(time(Some(&huge), 0), None);
        assert_eq!(time(None, i64::MAX), None);
        assert_eq!(duration(None, -5), None);
        assert_eq!(duration(None, 1500), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn targets_tests_and_the_outcome_come_from_the_events() {
        let mut report = BuildReport::default();
        apply(
            event(
                Id::TargetConfigured(build_event_id::TargetConfiguredId {
                    label: "//a:t".into(),
                    ..Default::default()
                }),
                Payload::Configured(bep::TargetConfigured {
                    target_kind: "cc_test rule".into(),
                }),
            ),
            &mut report,
        );
        apply(
            event(
                Id::TestResult(build_event_id::TestResultId {
                    label: "//a:t".into(),
                    attempt: 1,
                    ..Default::default()
                }),
                Payload::TestResult(bep::TestResult {
                    status: bep::TestStatus::Failed as i32,
                    test_attempt_duration_millis: 1500,
                    test_action_output: vec![bep::File {
                        name: "test.log".into(),
                        file: Some(bep::file::File::Uri("bytestream://h/blobs/ab/3".into())),
                    }],
                    ..Default::default()
                }),
            ),
            &mut report,
        );
        apply(
            event(
                Id::BuildFinished(build_event_id::Empty {}),
                Payload::Finished(bep::BuildFinished {
                    exit_code: Some(bep::build_finished::ExitCode {
                        name: "TESTS_FAILED".into(),
                        code: 3,
                    }),
                    finish_time_millis: 1_700_000_000_000,
                    ..Default::default()
                }),
            ),
            &mut report,
        );
        assert_eq!(report.targets["//a:t"].kind, "cc_test rule");
        let test = &report.tests["//a:t"];
        assert_eq!(test.status, "FAILED");
        assert_eq!(test.duration, Some(Duration::from_millis(1500)));
        assert_eq!(test.logs[0].0, "test.log");
        assert_eq!(report.exit.as_deref(), Some("TESTS_FAILED"));
        assert!(report.finished.is_some());
    }
}
