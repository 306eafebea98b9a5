//! Identity and access, tried from real clients over real TLS: every permission
//! granted and refused on every service it guards, for bearer tokens, JWTs and
//! client certificates; bad credentials refused without being echoed; workers bound
//! to their identities; a worker that does not trust the scheduler; certificates
//! rotated under a running server; every quota reached and answered, with the
//! server's memory and disk staying within bounds; and a public address refused
//! without authentication.
//!
//! Certificates are made here with rcgen: a CA, the server's certificate for
//! 127.0.0.1, and client certificates it signs; a second CA that nobody trusts.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::pki::{Authority, Pki};
use common::{config_file, paddock_bin, Farm, Worker};
use futures::StreamExt;
use paddock_client::exec::{execute, prepare, ExecSpec};
use paddock_client::{Credentials, Remote};
use paddock_proto::admin::v1::{
    admin_client::AdminClient, invalidate_action_results_request::ByAction,
    invalidate_action_results_request::Target, InvalidateActionResultsRequest, ListWorkersRequest,
};
use paddock_proto::worker::v1 as wire;
use paddock_reapi::proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use paddock_reapi::proto::longrunning::{operations_client::OperationsClient, GetOperationRequest};
use paddock_reapi::proto::re::{
    batch_update_blobs_request, capabilities_client::CapabilitiesClient, ActionResult,
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, ExecuteRequest, ExecutedActionMetadata,
    ExecutionPolicy, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    GetTreeRequest, OutputFile, UpdateActionResultRequest, WaitExecutionRequest,
};
use paddock_reapi::Digest;
use prost::Message;
use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

// ---------------------------------------------------------------------------------
// Certificates, tokens and farms.

const JWT_ISSUER: &str = "https://issuer.paddock.test";
const JWT_AUDIENCE: &str = "paddock-tests";
const JWT_SECRET: &[u8] = b"a shared secret for HS256 tokens";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with these claims over the standard ones.
fn jwt(secret: &[u8], subject: &str, extra: serde_json::Value) -> String {
    let mut claims = serde_json::json!({
        "sub": subject, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": unix_now() + 600,
    });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An Ed25519 key for EdDSA tokens, and the JWKS document that publishes it.
fn eddsa_key() -> (jsonwebtoken::EncodingKey, String) {
    use base64::Engine as _;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.public_key_raw());
    let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "test-ed", "alg": "EdDSA", "use": "sig"}]});
    (
        jsonwebtoken::EncodingKey::from_ed_der(&key.serialize_der()),
        jwks.to_string(),
    )
}

fn eddsa_jwt(key: &jsonwebtoken::EncodingKey, subject: &str, permissions: &[&str]) -> String {
    let claims = serde_json::json!({
        "sub": subject, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": unix_now() + 600,
        "paddock_permissions": permissions,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("test-ed".into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// The permissions, as configured and as the server names them.
const PERMISSIONS: [&str; 7] = [
    "cas.read",
    "cas.write",
    "ac.read",
    "ac.write",
    "execute",
    "admin",
    "worker",
];

// ---------------------------------------------------------------------------------
// Probing every service.

/// A call that a permission guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Call {
    FindMissingBlobs,
    BatchReadBlobs,
    GetTree,
    Read,
    BatchUpdateBlobs,
    Write,
    QueryWriteStatus,
    GetActionResult,
    UpdateActionResult,
    Execute,
    WaitExecution,
    GetOperation,
    ListWorkers,
    InvalidateActionResults,
    WorkerSession,
}

impl Call {
    const ALL: [Call; 15] = [
        Call::FindMissingBlobs,
        Call::BatchReadBlobs,
        Call::GetTree,
        Call::Read,
        Call::BatchUpdateBlobs,
        Call::Write,
        Call::QueryWriteStatus,
        Call::GetActionResult,
        Call::UpdateActionResult,
        Call::Execute,
        Call::WaitExecution,
        Call::GetOperation,
        Call::ListWorkers,
        Call::InvalidateActionResults,
        Call::WorkerSession,
    ];

    /// Where the permission it needs must hold.
    fn scope(self) -> Scope {
        match self {
            // An operation is found by name; a worker serves what its identity may.
            Call::WaitExecution | Call::GetOperation | Call::WorkerSession => Scope::Anywhere,
            Call::ListWorkers => Scope::Everywhere,
            _ => Scope::Instance,
        }
    }

    fn permission(self) -> &'static str {
        match self {
            Call::FindMissingBlobs | Call::BatchReadBlobs | Call::GetTree | Call::Read => {
                "cas.read"
            }
            Call::BatchUpdateBlobs | Call::Write | Call::QueryWriteStatus => "cas.write",
            Call::GetActionResult => "ac.read",
            Call::UpdateActionResult => "ac.write",
            Call::Execute | Call::WaitExecution | Call::GetOperation => "execute",
            Call::ListWorkers | Call::InvalidateActionResults => "admin",
            Call::WorkerSession => "worker",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// On the instance the call names.
    Instance,
    /// On some instance.
    Anywhere,
    /// On every instance (a grant for `*`).
    Everywhere,
}

/// What a caller holds, by scope.
struct Held<'a> {
    here: &'a [&'a str],
    anywhere: &'a [&'a str],
    everywhere: &'a [&'a str],
}

impl<'a> Held<'a> {
    /// The same permissions on every instance.
    fn everywhere(permissions: &'a [&'a str]) -> Held<'a> {
        Held {
            here: permissions,
            anywhere: permissions,
            everywhere: permissions,
        }
    }

    fn may(&self, call: Call) -> bool {
        let held = match call.scope() {
            Scope::Instance => self.here,
            Scope::Anywhere => self.anywhere,
            Scope::Everywhere => self.everywhere,
        };
        held.contains(&call.permission())
    }
}

