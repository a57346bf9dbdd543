//! The harness's input language: what a hostile client does, one [`Op`] at
//! a time, decoded from bytes. The fuzz target, the seed corpus and the
//! property test all go through [`Sequence::decode`], so an input found by
//! one replays identically in the others.
//!
//! Layout: one settings byte (bit 0: admission required), then ops. Each
//! op is a tag byte (taken modulo the number of ops) and its arguments, a
//! fixed number of bytes per op; missing bytes read as zero. Arguments are
//! reduced into range on decode, so every byte string is a valid input and
//! [`Sequence::encode`] of a decoded sequence decodes to the same sequence.

use crate::protocols::Alpn;

/// Ops decoded from one input at most: the step bound of a run.
pub const OPS_MAX: usize = 96;
/// Largest single write of filler bytes.
pub const WRITE_LEN_MAX: u16 = 6000;
/// Longest single time jump.
pub const ADVANCE_MS_MAX: u16 = 60_000;

/// What the harness's server is configured with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `stoq/1` connections must be admitted (through the harness's gate).
    pub admission: bool,
}

/// One thing the hostile client or the network does. Connection and stream
/// operands are indices into the client's open connections and that
/// connection's opened streams, newest first (0 is the latest), taken
/// modulo their count; an op on nothing does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Start a connection; unless `zero_rtt`, drive its handshake to the
    /// end on a clean link first. With `zero_rtt`, the handshake is left
    /// to later ops, so streams opened meanwhile go out as 0-RTT data when
    /// the session resumes.
    Connect {
        alpn: Alpn,
        with_cert: bool,
        zero_rtt: bool,
    },
    OpenStream {
        conn: u8,
    },
    /// `len` copies of `byte`.
    Write {
        conn: u8,
        stream: u8,
        len: u16,
        byte: u8,
    },
    /// A well-formed (or deliberately malformed) message of the connection's
    /// protocol, picked by `variant`; see `Harness::request_bytes`. The
    /// high bit of `variant` also finishes the stream.
    Request {
        conn: u8,
        stream: u8,
        variant: u8,
    },
    Finish {
        conn: u8,
        stream: u8,
    },
    /// RESET_STREAM.
    Reset {
        conn: u8,
        stream: u8,
        code: u8,
    },
    StopSending {
        conn: u8,
        stream: u8,
        code: u8,
    },
    CloseConnection {
        conn: u8,
        code: u8,
    },
    /// Stop (or resume) reading a connection's responses, so the server's
    /// writes back up against flow control.
    ToggleReading {
        conn: u8,
    },
    AdvanceTime {
        ms: u16,
    },
    /// Lose the oldest datagram in flight towards the server (or client).
    DropNext {
        to_server: bool,
    },
    /// Send the oldest datagram in flight twice.
    Duplicate {
        to_server: bool,
    },
    /// Move the oldest datagram in flight `depth` places back (0: last).
    Reorder {
        to_server: bool,
        depth: u8,
    },
    /// Deliver up to `n` datagrams each way (0: until the link is empty).
    Deliver {
        n: u8,
    },
    /// The fake control plane answers every forwarded request waiting.
    Authority,
    /// The client starts a 1-RTT key update (ignored by quinn-proto
    /// before the handshake is confirmed or while the last one is recent).
    KeyUpdate {
        conn: u8,
    },
}

const TAGS: u8 = 16;

/// A decoded input: the server's settings and the ops to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    pub settings: Settings,
    pub ops: Vec<Op>,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
}

fn alpn_of(byte: u8) -> Alpn {
    match byte % 3 {
        0 => Alpn::Stoq,
        1 => Alpn::Doq,
        _ => Alpn::Perf,
    }
}

fn alpn_byte(alpn: Alpn) -> u8 {
    match alpn {
        Alpn::Stoq => 0,
        Alpn::Doq => 1,
        Alpn::Perf => 2,
    }
}

impl Sequence {
    /// Decode any bytes (at most [`OPS_MAX`] ops; the rest is ignored).
    pub fn decode(data: &[u8]) -> Sequence {
        let mut r = Reader(data);
        let settings = Settings {
            admission: r.bool(),
        };
        let mut ops = Vec::new();
        while !r.0.is_empty() && ops.len() < OPS_MAX {
            ops.push(Op::decode(&mut r));
        }
        Sequence { settings, ops }
    }

