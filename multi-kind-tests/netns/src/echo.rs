//! The test backends and clients: a TCP echo server that answers with its identity
//! (`<cluster>/<pod>`), and a one-shot client that prints the answer.
//!
//! The identity in the answer is what the failover scenarios assert on: which cluster and
//! which pod a new connection landed on.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Longest request line a server reads.
const MAX_LINE: u64 = 1024;

/// Serves forever on `listen`, answering each connection's first line with
/// `<identity> <line>\n`. Calls `ready` once the socket is bound.
pub fn serve(
    listen: SocketAddr,
    identity: &str,
    ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    ready(listener.local_addr()?);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let identity = identity.to_string();
        std::thread::spawn(move || {
            if let Err(e) = answer(conn, &identity) {
                tracing::debug!(error = %e, "echo connection ended early");
            }
        });
    }
    Ok(())
}

fn answer(conn: TcpStream, identity: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    let mut w = &conn;
    w.write_all(format!("{identity} {}\n", line.trim_end()).as_bytes())?;
    w.flush()
}

/// Connects to `to`, sends `message`, returns the answer line without its newline.
pub fn request(to: SocketAddr, message: &str, timeout: Duration) -> std::io::Result<String> {
    let conn = TcpStream::connect_timeout(&to, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let mut w = &conn;
    w.write_all(format!("{message}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    Ok(line.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn server_answers_with_identity_and_request_line() {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            serve("127.0.0.1:0".parse().unwrap(), "c1/pod-a", |addr| {
                tx.send(addr).unwrap()
            })
            .unwrap();
        });
        let addr = rx.recv().unwrap();
        let reply = request(addr, "hello", Duration::from_secs(2)).unwrap();
        assert_eq!(reply, "c1/pod-a hello");
    }

    #[test]
    fn refused_connection_is_an_error() {
        // Bind then drop to get a loopback port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(request(port, "x", Duration::from_millis(500)).is_err());
    }
}
