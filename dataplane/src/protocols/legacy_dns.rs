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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::doq::{PublishedName, Zone};
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use std::net::Ipv6Addr;

    fn gateway() -> LegacyGateway {
        let zone = Zone::from_records(
            "internet2.test.",
            "node1",
            7,
            &[PublishedName {
                name: "node1.internet2.test.".into(),
                aaaa: vec![Ipv6Addr::LOCALHOST],
                tlsa: vec![(4433, [7u8; 32])],
            }],
        )
        .unwrap();
        LegacyGateway::start(
            SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0),
            ZoneStore::new(zone),
        )
        .unwrap()
    }

    fn client(gateway: &LegacyGateway) -> UdpSocket {
        let socket = UdpSocket::bind("[::1]:0").unwrap();
        socket.connect(gateway.local).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        socket
    }

    fn query(name: &str, kind: RecordType, id: u16) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message
            .queries
            .push(Query::query(Name::from_ascii(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    #[test]
    fn answers_from_the_zone_with_the_query_id() {
        let gateway = gateway();
        let socket = client(&gateway);
        let mut buf = [0u8; 1500];
        socket
            .send(&query("node1.internet2.test.", RecordType::AAAA, 4242))
            .unwrap();
        let n = socket.recv(&mut buf).unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(answer.metadata.id, 4242);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer.answers.len(), 1);
        socket
            .send(&query("nope.internet2.test.", RecordType::AAAA, 9))
            .unwrap();
        let n = socket.recv(&mut buf).unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
        gateway.stop();
    }

    #[test]
    fn garbage_gets_formerr_and_responses_get_nothing() {
        let gateway = gateway();
        let socket = client(&gateway);
        let mut buf = [0u8; 1500];
        socket.send(&[0x12, 0x34, 0x01, 0x00, 0xff]).unwrap();
        let n = socket.recv(&mut buf).unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(answer.metadata.id, 0x1234, "the ID is echoed");
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
        // A response (QR set) is never answered: no reflection loops.
        let mut response = query("node1.internet2.test.", RecordType::AAAA, 5);
        response[2] |= 0x80;
        socket.send(&response).unwrap();
        assert!(socket.recv(&mut buf).is_err(), "a response was answered");
        // And the gateway still serves.
        socket
            .send(&query("node1.internet2.test.", RecordType::TLSA, 6))
            .unwrap();
        assert!(socket.recv(&mut buf).is_ok());
        assert_eq!(gateway.counters.dropped.load(Ordering::Relaxed), 1);
        gateway.stop();
    }
}