    /// The bytes [`Sequence::decode`] turns back into this sequence (for
    /// ops whose arguments are in range).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.settings.admission)];
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

impl Op {
    fn decode(r: &mut Reader<'_>) -> Op {
        match r.u8() % TAGS {
            0 => Op::Connect {
                alpn: alpn_of(r.u8()),
                with_cert: r.bool(),
                zero_rtt: r.bool(),
            },
            1 => Op::OpenStream { conn: r.u8() },
            2 => Op::Write {
                conn: r.u8(),
                stream: r.u8(),
                len: r.u16() % (WRITE_LEN_MAX + 1),
                byte: r.u8(),
            },
            3 => Op::Request {
                conn: r.u8(),
                stream: r.u8(),
                variant: r.u8(),
            },
            4 => Op::Finish {
                conn: r.u8(),
                stream: r.u8(),
            },
            5 => Op::Reset {
                conn: r.u8(),
                stream: r.u8(),
                code: r.u8(),
            },
            6 => Op::StopSending {
                conn: r.u8(),
                stream: r.u8(),
                code: r.u8(),
            },
            7 => Op::CloseConnection {
                conn: r.u8(),
                code: r.u8(),
            },
            8 => Op::ToggleReading { conn: r.u8() },
            9 => Op::AdvanceTime {
                ms: r.u16() % (ADVANCE_MS_MAX + 1),
            },
            10 => Op::DropNext {
                to_server: r.bool(),
            },
            11 => Op::Duplicate {
                to_server: r.bool(),
            },
            12 => Op::Reorder {
                to_server: r.bool(),
                depth: r.u8(),
            },
            13 => Op::Deliver { n: r.u8() },
            14 => Op::Authority,
            _ => Op::KeyUpdate { conn: r.u8() },
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Op::Connect {
                alpn,
                with_cert,
                zero_rtt,
            } => out.extend([0, alpn_byte(alpn), with_cert.into(), zero_rtt.into()]),
            Op::OpenStream { conn } => out.extend([1, conn]),
            Op::Write {
                conn,
                stream,
                len,
                byte,
            } => {
                out.extend([2, conn, stream]);
                out.extend(len.to_be_bytes());
                out.push(byte);
            }
            Op::Request {
                conn,
                stream,
                variant,
            } => out.extend([3, conn, stream, variant]),
            Op::Finish { conn, stream } => out.extend([4, conn, stream]),
            Op::Reset { conn, stream, code } => out.extend([5, conn, stream, code]),
            Op::StopSending { conn, stream, code } => out.extend([6, conn, stream, code]),
            Op::CloseConnection { conn, code } => out.extend([7, conn, code]),
            Op::ToggleReading { conn } => out.extend([8, conn]),
            Op::AdvanceTime { ms } => {
                out.push(9);
                out.extend(ms.to_be_bytes());
            }
            Op::DropNext { to_server } => out.extend([10, to_server.into()]),
            Op::Duplicate { to_server } => out.extend([11, to_server.into()]),
            Op::Reorder { to_server, depth } => out.extend([12, to_server.into(), depth]),
            Op::Deliver { n } => out.extend([13, n]),
            Op::Authority => out.push(14),
            Op::KeyUpdate { conn } => out.extend([15, conn]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_round_trips_through_bytes() {
        let ops = vec![
            Op::Connect {
                alpn: Alpn::Perf,
                with_cert: true,
                zero_rtt: false,
            },
            Op::OpenStream { conn: 3 },
            Op::Write {
                conn: 1,
                stream: 2,
                len: WRITE_LEN_MAX,
                byte: 0xab,
            },
            Op::Request {
                conn: 0,
                stream: 0,
                variant: 0x85,
            },
            Op::Finish { conn: 4, stream: 5 },
            Op::Reset {
                conn: 6,
                stream: 7,
                code: 8,
            },
            Op::StopSending {
                conn: 9,
                stream: 10,
                code: 11,
            },
            Op::CloseConnection { conn: 12, code: 13 },
            Op::ToggleReading { conn: 14 },
            Op::AdvanceTime { ms: ADVANCE_MS_MAX },
            Op::DropNext { to_server: true },
            Op::Duplicate { to_server: false },
            Op::Reorder {
                to_server: true,
                depth: 3,
            },
            Op::Deliver { n: 0 },
            Op::Authority,
            Op::KeyUpdate { conn: 15 },
        ];
        let sequence = Sequence {
            settings: Settings { admission: true },
            ops,
        };
        assert_eq!(Sequence::decode(&sequence.encode()), sequence);
    }

    #[test]
    fn any_bytes_decode_and_reencode_to_the_same_sequence() {
        let mut rng = crate::test_support::XorShift(0x5eed);
        for _ in 0..500 {
            let len = (rng.next() % 200) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let sequence = Sequence::decode(&data);
            assert!(sequence.ops.len() <= OPS_MAX);
            assert_eq!(Sequence::decode(&sequence.encode()), sequence);
        }
    }
}
