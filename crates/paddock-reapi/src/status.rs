//! `google.rpc.Status` values and the error details REAPI clients act on.

use prost::Message;

use crate::digest::Digest;
use crate::proto::{protobuf::Any, rpc};

/// `google.rpc.PreconditionFailure`, which `bazel-remote-apis` does not generate.
#[derive(Clone, PartialEq, Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<Violation>,
}

/// One `google.rpc.PreconditionFailure.Violation`.
#[derive(Clone, PartialEq, Message)]
pub struct Violation {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub description: String,
}

pub const PRECONDITION_FAILURE_TYPE: &str = "type.googleapis.com/google.rpc.PreconditionFailure";
/// The violation type REAPI uses for a blob that is not in the CAS.
pub const VIOLATION_MISSING: &str = "MISSING";

/// Packs a message into an `Any` under `type.googleapis.com/{full_name}`.
pub fn pack<M: Message>(full_name: &str, message: &M) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{full_name}"),
        value: message.encode_to_vec(),
    }
}

/// Unpacks an `Any` if it holds `full_name`.
pub fn unpack<M: Message + Default>(full_name: &str, any: &Any) -> Option<M> {
    let expected = format!("type.googleapis.com/{full_name}");
    (any.type_url == expected)
        .then(|| M::decode(any.value.as_slice()).ok())
        .flatten()
}

pub fn ok() -> rpc::Status {
    rpc::Status::default()
}

pub fn status(code: tonic::Code, message: impl Into<String>) -> rpc::Status {
    rpc::Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    }
}

/// A FAILED_PRECONDITION status that lists each missing blob as a `MISSING` violation,
/// which is what clients need to upload them again and retry.
pub fn missing_blobs(message: impl Into<String>, missing: &[Digest]) -> rpc::Status {
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| Violation {
                r#type: VIOLATION_MISSING.to_owned(),
                subject: d.blob_subject(),
                description: String::new(),
            })
            .collect(),
    };
    rpc::Status {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.into(),
        details: vec![Any {
            type_url: PRECONDITION_FAILURE_TYPE.to_owned(),
            value: failure.encode_to_vec(),
        }],
    }
}

/// Reads the missing blobs out of a status made by [`missing_blobs`] (or by any REAPI
/// server that follows the same convention).
pub fn missing_blobs_of(status: &rpc::Status) -> Vec<String> {
    status
        .details
        .iter()
        .filter(|any| any.type_url == PRECONDITION_FAILURE_TYPE)
        .filter_map(|any| PreconditionFailure::decode(any.value.as_slice()).ok())
        .flat_map(|f| f.violations)
        .filter(|v| v.r#type == VIOLATION_MISSING)
        .map(|v| v.subject)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_blobs_round_trip() {
        let status = missing_blobs("inputs missing", &[Digest::EMPTY]);
        assert_eq!(status.code, tonic::Code::FailedPrecondition as i32);
        assert_eq!(
            missing_blobs_of(&status),
            vec![Digest::EMPTY.blob_subject()]
        );
    }
}
