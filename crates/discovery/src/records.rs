//! The JSON values stored under the keys. Each carries `version`: readers ignore fields they do
//! not know (serde's default), so a newer writer can add fields without a version bump; the
//! version changes only when a field changes meaning, and readers skip records of a major
//! version they do not understand.

use serde::{Deserialize, Serialize};

/// The version this build writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// `groups/<model>/<group>`: a worker group's leader, which serves the shard API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub version: u32,
    /// The model name the leader reports in `Info`.
    pub model: String,
    /// The group id (the last key segment).
    pub group: String,
    /// The leader's shard endpoint, `http://host:port`: what routers dial.
    pub leader: String,
    /// Ranks in the tensor-parallel group.
    pub tp_size: u32,
    /// The leader's tokenizer hash (`Info.tokenizer_hash`): routers only mix groups that agree.
    pub tokenizer_hash: String,
    /// Sequences the group runs at once (its `max_running`).
    pub capacity: u32,
}

/// `drafts/<model>/<id>`: a draft service (speculative decoding) that verifiers may pair with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftRecord {
    pub version: u32,
    /// The draft model's name (its `Info.model`).
    pub model: String,
    /// The instance id (the last key segment).
    pub id: String,
    /// The Drafter endpoint, `http://host:port`.
    pub address: String,
    /// Vocabulary hash: verifiers pair only with a draft that shares their tokenizer.
    pub tokenizer_hash: String,
}

/// `rendezvous/<group>/<rank>`: how the other ranks of a tensor-parallel group reach this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RendezvousRecord {
    pub version: u32,
    pub rank: u32,
    pub world_size: u32,
    /// The rank's collective (all-reduce) listener, `host:port`.
    pub address: String,
    /// Rank 0 only, on GPUs: the NCCL unique id, hex encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nccl_unique_id: Option<String>,
}

/// Parses a record, refusing versions this build does not understand.
pub fn parse_record<T: serde::de::DeserializeOwned>(value: &str) -> Result<T, String> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned =
        serde_json::from_str(value).map_err(|e| format!("not a versioned JSON record: {e}"))?;
    if v.version != RECORD_VERSION {
        return Err(format!(
            "record version {} is not {RECORD_VERSION}, the version this build reads",
            v.version
        ));
    }
    serde_json::from_str(value).map_err(|e| format!("invalid record: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn group_records_round_trip_and_tolerate_new_fields() {
        let r = GroupRecord {
            version: RECORD_VERSION,
            model: "m".into(),
            group: "g".into(),
            leader: "http://127.0.0.1:1".into(),
            tp_size: 2,
            tokenizer_hash: "abc".into(),
            capacity: 16,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_record::<GroupRecord>(&json).unwrap(), r);
        let newer = json.replace("\"capacity\"", "\"zone\":\"a\",\"capacity\"");
        assert_eq!(parse_record::<GroupRecord>(&newer).unwrap(), r);
        let v2 = json.replace("\"version\":1", "\"version\":2");
        assert!(parse_record::<GroupRecord>(&v2)
            .unwrap_err()
            .contains("version 2"));
        assert!(parse_record::<GroupRecord>("nope").is_err());
    }
}
