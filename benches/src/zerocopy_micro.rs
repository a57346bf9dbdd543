//! `zerocopy-micro`: does zero-copy UDP send pay off for a GSO sender?
//!
//! A sender pushes 63,888-byte GSO sends (44 datagrams of 1,452 bytes,
//! one `UDP_SEGMENT` cmsg each) at a receiver that drains with `recvmmsg`
//! and `UDP_GRO`, in four modes taken in turn each round:
//!
//! - `copy`: `sendmsg`, the kernel copies the payload;
//! - `msg-zerocopy`: `SO_ZEROCOPY` and `sendmsg(MSG_ZEROCOPY)`; a buffer
//!   is reused only after its completion came back on the error queue;
//! - `uring-copy`: io_uring `SENDMSG`, 32 sends in flight;
//! - `uring-zc`: io_uring `SENDMSG_ZC`; a buffer is reused only after its
//!   notification CQE.
//!
//! Each run reports bytes, seconds, Gbit/s and the figure that decides:
//! the sender thread's CPU time per GiB (`CLOCK_THREAD_CPUTIME_ID`). The
//! zero-copy modes also report the share of sends the kernel copied after
//! all. The receiver's count is printed beside what was sent; the run
//! measures what was sent.
//!
//! `--role both` (the default) runs both ends in one process, on `[::1]`
//! unless `--listen` says otherwise. `--role recv --listen ADDR` and
//! `--role send --connect ADDR` run the ends in two processes (two
//! network namespaces: `benches/scripts/zerocopy.sh`). The ends agree on
//! run boundaries over a TCP connection to the same address and port: the
//! sender says how much it sent, the receiver answers with what it got
//! once its socket has been quiet for 100 ms.
//!
//! cargo run --release -p internet2-benches --bin zerocopy-micro -- --runs 5 --gib 4

#[path = "sockopt.rs"]
mod sockopt;
mod stats;

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use io_uring::{IoUring, Probe, cqueue, opcode, types};
use serde_json::json;
use stats::median;

/// Payload bytes per datagram: a 1,500-byte MTU less IPv6 and UDP headers.
const SEGMENT_LEN: usize = 1452;
/// Datagrams per GSO send.
const SEGMENTS_PER_SEND: usize = 44;
/// Payload bytes per send.
const SEND_LEN: usize = SEGMENT_LEN * SEGMENTS_PER_SEND;
// One GSO send is one IPv6 packet before segmentation: its payload length
// field (UDP header included) must hold it.
const _: () = assert!(SEND_LEN + 8 <= u16::MAX as usize);
/// Buffers the sender rotates through in every mode; a zero-copy buffer
/// is reused only once the kernel has let go of it.
const BUFFERS: usize = 64;
/// io_uring sends in flight at once.
const URING_IN_FLIGHT: usize = 32;
const _: () = assert!(URING_IN_FLIGHT <= BUFFERS);
// Send ids wrap at 2^32; `id % BUFFERS` stays the send's buffer across the
// wrap only if BUFFERS divides 2^32.
const _: () = assert!(BUFFERS.is_power_of_two() && BUFFERS <= 1 << 31);
/// Room for one `UDP_SEGMENT` cmsg (or one `sock_extended_err` with its
/// offender address) in a control buffer.
const CONTROL_LEN: usize = 128;
/// Messages per `recvmmsg` at the receiver.
const RECV_BATCH: usize = 16;
/// Receive buffer per message: the largest GRO datagram fits.
const RECV_BUFFER_LEN: usize = 65_536;
/// The receiver's socket buffer, bytes.
const RCVBUF_BYTES: libc::c_int = 64 << 20;
/// How long the receiver's socket must be quiet before a run's count is final.
const QUIET: Duration = Duration::from_millis(100);
/// The longest a sender waits for one zero-copy completion before giving up.
const COMPLETION_WAIT_MAX: Duration = Duration::from_secs(5);
/// How long a sender retries its control connection to the receiver.
const CONNECT_WAIT_MAX: Duration = Duration::from_secs(10);
const GIB: f64 = (1u64 << 30) as f64;

// uapi values that neither libc nor io-uring export.
/// linux/errqueue.h
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// linux/errqueue.h
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// linux/io_uring.h: the notification CQE says whether the kernel copied.
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// linux/io_uring.h: set in a notification CQE's result when it copied.
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

