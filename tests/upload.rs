//! Submitting from a host whose files the coordinator cannot read: `ringtrain submit`
//! uploads the job's dataset files (content-addressed under the coordinator's data dir),
//! sends each only once, refuses what is over `--max-upload-bytes`, and never leaves a
//! partial file; `coordinator:` paths name files already on the coordinator's volume.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ringtrain_proto::v1::{
    data_chunk, job_service_client::JobServiceClient, DataChunk, DataHeader, ListRequest,
};
use sha2::{Digest, Sha256};
use tonic::Code;

/// The MNIST files the repository ships (8,000 training digits, IDX, gzipped).
fn mnist_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/data/mnist-10k"
    ))
}

const IMAGES: &str = "train-images-idx3-ubyte.gz";
const LABELS: &str = "train-labels-idx1-ubyte.gz";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Copies the MNIST training files into `dir/mnist/`, as a user's laptop would hold them.
fn laptop_copy(dir: &Path) {
    std::fs::create_dir_all(dir.join("mnist")).unwrap();
    for f in [IMAGES, LABELS] {
        std::fs::copy(mnist_dir().join(f), dir.join("mnist").join(f)).unwrap();
    }
}

/// A small MNIST job (one epoch, two workers, one hidden layer) reading `images` and
/// `labels` as written.
fn mnist_job(dir: &Path, name: &str, epochs: u32, images: &str, labels: &str) -> PathBuf {
    let text = format!(
        r#"# Uploaded from wherever it is submitted.
name = "{name}"
seed = 3
epochs = {epochs}
batch_size = 64
workers = 2

[data]
train = {{ format = "idx", images = "{images}", labels = "{labels}" }}

[model]
input = 784
layers = [
  {{ dense = 16, activation = "relu" }},
  {{ dense = 10, activation = "softmax" }},
]

[train]
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
"#
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Every entry of the coordinator's upload store (objects and temporary files).
fn store_entries(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("datasets/sha256"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn submit_json(coord: &str, args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut all = vec!["submit", "--coordinator", coord];
    all.extend_from_slice(args);
    run_json(&all)
}

fn watch_done(coord: &str, id: &str) -> serde_json::Value {
    let (ok, done, stderr) = run_json(&["watch", "--coordinator", coord, id]);
    assert!(ok, "watch {id} failed: {done} {stderr}");
    assert_eq!(done["state"], "completed", "{done}");
    done
}

fn jobs(coord: &str) -> Vec<serde_json::Value> {
    let (ok, v, stderr) = run_json(&["jobs", "--coordinator", coord]);
    assert!(ok, "{stderr}");
    v["jobs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_job_runs_from_uploaded_files_after_the_client_deletes_them_and_a_resubmit_sends_nothing() {
    let _serial = serial();
    let dir = test_dir();
    let data = dir.path().join("data");
    let (_serve, coord) = serve(&data);
    let _workers: Vec<Proc> = (0..2).map(|i| worker(&coord, &format!("w{i}"))).collect();

    // (1) The files exist only in a directory the client deletes right after submit.
    let laptop = dir.path().join("laptop");
    laptop_copy(&laptop);
    let job = mnist_job(
        &laptop,
        "up",
        1,
        &format!("mnist/{IMAGES}"),
        &format!("mnist/{LABELS}"),
    );
    let job_text = std::fs::read_to_string(&job).unwrap();
    let (ok, v, stderr) = submit_json(&coord, &[job.to_str().unwrap()]);
    assert!(ok, "submit failed: {v} {stderr}");
    std::fs::remove_dir_all(&laptop).unwrap();
    let id = v["job_id"].as_str().unwrap().to_string();
    let uploads = v["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 2, "{v}");
    for (u, (field, file)) in uploads
        .iter()
        .zip([("data.train.images", IMAGES), ("data.train.labels", LABELS)])
    {
        let bytes = std::fs::read(mnist_dir().join(file)).unwrap();
        let sha = sha256_hex(&bytes);
        assert_eq!(u["field"], field, "{u}");
        assert_eq!(u["sha256"], sha.as_str(), "{u}");
        assert_eq!(u["bytes"], bytes.len() as u64, "{u}");
        assert_eq!(u["sent_bytes"], bytes.len() as u64, "{u}");
        assert_eq!(u["already_on_coordinator"], false, "{u}");
        // Stored under its digest, byte for byte.
        let object = data.join("datasets/sha256").join(&sha);
        assert_eq!(
            std::fs::read(&object).unwrap(),
            bytes,
            "{}",
            object.display()
        );
    }
    let done = watch_done(&coord, &id);
    assert!(
        done["metrics"]["accuracy"].as_f64().unwrap() > 0.5,
        "{done}"
    );
    // The run directory keeps the job file as the user wrote it, and which fields came
    // from which upload.
    let run_dir = PathBuf::from(done["out_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(run_dir.join("job.toml")).unwrap(),
        job_text
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("job.json")).unwrap()).unwrap();
    assert_eq!(
        saved["uploaded"][0]["field"], "data.train.images",
        "{saved}"
    );
    assert_eq!(
        saved["uploaded"][0]["sha256"], uploads[0]["sha256"],
        "{saved}"
    );
    let objects = store_entries(&data);
    assert_eq!(objects.len(), 2, "{objects:?}");
    let mtimes: Vec<_> = objects
        .iter()
        .map(|o| {
            std::fs::metadata(data.join("datasets/sha256").join(o))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();

    // (2) The same bytes from another directory, one more epoch, continuing the run:
    // nothing is sent, and the resume compares the data by content, so it is accepted.
    let elsewhere = dir.path().join("elsewhere");
    laptop_copy(&elsewhere);
    let again = mnist_job(
        &elsewhere,
        "up",
        2,
        &format!("mnist/{IMAGES}"),
        &format!("mnist/{LABELS}"),
    );
    let (ok, v, stderr) = submit_json(
        &coord,
        &[
            "--resume",
            run_dir.to_str().unwrap(),
            again.to_str().unwrap(),
        ],
    );
    assert!(ok, "resubmit failed: {v} {stderr}");
    for u in v["uploads"].as_array().unwrap() {
        assert_eq!(u["already_on_coordinator"], true, "{v}");
        assert_eq!(u["sent_bytes"], 0, "{v}");
    }
    let resumed = watch_done(&coord, v["job_id"].as_str().unwrap());
    assert_eq!(resumed["epoch"], 2, "{resumed}");
    // Not rewritten either: the same two objects, untouched, and no temporary file.
    assert_eq!(store_entries(&data), objects);
    let after: Vec<_> = objects
        .iter()
        .map(|o| {
            std::fs::metadata(data.join("datasets/sha256").join(o))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    assert_eq!(after, mtimes);
    // The human output says so too (on stderr; stdout is the job id alone).
    let out = run(&["submit", "--coordinator", &coord, again.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("already on the coordinator, not sent")
            .count(),
        2,
        "{stderr}"
    );
    let id3 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id3.starts_with("j-"), "stdout is the job id: {id3:?}");
    let (ok, _, stderr) = run_json(&["cancel", "--coordinator", &coord, &id3]);
    assert!(ok, "{stderr}");
}

#[test]
fn a_file_over_the_upload_limit_is_refused_before_it_is_sent_and_leaves_no_job() {
    let _serial = serial();
    let dir = test_dir();
    let data = dir.path().join("data");
    // The gzipped images are about 1.2 MiB; the labels 4 KiB.
    let (_serve, addr) = spawn_listening(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--max-upload-bytes",
        "1MiB",
    ]);
    let coord = format!("http://{addr}");
    let laptop = dir.path().join("laptop");
    laptop_copy(&laptop);
    let job = mnist_job(
        &laptop,
        "big",
        1,
        &format!("mnist/{IMAGES}"),
        &format!("mnist/{LABELS}"),
    );
    let (ok, v, stderr) = submit_json(&coord, &[job.to_str().unwrap()]);
    assert!(!ok, "an upload over the limit must fail: {v}");
    let size = std::fs::metadata(laptop.join("mnist").join(IMAGES))
        .unwrap()
        .len();
    for needle in [
        "data.train.images",
        IMAGES,
        &format!("{size} bytes"),
        "over the coordinator's upload limit of 1 MiB (1048576 bytes)",
        "--max-upload-bytes",
        "RINGTRAIN_MAX_UPLOAD_BYTES",
    ] {
        assert!(stderr.contains(needle), "error lacks {needle:?}: {stderr}");
    }
    assert!(
        v["error"].as_str().is_some(),
        "--json carries the error: {v}"
    );
    assert!(jobs(&coord).is_empty(), "no job may be created");
    assert_eq!(store_entries(&data), Vec::<String>::new());
}

/// A raw client, as a third-party one would be: the coordinator must refuse a corrupt,
/// short, oversized or disordered upload with the documented code and keep nothing.
#[test]
fn a_corrupt_cut_or_oversized_upload_stream_is_refused_and_leaves_nothing() {
    let _serial = serial();
    let dir = test_dir();
    let data = dir.path().join("data");
    let (_serve, addr) = spawn_listening(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--max-upload-bytes",
        "2MiB",
    ]);
    let coord = format!("http://{addr}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = JobServiceClient::connect(coord.clone()).await.unwrap();
        let bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
        let sha = sha256_hex(&bytes);
        let header = |sha256: &str, size: u64| DataChunk {
            kind: Some(data_chunk::Kind::Header(DataHeader {
                sha256: sha256.into(),
                size,
                name: "x.bin".into(),
            })),
        };
        let chunks = |b: &[u8]| -> Vec<DataChunk> {
            b.chunks(1 << 20)
                .map(|c| DataChunk {
                    kind: Some(data_chunk::Kind::Data(c.to_vec().into())),
                })
                .collect()
        };
        let base = c.clone();
        let with = |first: Vec<DataChunk>, rest: Vec<DataChunk>| {
            let all: Vec<DataChunk> = first.into_iter().chain(rest).collect();
            let mut c = base.clone();
            async move { c.upload_data(tokio_stream::iter(all)).await }
        };

        // A declared digest that is not the bytes' digest.
        let wrong = sha256_hex(b"other bytes");
        let e = with(vec![header(&wrong, bytes.len() as u64)], chunks(&bytes))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(&format!("hash to sha256 {sha}"))
                && e.message().contains(&format!("declared {wrong}"))
                && e.message().contains("nothing was stored"),
            "{e:?}"
        );
        assert_eq!(store_entries(&data), Vec::<String>::new());

        // A stream that ends before the declared size.
        let e = with(
            vec![header(&sha, bytes.len() as u64)],
            chunks(&bytes[..1 << 20]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{e:?}");
        assert!(
            e.message()
                .contains(&format!("ended after 1048576 of its {} bytes", bytes.len())),
            "{e:?}"
        );
        assert_eq!(store_entries(&data), Vec::<String>::new());

        // Declared within the limit, but more than the limit sent.
        let big: Vec<u8> = vec![1u8; (2 << 20) + 10];
        let e = with(vec![header(&sha256_hex(&big), 2 << 20)], chunks(&big))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("--max-upload-bytes"), "{e:?}");
        // Declared over the limit: refused by HasData and UploadData alike.
        let e = c
            .has_data(DataHeader {
                sha256: sha256_hex(&big),
                size: big.len() as u64,
                name: "big.bin".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("limit of 2 MiB"), "{e:?}");
        // Bytes before the header.
        let e = with(chunks(&bytes[..10]), vec![]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("must start with its header"), "{e:?}");
        assert_eq!(store_entries(&data), Vec::<String>::new());

        // A client that goes away mid-upload: its temporary file goes too.
        let (tx, rx) = tokio::sync::mpsc::channel::<DataChunk>(4);
        let mut c2 = c.clone();
        let call = tokio::spawn(async move {
            c2.upload_data(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        tx.send(header(&sha, bytes.len() as u64)).await.unwrap();
        tx.send(chunks(&bytes).remove(0)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store_entries(&data).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the upload's temporary file never appeared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let temp = store_entries(&data);
        assert!(temp[0].starts_with(".upload-"), "{temp:?}");
        call.abort();
        drop(tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !store_entries(&data).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "a broken-off upload left {:?}",
                store_entries(&data)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The same stream done right is stored, and then known.
        let ok = with(vec![header(&sha, bytes.len() as u64)], chunks(&bytes))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((ok.present, ok.received), (true, bytes.len() as u64));
        assert_eq!(ok.path, format!("coordinator:datasets/sha256/{sha}"));
        assert_eq!(store_entries(&data), vec![sha.clone()]);
        let known = c
            .has_data(DataHeader {
                sha256: sha.clone(),
                size: bytes.len() as u64,
                name: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(known.present, "{known:?}");
        // Uploaded again, it is not received again.
        let again = with(vec![header(&sha, bytes.len() as u64)], chunks(&bytes))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((again.present, again.received), (true, 0));
        let none = c.list(ListRequest {}).await.unwrap().into_inner();
        assert!(none.jobs.is_empty());
    });
}

#[test]
fn coordinator_paths_are_read_on_the_coordinator_and_a_missing_one_names_field_and_path() {
    let _serial = serial();
    let dir = test_dir();
    let data = dir.path().join("data");
    let (_serve, coord) = serve(&data);
    let _workers: Vec<Proc> = (0..2).map(|i| worker(&coord, &format!("w{i}"))).collect();
    // The files exist only on the coordinator's side: images relative to its data dir,
    // labels by absolute path.
    let on_coord = data.join("datasets/mnist");
    std::fs::create_dir_all(&on_coord).unwrap();
    for f in [IMAGES, LABELS] {
        std::fs::copy(mnist_dir().join(f), on_coord.join(f)).unwrap();
    }
    let client_dir = dir.path().join("client");
    let job = mnist_job(
        &client_dir,
        "marked",
        1,
        &format!("coordinator:datasets/mnist/{IMAGES}"),
        &format!("coordinator:{}", on_coord.join(LABELS).display()),
    );
    let (ok, v, stderr) = submit_json(&coord, &[job.to_str().unwrap()]);
    assert!(ok, "submit failed: {v} {stderr}");
    assert_eq!(
        v["uploads"],
        serde_json::json!([]),
        "nothing is uploaded: {v}"
    );
    watch_done(&coord, v["job_id"].as_str().unwrap());
    assert_eq!(store_entries(&data), Vec::<String>::new());

    // A marked path the coordinator does not have: refused at submit, naming both.
    let missing = mnist_job(
        &client_dir,
        "missing",
        1,
        "coordinator:datasets/mnist/nope-images.gz",
        &format!("coordinator:datasets/mnist/{LABELS}"),
    );
    let (ok, v, stderr) = submit_json(&coord, &[missing.to_str().unwrap()]);
    assert!(!ok, "a missing coordinator path must fail: {v}");
    let want = data.join("datasets/mnist/nope-images.gz");
    for needle in [
        "data.train.images",
        &format!("file not found on the coordinator: {}", want.display()),
        "--data-dir",
    ] {
        assert!(stderr.contains(needle), "error lacks {needle:?}: {stderr}");
    }
    assert_eq!(jobs(&coord).len(), 1, "only the first job exists");

    // `ringtrain local` reads marked paths on this host (relative to its working
    // directory, its data dir) and uploads nothing.
    let local_job = mnist_job(
        &client_dir,
        "local",
        1,
        &format!("coordinator:datasets/mnist/{IMAGES}"),
        &format!("coordinator:datasets/mnist/{LABELS}"),
    );
    let out = std::process::Command::new(bin())
        .args([
            "local",
            "--workers",
            "1",
            "--json",
            local_job.to_str().unwrap(),
        ])
        .current_dir(&data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "local failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(store_entries(&data), Vec::<String>::new());
}