fn code_of<T>(result: Result<T, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// Makes each call as the holder of `credentials` (on `instance`) and returns what
/// the server answered.
async fn probe(
    farm: &Farm,
    credentials: &Credentials,
    instance: &str,
    who: &str,
) -> HashMap<Call, (Code, String)> {
    let remote = Remote::connect_with(&farm.url, instance, credentials)
        .await
        .unwrap_or_else(|e| panic!("{who} cannot connect: {e}"));
    let blob = Bytes::from(format!("a blob written by {who} {}", uuid::Uuid::new_v4()));
    let digest = Digest::of(&blob);
    let missing = Digest::of(format!("never uploaded {}", uuid::Uuid::new_v4()).as_bytes());
    let instance = instance.to_owned();
    let mut answers = HashMap::new();
    for call in Call::ALL {
        let answer = match call {
            Call::FindMissingBlobs => code_of(
                remote
                    .cas()
                    .find_missing_blobs(FindMissingBlobsRequest {
                        instance_name: instance.clone(),
                        blob_digests: vec![missing.to_proto()],
                        digest_function: 0,
                    })
                    .await,
            ),
            Call::BatchReadBlobs => code_of(
                remote
                    .cas()
                    .batch_read_blobs(BatchReadBlobsRequest {
                        instance_name: instance.clone(),
                        digests: vec![missing.to_proto()],
                        ..Default::default()
                    })
                    .await,
            ),
            Call::GetTree => {
                let answer = remote
                    .cas()
                    .get_tree(GetTreeRequest {
                        instance_name: instance.clone(),
                        root_digest: Some(missing.to_proto()),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(stream) => code_of(
                        stream
                            .into_inner()
                            .next()
                            .await
                            .unwrap_or(Ok(Default::default())),
                    ),
                    Err(status) => code_of::<()>(Err(status)),
                }
            }
            Call::Read => {
                let answer = remote
                    .bytestream()
                    .read(ReadRequest {
                        resource_name: format!(
                            "{instance}/blobs/{}/{}",
                            missing.hash_hex(),
                            missing.size()
                        ),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(stream) => code_of(
                        stream
                            .into_inner()
                            .next()
                            .await
                            .unwrap_or(Ok(Default::default())),
                    ),
                    Err(status) => code_of::<()>(Err(status)),
                }
            }
            Call::BatchUpdateBlobs => code_of(
                remote
                    .cas()
                    .batch_update_blobs(BatchUpdateBlobsRequest {
                        instance_name: instance.clone(),
                        requests: vec![batch_update_blobs_request::Request {
                            digest: Some(digest.to_proto()),
                            data: blob.to_vec(),
                            compressor: 0,
                        }],
                        ..Default::default()
                    })
                    .await,
            ),
            Call::Write => {
                let request = WriteRequest {
                    resource_name: format!(
                        "{instance}/uploads/{}/blobs/{}/{}",
                        uuid::Uuid::new_v4(),
                        digest.hash_hex(),
                        digest.size()
                    ),
                    write_offset: 0,
                    finish_write: true,
                    data: blob.to_vec(),
                };
                code_of(
                    remote
                        .bytestream()
                        .write(futures::stream::iter([request]))
                        .await,
                )
            }
            Call::QueryWriteStatus => {
                // NOT_FOUND (no such upload) is an answer; only a refusal is not.
                code_of(
                    remote
                        .bytestream()
                        .query_write_status(QueryWriteStatusRequest {
                            resource_name: format!(
                                "{instance}/uploads/{}/blobs/{}/{}",
                                uuid::Uuid::new_v4(),
                                missing.hash_hex(),
                                missing.size()
                            ),
                        })
                        .await,
                )
            }
            Call::GetActionResult => code_of(
                remote
                    .action_cache()
                    .get_action_result(GetActionResultRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(missing.to_proto()),
                        ..Default::default()
                    })
                    .await,
            ),
            Call::UpdateActionResult => code_of(
                remote
                    .action_cache()
                    .update_action_result(UpdateActionResultRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(missing.to_proto()),
                        action_result: Some(ActionResult::default()),
                        ..Default::default()
                    })
                    .await,
            ),
            Call::Execute => {
                let answer = remote
                    .execution()
                    .execute(ExecuteRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(missing.to_proto()),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(stream) => code_of(stream.into_inner().next().await.unwrap()),
                    Err(status) => code_of::<()>(Err(status)),
                }
            }
            Call::WaitExecution => {
                let answer = remote
                    .execution()
                    .wait_execution(WaitExecutionRequest {
                        name: format!("operations/{}", uuid::Uuid::new_v4()),
                    })
                    .await;
                code_of(answer)
            }
            Call::GetOperation => code_of(
                OperationsClient::new(remote.channel())
                    .get_operation(GetOperationRequest {
                        name: format!("operations/{}", uuid::Uuid::new_v4()),
                    })
                    .await,
            ),
            Call::ListWorkers => code_of(
                AdminClient::new(remote.channel())
                    .list_workers(ListWorkersRequest {})
                    .await,
            ),
            Call::InvalidateActionResults => code_of(
                AdminClient::new(remote.channel())
                    .invalidate_action_results(InvalidateActionResultsRequest {
                        target: Some(Target::Action(ByAction {
                            instance_name: instance.clone(),
                            action_digest: missing.to_string(),
                        })),
                    })
                    .await,
            ),
            Call::WorkerSession => {
                let name = format!("probe-{}", uuid::Uuid::new_v4().simple());
                session(farm, credentials, &name)
                    .await
                    .map(|_| ())
                    .map_or_else(
                        |status| (status.code(), status.message().to_owned()),
                        |()| (Code::Ok, String::new()),
                    )
            }
        };
        answers.insert(call, answer);
    }
    answers
}

/// Checks that `answers` grant exactly what `held` holds: every call it allows
/// answered (anything but a refusal), every other call refused with
/// PERMISSION_DENIED naming the permission (and the instance, for calls on one),
/// never echoing `secret`.
fn assert_grants(
    who: &str,
    answers: &HashMap<Call, (Code, String)>,
    held: Held<'_>,
    instance: &str,
    secret: &str,
) {
    for call in Call::ALL {
        let (code, message) = &answers[&call];
        if held.may(call) {
            assert!(
                !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
                "{who}: {call:?} needs {} and should be allowed: {code:?} {message}",
                call.permission()
            );
        } else {
            assert_eq!(
                *code,
                Code::PermissionDenied,
                "{who}: {call:?} needs {}: {message}",
                call.permission()
            );
            assert!(
                message.contains(call.permission()),
                "{who}: {call:?}: the refusal does not name {}: {message}",
                call.permission()
            );
            if call.scope() == Scope::Instance {
                assert!(
                    message.contains(&format!("{instance:?}")),
                    "{who}: {call:?}: the refusal does not name the instance: {message}"
                );
            }
        }
        assert!(
            secret.is_empty() || !message.contains(secret),
            "{who}: {call:?} echoed a credential"
        );
    }
}

/// Opens a worker session named `name` on the farm's worker listener and waits for
/// the scheduler's answer: the session (with its sender and what arrives), or the
/// refusal.
async fn session(
    farm: &Farm,
    credentials: &Credentials,
    name: &str,
) -> Result<
    (
        mpsc::Sender<wire::WorkerMessage>,
        tonic::Streaming<wire::SchedulerMessage>,
    ),
    tonic::Status,
> {
    let remote = match Remote::connect_with(&farm.worker_url, "", credentials).await {
        Ok(remote) => remote,
        Err(paddock_client::ClientError::Rpc(status)) => return Err(status),
        Err(e) => panic!("connecting to the worker listener: {e}"),
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(wire::WorkerMessage {
        message: Some(wire::worker_message::Message::Register(wire::Register {
            name: name.to_owned(),
            properties: vec![wire::Property {
                name: "OSFamily".into(),
                value: "Linux".into(),
            }],
            capacity: 4,
        })),
    })
    .await
    .unwrap();
    let mut inbound = wire::scheduler_client::SchedulerClient::new(remote.channel())
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(wire::SchedulerMessage {
            message: Some(wire::scheduler_message::Message::Registered(_)),
        }) => Ok((tx, inbound)),
        other => panic!("a session began with {other:?}"),
    }
}

// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn each_permission_is_granted_and_refused_on_every_service_for_tokens_jwts_and_certificates()
{
    let pki = Pki::new();
    let (eddsa, jwks) = eddsa_key();
    std::fs::write(pki.path("jwt.secret"), JWT_SECRET).unwrap();
    std::fs::write(pki.path("jwks.json"), jwks).unwrap();
    let mut config = pki.tls_section();
    let mut tokens = HashMap::new();
    for permission in PERMISSIONS {
        let name = format!("only-{permission}");
        tokens.insert(permission, pki.token(&name));
        config += &pki.token_section(&name, &[permission], &["*"]);
        pki.client(&format!("cert-{permission}"));
        config += &format!(
            "[[auth.certificates]]\nsubject = \"CN=cert-{permission}\"\npermissions = [{permission:?}]\n"
        );
    }
    let team = pki.token("team");
    config += &pki.token_section("team", &PERMISSIONS, &["team-*"]);
    config += &format!(
        "[auth.jwt]\nsecret_file = {:?}\njwks_file = {:?}\nissuer = {JWT_ISSUER:?}\naudience = {JWT_AUDIENCE:?}\n",
        pki.path("jwt.secret"),
        pki.path("jwks.json")
    );
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    assert!(farm.url.starts_with("grpcs://"), "{}", farm.url);
    assert!(
        farm.worker_url.starts_with("grpcs://"),
        "{}",
        farm.worker_url
    );

    for permission in PERMISSIONS {
        let instance = "main";
        let token = &tokens[permission];
        // On the workers' listener a worker also reads and writes the CAS; on the
        // clients', where these calls go, it holds only what it was granted.
        let only = [permission];
        let answers = probe(&farm, &pki.with_token(token), instance, permission).await;
        assert_grants(
            &format!("token with {permission}"),
            &answers,
            Held::everywhere(&only),
            instance,
            token,
        );

        let answers = probe(
            &farm,
            &pki.with_certificate(&format!("cert-{permission}")),
            instance,
            permission,
        )
        .await;
        assert_grants(
            &format!("certificate with {permission}"),
            &answers,
            Held::everywhere(&only),
            instance,
            "",
        );

        let token = jwt(
            JWT_SECRET,
            &format!("jwt-{permission}"),
            serde_json::json!({ "paddock_permissions": [permission] }),
        );
        let answers = probe(&farm, &pki.with_token(&token), instance, permission).await;
        assert_grants(
            &format!("HS256 JWT with {permission}"),
            &answers,
            Held::everywhere(&only),
            instance,
            &token,
        );
    }

    // Permissions hold on the instances their patterns match, and nowhere else; the
    // fleet as a whole needs a grant on every instance.
    let team_held = |here| Held {
        here,
        anywhere: &PERMISSIONS,
        everywhere: &[],
    };
    let answers = probe(&farm, &pki.with_token(&team), "team-a", "team").await;
    assert_grants(
        "team token on team-a",
        &answers,
        team_held(&PERMISSIONS),
        "team-a",
        &team,
    );
    let answers = probe(&farm, &pki.with_token(&team), "main", "team").await;
    assert_grants(
        "team token on main",
        &answers,
        team_held(&[]),
        "main",
        &team,
    );
    let scoped = jwt(
        JWT_SECRET,
        "jwt-scoped",
        serde_json::json!({ "paddock_permissions": ["cas.read", "ac.read:release-*"], "paddock_instances": ["dev"] }),
    );
    let both = ["cas.read", "ac.read"];
    let answers = probe(&farm, &pki.with_token(&scoped), "dev", "scoped").await;
    let held = Held {
        here: &["cas.read"],
        anywhere: &both,
        everywhere: &[],
    };
    assert_grants("scoped JWT on dev", &answers, held, "dev", &scoped);
    let answers = probe(&farm, &pki.with_token(&scoped), "release-1", "scoped").await;
    let held = Held {
        here: &["ac.read"],
        anywhere: &both,
        everywhere: &[],
    };
    assert_grants(
        "scoped JWT on release-1",
        &answers,
        held,
        "release-1",
        &scoped,
    );

    // EdDSA, with the key from the JWKS.
    let token = eddsa_jwt(&eddsa, "jwt-eddsa", &["ac.read", "execute"]);
    let answers = probe(&farm, &pki.with_token(&token), "main", "eddsa").await;
    let held = Held::everywhere(&["ac.read", "execute"]);
    assert_grants("EdDSA JWT", &answers, held, "main", &token);

    // GetCapabilities answers every caller, for that caller.
    for (token, update, exec) in [
        (&tokens["ac.write"], true, false),
        (&tokens["ac.read"], false, false),
        (&tokens["execute"], false, true),
    ] {
        let remote = Remote::connect_with(&farm.url, "main", &pki.with_token(token))
            .await
            .unwrap();
        let caps = CapabilitiesClient::new(remote.channel())
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: "main".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let cache = caps.cache_capabilities.unwrap();
        assert_eq!(
            cache
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled,
            update
        );
        assert_eq!(caps.execution_capabilities.unwrap().exec_enabled, exec);
    }

    // Every refusal was logged with who, what and where, and counted; no credential
    // reached the log.
    let log = farm.log();
    assert!(log.contains("refused: denied"), "{log}");
    assert!(
        log.contains("only-cas.read") && log.contains("ContentAddressableStorage/BatchUpdateBlobs")
    );
    for token in tokens.values().chain([&team]) {
        assert!(!log.contains(token.as_str()), "a token reached the log");
    }
    let metrics = https_get(&farm.metrics_url, &pki.path("ca.pem"));
    assert!(
        metrics.contains("paddock_auth_refusals_total{kind=\"denied\""),
        "{metrics}"
    );
}

/// GET over HTTPS, trusting `ca` (python3's ssl module: the tests' machine has it).
fn https_get(url: &str, ca: &Path) -> String {
    let script = "import ssl, sys, urllib.request\n\
                  ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
                  print(urllib.request.urlopen(sys.argv[1], context=ctx, timeout=10).read().decode())\n";
    let output = Command::new("python3")
        .args(["-c", script, url])
        .arg(ca)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_and_bad_credentials_are_unauthenticated_and_never_echoed() {
    let pki = Pki::new();
    std::fs::write(pki.path("jwt.secret"), JWT_SECRET).unwrap();
    let good = pki.token("good");
    let mut config = pki.tls_section();
    config += &pki.token_section("good", &["cas.read"], &["*"]);
    config += "[[auth.certificates]]\nsubject = \"CN=known\"\npermissions = [\"cas.read\"]\n";
    config += &format!(
        "[auth.jwt]\nsecret_file = {:?}\nissuer = {JWT_ISSUER:?}\naudience = {JWT_AUDIENCE:?}\n",
        pki.path("jwt.secret")
    );
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let capabilities = |credentials: Credentials| {
        let url = farm.url.clone();
        async move {
            let channel = paddock_client::endpoint(&url, &credentials)
                .unwrap()
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            let transport =
                paddock_client::Transport::new(channel, credentials.token.as_deref()).unwrap();
            Ok::<_, String>(code_of(
                CapabilitiesClient::new(transport)
                    .get_capabilities(GetCapabilitiesRequest::default())
                    .await,
            ))
        }
    };
    assert_eq!(
        capabilities(pki.with_token(&good)).await.unwrap().0,
        Code::Ok
    );

    let expired = jwt(
        JWT_SECRET,
        "late",
        serde_json::json!({ "exp": unix_now() - 3600 }),
    );
    let wrong_signature = jwt(b"another secret entirely", "forger", serde_json::json!({}));
    let wrong_audience = jwt(
        JWT_SECRET,
        "lost",
        serde_json::json!({ "aud": "someone-else" }),
    );
    let wrong_issuer = jwt(
        JWT_SECRET,
        "lost",
        serde_json::json!({ "iss": "https://evil.test" }),
    );
    let no_expiry = {
        let claims = serde_json::json!({"sub": "forever", "iss": JWT_ISSUER, "aud": JWT_AUDIENCE});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
        )
        .unwrap()
    };
    let unknown = format!("{good}-but-not-quite");
    pki.client("stranger");
    let cases: Vec<(&str, Credentials, &str)> = vec![
        ("no credentials", pki.trusting(), "no credentials"),
        (
            "an unknown token",
            pki.with_token(&unknown),
            "not one this server knows",
        ),
        ("an expired JWT", pki.with_token(&expired), "expired"),
        (
            "a wrongly signed JWT",
            pki.with_token(&wrong_signature),
            "signature",
        ),
        (
            "a JWT for another audience",
            pki.with_token(&wrong_audience),
            "audience",
        ),
        (
            "a JWT from another issuer",
            pki.with_token(&wrong_issuer),
            "issuer",
        ),
        ("a JWT without expiry", pki.with_token(&no_expiry), "exp"),
        (
            "a certificate no rule names",
            pki.with_certificate("stranger"),
            "not one this server knows",
        ),
    ];
    for (what, credentials, reason) in cases {
        let secret = credentials.token.clone().unwrap_or_default();
        let (code, message) = capabilities(credentials).await.unwrap();
        assert_eq!(code, Code::Unauthenticated, "{what}: {message}");
        assert!(message.contains(reason), "{what}: {message}");
        assert!(
            secret.is_empty() || !message.contains(&secret),
            "{what}: echoed"
        );
    }
    // A certificate from a CA the server does not trust fails the handshake.
    let other = Authority::new("Someone else's CA");
    let (cert, key) = other.sign("known", &[], ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(pki.path("forged.pem"), cert).unwrap();
    std::fs::write(pki.path("forged.key"), key).unwrap();
    let forged = Credentials {
        tls_cert: Some(pki.path("forged.pem")),
        tls_key: Some(pki.path("forged.key")),
        ..pki.trusting()
    };
    match capabilities(forged).await {
        Err(_) => {}
        Ok((code, message)) => assert_ne!(
            code,
            Code::Ok,
            "a forged certificate was accepted: {message}"
        ),
    }
    // Plain text on a TLS port gets nowhere.
    let plain = farm.url.replace("grpcs://", "grpc://");
    assert!(Remote::connect(&plain, "").await.is_err());

    let log = farm.log();
    assert!(log.contains("refused: unauthenticated"), "{log}");
    for secret in [&good, &unknown, &expired, &wrong_signature, &wrong_audience] {
        assert!(
            !log.contains(secret.as_str()),
            "a credential reached the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_are_bound_to_their_identities_and_results_name_them() {
    let pki = Pki::new();
    let builders = pki.token("builders");
    let rogue = pki.token("rogue");
    let ci = pki.token("ci");
    let admin = pki.token("admin");
    let mut config = pki.tls_section();
    config += &pki.token_section("builders", &["worker"], &["*"]);
    config += &pki.token_section("rogue", &["worker"], &["*"]);
    config += &pki.token_section(
        "ci",
        &["cas.read", "cas.write", "ac.read", "execute"],
        &["*"],
    );
    config += &pki.token_section("admin", &["admin"], &["*"]);
    config += "[[auth.certificates]]\nsubject = \"CN=builder-7\"\npermissions = [\"worker\"]\n";
    pki.client("builder-7");
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);

    // Without credentials, or without the worker permission: no session.
    let refused = session(&farm, &pki.trusting(), "anyone").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = session(&farm, &pki.with_token(&ci), "ci-worker")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("worker"), "{refused:?}");

    // The same identity again replaces its session; another identity is refused.
    let (_first_tx, mut first) = session(&farm, &pki.with_token(&builders), "twin")
        .await
        .unwrap();
    let (_second_tx, _second) = session(&farm, &pki.with_token(&builders), "twin")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first.message().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the first session of twin did not end");
    let impostor = session(&farm, &pki.with_token(&rogue), "twin")
        .await
        .unwrap_err();
    assert_eq!(impostor.code(), Code::PermissionDenied, "{impostor:?}");
    assert!(
        impostor.message().contains("another identity"),
        "{impostor:?}"
    );
    // A certificate's identity works the same way.
    let (_cert_tx, _cert) = session(&farm, &pki.with_certificate("builder-7"), "builder-7")
        .await
        .unwrap();
    let impostor = session(&farm, &pki.with_token(&builders), "builder-7")
        .await
        .unwrap_err();
    assert_eq!(impostor.code(), Code::PermissionDenied, "{impostor:?}");

    let admin_remote = Remote::connect_with(&farm.url, "", &pki.with_token(&admin))
        .await
        .unwrap();
    let listed = AdminClient::new(admin_remote.channel())
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let twin = listed.iter().find(|w| w.name == "twin").unwrap();
    assert_eq!(twin.identity, "builders");
    let seven = listed.iter().find(|w| w.name == "builder-7").unwrap();
    assert_eq!(seven.identity, "builder-7");
    drop((_second_tx, _second, _cert_tx, _cert));
    wait_for_workers(&admin_remote, |w| !w.iter().any(|w| w.connected)).await;

    // A worker that claims another's name in its result: the result names it.
    let (tx, mut inbound) = session(&farm, &pki.with_token(&rogue), "rogue-1")
        .await
        .unwrap();
    let worker = tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            if let Some(wire::scheduler_message::Message::Assignment(assignment)) = message.message
            {
                let forged = ActionResult {
                    exit_code: 0,
                    execution_metadata: Some(ExecutedActionMetadata {
                        worker: "twin".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let finished = wire::Finished {
                    assignment_id: assignment.assignment_id,
                    outcome: Some(wire::finished::Outcome::Completed(wire::Completed {
                        action_result: forged.encode_to_vec(),
                        timed_out: false,
                        message: String::new(),
                    })),
                };
                let message = wire::worker_message::Message::Finished(finished);
                if tx
                    .send(wire::WorkerMessage {
                        message: Some(message),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    wait_for_workers(&admin_remote, |w| {
        w.iter().any(|w| w.name == "rogue-1" && w.connected)
    })
    .await;
    let client = Remote::connect_with(&farm.url, "", &pki.with_token(&ci))
        .await
        .unwrap();
    let spec = ExecSpec {
        arguments: vec!["/bin/true".into(), uuid::Uuid::new_v4().to_string()],
        platform: vec![("OSFamily".into(), "Linux".into())],
        ..Default::default()
    };
    let response = execute(&client, &spec).await.unwrap();
    let result = response.result.expect("a result");
    assert_eq!(result.execution_metadata.unwrap().worker, "rogue-1");
    // And so does what the ActionCache keeps.
    let prepared = prepare(&spec).await.unwrap();
    let cached = client
        .action_cache()
        .get_action_result(GetActionResultRequest {
            action_digest: Some(prepared.digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.execution_metadata.unwrap().worker, "rogue-1");
    worker.abort();

    // A real worker with a token takes work over TLS.
    std::fs::write(pki.path("builders.token"), &builders).unwrap();
    let _real = Worker::start(
        &farm.worker_url,
        "real-builder",
        &[
            "--runner",
            "host",
            "--capacity",
            "1",
            "--tls-ca",
            pki.path("ca.pem").to_str().unwrap(),
            "--token-file",
            pki.path("builders.token").to_str().unwrap(),
        ],
    );
    let spec = ExecSpec {
        arguments: vec![
            "sh".into(),
            "-c".into(),
            format!("echo real {}", uuid::Uuid::new_v4()),
        ],
        environment: vec![("PATH".into(), "/usr/bin:/bin".into())],
        platform: vec![("OSFamily".into(), "Linux".into())],
        ..Default::default()
    };
    // The rogue's session is gone with its task; the real worker runs this.
    wait_for_workers(&admin_remote, |w| {
        w.iter().any(|w| w.name == "real-builder" && w.connected)
            && !w.iter().any(|w| w.name == "rogue-1" && w.connected)
    })
    .await;
    let response = tokio::time::timeout(Duration::from_secs(60), execute(&client, &spec))
        .await
        .expect("the real worker ran the action")
        .unwrap();
    assert_eq!(
        response.result.unwrap().execution_metadata.unwrap().worker,
        "real-builder"
    );
}

/// Waits until the fleet, as an admin sees it, satisfies `done`.
async fn wait_for_workers(
    admin: &Remote,
    done: impl Fn(&[paddock_proto::admin::v1::Worker]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = AdminClient::new(admin.channel())
            .list_workers(ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if done(&listed) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet never got there: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_does_not_trust_the_scheduler_refuses_to_connect() {
    let pki = Pki::new();
    pki.token("workers");
    let mut config = pki.tls_section();
    config += &pki.token_section("workers", &["worker", "admin"], &["*"]);
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let other = Authority::new("Not the scheduler's CA");
    std::fs::write(pki.path("other-ca.pem"), &other.pem).unwrap();
    let token_file = pki.path("workers.token");
    let args = |ca: &Path| -> Vec<String> {
        ["--runner", "host", "--capacity", "1", "--tls-ca"]
            .iter()
            .map(|s| s.to_string())
            .chain([
                ca.display().to_string(),
                "--token-file".into(),
                token_file.display().to_string(),
            ])
            .collect()
    };
    let distrustful_args = args(&pki.path("other-ca.pem"));
    let distrustful = Worker::start(
        &farm.worker_url,
        "distrustful",
        &distrustful_args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let trusting_args = args(&pki.path("ca.pem"));
    let _trusting = Worker::start(
        &farm.worker_url,
        "trusting",
        &trusting_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    let admin = Remote::connect_with(&farm.url, "", &pki.with_token(token.trim()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = AdminClient::new(admin.channel())
            .list_workers(ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        if listed.iter().any(|w| w.name == "trusting" && w.connected) {
            assert!(
                !listed.iter().any(|w| w.name == "distrustful"),
                "{listed:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trusting worker never connected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the distrustful one time for a few attempts: it never gets in, and says why.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = AdminClient::new(admin.channel())
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(
        !listed.iter().any(|w| w.name == "distrustful"),
        "{listed:?}"
    );
    let log = distrustful.log();
    assert!(
        log.contains("scheduler connection failed") && log.to_lowercase().contains("certificate"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_without_a_restart() {
    let pki = Pki::new();
    let token = pki.token("ci");
    let mut config = pki.tls_section();
    config += &pki.token_section("ci", &["cas.read"], &["*"]);
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let next = Authority::new("Next year's CA");
    std::fs::write(pki.path("next-ca.pem"), &next.pem).unwrap();
    let trusting_next = Credentials {
        tls_ca: Some(pki.path("next-ca.pem")),
        token: Some(token.clone()),
        ..Default::default()
    };
    assert!(Remote::connect_with(&farm.url, "", &trusting_next)
        .await
        .is_err());
    assert!(Remote::connect_with(&farm.url, "", &pki.with_token(&token))
        .await
        .is_ok());

    // The new certificate and key, each written whole (as a deployment tool would).
    let (cert, key) = next.sign(
        "paddock-server",
        &["127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    for (name, text) in [("server.key", key), ("server.pem", cert)] {
        let tmp = pki.path(&format!("{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, pki.path(name)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Remote::connect_with(&farm.url, "", &trusting_next)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served:\n{}",
            farm.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(Remote::connect_with(&farm.url, "", &pki.with_token(&token))
        .await
        .is_err());
    // The worker listener serves the new certificate as well.
    let worker_side = Remote::connect_with(&farm.worker_url, "", &trusting_next).await;
    assert!(worker_side.is_ok());
    assert!(
        farm.log().contains("reloaded the TLS certificate"),
        "{}",
        farm.log()
    );
}

/// The resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Starts a ByteStream upload of `blob`, sends `sent` bytes of it, and ends the
/// stream without finishing: an upload that broke and waits to be resumed.
async fn break_upload(
    remote: &Remote,
    blob: &Bytes,
    sent: usize,
) -> (String, Result<i64, tonic::Status>) {
    let digest = Digest::of(blob);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        digest.hash_hex(),
        digest.size()
    );
    let chunks: Vec<WriteRequest> = blob[..sent]
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, chunk)| WriteRequest {
            resource_name: if i == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: (i << 20) as i64,
            finish_write: false,
            data: chunk.to_vec(),
        })
        .collect();
    let answer = remote
        .bytestream()
        .write(futures::stream::iter(chunks))
        .await
        .map(|r| r.into_inner().committed_size);
    (resource, answer)
}

fn random_blob(len: usize) -> Bytes {
    use rand::RngCore;
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    Bytes::from(data)
}

fn exhausted(answer: Result<impl std::fmt::Debug, tonic::Status>, limit: &str) {
    let status = answer.expect_err("the quota should have been reached");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(limit), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_quota_is_answered_clearly_and_memory_and_disk_stay_bounded() {
    let pki = Pki::new();
    let alice = pki.token("alice");
    let bob = pki.token("bob");
    let everything = ["cas.read", "cas.write", "ac.read", "ac.write", "execute"];
    let mut config = pki.tls_section();
    config += &pki.token_section("alice", &everything, &["*"]);
    config += &pki.token_section("bob", &everything, &["*"]);
    config += "[storage]\nmax_size = \"64MiB\"\n";
    config += "[auth.quotas]\nmax_executions = 3\nmax_parked_uploads = 2\nmax_parked_bytes = \"3MiB\"\nmax_upload_bytes = \"8MiB\"\n";
    // No workers: executions stay queued.
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let alice_remote = Remote::connect_with(&farm.url, "", &pki.with_token(&alice))
        .await
        .unwrap();
    let bob_remote = Remote::connect_with(&farm.url, "", &pki.with_token(&bob))
        .await
        .unwrap();

    // Executions queued or running, per identity.
    let mut held = Vec::new();
    let execute_new = |remote: Remote, priority: i32| async move {
        let spec = ExecSpec {
            arguments: vec!["/bin/true".into(), uuid::Uuid::new_v4().to_string()],
            ..Default::default()
        };
        let prepared = prepare(&spec).await.unwrap();
        remote.upload_missing(prepared.blobs).await.unwrap();
        let mut stream = remote
            .execution()
            .execute(ExecuteRequest {
                action_digest: Some(prepared.digest.to_proto()),
                execution_policy: Some(ExecutionPolicy { priority }),
                ..Default::default()
            })
            .await?
            .into_inner();
        let first = stream.next().await.unwrap()?;
        assert!(!first.done);
        Ok::<_, tonic::Status>(stream)
    };
    // Priorities beyond the advertised range are clamped, not refused.
    for priority in [i32::MAX, i32::MIN, 7] {
        held.push(execute_new(alice_remote.clone(), priority).await.unwrap());
    }
    exhausted(execute_new(alice_remote.clone(), 0).await, "max_executions");
    let bobs = execute_new(bob_remote.clone(), 0).await.unwrap();
    drop(bobs);

    // Parked uploads, by count...
    let blobs = [random_blob(4 << 20), random_blob(4 << 20)];
    let mut parked = Vec::new();
    for blob in &blobs {
        let (resource, answer) = break_upload(&alice_remote, blob, 1 << 20).await;
        assert_eq!(answer.unwrap(), 1 << 20);
        parked.push(resource);
    }
    let (_, answer) = break_upload(&alice_remote, &random_blob(1 << 20), 1000).await;
    exhausted(answer, "max_parked_uploads");
    // ...which their owner resumes from where they broke (no one else can)...
    for (resource, blob) in parked.iter().zip(&blobs) {
        let resume = || WriteRequest {
            resource_name: resource.clone(),
            write_offset: 1 << 20,
            finish_write: true,
            data: blob[1 << 20..].to_vec(),
        };
        let stolen = bob_remote
            .bytestream()
            .write(futures::stream::iter([resume()]))
            .await;
        assert_eq!(stolen.unwrap_err().code(), Code::InvalidArgument);
        alice_remote
            .bytestream()
            .write(futures::stream::iter([resume()]))
            .await
            .unwrap();
        assert!(alice_remote
            .find_missing(&[Digest::of(blob)])
            .await
            .unwrap()
            .is_empty());
    }
    // ...and by bytes: 3 MiB parked reach the bound.
    let (_, answer) = break_upload(&alice_remote, &random_blob(4 << 20), 3 << 20).await;
    assert_eq!(answer.unwrap(), 3 << 20);
    let (_, answer) = break_upload(&alice_remote, &random_blob(1 << 20), 1000).await;
    exhausted(answer, "max_parked_bytes");
    // Bob's uploads are his own, and a single upload stops at the bound of bytes in
    // flight.
    let big = random_blob(10 << 20);
    let digest = Digest::of(&big);
    exhausted(
        bob_remote
            .write_blob(&digest, big.clone())
            .await
            .map_err(|e| match e {
                paddock_client::ClientError::Rpc(status) => status,
                other => panic!("{other}"),
            }),
        "max_upload_bytes",
    );

    // A thousand-file ActionResult of about a megabyte, asked for 400 times.
    let content = Bytes::from_static(b"the same content in every file");
    let content_digest = Digest::of(&content);
    alice_remote
        .upload(vec![(content_digest, content)])
        .await
        .unwrap();
    let spec = ExecSpec {
        arguments: vec!["/bin/true".into(), uuid::Uuid::new_v4().to_string()],
        ..Default::default()
    };
    let prepared = prepare(&spec).await.unwrap();
    let action_digest = prepared.digest;
    alice_remote.upload_missing(prepared.blobs).await.unwrap();
    let result = ActionResult {
        output_files: (0..7000)
            .map(|i| OutputFile {
                path: format!(
                    "out/a/rather/long/directory/name/to/make/the/result/large/file-{i:06}.o"
                ),
                digest: Some(content_digest.to_proto()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let result_size = result.encoded_len();
    assert!(result_size > 700_000, "{result_size}");
    alice_remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action_digest.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .unwrap();
    let hit = |remote: Remote| async move {
        let mut stream = remote
            .execution()
            .execute(ExecuteRequest {
                action_digest: Some(action_digest.to_proto()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let op = stream.next().await.unwrap().unwrap();
        assert!(op.done);
        op.name
    };
    // Warm up (allocator arenas, connection buffers), then measure.
    for _ in 0..20 {
        hit(alice_remote.clone()).await;
    }
    let before = rss(farm.pid());
    let mut names = Vec::new();
    for _ in 0..400 {
        names.push(hit(alice_remote.clone()).await);
    }
    let after = rss(farm.pid());
    let grown = after.saturating_sub(before);
    eprintln!(
        "400 cache hits of a {} KiB result: the server grew by {} KiB",
        result_size >> 10,
        grown >> 10
    );
    assert!(
        grown < 100 << 20,
        "400 cache hits grew the server by {} MiB ({} → {} MiB)",
        grown >> 20,
        before >> 20,
        after >> 20
    );
    // Every one of those operations can still be looked up, whole.
    let op = OperationsClient::new(alice_remote.channel())
        .get_operation(GetOperationRequest {
            name: names[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(op.done);
    let Some(paddock_reapi::proto::longrunning::operation::Result::Response(any)) = op.result
    else {
        panic!("no response");
    };
    let response = paddock_reapi::proto::re::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert!(response.cached_result);
    assert_eq!(response.result.unwrap().output_files.len(), 7000);
    // Someone else's operation is not theirs to see.
    let theirs = OperationsClient::new(bob_remote.channel())
        .get_operation(GetOperationRequest {
            name: names[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::NotFound);
    drop(held);
}

/// An upload that keeps moving: `sent` MiB of `blob` written and its stream open,
/// until the rest is asked for.
struct MovingUpload {
    blob: Bytes,
    resource: String,
    tx: mpsc::Sender<WriteRequest>,
    sent: usize,
    writing: tokio::task::JoinHandle<
        Result<tonic::Response<paddock_reapi::proto::bytestream::WriteResponse>, tonic::Status>,
    >,
}

impl MovingUpload {
    async fn start(remote: &Remote, blob: Bytes, sent_mib: usize) -> MovingUpload {
        let digest = Digest::of(&blob);
        let resource = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            digest.hash_hex(),
            digest.size()
        );
        let (tx, rx) = mpsc::channel::<WriteRequest>(64);
        let mut client = remote.bytestream();
        let writing = tokio::spawn(async move { client.write(ReceiverStream::new(rx)).await });
        let mut upload = MovingUpload {
            blob,
            resource,
            tx,
            sent: 0,
            writing,
        };
        upload.send(sent_mib).await;
        // Until the server has it all.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let committed = remote
                .bytestream()
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: upload.resource.clone(),
                })
                .await
                .map(|s| s.into_inner().committed_size)
                .unwrap_or(0);
            if committed >= (sent_mib << 20) as i64 {
                return upload;
            }
            assert!(Instant::now() < deadline, "the moving upload stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&mut self, mib: usize) {
        for _ in 0..mib {
            let at = self.sent << 20;
            let end = (at + (1 << 20)).min(self.blob.len());
            let request = WriteRequest {
                resource_name: if at == 0 {
                    self.resource.clone()
                } else {
                    String::new()
                },
                write_offset: at as i64,
                finish_write: end == self.blob.len(),
                data: self.blob[at..end].to_vec(),
            };
            self.tx.send(request).await.unwrap();
            self.sent += 1;
        }
    }

    async fn finish(mut self) -> i64 {
        let rest = (self.blob.len() >> 20) - self.sent;
        self.send(rest).await;
        self.writing
            .await
            .unwrap()
            .unwrap()
            .into_inner()
            .committed_size
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_under_way_count_against_the_store_bound() {
    let pki = Pki::new();
    let names = ["ci", "second", "third", "fourth"];
    let mut config = pki.tls_section();
    for name in names {
        pki.token(name);
        config += &pki.token_section(name, &["cas.read", "cas.write"], &["*"]);
    }
    // Each identity may hold half the store in uploads under way.
    config += "[storage]\nmax_size = \"12MiB\"\n";
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let mut remotes = Vec::new();
    for name in names {
        let token = std::fs::read_to_string(pki.path(&format!("{name}.token"))).unwrap();
        let remote = Remote::connect_with(&farm.url, "", &pki.with_token(token.trim()))
            .await
            .unwrap();
        remotes.push(remote);
    }
    let mib = |i: usize| i << 20;

    // One identity alone cannot take more than half.
    let (_, answer) = break_upload(&remotes[0], &random_blob(mib(8)), mib(8)).await;
    exhausted(answer, "max_upload_bytes");

    // Two uploads that keep moving hold 10 of the store's 12 MiB...
    let first = MovingUpload::start(&remotes[0], random_blob(mib(6)), 5).await;
    let second = MovingUpload::start(&remotes[1], random_blob(mib(6)), 5).await;
    // ...and a broken one 2 MiB more.
    let (parked, answer) = break_upload(&remotes[2], &random_blob(mib(4)), mib(2)).await;
    assert_eq!(answer.unwrap(), mib(2) as i64);
    // A fourth needs room: the broken one gives way, then the bound holds.
    let (_, answer) = break_upload(&remotes[3], &random_blob(mib(4)), mib(4)).await;
    exhausted(answer, "uploads under way");
    let gone = remotes[2]
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: parked,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(farm.log().contains("dropped a broken upload to make room"));
    let used = du(&farm.data_dir);
    assert!(
        used <= (mib(13)) as u64,
        "{used} bytes in the data directory"
    );

    // The moving uploads finish, whole.
    let (first_blob, second_blob) = (first.blob.clone(), second.blob.clone());
    assert_eq!(first.finish().await, mib(6) as i64);
    assert_eq!(second.finish().await, mib(6) as i64);
    assert_eq!(
        remotes[0]
            .read_blob(&Digest::of(&first_blob))
            .await
            .unwrap(),
        first_blob
    );
    assert_eq!(
        remotes[1]
            .read_blob(&Digest::of(&second_blob))
            .await
            .unwrap(),
        second_blob
    );
    let metrics = https_get(&farm.metrics_url, &pki.path("ca.pem"));
    assert!(
        metrics.contains("paddock_store_reserved_bytes"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_is_ended_and_kept_for_its_owner_to_resume() {
    let pki = Pki::new();
    let token = pki.token("ci");
    let mut config = pki.tls_section();
    config += &pki.token_section("ci", &["cas.read", "cas.write"], &["*"]);
    config += "[auth.quotas]\nupload_idle_timeout = \"1s\"\n";
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let remote = Remote::connect_with(&farm.url, "", &pki.with_token(&token))
        .await
        .unwrap();
    let stalled = MovingUpload::start(&remote, random_blob(3 << 20), 1).await;
    let answer = tokio::time::timeout(Duration::from_secs(20), stalled.writing)
        .await
        .expect("the server ended the stalled upload")
        .unwrap()
        .unwrap_err();
    assert_eq!(answer.code(), Code::DeadlineExceeded, "{answer:?}");
    assert!(
        answer.message().contains("upload_idle_timeout"),
        "{answer:?}"
    );
    // What arrived is kept: the client picks up where it stopped.
    let committed = remote
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: stalled.resource.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, 1 << 20);
    let rest = WriteRequest {
        resource_name: stalled.resource.clone(),
        write_offset: 1 << 20,
        finish_write: true,
        data: stalled.blob[1 << 20..].to_vec(),
    };
    remote
        .bytestream()
        .write(futures::stream::iter([rest]))
        .await
        .unwrap();
    assert_eq!(
        remote.read_blob(&Digest::of(&stalled.blob)).await.unwrap(),
        stalled.blob
    );
}

/// Bytes in files below `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += du(&entry.path());
        } else {
            total += meta.len();
        }
    }
    total
}

#[test]
fn a_public_address_without_auth_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(paddock_bin())
        .args([
            "up",
            "--listen",
            "0.0.0.0:0",
            "--runner",
            "host",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve 0.0.0.0:0 without authentication")
            && stderr.contains("[auth]")
            && stderr.contains("--insecure-allow-anonymous"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).is_empty());
    // Said explicitly, it serves.
    let farm = Farm::server("0.0.0.0:0", &["--insecure-allow-anonymous"]);
    assert!(farm.url.starts_with("grpc://0.0.0.0:"), "{}", farm.url);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_takes_tls_and_token_flags() {
    let pki = Pki::new();
    let ci = pki.token("ci");
    pki.token("admin");
    pki.token("workers");
    pki.client("laptop");
    let mut config = pki.tls_section();
    config += &pki.token_section(
        "ci",
        &["cas.read", "cas.write", "ac.read", "ac.write", "execute"],
        &["*"],
    );
    config += &pki.token_section("admin", &["admin"], &["*"]);
    config += &pki.token_section("workers", &["worker"], &["*"]);
    config += "[[auth.certificates]]\nsubject = \"CN=laptop\"\npermissions = [\"cas.read\", \"cas.write\", \"ac.read\", \"execute\"]\n";
    let farm = Farm::server("127.0.0.1:0", &["--config", &config_file(&config)]);
    let _worker = Worker::start(
        &farm.worker_url,
        "cli-worker",
        &[
            "--runner",
            "host",
            "--capacity",
            "1",
            "--tls-ca",
            pki.path("ca.pem").to_str().unwrap(),
            "--token-file",
            pki.path("workers.token").to_str().unwrap(),
        ],
    );
    let file = pki.path("payload.txt");
    std::fs::write(&file, format!("payload {}", uuid::Uuid::new_v4())).unwrap();
    let paddock = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(paddock_bin())
            .args(args)
            .env_remove("PADDOCK_TOKEN")
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let ca = pki.path("ca.pem").display().to_string();
    let ci_file = pki.path("ci.token").display().to_string();
    let put = ["cas", "put", "--remote", &farm.url, "--tls-ca", &ca];
    let file_arg = file.display().to_string();

    let (ok, out) = paddock(
        &[&put[..], &["--token-file", &ci_file, &file_arg]].concat(),
        &[],
    );
    assert!(ok, "{out}");
    let (ok, out) = paddock(
        &[&put[..], &[file_arg.as_str()]].concat(),
        &[("PADDOCK_TOKEN", &ci)],
    );
    assert!(ok, "{out}");
    let (ok, out) = paddock(&[&put[..], &[file_arg.as_str()]].concat(), &[]);
    assert!(
        !ok && out.contains("Unauthenticated") && out.contains("no credentials"),
        "{out}"
    );
    assert!(!out.contains(&ci));

    let cert = pki.path("laptop.pem").display().to_string();
    let key = pki.path("laptop.key").display().to_string();
    let (ok, out) = paddock(
        &[
            "exec",
            "--remote",
            &farm.url,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--platform",
            "OSFamily=Linux",
            "--env",
            "PATH=/usr/bin:/bin",
            "--",
            "echo",
            "hello from a certificate",
        ],
        &[],
    );
    assert!(ok && out.contains("hello from a certificate"), "{out}");

    let admin_file = pki.path("admin.token").display().to_string();
    let (ok, out) = paddock(
        &[
            "workers",
            "list",
            "--remote",
            &farm.url,
            "--tls-ca",
            &ca,
            "--token-file",
            &admin_file,
        ],
        &[],
    );
    assert!(ok && out.contains("cli-worker"), "{out}");
    let (ok, out) = paddock(
        &[
            "workers",
            "list",
            "--remote",
            &farm.url,
            "--tls-ca",
            &ca,
            "--token-file",
            &ci_file,
        ],
        &[],
    );
    assert!(
        !ok && out.contains("PermissionDenied") && out.contains("admin"),
        "{out}"
    );
    let (ok, out) = paddock(
        &[
            "cache",
            "invalidate",
            "--remote",
            &farm.url,
            "--tls-ca",
            &ca,
            "--token-file",
            &admin_file,
            "--action",
            &Digest::of(b"x").to_string(),
        ],
        &[],
    );
    assert!(ok && out.contains("removed 0"), "{out}");
    let (ok, out) = paddock(
        &[
            "bench",
            "cas",
            "--remote",
            &farm.url,
            "--tls-ca",
            &ca,
            "--token-file",
            &ci_file,
            "--blob-mib",
            "1",
            "--rounds",
            "1",
            "--small-blobs",
            "100",
        ],
        &[],
    );
    assert!(ok && out.contains("GetActionResult"), "{out}");
}
