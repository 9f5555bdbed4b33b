use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a collective or the set-up of a communicator failed.
///
/// The underlying I/O error is part of the message (not a `source`), so a plain `{}` in a log line
/// says what happened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("rank {rank} cannot listen on {addr}: {error}")]
    Bind {
        rank: usize,
        addr: SocketAddr,
        error: io::Error,
    },

    #[error("could not connect to rank {peer} ({addr}) within {timeout:?}: {error}")]
    Connect {
        peer: usize,
        addr: SocketAddr,
        timeout: Duration,
        error: io::Error,
    },

    #[error("rank {rank} ({addr}): ranks {missing:?} did not connect within {timeout:?}")]
    AcceptTimeout {
        rank: usize,
        addr: SocketAddr,
        missing: Vec<usize>,
        timeout: Duration,
    },

    #[error("handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },

    #[error("rank {peer} ({addr}) closed the connection")]
    Closed { peer: usize, addr: SocketAddr },

    #[error("rank {peer} ({addr}) did not respond within {timeout:?} during {op}")]
    Timeout {
        peer: usize,
        addr: SocketAddr,
        op: &'static str,
        timeout: Duration,
    },

    #[error("i/o error with rank {peer} ({addr}) during {op}: {error}")]
    Io {
        peer: usize,
        addr: SocketAddr,
        op: &'static str,
        error: io::Error,
    },

    /// The ranks disagree on which collective comes next, or on its size: a caller bug.
    #[error("protocol mismatch with rank {peer} ({addr}): {reason}")]
    Protocol {
        peer: usize,
        addr: SocketAddr,
        reason: String,
    },

    /// An earlier collective failed part-way; the connections were closed because their state is
    /// unknown. The group has to be rebuilt.
    #[error("communicator unusable after an earlier failure: {0}")]
    Broken(String),

    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// CUDA driver or NCCL failure (only produced with the `nccl` feature; the variant always
    /// exists so that matches do not depend on features).
    #[error("nccl: {0}")]
    Nccl(String),

    #[error("internal: {0}")]
    Internal(String),
}

impl CollectiveError {
    /// True for [`CollectiveError::Timeout`]. Most timeouts break the communicator; the one that
    /// does not (a non-root rank waiting for a broadcast that has not started) may be retried:
    /// check [`crate::TcpCommunicator::is_broken`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, CollectiveError::Timeout { .. })
    }
}
