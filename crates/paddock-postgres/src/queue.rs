//! The queue servers share, in the `executions`, `operations`, `invocations` and
//! `execution_classes` tables (the scheduler's [`SharedQueue`]).
//!
//! Claims take queued rows with `FOR UPDATE SKIP LOCKED`, so replicas claiming at
//! once never wait for or take each other's rows. Every change a replica should hear
//! of is announced with `pg_notify` in the statement that makes it:
//! `paddock_execution` (payload: the execution's id) and `paddock_queued`. Reports
//! of progress name the attempt and the replica holding it, so a replica whose lease
//! expired (it was paused, cut off or dead) cannot overwrite what another did since.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use paddock_cas::ActionKey;
use paddock_reapi::proto::re::ExecuteResponse;
use paddock_reapi::Digest;
use paddock_scheduler::{
    Claimed, Class, ExecutionId, ExecutionStanding, Notice, Owner, Progress, SharedError,
    SharedOperation, SharedQueue, SharedStage, Submission,
};
use prost::Message;
use tokio::sync::broadcast;

use crate::database::{Database, DatabaseError};

/// How a shared queue keeps time and counts.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// How long a claim holds without being renewed.
    pub lease: Duration,
    /// Attempts (lost leases and failed workers) before an execution fails.
    pub max_attempts: u32,
    /// How long a finished execution (and its operations) is kept.
    pub retention: Duration,
}

pub struct PgQueue {
    database: Database,
    settings: QueueSettings,
    /// This server process, in the rows it holds.
    replica: String,
    notices: broadcast::Sender<Notice>,
    /// Kept here rather than in a row every submission would lock: the turns this
    /// server handed to each invocation, when it last marked each as seen, and each
    /// identity's unfinished executions as last counted (and submitted since).
    turns: parking_lot::Mutex<HashMap<String, i64>>,
    seen: parking_lot::Mutex<HashMap<String, Instant>>,
    counted: parking_lot::Mutex<HashMap<String, (usize, Instant)>>,
}

/// How long an identity's count of unfinished executions is taken as it was (plus
/// what this server submitted since): a quota is exact to within this, across servers.
const COUNT_FOR: Duration = Duration::from_secs(1);
/// How often an invocation's `last_seen` is written.
const SEEN_EVERY: Duration = Duration::from_secs(60);
/// Entries the in-memory tables above hold before they start over.
const REMEMBERED: usize = 100_000;

/// `map` emptied once it holds `REMEMBERED` entries.
fn bounded<V>(map: &mut HashMap<String, V>) -> &mut HashMap<String, V> {
    if map.len() >= REMEMBERED {
        map.clear();
    }
    map
}

fn unavailable(e: DatabaseError) -> SharedError {
    SharedError(e.to_string())
}

