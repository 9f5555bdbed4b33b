//! The etcd backend against a real etcd server (started per test on free ports).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_discovery::testing::EtcdServer;
use tandem_discovery::{
    EtcdOptions, Keys, RegistrationState, Registry, RendezvousRecord, ViewState, WatchEvent,
    RECORD_VERSION,
};

/// Long enough for any step here on a loaded 2-core machine; only a bound on hangs.
const PATIENCE: Duration = Duration::from_secs(30);

fn short_ttl() -> EtcdOptions {
    EtcdOptions {
        ttl: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        tls: None,
    }
}

async fn next(w: &mut tandem_discovery::Watch) -> WatchEvent {
    tokio::time::timeout(PATIENCE, w.next())
        .await
        .expect("no watch event in time")
        .expect("watch ended")
}

/// Waits until the view satisfies `f`.
async fn until(view: &mut tandem_discovery::View, what: &str, f: impl Fn(&ViewState) -> bool) {
    let wait = async {
        loop {
            if f(&view.current()) {
                return;
            }
            view.changed().await;
        }
    };
    if tokio::time::timeout(PATIENCE, wait).await.is_err() {
        panic!("{what}: not reached; view is {:?}", view.current());
    }
}

#[tokio::test]
async fn register_watch_and_deregister() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let registry = Registry::etcd(&etcd.endpoints()).await.unwrap();
    let keys = Keys::new("t1").unwrap();
    let before = registry
        .register(
            &keys.group("m", "a"),
            &serde_json::json!({"version": RECORD_VERSION, "leader": "http://a"}),
        )
        .unwrap();
    before.registered().await;

    let mut w = registry.watch(&keys.groups());
    // The existing key first, then Connected.
    match next(&mut w).await {
        WatchEvent::Put { key, value } => {
            assert_eq!(key, "/tandem/v1/t1/groups/m/a");
            assert!(value.contains("\"leader\":\"http://a\""), "{value}");
        }
        e => panic!("expected the existing key, got {e:?}"),
    }
    assert_eq!(next(&mut w).await, WatchEvent::Connected);

    // A key outside the prefix is not reported; one inside is.
    let _other = registry.register("/tandem/v1/t2/groups/m/x", "x").unwrap();
    let b = registry
        .register(&keys.group("m", "b"), &serde_json::json!({"version": 1}))
        .unwrap();
    match next(&mut w).await {
        WatchEvent::Put { key, .. } => assert_eq!(key, keys.group("m", "b")),
        e => panic!("expected b's put, got {e:?}"),
    }
    // The watch can see the put before the registration task records its lease.
    tokio::time::timeout(PATIENCE, b.registered())
        .await
        .expect("b not registered in time");
    assert!(matches!(b.state(), RegistrationState::Registered { .. }));
    b.deregister().await.unwrap();
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Delete {
            key: keys.group("m", "b")
        }
    );
    // Dropping deletes too (in the background).
    drop(before);
    assert_eq!(
        next(&mut w).await,
        WatchEvent::Delete {
            key: keys.group("m", "a")
        }
    );
    assert!(registry.list(&keys.groups()).await.unwrap().is_empty());
}

/// A process that dies without deregistering: its key goes when the lease expires.
#[tokio::test]
async fn crashed_registrant_expires_with_its_lease() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let keys = Keys::new("t").unwrap();
    let key = keys.group("m", "crashed");
    let crashing = Crashable::register(&etcd.endpoints(), &key);
    let registry = Registry::etcd(&etcd.endpoints()).await.unwrap();
    let mut view = registry.view(&keys.groups());
    until(&mut view, "the crashed key listed", |s| {
        s.entries.contains_key(&key)
    })
    .await;
    crashing.crash();
    let started = std::time::Instant::now();
    until(&mut view, "the crashed key expired", |s| {
        s.entries.is_empty()
    })
    .await;
    // Gone with the lease, about a TTL after the crash; the bound only catches a key that
    // outlives its lease (generous: etcd and this test may run slowly on a loaded machine).
    let took = started.elapsed();
    eprintln!(
        "the crashed key expired {took:?} after the crash (TTL {:?})",
        short_ttl().ttl
    );
    let bound = short_ttl().ttl + Duration::from_secs(20);
    assert!(took < bound, "{took:?}");
}

