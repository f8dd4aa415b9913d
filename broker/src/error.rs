//! The one error type requests fail with: a kind for scripts (it becomes
//! `Reply::Error`'s `kind`) and a message for humans.

use crate::device::DeviceError;
use crate::worker::WorkerError;
use tapjail_common::proto::{ErrorKind, Reply};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    pub kind: ErrorKind,
    pub message: String,
}

impl BrokerError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        BrokerError {
            kind,
            message: message.into(),
        }
    }
    pub fn denied(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Denied, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn busy(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, m)
    }
    pub fn failed(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, m)
    }

    pub fn reply(&self) -> Reply {
        Reply::Error {
            kind: self.kind,
            message: self.message.clone(),
        }
    }

    /// Prefix the message with what was being done.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        BrokerError {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }
}

impl From<WorkerError> for BrokerError {
    fn from(e: WorkerError) -> Self {
        let kind = match e {
            WorkerError::RequestTimeout { .. } => ErrorKind::TimedOut,
            _ => ErrorKind::Failed,
        };
        BrokerError::new(kind, e.to_string())
    }
}

impl From<DeviceError> for BrokerError {
    fn from(e: DeviceError) -> Self {
        BrokerError::failed(format!("device: {e}"))
    }
}