impl PgQueue {
    /// The shared queue in `database`, listening for its notices from now on.
    pub fn new(database: Database, settings: QueueSettings) -> PgQueue {
        let (notices, _) = broadcast::channel(65_536);
        let (sink, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let listener = database.clone();
        tokio::spawn(async move {
            listener
                .listen(&["paddock_execution", "paddock_queued"], sink)
                .await
        });
        let forward = notices.clone();
        tokio::spawn(async move {
            while let Some(heard) = heard.recv().await {
                let notice = match heard {
                    None => Notice::Resync,
                    Some((channel, _)) if channel == "paddock_queued" => Notice::Queued,
                    Some((_, id)) => match id.parse() {
                        Ok(id) => Notice::Changed(id),
                        Err(_) => continue,
                    },
                };
                let _ = forward.send(notice);
            }
        });
        PgQueue {
            database,
            settings,
            replica: uuid::Uuid::new_v4().to_string(),
            notices,
            turns: Default::default(),
            seen: Default::default(),
            counted: Default::default(),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SharedError> {
        self.database.client().await.map_err(unavailable)
    }

    /// The response of an execution that failed too often.
    fn exhausted(&self) -> Vec<u8> {
        ExecuteResponse {
            status: Some(paddock_reapi::status::status(
                tonic::Code::Unavailable,
                format!(
                    "the action was lost {} times (its server or worker went away)",
                    self.settings.max_attempts
                ),
            )),
            ..Default::default()
        }
        .encode_to_vec()
    }
}

/// The key of a class, as executions name it.
fn class_key(class: &Class) -> String {
    serde_json::to_string(&(&class.instance, &class.platform)).expect("strings serialize")
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn fingerprint(bytes: &[u8]) -> [u8; 16] {
    bytes.try_into().unwrap_or([0; 16])
}

/// The reports of one kind of progress, as the columns its statement takes.
struct Reports<T> {
    ids: Vec<ExecutionId>,
    attempts: Vec<i32>,
    values: Vec<T>,
}

impl<T> Default for Reports<T> {
    fn default() -> Self {
        Reports {
            ids: Vec::new(),
            attempts: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<T> Reports<T> {
    fn push(&mut self, id: ExecutionId, attempt: i32, value: T) {
        self.ids.push(id);
        self.attempts.push(attempt);
        self.values.push(value);
    }
}

#[async_trait]
impl SharedQueue for PgQueue {
    fn replica(&self) -> &str {
        &self.replica
    }

    async fn submit(&self, s: &Submission) -> Result<ExecutionId, SharedError> {
        let db = &self.database;
        let mut client = self.client().await?;
        let tx = db.timed(client.transaction()).await.map_err(unavailable)?;
        let turn = {
            let mut turns = self.turns.lock();
            let next = bounded(&mut turns).entry(s.invocation.clone()).or_default();
            *next += 1;
            *next
        };
        let mark = {
            let mut seen = self.seen.lock();
            let seen = bounded(&mut seen);
            let due = seen
                .get(&s.invocation)
                .is_none_or(|at| at.elapsed() >= SEEN_EVERY);
            if due {
                seen.insert(s.invocation.clone(), Instant::now());
            }
            due
        };
        if mark {
            db.timed(tx.execute(
                "INSERT INTO invocations (id, identity) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET last_seen = now()",
                &[&s.invocation, &s.identity],
            ))
            .await
            .map_err(unavailable)?;
        }
        let class = class_key(&s.class);
        let platform = serde_json::to_string(&s.class.platform).expect("strings serialize");
        db.timed(tx.execute(
            "INSERT INTO execution_classes (key, instance_name, platform)
             VALUES ($1, $2, $3::text::jsonb) ON CONFLICT DO NOTHING",
            &[&class, &s.class.instance, &platform],
        ))
        .await
        .map_err(unavailable)?;
        let (hash, size) = (s.key.action.hash_hex(), s.key.action.size() as i64);
        let mut execution = None;
        // A live execution of the same cacheable action is joined; one that ends
        // between the two statements is not, and the insert is tried again.
        for _ in 0..3 {
            let id = uuid::Uuid::new_v4();
            let inserted = db
                .timed(tx.query_opt(
                    "INSERT INTO executions (id, instance_name, action_hash, action_size, class,
                         priority, invocation, turn, cacheable, fingerprint, state)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued')
                     ON CONFLICT (instance_name, action_hash, action_size)
                         WHERE cacheable AND state <> 'done' DO NOTHING
                     RETURNING id",
                    &[
                        &id,
                        &s.key.instance,
                        &hash,
                        &size,
                        &class,
                        &s.priority,
                        &s.invocation,
                        &turn,
                        &s.cacheable,
                        &s.fingerprint.as_slice(),
                    ],
                ))
                .await
                .map_err(unavailable)?;
            if inserted.is_some() {
                db.timed(tx.execute("SELECT pg_notify('paddock_queued', $1)", &[&class]))
                    .await
                    .map_err(unavailable)?;
                execution = Some(id);
                break;
            }
            let live = db
                .timed(tx.query_opt(
                    "SELECT id FROM executions WHERE instance_name = $1 AND action_hash = $2
                         AND action_size = $3 AND cacheable AND state <> 'done'",
                    &[&s.key.instance, &hash, &size],
                ))
                .await
                .map_err(unavailable)?;
            if let Some(row) = live {
                execution = Some(row.get(0));
                break;
            }
        }
        let execution =
            execution.ok_or_else(|| SharedError("the action's execution kept changing".into()))?;
        db.timed(tx.execute(
            "INSERT INTO operations (name, execution, identity, instance_name)
             VALUES ($1, $2, $3, $4)",
            &[&s.operation, &execution, &s.identity, &s.key.instance],
        ))
        .await
        .map_err(unavailable)?;
        db.timed(tx.commit()).await.map_err(unavailable)?;
        if let Some((count, _)) = self.counted.lock().get_mut(&s.identity) {
            *count += 1;
        }
        Ok(execution)
    }

    async fn unfinished(&self, identity: &str) -> Result<usize, SharedError> {
        if let Some((count, at)) = self.counted.lock().get(identity) {
            if at.elapsed() < COUNT_FOR {
                return Ok(*count);
            }
        }
        let client = self.client().await?;
        let count: i64 = self
            .database
            .timed(client.query_one(
                "SELECT count(*) FROM operations o JOIN executions e ON e.id = o.execution
                 WHERE o.identity = $1 AND NOT o.cancelled AND e.state <> 'done'",
                &[&identity],
            ))
            .await
            .map_err(unavailable)?
            .get(0);
        bounded(&mut self.counted.lock())
            .insert(identity.to_owned(), (count as usize, Instant::now()));
        Ok(count as usize)
    }

    async fn classes(&self) -> Result<Vec<Class>, SharedError> {
        let client = self.client().await?;
        // The distinct classes of queued executions, one index probe each.
        let rows = self
            .database
            .timed(client.query(
                "WITH RECURSIVE queued(class) AS (
                     (SELECT class FROM executions WHERE state = 'queued' ORDER BY class LIMIT 1)
                     UNION ALL
                     SELECT (SELECT e.class FROM executions e
                             WHERE e.state = 'queued' AND e.class > q.class
                             ORDER BY e.class LIMIT 1)
                     FROM queued q WHERE q.class IS NOT NULL
                 )
                 SELECT c.instance_name, c.platform::text
                 FROM queued q JOIN execution_classes c ON c.key = q.class",
                &[],
            ))
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let platform: String = row.get(1);
                Some(Class {
                    instance: row.get(0),
                    platform: serde_json::from_str(&platform).ok()?,
                    only_on: None,
                })
            })
            .collect())
    }

    async fn claim(&self, classes: &[Class], count: usize) -> Result<Vec<Claimed>, SharedError> {
        let keys: Vec<String> = classes.iter().map(class_key).collect();
        let client = self.client().await?;
        let rows = self
            .database
            .timed(client.query(
                "UPDATE executions e SET state = 'claimed', replica = $1,
                     lease_until = now() + make_interval(secs => $2), attempt = e.attempt + 1,
                     worker = NULL
                 WHERE e.id IN (
                     SELECT id FROM executions WHERE state = 'queued' AND class = ANY($3)
                     ORDER BY priority, turn, queued_at LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING e.id, e.attempt, e.failures, e.instance_name, e.action_hash,
                     e.action_size, e.priority, e.invocation, e.fingerprint, e.avoid,
                     pg_notify('paddock_execution', e.id::text)",
                &[
                    &self.replica,
                    &seconds(self.settings.lease),
                    &keys,
                    &(count as i64),
                ],
            ))
            .await
            .map_err(unavailable)?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let (hash, size): (String, i64) = (row.get(4), row.get(5));
            let Ok(action) = Digest::parse(&hash, size) else {
                continue; // not written by Paddock: left to expire and fail
            };
            let print: Vec<u8> = row.get(8);
            claimed.push(Claimed {
                id: row.get(0),
                attempt: row.get(1),
                failures: row.get::<_, i32>(2).max(0) as u32,
                key: ActionKey {
                    instance: row.get(3),
                    action,
                },
                priority: row.get(6),
                invocation: row.get(7),
                fingerprint: fingerprint(&print),
                avoid: row.get(9),
            });
        }
        Ok(claimed)
    }

    async fn record(&self, progress: &[Progress]) -> Result<(), SharedError> {
        let db = &self.database;
        let (mut started, mut done, mut released) =
            (Reports::default(), Reports::default(), Reports::default());
        for p in progress {
            match p {
                Progress::Started {
                    id,
                    attempt,
                    worker,
                } => started.push(*id, *attempt, worker.clone()),
                Progress::Done {
                    id,
                    attempt,
                    response,
                } => done.push(*id, *attempt, response.clone()),
                Progress::Released {
                    id,
                    attempt,
                    worker,
                } => released.push(*id, *attempt, worker.clone()),
            }
        }
        let mut client = self.client().await?;
        let tx = db.timed(client.transaction()).await.map_err(unavailable)?;
        if !started.ids.is_empty() {
            db.timed(tx.query(
                "UPDATE executions e SET state = 'running', worker = u.worker
                 FROM unnest($1::uuid[], $2::int4[], $3::text[]) AS u(id, attempt, worker)
                 WHERE e.id = u.id AND e.attempt = u.attempt AND e.replica = $4
                     AND e.state = 'claimed'
                 RETURNING pg_notify('paddock_execution', e.id::text)",
                &[
                    &started.ids,
                    &started.attempts,
                    &started.values,
                    &self.replica,
                ],
            ))
            .await
            .map_err(unavailable)?;
        }
        if !done.ids.is_empty() {
            db.timed(tx.query(
                "UPDATE executions e SET state = 'done', response = u.response, done_at = now(),
                     replica = NULL, lease_until = NULL
                 FROM unnest($1::uuid[], $2::int4[], $3::bytea[]) AS u(id, attempt, response)
                 WHERE e.id = u.id AND e.attempt = u.attempt AND e.replica = $4
                     AND e.state IN ('claimed', 'running')
                 RETURNING pg_notify('paddock_execution', e.id::text)",
                &[&done.ids, &done.attempts, &done.values, &self.replica],
            ))
            .await
            .map_err(unavailable)?;
        }
        if !released.ids.is_empty() {
            db.timed(tx.query(
                "UPDATE executions e SET state = 'queued', replica = NULL, lease_until = NULL,
                     worker = NULL, failures = e.failures + 1,
                     avoid = array_append(e.avoid, u.worker)
                 FROM unnest($1::uuid[], $2::int4[], $3::text[]) AS u(id, attempt, worker)
                 WHERE e.id = u.id AND e.attempt = u.attempt AND e.replica = $4
                     AND e.state IN ('claimed', 'running')
                 RETURNING pg_notify('paddock_execution', e.id::text),
                     pg_notify('paddock_queued', e.class)",
                &[
                    &released.ids,
                    &released.attempts,
                    &released.values,
                    &self.replica,
                ],
            ))
            .await
            .map_err(unavailable)?;
        }
        db.timed(tx.commit()).await.map_err(unavailable)
    }

    async fn keep(&self, holds: &[ExecutionId]) -> Result<(), SharedError> {
        let db = &self.database;
        let client = self.client().await?;
        let holds = holds.to_vec();
        db.timed(client.execute(
            "UPDATE executions SET lease_until = now() + make_interval(secs => $2)
             WHERE replica = $1 AND id = ANY($3) AND state IN ('claimed', 'running')",
            &[&self.replica, &seconds(self.settings.lease), &holds],
        ))
        .await
        .map_err(unavailable)?;
        let max = self.settings.max_attempts.max(1) as i32;
        db.timed(client.query(
            "UPDATE executions SET failures = failures + 1, replica = NULL, lease_until = NULL,
                 worker = NULL,
                 state = CASE WHEN failures + 1 >= $1 THEN 'done' ELSE 'queued' END,
                 response = CASE WHEN failures + 1 >= $1 THEN $2::bytea END,
                 done_at = CASE WHEN failures + 1 >= $1 THEN now() END
             WHERE state IN ('claimed', 'running') AND lease_until < now()
             RETURNING pg_notify('paddock_execution', id::text), pg_notify('paddock_queued', class)",
            &[&max, &self.exhausted()],
        ))
        .await
        .map_err(unavailable)?;
        db.timed(client.execute(
            "DELETE FROM executions WHERE state = 'done'
                 AND done_at < now() - make_interval(secs => $1)",
            &[&seconds(self.settings.retention)],
        ))
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn standings(&self, ids: &[ExecutionId]) -> Result<Vec<ExecutionStanding>, SharedError> {
        let client = self.client().await?;
        let ids = ids.to_vec();
        let rows = self
            .database
            .timed(client.query(
                "SELECT id, state, attempt, replica, worker, response FROM executions
                 WHERE id = ANY($1)",
                &[&ids],
            ))
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|row| {
                let state: &str = row.get(1);
                let stage = match state {
                    "done" => SharedStage::Done {
                        response: row.get::<_, Option<Vec<u8>>>(5).unwrap_or_default(),
                    },
                    "running" => SharedStage::Running {
                        worker: row.get::<_, Option<String>>(4).unwrap_or_default(),
                    },
                    _ => SharedStage::Queued,
                };
                ExecutionStanding {
                    id: row.get(0),
                    stage,
                    attempt: row.get(2),
                    replica: row.get(3),
                }
            })
            .collect())
    }

    async fn operation(&self, name: &str) -> Result<Option<SharedOperation>, SharedError> {
        let client = self.client().await?;
        let row = self
            .database
            .timed(client.query_opt(
                "SELECT o.execution, o.identity, o.instance_name, o.cancelled, e.action_hash,
                     e.action_size
                 FROM operations o JOIN executions e ON e.id = o.execution WHERE o.name = $1",
                &[&name],
            ))
            .await
            .map_err(unavailable)?;
        Ok(row.and_then(|row| {
            let (hash, size): (String, i64) = (row.get(4), row.get(5));
            Some(SharedOperation {
                execution: row.get(0),
                owner: Owner {
                    identity: row.get(1),
                    instance: row.get(2),
                },
                cancelled: row.get(3),
                action: Digest::parse(&hash, size).ok()?,
            })
        }))
    }

    async fn cancel(&self, name: &str) -> Result<bool, SharedError> {
        let db = &self.database;
        let mut client = self.client().await?;
        let tx = db.timed(client.transaction()).await.map_err(unavailable)?;
        let Some(row) = db
            .timed(tx.query_opt(
                "UPDATE operations SET cancelled = true WHERE name = $1 RETURNING execution",
                &[&name],
            ))
            .await
            .map_err(unavailable)?
        else {
            return Ok(false);
        };
        let execution: ExecutionId = row.get(0);
        let cancelled = ExecuteResponse {
            status: Some(paddock_reapi::status::status(
                tonic::Code::Cancelled,
                "cancelled: every operation was cancelled",
            )),
            ..Default::default()
        }
        .encode_to_vec();
        db.timed(tx.query(
            "UPDATE executions e SET state = 'done', response = $2, done_at = now(),
                 replica = NULL, lease_until = NULL
             WHERE e.id = $1 AND e.state <> 'done' AND NOT EXISTS (
                 SELECT 1 FROM operations o WHERE o.execution = e.id AND NOT o.cancelled)
             RETURNING pg_notify('paddock_execution', e.id::text)",
            &[&execution, &cancelled],
        ))
        .await
        .map_err(unavailable)?;
        db.timed(tx.commit()).await.map_err(unavailable)?;
        Ok(true)
    }

    async fn delete(&self, name: &str) -> Result<bool, SharedError> {
        let client = self.client().await?;
        let deleted = self
            .database
            .timed(client.execute("DELETE FROM operations WHERE name = $1", &[&name]))
            .await
            .map_err(unavailable)?;
        Ok(deleted > 0)
    }

    fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }
}
