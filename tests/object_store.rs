//! The CAS in a real S3-compatible server (s3s-fs), indexed in a real PostgreSQL:
//! servers sharing one bucket, the store crashing mid-upload, and collection with
//! leases. The RPC-by-RPC tests run on this backend in `storage.rs`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::postgres::Postgres;
use common::s3::{shared_config, Backend, Storage, S3};
use common::{http_get, metric, paddock_bin, random_blob as blob, Farm};
use paddock_reapi::Digest;

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_written_through_one_server_is_found_and_read_through_another() {
    let (s3, postgres) = (S3::start(), Postgres::start());
    let config = shared_config(&s3, &postgres, "", "");
    let a = Farm::start(&["--config", &config]);
    let b = Farm::start(&["--config", &config]);
    let (ra, rb) = (a.remote("").await, b.remote("").await);

    let small: Vec<(Digest, Bytes)> = (0..50).map(|i| blob(100 + i)).collect();
    let (large, large_data) = blob(40 << 20);
    ra.batch_update(small.clone()).await.unwrap();
    ra.write_blob(&large, large_data.clone()).await.unwrap();

    let mut all: Vec<Digest> = small.iter().map(|(d, _)| *d).collect();
    all.push(large);
    assert!(
        rb.find_missing(&all).await.unwrap().is_empty(),
        "what A acknowledged, B finds at once"
    );
    for (digest, data) in &small {
        assert_eq!(&rb.read_blob(digest).await.unwrap(), data);
    }
    assert_eq!(rb.read_blob(&large).await.unwrap(), large_data);
    assert_eq!(
        s3.objects().len(),
        51,
        "each blob is one object in the bucket"
    );
    assert_eq!(postgres.sql("SELECT count(*) FROM cas_blobs"), "51");

    // Once B's filter of listed blobs is up to date (once a second), digests nobody
    // uploaded are answered without probing the table for each, those listed are
    // still found, and a blob listed through A a moment ago is found through B.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let unheard: Vec<Digest> = (0..10_000u32)
        .map(|n| Digest::of(format!("never uploaded {n}").as_bytes()))
        .collect();
    let mut asked = unheard.clone();
    asked.extend(&all);
    let mut missing = rb.find_missing(&asked).await.unwrap();
    missing.sort_by_key(|d| *d.hash());
    let mut unheard = unheard;
    unheard.sort_by_key(|d| *d.hash());
    assert!(
        missing == unheard,
        "{} of {} reported missing",
        missing.len(),
        unheard.len()
    );
    let (fresh, fresh_data) = blob(77);
    ra.write_blob(&fresh, fresh_data).await.unwrap();
    assert!(rb.find_missing(&[fresh]).await.unwrap().is_empty());

    // A compressible blob is kept compressed in the bucket, and read whole and from
    // an offset through the server that did not write it (no copy in its tier).
    let text: Bytes = (0..2_000_000u32)
        .map(|i| b"paddock "[i as usize % 8] ^ (i / 4096) as u8)
        .collect::<Vec<u8>>()
        .into();
    let packed = Digest::of(&text);
    ra.write_blob(&packed, text.clone()).await.unwrap();
    let object = s3
        .objects()
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&packed.hash_hex()))
        .unwrap();
    let stored = std::fs::metadata(&object).unwrap().len();
    assert!(stored < text.len() as u64 / 4, "stored {stored} bytes");
    let c = Farm::start(&["--config", &config]);
    let rc = c.remote("").await;
    let tail: Vec<u8> = {
        let mut stream = std::pin::pin!(rc.read_stream(&packed, 1_500_000).await.unwrap());
        let mut out = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    };
    assert_eq!(tail, &text[1_500_000..]);
    assert_eq!(rc.read_blob(&packed).await.unwrap(), text);
    // What the bucket holds for it is refused if damaged: never served.
    let mut damaged = std::fs::read(&object).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&object, damaged).unwrap();
    let d = Farm::start(&["--config", &config]);
    let rd = d.remote("").await;
    assert!(rd.read_blob(&packed).await.is_err());
    assert_eq!(
        rd.find_missing(&[packed]).await.unwrap(),
        vec![packed],
        "the damaged blob was dropped"
    );
    rd.write_blob(&packed, text.clone()).await.unwrap();
    assert_eq!(rd.read_blob(&packed).await.unwrap(), text);

    // A raw object tampered with in the bucket (same length) is never served whole,
    // even by a server that re-hashes nothing on its own: the copy from the bucket
    // is checked as it streams.
    let (tampered, tampered_data) = blob(300_000);
    ra.write_blob(&tampered, tampered_data).await.unwrap();
    let object = s3
        .objects()
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&tampered.hash_hex()))
        .unwrap();
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[123] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let trusting = shared_config(&s3, &postgres, "verify_reads = \"never\"\n", "");
    let e = Farm::start(&["--config", &trusting]);
    let re = e.remote("").await;
    let err = re.read_blob(&tampered).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(tonic::Code::NotFound | tonic::Code::DataLoss)
        ),
        "{err}"
    );
    assert_eq!(re.find_missing(&[tampered]).await.unwrap(), vec![tampered]);

    // A blob the index lists but the bucket lost is never served, and is repaired.
    let (lost, lost_data) = blob(5000);
    ra.batch_update(vec![(lost, lost_data)]).await.unwrap();
    // C learns of it as listed with a fresh lease (its refresh, once a second), as
    // A did by writing it: both trust it from memory until told otherwise.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let object = s3
        .objects()
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&lost.hash_hex()))
        .unwrap();
    std::fs::remove_file(object).unwrap();
    // B has no copy in its fast tier; it must go to the bucket.
    let err = rb.read_blob(&lost).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert_eq!(
        rb.find_missing(&[lost]).await.unwrap(),
        vec![lost],
        "the index forgot the lost blob"
    );
    assert_eq!(
        ra.find_missing(&[lost]).await.unwrap(),
        vec![lost],
        "A, which wrote it, knows at once that B unlisted it"
    );
    assert_eq!(
        rc.find_missing(&[lost]).await.unwrap(),
        vec![lost],
        "C, which saw it listed, knows at once that B unlisted it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_object_store_crashing_mid_upload_leaves_no_partial_blob_and_loses_no_acknowledged_one()
{
    let mut storage = Storage::start(Backend::S3);
    let remote = storage.remote("").await;
    // Blobs of one to twenty MiB, uploaded eight at a time, small and multipart.
    let blobs: Vec<(Digest, Bytes)> = (0..32).map(|i| blob((1 + i % 20) << 20)).collect();
    let uploads = {
        let remote = remote.clone();
        let blobs = blobs.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for chunk in blobs.chunks(8) {
                let results = futures::future::join_all(
                    chunk
                        .iter()
                        .map(|(d, data)| remote.write_blob(d, data.clone())),
                )
                .await;
                for ((digest, _), result) in chunk.iter().zip(results) {
                    if result.is_ok() {
                        acknowledged.push(*digest);
                    }
                }
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    storage.s3.as_mut().unwrap().kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    storage.s3.as_mut().unwrap().start_again();
    let acknowledged = uploads.await.unwrap();
    assert!(
        acknowledged.len() < blobs.len(),
        "the crash interrupted some uploads"
    );

    let all: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    let missing = remote.find_missing(&all).await.unwrap();
    for digest in &acknowledged {
        assert!(!missing.contains(digest), "acknowledged {digest} was lost");
    }
    for (digest, data) in &blobs {
        match remote.read_blob(digest).await {
            Ok(read) => assert_eq!(&read, data, "{digest} was served partial or corrupt"),
            Err(e) => {
                assert!(
                    missing.contains(digest),
                    "{digest} is listed but unreadable: {e}"
                );
                assert_eq!(e.code(), Some(tonic::Code::NotFound), "{e}");
            }
        }
    }
    // What the bucket holds is whole: no object shorter than its name says.
    for object in storage.s3.as_ref().unwrap().objects() {
        let name = object.file_name().unwrap().to_string_lossy().into_owned();
        let Some((_, size)) = name.split_once('-') else {
            continue;
        };
        if let Ok(size) = size.parse::<u64>() {
            assert_eq!(std::fs::metadata(&object).unwrap().len(), size, "{name}");
        }
    }
    // Whatever failed can be uploaded again.
    for (digest, data) in &blobs {
        if missing.contains(digest) {
            remote.write_blob(digest, data.clone()).await.unwrap();
        }
    }
    assert!(remote.find_missing(&all).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn collection_removes_only_old_unleased_blobs_past_the_bound() {
    let lease = Duration::from_secs(5);
    let storage = Storage::start_with(
        Backend::S3,
        "max_size = \"4MiB\"\nblob_lease = \"5s\"\ncollect_interval = \"1s\"\n",
        "",
    );
    let remote = storage.remote("").await;
    let old: Vec<(Digest, Bytes)> = (0..4).map(|_| blob(1 << 20)).collect();
    remote.upload(old.clone()).await.unwrap();
    tokio::time::sleep(lease + Duration::from_secs(1)).await;

    // Renewed: one found by FindMissingBlobs, one read.
    assert!(remote.find_missing(&[old[0].0]).await.unwrap().is_empty());
    assert_eq!(remote.read_blob(&old[1].0).await.unwrap(), old[1].1);
    let renewed_at = Instant::now();
    // Two new blobs bring the store 2 MiB past its bound.
    let new: Vec<(Digest, Bytes)> = (0..2).map(|_| blob(1 << 20)).collect();
    remote.upload(new.clone()).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &http_get(&storage.metrics_url),
        "paddock_cas_collected_blobs_total",
    ) < 2.0
    {
        assert!(
            Instant::now() < deadline,
            "no collection; log:\n{}",
            storage.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        renewed_at.elapsed() < lease,
        "the check must come while the renewed leases hold"
    );
    let all: Vec<Digest> = old.iter().chain(&new).map(|(d, _)| *d).collect();
    let missing = remote.find_missing(&all).await.unwrap();
    assert_eq!(
        missing,
        vec![old[2].0, old[3].0],
        "only the old blobs whose leases ran out went"
    );
    let postgres = storage.postgres.as_ref().unwrap();
    assert_eq!(postgres.sql("SELECT count(*) FROM cas_blobs"), "4");
    assert_eq!(postgres.sql("SELECT count(*) FROM cas_collecting"), "0");
    assert_eq!(
        storage.s3.as_ref().unwrap().objects().len(),
        4,
        "the collected blobs left the bucket"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_come_from_a_shared_credentials_file_and_wrong_ones_stop_the_start() {
    let (s3, postgres) = (S3::start(), Postgres::start());
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, secret: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[default]\naws_access_key_id = someone\naws_secret_access_key = nothing\n\
                 [paddock]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
                common::s3::credentials()[0].1
            ),
        )
        .unwrap();
        path
    };
    let start = |path: &std::path::Path| {
        let config = shared_config(&s3, &postgres, "", "");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "[storage.s3]\n",
            &format!("[storage.s3]\ncredentials_file = \"{}\"\n", path.display()),
        );
        std::fs::write(&config, text).unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut command = std::process::Command::new(paddock_bin());
        command
            .args(["server", "--listen", "127.0.0.1:0"])
            .args(["--worker-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--config", &config])
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_PROFILE", "paddock");
        (command, data)
    };
    // The right secret, from the file's [paddock] profile: the server starts.
    let (mut command, _data) = start(&file("good", common::s3::credentials()[1].1));
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("paddock: serving REAPI on "), "{line:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    // A wrong one: it says which store refused it, and does not start.
    let (mut command, _data) = start(&file("bad", "wrong-secret"));
    let output = common::output_within(&mut command, Duration::from_secs(60));
    assert!(!output.status.success(), "it started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reaching the object store"), "{stderr}");
    assert!(
        !stderr.contains("wrong-secret"),
        "the secret reached the log"
    );
}
