//! Tensor-parallel ranks meeting through the registry: each rank registers its collective
//! address under `rendezvous/<group>/<rank>` and waits until every rank of the group has; rank 0
//! may publish the NCCL unique id there too.

use std::time::Duration;

use crate::{parse_record, DiscoveryError, Keys, Registration, Registry, RendezvousRecord};

/// The group as every rank sees it once all have registered.
#[derive(Debug)]
pub struct Rendezvous {
    /// Every rank's record, in rank order.
    pub ranks: Vec<RendezvousRecord>,
    /// This rank's own key: keep it for the life of the group (dropping it deletes the key).
    pub registration: Registration,
}

impl Rendezvous {
    /// The collective addresses in rank order.
    pub fn addresses(&self) -> Vec<String> {
        self.ranks.iter().map(|r| r.address.clone()).collect()
    }

    /// Rank 0's NCCL unique id, if it published one.
    pub fn nccl_unique_id(&self) -> Option<&str> {
        self.ranks.first()?.nccl_unique_id.as_deref()
    }
}

/// Registers `me` (its rank, the group's world size, its collective address; rank 0 may add the
/// NCCL unique id) in `group` and waits up to `timeout` for every rank. Records of another world
/// size (a previous incarnation of the group whose lease has not expired yet) are waited out,
/// not used.
pub async fn rendezvous(
    registry: &Registry,
    keys: &Keys,
    group: &str,
    me: RendezvousRecord,
    timeout: Duration,
) -> Result<Rendezvous, DiscoveryError> {
    let rank = me.rank as usize;
    let world_size = me.world_size as usize;
    if rank >= world_size {
        return Err(DiscoveryError::InvalidName {
            what: "rank",
            value: format!("{rank} of world size {world_size}"),
            why: "the rank must be below the world size",
        });
    }
    let prefix = keys.rendezvous(group);
    let registration = registry.register(&keys.rendezvous_rank(group, rank), &me)?;
    let mut view = registry.view(&prefix);
    let wait = async {
        loop {
            let state = view.current();
            let mut ranks: Vec<Option<RendezvousRecord>> = vec![None; world_size];
            for (key, value) in &state.entries {
                let Some(r) = key
                    .strip_prefix(&prefix)
                    .and_then(|k| k.parse::<usize>().ok())
                else {
                    continue;
                };
                if let Ok(rec) = parse_record::<RendezvousRecord>(value) {
                    if r < world_size && rec.world_size as usize == world_size {
                        ranks[r] = Some(rec);
                    }
                }
            }
            // Our own record must be the one we wrote (not a stale one from before a restart).
            let mine_current = ranks[rank].as_ref() == Some(&me);
            if mine_current && ranks.iter().all(Option::is_some) {
                return ranks.into_iter().flatten().collect::<Vec<_>>();
            }
            view.changed().await;
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(ranks) => Ok(Rendezvous {
            ranks,
            registration,
        }),
        Err(_) => {
            let present: Vec<String> = view
                .current()
                .entries
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            Err(DiscoveryError::Rendezvous {
                group: group.to_owned(),
                world_size,
                timeout,
                present: present.join(", "),
            })
        }
    }
}
