//! Which worker groups exist. The router asks on every poll, so a backend that watches a
//! registry (etcd, Kubernetes) only has to keep its answer current; callers never know which
//! backend they have.

/// The set of group leaders (their `http://host:port` shard endpoints) the router may use.
/// Health is not the backend's concern: the router polls every endpoint itself.
pub trait Membership: Send + Sync + 'static {
    /// The current endpoints. Called about once a second; must not block.
    fn endpoints(&self) -> Vec<String>;
}

/// A fixed list from configuration (`--workers`), the default of `tandem up`.
#[derive(Debug, Clone, Default)]
pub struct StaticMembership {
    endpoints: Vec<String>,
}

impl StaticMembership {
    /// Normalizes each entry: surrounding space is trimmed, empty entries are dropped, and a
    /// bare `host:port` gets `http://`, so `--workers 127.0.0.1:50061` works.
    pub fn new(endpoints: impl IntoIterator<Item = String>) -> Self {
        let mut out: Vec<String> = Vec::new();
        for e in endpoints {
            let e = e.trim();
            if e.is_empty() {
                continue;
            }
            let url = if e.contains("://") {
                e.to_owned()
            } else {
                format!("http://{e}")
            };
            if !out.contains(&url) {
                out.push(url);
            }
        }
        Self { endpoints: out }
    }
}

impl Membership for StaticMembership {
    fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_membership_normalizes() {
        let m = StaticMembership::new(
            [" 127.0.0.1:1 ", "", "http://h:2", "127.0.0.1:1"].map(String::from),
        );
        assert_eq!(m.endpoints(), vec!["http://127.0.0.1:1", "http://h:2"]);
    }
}
