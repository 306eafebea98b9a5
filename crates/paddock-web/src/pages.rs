//! The pages: what each reads, who may see it, and its markup. Every page has a
//! title, one `h1`, landmarks, labelled controls and no script; long lists are paged.

// REAPI 2.0 clients send Command.platform and read the older output symlink fields.
#![allow(deprecated)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use paddock_auth::Principal;
use paddock_config::Permission;
use paddock_history::{ActionRecord, Invocation, Outcome};
use paddock_proto::execution::v1::{ResourceUsage, RESOURCE_USAGE};
use paddock_reapi::proto::re::{
    Action, ActionResult, Command, Directory, ExecutedActionMetadata, Tree,
};
use paddock_reapi::Digest;
use paddock_scheduler::WorkerCommand;
use prost::Message;

use crate::blob::{self, BlobError, InputChange, Kind};
use crate::chart::{self, Bar, Series};
use crate::explain::{self, Explanation};
use crate::http::Answer;
use crate::Web;

/// Rows per page of a long list.
const PER_PAGE: usize = 100;
/// Records of one action digest an action page considers.
const RECORDS_SHOWN: usize = 50;
/// Minutes the overview's charts cover.
const CHART_MINUTES: usize = 180;
/// Bars an invocation's timeline draws at most (the longest actions).
const TIMELINE_BARS: usize = 2000;
/// Bytes of a blob shown as text, and as hex.
const TEXT_SHOWN: usize = 64 << 10;
const HEX_SHOWN: usize = 4 << 10;
/// The instance an admin grant must cover for orders to workers: only `*` does.
const EVERY_INSTANCE: &str = "*";

const CSS: &str = r#"
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:.5em 1em;display:flex;gap:1.5em;align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none;font-weight:600}
header a:hover,header a:focus{text-decoration:underline}
header .who{margin-left:auto;font-size:.9em}
header form{display:inline}
main{padding:1em 1.5em;max-width:1200px}
a{color:#0b5cad}
:focus-visible{outline:3px solid #e69f00;outline-offset:2px}
table{border-collapse:collapse;margin:.5em 0 1.5em;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #ddd;padding:.6em;overflow:auto;max-height:32em;white-space:pre-wrap;word-break:break-all}
code{font-size:.92em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dt{font-weight:600}
dd{margin:0}
.skip{position:absolute;left:-9999px}.skip:focus{left:1em;top:.5em;background:#fff;color:#000;padding:.3em}
.bad{color:#b00020;font-weight:600}.good{color:#006b3c;font-weight:600}.warn{color:#8a5a00;font-weight:600}
.legend{list-style:none;display:flex;gap:1em;padding:0;margin:.2em 0}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.3em;vertical-align:middle}
figure{margin:.5em 0 1.5em}
nav.pages{margin:.5em 0}nav.pages a,nav.pages span{margin-right:1em}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#fff;border:1px solid #ddd;padding:.6em 1em;min-width:9em}
.card .n{font-size:1.6em;font-weight:700}
button{font:inherit;padding:.3em .8em;cursor:pointer}
input[type=text],input[type=password]{font:inherit;padding:.3em;min-width:24em}
.diff del{background:#fde2e1}.diff ins{background:#dff5e3;text-decoration:none}
"#;

/// Why a page could not be given.
#[derive(Debug)]
pub enum PageError {
    NotFound(String),
    Forbidden(String),
    BadRequest(String),
    Unavailable(String),
    MethodNotAllowed,
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageError::NotFound(m)
            | PageError::Forbidden(m)
            | PageError::BadRequest(m)
            | PageError::Unavailable(m) => f.write_str(m),
            PageError::MethodNotAllowed => f.write_str("pages take GET, and forms POST"),
        }
    }
}

impl PageError {
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            PageError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            PageError::Forbidden(_) => (StatusCode::FORBIDDEN, "Not allowed"),
            PageError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad request"),
            PageError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
            PageError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
        }
    }
}

impl From<BlobError> for PageError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Missing(_) => PageError::NotFound(e.to_string()),
            BlobError::Store(_) => PageError::Unavailable(e.to_string()),
            _ => PageError::BadRequest(e.to_string()),
        }
    }
}

/// One request's view of the farm: who asks, and the token its forms carry.
pub struct Page<'a> {
    pub web: &'a Web,
    pub caller: &'a Arc<Principal>,
    pub form_token: &'a str,
    /// Whether callers sign in at all (a sign-out button makes sense).
    pub signed_in: bool,
}

// ---------------------------------------------------------------- formatting

