//! TCP keepalive on both sockets of a proxied connection: a peer that vanished without a FIN
//! or RST (its node gone, a middlebox that dropped the flow) is noticed on a connection that
//! is idle, instead of holding two descriptors until the idle timeout; and the probes keep
//! the flow alive in middleboxes that forget quiet flows sooner (cloud load balancers drop
//! them after 350 s or so).
use std::time::Duration;

use rustix::net::sockopt;
use tokio::net::TcpStream;
use tracing::debug;

/// Between unanswered probes, and how many make the peer dead: Linux's own defaults.
const PROBE_INTERVAL: Duration = Duration::from_secs(75);
const PROBES: u32 = 9;

/// Turns keepalive on with the first probe after `idle` without traffic (`None`: left off).
pub fn enable(stream: &TcpStream, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return;
    };
    let result = sockopt::set_socket_keepalive(stream, true)
        .and_then(|()| sockopt::set_tcp_keepidle(stream, idle))
        .and_then(|()| sockopt::set_tcp_keepintvl(stream, PROBE_INTERVAL))
        .and_then(|()| sockopt::set_tcp_keepcnt(stream, PROBES));
    if let Err(error) = result {
        debug!(%error, "cannot set TCP keepalive");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
