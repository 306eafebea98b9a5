//! Capabilities: what this server supports, so clients can configure themselves.

use paddock_reapi::proto::re::{
    self, capabilities_server::Capabilities, digest_function, priority_capabilities,
    symlink_absolute_path_strategy, ActionCacheUpdateCapabilities, CacheCapabilities,
    ExecutionCapabilities, GetCapabilitiesRequest, PriorityCapabilities, ServerCapabilities,
};
use paddock_reapi::proto::semver::SemVer;
use paddock_reapi::{HIGH_API_VERSION, LOW_API_VERSION};
use tonic::{Request, Response, Status};

use crate::Limits;

/// The range of `ExecutionPolicy.priority` the scheduler orders by.
pub const PRIORITY_RANGE: (i32, i32) = (-1000, 1000);

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
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let sha256 = digest_function::Value::Sha256 as i32;
        let cache = CacheCapabilities {
            digest_functions: vec![sha256],
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled: true,
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
            ..Default::default()
        };
        let execution = ExecutionCapabilities {
            digest_function: sha256,
            digest_functions: vec![sha256],
            exec_enabled: self.execution_enabled,
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
