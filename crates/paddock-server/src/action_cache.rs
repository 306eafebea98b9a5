//! ActionCache: cached ActionResults, per instance name.

use std::sync::Arc;

use bytes::Bytes;
use paddock_cas::{read_all, ActionKey};
use paddock_reapi::digest::check_digest_function;
use paddock_reapi::proto::re::{
    action_cache_server::ActionCache, ActionResult, GetActionResultRequest,
    UpdateActionResultRequest,
};
use paddock_reapi::{validate, Digest};
use tonic::{Request, Response, Status};

use paddock_config::Permission;

use crate::auth::authorize;
use crate::history::{asker, request_metadata};
use crate::{invalid, Storage};
use paddock_history::Outcome;

/// The most bytes inlined into one GetActionResult answer; REAPI lets servers inline
/// less than asked, and must when a message would grow too large.
const INLINE_BUDGET: u64 = 1 << 20;

pub struct ActionCacheService {
    storage: Storage,
}

impl ActionCacheService {
    pub fn new(storage: Storage) -> Self {
        ActionCacheService { storage }
    }
}

impl ActionCacheService {
    /// Stores contents that a client inlined into the CAS and refers to them by digest
    /// instead. Inlined contents are for answers, not for the cache (REAPI says clients
    /// should not send them and servers should not return them unasked), yet what is
    /// cached must stay equivalent to what was sent.
    async fn move_inlined_to_cas(&self, result: &mut ActionResult) -> Result<(), Status> {
        let cas = &self.storage.cas;
        let streams = [
            ("stdout", &mut result.stdout_raw, &mut result.stdout_digest),
            ("stderr", &mut result.stderr_raw, &mut result.stderr_digest),
        ];
        for (name, raw, digest) in streams {
            if raw.is_empty() {
                continue;
            }
            let actual = Digest::of(raw);
            match digest.as_ref() {
                Some(stated) if Digest::from_proto(Some(stated)).ok() != Some(actual) => {
                    return Err(invalid(format!("{name}_raw does not match {name}_digest")));
                }
                _ => *digest = Some(actual.to_proto()),
            }
            cas.put(&actual, Bytes::from(std::mem::take(raw))).await?;
        }
        for file in &mut result.output_files {
            if file.contents.is_empty() {
                continue;
            }
            let actual = Digest::of(&file.contents);
            if Digest::from_proto(file.digest.as_ref()).ok() != Some(actual) {
                return Err(invalid(format!(
                    "output file {}: its contents do not match its digest",
                    file.path
                )));
            }
            cas.put(&actual, Bytes::from(std::mem::take(&mut file.contents)))
                .await?;
        }
        Ok(())
    }
}

/// Fills in the contents a client asked to have inlined, within [`INLINE_BUDGET`].
pub(crate) async fn inline_outputs(
    storage: &Storage,
    result: &mut ActionResult,
    stdout: bool,
    stderr: bool,
    files: &[String],
) {
    let mut budget = INLINE_BUDGET;
    let mut fetch = |digest: Option<Digest>| {
        let fits = digest.is_some_and(|d| d.size() <= budget);
        if let (true, Some(d)) = (fits, digest) {
            budget -= d.size();
        }
        digest.filter(|_| fits)
    };
    let stdout_digest = stdout
        .then(|| {
            result
                .stdout_digest
                .as_ref()
                .and_then(|d| Digest::from_proto(Some(d)).ok())
        })
        .flatten();
    let stderr_digest = stderr
        .then(|| {
            result
                .stderr_digest
                .as_ref()
                .and_then(|d| Digest::from_proto(Some(d)).ok())
        })
        .flatten();
    if let Some(d) = fetch(stdout_digest) {
        if let Ok(Some(data)) = read_all(storage.cas.as_ref(), &d).await {
            result.stdout_raw = data.to_vec();
        }
    }
    if let Some(d) = fetch(stderr_digest) {
        if let Ok(Some(data)) = read_all(storage.cas.as_ref(), &d).await {
            result.stderr_raw = data.to_vec();
        }
    }
    for file in result.output_files.iter_mut() {
        if !files.contains(&file.path) {
            continue;
        }
        let digest = file
            .digest
            .as_ref()
            .and_then(|d| Digest::from_proto(Some(d)).ok());
        if let Some(d) = fetch(digest) {
            if let Ok(Some(data)) = read_all(storage.cas.as_ref(), &d).await {
                file.contents = data.to_vec();
            }
        }
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let caller = authorize(
            &request,
            Permission::AcRead,
            &request.get_ref().instance_name,
        )?;
        let sent = request_metadata(request.metadata());
        let request = request.into_inner();
        check_digest_function(request.digest_function).map_err(invalid)?;
        let action = Digest::from_proto(request.action_digest.as_ref())
            .map_err(|e| invalid(format!("action_digest: {e}")))?;
        let key = ActionKey {
            instance: request.instance_name,
            action,
        };
        let Some(mut result) = self.storage.action_cache.get(&key).await? else {
            metrics::counter!("paddock_action_cache_requests_total", "outcome" => "miss")
                .increment(1);
            return Err(Status::not_found(format!(
                "no cached result for action {action}"
            )));
        };
        metrics::counter!("paddock_action_cache_requests_total", "outcome" => "hit").increment(1);
        // Only clients' lookups are noted (they send RequestMetadata); workers' are not.
        if let Some(sent) = sent {
            let asker = asker(caller.name(), &key.instance, sent);
            let kept = Arc::new(result.clone());
            self.storage
                .history
                .action(&asker, action, Outcome::Cached, Some(kept));
        }
        inline_outputs(
            &self.storage,
            &mut result,
            request.inline_stdout,
            request.inline_stderr,
            &request.inline_output_files,
        )
        .await;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        authorize(
            &request,
            Permission::AcWrite,
            &request.get_ref().instance_name,
        )?;
        let request = request.into_inner();
        check_digest_function(request.digest_function).map_err(invalid)?;
        let action = Digest::from_proto(request.action_digest.as_ref())
            .map_err(|e| invalid(format!("action_digest: {e}")))?;
        let mut result = request
            .action_result
            .ok_or_else(|| invalid("action_result is missing"))?;
        validate::action_result(&result).map_err(invalid)?;
        self.move_inlined_to_cas(&mut result).await?;
        let key = ActionKey {
            instance: request.instance_name,
            action,
        };
        self.storage.action_cache.put(&key, &result).await?;
        Ok(Response::new(result))
    }
}