#[derive(Parser)]
#[command(
    name = "zerocopy-micro",
    about = "UDP GSO send: copy against MSG_ZEROCOPY and io_uring SENDMSG_ZC"
)]
struct Args {
    /// Which ends this process runs.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    role: Role,
    /// The receiver's address (recv, both; both defaults to [::1]:0).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The receiver to send to (send).
    #[arg(long, value_name = "ADDR")]
    connect: Option<SocketAddr>,
    /// Name of the path in the table and the JSON.
    #[arg(long, default_value = "loopback")]
    label: String,
    /// GiB sent per run.
    #[arg(long, default_value_t = 4.0)]
    gib: f64,
    /// Rounds; each round runs every mode once, in turn.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Modes, comma-separated (the first is the baseline of the ratios).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "copy,msg-zerocopy,uring-copy,uring-zc"
    )]
    modes: Vec<Mode>,
    /// Write every run as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Pin the sender thread to this CPU (send, both); the CPU time of
    /// that CPU's ksoftirqd is then reported too.
    #[arg(long, value_name = "CPU")]
    cpu_send: Option<usize>,
    /// Pin the receiving thread to this CPU (recv, both).
    #[arg(long, value_name = "CPU")]
    cpu_recv: Option<usize>,
    /// The receiver (recv) gives up after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    time_limit_s: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Both,
    Send,
    Recv,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Mode {
    Copy,
    MsgZerocopy,
    UringCopy,
    UringZc,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Copy => "copy",
            Mode::MsgZerocopy => "msg-zerocopy",
            Mode::UringCopy => "uring-copy",
            Mode::UringZc => "uring-zc",
        }
    }
}

/// Why a mode did not run: the kernel refused it (skip the mode), or a
/// run went wrong (stop the benchmark).
enum SendError {
    Unsupported(String),
    Failed(anyhow::Error),
}

impl From<io::Error> for SendError {
    fn from(error: io::Error) -> Self {
        SendError::Failed(error.into())
    }
}

/// What one run's sender did.
#[derive(Default)]
struct SendCount {
    bytes: u64,
    sends: u64,
    /// Sends whose zero-copy completion came back.
    notified: u64,
    /// Of those, sends the kernel copied after all.
    copied: u64,
}

/// One run, as measured by the sender and counted by the receiver.
struct Run {
    round: usize,
    mode: Mode,
    count: SendCount,
    received: u64,
    seconds: f64,
    cpu_s: f64,
    /// CPU time of the ksoftirqd of the sender's CPU (with `--cpu-send`).
    softirq_s: Option<f64>,
}

impl Run {
    fn gbit_s(&self) -> f64 {
        self.count.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    fn cpu_s_per_gib(&self) -> f64 {
        self.cpu_s / (self.count.bytes as f64 / GIB)
    }

    /// Sender thread and its CPU's ksoftirqd together, per GiB.
    fn with_softirq_s_per_gib(&self) -> Option<f64> {
        self.softirq_s
            .map(|softirq_s| (self.cpu_s + softirq_s) / (self.count.bytes as f64 / GIB))
    }

    fn copied_share(&self) -> Option<f64> {
        (self.count.notified > 0).then(|| self.count.copied as f64 / self.count.notified as f64)
    }

    fn received_share(&self) -> f64 {
        self.received as f64 / self.count.bytes as f64
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.gib > 0.0 && args.gib <= 1024.0,
        "--gib must be in (0, 1024]"
    );
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    match args.role {
        Role::Recv => {
            let listen = args.listen.context("--role recv needs --listen ADDR")?;
            receive_until_done(
                listen,
                args.cpu_recv,
                Duration::from_secs(args.time_limit_s),
            )
        }
        Role::Send => {
            let connect = args.connect.context("--role send needs --connect ADDR")?;
            let runs = send_rounds(&args, connect)?;
            report(&args, &runs)
        }
        Role::Both => {
            let listen = args
                .listen
                .unwrap_or(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)));
            let receiver = Receiver::bind(listen)?;
            let target = receiver.addr;
            let cpu_recv = args.cpu_recv;
            let receiving = thread::spawn(move || receiver.serve(cpu_recv));
            // On an error, returning ends the process, receiver included.
            let runs = send_rounds(&args, target)?;
            // The receiver ends when the sender's control connection closes.
            let received = receiving
                .join()
                .expect("the receiver thread does not panic")?;
            eprintln!("receiver: {received} bytes received in all");
            report(&args, &runs)
        }
    }
}

// ---- sender ----

