//! The Build Event Service (`google.devtools.build.v1.PublishBuildEvent`): Bazel's
//! `--bes_backend` streams its build events here, and what they say of targets,
//! tests and the build's outcome goes into the farm's history under the invocation's
//! id, the same id Bazel sends with its remote calls.
//!
//! Publishing needs `execute` on some instance. An invocation belongs to the
//! identity that first sent anything for it; events for another identity's
//! invocation are refused, so nobody can rewrite someone else's build.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use paddock_config::Permission;
use paddock_history::{BuildReport, History};
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

fn time(timestamp: Option<&prost_types::Timestamp>, millis: i64) -> Option<SystemTime> {
    match timestamp {
        Some(t) if t.seconds > 0 => {
            Some(SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.max(0) as u32))
        }
        _ if millis > 0 => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(millis as u64)),
        _ => None,
    }
}

fn duration(d: Option<&prost_types::Duration>, millis: i64) -> Option<Duration> {
    match d {
        Some(d) if d.seconds > 0 || d.nanos > 0 => Some(Duration::new(
            d.seconds.max(0) as u64,
            d.nanos.max(0) as u32,
        )),
        _ if millis > 0 => Some(Duration::from_millis(millis as u64)),
        _ => None,
    }
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
            report.command = started.command;
            report.tool_version = started.build_tool_version;
            report.started = time(started.start_time.as_ref(), started.start_time_millis);
        }
        (Some(Id::Pattern(pattern)), _) => report.patterns.extend(pattern.pattern),
        (Some(Id::TargetConfigured(id)), Some(Payload::Configured(configured))) => {
            report.targets.entry(id.label).or_default().kind = configured.target_kind;
        }
        (Some(Id::TargetCompleted(id)), Some(Payload::Completed(completed))) => {
            let target = report.targets.entry(id.label).or_default();
            target.success = Some(completed.success);
        }
        (Some(Id::TestResult(id)), Some(Payload::TestResult(result))) => {
            let test = report.tests.entry(id.label).or_default();
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
                    Some(bep::file::File::Uri(uri)) => Some((file.name, uri)),
                    _ => None,
                })
                .collect();
        }
        (Some(Id::TestSummary(id)), Some(Payload::TestSummary(summary))) => {
            let test = report.tests.entry(id.label).or_default();
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
                Some(exit) if !exit.name.is_empty() => exit.name,
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
        let taken = self.history.build_event(&invocation, identity, |report| {
            if let Some(event) = bazel_event {
                apply(event, report);
            }
        });
        if !taken {
            return Err(Status::permission_denied(format!(
                "invocation {invocation:?} belongs to another identity"
            )));
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
            // The first refusal ends the stream: Bazel retries or reports it.
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
