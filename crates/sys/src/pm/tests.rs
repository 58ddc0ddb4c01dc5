use std::io;
use std::net::IpAddr;

use super::{Endpoint, EndpointFlags, PathManager, PmLimits};

/// Runs `f` on a thread in a fresh, empty network namespace of its own, so the test neither sees
/// nor disturbs the machine's path manager. The namespace goes away with the thread.
fn in_fresh_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
    })
    .join()
    .expect("test thread");
}

#[test]
fn limits_are_set_and_read_back() {
    in_fresh_netns(|| async {
        let mut pm = PathManager::new().unwrap();
        let want = PmLimits {
            subflows: 3,
            add_addr_accepted: 5,
        };
        pm.set_limits(want).await.unwrap();
        assert_eq!(pm.limits().await.unwrap(), want);
        assert_eq!(super::limits().await.unwrap(), want);
        // The kernel's cap is 8: the error must come back as an error, not be swallowed.
        let err = pm
            .set_limits(PmLimits {
                subflows: 9,
                add_addr_accepted: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EINVAL), "{err}");
    });
}

#[test]
fn endpoints_are_added_listed_and_removed() {
    in_fresh_netns(|| async {
        let mut pm = PathManager::new().unwrap();
        assert!(pm.endpoints().await.unwrap().is_empty());
        let v4 = Endpoint {
            id: 7,
            addr: "192.0.2.10".parse().unwrap(),
            port: Some(5124),
            flags: EndpointFlags {
                signal: true,
                ..Default::default()
            },
            ifindex: None,
        };
        let v6 = Endpoint {
            id: 0,
            addr: "2001:db8::1".parse().unwrap(),
            port: None,
            flags: EndpointFlags {
                subflow: true,
                backup: true,
                ..Default::default()
            },
            ifindex: Some(1),
        };
        pm.add_endpoint(&v4).await.unwrap();
        pm.add_endpoint(&v6).await.unwrap();
        let err = pm.add_endpoint(&v4).await.unwrap_err();
        assert!(
            err.raw_os_error() == Some(nix::libc::EADDRINUSE),
            "a duplicate is refused with EADDRINUSE: {err}"
        );

        let got = pm.endpoints().await.unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        let got6 = got
            .iter()
            .find(|e| e.addr == v6.addr)
            .expect("v6 endpoint listed");
        assert!(
            got6.id != 0 && got6.id != 7,
            "the kernel picks a free id: {got6:?}"
        );
        assert_eq!(got6.flags, v6.flags);
        assert_eq!(got6.ifindex, Some(1));
        let got4 = got
            .iter()
            .find(|e| e.addr == v4.addr)
            .expect("v4 endpoint listed");
        assert_eq!(got4, &v4);
        assert_eq!(got4.to_string(), "192.0.2.10 port 5124 id 7 signal");

        pm.delete_endpoint(7).await.unwrap();
        let left: Vec<IpAddr> = pm
            .endpoints()
            .await
            .unwrap()
            .iter()
            .map(|e| e.addr)
            .collect();
        assert_eq!(left, vec![v6.addr]);
        let err = pm.delete_endpoint(7).await.unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::Other, "errno kept: {err}");

        pm.flush_endpoints().await.unwrap();
        assert!(pm.endpoints().await.unwrap().is_empty());
    });
}