/// Every round, every mode once, against the receiver at `target`.
fn send_rounds(args: &Args, target: SocketAddr) -> Result<Vec<Run>> {
    let mut control = connect_control(target)?;
    let mut replies = BufReader::new(control.try_clone()?);
    let sends = (args.gib * GIB / SEND_LEN as f64).ceil() as u64;
    let slots = Slots::new();
    let softirq = match args.cpu_send {
        Some(cpu) => {
            pin_to_cpu(cpu).with_context(|| format!("pinning the sender to CPU {cpu}"))?;
            Some(Ksoftirqd::find(cpu)?)
        }
        None => None,
    };
    let mut skipped: Vec<Mode> = Vec::new();
    let mut runs = Vec::new();
    for round in 0..args.runs {
        for &mode in &args.modes {
            if skipped.contains(&mode) {
                continue;
            }
            let sent = send_run(mode, target, &slots, sends, softirq.as_ref());
            let bytes = sent.as_ref().map_or(0, |m| m.count.bytes);
            let received = settle_with_receiver(&mut control, &mut replies, bytes)?;
            match sent {
                Ok(measured) => {
                    let run = Run {
                        round,
                        mode,
                        count: measured.count,
                        received,
                        seconds: measured.seconds,
                        cpu_s: measured.cpu_s,
                        softirq_s: measured.softirq_s,
                    };
                    eprintln!("{}", progress_line(&args.label, args.runs, &run));
                    runs.push(run);
                }
                Err(SendError::Unsupported(why)) => {
                    eprintln!("[{}] skipping {}: {why}", args.label, mode.name());
                    skipped.push(mode);
                }
                Err(SendError::Failed(error)) => {
                    return Err(error.context(format!("{} run {}", mode.name(), round + 1)));
                }
            }
        }
    }
    Ok(runs)
}

fn connect_control(target: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_WAIT_MAX;
    loop {
        match TcpStream::connect(target) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Err(error) => {
                return Err(error).with_context(|| format!("control connection to {target}"));
            }
        }
    }
}

/// Tells the receiver the run is over; returns the bytes it received.
fn settle_with_receiver(
    control: &mut TcpStream,
    replies: &mut BufReader<TcpStream>,
    sent: u64,
) -> Result<u64> {
    writeln!(control, "end {sent}").context("writing to the receiver")?;
    let mut line = String::new();
    replies
        .read_line(&mut line)
        .context("reading the receiver's count")?;
    line.trim()
        .parse()
        .with_context(|| format!("the receiver answered {line:?}, expected a byte count"))
}

/// What one run's sender did and what it cost, completions included.
struct Measured {
    count: SendCount,
    seconds: f64,
    /// The sender thread's CPU time.
    cpu_s: f64,
    softirq_s: Option<f64>,
}

/// One run of `mode` on a fresh socket.
fn send_run(
    mode: Mode,
    target: SocketAddr,
    slots: &Slots,
    sends: u64,
    softirq: Option<&Ksoftirqd>,
) -> Result<Measured, SendError> {
    let socket = connected_socket(target)?;
    if mode == Mode::MsgZerocopy {
        sockopt::set_int(&socket, libc::SOL_SOCKET, libc::SO_ZEROCOPY, 1)
            .map_err(|e| SendError::Unsupported(format!("setsockopt(SO_ZEROCOPY): {e}")))?;
    }
    let ring = match mode {
        Mode::UringCopy | Mode::UringZc => Some(uring_for(mode)?),
        Mode::Copy | Mode::MsgZerocopy => None,
    };
    let softirq_started = softirq.map(Ksoftirqd::cpu_s).transpose()?;
    let started = Instant::now();
    let cpu_started = thread_cpu_s();
    let count = match (mode, ring) {
        (Mode::Copy, _) => send_copy(&socket, slots, sends)?,
        (Mode::MsgZerocopy, _) => send_msg_zerocopy(&socket, slots, sends)?,
        (_, Some(mut ring)) => send_uring(&mut ring, &socket, slots, sends, mode)?,
        (_, None) => unreachable!("io_uring modes built their ring above"),
    };
    let cpu_s = thread_cpu_s() - cpu_started;
    let seconds = started.elapsed().as_secs_f64();
    let softirq_s = match (softirq, softirq_started) {
        (Some(thread), Some(before)) => Some(thread.cpu_s()? - before),
        _ => None,
    };
    Ok(Measured {
        count,
        seconds,
        cpu_s,
        softirq_s,
    })
}