/// A time as `2026-12-07 07:10:03 UTC`.
pub fn when(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn maybe_when(at: Option<SystemTime>) -> String {
    at.map(when).unwrap_or_else(|| "—".into())
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.2} s")
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

fn bytes_human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn path_enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn blob_href(digest: &Digest, instance: &str, extra: &str) -> String {
    format!(
        "/blob/{}/{}?instance={}{extra}",
        digest.hash_hex(),
        digest.size(),
        enc(instance)
    )
}

fn tree_href(digest: &Digest, instance: &str, path: &str) -> String {
    format!(
        "/tree/{}/{}?instance={}&path={}",
        digest.hash_hex(),
        digest.size(),
        enc(instance),
        enc(path)
    )
}

/// A record's time, as links name it: the same on every server and after a
/// restart, unlike the order in which one process took the records.
fn record_time(record: &ActionRecord) -> u128 {
    record
        .at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn action_href(record: &ActionRecord) -> String {
    format!(
        "/action/{}/{}?instance={}&at={}",
        record.digest.hash_hex(),
        record.digest.size(),
        enc(&record.instance),
        record_time(record)
    )
}

fn proto_digest(d: Option<&paddock_reapi::proto::re::Digest>) -> Option<Digest> {
    Digest::from_proto(d).ok()
}

fn stamp(t: Option<&paddock_reapi::proto::protobuf::Timestamp>) -> Option<SystemTime> {
    t.and_then(paddock_reapi::time::system_time)
}

/// How long the worker spent on an action, from its metadata.
fn worker_time(m: &ExecutedActionMetadata) -> Option<Duration> {
    let start = stamp(m.worker_start_timestamp.as_ref())?;
    let end = stamp(m.worker_completed_timestamp.as_ref())?;
    end.duration_since(start).ok()
}

fn outcome_cell(outcome: &Outcome) -> Markup {
    html! {
        @match outcome {
            Outcome::Executed { exit_code: 0 } => span.good { "executed" },
            Outcome::Executed { exit_code } => span.bad { "exit " (exit_code) },
            Outcome::Cached => span { "cached" },
            Outcome::Failed { code, .. } => span.bad { "failed: " (code) },
        }
    }
}

/// Shell-quotes a word for the `paddock exec` line.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------- layout

fn document(title: &str, header: Markup, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Paddock" }
                style { (PreEscaped(CSS)) }
            }
            body {
                a.skip href="#main" { "Skip to the content" }
                (header)
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

impl Page<'_> {
    fn layout(&self, title: &str, body: Markup) -> Markup {
        let header = html! {
            header {
                nav aria-label="Main" {
                    a href="/" { "Paddock" } " "
                    a href="/invocations" { "Invocations" } " "
                    a href="/workers" { "Workers" } " "
                    a href="/cas" { "CAS" }
                }
                span.who {
                    "Signed in as " strong { (self.caller.name()) }
                    @if self.signed_in {
                        " "
                        form method="post" action="/signout" {
                            input type="hidden" name="form_token" value=(self.form_token);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
            }
        };
        document(title, header, body)
    }

    fn may_see(&self, identity: &str, instance: &str) -> bool {
        identity == self.caller.name() || self.caller.may(Permission::Admin, instance)
    }

    fn admin(&self) -> bool {
        self.caller.may(Permission::Admin, EVERY_INSTANCE)
    }

    fn need_cas(&self, instance: &str) -> Result<(), PageError> {
        if self.caller.may(Permission::CasRead, instance) {
            Ok(())
        } else {
            Err(PageError::Forbidden(format!(
                "{} may not read the CAS of instance {instance:?}",
                self.caller.name()
            )))
        }
    }
}

/// A page for an error, without the navigation of a signed-in caller.
pub fn error_page(title: &str, message: &str) -> Markup {
    document(
        title,
        html! { header { nav aria-label="Main" { a href="/" { "Paddock" } } } },
        html! { p { (message) } },
    )
}

/// The sign-in form.
pub fn sign_in_page(next: &str, form_token: &str, problem: Option<&str>) -> Markup {
    document(
        "Sign in",
        html! { header { nav aria-label="Main" { a href="/" { "Paddock" } } } },
        html! {
            @if let Some(problem) = problem {
                p.bad role="alert" { (problem) }
            }
            p { "Sign in with one of the farm's bearer tokens. It is kept in a cookie that scripts cannot read and other sites cannot send." }
            form method="post" action={ "/signin?next=" (enc(next)) } {
                input type="hidden" name="form_token" value=(form_token);
                p {
                    label for="token" { "Token" } " "
                    input #token type="password" name="token" autocomplete="current-password" required;
                }
                p { button type="submit" { "Sign in" } }
            }
        },
    )
}

fn pager(base: &str, page: usize, total: usize) -> Markup {
    let pages = total.div_ceil(PER_PAGE).max(1);
    let sep = if base.contains('?') { '&' } else { '?' };
    html! {
        @if pages > 1 {
            nav.pages aria-label="Pages" {
                @if page > 0 { a href={ (base) (sep) "page=" (page - 1) } rel="prev" { "← Newer" } }
                span { "Page " (page + 1) " of " (pages) }
                @if page + 1 < pages { a href={ (base) (sep) "page=" (page + 1) } rel="next" { "Older →" } }
            }
        }
    }
}

fn page_number(query: &HashMap<String, String>) -> usize {
    query
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
        .min(1_000_000)
}

// ---------------------------------------------------------------- overview

impl Page<'_> {
    pub async fn overview(&self) -> Result<Markup, PageError> {
        let web = self.web;
        let workers = web.scheduler.workers();
        let pools = web.scheduler.pools();
        let mut by_standing: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &workers {
            *by_standing.entry(w.standing.as_str()).or_default() += 1;
        }
        let minutes = web.history.minutes(CHART_MINUTES);
        let hour: Vec<_> = minutes.iter().rev().take(60).collect();
        let cached: u64 = hour.iter().map(|m| m.cached).sum();
        let served: u64 = hour.iter().map(|m| m.cached + m.executed + m.failed).sum();
        // The charts cover the last three hours to this minute; minutes with nothing
        // in them are absent from the history and drawn as zero.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / 60;
        let span: Vec<u64> = (now + 1 - CHART_MINUTES as u64..=now).collect();
        let minute_when = |m: u64| when(SystemTime::UNIX_EPOCH + Duration::from_secs(m * 60));
        let first = minute_when(span[0]);
        let last = minute_when(now);
        let at: HashMap<u64, &paddock_history::Minute> =
            minutes.iter().map(|m| (m.minute, m)).collect();
        let series = |f: &dyn Fn(&paddock_history::Minute) -> u64| -> Vec<f64> {
            span.iter()
                .map(|m| at.get(m).map_or(0.0, |m| f(m) as f64))
                .collect()
        };
        let throughput = [
            Series {
                name: "executed",
                colour: chart::BLUE,
                values: series(&|m| m.executed),
            },
            Series {
                name: "cached",
                colour: chart::GREEN,
                values: series(&|m| m.cached),
            },
            Series {
                name: "failed",
                colour: chart::RED,
                values: series(&|m| m.failed),
            },
        ];
        let pool_names: Vec<String> = {
            let mut names: Vec<String> = minutes
                .iter()
                .flat_map(|m| m.queued.keys().cloned())
                .chain(pools.iter().map(|p| p.pool.clone()))
                .collect();
            names.sort();
            names.dedup();
            names
        };
        let colours = [
            chart::BLUE,
            chart::ORANGE,
            chart::GREEN,
            chart::RED,
            chart::GREY,
        ];
        let queues: Vec<Series> = pool_names
            .iter()
            .enumerate()
            .map(|(i, name)| Series {
                name: pool_name(name),
                colour: colours[i % colours.len()],
                values: span
                    .iter()
                    .map(|m| {
                        at.get(m)
                            .and_then(|m| m.queued.get(name))
                            .copied()
                            .unwrap_or(0) as f64
                    })
                    .collect(),
            })
            .collect();
        let changes = web.history.standing_changes(None, 10);
        let (recent, _) =
            web.history
                .invocations(|identity, instance| self.may_see(identity, instance), 0, 10);
        Ok(self.layout(
            "Overview",
            html! {
                section aria-labelledby="fleet" {
                    h2 #fleet { "Workers" }
                    div.cards {
                        div.card { div.n { (workers.iter().filter(|w| w.connected).count()) } "connected" }
                        @for (standing, count) in &by_standing {
                            div.card { div.n { (count) } (standing) }
                        }
                        div.card {
                            div.n {
                                @if served == 0 { "—" } @else { (format!("{:.0}%", cached as f64 * 100.0 / served as f64)) }
                            }
                            "cache hits, last hour (" (cached) " of " (served) ")"
                        }
                    }
                }
                section aria-labelledby="pools" {
                    h2 #pools { "Pools and the autoscaling signal" }
                    table {
                        thead { tr { th scope="col" { "Pool" } th scope="col" { "Workers" } th scope="col" { "Slots" } th scope="col" { "Running" } th scope="col" { "Queued" } th scope="col" { "Idle workers" } th scope="col" { "Desired workers" } } }
                        tbody {
                            @for p in &pools {
                                tr {
                                    td { (pool_name(&p.pool)) } td.num { (p.workers) } td.num { (p.slots) } td.num { (p.running) }
                                    td.num { (p.queued) } td.num { (p.idle_workers) }
                                    td.num { strong { (p.desired_workers) } }
                                }
                            }
                        }
                    }
                }
                section aria-labelledby="throughput" {
                    h2 #throughput { "Throughput" }
                    (chart::stacked_bars("Actions served per minute", &throughput, &first, &last))
                    (chart::lines("Deepest queue per minute, by pool", &queues, &first, &last))
                }
                section aria-labelledby="standing" {
                    h2 #standing { "Recent quarantines and releases" }
                    (standing_table(&changes))
                }
                section aria-labelledby="recent" {
                    h2 #recent { "Recent invocations" }
                    (invocation_table(&recent))
                    p { a href="/invocations" { "All invocations" } }
                }
            },
        ))
    }
}

fn pool_name(pool: &str) -> &str {
    if pool.is_empty() {
        "(default)"
    } else {
        pool
    }
}

fn standing_table(changes: &[paddock_history::StandingChange]) -> Markup {
    html! {
        @if changes.is_empty() {
            p { "No changes of standing seen." }
        } @else {
            table {
                thead { tr { th scope="col" { "When" } th scope="col" { "Worker" } th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "Reason" } } }
                tbody {
                    @for c in changes {
                        tr {
                            td { (when(c.at)) }
                            td { a href={ "/worker/" (path_enc(&c.worker)) } { (c.worker) } }
                            td { (if c.from.is_empty() { "—" } else { &c.from }) }
                            td { span class=(if c.to == "active" { "good" } else if c.to == "quarantined" { "bad" } else { "warn" }) { (c.to) } }
                            td { (c.reason) }
                        }
                    }
                }
            }
        }
    }
}

fn invocation_table(list: &[paddock_history::InvocationSummary]) -> Markup {
    html! {
        @if list.is_empty() {
            p { "No invocations yet." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Invocation" } th scope="col" { "Started" } th scope="col" { "Who" }
                    th scope="col" { "Tool" } th scope="col" { "Duration" } th scope="col" { "Executed" }
                    th scope="col" { "Cached" } th scope="col" { "Failed" } th scope="col" { "Result" }
                } }
                tbody {
                    @for i in list {
                        tr {
                            td { a href={ "/invocation/" (path_enc(&i.id)) } { code { (i.id) } } }
                            td { (maybe_when(i.first_seen)) }
                            td { (i.identity) }
                            td { (i.tool) }
                            td.num { (seconds(i.duration)) }
                            td.num { (i.executed) }
                            td.num { (i.cached) }
                            td.num { @if i.failed > 0 { span.bad { (i.failed) } } @else { "0" } }
                            td { (i.exit.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- invocations

/// What an invocation page shows of its actions, taken under the history's lock.
struct InvocationView {
    invocation: Invocation,
    page: Vec<ActionRecord>,
    slowest: Vec<(ActionRecord, Duration)>,
    failed: Vec<ActionRecord>,
    lanes: Vec<(String, Vec<Bar>)>,
    span: f64,
    total: usize,
}

fn view_invocation(
    invocation: &Invocation,
    page: usize,
    visible: &dyn Fn(&str, &str) -> bool,
) -> InvocationView {
    // An admin of one instance sees only that instance's actions of an invocation.
    let actions: Vec<&ActionRecord> = invocation
        .actions
        .iter()
        .map(Arc::as_ref)
        .filter(|a| visible(&a.identity, &a.instance))
        .collect();
    let page_records: Vec<ActionRecord> = actions
        .iter()
        .skip(page * PER_PAGE)
        .take(PER_PAGE)
        .map(|a| (*a).clone())
        .collect();
    let mut timed: Vec<(&ActionRecord, SystemTime, SystemTime)> = actions
        .iter()
        .copied()
        .filter(|a| matches!(a.outcome, Outcome::Executed { .. }))
        .filter_map(|a| {
            let m = a.result.as_ref()?.execution_metadata.as_ref()?;
            let start = stamp(m.worker_start_timestamp.as_ref())?;
            let end = stamp(m.worker_completed_timestamp.as_ref())?;
            Some((a, start, end.max(start)))
        })
        .collect();
    timed.sort_by_key(|(_, s, e)| std::cmp::Reverse(e.duration_since(*s).unwrap_or_default()));
    let slowest = timed
        .iter()
        .take(10)
        .map(|(a, s, e)| ((*a).clone(), e.duration_since(*s).unwrap_or_default()))
        .collect();
    let origin = timed.iter().map(|t| t.1).min();
    // Each worker's lane is split into rows so that actions running at once (one
    // per slot) do not hide each other: a bar goes to the first row free at its start.
    let mut lanes: BTreeMap<(String, usize), Vec<Bar>> = BTreeMap::new();
    let mut row_ends: HashMap<String, Vec<f64>> = HashMap::new();
    let mut span: f64 = 0.0;
    if let Some(origin) = origin {
        let mut drawn: Vec<&(&ActionRecord, SystemTime, SystemTime)> =
            timed.iter().take(TIMELINE_BARS).collect();
        drawn.sort_by_key(|(_, s, _)| *s);
        for (a, s, e) in drawn {
            let worker = a
                .result
                .as_ref()
                .and_then(|r| r.execution_metadata.as_ref())
                .map(|m| m.worker.clone())
                .unwrap_or_default();
            let start = s.duration_since(origin).unwrap_or_default().as_secs_f64();
            let end = e.duration_since(origin).unwrap_or_default().as_secs_f64();
            span = span.max(end);
            let ends = row_ends.entry(worker.clone()).or_default();
            let row = match ends.iter().position(|&free| free <= start) {
                Some(row) => row,
                None => {
                    ends.push(0.0);
                    ends.len() - 1
                }
            };
            ends[row] = end;
            lanes.entry((worker, row)).or_default().push(Bar {
                start,
                end,
                label: format!("{} {} ({:.2} s)", a.mnemonic, a.target, end - start),
                href: action_href(a),
                failed: !matches!(a.outcome, Outcome::Executed { exit_code: 0 }),
            });
        }
    }
    let lanes = lanes
        .into_iter()
        .map(|((worker, row), bars)| {
            let name = if row == 0 {
                worker
            } else {
                format!("{worker} ·{}", row + 1)
            };
            (name, bars)
        })
        .collect();
    InvocationView {
        invocation: Invocation {
            actions: Vec::new(),
            ..invocation.clone()
        },
        page: page_records,
        slowest,
        failed: actions
            .iter()
            .filter(|a| {
                !matches!(
                    a.outcome,
                    Outcome::Executed { exit_code: 0 } | Outcome::Cached
                )
            })
            .take(50)
            .map(|a| (*a).clone())
            .collect(),
        lanes,
        span,
        total: actions.len(),
    }
}

/// The CAS blob a Bazel `bytestream://` URI names, if it names one.
fn bytestream_blob(uri: &str) -> Option<Digest> {
    let rest = uri.strip_prefix("bytestream://")?;
    let (_, blob) = rest.split_once("/blobs/")?;
    let mut parts = blob.split('/');
    Digest::parse_parts(parts.next()?, parts.next()?).ok()
}

fn test_class(status: &str) -> &'static str {
    match status {
        "PASSED" => "good",
        "FLAKY" => "warn",
        _ => "bad",
    }
}

fn actions_table(records: &[ActionRecord]) -> Markup {
    html! {
        table {
            thead { tr {
                th scope="col" { "Action" } th scope="col" { "Mnemonic" } th scope="col" { "Target" }
                th scope="col" { "How" } th scope="col" { "Worker" } th scope="col" { "Worker time" }
            } }
            tbody {
                @for a in records {
                    @let metadata = a.result.as_ref().and_then(|r| r.execution_metadata.as_ref());
                    tr {
                        td { a href=(action_href(a)) { code { (&a.digest.hash_hex()[..12]) } } }
                        td { (a.mnemonic) }
                        td { (a.target) }
                        td { (outcome_cell(&a.outcome)) }
                        td { (metadata.map(|m| m.worker.as_str()).unwrap_or("")) }
                        td.num { (metadata.and_then(worker_time).map(seconds).unwrap_or_default()) }
                    }
                }
            }
        }
    }
}

impl Page<'_> {
    pub fn invocations(&self, query: &HashMap<String, String>) -> Result<Markup, PageError> {
        let page = page_number(query);
        let (list, total) = self.web.history.invocations(
            |identity, instance| self.may_see(identity, instance),
            page * PER_PAGE,
            PER_PAGE,
        );
        Ok(self.layout(
            "Invocations",
            html! {
                p { (total) " invocations kept." }
                (invocation_table(&list))
                (pager("/invocations", page, total))
            },
        ))
    }

    pub fn invocation(
        &self,
        id: &str,
        query: &HashMap<String, String>,
    ) -> Result<Markup, PageError> {
        let page = page_number(query);
        let not_found = || {
            PageError::NotFound(format!(
                "no invocation {id:?} is kept (it may be older than the history's bounds)"
            ))
        };
        let visible = |identity: &str, instance: &str| self.may_see(identity, instance);
        // The invocation is copied out (its records are shared, not copied) and its
        // view computed without holding the history, which every action served takes.
        let invocation = self
            .web
            .history
            .with_invocation(id, self.caller.name(), visible, Invocation::clone)
            .ok_or_else(not_found)?;
        let view = view_invocation(&invocation, page, &visible);
        let i = &view.invocation;
        let build = i.build.as_ref();
        let base = format!("/invocation/{}", path_enc(id));
        Ok(self.layout(
            &format!("Invocation {id}"),
            html! {
                dl {
                    dt { "Who" } dd { (i.identity) }
                    dt { "Instance" } dd { code { (i.instance) } }
                    dt { "Tool" } dd { (i.tool) }
                    dt { "Started" } dd { (maybe_when(build.and_then(|b| b.started).or(i.first_seen))) }
                    dt { "Duration" } dd { (seconds(i.duration())) }
                    dt { "Actions" } dd {
                        (i.executed) " executed, " (i.cached) " cached, "
                        @if i.failed > 0 { span.bad { (i.failed) " failed" } } @else { "0 failed" }
                        @if i.dropped > 0 { " (" (i.dropped) " not kept: the history's bound)" }
                    }
                    @if let Some(b) = build {
                        dt { "Command" } dd { code { "bazel " (b.command) " " (b.patterns.join(" ")) } }
                        dt { "Result" } dd {
                            @match &b.exit {
                                Some(exit) if exit == "SUCCESS" => span.good { (exit) },
                                Some(exit) => span.bad { (exit) },
                                None => "still running, or the build events stopped",
                            }
                        }
                    }
                }
                @if let Some(b) = build {
                    section aria-labelledby="targets" {
                        h2 #targets { "Targets" }
                        @if b.targets.is_empty() { p { "No targets reported." } } @else {
                            table {
                                thead { tr { th scope="col" { "Target" } th scope="col" { "Kind" } th scope="col" { "Built" } } }
                                tbody {
                                    @for (label, t) in &b.targets {
                                        tr {
                                            td { code { (label) } }
                                            td { (t.kind) }
                                            td { @match t.success { Some(true) => span.good { "yes" }, Some(false) => span.bad { "failed" }, None => "—" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    section aria-labelledby="tests" {
                        h2 #tests { "Tests" }
                        @if b.tests.is_empty() { p { "No tests reported." } } @else {
                            table {
                                thead { tr { th scope="col" { "Test" } th scope="col" { "Status" } th scope="col" { "Attempts" } th scope="col" { "Duration" } th scope="col" { "Logs" } } }
                                tbody {
                                    @for (label, t) in &b.tests {
                                        tr {
                                            td { code { (label) } }
                                            td { span class=(test_class(&t.status)) { (t.status) } @if t.cached { " (cached)" } }
                                            td.num { (t.attempts) }
                                            td.num { (t.duration.map(seconds).unwrap_or_default()) }
                                            td {
                                                @for (name, uri) in &t.logs {
                                                    @if let Some(digest) = bytestream_blob(uri) {
                                                        a href=(blob_href(&digest, &i.instance, "&view=text")) { (name) } " "
                                                    } @else {
                                                        span { (name) } " "
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        @if b.dropped > 0 { p { (b.dropped) " targets and tests not kept (the history's bound)." } }
                    }
                }
                section aria-labelledby="timeline" {
                    h2 #timeline { "Timeline by worker" }
                    @if view.lanes.is_empty() { p { "No action of this invocation ran on a worker." } } @else {
                        (chart::timeline("Actions run, by worker, from the first start", &view.lanes, view.span))
                    }
                }
                section aria-labelledby="slowest" {
                    h2 #slowest { "Slowest actions" }
                    @if view.slowest.is_empty() { p { "None ran." } } @else {
                        table {
                            thead { tr { th scope="col" { "Action" } th scope="col" { "Mnemonic" } th scope="col" { "Target" } th scope="col" { "Worker time" } } }
                            tbody {
                                @for (a, d) in &view.slowest {
                                    tr {
                                        td { a href=(action_href(a)) { code { (&a.digest.hash_hex()[..12]) } } }
                                        td { (a.mnemonic) } td { (a.target) } td.num { (seconds(*d)) }
                                    }
                                }
                            }
                        }
                    }
                }
                section aria-labelledby="failed" {
                    h2 #failed { "Failed actions" }
                    @if view.failed.is_empty() { p { "None." } } @else { (actions_table(&view.failed)) }
                }
                section aria-labelledby="all" {
                    h2 #all { "All actions" }
                    p { (view.total) " actions kept, in the order they were served." }
                    (actions_table(&view.page))
                    (pager(&base, page, view.total))
                }
            },
        ))
    }
}

// ---------------------------------------------------------------- actions

fn platform_rows(action: &Action, command: &Command) -> Markup {
    let platform = action.platform.as_ref().or(command.platform.as_ref());
    html! {
        @match platform {
            Some(p) if !p.properties.is_empty() => {
                table {
                    thead { tr { th scope="col" { "Property" } th scope="col" { "Value" } } }
                    tbody {
                        @for prop in &p.properties {
                            tr {
                                td { code { (prop.name) } }
                                td {
                                    @if prop.name == "nix-store-paths" {
                                        ul { @for path in prop.value.split([',', ' ', '\n']).filter(|s| !s.is_empty()) { li { code { (path) } } } }
                                    } @else {
                                        code { (prop.value) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            _ => p { "No platform properties." },
        }
    }
}

fn directory_listing(directory: &Directory, instance: &str, path: &str) -> Markup {
    html! {
        table {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Size" } th scope="col" { "Download" } } }
            tbody {
                @for d in &directory.directories {
                    @let child = if path.is_empty() { d.name.clone() } else { format!("{path}/{}", d.name) };
                    tr {
                        td { @if let Some(digest) = proto_digest(d.digest.as_ref()) { a href=(tree_href(&digest, instance, &child)) { (d.name) "/" } } @else { (d.name) "/" } }
                        td { "directory" } td {} td {}
                    }
                }
                @for f in &directory.files {
                    tr {
                        @if let Some(digest) = proto_digest(f.digest.as_ref()) {
                            td { a href=(blob_href(&digest, instance, "")) { (f.name) } }
                            td { "file" @if f.is_executable { ", executable" } }
                            td.num { (bytes_human(digest.size())) }
                            td { a href=(blob_href(&digest, instance, &format!("&view=raw&name={}", enc(&f.name)))) aria-label={ "Download " (f.name) } { "download" } }
                        } @else {
                            td { (f.name) } td { "file" } td {} td {}
                        }
                    }
                }
                @for l in &directory.symlinks {
                    tr { td { (l.name) } td { "symlink to " code { (l.target) } } td {} td {} }
                }
            }
        }
    }
}

fn stages(m: &ExecutedActionMetadata) -> Vec<(&'static str, f64, f64)> {
    let pairs = [
        ("queued", &m.queued_timestamp, &m.worker_start_timestamp),
        (
            "fetching inputs",
            &m.input_fetch_start_timestamp,
            &m.input_fetch_completed_timestamp,
        ),
        (
            "running",
            &m.execution_start_timestamp,
            &m.execution_completed_timestamp,
        ),
        (
            "uploading outputs",
            &m.output_upload_start_timestamp,
            &m.output_upload_completed_timestamp,
        ),
        (
            "on the worker",
            &m.worker_start_timestamp,
            &m.worker_completed_timestamp,
        ),
    ];
    let origin = [&m.queued_timestamp, &m.worker_start_timestamp]
        .into_iter()
        .filter_map(|t| stamp(t.as_ref()))
        .min();
    let Some(origin) = origin else {
        return Vec::new();
    };
    let offset = |t: SystemTime| t.duration_since(origin).unwrap_or_default().as_secs_f64();
    pairs
        .into_iter()
        .filter_map(|(name, start, end)| {
            let (s, e) = (stamp(start.as_ref())?, stamp(end.as_ref())?);
            Some((name, offset(s), offset(e).max(offset(s))))
        })
        .collect()
}

fn resource_usage(m: &ExecutedActionMetadata) -> Option<ResourceUsage> {
    m.auxiliary_metadata
        .iter()
        .find(|a| a.type_url.ends_with(RESOURCE_USAGE))
        .and_then(|a| ResourceUsage::decode(a.value.as_slice()).ok())
}

fn change_rows(label: &str, changes: &[explain::Changed]) -> Markup {
    html! {
        @for (what, before, after) in changes {
            tr.diff {
                td { (label) " " code { (what) } }
                td { @if let Some(b) = before { del { code { (b) } } } @else { "absent" } }
                td { @if let Some(a) = after { ins { code { (a) } } } @else { "absent" } }
            }
        }
    }
}

fn explanation(e: &Explanation) -> Markup {
    html! {
        p {
            "The nearest earlier execution of the same action (the same mnemonic and outputs) is "
            a href=(action_href(&e.earlier)) { code { (e.earlier.digest.hash_hex()[..12]) } }
            " from invocation " a href={ "/invocation/" (path_enc(&e.earlier.invocation)) } { code { (e.earlier.invocation) } }
            " at " (when(e.earlier.at)) ". What differs:"
        }
        @match &e.inputs {
            Ok(inputs) if !inputs.is_empty() => {
                h3 { "Input files" }
                ul #changed-inputs {
                    @for change in inputs {
                        li {
                            @match change {
                                InputChange::Changed(p) => { "changed: " code { (p) } }
                                InputChange::Added(p) => { "added: " code { (p) } }
                                InputChange::Removed(p) => { "removed: " code { (p) } }
                            }
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(why) => p { "The input trees could not be compared: " (why) }
        }
        @if e.inputs.as_ref().is_ok_and(|i| i.len() >= blob::MAX_CHANGES) {
            p { "Only the first " (blob::MAX_CHANGES) " differences are listed." }
        }
        @if !(e.arguments.is_empty() && e.environment.is_empty() && e.platform.is_empty() && e.other.is_empty()) {
            h3 { "Command and action" }
            table {
                thead { tr { th scope="col" { "What" } th scope="col" { "Before" } th scope="col" { "Now" } } }
                tbody {
                    (change_rows("", &e.arguments))
                    (change_rows("environment", &e.environment))
                    (change_rows("platform", &e.platform))
                    (change_rows("", &e.other))
                }
            }
        }
        @if !e.found_difference() {
            p { "Nothing differs: the earlier result was not in the cache (evicted, invalidated, or not cacheable)." }
        }
    }
}

impl Page<'_> {
    pub async fn action(
        &self,
        hash: &str,
        size: &str,
        query: &HashMap<String, String>,
    ) -> Result<Markup, PageError> {
        let digest = Digest::parse_parts(hash, size)
            .map_err(|e| PageError::BadRequest(format!("the action digest: {e}")))?;
        let records: Vec<ActionRecord> = self
            .web
            .history
            .action_records(&digest, RECORDS_SHOWN)
            .into_iter()
            .filter(|r| self.may_see(&r.identity, &r.instance))
            .collect();
        let wanted: Option<u128> = query.get("at").and_then(|s| s.parse().ok());
        let record = match wanted {
            Some(at) => records.iter().find(|r| record_time(r) == at),
            None => records.last(),
        }
        .cloned();
        let instance = record
            .as_ref()
            .map(|r| r.instance.clone())
            .or_else(|| query.get("instance").cloned())
            .unwrap_or_default();
        self.need_cas(&instance)?;
        let loaded = explain::load(self.web.cas.as_ref(), &digest).await?;
        let (action, command) = (&loaded.action, &loaded.command);
        let root = match loaded.input_root {
            Some(root) => Some((
                root,
                blob::message::<Directory>(self.web.cas.as_ref(), &root, "Directory").await,
            )),
            None => None,
        };
        let result: Option<ActionResult> =
            record.as_ref().and_then(|r| r.result.as_deref().cloned());
        let metadata = result.as_ref().and_then(|r| r.execution_metadata.clone());
        let stdout = self.stream(result.as_ref().map(|r| &r.stdout_digest)).await;
        let stderr = self.stream(result.as_ref().map(|r| &r.stderr_digest)).await;
        let explained = match &record {
            Some(r) if matches!(r.outcome, Outcome::Executed { .. }) => {
                // Explanations read the CAS: a few at a time, whoever asks.
                let _turn = self.web.explaining.acquire().await;
                let visible = |identity: &str, instance: &str| self.may_see(identity, instance);
                let cas = self.web.cas.as_ref();
                Some(explain::explain(&self.web.history, cas, r, &loaded, &visible).await)
            }
            _ => None,
        };
        let exec_line = {
            let mut words = vec![
                "paddock".to_owned(),
                "exec".into(),
                "--remote".into(),
                self.web.grpc_url.clone(),
                "--instance".into(),
                instance.clone(),
            ];
            let platform = action.platform.as_ref().or(command.platform.as_ref());
            for p in platform.into_iter().flat_map(|p| &p.properties) {
                words.push("--platform".into());
                words.push(format!("{}={}", p.name, p.value));
            }
            for v in &command.environment_variables {
                words.push("--env".into());
                words.push(format!("{}={}", v.name, v.value));
            }
            if !command.working_directory.is_empty() {
                words.push("--working-directory".into());
                words.push(command.working_directory.clone());
            }
            for o in explain::outputs(command) {
                words.push("--output".into());
                words.push(o);
            }
            words.push("--input".into());
            words.push("INPUT_ROOT".into());
            words.push("--skip-cache".into());
            words.push("--".into());
            words.extend(command.arguments.iter().cloned());
            words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
        };
        let instance_ref = instance.as_str();
        Ok(self.layout(
            &format!("Action {}", &digest.hash_hex()[..12]),
            html! {
                dl {
                    dt { "Digest" } dd { code { (digest) } " " a href=(blob_href(&digest, instance_ref, "&as=Action")) { "as stored" } }
                    dt { "Instance" } dd { code { (instance) } }
                    @if let Some(r) = &record {
                        dt { "Invocation" } dd { a href={ "/invocation/" (path_enc(&r.invocation)) } { code { (r.invocation) } } }
                        dt { "Mnemonic" } dd { (r.mnemonic) }
                        dt { "Target" } dd { code { (r.target) } }
                        dt { "Served" } dd { (outcome_cell(&r.outcome)) " at " (when(r.at)) " to " (r.identity)
                            @if let Outcome::Failed { message, .. } = &r.outcome { ": " (message) } }
                    } @else {
                        dt { "Served" } dd { "Not in the history (older than its bounds, or not yours)." }
                    }
                    @if let Some(m) = &metadata {
                        dt { "Worker" } dd { a href={ "/worker/" (path_enc(&m.worker)) } { (m.worker) } }
                    }
                    @if let Some(r) = &result {
                        dt { "Exit code" } dd { (r.exit_code) }
                    }
                    @if records.len() > 1 {
                        dt { "Also served" } dd {
                            @for r in records.iter().filter(|r| Some(r.seq) != record.as_ref().map(|x| x.seq)) {
                                a href=(action_href(r)) { (r.outcome.word()) " at " (when(r.at)) } " "
                            }
                        }
                    }
                }
                @if let Some(e) = &explained {
                    section aria-labelledby="why" {
                        h2 #why { "Why it missed the cache" }
                        @match e {
                            Some(e) => (explanation(e)),
                            None => p { "No earlier execution of an action with the same mnemonic and outputs is in the history: this looks like its first run here." },
                        }
                    }
                }
                section aria-labelledby="command" {
                    h2 #command { "Command" }
                    pre { code { @for (i, a) in command.arguments.iter().enumerate() { @if i > 0 { " " } (quote(a)) } } }
                    dl {
                        dt { "Working directory" } dd { code { (if command.working_directory.is_empty() { "(the input root)" } else { &command.working_directory }) } }
                        dt { "Outputs" } dd { @for o in explain::outputs(command) { code { (o) } " " } }
                        dt { "Timeout" } dd { (action.timeout.as_ref().map(|t| format!("{} s", t.seconds)).unwrap_or_else(|| "the farm's default".into())) }
                        dt { "Cacheable" } dd { (if action.do_not_cache { "no (do_not_cache)" } else { "yes" }) }
                    }
                    h3 { "Environment" }
                    @if command.environment_variables.is_empty() { p { "Empty." } } @else {
                        table {
                            thead { tr { th scope="col" { "Variable" } th scope="col" { "Value" } } }
                            tbody { @for v in &command.environment_variables { tr { td { code { (v.name) } } td { code { (v.value) } } } } }
                        }
                    }
                    h3 { "Platform" }
                    (platform_rows(action, command))
                    h3 { "Run it again" }
                    p { "With the input root downloaded into " code { "INPUT_ROOT" } ":" }
                    pre #exec-line { code { (exec_line) } }
                }
                section aria-labelledby="inputs" {
                    h2 #inputs { "Input tree" }
                    @match &root {
                        Some((digest, Ok(directory))) => {
                            p {
                                a href=(tree_href(digest, instance_ref, "")) { "Browse the whole input tree" }
                                " (" code { (digest) } "), or "
                                a href={ "/tree/" (digest.hash_hex()) "/" (digest.size()) "/archive?instance=" (enc(instance_ref)) } { "download it (tar)" }
                            }
                            (directory_listing(directory, instance_ref, ""))
                        }
                        Some((_, Err(e))) => p.bad { (e.to_string()) },
                        None => p { "No input root." },
                    }
                }
                @if let Some(m) = &metadata {
                    section aria-labelledby="stages" {
                        h2 #stages { "Stages" }
                        @let stages = stages(m);
                        @if stages.is_empty() { p { "The worker reported no timestamps." } } @else {
                            (chart::waterfall("The action's stages, in seconds from when it was queued", &stages))
                        }
                        @if let Some(usage) = resource_usage(m) {
                            dl #usage {
                                dt { "Peak memory" } dd { (bytes_human(usage.peak_memory_bytes)) @if usage.memory_limit_bytes > 0 { " of " (bytes_human(usage.memory_limit_bytes)) } }
                                dt { "CPU" } dd { (format!("{:.3} s user, {:.3} s system", usage.cpu_user_micros as f64 / 1e6, usage.cpu_system_micros as f64 / 1e6)) }
                                @if usage.out_of_memory { dt { "Out of memory" } dd.bad { "killed for exceeding its memory limit" } }
                            }
                        }
                    }
                }
                @if let Some(r) = &result {
                    section aria-labelledby="outputs" {
                        h2 #outputs { "Outputs" }
                        table {
                            thead { tr { th scope="col" { "Path" } th scope="col" { "Kind" } th scope="col" { "Size" } } }
                            tbody {
                                @for f in &r.output_files {
                                    tr {
                                        td { @if let Some(d) = proto_digest(f.digest.as_ref()) { a href=(blob_href(&d, instance_ref, "")) { code { (f.path) } } } @else { code { (f.path) } } }
                                        td { "file" @if f.is_executable { ", executable" } }
                                        td.num { (proto_digest(f.digest.as_ref()).map(|d| bytes_human(d.size())).unwrap_or_default()) }
                                    }
                                }
                                @for d in &r.output_directories {
                                    tr {
                                        td { @if let Some(t) = proto_digest(d.tree_digest.as_ref()) { a href=(blob_href(&t, instance_ref, "&as=Tree")) { code { (d.path) } } } @else { code { (d.path) } } }
                                        td { "directory" } td {}
                                    }
                                }
                                @for l in r.output_symlinks.iter().chain(&r.output_file_symlinks).chain(&r.output_directory_symlinks) {
                                    tr { td { code { (l.path) } } td { "symlink to " code { (l.target) } } td {} }
                                }
                            }
                        }
                        (stream_section("stdout", "Standard output", &stdout, &r.stdout_raw, instance_ref))
                        (stream_section("stderr", "Standard error", &stderr, &r.stderr_raw, instance_ref))
                    }
                }
            },
        ))
    }
}

impl Page<'_> {
    /// A result's stdout or stderr: its digest, and its text if short enough to show.
    async fn stream(
        &self,
        digest: Option<&Option<paddock_reapi::proto::re::Digest>>,
    ) -> Option<(Digest, Option<bytes::Bytes>)> {
        let digest = proto_digest(digest?.as_ref())?;
        let text = blob::bytes(self.web.cas.as_ref(), &digest, TEXT_SHOWN as u64).await;
        Some((digest, text.ok()))
    }
}

fn stream_section(
    id: &str,
    title: &str,
    stored: &Option<(Digest, Option<bytes::Bytes>)>,
    raw: &[u8],
    instance: &str,
) -> Markup {
    html! {
        h3 id=(id) { (title) }
        @match stored {
            Some((_, Some(bytes))) => {
                pre aria-labelledby=(id) { (String::from_utf8_lossy(bytes)) }
            }
            Some((digest, None)) => {
                p { (bytes_human(digest.size())) ": " a href=(blob_href(digest, instance, "&view=text")) { "read it" } }
            }
            None if !raw.is_empty() => pre aria-labelledby=(id) { (String::from_utf8_lossy(raw)) },
            None => p { "Empty." },
        }
    }
}

// ---------------------------------------------------------------- CAS

fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (row, chunk) in bytes.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}  ", row * 16));
        for b in chunk {
            out.push_str(&format!("{b:02x} "));
        }
        out.push_str(&"   ".repeat(16 - chunk.len()));
        out.push(' ');
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

fn decoded(kind: Kind, bytes: &[u8], instance: &str) -> Result<Markup, String> {
    let fail = |_| format!("the blob does not decode as a {}", kind.name());
    Ok(match kind {
        Kind::Directory => {
            let d = Directory::decode(bytes).map_err(fail)?;
            directory_listing(&d, instance, "")
        }
        Kind::Tree => {
            let t = Tree::decode(bytes).map_err(fail)?;
            html! {
                h2 { "Root" }
                (directory_listing(&t.root.unwrap_or_default(), instance, ""))
                h2 { "Children" }
                p { (t.children.len()) " directories." }
                ul { @for child in &t.children {
                    @let (d, _) = Digest::of_message(child);
                    li { code { (d) } " — " (child.files.len()) " files, " (child.directories.len()) " directories" }
                } }
            }
        }
        Kind::Action => {
            let a = Action::decode(bytes).map_err(fail)?;
            html! {
                dl {
                    dt { "Command" } dd { @if let Some(d) = proto_digest(a.command_digest.as_ref()) { a href=(blob_href(&d, instance, "&as=Command")) { code { (d) } } } }
                    dt { "Input root" } dd { @if let Some(d) = proto_digest(a.input_root_digest.as_ref()) { a href=(tree_href(&d, instance, "")) { code { (d) } } } }
                    dt { "Timeout" } dd { (a.timeout.as_ref().map(|t| format!("{} s", t.seconds)).unwrap_or_default()) }
                    dt { "do_not_cache" } dd { (a.do_not_cache) }
                    dt { "Salt" } dd { code { (hex::encode(&a.salt)) } }
                }
                (platform_rows(&a, &Command::default()))
            }
        }
        Kind::Command => {
            let c = Command::decode(bytes).map_err(fail)?;
            html! {
                h2 { "Arguments" }
                pre { code { @for (i, a) in c.arguments.iter().enumerate() { @if i > 0 { " " } (quote(a)) } } }
                h2 { "Environment" }
                ul { @for v in &c.environment_variables { li { code { (v.name) "=" (v.value) } } } }
                h2 { "Outputs" }
                ul { @for o in explain::outputs(&c) { li { code { (o) } } } }
                p { "Working directory: " code { (c.working_directory) } }
                (platform_rows(&Action::default(), &c))
            }
        }
        Kind::ActionResult => {
            let r = ActionResult::decode(bytes).map_err(fail)?;
            html! {
                dl {
                    dt { "Exit code" } dd { (r.exit_code) }
                    dt { "Worker" } dd { (r.execution_metadata.as_ref().map(|m| m.worker.as_str()).unwrap_or("")) }
                    dt { "stdout" } dd { @if let Some(d) = proto_digest(r.stdout_digest.as_ref()) { a href=(blob_href(&d, instance, "&view=text")) { code { (d) } } } }
                    dt { "stderr" } dd { @if let Some(d) = proto_digest(r.stderr_digest.as_ref()) { a href=(blob_href(&d, instance, "&view=text")) { code { (d) } } } }
                }
                ul { @for f in &r.output_files { li { code { (f.path) } " " @if let Some(d) = proto_digest(f.digest.as_ref()) { a href=(blob_href(&d, instance, "")) { code { (d) } } } } } }
            }
        }
    })
}

impl Page<'_> {
    /// The digest a CAS page names (`what` says which, in errors), and the instance
    /// it is read on, which the caller must be allowed to read.
    fn cas_blob(
        &self,
        hash: &str,
        size: &str,
        query: &HashMap<String, String>,
        what: &str,
    ) -> Result<(Digest, String), PageError> {
        let digest = Digest::parse_parts(hash, size)
            .map_err(|e| PageError::BadRequest(format!("{what}: {e}")))?;
        let instance = query.get("instance").cloned().unwrap_or_default();
        self.need_cas(&instance)?;
        Ok((digest, instance))
    }

    pub async fn tree(
        &self,
        hash: &str,
        size: &str,
        query: &HashMap<String, String>,
    ) -> Result<Markup, PageError> {
        let (digest, instance) = self.cas_blob(hash, size, query, "the directory digest")?;
        let path = query.get("path").cloned().unwrap_or_default();
        let directory: Directory =
            blob::message(self.web.cas.as_ref(), &digest, "Directory").await?;
        let title = if path.is_empty() {
            "/".to_owned()
        } else {
            format!("/{path}")
        };
        let archive = format!(
            "/tree/{}/{}/archive?instance={}",
            digest.hash_hex(),
            digest.size(),
            enc(&instance)
        );
        Ok(self.layout(
            &format!("Input tree {title}"),
            html! {
                p {
                    "Directory " code { (digest) } " on instance " code { (instance) } ". "
                    a href=(archive) { "Download this tree (tar)" }
                }
                (directory_listing(&directory, &instance, &path))
            },
        ))
    }

    /// A directory and everything under it, as a tar archive.
    pub async fn tree_archive(
        &self,
        hash: &str,
        size: &str,
        query: &HashMap<String, String>,
    ) -> Result<Answer, PageError> {
        let (digest, _) = self.cas_blob(hash, size, query, "the directory digest")?;
        // Archives are built in memory whole: a few at a time, as downloads are.
        let _turn = self.web.downloading.acquire().await;
        let top = format!("tree-{}", &digest.hash_hex()[..12]);
        let bytes =
            blob::tree_archive(self.web.cas.as_ref(), digest, &top, blob::MAX_DOWNLOAD).await?;
        Ok(Answer::Download {
            bytes,
            filename: format!("{top}.tar"),
        })
    }

    pub async fn blob(
        &self,
        hash: &str,
        size: &str,
        query: &HashMap<String, String>,
    ) -> Result<Answer, PageError> {
        let (digest, instance) = self.cas_blob(hash, size, query, "the digest")?;
        let view = query.get("view").map(String::as_str).unwrap_or("auto");
        if view == "raw" {
            // Downloads are held in memory whole: a few at a time.
            let _turn = self.web.downloading.acquire().await;
            let bytes = blob::bytes(self.web.cas.as_ref(), &digest, blob::MAX_DOWNLOAD).await?;
            let name: String = query
                .get("name")
                .map(|n| {
                    n.chars()
                        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
                        .collect()
                })
                .filter(|n: &String| !n.is_empty())
                .unwrap_or_else(|| digest.hash_hex());
            return Ok(Answer::Download {
                bytes,
                filename: name,
            });
        }
        let bytes = match blob::bytes(self.web.cas.as_ref(), &digest, blob::MAX_SHOWN).await {
            Ok(bytes) => bytes,
            Err(BlobError::TooLarge { .. }) => bytes::Bytes::new(),
            Err(e) => return Err(e.into()),
        };
        let forced = query.get("as").and_then(|k| Kind::parse(k));
        let kind = match view {
            "auto" => forced.or_else(|| blob::guess(&bytes)),
            _ => None,
        };
        let text = std::str::from_utf8(&bytes[..bytes.len().min(TEXT_SHOWN)]).ok();
        let views = html! {
            nav aria-label="Views" {
                "View as: "
                @for k in Kind::ALL { a href=(blob_href(&digest, &instance, &format!("&as={}", k.name()))) { (k.name()) } " " }
                a href=(blob_href(&digest, &instance, "&view=text")) { "text" } " "
                a href=(blob_href(&digest, &instance, "&view=hex")) { "hex" } " "
                a href=(blob_href(&digest, &instance, "&view=raw")) { "download" }
            }
        };
        let body = match (kind, view) {
            (Some(kind), _) => match decoded(kind, &bytes, &instance) {
                Ok(markup) => html! { p { "Decoded as a " strong { (kind.name()) } "." } (markup) },
                Err(why) => html! { p.bad { (why) } },
            },
            (None, "hex") => html! { pre { (hex_dump(&bytes[..bytes.len().min(HEX_SHOWN)])) } },
            (None, _) if bytes.is_empty() && digest.size() > 0 => html! {
                p { "Larger than the " (bytes_human(blob::MAX_SHOWN)) " a page shows: download it, or " code { "paddock cas get " (digest) } "." }
            },
            (None, "text") | (None, "auto") if text.is_some() => html! {
                pre { (text.unwrap_or_default()) }
                @if bytes.len() > TEXT_SHOWN { p { "The first " (bytes_human(TEXT_SHOWN as u64)) " are shown." } }
            },
            (None, _) => html! {
                p { "Binary: the first " (bytes_human(HEX_SHOWN.min(bytes.len()) as u64)) " in hex." }
                pre { (hex_dump(&bytes[..bytes.len().min(HEX_SHOWN)])) }
            },
        };
        Ok(Answer::Html(self.layout(
            &format!("Blob {}", &digest.hash_hex()[..12]),
            html! {
                p { code { (digest) } " (" (bytes_human(digest.size())) ") on instance " code { (instance) } "." }
                (views)
                (body)
            },
        )))
    }

    pub fn cas_form(&self, query: &HashMap<String, String>) -> Result<Answer, PageError> {
        let instance = query.get("instance").cloned().unwrap_or_default();
        if let Some(wanted) = query
            .get("digest")
            .map(|d| d.trim())
            .filter(|d| !d.is_empty())
        {
            let digest: Digest = wanted.replace('-', "/").parse().map_err(|e| {
                PageError::BadRequest(format!("{wanted:?} is not a digest (HASH/SIZE): {e}"))
            })?;
            return Ok(Answer::Redirect(blob_href(&digest, &instance, "")));
        }
        Ok(Answer::Html(self.layout(
            "CAS browser",
            html! {
                p { "Any blob by digest. Directories, Trees, Actions, Commands and ActionResults are decoded; anything else is shown as text or hex." }
                form method="get" action="/cas" {
                    p {
                        label for="digest" { "Digest (HASH/SIZE)" } " "
                        input #digest type="text" name="digest" required spellcheck="false";
                    }
                    p {
                        label for="instance" { "Instance" } " "
                        input #instance type="text" name="instance" value=(instance);
                    }
                    p { button type="submit" { "Show" } }
                }
            },
        )))
    }
}

// ---------------------------------------------------------------- workers

impl Page<'_> {
    fn health_rates(&self, worker: &str) -> Vec<f64> {
        self.web
            .history
            .health(worker)
            .iter()
            .map(|s| {
                if s.outcomes == 0 {
                    0.0
                } else {
                    s.failures as f64 / s.outcomes as f64
                }
            })
            .collect()
    }

    pub fn workers(&self) -> Result<Markup, PageError> {
        let workers = self.web.scheduler.workers();
        Ok(self.layout(
            "Workers",
            html! {
                @if workers.is_empty() { p { "No worker has connected." } } @else {
                    table {
                        thead { tr {
                            th scope="col" { "Worker" } th scope="col" { "Pool" } th scope="col" { "Standing" }
                            th scope="col" { "Reason" } th scope="col" { "Load" } th scope="col" { "Failure rate, last hour" }
                            th scope="col" { "Recent outcomes" }
                        } }
                        tbody {
                            @for w in &workers {
                                tr {
                                    td { a href={ "/worker/" (path_enc(&w.name)) } { (w.name) } @if !w.connected { " (gone)" } }
                                    td { (pool_name(&w.pool)) }
                                    td { span class=(if w.standing == "active" { "good" } else if w.standing == "quarantined" { "bad" } else { "warn" }) { (w.standing) } }
                                    td { (w.reason) }
                                    td.num { (w.running) " / " (w.capacity) }
                                    td { (chart::sparkline(&format!("failure rate of {}", w.name), &self.health_rates(&w.name))) }
                                    td.num { (w.recent.outcomes) " (" (w.recent.infra_failures + w.recent.nonzero_exits + w.recent.disagreements) " failed)" }
                                }
                            }
                        }
                    }
                }
            },
        ))
    }

    pub fn worker(&self, name: &str) -> Result<Markup, PageError> {
        let report = self
            .web
            .scheduler
            .workers()
            .into_iter()
            .find(|w| w.name == name)
            .ok_or_else(|| {
                PageError::NotFound(format!("no worker named {name:?} has connected"))
            })?;
        let changes = self.web.history.standing_changes(Some(name), 50);
        let canaries: Vec<_> = changes
            .iter()
            .filter(|c| c.reason.contains("canar"))
            .collect();
        let counts = |c: paddock_scheduler::health::Counts| {
            html! { (c.outcomes) " outcomes: " (c.infra_failures) " infrastructure failures, " (c.nonzero_exits) " non-zero exits, " (c.disagreements) " disagreements" }
        };
        Ok(self.layout(
            &format!("Worker {name}"),
            html! {
                dl {
                    dt { "Standing" } dd #standing { strong { (report.standing) } " since " (when(report.since)) }
                    dt { "Reason" } dd #reason { (report.reason) }
                    dt { "Identity" } dd { (report.identity) }
                    dt { "Pool" } dd { (pool_name(&report.pool)) }
                    dt { "Connected" } dd { (if report.connected { "yes" } else { "no" }) }
                    dt { "Load" } dd { (report.running) " running of " (report.capacity) " slots" }
                    dt { "Health window" } dd { (counts(report.recent)) }
                    dt { "Since the scheduler started" } dd { (counts(report.totals)) }
                    dt { "Failure rate, last hour" } dd { (chart::sparkline(&format!("failure rate of {name}, one sample a minute"), &self.health_rates(name))) }
                }
                @if self.admin() {
                    section aria-labelledby="orders" {
                        h2 #orders { "Orders" }
                        form method="post" action={ "/worker/" (path_enc(name)) "/command" } {
                            input type="hidden" name="form_token" value=(self.form_token);
                            p {
                                label for="order-reason" { "Reason (kept with the worker's record)" } " "
                                input #order-reason type="text" name="reason";
                            }
                            p {
                                button type="submit" name="command" value="drain" { "Drain" } " "
                                button type="submit" name="command" value="quarantine" { "Quarantine" } " "
                                button type="submit" name="command" value="release" { "Release" }
                            }
                        }
                    }
                }
                section aria-labelledby="properties" {
                    h2 #properties { "Properties" }
                    @if report.properties.is_empty() { p { "None offered (not connected)." } } @else {
                        table {
                            thead { tr { th scope="col" { "Property" } th scope="col" { "Value" } } }
                            tbody { @for (n, v) in &report.properties { tr { td { code { (n) } } td { code { (v) } } } } }
                        }
                    }
                }
                section aria-labelledby="history" {
                    h2 #history { "Quarantines, releases and drains" }
                    (standing_table(&changes))
                }
                section aria-labelledby="canaries" {
                    h2 #canaries { "Canary results" }
                    @if canaries.is_empty() { p { "No canaries have run on this worker since the server started." } } @else {
                        ul { @for c in &canaries { li { (when(c.at)) ": " (c.reason) } } }
                    }
                }
            },
        ))
    }

    /// An operator's order from the worker page; where to go next.
    pub async fn command_worker(
        &self,
        name: &str,
        fields: &HashMap<String, String>,
    ) -> Result<String, PageError> {
        if !self.admin() {
            return Err(PageError::Forbidden(format!(
                "{} may not give orders to workers: that needs `admin` on every instance (\"*\")",
                self.caller.name()
            )));
        }
        let command = match fields.get("command").map(String::as_str) {
            Some("drain") => WorkerCommand::Drain,
            Some("quarantine") => WorkerCommand::Quarantine,
            Some("release") => WorkerCommand::Release,
            _ => {
                return Err(PageError::BadRequest(
                    "command must be drain, quarantine or release".into(),
                ))
            }
        };
        let reason = fields.get("reason").map(String::as_str).unwrap_or("");
        let reason = format!(
            "{} (from the web page, by {})",
            reason.trim(),
            self.caller.name()
        );
        self.web
            .scheduler
            .command_worker(name, command, reason.trim())
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => PageError::NotFound(status.message().to_owned()),
                _ => PageError::Unavailable(status.message().to_owned()),
            })?;
        tracing::warn!(
            worker = name,
            ?command,
            by = self.caller.name(),
            "an order from the web page"
        );
        Ok(format!("/worker/{}", path_enc(name)))
    }
}
