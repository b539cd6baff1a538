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
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let count = count.clamp(1, MAX_THREADS);
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
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
        if count > 1 {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        // Every further socket binds the port the first one got.
        addr = listener.local_addr()?;
        listeners.push(listener);
        if !cfg!(unix) {
            break;
        }
    }
    Ok(listeners)
}