/// The softirq thread of one CPU. The receive path of a local send runs in
/// softirq context on the sender's CPU: inline in the sender's syscalls
/// (charged to the sender thread) or, under load, in ksoftirqd (not).
struct Ksoftirqd {
    schedstat: PathBuf,
}

impl Ksoftirqd {
    fn find(cpu: usize) -> Result<Self> {
        let name = format!("ksoftirqd/{cpu}");
        for entry in std::fs::read_dir("/proc")? {
            let dir = entry?.path();
            if std::fs::read_to_string(dir.join("comm")).is_ok_and(|comm| comm.trim_end() == name) {
                return Ok(Ksoftirqd {
                    schedstat: dir.join("schedstat"),
                });
            }
        }
        bail!("no {name} thread in /proc")
    }

    /// Its CPU time so far, seconds: the first field of
    /// /proc/PID/schedstat is its time on CPU, ns.
    fn cpu_s(&self) -> io::Result<f64> {
        let text = std::fs::read_to_string(&self.schedstat)?;
        let ns: u64 = text
            .split_whitespace()
            .next()
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| {
                io::Error::other(format!("{}: unexpected {text:?}", self.schedstat.display()))
            })?;
        Ok(ns as f64 * 1e-9)
    }
}

/// Pins the calling thread to one CPU.
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside
    // it (cpu is below CPU_SETSIZE); sched_setaffinity reads exactly it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn connected_socket(target: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(target)?;
    Ok(socket)
}

/// The sender thread's CPU time so far, seconds.
fn thread_cpu_s() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "Linux always has CLOCK_THREAD_CPUTIME_ID");
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

/// A send buffer with the msghdr that sends it: one iovec over the whole
/// buffer and a `UDP_SEGMENT` cmsg. The msghdr points into the slot, so
/// slots live in a boxed slice and never move.
struct Slot {
    buf: Box<[u8]>,
    iov: libc::iovec,
    control: Control,
    hdr: libc::msghdr,
}

#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

struct Slots(Box<[Slot]>);

impl Slots {
    fn new() -> Self {
        let mut slots: Box<[Slot]> = (0..BUFFERS)
            .map(|i| Slot {
                buf: vec![i as u8; SEND_LEN].into_boxed_slice(),
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                control: Control([0; CONTROL_LEN]),
                // SAFETY: an all-zero msghdr is valid: null pointers, zero lengths.
                hdr: unsafe { std::mem::zeroed() },
            })
            .collect();
        for slot in slots.iter_mut() {
            slot.link();
        }
        Slots(slots)
    }

    fn hdr(&self, send: u64) -> &libc::msghdr {
        &self.0[send as usize % BUFFERS].hdr
    }
}

impl Slot {
    fn link(&mut self) {
        self.iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        self.hdr.msg_iov = &raw mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        assert!(space <= CONTROL_LEN);
        self.hdr.msg_controllen = space;
        // SAFETY: msg_control points at our aligned buffer of at least
        // `space` bytes, so the first cmsg header and its u16 fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&self.hdr);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), SEGMENT_LEN as u16);
        }
    }
}

