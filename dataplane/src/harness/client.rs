//! The harness's client: a bare `quinn_proto::Endpoint` and its
//! connections, driven directly (no worker, no service), so every op can
//! do to a stream exactly what the input says.

use crate::io::memory::Datagram;
use crate::protocols::Alpn;
use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, Event,
    ReadError, StreamId,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Response bytes kept per stream (more are counted, not kept).
const KEPT_BYTES_MAX: usize = 64 * 1024;
/// Datagrams per `poll_transmit` call (a GSO batch, split before sending).
const BATCH_DATAGRAMS: usize = 4;

/// What came back on one stream.
#[derive(Debug, Default)]
pub struct Received {
    /// The first [`KEPT_BYTES_MAX`] bytes.
    pub bytes: Vec<u8>,
    /// All bytes read.
    pub len: u64,
    /// The server finished the stream.
    pub fin: bool,
    /// The server reset the stream.
    pub reset: bool,
}

pub struct ClientConn {
    pub handle: ConnectionHandle,
    pub conn: Connection,
    pub alpn: Alpn,
    /// Bidirectional streams opened, in order.
    pub streams: Vec<StreamId>,
    /// Read what the server sends (off: let it back up).
    pub reading: bool,
    pub received: HashMap<StreamId, Received>,
    /// The handshake completed.
    pub connected: bool,
    /// The connection ended (closed by either side, or timed out).
    pub lost: bool,
    /// Why, as quinn reported it.
    pub lost_reason: Option<String>,
    /// Opened for the honest checks, not by the input's ops.
    pub honest: bool,
}

pub struct Client {
    endpoint: Endpoint,
    pub addr: SocketAddr,
    /// Live connections in the order they were made.
    pub conns: Vec<ClientConn>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None),
            addr,
            conns: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Start a connection; its index in `conns`, or None if quinn refused.
    pub fn connect(
        &mut self,
        now: Instant,
        config: ClientConfig,
        server: SocketAddr,
        server_name: &str,
        alpn: Alpn,
    ) -> Option<usize> {
        let (handle, conn) = self
            .endpoint
            .connect(now, config, server, server_name)
            .ok()?;
        self.conns.push(ClientConn {
            handle,
            conn,
            alpn,
            streams: Vec::new(),
            reading: true,
            received: HashMap::new(),
            connected: false,
            lost: false,
            lost_reason: None,
            honest: false,
        });
        Some(self.conns.len() - 1)
    }

    /// One datagram from the network; stateless answers go to `out`.
    pub fn handle(&mut self, now: Instant, d: Datagram, out: &mut Vec<Datagram>) {
        self.buf.clear();
        let event = self.endpoint.handle(
            now,
            d.source,
            Some(self.addr.ip()),
            d.ecn,
            BytesMut::from(&d.contents[..]),
            &mut self.buf,
        );
        match event {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(c) = self.conns.iter_mut().find(|c| c.handle == ch) {
                    c.conn.handle_event(event);
                }
            }
            Some(DatagramEvent::Response(t)) => out.push(Datagram {
                source: self.addr,
                destination: t.destination,
                ecn: t.ecn,
                contents: self.buf[..t.size].to_vec(),
            }),
            // A client accepts no connections.
            Some(DatagramEvent::NewConnection(incoming)) => self.endpoint.ignore(incoming),
            None => {}
        }
    }

    /// Fire due timers, process events, read what there is and send what
    /// every connection has; drained connections are forgotten.
    pub fn drive(&mut self, now: Instant, out: &mut Vec<Datagram>) {
        let addr = self.addr;
        for c in &mut self.conns {
            if c.conn.poll_timeout().is_some_and(|at| at <= now) {
                c.conn.handle_timeout(now);
            }
            pump_endpoint_events(&mut self.endpoint, c);
            while let Some(event) = c.conn.poll() {
                match event {
                    Event::Connected => c.connected = true,
                    Event::ConnectionLost { reason } => {
                        c.lost = true;
                        c.lost_reason = Some(reason.to_string());
                    }
                    _ => {}
                }
            }
            if c.reading {
                c.read_all();
            }
            loop {
                self.buf.clear();
                let Some(t) = c.conn.poll_transmit(now, BATCH_DATAGRAMS, &mut self.buf) else {
                    break;
                };
                let segment = t.segment_size.unwrap_or(t.size).max(1);
                for contents in self.buf[..t.size].chunks(segment) {
                    out.push(Datagram {
                        source: addr,
                        destination: t.destination,
                        ecn: t.ecn,
                        contents: contents.to_vec(),
                    });
                }
            }
            pump_endpoint_events(&mut self.endpoint, c);
        }
        self.conns.retain(|c| !c.conn.is_drained());
    }

    /// The earliest timer of any connection.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.conns
            .iter_mut()
            .filter_map(|c| c.conn.poll_timeout())
            .min()
    }

    /// The connection `index` names among those the input made and has
    /// not closed, newest first (modulo their count), if there is one.
    pub fn hostile(&mut self, index: u8) -> Option<&mut ClientConn> {
        let usable = |c: &ClientConn| !c.honest && !c.conn.is_closed();
        let live = self.conns.iter().filter(|c| usable(c)).count();
        if live == 0 {
            return None;
        }
        let nth = usize::from(index) % live;
        self.conns.iter_mut().rev().filter(|c| usable(c)).nth(nth)
    }
}

impl ClientConn {
    /// The stream `index` names among those opened, newest first (modulo
    /// their count).
    pub fn stream(&self, index: u8) -> Option<StreamId> {
        if self.streams.is_empty() {
            return None;
        }
        let nth = usize::from(index) % self.streams.len();
        Some(self.streams[self.streams.len() - 1 - nth])
    }

    fn read_all(&mut self) {
        for &id in &self.streams {
            let received = self.received.entry(id).or_default();
            if received.fin || received.reset {
                continue;
            }
            let mut recv = self.conn.recv_stream(id);
            let Ok(mut chunks) = recv.read(true) else {
                continue;
            };
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        received.len += chunk.bytes.len() as u64;
                        let room = KEPT_BYTES_MAX.saturating_sub(received.bytes.len());
                        let keep = chunk.bytes.len().min(room);
                        received.bytes.extend_from_slice(&chunk.bytes[..keep]);
                    }
                    Ok(None) => {
                        received.fin = true;
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                    Err(ReadError::Reset(_)) => {
                        received.reset = true;
                        break;
                    }
                }
            }
            let _ = chunks.finalize();
        }
    }
}

fn pump_endpoint_events(endpoint: &mut Endpoint, c: &mut ClientConn) {
    while let Some(event) = c.conn.poll_endpoint_events() {
        if let Some(reply) = endpoint.handle_event(c.handle, event) {
            c.conn.handle_event(reply);
        }
    }
}
