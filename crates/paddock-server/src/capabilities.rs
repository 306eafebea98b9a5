//! Capabilities: what this server supports, so clients can configure themselves.

use paddock_config::Permission;
use paddock_reapi::proto::re::{
    self, capabilities_server::Capabilities, compressor, digest_function, priority_capabilities,
    symlink_absolute_path_strategy, ActionCacheUpdateCapabilities, CacheCapabilities,
    ExecutionCapabilities, GetCapabilitiesRequest, PriorityCapabilities, ServerCapabilities,
};
use paddock_reapi::proto::semver::SemVer;
use paddock_reapi::{HIGH_API_VERSION, LOW_API_VERSION};
use paddock_scheduler::PRIORITY_RANGE;
use tonic::{Request, Response, Status};

use crate::Limits;

pub struct CapabilitiesService {
    limits: Limits,
    execution_enabled: bool,
}

impl CapabilitiesService {
    pub fn new(limits: Limits, execution_enabled: bool) -> Self {
        CapabilitiesService {
            limits,
            execution_enabled,
        }
    }
}

fn version((major, minor): (i32, i32)) -> SemVer {
    SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        // Any caller may ask; the answer is its own: a caller who may not write the
        // ActionCache is told that updates are off, one who may not execute that
        // execution is.
        let caller = crate::auth::principal(&request)?;
        let instance = &request.get_ref().instance_name;
        let sha256 = digest_function::Value::Sha256 as i32;
        let cache = CacheCapabilities {
            digest_functions: vec![sha256],
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled: caller.may(Permission::AcWrite, instance),
            }),
            cache_priority_capabilities: Some(PriorityCapabilities {
                priorities: vec![priority_capabilities::PriorityRange {
                    min_priority: 0,
                    max_priority: 0,
                }],
            }),
            max_batch_total_size_bytes: self.limits.max_batch_size as i64,
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Disallowed
                as i32,
            // ByteStream's compressed-blobs; batches carry blobs as they are.
            supported_compressors: vec![compressor::Value::Zstd as i32],
            ..Default::default()
        };
        let execution = ExecutionCapabilities {
            digest_function: sha256,
            digest_functions: vec![sha256],
            exec_enabled: self.execution_enabled && caller.may(Permission::Execute, instance),
            execution_priority_capabilities: Some(PriorityCapabilities {
                priorities: vec![priority_capabilities::PriorityRange {
                    min_priority: PRIORITY_RANGE.0,
                    max_priority: PRIORITY_RANGE.1,
                }],
            }),
            supported_node_properties: Vec::new(),
        };
        Ok(Response::new(re::ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: Some(execution),
            deprecated_api_version: Some(version(LOW_API_VERSION)),
            low_api_version: Some(version(LOW_API_VERSION)),
            high_api_version: Some(version(HIGH_API_VERSION)),
        }))
    }
}