/// `sendmsg` once; retries on EINTR. A connected UDP send is all or nothing.
fn sendmsg(fd: RawFd, hdr: &libc::msghdr, flags: libc::c_int) -> io::Result<u64> {
    loop {
        // SAFETY: `hdr` and everything it points to (one iovec, the buffer,
        // the control bytes) are live for the call.
        let n = unsafe { libc::sendmsg(fd, hdr, flags) };
        if n >= 0 {
            return Ok(n as u64);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn send_copy(socket: &UdpSocket, slots: &Slots, sends: u64) -> Result<SendCount, SendError> {
    let mut count = SendCount::default();
    for send in 0..sends {
        count.bytes += sendmsg(socket.as_raw_fd(), slots.hdr(send), 0)?;
        count.sends += 1;
    }
    Ok(count)
}

// ---- MSG_ZEROCOPY ----

/// Which buffers the kernel still holds. The kernel numbers a socket's
/// accepted MSG_ZEROCOPY sends from 0 and reports finished ones as id
/// ranges on the error queue; send `i` uses buffer `i % BUFFERS`.
struct ZeroCopyBook {
    busy: [bool; BUFFERS],
    outstanding: usize,
    control: Control,
}

impl ZeroCopyBook {
    fn new() -> Self {
        ZeroCopyBook {
            busy: [false; BUFFERS],
            outstanding: 0,
            control: Control([0; CONTROL_LEN]),
        }
    }

    /// Waits until at least one completion has come back, then reads all
    /// that are queued.
    fn wait(&mut self, socket: &UdpSocket, count: &mut SendCount) -> Result<(), SendError> {
        let deadline = Instant::now() + COMPLETION_WAIT_MAX;
        loop {
            if self.drain(socket, count)? > 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SendError::Failed(anyhow::anyhow!(
                    "no MSG_ZEROCOPY completion for {COMPLETION_WAIT_MAX:?} \
                     ({} sends outstanding)",
                    self.outstanding
                )));
            }
            let mut poll = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: 0, // POLLERR is always reported: the error queue is not empty
                revents: 0,
            };
            // SAFETY: one pollfd that we own.
            unsafe { libc::poll(&mut poll, 1, 100) };
        }
    }

    /// Reads every queued completion without blocking; returns how many
    /// sends they covered.
    fn drain(&mut self, socket: &UdpSocket, count: &mut SendCount) -> Result<u64, SendError> {
        let mut covered = 0;
        while let Some((lo, hi, copied)) = self.read_one(socket)? {
            let len = u64::from(hi.wrapping_sub(lo)) + 1;
            if len > self.outstanding as u64 {
                return Err(SendError::Failed(anyhow::anyhow!(
                    "completion of sends {lo}..={hi} but only {} outstanding",
                    self.outstanding
                )));
            }
            for offset in 0..len as u32 {
                self.busy[lo.wrapping_add(offset) as usize % BUFFERS] = false;
            }
            self.outstanding -= len as usize;
            count.notified += len;
            if copied {
                count.copied += len;
            }
            covered += len;
        }
        Ok(covered)
    }

    /// One error-queue message: `Some((first id, last id, copied))` for a
    /// zero-copy completion, `None` when the queue is empty.
    fn read_one(&mut self, socket: &UdpSocket) -> Result<Option<(u32, u32, bool)>, SendError> {
        // SAFETY: an all-zero msghdr is valid: no name, no data.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_control = self.control.0.as_mut_ptr().cast();
        hdr.msg_controllen = CONTROL_LEN;
        // SAFETY: `hdr` points at our control buffer of CONTROL_LEN bytes.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut hdr, libc::MSG_ERRQUEUE) };
        if n < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(SendError::Failed(
                    anyhow::Error::from(error).context("recvmsg(MSG_ERRQUEUE)"),
                )),
            };
        }
        // SAFETY: the kernel filled `hdr.msg_controllen` bytes of our control
        // buffer with whole cmsgs; CMSG_* walk only inside them, and the
        // payload is read unaligned.
        let extended = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            if cmsg.is_null() {
                None
            } else {
                Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>(),
                ))
            }
        };
        match extended {
            Some(ee) if ee.ee_errno == 0 && ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY => Ok(Some((
                ee.ee_info,
                ee.ee_data,
                ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
            ))),
            Some(ee) => Err(SendError::Failed(anyhow::anyhow!(
                "error queue: errno {} origin {} (not a zero-copy completion)",
                ee.ee_errno,
                ee.ee_origin
            ))),
            None => Err(SendError::Failed(anyhow::anyhow!(
                "error queue message without a cmsg"
            ))),
        }
    }
}

fn send_msg_zerocopy(
    socket: &UdpSocket,
    slots: &Slots,
    sends: u64,
) -> Result<SendCount, SendError> {
    let mut count = SendCount::default();
    let mut book = ZeroCopyBook::new();
    for send in 0..sends {
        let buffer = send as usize % BUFFERS;
        while book.busy[buffer] {
            book.wait(socket, &mut count)?;
        }
        loop {
            match sendmsg(socket.as_raw_fd(), slots.hdr(send), libc::MSG_ZEROCOPY) {
                Ok(n) => {
                    count.bytes += n;
                    break;
                }
                // The completion records count against optmem; wait for some.
                Err(error)
                    if error.raw_os_error() == Some(libc::ENOBUFS) && book.outstanding > 0 =>
                {
                    book.wait(socket, &mut count)?;
                }
                Err(error) => {
                    return Err(SendError::Failed(
                        anyhow::Error::from(error).context("sendmsg(MSG_ZEROCOPY)"),
                    ));
                }
            }
        }
        count.sends += 1;
        book.busy[buffer] = true;
        book.outstanding += 1;
    }
    while book.outstanding > 0 {
        book.wait(socket, &mut count)?;
    }
    Ok(count)
}

