//! The coordinator's store of uploaded dataset files: one file per content, named by its
//! SHA-256, under `<data-dir>/datasets/sha256/`.
//!
//! An upload is written to a temporary file in the store's own directory (so the final
//! rename never crosses a filesystem), hashed as it arrives, and renamed into place only
//! when its length and digest match what the client declared, after an fsync. Every
//! other outcome, an early end, a wrong digest, a limit hit, a broken stream or a panic,
//! drops the [`Incoming`] upload, which deletes its temporary file: the store only ever
//! holds complete, verified objects. The same content uploaded again is found by its
//! digest and never written twice.
//!
//! Objects are not garbage-collected: a run can be resumed as long as its data is here.
//! Everything here is blocking file I/O: callers run it on a blocking thread.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ringtrain_core::data_path::{self, COORDINATOR_PREFIX};
use ringtrain_proto::v1::DataHeader;
use sha2::{Digest, Sha256};

use crate::config::format_bytes;
use crate::error::CoordinatorError;

/// Most bytes one `data` message of an upload may carry (the API's contract).
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Prefix of the temporary files uploads are written to, beside the objects (hidden, and
/// never a 64-hex-digit name, so never mistaken for an object).
const TEMP_PREFIX: &str = ".upload-";

/// The store under one data dir, with its per-file limit.
#[derive(Debug, Clone)]
pub struct DataStore {
    dir: PathBuf,
    max_bytes: u64,
}

/// A file the store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredData {
    /// Lowercase hex SHA-256 of its bytes.
    pub sha256: String,
    /// Its length.
    pub size: u64,
    /// Bytes written by the call that returned this (0: it was already stored).
    pub received: u64,
}

impl StoredData {
    /// The path a job file may name it by (`coordinator:datasets/sha256/<hex>`).
    pub fn job_file_path(&self) -> String {
        format!(
            "{COORDINATOR_PREFIX}{}",
            data_path::object_path(&self.sha256).display()
        )
    }
}

impl DataStore {
    /// The store under `data_dir`, refusing files over `max_bytes`.
    pub fn new(data_dir: &Path, max_bytes: u64) -> DataStore {
        DataStore {
            dir: data_dir.join(data_path::OBJECTS_DIR),
            max_bytes,
        }
    }

    /// The directory objects live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The per-file limit, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Checks a header before anything is read or written: a well-formed digest, and a
    /// size within the limit.
    pub fn check(&self, header: &DataHeader) -> Result<(), CoordinatorError> {
        if !data_path::is_sha256_hex(&header.sha256) {
            return Err(CoordinatorError::BadRequest(format!(
                "upload of {}: sha256 {:?} is not 64 lowercase hex digits",
                shown_name(header),
                header.sha256
            )));
        }
        if header.size > self.max_bytes {
            return Err(self.too_large(header, header.size));
        }
        Ok(())
    }

    fn too_large(&self, header: &DataHeader, size: u64) -> CoordinatorError {
        CoordinatorError::TooLarge(format!(
            "{}: {size} bytes ({}) is over the coordinator's upload limit of {} ({} bytes); \
             raise it with `ringtrain serve --max-upload-bytes SIZE` (env \
             RINGTRAIN_MAX_UPLOAD_BYTES), or put the file on the coordinator's volume and \
             name it {COORDINATOR_PREFIX}PATH in the job file",
            shown_name(header),
            format_bytes(size),
            format_bytes(self.max_bytes),
            self.max_bytes
        ))
    }

    /// The stored object with digest `sha256`, when there is one.
    pub fn lookup(&self, sha256: &str) -> Result<Option<StoredData>, CoordinatorError> {
        let path = self.dir.join(sha256);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(StoredData {
                sha256: sha256.to_string(),
                size: m.len(),
                received: 0,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CoordinatorError::io(format!("reading {}", path.display()))(
                e,
            )),
        }
    }

    /// Starts receiving the file `header` announces ([`DataStore::check`] it first).
    pub fn begin(&self, header: &DataHeader) -> Result<Incoming, CoordinatorError> {
        fs::create_dir_all(&self.dir).map_err(CoordinatorError::io(format!(
            "creating {}",
            self.dir.display()
        )))?;
        let nonce: [u8; 8] = random_nonce()?;
        let tmp = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            &header.sha256[..16.min(header.sha256.len())],
            hex(&nonce)
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(CoordinatorError::io(format!("creating {}", tmp.display())))?;
        Ok(Incoming {
            store: self.clone(),
            header: header.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            received: 0,
        })
    }
}