/// A registrant on its own runtime that can die without cleaning up.
struct Crashable {
    crash: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Crashable {
    /// Returns once the key is registered.
    fn register(endpoints: &[String], key: &str) -> Self {
        let (crash, crashed) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (endpoints, key) = (endpoints.to_vec(), key.to_owned());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let reg = rt.block_on(async {
                let r = Registry::etcd_with(&endpoints, short_ttl()).await.unwrap();
                let reg = r.register(&key, "1").unwrap();
                reg.registered().await;
                reg
            });
            ready_tx.send(()).unwrap();
            let _ = crashed.recv();
            // Tasks are dropped mid-flight; the handle's cleanup never runs.
            rt.shutdown_background();
            std::mem::forget(reg);
        });
        ready.recv().unwrap();
        Self { crash, thread }
    }

    fn crash(self) {
        self.crash.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// etcd loses the lease (revoked behind our back): the registration puts the key back under a
/// new lease.
#[tokio::test]
async fn lost_lease_is_registered_again() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let registry = Registry::etcd_with(&etcd.endpoints(), short_ttl())
        .await
        .unwrap();
    let keys = Keys::new("t").unwrap();
    let reg = registry.register(&keys.draft("m", "d0"), "v").unwrap();
    reg.registered().await;
    let RegistrationState::Registered { lease } = reg.state() else {
        panic!("not registered: {:?}", reg.state());
    };
    let mut w = registry.watch(&keys.drafts());
    assert!(matches!(next(&mut w).await, WatchEvent::Put { .. }));
    assert_eq!(next(&mut w).await, WatchEvent::Connected);

    let mut admin = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    admin.lease_revoke(lease).await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Delete { .. }));
    match next(&mut w).await {
        WatchEvent::Put { key, value } => {
            assert_eq!(key, keys.draft("m", "d0"));
            assert_eq!(value, "\"v\"");
        }
        e => panic!("expected the key back, got {e:?}"),
    }
    // The watch can see the put before the registration task records the new lease.
    reg.registered().await;
    let RegistrationState::Registered { lease: again } = reg.state() else {
        panic!("not registered again: {:?}", reg.state());
    };
    assert_ne!(again, lease);
}

/// etcd down for a while: watchers report Disconnected and keep the last known keys;
/// registrations made meanwhile wait; when etcd is back everything converges: leases of the
/// live registrations survive the restart, new keys appear, the dead one's key expires.
#[tokio::test]
async fn outage_keeps_last_state_and_converges() {
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    let keys = Keys::new("t").unwrap();
    let registry = Registry::etcd_with(&etcd.endpoints(), short_ttl())
        .await
        .unwrap();
    let live = registry.register(&keys.group("m", "live"), "1").unwrap();
    live.registered().await;
    let doomed = Crashable::register(&etcd.endpoints(), &keys.group("m", "doomed"));
    let mut view = registry.view(&keys.groups());
    let mut second = Registry::etcd(&etcd.endpoints())
        .await
        .unwrap()
        .view(&keys.groups());
    until(&mut view, "both listed", |s| {
        s.connected && s.entries.len() == 2
    })
    .await;

    etcd.stop();
    until(&mut view, "disconnected", |s| !s.connected).await;
    assert_eq!(view.current().entries.len(), 2, "last known state kept");
    assert!(view.current().error.is_some());
    // Registered while etcd is down: waits.
    let late = registry.register(&keys.group("m", "late"), "1").unwrap();
    // The doomed instance dies meanwhile: it cannot revoke its lease, so it expires later.
    doomed.crash();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!matches!(
        late.state(),
        RegistrationState::Registered { .. }
    ));

    etcd.resume();
    let want = |s: &ViewState| {
        s.connected
            && s.entries.keys().cloned().collect::<Vec<_>>()
                == vec![keys.group("m", "late"), keys.group("m", "live")]
    };
    until(&mut view, "converged after the outage", want).await;
    until(&mut second, "a second watcher converged too", want).await;
    // The view can show the key before the registration task records its (kept) lease.
    tokio::time::timeout(PATIENCE, live.registered())
        .await
        .expect("live not registered in time");
    assert!(matches!(live.state(), RegistrationState::Registered { .. }));
}