// ---- io_uring ----

fn uring_for(mode: Mode) -> Result<IoUring, SendError> {
    let entries = BUFFERS as u32;
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_cqsize(4 * entries)
        .build(entries)
        .or_else(|_| IoUring::new(entries))
        .map_err(|e| SendError::Unsupported(format!("io_uring_setup: {e}")))?;
    if mode == Mode::UringZc {
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| SendError::Unsupported(format!("IORING_REGISTER_PROBE: {e}")))?;
        if !probe.is_supported(opcode::SendMsgZc::CODE) {
            return Err(SendError::Unsupported(
                "this kernel has no IORING_OP_SENDMSG_ZC".into(),
            ));
        }
    }
    Ok(ring)
}

/// Sends through the ring with up to URING_IN_FLIGHT sends in flight. A
/// buffer is free again at its result CQE (`uring-copy`), or at its
/// notification CQE (`uring-zc`, IORING_CQE_F_NOTIF), which follows a
/// result CQE flagged IORING_CQE_F_MORE. On an error nothing more is
/// submitted, but every send in flight is reaped before returning, so the
/// kernel is done with the buffers.
fn send_uring(
    ring: &mut IoUring,
    socket: &UdpSocket,
    slots: &Slots,
    sends: u64,
    mode: Mode,
) -> Result<SendCount, SendError> {
    let zc = mode == Mode::UringZc;
    let fd = types::Fd(socket.as_raw_fd());
    let mut count = SendCount::default();
    let mut free: Vec<usize> = (0..BUFFERS).rev().collect();
    let mut in_flight = 0usize;
    let mut submitted = 0u64;
    let mut failure: Option<SendError> = None;
    loop {
        while failure.is_none() && submitted < sends && in_flight < URING_IN_FLIGHT {
            let Some(buffer) = free.pop() else { break };
            let hdr = &slots.0[buffer].hdr;
            let entry = if zc {
                opcode::SendMsgZc::new(fd, hdr)
                    .ioprio(IORING_SEND_ZC_REPORT_USAGE)
                    .build()
            } else {
                opcode::SendMsg::new(fd, hdr).build()
            };
            // SAFETY: the msghdr, its iovec, buffer and control bytes live in
            // `slots`, which outlives this call; the buffer is off the free
            // list until the kernel says it is done with it, and this
            // function reaps every send before it returns.
            unsafe { ring.submission().push(&entry.user_data(buffer as u64)) }
                .expect("the submission queue holds BUFFERS entries, more than in flight");
            submitted += 1;
            in_flight += 1;
        }
        if free.len() == BUFFERS && (submitted == sends || failure.is_some()) {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(SendError::Failed(
                    anyhow::Error::from(error).context("io_uring_enter"),
                ));
            }
        }
        for cqe in ring.completion() {
            let buffer = cqe.user_data() as usize;
            if cqueue::notif(cqe.flags()) {
                count.notified += 1;
                if cqe.result() as u32 & IORING_NOTIF_USAGE_ZC_COPIED != 0 {
                    count.copied += 1;
                }
                free.push(buffer);
                continue;
            }
            in_flight -= 1;
            if !(zc && cqueue::more(cqe.flags())) {
                free.push(buffer);
            }
            match cqe.result() {
                n if n >= 0 => {
                    count.bytes += n as u64;
                    count.sends += 1;
                }
                n if failure.is_none() => {
                    failure = Some(uring_send_error(mode, count.sends, -n));
                }
                _ => {}
            }
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(count),
    }
}

/// A refusal before any send went through means the kernel does not offer
/// the mode; any other failure is an error of the run.
fn uring_send_error(mode: Mode, sends_done: u64, errno: i32) -> SendError {
    let error = io::Error::from_raw_os_error(errno);
    let refused = matches!(errno, libc::EINVAL | libc::EOPNOTSUPP);
    if refused && sends_done == 0 {
        SendError::Unsupported(format!("the first {} send failed: {error}", mode.name()))
    } else {
        SendError::Failed(anyhow::Error::from(error).context(format!("{} send", mode.name())))
    }
}

// ---- receiver ----

/// The receiving end: a UDP socket with GRO and a TCP listener on the same
/// address and port for the sender's control connection.
struct Receiver {
    udp: UdpSocket,
    control: TcpListener,
    addr: SocketAddr,
}

