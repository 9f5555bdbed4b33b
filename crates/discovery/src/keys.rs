//! The key layout, all under `/tandem/v1/<cluster>/` (DESIGN.md, Discovery):
//!
//! - `groups/<model>/<group>`: a worker group's leader ([`crate::GroupRecord`]);
//! - `drafts/<model>/<id>`: a draft service instance;
//! - `rendezvous/<group>/<rank>`: a tensor-parallel rank's collective address
//!   ([`crate::RendezvousRecord`]).
//!
//! Names are single path segments: `/` and `%` inside a name are percent-encoded, so a model
//! called `org/model` cannot reach into another model's keys.

use crate::DiscoveryError;

/// The default cluster name (`--cluster`).
pub const DEFAULT_CLUSTER: &str = "default";

/// Builds the keys of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys of cluster `cluster`: ASCII letters, digits, `.`, `_`, `-`, at most 63 characters
    /// (a Kubernetes-style name, so it fits a label too).
    pub fn new(cluster: &str) -> Result<Self, DiscoveryError> {
        let ok = !cluster.is_empty()
            && cluster.len() <= 63
            && cluster
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(DiscoveryError::InvalidName {
                what: "cluster",
                value: cluster.to_owned(),
                why: "use 1-63 ASCII letters, digits, '.', '_' or '-'",
            });
        }
        Ok(Self {
            root: format!("/tandem/v1/{cluster}/"),
        })
    }

    /// `/tandem/v1/<cluster>/`: every key of the cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Prefix of every group of every model.
    pub fn groups(&self) -> String {
        format!("{}groups/", self.root)
    }

    /// Prefix of the groups serving `model`.
    pub fn groups_of(&self, model: &str) -> String {
        format!("{}groups/{}/", self.root, segment(model))
    }

    /// A group leader's key.
    pub fn group(&self, model: &str, group: &str) -> String {
        format!("{}{}", self.groups_of(model), segment(group))
    }

    /// Prefix of every draft of every model.
    pub fn drafts(&self) -> String {
        format!("{}drafts/", self.root)
    }

    /// Prefix of the drafts serving `model`.
    pub fn drafts_of(&self, model: &str) -> String {
        format!("{}drafts/{}/", self.root, segment(model))
    }

    /// A draft instance's key.
    pub fn draft(&self, model: &str, id: &str) -> String {
        format!("{}{}", self.drafts_of(model), segment(id))
    }

    /// Prefix of one tensor-parallel group's rendezvous keys.
    pub fn rendezvous(&self, group: &str) -> String {
        format!("{}rendezvous/{}/", self.root, segment(group))
    }

    /// One rank's rendezvous key.
    pub fn rendezvous_rank(&self, group: &str, rank: usize) -> String {
        format!("{}{rank}", self.rendezvous(group))
    }
}

/// A name as one key segment: `%` and `/` percent-encoded, an empty name as `%00`.
fn segment(name: &str) -> String {
    if name.is_empty() {
        return "%00".to_owned();
    }
    name.replace('%', "%25").replace('/', "%2F")
}

/// A group id derived from an address (`10.0.0.7:50061` → `10.0.0.7-50061`), the default of
/// `--group`: unique per leader and readable in `etcdctl get --prefix` output.
pub fn group_id_from_address(address: &str) -> String {
    let a = address
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    a.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches('-')
        .to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("prod-1").unwrap();
        assert_eq!(k.groups(), "/tandem/v1/prod-1/groups/");
        assert_eq!(k.group("m", "g"), "/tandem/v1/prod-1/groups/m/g");
        assert_eq!(k.draft("m", "d"), "/tandem/v1/prod-1/drafts/m/d");
        assert_eq!(
            k.rendezvous_rank("g", 2),
            "/tandem/v1/prod-1/rendezvous/g/2"
        );
        // A name with a slash stays one segment.
        assert_eq!(
            k.group("org/model", "g"),
            "/tandem/v1/prod-1/groups/org%2Fmodel/g"
        );
        assert!(k.group("a", "b").starts_with(&k.groups_of("a")));
        assert!(!k.group("ab", "c").starts_with(&k.groups_of("a")));
    }

    #[test]
    fn bad_cluster_names_say_what_is_allowed() {
        for bad in ["", "a/b", "x y", &"c".repeat(64)] {
            let e = Keys::new(bad).unwrap_err().to_string();
            assert!(e.contains("cluster") && e.contains("ASCII"), "{e}");
        }
    }

    #[test]
    fn group_ids_from_addresses() {
        assert_eq!(group_id_from_address("10.0.0.7:50061"), "10.0.0.7-50061");
        assert_eq!(group_id_from_address("http://[::1]:50061"), "1--50061");
        assert_eq!(group_id_from_address("w-0.svc:1"), "w-0.svc-1");
    }
}
