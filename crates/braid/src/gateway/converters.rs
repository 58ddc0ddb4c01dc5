//! Choosing a converter: an ordered list, tried first to last. A converter that cannot be
//! reached, or that answers Error 64 (busy) or 65 (upstream timeout, which may be its own
//! trouble) is avoided for its back-off — the value it sent, or the configured default — and
//! the next one is tried. Errors about the destination itself (refused, unreachable, not
//! allowed) are final: another converter would only repeat them.
//!
//! Cookies (Error 3) are cached per converter and sent with every later request to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use braid_proto::convert::ErrorCode;

use crate::client::{self, ClientError, ClientOptions, Converted};
use tokio::net::TcpStream;

/// Why no converter produced a connection.
#[derive(Debug)]
pub enum ConvertFailure {
    /// A converter answered with this Error: the destination's verdict.
    Refused {
        code: ErrorCode,
        converter: SocketAddr,
    },
    /// No converter could be used (all unreachable or in back-off).
    NoConverter(String),
}

impl std::fmt::Display for ConvertFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvertFailure::Refused { code, converter } => {
                write!(f, "converter {converter} refused: Error {code}")
            }
            ConvertFailure::NoConverter(why) => write!(f, "no converter reachable: {why}"),
        }
    }
}

#[derive(Debug)]
pub struct Converters {
    list: Vec<SocketAddr>,
    default_backoff: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    avoid_until: HashMap<SocketAddr, Instant>,
    cookies: HashMap<SocketAddr, Vec<u8>>,
}

impl Converters {
    pub fn new(list: Vec<SocketAddr>, default_backoff: Duration) -> Converters {
        Converters {
            list,
            default_backoff,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave this state inconsistent (plain maps): keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Converters in the order to try now: those not in back-off, in preference order; if all
    /// are in back-off, all of them, soonest-available first (trying beats refusing).
    pub fn order(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let st = self.lock();
        let ready: Vec<SocketAddr> = self
            .list
            .iter()
            .copied()
            .filter(|c| st.avoid_until.get(c).is_none_or(|t| *t <= now))
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        let mut all = self.list.clone();
        all.sort_by_key(|c| st.avoid_until.get(c).copied());
        all
    }

    fn avoid(&self, c: SocketAddr, secs: Option<u8>) {
        let backoff = match secs {
            Some(s) if s > 0 => Duration::from_secs(u64::from(s)),
            _ => self.default_backoff,
        };
        self.lock().avoid_until.insert(c, Instant::now() + backoff);
    }

    /// `c` failed (busy, its network down, or unreachable): avoid it for its back-off, count it.
    fn failed(&self, c: SocketAddr, backoff_secs: Option<u8>, stats: &super::stats::Stats) {
        self.avoid(c, backoff_secs);
        stats
            .converter_failures
            .get_or_create(&super::stats::Converter {
                converter: c.to_string(),
            })
            .inc();
    }

    /// Opens a converted connection to `dest`, trying converters in order. With `app`, what it
    /// sends while a reply is awaited goes on at once and is appended to `early`
    /// ([`client::connect_sending_ahead`]), so every attempt sends all of it.
    pub async fn connect(
        &self,
        dest: SocketAddr,
        early: &mut Vec<u8>,
        app: Option<&TcpStream>,
        opts: &ClientOptions,
        stats: &super::stats::Stats,
    ) -> Result<(Converted, SocketAddr), ConvertFailure> {
        let mut last = String::from("none configured");
        for conv in self.order() {
            // Two rounds at most: the second only after Error 3 handed us a cookie.
            for _ in 0..2 {
                let cookie = self.lock().cookies.get(&conv).cloned();
                let attempt = match app {
                    Some(app) => {
                        client::connect_sending_ahead(
                            conv,
                            dest,
                            cookie.as_deref(),
                            early,
                            app,
                            opts,
                        )
                        .await
                    }
                    None => client::connect(conv, dest, cookie.as_deref(), early, opts).await,
                };
                match attempt {
                    Ok(c) => {
                        self.lock().avoid_until.remove(&conv);
                        return Ok((c, conv));
                    }
                    // The value of Error 3 is a 0 byte, then the cookie.
                    Err(ClientError::Refused {
                        code: ErrorCode::MissingCookie,
                        value,
                    }) if value.len() > 1 => {
                        tracing::debug!(%conv, "converter asked for a cookie; retrying with it");
                        self.lock().cookies.insert(conv, value[1..].to_vec());
                    }
                    Err(ClientError::Refused {
                        code: code @ (ErrorCode::ResourceExceeded | ErrorCode::NetworkFailure),
                        value,
                    }) => {
                        self.failed(conv, value.first().copied(), stats);
                        last = format!("{conv}: Error {code}");
                        break;
                    }
                    Err(ClientError::Refused { code, .. }) => {
                        if code == ErrorCode::NotAuthorized {
                            // A stale cookie (the converter restarted) is refused as "not
                            // authorized": drop it so the next attempt asks for a new one.
                            self.lock().cookies.remove(&conv);
                        }
                        return Err(ConvertFailure::Refused {
                            code,
                            converter: conv,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(%conv, error = %e, "converter failed; trying the next");
                        self.failed(conv, None, stats);
                        last = format!("{conv}: {e}");
                        break;
                    }
                }
            }
        }
        Err(ConvertFailure::NoConverter(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_reorders_and_expires() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1".parse().unwrap();
        let c = Converters::new(vec![a, b], Duration::from_millis(50));
        assert_eq!(c.order(), [a, b]);
        c.avoid(a, None);
        assert_eq!(c.order(), [b], "a is in back-off");
        c.avoid(b, Some(60));
        assert_eq!(c.order(), [a, b], "all in back-off: soonest first");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.order(), [a], "a's back-off expired; b's (60 s) has not");
    }
}
