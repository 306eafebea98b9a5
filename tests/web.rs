//! The web pages in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), after real Bazel builds that publish their build events to
//! the farm (`--bes_backend`). Screenshots of each page are saved under
//! `target/test-artifacts/web/`.

mod common;

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::bazel::{remote_flags, Workspace};
use common::pki::Pki;
use common::{config_file, free_address, repo_root, Farm};
use fantoccini::{Client, ClientBuilder, Locator};
use paddock_client::Remote;
use paddock_proto::admin::v1::{
    admin_client::AdminClient, command_worker_request, CommandWorkerRequest, ListWorkersRequest,
};

/// A chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let address = free_address();
        let port = address.rsplit(':').next().unwrap().to_owned();
        // Its own process group, so that the browsers it starts go with it even when
        // a failing test never ends its session.
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting chromedriver (apt-get install chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver {
            child,
            url: format!("http://{address}"),
        }
    }

    async fn browser(&self) -> Client {
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1600"],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a process group id we created; no memory is involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn artifacts() -> PathBuf {
    let dir = repo_root().join("target/test-artifacts/web");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
    std::fs::write(artifacts().join(format!("{name}.png")), png).unwrap();
}

/// The text of the first element `css` matches; tried again for a while when a
/// navigation under way replaces the page between finding and reading.
async fn text(browser: &Client, css: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = match browser.find(Locator::Css(css)).await {
            Ok(element) => element.text().await,
            Err(e) => Err(e),
        };
        match found {
            Ok(text) => return text,
            Err(e) if Instant::now() > deadline => panic!("no {css} on the page: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Clicks a link or button and waits for the page it leads to.
async fn follow(browser: &Client, element: fantoccini::elements::Element) {
    let before = browser.current_url().await.unwrap();
    element.click().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.current_url().await.unwrap() == before {
        assert!(
            Instant::now() < deadline,
            "the click on {before} led nowhere"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks what every page must have: a title, one `h1`, a main landmark, and a
/// label for each visible input.
async fn check_structure(browser: &Client, title_has: &str) {
    let title = browser.title().await.unwrap();
    assert!(
        title.contains(title_has) && title.ends_with("· Paddock"),
        "title {title:?}"
    );
    let headings = browser.find_all(Locator::Css("h1")).await.unwrap();
    assert_eq!(headings.len(), 1, "one h1 on {title:?}");
    browser.find(Locator::Css("main#main")).await.unwrap();
    for input in browser
        .find_all(Locator::Css("input:not([type=hidden])"))
        .await
        .unwrap()
    {
        let id = input
            .attr("id")
            .await
            .unwrap()
            .expect("every input has an id");
        let labels = browser
            .find_all(Locator::Css(&format!("label[for='{id}']")))
            .await
            .unwrap();
        assert_eq!(labels.len(), 1, "input {id} on {title:?} has a label");
    }
}

/// The page, among the actions an invocation page lists, whose text passes `wanted`.
async fn find_action(
    browser: &Client,
    base: &str,
    invocation: &str,
    wanted: impl Fn(&str) -> bool,
) -> Option<String> {
    browser
        .goto(&format!("{base}/invocation/{invocation}"))
        .await
        .unwrap();
    let mut hrefs = Vec::new();
    for link in browser
        .find_all(Locator::Css(
            "section[aria-labelledby=all] td:first-child a",
        ))
        .await
        .unwrap()
    {
        hrefs.push(link.attr("href").await.unwrap().unwrap());
    }
    for href in hrefs {
        browser.goto(&format!("{base}{href}")).await.unwrap();
        if wanted(&text(browser, "main").await) {
            return Some(href);
        }
    }
    None
}

/// The invocation id in Bazel's "Streaming build results to: …/invocation/ID".
fn invocation_id(output: &str) -> String {
    let line = output
        .lines()
        .find(|l| l.contains("Streaming build results to:"))
        .unwrap_or_else(|| panic!("Bazel printed no results link:\n{output}"));
    line.rsplit("/invocation/")
        .next()
        .unwrap()
        .trim()
        .to_owned()
}

async fn sign_in(browser: &Client, base: &str, token: &str) {
    browser.goto(&format!("{base}/")).await.unwrap();
    // Signed out, every page leads to the sign-in form; it works by keyboard alone.
    assert!(browser
        .current_url()
        .await
        .unwrap()
        .path()
        .starts_with("/signin"));
    check_structure(browser, "Sign in").await;
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.send_keys(&format!("{token}\n")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.current_url().await.unwrap().path() != "/" {
        assert!(
            Instant::now() < deadline,
            "signing in did not reach the overview"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin(farm: &Farm, pki: &Pki, token: &str) -> AdminClient<paddock_client::Transport> {
    let remote = Remote::connect_with(&farm.url, "", &pki.with_token(token))
        .await
        .unwrap();
    AdminClient::new(remote.channel())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_show_builds_actions_and_workers_and_only_admins_give_orders() {
    let pki = Pki::new();
    let operator = pki.token("operator");
    let developer = pki.token("developer");
    pki.client("bazel-client");
    let client = ["cas.read", "cas.write", "ac.read", "ac.write", "execute"];
    let mut config = pki.tls_section();
    config += &pki.token_section(
        "operator",
        &["cas.read", "ac.read", "execute", "admin"],
        &["*"],
    );
    config += &pki.token_section("developer", &["cas.read", "ac.read", "execute"], &["*"]);
    // Bazel 4 sends no headers to the Build Event Service, so it proves who it is
    // with a client certificate, which both services see.
    config += &format!(
        "[[auth.certificates]]\nsubject = \"CN=bazel-client\"\npermissions = {client:?}\n"
    );
    let farm = Farm::start(&["--config", &config_file(&config)]);
    let base = farm.metrics_url.trim_end_matches("/metrics").to_owned();
    assert!(base.starts_with("https://"), "{base}");

    // Two builds with build events: all of //text and //math, then again after a
    // change to one source file.
    let ws = Workspace::new("cc");
    let mut flags = remote_flags(&farm.url);
    flags.push(format!(
        "--tls_certificate={}",
        pki.path("ca.pem").display()
    ));
    flags.push(format!(
        "--tls_client_certificate={}",
        pki.path("bazel-client.pem").display()
    ));
    flags.push(format!(
        "--tls_client_key={}",
        pki.path("bazel-client.key").display()
    ));
    flags.push(format!("--bes_backend={}", farm.url));
    flags.push(format!("--bes_results_url={base}/invocation/"));
    let mut args: Vec<&str> = vec!["test", "//text/...", "//math/..."];
    args.extend(flags.iter().map(String::as_str));
    let first = ws.bazel(&args);
    assert!(
        first.success,
        "{}\n--- paddock log ---\n{}",
        first.output,
        farm.log()
    );
    let first_id = invocation_id(&first.output);
    let upper = ws.dir().join("text/upper.cc");
    let mut source = std::fs::read_to_string(&upper).unwrap();
    source.push_str("\n// A change the web page must name.\n");
    std::fs::write(&upper, source).unwrap();
    let second = ws.bazel(&args);
    assert!(
        second.success,
        "{}\n--- paddock log ---\n{}",
        second.output,
        farm.log()
    );
    let second_id = invocation_id(&second.output);
    assert_ne!(first_id, second_id);

    let driver = Driver::start();
    let browser = driver.browser().await;
    sign_in(&browser, &base, &operator).await;

    // The overview: workers, pools, throughput, recent invocations.
    check_structure(&browser, "Overview").await;
    let overview = text(&browser, "main").await;
    assert!(
        overview.contains("Pools and the autoscaling signal"),
        "{overview}"
    );
    assert!(overview.contains(&first_id), "{overview}");
    browser
        .find(Locator::Css("svg[aria-label='Actions served per minute']"))
        .await
        .unwrap();
    screenshot(&browser, "overview").await;
    // The first Tab reaches the skip link.
    browser
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("\u{E004}")
        .await
        .unwrap();
    let focused = browser
        .active_element()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(focused, "Skip to the content");

    // The first invocation: its targets and tests from the build events, linked
    // actions, the timeline.
    browser
        .goto(&format!("{base}/invocation/{first_id}"))
        .await
        .unwrap();
    check_structure(&browser, "Invocation").await;
    let targets = text(&browser, "section[aria-labelledby=targets]").await;
    assert!(targets.contains("//text:upper"), "{targets}");
    let tests = text(&browser, "section[aria-labelledby=tests]").await;
    assert!(
        tests.contains("//text:text_test") && tests.contains("PASSED"),
        "{tests}"
    );
    assert!(tests.contains("//math:math_test"), "{tests}");
    browser
        .find(Locator::Css("svg[aria-label^='Actions run, by worker']"))
        .await
        .unwrap();
    screenshot(&browser, "invocation").await;
    // The test's log, through the CAS.
    let log_link = browser
        .find(Locator::Css("section[aria-labelledby=tests] a"))
        .await
        .expect("a link to a test log");
    follow(&browser, log_link).await;
    let log = text(&browser, "main pre").await;
    assert!(log.contains(" ok"), "a test log: {log}");

    // The test action's page: stdout, the input tree, the stages as a waterfall.
    let test_action =
        find_action(&browser, &base, &first_id, |page| page.contains("text ok")).await;
    let test_action = test_action.expect("an action whose stdout is the text test's");
    browser.goto(&format!("{base}{test_action}")).await.unwrap();
    check_structure(&browser, "Action").await;
    let stdout = text(&browser, "pre[aria-labelledby=stdout]").await;
    assert!(stdout.contains("text ok"), "{stdout}");
    let inputs = text(&browser, "section[aria-labelledby=inputs]").await;
    assert!(inputs.contains("bazel-out/"), "{inputs}");
    browser
        .find(Locator::Css("svg[aria-label^=\"The action's stages\"]"))
        .await
        .unwrap();
    let exec_line = text(&browser, "#exec-line").await;
    assert!(
        exec_line.starts_with("paddock exec --remote grpcs://"),
        "{exec_line}"
    );
    screenshot(&browser, "action").await;
    // Into the input tree, one directory down.
    let into = browser.find(Locator::LinkText("bazel-out/")).await.unwrap();
    follow(&browser, into).await;
    check_structure(&browser, "Input tree /bazel-out").await;

    // The second invocation: the compile of the changed file missed the cache, and its
    // page says why, naming the file.
    let explained = find_action(&browser, &base, &second_id, |page| {
        page.contains("upper.cc")
            && page.contains("Why it missed the cache")
            && page.contains(" -c ")
    })
    .await;
    let explained = explained.expect("the changed file's compile among the second build's actions");
    browser.goto(&format!("{base}{explained}")).await.unwrap();
    let why = text(&browser, "section[aria-labelledby=why]").await;
    assert!(why.contains("changed: text/upper.cc"), "{why}");
    screenshot(&browser, "action-cache-miss").await;

    // A worker quarantined with a reason appears so on the workers page.
    let mut operator_admin = admin(&farm, &pki, &operator).await;
    let workers = operator_admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let worker = workers[0].name.clone();
    operator_admin
        .command_worker(CommandWorkerRequest {
            name: worker.clone(),
            command: command_worker_request::Command::Quarantine as i32,
            reason: "its disk returns bad blocks".into(),
        })
        .await
        .unwrap();
    browser.goto(&format!("{base}/workers")).await.unwrap();
    check_structure(&browser, "Workers").await;
    let listed = text(&browser, "main table").await;
    assert!(
        listed.contains("quarantined") && listed.contains("its disk returns bad blocks"),
        "{listed}"
    );
    screenshot(&browser, "workers").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    browser
        .goto(&format!("{base}/worker/{worker}"))
        .await
        .unwrap();
    let history = text(&browser, "section[aria-labelledby=history]").await;
    assert!(history.contains("its disk returns bad blocks"), "{history}");

    // An admin drains the worker from its page.
    check_structure(&browser, "Worker").await;
    browser
        .find(Locator::Id("order-reason"))
        .await
        .unwrap()
        .send_keys("moving racks")
        .await
        .unwrap();
    let drain = browser
        .find(Locator::Css("button[value=drain]"))
        .await
        .unwrap();
    drain.click().await.unwrap();
    // The order redirects back to the same page: wait for the new standing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&browser, "#standing").await.contains("draining") {
        assert!(Instant::now() < deadline, "the page never showed the drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let standing = text(&browser, "#standing").await;
    assert!(standing.contains("draining"), "{standing}");
    screenshot(&browser, "worker").await;
    let now = operator_admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let drained = now.iter().find(|w| w.name == worker).unwrap();
    assert_eq!(drained.standing, "draining");
    assert!(
        drained.reason.contains("moving racks"),
        "{}",
        drained.reason
    );

    // A non-admin sees no orders, and one forged from its own valid session is refused.
    let sign_out = browser
        .find(Locator::Css("header form button"))
        .await
        .unwrap();
    follow(&browser, sign_out).await;
    sign_in(&browser, &base, &developer).await;
    browser
        .goto(&format!("{base}/worker/{worker}"))
        .await
        .unwrap();
    assert!(browser
        .find(Locator::Css("button[value=release]"))
        .await
        .is_err());
    browser
        .execute(
            "const token = document.querySelector('input[name=form_token]').value;
             const form = document.createElement('form');
             form.method = 'post';
             form.action = location.pathname + '/command';
             for (const [name, value] of [['form_token', token], ['command', 'release']]) {
               const input = document.createElement('input');
               input.type = 'hidden'; input.name = name; input.value = value;
               form.appendChild(input);
             }
             document.body.appendChild(form);
             form.submit();",
            vec![],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !browser
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/command")
    {
        assert!(Instant::now() < deadline, "the forged form was not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = text(&browser, "main").await;
    assert!(refused.contains("may not give orders"), "{refused}");
    let after = operator_admin
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        after.iter().find(|w| w.name == worker).unwrap().standing,
        "draining",
        "the non-admin's order must not have taken effect"
    );
    // Nor may it read another identity's invocation.
    browser
        .goto(&format!("{base}/invocation/{first_id}"))
        .await
        .unwrap();
    let hidden = text(&browser, "main").await;
    assert!(hidden.contains("no invocation"), "{hidden}");
    browser.close().await.unwrap();
}

/// Fetches `path` from `address` with this `Host` header; the whole answer.
fn get_with_host(address: &str, host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[tokio::test]
async fn build_events_are_validated_acknowledged_and_shown_and_open_pages_stay_on_loopback() {
    use paddock_proto::build_event_stream as bep;
    use paddock_proto::google::devtools::build::v1::{
        build_event::Event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
        OrderedBuildEvent, PublishBuildToolEventStreamRequest, StreamId,
    };
    use prost::Message;

    let mut farm = Farm::start(&[]);
    let remote = Remote::connect(&farm.url, "").await.unwrap();
    let mut bes = PublishBuildEventClient::new(remote.channel());
    let event = |invocation: &str, sequence: i64, payload: bep::BuildEvent| {
        PublishBuildToolEventStreamRequest {
            ordered_build_event: Some(OrderedBuildEvent {
                stream_id: Some(StreamId {
                    build_id: "b".into(),
                    invocation_id: invocation.into(),
                    component: 3,
                }),
                sequence_number: sequence,
                event: Some(BuildEvent {
                    event_time: None,
                    event: Some(Event::BazelEvent(prost_types::Any {
                        type_url: format!("type.googleapis.com/{}", bep::BUILD_EVENT),
                        value: payload.encode_to_vec(),
                    })),
                }),
            }),
            ..Default::default()
        }
    };
    let started = bep::BuildEvent {
        payload: Some(bep::build_event::Payload::Started(bep::BuildStarted {
            command: "test".into(),
            build_tool_version: "4.2.3".into(),
            start_time_millis: 1_700_000_000_000,
            ..Default::default()
        })),
        ..Default::default()
    };
    let finished = bep::BuildEvent {
        payload: Some(bep::build_event::Payload::Finished(bep::BuildFinished {
            exit_code: Some(bep::build_finished::ExitCode {
                name: "TESTS_FAILED".into(),
                code: 3,
            }),
            ..Default::default()
        })),
        ..Default::default()
    };

    // Each event is acknowledged by its sequence number.
    let requests = vec![
        event("inv-web-1", 1, started.clone()),
        event("inv-web-1", 2, finished),
    ];
    let mut acks = bes
        .publish_build_tool_event_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut numbers = Vec::new();
    while let Some(ack) = acks.message().await.unwrap() {
        numbers.push(ack.sequence_number);
    }
    assert_eq!(numbers, vec![1, 2]);

    // An event without an invocation id, or one that does not decode, ends the stream
    // with INVALID_ARGUMENT.
    let mut bad = event("", 1, started.clone());
    let refused = bes
        .publish_build_tool_event_stream(futures::stream::iter(vec![bad.clone()]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    if let Some(Event::BazelEvent(any)) = bad
        .ordered_build_event
        .as_mut()
        .and_then(|o| o.event.as_mut())
        .and_then(|e| e.event.as_mut())
    {
        any.value = vec![0xff, 0xff, 0xff];
    }
    bad.ordered_build_event
        .as_mut()
        .unwrap()
        .stream_id
        .as_mut()
        .unwrap()
        .invocation_id = "inv-web-2".into();
    let refused = bes
        .publish_build_tool_event_stream(futures::stream::iter(vec![bad]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // With no [auth], the pages are open on loopback, and show what the events said.
    let address = pages_address(&farm);
    let page = get_with_host(&address, &address, "/invocation/inv-web-1");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("TESTS_FAILED") && page.contains("bazel 4.2.3"),
        "{page}"
    );
    assert!(
        page.contains("default-src 'none'"),
        "every page carries the CSP"
    );
    // A page asked for under another site's name (DNS rebinding) is refused.
    let rebound = get_with_host(&address, "evil.example:8981", "/invocation/inv-web-1");
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    assert!(!rebound.contains("TESTS_FAILED"));
    // /metrics stays where it was.
    assert!(get_with_host(&address, &address, "/metrics").contains("paddock_"));

    // What an action wrote is never rendered in the farm's origin: a blob of HTML is
    // shown escaped, and downloaded as an attachment.
    use paddock_reapi::proto::re::{Directory, FileNode};
    let html = bytes::Bytes::from_static(b"<script>alert(1)</script>");
    let html_digest = paddock_reapi::Digest::of(&html);
    let (dir_digest, dir) = paddock_reapi::Digest::of_message(&Directory {
        files: vec![FileNode {
            name: "page.html".into(),
            digest: Some(html_digest.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    });
    remote
        .upload(vec![(html_digest, html.clone()), (dir_digest, dir.into())])
        .await
        .unwrap();
    let blob = |view: &str| {
        format!(
            "/blob/{}/{}?instance=&view={view}",
            html_digest.hash_hex(),
            html_digest.size()
        )
    };
    let shown = get_with_host(&address, &address, &blob("text"));
    assert!(shown.starts_with("HTTP/1.1 200"), "{shown}");
    assert!(
        !shown.contains("<script>alert") && shown.contains("&lt;script&gt;"),
        "{shown}"
    );
    let raw = get_with_host(&address, &address, &blob("raw")).to_ascii_lowercase();
    assert!(
        raw.contains("content-type: application/octet-stream"),
        "{raw}"
    );
    assert!(raw.contains("content-disposition: attachment"), "{raw}");
    // A directory downloads as a tar archive holding the file.
    let archive = get_with_host(
        &address,
        &address,
        &format!(
            "/tree/{}/{}/archive?instance=",
            dir_digest.hash_hex(),
            dir_digest.size()
        ),
    );
    assert!(archive
        .to_ascii_lowercase()
        .contains("content-disposition: attachment"));
    assert!(
        archive.contains("/page.html") && archive.contains("ustar"),
        "{archive}"
    );

    // The history outlives the server: an action served from the cache within the
    // invocation, and its build report, are still shown after a restart.
    use paddock_reapi::proto::re::{Action, Command};
    let (command, command_blob) = paddock_reapi::Digest::of_message(&Command {
        arguments: vec!["echo".into(), "restarted".into()],
        ..Default::default()
    });
    let (action, action_blob) = paddock_reapi::Digest::of_message(&Action {
        command_digest: Some(command.to_proto()),
        input_root_digest: Some(dir_digest.to_proto()),
        ..Default::default()
    });
    remote
        .upload(vec![
            (command, command_blob.into()),
            (action, action_blob.into()),
        ])
        .await
        .unwrap();
    common::cache_hit(&remote, &action, "inv-web-1").await;
    let page = get_with_host(&address, &address, "/invocation/inv-web-1");
    assert!(page.contains(&action.hash_hex()[..12]), "{page}");
    // A link to the action's record, as a bookmark keeps it across the restart.
    let start = page
        .find(&format!("/action/{}", action.hash_hex()))
        .expect("a link to the action");
    let link = &page[start..];
    let link = link[..link.find('"').unwrap()].replace("&amp;", "&");
    assert!(link.contains("at="), "{link}");
    farm.restart();
    let address = pages_address(&farm);
    let page = get_with_host(&address, &address, "/invocation/inv-web-1");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("TESTS_FAILED") && page.contains(&action.hash_hex()[..12]),
        "the history was lost in the restart: {page}"
    );
    // The link still names the same record, and the action page shows it.
    let shown = get_with_host(&address, &address, &link);
    assert!(shown.starts_with("HTTP/1.1 200"), "{shown}");
    assert!(
        shown.contains("href=\"/invocation/inv-web-1\""),
        "the record is not shown: {shown}"
    );
}

/// Where `farm` serves its pages: the metrics port's host and port.
fn pages_address(farm: &Farm) -> String {
    farm.metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned()
}
