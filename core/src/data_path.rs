//! Where a job file's dataset files are read: on the submitting host, on the
//! coordinator's volume (`coordinator:` paths), or from the coordinator's store of
//! uploaded files.
//!
//! A dataset path in a job file is one of:
//! - a plain path (`images = "mnist/train-images-idx3-ubyte"`): a file on the host that
//!   submits. `ringtrain submit` uploads it and binds the field to the stored copy
//!   ([`DataBinding`]); `ringtrain local` reads it where it is. Relative paths resolve
//!   against the job file's directory.
//! - `coordinator:PATH` ([`COORDINATOR_PREFIX`]): already on the coordinator's volume,
//!   never uploaded. PATH is absolute, or relative to the coordinator's data dir.
//!
//! Uploaded files are stored content-addressed at [`object_path`] under the
//! coordinator's data dir; a binding rewrites the field to `coordinator:` + that path, so
//! the rest of the coordinator reads it like any other `coordinator:` path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A dataset path starting with this is on the coordinator's volume: it is not uploaded,
/// and the coordinator reads the rest of it (absolute, or relative to its data dir).
pub const COORDINATOR_PREFIX: &str = "coordinator:";

/// Where uploaded files live, relative to the coordinator's data dir: one file per
/// content, named by the lowercase hex SHA-256 of its bytes.
pub const OBJECTS_DIR: &str = "datasets/sha256";

/// The path after [`COORDINATOR_PREFIX`], when `p` carries it.
pub fn on_coordinator(p: &Path) -> Option<&Path> {
    p.to_str()?.strip_prefix(COORDINATOR_PREFIX).map(Path::new)
}

/// Whether `s` is a SHA-256 digest as the store names files: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where the stored copy of the file with digest `sha256` lives, relative to the
/// coordinator's data dir (`datasets/sha256/<hex>`).
pub fn object_path(sha256: &str) -> PathBuf {
    Path::new(OBJECTS_DIR).join(sha256)
}

/// The digest an [`object_path`] names, when `p` (with or without the data dir in
/// front) is one.
pub fn object_digest(p: &Path) -> Option<&str> {
    let name = p.file_name()?.to_str()?;
    let parent = p.parent()?;
    (parent.ends_with(OBJECTS_DIR) && is_sha256_hex(name)).then_some(name)
}

/// One dataset field of a job file bound to an uploaded file: the coordinator reads the
/// field's data from its store instead of from the path the job file gives (which stays
/// as written, for the saved job file and for messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataBinding {
    /// The field as errors name it: `data.train.images`, `data.test.path`.
    pub field: String,
    /// Lowercase hex SHA-256 of the uploaded file.
    pub sha256: String,
}

/// What dataset paths resolve against, wherever a job file is checked or read.
#[derive(Debug, Clone, Copy)]
pub struct DataRoots<'a> {
    /// The directory plain relative paths resolve against (the job file's directory).
    pub base: &'a Path,
    /// The coordinator's data dir, when the job file is read on the coordinator:
    /// `coordinator:` paths resolve against it. `None` on a client, which cannot see the
    /// coordinator's volume: such paths are left as they are and not checked.
    pub coordinator: Option<&'a Path>,
}

/// A dataset path, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// A file on this host (plain path joined to the base, or a `coordinator:` path
    /// joined to the data dir on the coordinator).
    Here(PathBuf),
    /// A `coordinator:` path seen from a client: not this host's to check.
    Elsewhere,
}

