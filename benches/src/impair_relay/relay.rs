//! The relay's sockets and schedule: clients on one listening socket, one
//! upstream socket per client address (so the server sees each flow as its
//! own peer), a `Link` per direction shared by every flow, and one heap of
//! scheduled deliveries across both directions.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, ErrorKind};
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::link::{Link, LinkConfig, Verdict};
use crate::sys;

/// The receive buffer: larger than any UDP payload (65527 over IPv6), so
/// no datagram is ever truncated.
const DATAGRAM_BYTES_MAX: usize = 65_536;
/// Datagrams read from one socket per wake-up, so one busy socket cannot
/// hold back the others or the deliveries that fall due meanwhile.
const READ_BATCH: usize = 64;

pub struct RelayConfig {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub to_server: LinkConfig,
    pub to_client: LinkConfig,
    /// Client addresses served; datagrams from more are dropped.
    pub flows_max: usize,
    /// Kernel buffer of each socket, each way.
    pub socket_buffer_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// One client address and the socket that speaks for it to the server.
/// Flows are never removed (the relay lives for one run), so an index into
/// `Relay::flows` stays valid for the deliveries that name it.
struct Flow {
    client: SocketAddr,
    upstream: UdpSocket,
}

/// A datagram waiting for its delivery time.
struct Scheduled {
    at_ns: u64,
    /// Arrival order, so datagrams due at the same nanosecond keep it.
    seq: u64,
    direction: Direction,
    flow: usize,
    payload: Box<[u8]>,
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest delivery must be greatest.
        (other.at_ns, other.seq).cmp(&(self.at_ns, self.seq))
    }
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ns, self.seq) == (other.at_ns, other.seq)
    }
}

impl Eq for Scheduled {}

pub struct Relay {
    listen: UdpSocket,
    upstream: SocketAddr,
    socket_buffer_bytes: usize,
    flows: Vec<Flow>,
    by_client: HashMap<SocketAddr, usize>,
    flows_max: usize,
    flows_refused: u64,
    to_server: Link,
    to_client: Link,
    recv_errors: u64,
    /// Bounded by the links' buffer bounds: every entry holds room in one.
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    epoch: Instant,
    buf: Box<[u8]>,
    /// The listening socket, then each flow's upstream socket in order.
    pollfds: Vec<libc::pollfd>,
}

