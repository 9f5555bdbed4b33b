//! Per-sequence KV cache slots. candle-transformers keeps one clear-only cache per model object,
//! grown by copying every step; the engine needs one slot per running sequence, freed the step the
//! sequence ends and truncated when speculative tokens are rejected, so we keep our own.
//! Each slot holds, per layer, K and V buffers `[kv_heads, capacity, head_dim]` that grow by
//! doubling (amortized O(1) appends) and are written in place with `slice_set`.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Handle to one sequence's cache slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(pub usize);

struct Slot {
    len: usize,
    capacity: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

pub struct KvCache {
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    max_len: usize,
    device: Device,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

const INITIAL_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        device: Device,
    ) -> Self {
        Self {
            num_layers,
            num_kv_heads,
            head_dim,
            max_len,
            device,
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The longest sequence a slot can hold (the model's context).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A fresh, empty slot. Memory is taken lazily as the sequence grows.
    pub fn allocate(&mut self) -> SlotId {
        let slot = Slot {
            len: 0,
            capacity: 0,
            k: Vec::new(),
            v: Vec::new(),
        };
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                SlotId(i)
            }
            None => {
                self.slots.push(Some(slot));
                SlotId(self.slots.len() - 1)
            }
        }
    }

    /// Creates the slot `id` (empty), as the group leader allocated it: followers of a
    /// tensor-parallel group mirror the leader's slot ids instead of choosing their own.
    pub fn allocate_at(&mut self, id: SlotId) {
        if self.slots.len() <= id.0 {
            self.slots.resize_with(id.0 + 1, || None);
        }
        self.free.retain(|&i| i != id.0);
        self.slots[id.0] = Some(Slot {
            len: 0,
            capacity: 0,
            k: Vec::new(),
            v: Vec::new(),
        });
    }

    /// Releases a slot and its memory at once.
    pub fn free(&mut self, id: SlotId) {
        if let Some(s) = self.slots.get_mut(id.0) {
            if s.take().is_some() {
                self.free.push(id.0);
            }
        }
    }

    pub fn len(&self, id: SlotId) -> Result<usize> {
        Ok(self.slot(id)?.len)
    }

    /// Drops every cached position from `len` on (rejected speculative tokens).
    pub fn truncate(&mut self, id: SlotId, len: usize) -> Result<()> {
        let s = self.slot_mut(id)?;
        s.len = s.len.min(len);
        Ok(())
    }

    /// Makes `dst` (an allocated slot) a copy of `src`'s first `len` positions: a second
    /// candidate continuation of the same sequence (multi-candidate speculative decoding) is
    /// scored in its own slot, so every row attends exactly as in decoding. Deep copies, since
    /// appends write the buffers in place.
    pub fn copy_slot(&mut self, src: SlotId, dst: SlotId, len: usize) -> Result<()> {
        let s = self.slot(src)?;
        let len = len.min(s.len);
        let k =
            s.k.iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
        let v =
            s.v.iter()
                .map(|t| t.copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
        let capacity = s.capacity;
        let d = self.slot_mut(dst)?;
        *d = Slot {
            len,
            capacity,
            k,
            v,
        };
        Ok(())
    }

    /// Sequences currently holding a slot.
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Cached positions over all slots.
    pub fn tokens_in_use(&self) -> usize {
        self.slots.iter().flatten().map(|s| s.len).sum()
    }

    /// Bytes reserved by all slots' buffers.
    pub fn bytes_reserved(&self) -> usize {
        let per_pos = 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4;
        self.slots
            .iter()
            .flatten()
            .map(|s| s.capacity * per_pos)
            .sum()
    }

    fn slot(&self, id: SlotId) -> Result<&Slot> {
        self.slots
            .get(id.0)
            .and_then(|s| s.as_ref())
            .ok_or(ModelError::UnknownSlot(id.0))
    }

    fn slot_mut(&mut self, id: SlotId) -> Result<&mut Slot> {
        self.slots
            .get_mut(id.0)
            .and_then(|s| s.as_mut())
            .ok_or(ModelError::UnknownSlot(id.0))
    }

    /// Makes room for `extra` more positions (all layers), checking the context limit.
    pub(crate) fn reserve(&mut self, id: SlotId, extra: usize) -> Result<()> {
        let (max_len, layers, kvh, hd) = (
            self.max_len,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
        );
        let device = self.device.clone();
        let s = self.slot_mut(id)?;
        let need = s.len + extra;
        if need > max_len {
            return Err(ModelError::ContextExceeded {
                slot: id.0,
                len: need,
                limit: max_len,
            });
        }
        if need <= s.capacity {
            return Ok(());
        }
        let capacity = need
            .next_power_of_two()
            .max(INITIAL_CAPACITY)
            .min(max_len.max(need));
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            let t = Tensor::zeros((kvh, capacity, hd), DType::F32, &device)?;
            if let Some(old) = old {
                t.slice_set(old, 1, 0)?;
            }
            Ok(t)
        };
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for l in 0..layers {
            k.push(grow(s.k.get(l))?);
            v.push(grow(s.v.get(l))?);
        }
        s.k = k;
        s.v = v;
        s.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`, contiguous) at the slot's end for `layer` and
    /// returns views of all cached positions including them. The slot's length advances only
    /// through `advance`, once every layer has appended.
    pub(crate) fn append(
        &mut self,
        id: SlotId,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let s = self.slot(id)?;
        let n = k.dim(1)?;
        let (kc, vc) = (&s.k[layer], &s.v[layer]);
        kc.slice_set(k, 1, s.len)?;
        vc.slice_set(v, 1, s.len)?;
        Ok((kc.narrow(1, 0, s.len + n)?, vc.narrow(1, 0, s.len + n)?))
    }

    pub(crate) fn advance(&mut self, id: SlotId, n: usize) -> Result<()> {
        self.slot_mut(id)?.len += n;
        Ok(())
    }
}
