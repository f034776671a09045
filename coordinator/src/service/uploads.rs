//! Dataset uploads (`JobService.HasData`, `JobService.UploadData`): the stream's
//! protocol around the [`DataStore`], whose file I/O runs on blocking threads.

use futures::{Stream, StreamExt};
use ringtrain_core::data_path::DataBinding;
use ringtrain_proto::v1::{self as pb, data_chunk, DataChunk, DataHeader, DataRef};
use tracing::info;

use super::Coordinator;
use crate::data_store::{DataStore, Incoming, StoredData};
use crate::error::CoordinatorError;

/// Runs blocking store I/O off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoordinatorError> + Send + 'static,
) -> Result<T, CoordinatorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordinatorError::Transport(e.to_string()))?
}

/// A submit's uploaded fields in the job file's vocabulary.
pub(super) fn bindings(uploaded: &[pb::DataBinding]) -> Vec<DataBinding> {
    uploaded
        .iter()
        .map(|b| DataBinding {
            field: b.field.clone(),
            sha256: b.sha256.clone(),
        })
        .collect()
}

/// The reverse of [`bindings`], for requests rebuilt from saved state.
pub(super) fn to_proto(bindings: &[DataBinding]) -> Vec<pb::DataBinding> {
    bindings
        .iter()
        .map(|b| pb::DataBinding {
            field: b.field.clone(),
            sha256: b.sha256.clone(),
        })
        .collect()
}

impl Coordinator {
    fn data_store(&self) -> DataStore {
        DataStore::new(&self.config.data_dir, self.config.max_upload_bytes)
    }

    fn data_ref(&self, stored: &StoredData) -> DataRef {
        DataRef {
            sha256: stored.sha256.clone(),
            size: stored.size,
            present: true,
            path: stored.job_file_path(),
            received: stored.received,
            max_upload_bytes: self.config.max_upload_bytes,
        }
    }

    /// Whether the store holds the file `header` names; a size over the limit is refused
    /// as an upload of it would be.
    pub async fn has_data(&self, header: DataHeader) -> Result<DataRef, CoordinatorError> {
        let store = self.data_store();
        store.check(&header)?;
        let sha = header.sha256.clone();
        match blocking(move || store.lookup(&sha)).await? {
            Some(stored) => Ok(self.data_ref(&stored)),
            None => Ok(DataRef {
                sha256: header.sha256,
                size: header.size,
                present: false,
                path: String::new(),
                received: 0,
                max_upload_bytes: self.config.max_upload_bytes,
            }),
        }
    }

    /// Receives one uploaded file (a header, then its bytes) into the store; see the
    /// contract on `UploadData` in the proto. A file already stored is not received again.
    pub async fn upload_data<S>(&self, mut chunks: S) -> Result<DataRef, CoordinatorError>
    where
        S: Stream<Item = Result<DataChunk, tonic::Status>> + Unpin,
    {
        let header = match chunks.next().await {
            Some(Ok(DataChunk {
                kind: Some(data_chunk::Kind::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(CoordinatorError::BadRequest(
                    "an upload must start with its header (size, sha256, name); nothing was \
                     stored"
                        .into(),
                ))
            }
            Some(Err(s)) => {
                return Err(CoordinatorError::Aborted(format!(
                    "the upload broke off before its header: {}",
                    s.message()
                )))
            }
            None => {
                return Err(CoordinatorError::Aborted(
                    "the upload stream ended before its header".into(),
                ))
            }
        };
        let store = self.data_store();
        store.check(&header)?;
        let (s, sha) = (store.clone(), header.sha256.clone());
        if let Some(stored) = blocking(move || s.lookup(&sha)).await? {
            info!(sha256 = %stored.sha256, name = %header.name, "upload skipped: already stored");
            return Ok(self.data_ref(&stored));
        }
        let h = header.clone();
        let mut incoming: Incoming = blocking(move || store.begin(&h)).await?;
        while let Some(msg) = chunks.next().await {
            let msg = msg.map_err(|s| {
                CoordinatorError::Aborted(format!(
                    "the upload of {:?} broke off after {} of its {} bytes: {}; nothing was \
                     stored (upload it again)",
                    header.name,
                    incoming.received(),
                    header.size,
                    s.message()
                ))
            })?;
            let bytes = match msg.kind {
                Some(data_chunk::Kind::Data(b)) => b,
                Some(data_chunk::Kind::Header(_)) | None => {
                    return Err(CoordinatorError::BadRequest(format!(
                        "upload of {:?}: a message other than data after the header; nothing \
                         was stored",
                        header.name
                    )))
                }
            };
            // The upload moves to the blocking thread and back; if that thread dies, the
            // upload is dropped there and its temporary file with it.
            incoming = blocking(move || incoming.write(&bytes).map(|_| incoming)).await?;
        }
        let stored = blocking(move || incoming.finish()).await?;
        info!(
            sha256 = %stored.sha256,
            bytes = stored.received,
            name = %header.name,
            "dataset file uploaded"
        );
        Ok(self.data_ref(&stored))
    }
}
