//! Free loopback ports for the nodes of a sandbox.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Returns `n` distinct TCP ports on 127.0.0.1 that were free a moment ago.
///
/// Each port comes from binding `127.0.0.1:0` and reading the port the kernel picked. All
/// `n` listeners are held at the same time, so the ports differ from each other; then they
/// are all released, so that the nodes can bind them.
///
/// # The race
///
/// Between the release here and a node's own bind, another process on the machine can take
/// the port: a test binding port 0 itself, or an outgoing connection that draws the same
/// ephemeral port. The window is a few milliseconds and the kernel picks ports at random
/// from a range of about 28,000, so it is rare; when it happens the node cannot bind, exits,
/// and `wait_http_ready` reports [`SandboxError::Exited`](crate::SandboxError::Exited) with
/// "address in use" in the log tail. Binding the port in the harness and handing the socket
/// to the child would close the window, but `cohort` takes addresses, not sockets.
pub fn free_loopback_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_are_distinct_nonzero_and_bindable() {
        let ports = free_loopback_ports(16).expect("ports");
        assert_eq!(ports.len(), 16);
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 16, "{ports:?}");
        assert!(ports.iter().all(|&p| p != 0));
        // Released: a node can bind them now (all at once, as a sandbox's nodes do).
        let held: Vec<TcpListener> = ports
            .iter()
            .map(|&p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("port is free"))
            .collect();
        assert_eq!(held.len(), 16);
    }

    #[test]
    fn zero_ports_is_an_empty_list() {
        assert!(free_loopback_ports(0).expect("ports").is_empty());
    }
}