impl DataRoots<'_> {
    /// Roots on a client: plain paths against `base`, `coordinator:` paths unchecked.
    pub fn client(base: &Path) -> DataRoots<'_> {
        DataRoots {
            base,
            coordinator: None,
        }
    }

    /// Where `p` is read.
    pub fn locate(&self, p: &Path) -> Located {
        match (on_coordinator(p), self.coordinator) {
            (Some(rest), Some(data_dir)) => Located::Here(data_dir.join(rest)),
            (Some(_), None) => Located::Elsewhere,
            (None, _) => Located::Here(self.base.join(p)),
        }
    }

    /// The message for a dataset file that `p` names but that is not there (`full`,
    /// where it was looked for).
    pub fn missing(&self, p: &Path, full: &Path) -> String {
        let Some(rest) = on_coordinator(p) else {
            return format!(
                "file not found: {} (paths resolve relative to the job file's directory)",
                full.display()
            );
        };
        if let Some(digest) = object_digest(rest) {
            return format!(
                "the uploaded file with sha256 {digest} is not in the coordinator's store \
                 ({} is missing: it was deleted, or the coordinator runs with another \
                 --data-dir); submit again from the host with the file to upload it",
                full.display()
            );
        }
        let data_dir = self.coordinator.unwrap_or(Path::new("."));
        format!(
            "file not found on the coordinator: {} ({COORDINATOR_PREFIX}{} names a file on \
             the coordinator's volume, relative to its --data-dir {}; fix the path, or drop \
             the {COORDINATOR_PREFIX} prefix to upload a file from this host)",
            full.display(),
            rest.display(),
            data_dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_marker_is_recognised_only_at_the_start() {
        assert_eq!(
            on_coordinator(Path::new("coordinator:/srv/a.csv")),
            Some(Path::new("/srv/a.csv"))
        );
        assert_eq!(
            on_coordinator(Path::new("coordinator:datasets/a.csv")),
            Some(Path::new("datasets/a.csv"))
        );
        assert_eq!(on_coordinator(Path::new("data/coordinator:a.csv")), None);
        assert_eq!(on_coordinator(Path::new("a.csv")), None);
    }

    #[test]
    fn paths_locate_against_the_right_root() {
        let client = DataRoots::client(Path::new("/home/u/job"));
        assert_eq!(
            client.locate(Path::new("mnist/x")),
            Located::Here(PathBuf::from("/home/u/job/mnist/x"))
        );
        assert_eq!(
            client.locate(Path::new("coordinator:mnist/x")),
            Located::Elsewhere
        );
        let server = DataRoots {
            base: Path::new("/srv/base"),
            coordinator: Some(Path::new("/var/lib/ringtrain")),
        };
        assert_eq!(
            server.locate(Path::new("coordinator:mnist/x")),
            Located::Here(PathBuf::from("/var/lib/ringtrain/mnist/x"))
        );
        assert_eq!(
            server.locate(Path::new("coordinator:/data/x")),
            Located::Here(PathBuf::from("/data/x"))
        );
        assert_eq!(
            server.locate(Path::new("/abs/x")),
            Located::Here(PathBuf::from("/abs/x"))
        );
    }

    #[test]
    fn object_paths_round_trip_and_only_digests_name_objects() {
        let p = object_path(HEX);
        assert_eq!(p, PathBuf::from(format!("datasets/sha256/{HEX}")));
        assert_eq!(object_digest(&p), Some(HEX));
        assert_eq!(
            object_digest(&Path::new("/var/lib/ringtrain").join(&p)),
            Some(HEX)
        );
        assert_eq!(object_digest(Path::new("datasets/sha256/abc")), None);
        assert_eq!(object_digest(&Path::new("datasets/other").join(HEX)), None);
        assert!(is_sha256_hex(HEX));
        assert!(!is_sha256_hex(&HEX.to_uppercase()));
        assert!(!is_sha256_hex(&HEX[1..]));
    }

    fn idx_job(images: &str, labels: &str) -> crate::job_file::JobFile {
        let text = format!(
            r#"
name = "x"
epochs = 1
batch_size = 4
[data]
train = {{ format = "idx", images = "{images}", labels = "{labels}" }}
test = {{ format = "csv", path = "t.csv" }}
[model]
input = 784
layers = [{{ dense = 10, activation = "softmax" }}]
[train]
loss = "sparse_categorical_crossentropy"
"#
        );
        crate::job_file::JobFile::parse(&text, "job.toml").unwrap()
    }

    #[test]
    fn dataset_files_are_listed_by_field() {
        let j = idx_job("a", "coordinator:b");
        let files: Vec<(String, PathBuf)> = j
            .dataset_files()
            .into_iter()
            .map(|(f, p)| (f, p.to_path_buf()))
            .collect();
        assert_eq!(
            files,
            [
                ("data.train.images".to_string(), PathBuf::from("a")),
                (
                    "data.train.labels".to_string(),
                    PathBuf::from("coordinator:b")
                ),
                ("data.test.path".to_string(), PathBuf::from("t.csv")),
            ]
        );
    }

    #[test]
    fn a_client_skips_coordinator_paths_and_the_coordinator_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        std::fs::write(dir.path().join("t.csv"), b"x").unwrap();
        let j = idx_job("a", "coordinator:mnist/labels");
        j.validate("job.toml", &DataRoots::client(dir.path()))
            .unwrap();
        let data_dir = tempfile::tempdir().unwrap();
        let server = DataRoots {
            base: dir.path(),
            coordinator: Some(data_dir.path()),
        };
        let e = j.validate("job.toml", &server).unwrap_err();
        assert_eq!(e.field, "data.train.labels");
        let want = data_dir.path().join("mnist/labels");
        assert!(
            e.message.contains(&format!(
                "file not found on the coordinator: {}",
                want.display()
            )),
            "{e}"
        );
        std::fs::create_dir_all(data_dir.path().join("mnist")).unwrap();
        std::fs::write(&want, b"x").unwrap();
        j.validate("job.toml", &server).unwrap();
        let resolved = j.resolved(&server);
        assert_eq!(resolved.dataset_files()[1].1, want.as_path());
    }

    #[test]
    fn uploads_bind_fields_to_objects_and_bad_bindings_are_named() {
        let mut j = idx_job("a", "b");
        j.bind_uploads(
            &[DataBinding {
                field: "data.train.labels".into(),
                sha256: HEX.into(),
            }],
            "job.toml",
        )
        .unwrap();
        assert_eq!(
            j.dataset_files()[1].1,
            Path::new(&format!("coordinator:datasets/sha256/{HEX}"))
        );
        let e = j
            .bind_uploads(
                &[DataBinding {
                    field: "data.validation.path".into(),
                    sha256: HEX.into(),
                }],
                "job.toml",
            )
            .unwrap_err();
        assert_eq!(e.field, "data.validation.path");
        assert!(e.message.contains("no such dataset file"), "{e}");
        let e = j
            .bind_uploads(
                &[DataBinding {
                    field: "data.train.images".into(),
                    sha256: "../../etc/passwd".into(),
                }],
                "job.toml",
            )
            .unwrap_err();
        assert!(e.message.contains("not 64 lowercase hex"), "{e}");
    }

    #[test]
    fn a_resume_compares_uploaded_files_by_content_not_by_where_they_came_from() {
        let data_dir = Path::new("/var/lib/ringtrain");
        let bound = |images: &str, digest: &str| {
            let mut j = idx_job(images, "b");
            j.bind_uploads(
                &[DataBinding {
                    field: "data.train.images".into(),
                    sha256: digest.into(),
                }],
                "job.toml",
            )
            .unwrap();
            j.resolved(&DataRoots {
                base: Path::new("/srv"),
                coordinator: Some(data_dir),
            })
        };
        // The same bytes uploaded from another directory, under another name.
        let saved = bound("/home/a/mnist/images", HEX);
        let again = bound("../elsewhere/images.idx", HEX);
        crate::job_file::check_resume(&saved, &again, "job.toml", "runs/x").unwrap();
        let other = "0".repeat(64);
        let changed = bound("/home/a/mnist/images", &other);
        let e = crate::job_file::check_resume(&saved, &changed, "job.toml", "runs/x").unwrap_err();
        assert_eq!(e.field, "data.train.images");
        assert!(e.message.contains(HEX) && e.message.contains(&other), "{e}");
    }

    #[test]
    fn missing_files_are_explained_by_kind() {
        let server = DataRoots {
            base: Path::new("/b"),
            coordinator: Some(Path::new("/var/lib/ringtrain")),
        };
        let m = server.missing(Path::new("x.csv"), Path::new("/b/x.csv"));
        assert!(m.starts_with("file not found: /b/x.csv"), "{m}");
        let m = server.missing(
            Path::new("coordinator:mnist/x"),
            Path::new("/var/lib/ringtrain/mnist/x"),
        );
        assert!(
            m.contains("file not found on the coordinator: /var/lib/ringtrain/mnist/x")
                && m.contains("--data-dir /var/lib/ringtrain"),
            "{m}"
        );
        let obj = format!("coordinator:datasets/sha256/{HEX}");
        let m = server.missing(Path::new(&obj), Path::new("/var/lib/ringtrain/x"));
        assert!(
            m.contains(&format!("uploaded file with sha256 {HEX}")) && m.contains("submit again"),
            "{m}"
        );
    }
}
