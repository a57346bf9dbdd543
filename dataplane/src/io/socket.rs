//! The `socket` backend: recvmmsg / sendmsg with GRO and GSO, through
//! quinn-udp (which also reads ECN and the destination address).

use super::{Backend, RECV_BUF_LEN, RecvDatagram, SendDatagram, Waker, poll_fds};
use quinn_udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Receive batches read per `poll_recv` before the worker gets to send:
/// bounds how long sending can be starved by a flood.
const RECV_BATCHES_PER_POLL: usize = 8;

pub struct SocketBackend {
    socket: UdpSocket,
    state: UdpSocketState,
    bufs: Box<[[u8; RECV_BUF_LEN]; BATCH_SIZE]>,
    meta: [RecvMeta; BATCH_SIZE],
}

impl SocketBackend {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        let bufs: Box<[[u8; RECV_BUF_LEN]; BATCH_SIZE]> = vec![[0u8; RECV_BUF_LEN]; BATCH_SIZE]
            .into_boxed_slice()
            .try_into()
            .expect("exactly BATCH_SIZE buffers");
        Ok(Self {
            socket,
            state,
            bufs,
            meta: [RecvMeta::default(); BATCH_SIZE],
        })
    }

    pub fn raw_fd(&self) -> i32 {
        self.socket.as_raw_fd()
    }
}

impl Backend for SocketBackend {
    fn name(&self) -> &'static str {
        "socket"
    }

    fn poll_recv(&mut self, sink: &mut dyn FnMut(RecvDatagram<'_>)) -> io::Result<usize> {
        let mut delivered = 0;
        for _ in 0..RECV_BATCHES_PER_POLL {
            let mut iovs = self.bufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
            let n = match self
                .state
                .recv((&self.socket).into(), &mut iovs, &mut self.meta)
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for (meta, buf) in self.meta[..n].iter().zip(self.bufs.iter()) {
                sink(RecvDatagram {
                    remote: meta.addr,
                    local_ip: meta.dst_ip,
                    ecn: meta.ecn.map(|e| {
                        quinn_proto::EcnCodepoint::from_bits(e as u8).expect("same codepoints")
                    }),
                    data: &buf[..meta.len],
                    stride: meta.stride,
                });
            }
            delivered += n;
            if n < BATCH_SIZE {
                break;
            }
        }
        Ok(delivered)
    }

    fn send(&mut self, t: &SendDatagram<'_>) -> io::Result<()> {
        let transmit = Transmit {
            destination: t.destination,
            ecn: t
                .ecn
                .map(|e| quinn_udp::EcnCodepoint::from_bits(e as u8).expect("same codepoints")),
            contents: t.contents,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        // quinn-udp reports only WouldBlock; other send errors are logged and
        // treated as loss, which QUIC recovers from.
        self.state.send((&self.socket).into(), &transmit)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn wait(
        &mut self,
        waker: &Waker,
        timeout: Option<Duration>,
        want_write: bool,
    ) -> io::Result<()> {
        poll_fds(self.socket.as_raw_fd(), waker, timeout, want_write)
    }
}