/// Ranks of a tensor-parallel group meet in etcd: each learns every address in rank order and
/// rank 0's NCCL id; a group that never completes says which ranks came.
#[tokio::test]
async fn ranks_meet_through_rendezvous_keys() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let registry = Registry::etcd(&etcd.endpoints()).await.unwrap();
    let keys = Keys::new("t").unwrap();
    let patience = Duration::from_secs(20);
    let tasks: Vec<_> = (0..3)
        .rev()
        .map(|rank| {
            let (registry, keys) = (registry.clone(), keys.clone());
            tokio::spawn(async move {
                let me = RendezvousRecord {
                    version: RECORD_VERSION,
                    rank,
                    world_size: 3,
                    address: format!("10.0.0.{rank}:700{rank}"),
                    nccl_unique_id: (rank == 0).then(|| "abcd".to_owned()),
                };
                tandem_discovery::rendezvous(&registry, &keys, "g1", me, patience)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut groups = Vec::new();
    for t in tasks {
        groups.push(t.await.unwrap());
    }
    for g in &groups {
        assert_eq!(
            g.addresses(),
            vec!["10.0.0.0:7000", "10.0.0.1:7001", "10.0.0.2:7002"]
        );
        assert_eq!(g.nccl_unique_id(), Some("abcd"));
        assert_eq!(g.ranks[2].nccl_unique_id, None);
    }
    assert_eq!(
        registry.list(&keys.rendezvous("g1")).await.unwrap().len(),
        3
    );
    drop(groups);

    let lonely = RendezvousRecord {
        version: RECORD_VERSION,
        rank: 1,
        world_size: 2,
        address: "10.0.0.1:1".into(),
        nccl_unique_id: None,
    };
    let e =
        tandem_discovery::rendezvous(&registry, &keys, "g2", lonely, Duration::from_millis(500))
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("'g2'") && e.contains("present: [1]"), "{e}");
}

/// etcd serving clients over TLS with client certificates: a client with the CA and a
/// certificate registers and lists; a plaintext client and one without a certificate get
/// errors, not hangs.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = tandem_testkit::pki::Ca::new(dir.path(), "etcd").unwrap();
    let (crt, k) = ca.leaf(dir.path(), "tls").unwrap();
    let ca_pem = ca.pem.clone();
    let Some(etcd) = EtcdServer::start_tls(&crt, &k, &ca_pem) else {
        return;
    };
    assert!(etcd.endpoint().starts_with("https://"));
    let with = |cert: bool| EtcdOptions {
        tls: Some(tandem_discovery::EtcdTls {
            ca: ca_pem.clone(),
            cert: cert.then(|| crt.clone()),
            key: cert.then(|| k.clone()),
        }),
        ..short_ttl()
    };
    let good = Registry::etcd_with(&etcd.endpoints(), with(true))
        .await
        .unwrap();
    let reg = good.register("/tandem/v1/test/tls/a", "hello").unwrap();
    tokio::time::timeout(PATIENCE, reg.registered())
        .await
        .expect("registered over TLS");
    let listed = good.list("/tandem/v1/test/tls/").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    // Plaintext to a TLS-only port, and TLS without a client certificate: refused.
    let plain_url = etcd.endpoint().replace("https://", "http://");
    let plain = Registry::etcd_with(&[plain_url], short_ttl())
        .await
        .unwrap();
    assert!(plain.list("/tandem/v1/test/tls/").await.is_err());
    let anonymous = Registry::etcd_with(&etcd.endpoints(), with(false))
        .await
        .unwrap();
    assert!(anonymous.list("/tandem/v1/test/tls/").await.is_err());
}
