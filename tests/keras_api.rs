//! The Keras-style API end to end: real data formats, saved models, predict/evaluate,
//! early stopping, curves, and bad input that names its place.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn examples() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let (ok, v, stderr) = run_json(args);
    assert!(ok, "{args:?} failed: {v} {stderr}");
    v
}

fn fails_naming(args: &[&str], needles: &[&str]) {
    let (ok, v, stderr) = run_json(args);
    assert!(!ok, "{args:?} should fail but gave {v}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: error lacks {n:?}: {stderr}");
    }
}

#[test]
fn mnist_reaches_95_percent_and_evaluate_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mnist");
    let job = examples().join("mnist.toml");
    let v = ok_json(&[
        "local",
        "--workers",
        "3",
        "--out",
        out.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    let test_acc = v["metrics"]["test_accuracy"].as_f64().unwrap();
    assert!(test_acc >= 0.95, "test_accuracy {test_acc}");
    let data = examples().join("data/mnist-10k");
    let e = ok_json(&[
        "evaluate",
        "--model",
        out.to_str().unwrap(),
        "--idx",
        data.join("t10k-images-idx3-ubyte.gz").to_str().unwrap(),
        data.join("t10k-labels-idx1-ubyte.gz").to_str().unwrap(),
    ]);
    assert_eq!(e["samples"], 1000);
    // Same model, same images: at most one borderline image may flip between the
    // cluster's batched forward passes and evaluate's single pass.
    let acc = e["metrics"]["accuracy"].as_f64().unwrap();
    assert!(
        (acc - test_acc).abs() <= 0.001,
        "evaluate {acc} vs training run {test_acc}"
    );
    let cm = e["confusion_matrix"].as_array().unwrap();
    assert_eq!(cm.len(), 10);
    let total: u64 = cm
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(total, 1000);
    assert!(out.join("curves.png").is_file(), "local writes curves.png");
    let p = ok_json(&[
        "plot",
        out.to_str().unwrap(),
        "--output",
        dir.path().join("c.png").to_str().unwrap(),
    ]);
    assert_eq!(p["panels"], serde_json::json!(["loss", "accuracy"]));
    let png = std::fs::read(dir.path().join("c.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn csv_binary_job_with_standardization_trains_evaluates_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("credit");
    let job = examples().join("credit-binary.toml");
    let v = ok_json(&[
        "local",
        "--out",
        out.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    assert!(v["metrics"]["val_accuracy"].as_f64().unwrap() > 0.75, "{v}");
    for k in ["precision", "recall", "f1", "val_f1"] {
        assert!(v["metrics"][k].as_f64().is_some(), "{k} missing: {v}");
    }
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(card["normalization"]["kind"], "standard");
    assert_eq!(card["normalization"]["mean"].as_array().unwrap().len(), 5);

    let csv = examples().join("data/credit.csv");
    let e = ok_json(&[
        "evaluate",
        "--model",
        out.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(e["samples"], 1500);
    assert!(e["metrics"]["accuracy"].as_f64().unwrap() > 0.75);
    assert_eq!(e["confusion_matrix"].as_array().unwrap().len(), 2);

    // The training CSV without its label column.
    let text = std::fs::read_to_string(&csv).unwrap();
    let unlabeled: String = text
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string() + "\n")
        .collect();
    let features_only = dir.path().join("features.csv");
    std::fs::write(&features_only, unlabeled).unwrap();
    let preds = dir.path().join("preds.csv");
    let p = ok_json(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--csv",
        features_only.to_str().unwrap(),
        "--output",
        preds.to_str().unwrap(),
    ]);
    assert_eq!(p["rows"], 1500);
    let lines: Vec<String> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines[0], "row,class,p_0,p_1");
    assert_eq!(lines.len(), 1501);
    let first: Vec<f64> = lines[1]
        .split(',')
        .skip(2)
        .map(|v| v.parse().unwrap())
        .collect();
    assert!((first[0] + first[1] - 1.0).abs() < 1e-5);

    // A model trained on 8 features refuses 5, saying expected vs got.
    let reg_out = dir.path().join("reg");
    let reg = tiny_regression_job(dir.path());
    ok_json(&[
        "local",
        "--workers",
        "1",
        "--out",
        reg_out.to_str().unwrap(),
        reg.to_str().unwrap(),
    ]);
    fails_naming(
        &[
            "predict",
            "--model",
            reg_out.to_str().unwrap(),
            "--csv",
            features_only.to_str().unwrap(),
        ],
        &["expects 8 features", "has 5"],
    );

    // One flipped bit in the weights: predict and evaluate refuse the model, naming the
    // file and both hashes, and exit non-zero (no panic).
    let weights = reg_out.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let reg_csv = dir.path().join("reg.csv");
    std::fs::write(&reg_csv, "a,b,c,d,e,f,g,h\n1,2,3,4,5,6,7,8\n").unwrap();
    for cmd in ["predict", "evaluate"] {
        fails_naming(
            &[
                cmd,
                "--model",
                reg_out.to_str().unwrap(),
                "--csv",
                reg_csv.to_str().unwrap(),
            ],
            &["model.safetensors does not match model.json", "SHA-256"],
        );
    }
}

fn tiny_regression_job(dir: &Path) -> PathBuf {
    let text = r#"
name = "reg"
epochs = 2
batch_size = 32
[data]
train = { format = "synthetic", task = "regression", samples = 500, features = 8 }
[model]
input = 8
layers = [{ dense = 8, activation = "elu" }, { dense = 1 }]
[train]
loss = "mse"
metrics = ["mae", "r2"]
optimizer = { sgd = { learning_rate = 0.05, momentum = 0.9, nesterov = true } }
"#;
    let p = dir.join("reg.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes a CSV of `rows` noisy two-class examples with 10 features; a small LCG keeps it
/// reproducible.
fn write_noisy_csv(path: &Path, rows: usize, seed: u64) {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let mut text = String::from("f0,f1,f2,f3,f4,f5,f6,f7,f8,f9,label\n");
    for _ in 0..rows {
        let x: Vec<f64> = (0..10).map(|_| next() * 2.0 - 1.0).collect();
        // A weak signal plus 35% label noise: easy to overfit with a big model.
        let clean = x[0] + 0.5 * x[1] > 0.0;
        let label = if next() < 0.35 { !clean } else { clean };
        let cells: Vec<String> = x.iter().map(|v| format!("{v:.5}")).collect();
        text.push_str(&format!("{},{}\n", cells.join(","), u8::from(label)));
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn early_stopping_stops_an_overfitting_job_and_restores_the_best_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_noisy_csv(&dir.path().join("train.csv"), 300, 1);
    write_noisy_csv(&dir.path().join("val.csv"), 300, 2);
    let job = dir.path().join("overfit.toml");
    std::fs::write(
        &job,
        r#"
name = "overfit"
seed = 1
epochs = 200
batch_size = 16
[data]
train = { format = "csv", path = "train.csv" }
validation = { format = "csv", path = "val.csv" }
[model]
input = 10
layers = [
  { dense = 256, activation = "relu" },
  { dense = 256, activation = "relu" },
  { dense = 2, activation = "softmax" },
]
[train]
optimizer = { adam = { learning_rate = 0.003 } }
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
early_stopping = { monitor = "val_loss", patience = 4, restore_best = true }
"#,
    )
    .unwrap();
    let out = dir.path().join("run");
    let v = ok_json(&[
        "local",
        "--workers",
        "2",
        "--out",
        out.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    let stopped = v["stopped_epoch"]
        .as_u64()
        .expect("the job should stop early");
    assert!(stopped < 200, "{v}");
    let history: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(history.len() as u64, stopped);
    let val: Vec<f64> = history
        .iter()
        .map(|h| h["val_loss"].as_f64().unwrap())
        .collect();
    let (best_epoch, best) =
        val.iter().enumerate().fold(
            (0, f64::INFINITY),
            |b, (i, &v)| if v < b.1 { (i, v) } else { b },
        );
    assert_eq!(
        val.len() - 1 - best_epoch,
        4,
        "stops `patience` epochs after the best, as Keras does"
    );
    assert!(
        val[val.len() - 1] > best,
        "the last epoch is worse than the best"
    );
    // The saved model is the best epoch's: its validation loss is the minimum.
    let e = ok_json(&[
        "evaluate",
        "--model",
        out.to_str().unwrap(),
        "--csv",
        dir.path().join("val.csv").to_str().unwrap(),
    ]);
    let restored = e["loss"].as_f64().unwrap();
    assert!(
        (restored - best).abs() <= 1e-4 * best.max(1.0),
        "restored {restored} vs best {best}"
    );
}

fn write_job_for(dir: &Path, train: &str) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(
        &p,
        format!(
            r#"
name = "bad"
epochs = 1
batch_size = 4
[data]
train = {train}
[model]
input = 2
layers = [{{ dense = 3, activation = "softmax" }}]
[train]
loss = "sparse_categorical_crossentropy"
"#
        ),
    )
    .unwrap();
    p
}

#[test]
fn bad_data_in_every_format_names_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let csv_case = |name: &str, body: &str, needles: &[&str]| {
        let f = d.join(name);
        std::fs::write(&f, body).unwrap();
        let job = write_job_for(d, &format!(r#"{{ format = "csv", path = "{name}" }}"#));
        fails_naming(&["local", job.to_str().unwrap()], needles);
    };
    csv_case(
        "cell.csv",
        "a,b,label\n1,2,0\n3,x,1\n",
        &["cell.csv", "line 3", "column 2", "\"b\"", "not a number"],
    );
    csv_case(
        "nan.csv",
        "a,b,label\n1,NaN,0\n",
        &["nan.csv", "line 2", "column 2"],
    );
    csv_case(
        "ragged.csv",
        "a,b,label\n1,2,0\n1,2\n",
        &["ragged.csv", "line 3", "ragged"],
    );
    csv_case(
        "range.csv",
        "a,b,label\n1,2,0\n1,2,3\n",
        &["range.csv", "line 3", "label 3", "out of range"],
    );

    use ringtrain_coordinator::npy::write_npy_f32;
    write_npy_f32(&d.join("x.npy"), &[1.0, 2.0, f32::NAN, 4.0], &[2, 2]).unwrap();
    write_npy_f32(&d.join("y.npy"), &[0.0, 1.0], &[2]).unwrap();
    let job = write_job_for(
        d,
        r#"{ format = "npy", features = "x.npy", labels = "y.npy" }"#,
    );
    fails_naming(
        &["local", job.to_str().unwrap()],
        &["x.npy", "row 1", "NaN"],
    );
    write_npy_f32(&d.join("x2.npy"), &[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    write_npy_f32(&d.join("y2.npy"), &[0.0, 5.0], &[2]).unwrap();
    let job = write_job_for(
        d,
        r#"{ format = "npy", features = "x2.npy", labels = "y2.npy" }"#,
    );
    fails_naming(
        &["local", job.to_str().unwrap()],
        &["y2.npy", "element 1", "label 5"],
    );

    std::fs::write(
        d.join("img"),
        [0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 1, 2],
    )
    .unwrap();
    std::fs::write(d.join("lab"), [0u8, 0, 8, 1, 0, 0, 0, 2, 0, 1]).unwrap();
    let job = write_job_for(d, r#"{ format = "idx", images = "img", labels = "lab" }"#);
    fails_naming(
        &["local", job.to_str().unwrap()],
        &["img", "header says 2 images"],
    );
}
