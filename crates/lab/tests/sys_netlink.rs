//! Root tests of `braid-sys`'s rtnetlink code (routes, rules, addresses, TPROXY routing), each
//! in a network namespace of its own. They live in the lab crate because they check what the
//! code did with `ip`, an oracle independent of the code under test, and only the lab may run
//! network tools.

use std::net::IpAddr;

use braid_sys::{route, rtnl};
use ipnet::IpNet;

/// Runs `f` on a thread that has entered a new, empty network namespace (root only); the
/// namespace goes with the thread.
fn in_fresh_netns(f: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            f();
        })
        .join()
        .expect("test thread");
    });
}

/// `ip ARGS`, its standard output.
fn run(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn routes_rules_and_addresses_round_trip() {
    in_fresh_netns(|| {
        // No dummy driver in every kernel: a veth pair serves as well.
        run(&["link", "add", "t0", "type", "veth", "peer", "name", "t1"]);
        run(&["link", "set", "t0", "up"]);
        run(&["link", "set", "t1", "up"]);
        run(&["addr", "add", "192.0.2.1/24", "dev", "t0"]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nl = rtnl::Rtnl::new().unwrap();
            let t0 = nl
                .links()
                .await
                .unwrap()
                .into_iter()
                .find(|l| l.name == "t0")
                .unwrap();
            assert!(t0.up && !t0.loopback);
            let addrs = nl.addresses().await.unwrap();
            let a = addrs
                .iter()
                .find(|a| a.addr == "192.0.2.1".parse::<IpAddr>().unwrap())
                .unwrap();
            assert_eq!((a.index, a.prefix_len, a.global), (t0.index, 24, true));
            assert_eq!(a.net(), "192.0.2.0/24".parse::<IpNet>().unwrap());

            let route = rtnl::Route {
                table: 5201,
                dst: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("192.0.2.254".parse().unwrap()),
                oif: Some(t0.index),
                pref_src: Some("192.0.2.1".parse().unwrap()),
                metric: None,
            };
            nl.add_route(&route).await.unwrap();
            let shown = run(&["route", "show", "table", "5201"]);
            assert!(
                shown.contains("default via 192.0.2.254 dev t0") && shown.contains("src 192.0.2.1"),
                "{shown}"
            );
            let read = nl.routes().await.unwrap();
            let back = read.iter().find(|r| r.table == 5201).unwrap();
            assert_eq!(back.gateway, route.gateway);
            assert!(back.is_default());
            nl.del_route(back).await.unwrap();
            nl.del_route(back).await.unwrap();
            assert!(run(&["route", "show", "table", "5201"]).trim().is_empty());

            let rule = rtnl::Rule {
                priority: 5201,
                table: 5201,
                src: Some("192.0.2.1/32".parse().unwrap()),
                v6: false,
            };
            nl.add_rule(&rule).await.unwrap();
            nl.add_rule(&rule).await.unwrap();
            let rules = run(&["rule", "show"]);
            assert_eq!(
                rules.matches("from 192.0.2.1 lookup 5201").count(),
                1,
                "{rules}"
            );
            assert!(nl.rules().await.unwrap().contains(&rule));
            nl.del_rule(&rule).await.unwrap();
            nl.del_rule(&rule).await.unwrap();
            assert!(!run(&["rule", "show"]).contains("5201"));
        });
    });
}

#[test]
fn tproxy_routing_is_installed_and_removed() {
    in_fresh_netns(|| {
        run(&["link", "set", "lo", "up"]);
        let r = route::TproxyRouting::install(0x4252, 5180).unwrap();
        assert!(route::TproxyRouting::present(0x4252).unwrap());
        for v in ["-4", "-6"] {
            let rules = run(&[v, "rule", "show"]);
            assert!(rules.contains("fwmark 0x4252 lookup 5180"), "{v}: {rules}");
            let routes = run(&[v, "route", "show", "table", "5180"]);
            assert!(routes.contains("local default dev lo"), "{v}: {routes}");
        }
        // A second install (a restart after a crash) does not duplicate the rule.
        let again = route::TproxyRouting::install(0x4252, 5180).unwrap();
        assert_eq!(run(&["-4", "rule", "show"]).matches("0x4252").count(), 1);
        again.remove();
        let _ = r;
        assert!(!route::TproxyRouting::present(0x4252).unwrap());
        for v in ["-4", "-6"] {
            assert!(!run(&[v, "rule", "show"]).contains("0x4252"));
            assert!(
                run(&[v, "route", "show", "table", "5180"])
                    .trim()
                    .is_empty()
            );
        }
    });
}
