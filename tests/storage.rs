//! The storage services over real gRPC against a real `paddock up` process: every RPC,
//! its bad-input cases, large blobs, resumed uploads, restarts and crashes.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::s3::{Backend, Storage};
use common::{config_file, http_get, random_blob as blob, Farm};
use futures::StreamExt;
use paddock_reapi::proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, WriteRequest, WriteResponse,
};
use paddock_reapi::proto::re::capabilities_client::CapabilitiesClient;
use paddock_reapi::proto::re::{
    batch_update_blobs_request, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    Directory, DirectoryNode, FileNode, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, GetTreeRequest, OutputFile, UpdateActionResultRequest,
};
use paddock_reapi::{resource, Digest};
use rand::RngCore;
use tonic::Code;

fn random(len: usize) -> Bytes {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    Bytes::from(data)
}

fn bad_digest() -> paddock_reapi::proto::re::Digest {
    paddock_reapi::proto::re::Digest {
        hash: "not-a-hash".into(),
        size_bytes: 3,
    }
}

/// Runs each named test against both backends: the disk, and the object store with
/// its index and fast tier (`disk::NAME` and `s3::NAME`).
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod disk {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(super::Backend::Disk).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(super::Backend::S3).await
                }
            )*
        }
    };
}

on_every_backend!(
    capabilities_advertise_sha256_batches_and_versions,
    find_missing_blobs_and_the_ever_present_empty_blob,
    batch_update_reports_a_status_per_blob,
    batch_read_reports_missing_blobs_per_blob,
    get_tree_streams_pages_and_resumes_from_a_token,
    bytestream_moves_a_100_mib_blob_both_ways,
    bytestream_read_refuses_bad_requests,
    bytestream_uploads_resume_after_a_broken_stream,
    bytestream_upload_that_closes_early_can_be_continued,
    bytestream_write_of_an_existing_blob_completes_at_once,
    bytestream_write_refuses_bad_uploads_and_keeps_nothing,
    action_cache_serves_only_complete_results,
    zstd_compressed_blobs_round_trip_and_bad_ones_are_refused,
);

async fn capabilities_advertise_sha256_batches_and_versions(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let caps = CapabilitiesClient::new(remote.channel())
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "any/instance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.digest_functions, vec![1], "SHA256 only");
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert_eq!(cache.max_batch_total_size_bytes, 3 << 20);
    assert_eq!(cache.symlink_absolute_path_strategy, 1, "DISALLOWED");
    let low = caps.low_api_version.unwrap();
    let high = caps.high_api_version.unwrap();
    assert_eq!((low.major, low.minor), (2, 0));
    assert!((high.major, high.minor) >= (2, 0));
    assert!(caps.execution_capabilities.is_some());
}

