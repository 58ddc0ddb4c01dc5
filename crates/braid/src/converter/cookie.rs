//! Convert cookies (RFC 8803 §5.1): a client without one gets Error 3 with
//! a fresh cookie; it retries with the cookie, which is valid only from the same address.
//!
//! A cookie is `epoch (u32, hours since the Unix epoch) ‖ HMAC-SHA256(secret, label ‖ epoch ‖
//! client address)[..16]`. The converter keeps no per-client state: a cookie verifies itself
//! for the hour it was issued and the next, so a rotating secret is not needed for expiry.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const LABEL: &[u8] = b"braid convert cookie v1";
const MAC_LEN: usize = 16;
/// Length of a cookie on the wire.
pub const COOKIE_LEN: usize = 4 + MAC_LEN;

#[derive(Debug)]
pub struct CookieJar {
    secret: Vec<u8>,
}

impl CookieJar {
    /// With no configured secret a random one is drawn: cookies then die with the process,
    /// which only costs clients one extra round trip after a restart.
    pub fn new(secret: Option<Vec<u8>>) -> CookieJar {
        let secret = secret.unwrap_or_else(|| {
            let mut s = vec![0u8; 32];
            rand::fill(&mut s[..]);
            s
        });
        CookieJar { secret }
    }

    fn mac(&self, epoch: u32, client: IpAddr) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(LABEL);
        mac.update(&epoch.to_be_bytes());
        let client = match client.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        mac.update(&client.octets());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    /// A cookie for `client`, valid for this hour and the next.
    pub fn issue(&self, client: IpAddr) -> [u8; COOKIE_LEN] {
        self.issue_at(client, now_epoch())
    }

    fn issue_at(&self, client: IpAddr, epoch: u32) -> [u8; COOKIE_LEN] {
        let mut c = [0u8; COOKIE_LEN];
        c[..4].copy_from_slice(&epoch.to_be_bytes());
        c[4..].copy_from_slice(&self.mac(epoch, client));
        c
    }

    pub fn verify(&self, client: IpAddr, cookie: &[u8]) -> bool {
        self.verify_at(client, cookie, now_epoch())
    }

    fn verify_at(&self, client: IpAddr, cookie: &[u8], now: u32) -> bool {
        let Ok(cookie) = <&[u8; COOKIE_LEN]>::try_from(cookie) else {
            return false;
        };
        let epoch = u32::from_be_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
        if epoch != now && epoch.wrapping_add(1) != now {
            return false;
        }
        let expected = self.mac(epoch, client);
        // Constant time: the comparison must not tell an attacker how many bytes matched.
        expected
            .iter()
            .zip(&cookie[4..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn now_epoch() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (secs / 3600) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_bound_to_its_client_and_hour() {
        let jar = CookieJar::new(Some(b"0123456789abcdef".to_vec()));
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        let b: IpAddr = "10.1.1.2".parse().unwrap();
        let c = jar.issue_at(a, 1000);
        assert!(jar.verify_at(a, &c, 1000));
        assert!(jar.verify_at(a, &c, 1001), "valid the next hour");
        assert!(!jar.verify_at(a, &c, 1002), "expired");
        assert!(!jar.verify_at(b, &c, 1000), "other client");
        assert!(
            jar.verify_at("::ffff:10.1.1.1".parse().unwrap(), &c, 1000),
            "mapped form of the same client"
        );
        let mut bad = c;
        bad[10] ^= 1;
        assert!(!jar.verify_at(a, &bad, 1000));
        assert!(!jar.verify_at(a, &c[..19], 1000));
        assert!(!jar.verify_at(a, b"", 1000));
        let other = CookieJar::new(Some(b"fedcba9876543210".to_vec()));
        assert!(!other.verify_at(a, &c, 1000), "other secret");
    }
}
