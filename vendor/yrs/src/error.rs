use crate::ID;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    ReadError(#[from] crate::encoding::read::Error),
    #[error("failed to apply update: {0}")]
    UpdateError(#[from] UpdateError),
    #[error("Cannot execute this operation when document garbage collection is set")]
    Gc,
}

#[derive(Debug, Error)]
pub enum UpdateError {
    #[error("block parent {0} must be deleted or shared ref type. Type: {1}")]
    InvalidParent(ID, u8),
    /// Integrating the update walked more than the transaction's limit
    /// ([`crate::TransactionMut::limit_steps`]): the blocks integrated so far stay in the
    /// document, the rest (and the update's delete set) were not applied.
    #[error("integrating the update walked {steps} steps, over the limit of {limit}")]
    Overrun { steps: u64, limit: u64 },
}