async fn find_missing_blobs_and_the_ever_present_empty_blob(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("main").await;
    let (present, data) = blob(100);
    let (absent, _) = blob(100);
    remote.upload(vec![(present, data)]).await.unwrap();
    let missing = remote
        .find_missing(&[present, absent, Digest::EMPTY])
        .await
        .unwrap();
    assert_eq!(missing, vec![absent]);
    // The empty blob reads back without ever being uploaded.
    assert_eq!(remote.read_blob(&Digest::EMPTY).await.unwrap().len(), 0);

    let err = remote
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "main".into(),
            blob_digests: vec![present.to_proto(), bad_digest()],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("digest #1"), "{}", err.message());

    let negative = paddock_reapi::proto::re::Digest {
        hash: present.hash_hex(),
        size_bytes: -5,
    };
    let err = remote
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "main".into(),
            blob_digests: vec![negative],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = remote
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "main".into(),
            blob_digests: vec![present.to_proto()],
            digest_function: 9, // BLAKE3
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn batch_update_reports_a_status_per_blob(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let (good, good_data) = blob(10);
    let (wrong_hash, _) = blob(10);
    let (short, short_data) = blob(10);
    let request = |digest: paddock_reapi::proto::re::Digest, data: &[u8]| {
        batch_update_blobs_request::Request {
            digest: Some(digest),
            data: data.to_vec(),
            compressor: 0,
        }
    };
    let response = remote
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![
                request(good.to_proto(), &good_data),
                request(wrong_hash.to_proto(), &good_data),
                request(short.to_proto(), &short_data[..5]),
                request(bad_digest(), b"abc"),
            ],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, invalid, invalid, invalid]);
    assert_eq!(response.responses[0].digest, Some(good.to_proto()));
    assert!(response.responses[1]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("hashes to"));
    // Only the good blob became visible.
    assert_eq!(
        remote
            .find_missing(&[good, wrong_hash, short])
            .await
            .unwrap(),
        vec![wrong_hash, short]
    );

    // A batch larger than the advertised limit is refused whole.
    let big = random(5 << 19);
    let big2 = random(5 << 19);
    let err = remote
        .cas()
        .max_encoding_message_size(64 << 20)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![
                request(Digest::of(&big).to_proto(), &big),
                request(Digest::of(&big2).to_proto(), &big2),
            ],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn batch_read_reports_missing_blobs_per_blob(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("x").await;
    let (present, data) = blob(1000);
    let (absent, _) = blob(10);
    remote.upload(vec![(present, data.clone())]).await.unwrap();
    let response = remote
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "x".into(),
            digests: vec![
                present.to_proto(),
                absent.to_proto(),
                bad_digest(),
                Digest::EMPTY.to_proto(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = &response.responses;
    assert_eq!(r[0].status.as_ref().unwrap().code, 0);
    assert_eq!(r[0].data, data.to_vec());
    assert_eq!(r[1].status.as_ref().unwrap().code, Code::NotFound as i32);
    assert_eq!(
        r[2].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
    assert_eq!(r[3].status.as_ref().unwrap().code, 0);
    assert!(r[3].data.is_empty());
}

/// Uploads a Directory and returns its digest.
async fn put_dir(remote: &paddock_client::Remote, dir: &Directory) -> Digest {
    let (digest, bytes) = Digest::of_message(dir);
    remote.upload(vec![(digest, bytes.into())]).await.unwrap();
    digest
}

async fn get_tree_streams_pages_and_resumes_from_a_token(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("trees").await;
    let (file, data) = blob(3);
    remote.upload(vec![(file, data)]).await.unwrap();
    let leaf = |name: &str| Directory {
        files: vec![FileNode {
            name: name.into(),
            digest: Some(file.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut children = Vec::new();
    for i in 0..5 {
        let d = put_dir(&remote, &leaf(&format!("f{i}"))).await;
        children.push(DirectoryNode {
            name: format!("d{i}"),
            digest: Some(d.to_proto()),
        });
    }
    // One child that was never uploaded: the tree is returned without it.
    let (ghost, _) = blob(20);
    children.push(DirectoryNode {
        name: "ghost".into(),
        digest: Some(ghost.to_proto()),
    });
    let root = Directory {
        directories: children,
        ..Default::default()
    };
    let root_digest = put_dir(&remote, &root).await;

    let get = |page_size: i32, token: String| {
        let mut cas = remote.cas();
        async move {
            let mut stream = cas
                .get_tree(GetTreeRequest {
                    instance_name: "trees".into(),
                    root_digest: Some(root_digest.to_proto()),
                    page_size,
                    page_token: token,
                    digest_function: 0,
                })
                .await?
                .into_inner();
            let mut pages = Vec::new();
            while let Some(page) = stream.next().await {
                pages.push(page?);
            }
            Ok::<_, tonic::Status>(pages)
        }
    };
    let pages = get(2, String::new()).await.unwrap();
    let total: usize = pages.iter().map(|p| p.directories.len()).sum();
    assert_eq!(
        total, 6,
        "root and five subdirectories; the missing one is left out"
    );
    assert!(pages.len() >= 3);
    assert!(pages.iter().all(|p| p.directories.len() <= 2));
    assert!(pages.last().unwrap().next_page_token.is_empty());
    assert_eq!(pages[0].directories[0], root);
    // Resuming from the first page's token yields exactly the rest.
    let rest = get(2, pages[0].next_page_token.clone()).await.unwrap();
    let rest_dirs: Vec<Directory> = rest.into_iter().flat_map(|p| p.directories).collect();
    let expected: Vec<Directory> = pages[1..]
        .iter()
        .flat_map(|p| p.directories.clone())
        .collect();
    assert_eq!(rest_dirs, expected);

    assert_eq!(
        get(0, "garbage".into()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get(-1, String::new()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let missing_root = remote
        .cas()
        .get_tree(GetTreeRequest {
            instance_name: "trees".into(),
            root_digest: Some(ghost.to_proto()),
            ..Default::default()
        })
        .await;
    let code = match missing_root {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().next().await.unwrap().unwrap_err().code(),
    };
    assert_eq!(code, Code::NotFound);
}

async fn bytestream_moves_a_100_mib_blob_both_ways(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("big/instance").await;
    let (digest, data) = blob(100 << 20);
    remote.write_blob(&digest, data.clone()).await.unwrap();
    assert!(remote.find_missing(&[digest]).await.unwrap().is_empty());

    let mut stream = remote
        .bytestream()
        .read(ReadRequest {
            resource_name: resource::read_name("big/instance", &digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::with_capacity(data.len());
    let mut messages = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.data.len() <= 1 << 20, "chunks are at most 1 MiB");
        received.extend_from_slice(&chunk.data);
        messages += 1;
    }
    assert!(messages >= 100);
    assert_eq!(Digest::of(&received), digest);

    // A window in the middle, across chunk boundaries.
    let offset = (3 << 20) + 17;
    let limit = (2 << 20) + 5;
    let mut stream = remote
        .bytestream()
        .read(ReadRequest {
            resource_name: resource::read_name("big/instance", &digest),
            read_offset: offset as i64,
            read_limit: limit as i64,
        })
        .await
        .unwrap()
        .into_inner();
    let mut window = Vec::new();
    while let Some(chunk) = stream.next().await {
        window.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(&window[..], &data[offset..offset + limit]);
}

async fn bytestream_read_refuses_bad_requests(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let (digest, data) = blob(100);
    remote.upload(vec![(digest, data)]).await.unwrap();
    let read = |name: String, offset: i64, limit: i64| {
        let mut bs = remote.bytestream();
        async move {
            let mut stream = bs
                .read(ReadRequest {
                    resource_name: name,
                    read_offset: offset,
                    read_limit: limit,
                })
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(c) = stream.next().await {
                out.extend_from_slice(&c?.data);
            }
            Ok::<_, tonic::Status>(out)
        }
    };
    let name = resource::read_name("", &digest);
    assert_eq!(
        read(name.clone(), 100, 0).await.unwrap().len(),
        0,
        "offset at the end"
    );
    assert_eq!(
        read(name.clone(), 101, 0).await.unwrap_err().code(),
        Code::OutOfRange
    );
    assert_eq!(
        read(name.clone(), -1, 0).await.unwrap_err().code(),
        Code::OutOfRange
    );
    assert_eq!(
        read(name.clone(), 0, -1).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    for bad in [
        String::new(),
        "blobs".to_string(),
        format!("blobs/{}", digest.hash_hex()),
        format!("blobs/{}/x", digest.hash_hex()),
        format!("blobs/{}/100/extra", digest.hash_hex()),
        format!("blobs/{}/100", &digest.hash_hex()[..60]),
        format!("a//b/blobs/{}/100", digest.hash_hex()),
        format!("compressed-blobs/deflate/{}/100", digest.hash_hex()),
        format!("uploads/u/blobs/{}/100", digest.hash_hex()),
    ] {
        let err = read(bad.clone(), 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    let (absent, _) = blob(5);
    assert_eq!(
        read(resource::read_name("", &absent), 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

/// A ByteStream Write whose requests the test sends one by one through the sender.
fn open_upload(
    remote: &paddock_client::Remote,
) -> (
    tokio::sync::mpsc::Sender<WriteRequest>,
    tokio::task::JoinHandle<Result<tonic::Response<WriteResponse>, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut bs = remote.bytestream();
    let call = tokio::spawn(async move {
        bs.write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    (tx, call)
}

async fn write_status(
    remote: &paddock_client::Remote,
    name: &str,
) -> Result<QueryWriteStatusResponse, tonic::Status> {
    remote
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.to_owned(),
        })
        .await
        .map(|status| status.into_inner())
}

/// Polls the upload `name` until the server reports `committed` bytes (for up to 30 s);
/// returns the last committed size it reported.
async fn wait_committed(remote: &paddock_client::Remote, name: &str, committed: i64) -> i64 {
    let mut last = 0;
    for _ in 0..1500 {
        if let Ok(status) = write_status(remote, name).await {
            last = status.committed_size;
            if last == committed {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

fn write_request(name: &str, offset: usize, data: &[u8], finish: bool) -> WriteRequest {
    WriteRequest {
        resource_name: name.to_owned(),
        write_offset: offset as i64,
        finish_write: finish,
        data: data.to_vec(),
    }
}

async fn bytestream_uploads_resume_after_a_broken_stream(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("main").await;
    let (digest, data) = blob(4 << 20);
    let name = resource::write_name("main", "6b0d6a4e-5c58-4a3c-9a53-000000000001", &digest);

    // First attempt: send 2 MiB, then the client goes away mid-stream.
    let (tx, call) = open_upload(&remote);
    tx.send(write_request(&name, 0, &data[..1 << 20], false))
        .await
        .unwrap();
    tx.send(write_request("", 1 << 20, &data[1 << 20..2 << 20], false))
        .await
        .unwrap();
    // Wait until the server has taken both chunks, then break the stream.
    let committed = wait_committed(&remote, &name, 2 << 20).await;
    assert_eq!(committed, 2 << 20, "the server took both chunks");
    call.abort();
    let _ = call.await;
    let status = write_status(&remote, &name).await.unwrap();
    assert!(!status.complete);
    assert_eq!(
        status.committed_size,
        2 << 20,
        "the server kept what arrived"
    );

    // A resumption at the wrong offset is refused; at the committed size it completes.
    let err = remote
        .bytestream()
        .write(futures::stream::iter(vec![write_request(
            &name,
            1 << 20,
            &data[1 << 20..],
            true,
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let response = remote
        .bytestream()
        .write(futures::stream::iter(vec![
            write_request(&name, 2 << 20, &data[2 << 20..3 << 20], false),
            write_request("", 3 << 20, &data[3 << 20..], true),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.committed_size, 4 << 20);
    assert_eq!(remote.read_blob(&digest).await.unwrap(), data);
    let status = write_status(&remote, &name).await.unwrap();
    assert!(status.complete);
    assert_eq!(status.committed_size, 4 << 20);
}

async fn bytestream_upload_that_closes_early_can_be_continued(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let (digest, data) = blob(3000);
    let name = resource::write_name("", "u-close", &digest);
    let response = remote
        .bytestream()
        .write(futures::stream::iter(vec![write_request(
            &name,
            0,
            &data[..1000],
            false,
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.committed_size, 1000);
    let response = remote
        .bytestream()
        .write(futures::stream::iter(vec![write_request(
            &name,
            1000,
            &data[1000..],
            true,
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.committed_size, 3000);
    assert_eq!(remote.read_blob(&digest).await.unwrap(), data);
}

async fn bytestream_write_of_an_existing_blob_completes_at_once(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let (digest, data) = blob(5000);
    remote.write_blob(&digest, data.clone()).await.unwrap();
    let name = resource::write_name("", "another-upload", &digest);
    let response = remote
        .bytestream()
        .write(futures::stream::iter(vec![write_request(
            &name,
            0,
            &data[..10],
            false,
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.committed_size, 5000);
}

async fn bytestream_write_refuses_bad_uploads_and_keeps_nothing(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let (digest, data) = blob(2000);
    let write = |requests: Vec<WriteRequest>| {
        let mut bs = remote.bytestream();
        async move { bs.write(futures::stream::iter(requests)).await }
    };
    // Wrong content for the digest.
    let other = random(2000);
    let name = resource::write_name("", "u1", &digest);
    let err = write(vec![write_request(&name, 0, &other, true)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Too much data, too little data, a gap in the offsets.
    let mut long = data.to_vec();
    long.push(0);
    let err = write(vec![write_request(
        &resource::write_name("", "u2", &digest),
        0,
        &long,
        true,
    )])
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = write(vec![write_request(
        &resource::write_name("", "u3", &digest),
        0,
        &data[..100],
        true,
    )])
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let name4 = resource::write_name("", "u4", &digest);
    let err = write(vec![
        write_request(&name4, 0, &data[..100], false),
        write_request("", 200, &data[200..], true),
    ])
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Malformed resource names, and a first request without one.
    for bad in [
        String::new(),
        resource::read_name("", &digest),
        format!("uploads/u5/blobs/{}/-3", digest.hash_hex()),
        format!("uploads/u5/blobs/{}", digest.hash_hex()),
    ] {
        let err = write(vec![write_request(&bad, 0, &data, true)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(remote.find_missing(&[digest]).await.unwrap(), vec![digest]);
    let err = write_status(&remote, &resource::write_name("", "never-started", &digest))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The server is still up and serving.
    remote.write_blob(&digest, data.clone()).await.unwrap();
    assert_eq!(remote.read_blob(&digest).await.unwrap(), data);
}

fn result_with(file: Digest, stdout: Digest) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out/result.txt".into(),
            digest: Some(file.to_proto()),
            ..Default::default()
        }],
        stdout_digest: Some(stdout.to_proto()),
        exit_code: 0,
        ..Default::default()
    }
}

async fn action_cache_serves_only_complete_results(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("ci").await;
    let (file, file_data) = blob(300);
    let (stdout, stdout_data) = blob(40);
    let action = Digest::of(b"an action");
    let result = result_with(file, stdout);
    let get = |instance: &str, inline_stdout: bool| {
        let mut ac = remote.action_cache();
        let instance = instance.to_owned();
        async move {
            ac.get_action_result(GetActionResultRequest {
                instance_name: instance,
                action_digest: Some(action.to_proto()),
                inline_stdout,
                ..Default::default()
            })
            .await
        }
    };
    assert_eq!(get("ci", false).await.unwrap_err().code(), Code::NotFound);
    let stored = remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            instance_name: "ci".into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored, result);
    // The outputs are not in the CAS yet: the entry must not be served.
    assert_eq!(get("ci", false).await.unwrap_err().code(), Code::NotFound);
    remote.upload(vec![(file, file_data)]).await.unwrap();
    assert_eq!(
        get("ci", false).await.unwrap_err().code(),
        Code::NotFound,
        "stdout still missing"
    );
    remote
        .upload(vec![(stdout, stdout_data.clone())])
        .await
        .unwrap();
    assert_eq!(get("ci", false).await.unwrap().into_inner(), result);
    let inlined = get("ci", true).await.unwrap().into_inner();
    assert_eq!(inlined.stdout_raw, stdout_data.to_vec());
    // Instance names separate caches.
    assert_eq!(
        get("other", false).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(get("", false).await.unwrap_err().code(), Code::NotFound);

    let update = |result: Option<ActionResult>, digest: paddock_reapi::proto::re::Digest| {
        let mut ac = remote.action_cache();
        async move {
            ac.update_action_result(UpdateActionResultRequest {
                instance_name: "ci".into(),
                action_digest: Some(digest),
                action_result: result,
                ..Default::default()
            })
            .await
        }
    };
    let mut escaping = result.clone();
    escaping.output_files[0].path = "../../etc/passwd".into();
    let mut absolute = result.clone();
    absolute.output_files[0].path = "/etc/passwd".into();
    let mut bad_file = result.clone();
    bad_file.output_files[0].digest = Some(bad_digest());
    for bad in [escaping, absolute, bad_file] {
        let err = update(Some(bad), action.to_proto()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    assert_eq!(
        update(None, action.to_proto()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        update(Some(result.clone()), bad_digest())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // The good entry survived the bad updates.
    assert_eq!(get("ci", false).await.unwrap().into_inner(), result);
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_and_results_survive_a_restart_but_corrupt_blobs_are_not_served() {
    let mut farm = Farm::start(&[]);
    let (file, file_data) = blob(1000);
    let (stdout, stdout_data) = blob(50);
    let (large, large_data) = blob(6 << 20);
    let action = Digest::of(b"persistent action");
    {
        let remote = farm.remote("persist").await;
        remote
            .upload(vec![
                (file, file_data.clone()),
                (stdout, stdout_data),
                (large, large_data.clone()),
            ])
            .await
            .unwrap();
        remote
            .action_cache()
            .update_action_result(UpdateActionResultRequest {
                instance_name: "persist".into(),
                action_digest: Some(action.to_proto()),
                action_result: Some(result_with(file, stdout)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    farm.restart();
    let remote = farm.remote("persist").await;
    assert!(remote
        .find_missing(&[file, stdout, large])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(remote.read_blob(&large).await.unwrap(), large_data);
    let get_result = |remote: paddock_client::Remote| async move {
        remote
            .action_cache()
            .get_action_result(GetActionResultRequest {
                instance_name: "persist".into(),
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await
    };
    assert_eq!(
        get_result(remote.clone()).await.unwrap().into_inner(),
        result_with(file, stdout)
    );

    // Flip bytes of two blobs on disk (same length, so only the contents are wrong).
    farm.stop();
    for digest in [file, large] {
        let hash = digest.hash_hex();
        let path = farm
            .data_dir
            .join("cas/blobs")
            .join(&hash[..2])
            .join(format!("{hash}-{}", digest.size()));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&path, perms).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    farm.start_again();
    let remote = farm.remote("persist").await;
    // The small blob: a batch read answers NOT_FOUND rather than corrupt data.
    let response = remote
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "persist".into(),
            digests: vec![file.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.responses[0].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    assert!(response.responses[0].data.is_empty());
    // The large blob: the stream fails before its end; the whole body is never sent.
    let mut stream = remote
        .bytestream()
        .read(ReadRequest {
            resource_name: resource::read_name("persist", &large),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0usize;
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => received += c.data.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "a corrupt blob's stream must end in an error");
    assert!(received < large_data.len());
    // Both now read as missing, and the result that needs one of them is not served.
    assert_eq!(
        remote.find_missing(&[file, large]).await.unwrap(),
        vec![file, large]
    );
    assert_eq!(
        get_result(remote.clone()).await.unwrap_err().code(),
        Code::NotFound
    );
    // A client can repair the store by uploading again.
    remote.upload(vec![(file, file_data)]).await.unwrap();
    assert_eq!(
        get_result(remote.clone()).await.unwrap().into_inner(),
        result_with(file, stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_upload_never_leaves_a_partial_blob() {
    let mut farm = Farm::start(&["--config", &config_file("[storage]\nfsync = true\n")]);
    let remote = farm.remote("").await;
    let blobs: Vec<(Digest, Bytes)> = (0..24).map(|i| blob((i % 6 + 1) << 20)).collect();
    let mut uploads = Vec::new();
    for (digest, data) in blobs.clone() {
        let remote = remote.clone();
        uploads.push(tokio::spawn(async move {
            remote.write_blob(&digest, data).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    farm.kill9();
    for upload in uploads {
        let _ = upload.await;
    }
    farm.start_again();
    let remote = farm.remote("").await;
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    let missing = remote.find_missing(&digests).await.unwrap();
    for (digest, data) in &blobs {
        if !missing.contains(digest) {
            assert_eq!(
                &remote.read_blob(digest).await.unwrap(),
                data,
                "{digest} is whole"
            );
        }
    }
    let leftovers = std::fs::read_dir(farm.data_dir.join("cas/tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "unfinished uploads are cleared at start-up");
}

#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_the_store_under_its_bound() {
    let farm = Farm::start(&["--config", &config_file("[storage]\nmax_size = \"2MiB\"\n")]);
    let remote = farm.remote("").await;
    let blobs: Vec<(Digest, Bytes)> = (0..10).map(|_| blob(512 << 10)).collect();
    for (digest, data) in &blobs {
        remote.write_blob(digest, data.clone()).await.unwrap();
    }
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    let missing = remote.find_missing(&digests).await.unwrap();
    assert_eq!(
        missing,
        digests[..6].to_vec(),
        "the oldest six are gone, the newest four stay"
    );
    let on_disk: u64 = walk_sizes(&farm.data_dir.join("cas/blobs"));
    assert!(on_disk <= 2 << 20, "{on_disk} bytes on disk");
    let metrics = http_get(&farm.metrics_url);
    assert!(
        metrics.contains("paddock_store_evictions_total{store=\"cas\"} 6"),
        "{metrics}"
    );
    // A blob larger than the whole store is refused with RESOURCE_EXHAUSTED.
    let (huge, huge_data) = blob(3 << 20);
    let err = remote.write_blob(&huge, huge_data).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
}

fn walk_sizes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk_sizes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn in_memory_farm_and_metrics_endpoint() {
    let mut farm = Farm::start(&["--in-memory"]);
    let remote = farm.remote("").await;
    let (digest, data) = blob(10);
    remote.upload(vec![(digest, data)]).await.unwrap();
    let _ = remote.find_missing(&[digest]).await.unwrap();
    // A call is counted once its response is finished, a moment after the client has it.
    let counted = r#"paddock_grpc_requests_total{rpc="ContentAddressableStorage/FindMissingBlobs",code="Ok"}"#;
    let mut metrics = http_get(&farm.metrics_url);
    for _ in 0..100 {
        if metrics.contains(counted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = http_get(&farm.metrics_url);
    }
    assert!(metrics.starts_with("HTTP/1.1 200"));
    assert!(metrics.contains(counted), "{metrics}");
    assert!(metrics.contains("paddock_grpc_request_duration_seconds_bucket"));
    assert!(metrics.contains("paddock_cas_bytes_written_total 10"));
    assert!(!std::path::Path::new(&farm.data_dir).join("cas").exists());
    // SIGTERM shuts down cleanly, with nothing left hanging.
    farm.stop();
    let log = farm.log();
    assert!(log.contains("paddock stopped"), "{log}");
    assert!(!log.contains("shutdown grace period"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn edge_cases_of_the_specification() {
    let farm = Farm::start(&["--in-memory"]);
    let remote = farm.remote("edge").await;

    // A batch far over the advertised limit is INVALID_ARGUMENT (not a transport
    // error), and a ByteStream chunk far larger than a batch is welcome.
    let big: Vec<(Digest, Bytes)> = (0..4).map(|_| blob(3 << 20)).collect();
    let err = remote
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "edge".into(),
            requests: big
                .iter()
                .map(|(digest, data)| batch_update_blobs_request::Request {
                    digest: Some(digest.to_proto()),
                    data: data.to_vec(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let (digest, data) = blob(12 << 20);
    let name = resource::write_name("edge", "one-chunk", &digest);
    let written = remote
        .bytestream()
        .write(futures::stream::iter([write_request(
            &name, 0, &data, true,
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.committed_size, 12 << 20);

    // QueryWriteStatus sees an upload whose stream is still open.
    let (digest, data) = blob(3 << 20);
    let name = resource::write_name("edge", "open-upload", &digest);
    let (tx, call) = open_upload(&remote);
    tx.send(write_request(&name, 0, &data[..1 << 20], false))
        .await
        .unwrap();
    let committed = wait_committed(&remote, &name, 1 << 20).await;
    assert_eq!(committed, 1 << 20, "an open upload's progress is visible");
    tx.send(write_request("", 1 << 20, &data[1 << 20..], true))
        .await
        .unwrap();
    assert_eq!(
        call.await.unwrap().unwrap().into_inner().committed_size,
        3 << 20
    );

    // Sizes that would overflow a sum are refused, not a crash.
    let huge = paddock_reapi::proto::re::Digest {
        hash: digest.hash_hex(),
        size_bytes: i64::MAX,
    };
    let err = remote
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "edge".into(),
            digests: vec![huge.clone(), huge],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Inlined contents that disagree with their digest are refused.
    let (out, out_data) = blob(10);
    remote.upload(vec![(out, out_data)]).await.unwrap();
    let action = Digest::of(b"inline action");
    let mut result = result_with(out, out);
    result.stdout_raw = b"not what the digest says".to_vec();
    let err = remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            instance_name: "edge".into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Inlined contents sent with an update go to the CAS, so the cached result stays
    // equivalent but is not inlined unasked; `..` in an output symlink's target is
    // allowed.
    let mut result = result_with(out, out);
    result.stdout_digest = None;
    result.stdout_raw = b"sent anyway".to_vec();
    result
        .output_symlinks
        .push(paddock_reapi::proto::re::OutputSymlink {
            path: "out/link".into(),
            target: "../../elsewhere".into(),
            ..Default::default()
        });
    remote
        .action_cache()
        .update_action_result(UpdateActionResultRequest {
            instance_name: "edge".into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = remote
        .action_cache()
        .get_action_result(GetActionResultRequest {
            instance_name: "edge".into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.stdout_raw.is_empty());
    assert_eq!(
        got.stdout_digest,
        Some(Digest::of(b"sent anyway").to_proto())
    );
    assert_eq!(got.output_symlinks[0].target, "../../elsewhere");
    let inlined = remote
        .action_cache()
        .get_action_result(GetActionResultRequest {
            instance_name: "edge".into(),
            action_digest: Some(action.to_proto()),
            inline_stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inlined.stdout_raw, b"sent anyway");
}

/// Reads a whole ByteStream resource.
async fn read_resource(
    remote: &paddock_client::Remote,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = remote
        .bytestream()
        .read(ReadRequest {
            resource_name: name.to_owned(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.next().await {
        out.extend_from_slice(&message?.data);
    }
    Ok(out)
}

/// Sends `data` to `name` in pieces of `piece` bytes from `offset`, finishing.
async fn write_pieces(
    remote: &paddock_client::Remote,
    name: &str,
    offset: usize,
    data: &[u8],
    piece: usize,
) -> Result<WriteResponse, tonic::Status> {
    let pieces: Vec<&[u8]> = data.chunks(piece.max(1)).collect();
    let last = pieces.len().saturating_sub(1);
    let requests: Vec<WriteRequest> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = offset + pieces[..i].iter().map(|p| p.len()).sum::<usize>();
            write_request(if i == 0 { name } else { "" }, at, p, i == last)
        })
        .collect();
    remote
        .bytestream()
        .write(futures::stream::iter(requests))
        .await
        .map(|r| r.into_inner())
}

async fn zstd_compressed_blobs_round_trip_and_bad_ones_are_refused(backend: Backend) {
    let farm = Storage::start(backend);
    let remote = farm.remote("").await;
    let caps = CapabilitiesClient::new(remote.channel())
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.cache_capabilities.unwrap().supported_compressors,
        vec![paddock_reapi::proto::re::compressor::Value::Zstd as i32]
    );

    // Compressible data, uploaded compressed in pieces, read back both ways.
    let data: Bytes = (0..5_000_000u32)
        .map(|i| (i / 7 % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    let digest = Digest::of(&data);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    assert!(compressed.len() < data.len() / 4);
    let name = resource::compressed_write_name("", "z-1", &digest);
    let response = write_pieces(&remote, &name, 0, &compressed, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(response.committed_size, compressed.len() as i64);
    assert_eq!(remote.read_blob(&digest).await.unwrap(), data);
    let read = resource::compressed_read_name("", &digest);
    let got = read_resource(&remote, &read, 0, 0).await.unwrap();
    assert!(got.len() < data.len() / 4, "served compressed");
    assert_eq!(zstd::stream::decode_all(&got[..]).unwrap(), data);
    // An offset is into the uncompressed blob.
    let got = read_resource(&remote, &read, 1_000_000, 0).await.unwrap();
    assert_eq!(
        zstd::stream::decode_all(&got[..]).unwrap(),
        &data[1_000_000..]
    );
    let got = read_resource(&remote, &read, data.len() as i64, 0)
        .await
        .unwrap();
    assert!(zstd::stream::decode_all(&got[..]).unwrap().is_empty());
    // Uploading it again, compressed, completes at once with -1.
    let again = resource::compressed_write_name("", "z-2", &digest);
    let response = write_pieces(&remote, &again, 0, &compressed[..100], 100)
        .await
        .unwrap();
    assert_eq!(response.committed_size, -1);
    // A plain blob can be read compressed.
    let (plain, plain_data) = blob(70_000);
    remote.write_blob(&plain, plain_data.clone()).await.unwrap();
    let got = read_resource(&remote, &resource::compressed_read_name("", &plain), 0, 0)
        .await
        .unwrap();
    assert_eq!(zstd::stream::decode_all(&got[..]).unwrap(), plain_data);

    // A compressed upload broken off resumes at the uncompressed size committed,
    // with the rest compressed afresh.
    let (resumed, resumed_data) = blob(300_000);
    let name = resource::compressed_write_name("", "z-3", &resumed);
    let first = zstd::bulk::compress(&resumed_data[..100_000], 1).unwrap();
    let response = remote
        .bytestream()
        .write(futures::stream::iter(vec![write_request(
            &name, 0, &first, false,
        )]))
        .await
        .unwrap()
        .into_inner();
    let committed = wait_committed(&remote, &name, response.committed_size).await;
    assert_eq!(committed, 100_000, "the uncompressed bytes committed");
    let rest = zstd::bulk::compress(&resumed_data[100_000..], 1).unwrap();
    write_pieces(&remote, &name, 100_000, &rest, 10_000)
        .await
        .unwrap();
    assert_eq!(remote.read_blob(&resumed).await.unwrap(), resumed_data);

    // Refused, and nothing kept: a bomb, a truncated frame, garbage, data that
    // decompresses to something else, a read limit, an unknown compressor.
    let (target, target_data) = blob(1000);
    let bomb = zstd::bulk::compress(&vec![7u8; 20 << 20], 3).unwrap();
    let bad_uploads: Vec<(&str, Vec<u8>)> = vec![
        ("bomb", bomb),
        ("truncated", {
            let c = zstd::bulk::compress(&target_data, 3).unwrap();
            c[..c.len() - 3].to_vec()
        }),
        ("garbage", b"this is not zstd".to_vec()),
        (
            "other data",
            zstd::bulk::compress(&random(1000), 3).unwrap(),
        ),
    ];
    for (what, body) in bad_uploads {
        let name = resource::compressed_write_name("", &format!("bad-{what}"), &target);
        let status = write_pieces(&remote, &name, 0, &body, 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }
    assert_eq!(remote.find_missing(&[target]).await.unwrap(), vec![target]);
    let status = read_resource(&remote, &read, 0, 10).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = read_resource(
        &remote,
        &format!(
            "compressed-blobs/deflate/{}/{}",
            digest.hash_hex(),
            digest.size()
        ),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