/// An upload in progress. Dropped before [`Incoming::finish`] succeeds, it deletes its
/// temporary file.
#[derive(Debug)]
pub struct Incoming {
    store: DataStore,
    header: DataHeader,
    tmp: PathBuf,
    /// `None` once the file is renamed into place (nothing left to delete).
    file: Option<File>,
    hasher: Sha256,
    received: u64,
}

impl Incoming {
    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends the next chunk, refusing one that is too big or runs past the declared
    /// size or the limit.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), CoordinatorError> {
        let name = shown_name(&self.header);
        if chunk.len() > MAX_CHUNK_BYTES {
            return Err(CoordinatorError::BadRequest(format!(
                "upload of {name}: a chunk of {} bytes is over the {MAX_CHUNK_BYTES} bytes \
                 (1 MiB) one message may carry; nothing was stored",
                chunk.len()
            )));
        }
        let after = self.received + chunk.len() as u64;
        if after > self.store.max_bytes {
            return Err(self.store.too_large(&self.header, after));
        }
        if after > self.header.size {
            return Err(CoordinatorError::BadRequest(format!(
                "upload of {name}: more bytes arrived than the {} its header declared; nothing \
                 was stored (did the file grow while it was uploaded? upload it again)",
                self.header.size
            )));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(CoordinatorError::BadRequest(format!(
                "upload of {name}: bytes after the upload was finished"
            )));
        };
        file.write_all(chunk).map_err(CoordinatorError::io(format!(
            "writing {}",
            self.tmp.display()
        )))?;
        self.hasher.update(chunk);
        self.received = after;
        Ok(())
    }

    /// Checks length and digest, syncs the file and renames it into place. An object
    /// that appeared meanwhile (the same content uploaded concurrently) is kept and this
    /// copy dropped.
    pub fn finish(mut self) -> Result<StoredData, CoordinatorError> {
        let name = shown_name(&self.header);
        let declared = self.header.size;
        if self.received < declared {
            return Err(CoordinatorError::Aborted(format!(
                "upload of {name} ended after {} of its {declared} bytes; nothing was stored \
                 (upload it again)",
                self.received
            )));
        }
        let digest = hex(&std::mem::take(&mut self.hasher).finalize());
        if digest != self.header.sha256 {
            return Err(CoordinatorError::BadRequest(format!(
                "upload of {name}: the {declared} bytes received hash to sha256 {digest}, but \
                 the header declared {}; nothing was stored (did the file change while it was \
                 uploaded? upload it again)",
                self.header.sha256
            )));
        }
        let Some(file) = self.file.take() else {
            return Err(CoordinatorError::BadRequest(format!(
                "upload of {name} was already finished"
            )));
        };
        let tmp = self.tmp.clone();
        let dest = self.store.dir.join(&digest);
        let result = file
            .sync_all()
            .and_then(|_| {
                drop(file);
                if dest.is_file() {
                    fs::remove_file(&tmp)
                } else {
                    fs::rename(&tmp, &dest)
                }
            })
            // The rename is durable once the directory entry is; a directory that cannot
            // be opened for syncing (some filesystems) still has the file.
            .map(|_| {
                if let Ok(d) = File::open(&self.store.dir) {
                    let _ = d.sync_all();
                }
            });
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(CoordinatorError::io(format!("storing {}", dest.display()))(
                e,
            ));
        }
        Ok(StoredData {
            sha256: digest,
            size: self.received,
            received: self.received,
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Still holding the file: the upload did not finish, so its bytes go.
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The header's file name for messages (`the upload` when it gave none).
fn shown_name(header: &DataHeader) -> String {
    if header.name.is_empty() {
        format!("sha256 {}", header.sha256)
    } else {
        format!("{:?}", header.name)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_nonce() -> Result<[u8; 8], CoordinatorError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| CoordinatorError::Io {
        context: "drawing a temporary file name".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    fn header(bytes: &[u8]) -> DataHeader {
        DataHeader {
            sha256: sha(bytes),
            size: bytes.len() as u64,
            name: "x.csv".into(),
        }
    }

    /// Every entry of the store's directory (objects and temporary files).
    fn entries(store: &DataStore) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(store.dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn a_complete_upload_lands_under_its_digest_and_is_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = DataStore::new(dir.path(), 1 << 20);
        let bytes = b"a,b,label\n1,2,0\n".repeat(100);
        let h = header(&bytes);
        store.check(&h).unwrap();
        assert_eq!(store.lookup(&h.sha256).unwrap(), None);
        let mut up = store.begin(&h).unwrap();
        for c in bytes.chunks(7) {
            up.write(c).unwrap();
        }
        let got = up.finish().unwrap();
        assert_eq!(got.received, bytes.len() as u64);
        assert_eq!(
            got.job_file_path(),
            format!("coordinator:datasets/sha256/{}", h.sha256)
        );
        assert_eq!(
            fs::read(dir.path().join("datasets/sha256").join(&h.sha256)).unwrap(),
            bytes
        );
        assert_eq!(entries(&store), vec![h.sha256.clone()]);
        let again = store.lookup(&h.sha256).unwrap().unwrap();
        assert_eq!((again.size, again.received), (bytes.len() as u64, 0));
    }

    #[test]
    fn a_wrong_digest_or_an_early_end_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DataStore::new(dir.path(), 1 << 20);
        let bytes = b"0123456789".repeat(10);
        let mut h = header(&bytes);
        h.sha256 = sha(b"something else");
        let mut up = store.begin(&h).unwrap();
        up.write(&bytes).unwrap();
        assert_eq!(
            entries(&store).len(),
            1,
            "the temporary file exists meanwhile"
        );
        let e = up.finish().unwrap_err();
        assert!(matches!(e, CoordinatorError::BadRequest(_)), "{e}");
        assert!(e.to_string().contains("but the header declared"), "{e}");
        assert!(entries(&store).is_empty(), "{:?}", entries(&store));

        let h = header(&bytes);
        let mut up = store.begin(&h).unwrap();
        up.write(&bytes[..40]).unwrap();
        let e = up.finish().unwrap_err();
        assert!(matches!(e, CoordinatorError::Aborted(_)), "{e}");
        assert!(
            e.to_string().contains("ended after 40 of its 100 bytes"),
            "{e}"
        );
        assert!(entries(&store).is_empty());

        // Dropped mid-way (a client that went away): nothing stays either.
        let mut up = store.begin(&h).unwrap();
        up.write(&bytes[..10]).unwrap();
        drop(up);
        assert!(entries(&store).is_empty());
    }

    #[test]
    fn sizes_over_the_limit_or_the_header_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = DataStore::new(dir.path(), 64);
        let bytes = vec![7u8; 100];
        let e = store.check(&header(&bytes)).unwrap_err();
        assert!(matches!(e, CoordinatorError::TooLarge(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("\"x.csv\": 100 bytes")
                && text.contains("limit of 64 B (64 bytes)")
                && text.contains("--max-upload-bytes")
                && text.contains("RINGTRAIN_MAX_UPLOAD_BYTES"),
            "{text}"
        );
        // A header that lies about the size is caught while streaming.
        let mut lying = header(&bytes);
        lying.size = 50;
        let mut up = store.begin(&lying).unwrap();
        up.write(&bytes[..50]).unwrap();
        let e = up.write(&bytes[50..60]).unwrap_err();
        assert!(e.to_string().contains("more bytes arrived"), "{e}");
        drop(up);
        lying.size = 60;
        let mut up = store.begin(&lying).unwrap();
        up.write(&bytes[..60]).unwrap();
        drop(up);
        let store = DataStore::new(dir.path(), 40);
        let mut up = store.begin(&lying).unwrap();
        let e = up.write(&bytes[..60]).unwrap_err();
        assert!(matches!(e, CoordinatorError::TooLarge(_)), "{e}");
        drop(up);
        assert!(entries(&store).is_empty());
        let e = store
            .check(&DataHeader {
                sha256: "../../etc/passwd".into(),
                size: 1,
                name: String::new(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("not 64 lowercase hex"), "{e}");
    }
}
