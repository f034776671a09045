//! Taking over from the store: what a coordinator loads once it wins the leader lease,
//! before its [`crate::server::Gate`] opens and it serves its first call.

use super::Coordinator;
use crate::error::CoordinatorError;

impl Coordinator {
    /// Loads jobs, checkpoint indexes and workers from [`crate::config::ServerConfig::store`]
    /// into this coordinator. `server::run` calls it once, right after the campaign is won
    /// and before the gate opens, so nothing is served from a half-loaded state.
    ///
    /// Loads nothing yet: a coordinator starts with no jobs, as before the store existed.
    pub async fn restore_from_store(&self) -> Result<(), CoordinatorError> {
        Ok(())
    }
}
