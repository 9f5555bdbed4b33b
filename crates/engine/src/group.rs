//! Lockstep execution of a tensor-parallel worker group. The leader (rank 0) runs the scheduler;
//! before every forward it broadcasts a compact step plan (slot operations in order, then which
//! tokens of which slots to run) and every follower applies the same plan to its own KV shard
//! and runs the same forward, meeting the leader in the all-reduces inside the model. Only the
//! leader samples. The plan is a few bytes per sequence, so a decode step costs one small
//! broadcast on top of the all-reduces.

use std::sync::Arc;

use tandem_collective::{CollectiveError, Communicator};
use tandem_model::{KvCache, SeqInput, SlotId, Transformer};

/// A KV slot operation, applied by every rank in the order the leader did it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotOp {
    Alloc(usize),
    Free(usize),
    Truncate(usize, usize),
    /// (src, dst, len): dst becomes a copy of src's first len positions.
    Copy(usize, usize, usize),
}

/// One step of the group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StepPlan {
    pub ops: Vec<SlotOp>,
    /// (slot, tokens, all_logits)
    pub batch: Vec<(usize, Vec<u32>, bool)>,
    /// The leader is stopping: followers return.
    pub shutdown: bool,
}

// Hand-rolled little-endian u32 framing: the plan is a handful of integers and this keeps serde
// formats out of the per-step path (and out of the dependency list).
impl StepPlan {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 8 * self.ops.len() + 16 * self.batch.len());
        let mut put = |v: usize| out.extend_from_slice(&(v as u32).to_le_bytes());
        put(usize::from(self.shutdown));
        put(self.ops.len());
        for op in &self.ops {
            match *op {
                SlotOp::Alloc(s) => {
                    put(0);
                    put(s);
                    put(0)
                }
                SlotOp::Free(s) => {
                    put(1);
                    put(s);
                    put(0)
                }
                SlotOp::Truncate(s, len) => {
                    put(2);
                    put(s);
                    put(len)
                }
                SlotOp::Copy(src, dst, len) => {
                    put(3);
                    put(src);
                    put(dst);
                    put(len)
                }
            }
        }
        put(self.batch.len());
        for (slot, tokens, all) in &self.batch {
            put(*slot);
            put(usize::from(*all));
            put(tokens.len());
            for &t in tokens {
                put(t as usize);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut words = bytes.chunks_exact(4).map(|c| {
            let mut b = [0u8; 4];
            b.copy_from_slice(c);
            u32::from_le_bytes(b) as usize
        });
        let mut next = || words.next().ok_or_else(|| "step plan truncated".to_owned());
        let shutdown = next()? != 0;
        let n_ops = next()?;
        let mut ops = Vec::with_capacity(n_ops.min(1 << 16));
        for _ in 0..n_ops {
            let (kind, slot, arg) = (next()?, next()?, next()?);
            ops.push(match kind {
                0 => SlotOp::Alloc(slot),
                1 => SlotOp::Free(slot),
                2 => SlotOp::Truncate(slot, arg),
                3 => SlotOp::Copy(slot, arg, next()?),
                k => return Err(format!("unknown slot op {k}")),
            });
        }
        let n = next()?;
        let mut batch = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let (slot, all, len) = (next()?, next()? != 0, next()?);
            let tokens = (0..len)
                .map(|_| next().map(|t| t as u32))
                .collect::<Result<Vec<_>, _>>()?;
            batch.push((slot, tokens, all));
        }
        Ok(Self {
            ops,
            batch,
            shutdown,
        })
    }
}

pub(crate) fn apply_ops(kv: &mut KvCache, ops: &[SlotOp]) -> Result<(), String> {
    for op in ops {
        match *op {
            SlotOp::Alloc(s) => kv.allocate_at(SlotId(s)),
            SlotOp::Free(s) => kv.free(SlotId(s)),
            SlotOp::Truncate(s, len) => kv.truncate(SlotId(s), len).map_err(|e| e.to_string())?,
            SlotOp::Copy(src, dst, len) => kv
                .copy_slot(SlotId(src), SlotId(dst), len)
                .map_err(|e| e.to_string())?,
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error("group communication failed: {0}")]
    Collective(#[from] CollectiveError),
    #[error("bad step plan from the leader: {0}")]
    Plan(String),
    #[error("forward failed: {0}")]
    Model(#[from] tandem_model::ModelError),
}

/// A follower rank (1..N-1): mirrors the leader's plans on its shard of the model.
pub struct Follower {
    model: Transformer,
    kv: KvCache,
    comm: Arc<dyn Communicator>,
}

impl Follower {
    /// `model` must be loaded with this rank's shard over `comm`.
    pub fn new(model: Transformer, comm: Arc<dyn Communicator>) -> Self {
        let kv = model.new_cache();
        Self { model, kv, comm }
    }

    /// Runs until the leader shuts the group down (Ok) or the group breaks (Err). Starts with
    /// the same warm-up forward as the leader's engine, in lockstep with it.
    pub fn run(mut self) -> Result<(), FollowerError> {
        self.warm_up()?;
        while self.step()? {}
        Ok(())
    }

    /// The leader's engine starts with one warm-up forward; each follower must run it too.
    pub fn warm_up(&mut self) -> Result<(), FollowerError> {
        Ok(self.model.warm_up()?)
    }

    /// Waits for one plan and executes it; false when the leader is shutting down. A timeout
    /// while idle (no plan yet) is not a failure: the leader may simply have no work.
    pub fn step(&mut self) -> Result<bool, FollowerError> {
        let mut buf = Vec::new();
        loop {
            match self.comm.broadcast(0, &mut buf) {
                Ok(()) => break,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let plan = StepPlan::decode(&buf).map_err(FollowerError::Plan)?;
        if plan.shutdown {
            return Ok(false);
        }
        apply_ops(&mut self.kv, &plan.ops).map_err(FollowerError::Plan)?;
        if !plan.batch.is_empty() {
            let batch: Vec<SeqInput<'_>> = plan
                .batch
                .iter()
                .map(|(slot, tokens, all)| SeqInput {
                    slot: SlotId(*slot),
                    tokens,
                    all_logits: *all,
                })
                .collect();
            self.model.forward(&mut self.kv, &batch)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_round_trips() {
        let p = StepPlan {
            ops: vec![
                SlotOp::Alloc(3),
                SlotOp::Free(1),
                SlotOp::Truncate(2, 17),
                SlotOp::Copy(2, 3, 9),
            ],
            batch: vec![(3, vec![1, 2, 3], false), (2, vec![9], true)],
            shutdown: false,
        };
        assert_eq!(StepPlan::decode(&p.encode()), Ok(p));
        assert!(StepPlan::decode(&[1, 0, 0]).is_err());
        let s = StepPlan {
            shutdown: true,
            ..Default::default()
        };
        assert_eq!(StepPlan::decode(&s.encode()), Ok(s));
    }
}
