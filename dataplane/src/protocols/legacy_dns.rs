//! The legacy gateway (`internet2-server --enable-legacy-gateway`): the
//! same zone over plain DNS on UDP, for resolvers that do not speak DoQ.
//! Off by default. IPv6 only, like everything else.
//!
//! One thread with a blocking socket (a read timeout lets it notice a
//! stop); answers come from the same [`ZoneStore`] snapshot the `doq`
//! workers read. Responses to responses are never sent (no reflection
//! loops) and answers never exceed 512 bytes (RFC 1035 §4.2.1: larger ones
//! go out truncated with TC set).

use super::doq::{Answer, Transport, ZoneStore, answer_with};
use std::io;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the thread looks at its stop flag while idle.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Largest query read (anything longer is not a plain-UDP DNS query).
const QUERY_MAX: usize = 4096;

#[derive(Debug, Default)]
pub struct GatewayCounters {
    pub queries: AtomicU64,
    /// Datagrams dropped: responses, or nothing to answer.
    pub dropped: AtomicU64,
}

pub struct LegacyGateway {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub local: SocketAddr,
    pub counters: Arc<GatewayCounters>,
}

impl LegacyGateway {
    /// Bind `listen` (IPv6 only) and answer from `zone` until stopped.
    pub fn start(listen: SocketAddrV6, zone: Arc<ZoneStore>) -> io::Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_only_v6(true)?;
        socket.bind(&SocketAddr::V6(listen).into())?;
        let socket: UdpSocket = socket.into();
        socket.set_read_timeout(Some(STOP_POLL))?;
        let local = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(GatewayCounters::default());
        let thread = std::thread::Builder::new()
            .name("dns-gateway".into())
            .spawn({
                let stop = stop.clone();
                let counters = counters.clone();
                move || serve(&socket, &zone, &stop, &counters)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            local,
            counters,
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(socket: &UdpSocket, zone: &ZoneStore, stop: &AtomicBool, counters: &GatewayCounters) {
    let mut buf = vec![0u8; QUERY_MAX];
    while !stop.load(Ordering::Relaxed) {
        let (len, peer) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "legacy DNS gateway: receive failed");
                continue;
            }
        };
        let query = &buf[..len];
        // A message with QR set is a response: answering it could loop
        // between two servers.
        if query.len() >= 3 && query[2] & 0x80 != 0 || is_v4_mapped(&peer) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.queries.fetch_add(1, Ordering::Relaxed);
        match answer_with(&zone.load(), query, Transport::Udp) {
            Answer::Response(bytes) => {
                let _ = socket.send_to(&bytes, peer);
            }
            Answer::ProtocolError(_) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn is_v4_mapped(peer: &SocketAddr) -> bool {
    match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    }
}

impl Drop for LegacyGateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
