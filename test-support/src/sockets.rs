//! Raw TCP endpoints for the datapath benchmarks: a sink that accepts and drops
//! connections, and a `connect()` timed alone.

use std::net::{SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, connect, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn,
};

/// A TCP server that accepts and immediately drops connections (backlog SOMAXCONN), on
/// its own thread, until dropped.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on `addr` (port 0: any free port).
    pub fn start(addr: SocketAddrV4) -> Self {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
        bind(fd.as_raw_fd(), &SockaddrIn::from(addr))
            .unwrap_or_else(|e| panic!("bind sink on {addr}: {e}"));
        listen(&fd, Backlog::MAXCONN).unwrap();
        let listener = TcpListener::from(fd);
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(a) => panic!("IPv4 sink bound to {a}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            for s in listener.incoming() {
                drop(s);
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One raw connect: socket(), SO_LINGER 0 (close sends RST, no TIME_WAIT pile-up),
/// connect() timed alone, close().
///
/// # Errors
/// The socket call that failed (a `connect` refused by policy is `EPERM`).
pub fn timed_connect(to: SocketAddrV4) -> nix::Result<Duration> {
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(
        &fd,
        sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    let addr = SockaddrIn::from(to);
    let t = Instant::now();
    connect(fd.as_raw_fd(), &addr)?;
    Ok(t.elapsed())
}