impl Receiver {
    fn bind(listen: SocketAddr) -> Result<Self> {
        let udp = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
        let addr = udp.local_addr()?;
        let control = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
        sockopt::set_int(&udp, libc::SOL_UDP, libc::UDP_GRO, 1).context("setsockopt(UDP_GRO)")?;
        // SO_RCVBUFFORCE passes net.core.rmem_max (root only); SO_RCVBUF is
        // the fallback, capped by it.
        sockopt::set_int(&udp, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF_BYTES)
            .or_else(|_| sockopt::set_int(&udp, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF_BYTES))
            .context("setsockopt(SO_RCVBUF)")?;
        udp.set_read_timeout(Some(QUIET / 2))?;
        eprintln!("receiver listening on {addr}");
        Ok(Receiver { udp, control, addr })
    }

    /// Counts datagrams until the sender's control connection closes;
    /// returns the bytes received over all runs.
    fn serve(self, cpu: Option<usize>) -> Result<u64> {
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let draining = {
            let (received, stop) = (received.clone(), stop.clone());
            let udp = self.udp;
            thread::spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu)?;
                }
                drain_udp(&udp, &received, &stop)
            })
        };
        let total = serve_control(&self.control, &received);
        stop.store(true, Ordering::Relaxed);
        let drained = draining.join().expect("the drain thread does not panic");
        let total = total?;
        drained.context("receiving")?;
        Ok(total)
    }
}

/// `--role recv`: serves one sender, printing what it received, or gives
/// up after `time_limit`.
fn receive_until_done(listen: SocketAddr, cpu: Option<usize>, time_limit: Duration) -> Result<()> {
    let receiver = Receiver::bind(listen)?;
    let serving = thread::spawn(move || receiver.serve(cpu));
    let deadline = Instant::now() + time_limit;
    while !serving.is_finished() {
        if Instant::now() >= deadline {
            bail!("receiver: time limit of {time_limit:?} passed before the sender finished");
        }
        thread::sleep(Duration::from_millis(100));
    }
    let total = serving
        .join()
        .expect("the receiver thread does not panic")?;
    eprintln!("receiver: {total} bytes received in all");
    Ok(())
}

/// Answers each `end SENT` line with the bytes received since the last
/// one, once the socket has been quiet for QUIET.
fn serve_control(listener: &TcpListener, received: &AtomicU64) -> Result<u64> {
    let (stream, peer) = listener
        .accept()
        .context("accepting the control connection")?;
    let mut answers = stream.try_clone()?;
    let mut total = 0;
    for line in BufReader::new(stream).lines() {
        let line = line.with_context(|| format!("control connection from {peer}"))?;
        if line
            .strip_prefix("end ")
            .and_then(|s| s.parse::<u64>().ok())
            .is_none()
        {
            bail!("control connection from {peer}: expected `end BYTES`, got {line:?}");
        }
        let mut last = received.load(Ordering::Relaxed);
        loop {
            thread::sleep(QUIET);
            let now = received.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        let run = received.swap(0, Ordering::Relaxed);
        total += run;
        writeln!(answers, "{run}")?;
    }
    Ok(total)
}

/// Receives with recvmmsg until `stop`, adding the bytes to `received`.
fn drain_udp(socket: &UdpSocket, received: &AtomicU64, stop: &AtomicBool) -> io::Result<()> {
    let mut bufs = vec![0u8; RECV_BATCH * RECV_BUFFER_LEN];
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_exact_mut(RECV_BUFFER_LEN)
        .map(|buf| libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is valid: null pointers, zero lengths.
            let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            msg
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: each mmsghdr points at one live iovec over its own
        // RECV_BUFFER_LEN bytes of `bufs`; none has a name or control.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                RECV_BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                _ => return Err(error),
            }
        }
        let bytes: u64 = msgs[..n as usize]
            .iter()
            .map(|m| u64::from(m.msg_len))
            .sum();
        received.fetch_add(bytes, Ordering::Relaxed);
    }
    Ok(())
}

// ---- report ----

fn progress_line(label: &str, rounds: usize, run: &Run) -> String {
    let softirq = run
        .softirq_s
        .map_or(String::new(), |s| format!(" + ksoftirqd {s:.3} s"));
    let copied = run.copied_share().map_or(String::new(), |share| {
        format!(", kernel copied {:.1}% of zero-copy sends", share * 100.0)
    });
    format!(
        "[{label}] round {}/{rounds} {}: {:.2} GiB sent in {:.2} s = {:.2} Gbit/s, \
         sender CPU {:.3} s{softirq} ({:.3} s/GiB), received {:.2} GiB ({:.1}%){copied}",
        run.round + 1,
        run.mode.name(),
        run.count.bytes as f64 / GIB,
        run.seconds,
        run.gbit_s(),
        run.cpu_s,
        run.cpu_s_per_gib(),
        run.received as f64 / GIB,
        run.received_share() * 100.0,
    )
}