impl Relay {
    pub fn bind(config: RelayConfig) -> io::Result<Relay> {
        let listen = UdpSocket::bind(config.listen)?;
        listen.set_nonblocking(true)?;
        sys::tune_socket(&listen, config.socket_buffer_bytes);
        let pollfds = vec![pollfd(&listen)];
        Ok(Relay {
            listen,
            upstream: config.upstream,
            socket_buffer_bytes: config.socket_buffer_bytes,
            flows: Vec::new(),
            by_client: HashMap::new(),
            flows_max: config.flows_max,
            flows_refused: 0,
            to_server: Link::new(config.to_server),
            to_client: Link::new(config.to_client),
            recv_errors: 0,
            heap: BinaryHeap::new(),
            seq: 0,
            epoch: Instant::now(),
            buf: vec![0; DATAGRAM_BYTES_MAX].into_boxed_slice(),
            pollfds,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    /// Call in a loop: sends what has fallen due, waits until a socket is
    /// readable, the next delivery is due, `deadline` passes or a signal
    /// that `mask` unblocks arrives, then reads and sends again. Errors
    /// are the wait's own; a datagram never makes it fail.
    pub fn poll(
        &mut self,
        deadline: Option<Instant>,
        mask: Option<&libc::sigset_t>,
    ) -> io::Result<()> {
        self.deliver_due();
        let next = self
            .heap
            .peek()
            .map(|s| Duration::from_nanos(s.at_ns.saturating_sub(self.now_ns())));
        let until_deadline = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let timeout = match (next, until_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for fd in &mut self.pollfds {
            fd.revents = 0;
        }
        if sys::ppoll(&mut self.pollfds, timeout, mask)? > 0 {
            // Reading may add flows (and pollfds): take the ready set first.
            let ready: Vec<usize> = (0..self.pollfds.len())
                .filter(|&i| self.pollfds[i].revents != 0)
                .collect();
            for i in ready {
                match i {
                    0 => self.read_clients(),
                    i => self.read_server(i - 1),
                }
            }
        }
        self.deliver_due();
        Ok(())
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn read_clients(&mut self) {
        for _ in 0..READ_BATCH {
            match self.listen.recv_from(&mut self.buf) {
                Ok((len, from)) => {
                    if let Some(flow) = self.flow_of(from) {
                        self.schedule(Direction::ToServer, flow, len);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => self.recv_errors += 1,
            }
        }
    }

    fn read_server(&mut self, flow: usize) {
        for _ in 0..READ_BATCH {
            match self.flows[flow].upstream.recv(&mut self.buf) {
                Ok(len) => self.schedule(Direction::ToClient, flow, len),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP errors (the server not listening yet, or gone)
                // surface here; the datagram they answer is simply lost.
                Err(_) => self.recv_errors += 1,
            }
        }
    }

    /// The flow of a client address, opened on its first datagram; `None`
    /// when the flow table is full or the upstream socket cannot be made.
    fn flow_of(&mut self, client: SocketAddr) -> Option<usize> {
        if let Some(&flow) = self.by_client.get(&client) {
            return Some(flow);
        }
        if self.flows.len() >= self.flows_max {
            self.flows_refused += 1;
            return None;
        }
        let Ok(upstream) = self.open_upstream() else {
            self.flows_refused += 1;
            return None;
        };
        self.pollfds.push(pollfd(&upstream));
        self.flows.push(Flow { client, upstream });
        self.by_client.insert(client, self.flows.len() - 1);
        Some(self.flows.len() - 1)
    }

    fn open_upstream(&self) -> io::Result<UdpSocket> {
        let any = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0);
        let socket = UdpSocket::bind(any)?;
        socket.connect(self.upstream)?;
        socket.set_nonblocking(true)?;
        sys::tune_socket(&socket, self.socket_buffer_bytes);
        Ok(socket)
    }

    /// Runs the datagram in `buf[..len]` through its direction's link.
    fn schedule(&mut self, direction: Direction, flow: usize, len: usize) {
        let now = self.now_ns();
        let link = match direction {
            Direction::ToServer => &mut self.to_server,
            Direction::ToClient => &mut self.to_client,
        };
        if let Verdict::Deliver { at_ns, .. } = link.handle_datagram(now, len) {
            self.seq += 1;
            self.heap.push(Scheduled {
                at_ns,
                seq: self.seq,
                direction,
                flow,
                payload: self.buf[..len].into(),
            });
        }
    }

    /// Sends every datagram whose time has come. A failed send (socket
    /// buffer full, too big for the path) loses the datagram, as a link
    /// would, and is counted.
    fn deliver_due(&mut self) {
        let now = self.now_ns();
        while self.heap.peek().is_some_and(|s| s.at_ns <= now) {
            let Some(s) = self.heap.pop() else { break };
            let flow = &self.flows[s.flow];
            let (sent, link) = match s.direction {
                Direction::ToServer => (flow.upstream.send(&s.payload), &mut self.to_server),
                Direction::ToClient => (
                    self.listen.send_to(&s.payload, flow.client),
                    &mut self.to_client,
                ),
            };
            link.handle_delivered(s.payload.len(), sent.is_ok());
        }
    }

    /// Counters per direction and of the flow table.
    pub fn stats_json(&self) -> Value {
        json!({
            "flows": self.flows.len(),
            "flows_refused": self.flows_refused,
            "recv_errors": self.recv_errors,
            "scheduled_at_exit": self.heap.len(),
            "to_server": self.to_server.stats().to_json(),
            "to_client": self.to_client.stats().to_json(),
        })
    }
}

fn pollfd(socket: &UdpSocket) -> libc::pollfd {
    libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_link() -> LinkConfig {
        LinkConfig::plain()
    }

    /// Polls the relay until `socket` has a datagram, and returns it with
    /// its source; a step bound, not a clock, decides that none came.
    fn relay_until_received(
        relay: &mut Relay,
        socket: &UdpSocket,
    ) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0; DATAGRAM_BYTES_MAX];
        for _ in 0..500 {
            match socket.recv_from(&mut buf) {
                Ok((len, from)) => return Some((buf[..len].to_vec(), from)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
            relay
                .poll(Some(Instant::now() + Duration::from_millis(10)), None)
                .unwrap();
        }
        None
    }

    #[test]
    fn datagrams_of_every_size_cross_both_ways() {
        let server = UdpSocket::bind("[::1]:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let mut relay = Relay::bind(RelayConfig {
            listen: "[::1]:0".parse().unwrap(),
            upstream: server.local_addr().unwrap(),
            to_server: plain_link(),
            to_client: plain_link(),
            flows_max: 4,
            socket_buffer_bytes: 1 << 20,
        })
        .unwrap();
        let client = UdpSocket::bind("[::1]:0").unwrap();
        client.set_nonblocking(true).unwrap();
        client.connect(relay.local_addr().unwrap()).unwrap();
        for len in [0, 1, 1200, 9000, 65_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            client.send(&payload).unwrap();
            let (got, flow) = relay_until_received(&mut relay, &server).expect("to the server");
            assert_eq!(got, payload, "{len} bytes to the server");
            // The server answers the relay's upstream socket of this client.
            let reply: Vec<u8> = payload.iter().rev().copied().collect();
            server.send_to(&reply, flow).unwrap();
            let (got, from) = relay_until_received(&mut relay, &client).expect("to the client");
            assert_eq!(got, reply, "{len} bytes to the client");
            assert_eq!(from, relay.local_addr().unwrap());
        }
        // The largest UDP payload over IPv6 does not fit the loopback MTU:
        // the relay refuses to fragment it (a link would drop it), counts
        // it and goes on relaying.
        client.send(&[7; 65_527]).unwrap();
        client.send(b"after").unwrap();
        let (first, _) = relay_until_received(&mut relay, &server).expect("to the server");
        if first.len() == 65_527 {
            let (after, _) = relay_until_received(&mut relay, &server).expect("after the big one");
            assert_eq!(after, b"after");
        } else {
            assert_eq!(first, b"after");
            assert_eq!(relay.stats_json()["to_server"]["send_errors"], 1);
        }
        let stats = relay.stats_json();
        assert_eq!(stats["flows"], 1, "one client address, one flow");
        assert_eq!(stats["to_server"]["datagrams_in"], 7);
        assert_eq!(stats["to_client"]["delivered"], 5);
    }
}
