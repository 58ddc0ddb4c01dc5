//! Prometheus metrics: the registry of each daemon and the HTTP endpoint that serves it.
//!
//! The endpoint is a few lines over tokio instead of an HTTP framework: it answers one
//! read-only GET, and pulling hyper's dependency tree into a relay binary for that is not worth
//! it. Anything but `GET /metrics` gets 404; requests are bounded in size and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves a registry filled by `register` on `addr`, if metrics are configured, as a task of
/// `tracker` (so the daemon's drain waits for it); it ends when `stop` is cancelled.
pub async fn serve_stats(
    addr: Option<SocketAddr>,
    register: impl FnOnce(&mut Registry),
    stop: &CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let Some(addr) = addr else { return Ok(()) };
    let mut registry = Registry::default();
    register(&mut registry);
    let server = serve(addr, Arc::new(registry), stop.clone())
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    tracker.spawn(server);
    Ok(())
}

/// Binds the metrics listener now (so a bad address fails at start) and returns the server,
/// which runs until `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(_) => continue,
                },
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut req = Vec::with_capacity(512);
                    let mut buf = [0u8; 512];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = if req.starts_with(b"GET /metrics ") {
                        let mut body = String::new();
                        let _ = encode(&mut body, &registry);
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; \
                             version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\n\
                             Connection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    };
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                })
                .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let mut reg = Registry::default();
        let c: Counter = Counter::default();
        reg.register("braid_test", "a test counter", c.clone());
        c.inc_by(7);
        let stop = CancellationToken::new();
        // Port 0 cannot be learned back from serve(); bind a free port first.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let task = tokio::spawn(serve(addr, Arc::new(reg), stop.clone()).await.unwrap());
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("braid_test_total 7"), "{ok}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
        task.await.unwrap();
    }
}

#[cfg(test)]
mod documented {
    /// Every metric either daemon registers is in docs/metrics.md, so that page stays true.
    /// The names are read from the registration code itself: an empty labelled family is not
    /// encoded at all, so encoding a fresh registry would miss most of them.
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../../docs/metrics.md");
        let mut missing = Vec::new();
        for (prefix, source) in [
            ("braid_converter_", include_str!("converter/stats.rs")),
            ("braid_gateway_", include_str!("gateway/stats.rs")),
        ] {
            let mut names = 0;
            for part in source.split("r.register(").skip(1) {
                let Some(name) = part.split('"').nth(1) else {
                    continue;
                };
                names += 1;
                let full = format!("`{prefix}{name}");
                if !doc.contains(&full) {
                    missing.push(format!("{prefix}{name}"));
                }
            }
            assert!(names > 5, "no registrations found for {prefix}");
        }
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
    }

    /// The example Grafana dashboard is valid JSON and its queries name only metrics that
    /// exist (those of docs/metrics.md, which the test above keeps true).
    #[test]
    fn the_dashboard_names_only_metrics_that_exist() {
        let doc = include_str!("../../../docs/metrics.md");
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/grafana/braid.json"))
                .expect("docs/grafana/braid.json is JSON");
        let panels = dash["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        let mut named = 0;
        for p in panels {
            for t in p["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("braid_") {
                        named += 1;
                        assert!(
                            doc.contains(&format!("| `{word}` |")),
                            "{word} (panel {:?}) is not a braid metric",
                            p["title"]
                        );
                    }
                }
            }
        }
        assert!(named > 5);
    }
}
