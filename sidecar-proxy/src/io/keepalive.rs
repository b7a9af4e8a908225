//! TCP keepalive on both sockets of a proxied connection: a peer that vanished without a FIN
//! or RST (its node gone, a middlebox that dropped the flow) is noticed on a connection that
//! is idle, instead of holding two descriptors until the idle timeout; and the probes keep
//! the flow alive in middleboxes that forget quiet flows sooner (cloud load balancers drop
//! them after 350 s or so).
//!
//! Set on the listeners: Linux gives every accepted socket its listener's keepalive and
//! `TCP_NODELAY`, which saves five `setsockopt` calls per accepted connection.
use std::{os::fd::AsFd, time::Duration};

use rustix::net::sockopt;
use tracing::debug;

/// Between unanswered probes, and how many make the peer dead: Linux's own defaults.
const PROBE_INTERVAL: Duration = Duration::from_secs(75);
const PROBES: u32 = 9;

/// Turns keepalive on with the first probe after `idle` without traffic (`None`: left off).
pub fn enable(stream: impl AsFd, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return;
    };
    let result = sockopt::set_socket_keepalive(&stream, true)
        .and_then(|()| sockopt::set_tcp_keepidle(&stream, idle))
        .and_then(|()| sockopt::set_tcp_keepintvl(&stream, PROBE_INTERVAL))
        .and_then(|()| sockopt::set_tcp_keepcnt(&stream, PROBES));
    if let Err(error) = result {
        debug!(%error, "cannot set TCP keepalive");
    }
}

/// What every accepted connection of `listener` gets: keepalive after `idle`, and no Nagle
/// delay (relayed small writes must not wait: the peer chose its batching).
pub fn configure_listener(listener: impl AsFd, idle: Option<Duration>) {
    if let Err(error) = sockopt::set_tcp_nodelay(&listener, true) {
        debug!(%error, "cannot set TCP_NODELAY");
    }
    enable(listener, idle);
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        configure_listener(&listener, Some(Duration::from_secs(300)));
        let _client = TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        assert!(sockopt::tcp_nodelay(&accepted)?);
        assert!(sockopt::socket_keepalive(&accepted)?);
        assert_eq!(sockopt::tcp_keepidle(&accepted)?, Duration::from_secs(300));
        assert_eq!(sockopt::tcp_keepintvl(&accepted)?, PROBE_INTERVAL);
        assert_eq!(sockopt::tcp_keepcnt(&accepted)?, PROBES);
        Ok(())
    }

    #[tokio::test]
    async fn keepalive_is_set_with_the_idle_time_asked_for() -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stream = TcpStream::connect(listener.local_addr()?).await?;
        enable(&stream, Some(Duration::from_secs(300)));
        assert!(sockopt::socket_keepalive(&stream)?);
        assert_eq!(sockopt::tcp_keepidle(&stream)?, Duration::from_secs(300));
        assert_eq!(sockopt::tcp_keepcnt(&stream)?, PROBES);

        let off = TcpStream::connect(listener.local_addr()?).await?;
        enable(&off, None);
        assert!(!sockopt::socket_keepalive(&off)?);
        Ok(())
    }
}
