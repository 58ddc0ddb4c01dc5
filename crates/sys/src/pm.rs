//! The in-kernel MPTCP path manager, over generic netlink (`ip mptcp ...` without the `ip`).

use std::io;

use futures::TryStreamExt;
use mptcp_pm::{MptcpPathManagerAttr, MptcpPathManagerLimitsAttr};

/// `ip mptcp limits` of the current network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PmLimits {
    /// Extra subflows a connection may have (joins accepted or created).
    pub subflows: u32,
    /// ADD_ADDR announcements a connection may act on.
    pub add_addr_accepted: u32,
}

/// Reads the path manager's limits. Needs a tokio runtime (the netlink connection runs on it).
pub async fn limits() -> io::Result<PmLimits> {
    let (conn, handle, _) = mptcp_pm::new_connection()?;
    let task = tokio::spawn(conn);
    let result = async {
        let mut stream = Box::pin(handle.limits().get().execute().await);
        let mut limits = PmLimits::default();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
        {
            for nla in msg.payload.nlas {
                match nla {
                    MptcpPathManagerAttr::Limits(MptcpPathManagerLimitsAttr::Subflows(n)) => {
                        limits.subflows = n
                    }
                    MptcpPathManagerAttr::Limits(MptcpPathManagerLimitsAttr::RcvAddAddrs(n)) => {
                        limits.add_addr_accepted = n
                    }
                    _ => {}
                }
            }
        }
        Ok(limits)
    }
    .await;
    task.abort();
    result
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn reads_this_namespace_limits() {
        // The values depend on the machine; reading them at all is what is tested.
        let l = super::limits().await.unwrap();
        assert!(l.subflows <= 8, "{l:?}");
    }
}
