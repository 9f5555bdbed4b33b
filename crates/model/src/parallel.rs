//! Tensor parallelism, Megatron style: within each block, q/k/v/gate/up are split by output rows
//! (column-parallel: each rank computes its own heads and its own slice of the MLP), o/down by
//! input columns (row-parallel: each rank multiplies its slice of the activations, then the group
//! sums the partial outputs with one all-reduce). Two all-reduces per layer, no other traffic; the
//! embedding, norms and LM head are replicated. Because the collective hands every rank the same
//! bits, every rank then runs the replicated parts on identical inputs and ends with identical
//! logits.

use std::fmt;
use std::sync::Arc;

use tandem_collective::Communicator;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// This process's place in a tensor-parallel group: rank and group size come from `comm`.
#[derive(Clone)]
pub struct Shard {
    pub comm: Arc<dyn Communicator>,
}

impl Shard {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

/// How one linear's weight is divided over the group.
#[derive(Debug, Clone)]
pub(crate) enum Split {
    /// Every rank holds the whole weight.
    Full,
    /// This rank holds output rows `[rank * out / size, (rank + 1) * out / size)`.
    Column { rank: usize, size: usize },
    /// This rank holds the same range of input columns; the forward sums the group's partial
    /// outputs.
    Row(Shard),
}

impl Split {
    /// `(start, len)` of this rank's part of a dimension of `n`, or `None` for the whole of it.
    /// Errors when `n` does not divide (load-time validation should have caught it).
    pub fn part(&self, n: usize, tensor: &str) -> Result<Option<(usize, usize)>> {
        let (rank, size) = match self {
            Split::Full => return Ok(None),
            Split::Column { rank, size } => (*rank, *size),
            Split::Row(s) => (s.rank(), s.world_size()),
        };
        if !n.is_multiple_of(size) {
            return Err(ModelError::TensorParallel(format!(
                "{tensor}: dimension {n} is not divisible by tensor-parallel size {size}"
            )));
        }
        let len = n / size;
        Ok(Some((rank * len, len)))
    }
}

/// The group as the model's load code sees it. A group of one is the same as none, so TP=1 takes
/// exactly the unsharded path (no slicing copies, no all-reduce calls).
#[derive(Debug, Clone)]
pub(crate) struct Tp(Option<Shard>);

impl Tp {
    pub fn new(shard: Option<&Shard>) -> Self {
        Self(shard.filter(|s| s.world_size() > 1).cloned())
    }

    pub fn size(&self) -> usize {
        self.0.as_ref().map_or(1, Shard::world_size)
    }

    pub fn column(&self) -> Split {
        match &self.0 {
            Some(s) => Split::Column {
                rank: s.rank(),
                size: s.world_size(),
            },
            None => Split::Full,
        }
    }

    /// This rank's rows of the vocabulary `(start, len)`, when it splits evenly.
    pub fn vocab_part(&self, vocab: usize) -> Option<(usize, usize, Shard)> {
        let s = self.0.as_ref()?;
        let n = s.world_size();
        vocab
            .is_multiple_of(n)
            .then(|| (s.rank() * vocab / n, vocab / n, s.clone()))
    }

    pub fn row(&self) -> Split {
        match &self.0 {
            Some(s) => Split::Row(s.clone()),
            None => Split::Full,
        }
    }
}

/// Checks the model splits evenly over the group, before any weight is read.
pub(crate) fn validate(cfg: &ModelConfig, shard: &Shard) -> Result<()> {
    let (rank, size) = (shard.rank(), shard.world_size());
    if size == 0 || rank >= size {
        return Err(ModelError::TensorParallel(format!(
            "rank {rank} is outside a group of size {size}"
        )));
    }
    for (name, n) in [
        ("num_attention_heads", cfg.num_heads),
        ("num_key_value_heads", cfg.num_kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        if !n.is_multiple_of(size) {
            return Err(ModelError::TensorParallel(format!(
                "{name} {n} is not divisible by tensor-parallel size {size}"
            )));
        }
    }
    Ok(())
}
