//! Relay threads and lanes.
//!
//! A relay may serve its connections on several threads, each running a runtime of its own
//! over its own listening socket on the same port (`SO_REUSEPORT`: the kernel spreads new
//! connections over them). A connection stays on the thread that accepted it. A session's
//! client may then join extra connections, *lanes*, to its live one, so that each thread has a
//! connection of the session: a caller's request goes through the lane on the caller's own
//! thread, and the threads work side by side instead of passing every request to the one
//! thread that holds the session's connection (see docs/DESIGN.md, "Lanes").
//!
//! Lanes are opened on demand: the relay asks the client for one (`OpenLane`) the first time a
//! caller arrives on a thread without one, so an idle client keeps a single connection.

use std::cell::Cell;
use std::net::SocketAddr;

thread_local! {
    static HOME: Cell<usize> = const { Cell::new(0) };
}

/// Most relay threads (lanes asked for are kept as bits of a `u64`).
pub const MAX_THREADS: usize = 64;

/// The relay thread running now: 0 for the first (and any thread that is not a relay thread).
pub fn home() -> usize {
    HOME.with(Cell::get)
}

/// Marks the current thread as relay thread `index`.
pub(crate) fn set_home(index: usize) {
    HOME.with(|home| home.set(index));
}

/// `count` listening sockets on `addr`, sharing its port with `SO_REUSEPORT` where there is
/// more than one (port 0 picks one free port for all of them). Only one socket off Linux and
/// other Unix systems with `SO_REUSEPORT`.
///
/// A port another program listens on is refused (`AddrInUse`), even one whose sockets have
/// `SO_REUSEPORT` too: the port is first bound without it, so a second relay started on the
/// same port by mistake fails as it did before lanes instead of taking half the callers.
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let count = if REUSE_PORT {
        count.clamp(1, MAX_THREADS)
    } else {
        1
    };
    let mut addr = addr;
    if count > 1 {
        let probe = socket(addr, false)?;
        addr = probe.local_addr()?;
    }
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let listener = socket(addr, count > 1)?;
        // Every further socket binds the port the first one got.
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Whether this system lets sockets share a port (`SO_REUSEPORT`).
const REUSE_PORT: bool = cfg!(all(
    unix,
    not(any(
        target_os = "solaris",
        target_os = "illumos",
        target_os = "cygwin"
    ))
));

/// A listening socket on `addr`, non-blocking, sharing the port if `shared`.
fn socket(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    if shared {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    )))]
    let _ = shared;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_share_one_port() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(listeners.len(), 3);
        let port = listeners[0].local_addr().unwrap().port();
        assert!(listeners
            .iter()
            .all(|l| l.local_addr().unwrap().port() == port));
    }

    #[test]
    fn a_port_in_use_is_refused_even_by_a_relay_with_shared_sockets() {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind(plain.local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

        let relay = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = relay[0].local_addr().unwrap();
        for count in [1, 2] {
            let err = bind(addr, count).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{count} sockets");
        }
    }
}
