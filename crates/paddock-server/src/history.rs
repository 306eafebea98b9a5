//! Noting served actions in the farm's history (`paddock-history`): who asked, what
//! their client said about the action (its RequestMetadata), and how it was served.

use paddock_history::Asker;
use paddock_reapi::proto::re::RequestMetadata;
use prost::Message;

/// The header REAPI clients attach their RequestMetadata to.
pub const REQUEST_METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// The RequestMetadata a call carries, if it carries one that decodes.
pub fn request_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<RequestMetadata> {
    metadata
        .get_bin(REQUEST_METADATA)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|bytes| RequestMetadata::decode(bytes).ok())
}

/// Who asked, on which instance, with what metadata.
pub fn asker(identity: &str, instance: &str, metadata: RequestMetadata) -> Asker {
    Asker {
        instance: instance.to_owned(),
        identity: identity.to_owned(),
        metadata,
    }
}