/// Medians of one mode's runs.
struct Summary {
    gbit_s: f64,
    cpu_s_per_gib: f64,
    with_softirq_s_per_gib: Option<f64>,
    received_share: f64,
    copied_share: Option<f64>,
}

fn summarize(runs: &[Run], mode: Mode) -> Option<Summary> {
    let of = |f: &dyn Fn(&Run) -> Option<f64>| {
        let mut xs: Vec<f64> = runs
            .iter()
            .filter(|r| r.mode == mode)
            .filter_map(f)
            .collect();
        median(&mut xs)
    };
    Some(Summary {
        gbit_s: of(&|r| Some(r.gbit_s()))?,
        cpu_s_per_gib: of(&|r| Some(r.cpu_s_per_gib()))?,
        with_softirq_s_per_gib: of(&Run::with_softirq_s_per_gib),
        received_share: of(&|r| Some(r.received_share()))?,
        copied_share: of(&Run::copied_share),
    })
}

fn report(args: &Args, runs: &[Run]) -> Result<()> {
    let baseline = args.modes.first().and_then(|&mode| summarize(runs, mode));
    println!(
        "path {}: {} rounds of {} GiB per run, sends of {SEGMENTS_PER_SEND} x {SEGMENT_LEN} B \
         = {SEND_LEN} B; medians over rounds, ratios against {}",
        args.label,
        args.runs,
        args.gib,
        args.modes.first().map_or("-", |m| m.name())
    );
    if let Some(cpu) = args.cpu_send {
        println!(
            "sender pinned to CPU {cpu}; `+softirq` adds the CPU time of ksoftirqd/{cpu}, \
             where the receive path runs when the sender's syscalls leave it"
        );
    }
    println!(
        "{:<13} {:>8} {:>7} {:>10} {:>7} {:>11} {:>7} {:>10} {:>9}",
        "mode",
        "Gbit/s",
        "x base",
        "CPU s/GiB",
        "x base",
        "+softirq",
        "x base",
        "zc copied",
        "received"
    );
    for &mode in &args.modes {
        let Some(s) = summarize(runs, mode) else {
            println!("{:<13} skipped", mode.name());
            continue;
        };
        let base = baseline.as_ref();
        let ratio = |x: Option<f64>, base: Option<f64>| match (x, base) {
            (Some(x), Some(b)) => format!("{:.2}", x / b),
            _ => "-".into(),
        };
        println!(
            "{:<13} {:>8.2} {:>7} {:>10.3} {:>7} {:>11} {:>7} {:>10} {:>8.1}%",
            mode.name(),
            s.gbit_s,
            ratio(Some(s.gbit_s), base.map(|b| b.gbit_s)),
            s.cpu_s_per_gib,
            ratio(Some(s.cpu_s_per_gib), base.map(|b| b.cpu_s_per_gib)),
            s.with_softirq_s_per_gib
                .map_or("-".into(), |x| format!("{x:.3}")),
            ratio(
                s.with_softirq_s_per_gib,
                base.and_then(|b| b.with_softirq_s_per_gib)
            ),
            s.copied_share
                .map_or("-".into(), |c| format!("{:.1}%", c * 100.0)),
            s.received_share * 100.0,
        );
    }
    if let Some(path) = &args.json {
        let out = json!({
            "label": args.label,
            "gib_per_run": args.gib,
            "send_len": SEND_LEN,
            "segment_len": SEGMENT_LEN,
            "cpu_send": args.cpu_send,
            "cpu_recv": args.cpu_recv,
            "runs": runs.iter().map(|r| json!({
                "round": r.round,
                "mode": r.mode.name(),
                "bytes_sent": r.count.bytes,
                "bytes_received": r.received,
                "sends": r.count.sends,
                "seconds": r.seconds,
                "gbit_s": r.gbit_s(),
                "sender_cpu_s": r.cpu_s,
                "sender_cpu_s_per_gib": r.cpu_s_per_gib(),
                "ksoftirqd_cpu_s": r.softirq_s,
                "zc_notified_sends": r.count.notified,
                "zc_copied_sends": r.count.copied,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
