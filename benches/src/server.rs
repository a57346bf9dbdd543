//! perf server: answers each bidirectional stream with the number of bytes the
//! client asked for.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{tls, udp};

/// Response payload source; content is irrelevant to the protocol. Handed
/// to quinn as a static `Bytes`, so responses are sent without a copy.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

#[derive(Args)]
pub struct ServerArgs {
    /// Address to listen on, e.g. [::1]:4433 (IPv6 only).
    #[arg(long, value_parser = crate::parse_ipv6)]
    listen: SocketAddr,
    /// Directory to write the generated cert.pem into.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Concurrent bidirectional streams a client may open per connection.
    /// quinn allocates state for all of them up front (~85 B each per
    /// connection), so lower it for runs with many connections.
    #[arg(long, default_value_t = 1024)]
    max_streams: u32,
    /// UDP socket buffer size in bytes, each direction.
    #[arg(long, default_value_t = udp::DEFAULT_SOCKET_BUFFER)]
    socket_buffer: usize,
    /// Issue session tickets so clients can resume (default: none, every
    /// handshake is full).
    #[arg(long)]
    tickets: bool,
    /// Seconds without a packet before a connection is dropped. Clients
    /// keep theirs alive; this only reaps vanished ones.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
}

pub async fn run(args: ServerArgs, max_udp_payload: u16) -> Result<()> {
    let identity = tls::self_signed(args.listen.ip())?;
    if let Some(dir) = &args.cert_dir {
        write_cert(dir, &identity.pem)?;
    }
    let mut config =
        quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(identity, args.tickets)?));
    let transport = crate::transport_config(
        Duration::from_secs(args.idle_timeout.max(1)),
        None,
        args.max_streams,
        max_udp_payload,
    )?;
    config.transport_config(Arc::new(transport));
    let endpoint = udp::endpoint(
        args.listen,
        args.socket_buffer,
        max_udp_payload,
        Some(config),
    )?;

    // Handlers are installed before announcing readiness, so a signal sent
    // right after "listening on" still leads to a clean exit.
    let (mut sigint, mut sigterm) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    println!("listening on {}", endpoint.local_addr()?);
    std::io::stdout().flush()?;

    tokio::select! {
        () = accept_loop(&endpoint) => {}
        () = shutdown(&mut sigint, &mut sigterm) => {}
    }
    endpoint.close(VarInt::from_u32(0), b"shutdown");
    Ok(())
}

fn write_cert(dir: &PathBuf, pem: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("cert.pem");
    std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))
}

async fn shutdown(sigint: &mut Signal, sigterm: &mut Signal) {
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
}

/// One task per connection so slow handshakes never hold up the accept loop.
async fn accept_loop(endpoint: &Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming));
    }
}

async fn serve_connection(incoming: Incoming) {
    // A failed handshake or a closed connection is the client's business.
    if let Ok(conn) = incoming.await {
        accept_streams(conn).await;
    }
}

async fn accept_streams(conn: Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            // Clients stop streams at their deadline: such errors are expected.
            let _ = serve_stream(send, recv).await;
        });
    }
}

async fn serve_stream(send: SendStream, mut recv: RecvStream) -> Result<()> {
    let mut header = [0u8; 8];
    recv.read_exact(&mut header).await?;
    let len = u64::from_be_bytes(header);
    // The draft lets the client keep uploading after the header, so drain and
    // respond concurrently instead of waiting for its FIN first.
    let (drained, sent) = tokio::join!(drain(recv), respond(send, len));
    drained.and(sent)
}

async fn drain(mut recv: RecvStream) -> Result<()> {
    while recv.read_chunk(usize::MAX, false).await?.is_some() {}
    Ok(())
}

async fn respond(mut send: SendStream, mut remaining: u64) -> Result<()> {
    let zeros = Bytes::from_static(&ZEROS);
    while remaining > 0 {
        let n = remaining.min(ZEROS.len() as u64) as usize;
        send.write_chunk(zeros.slice(..n)).await?;
        remaining -= n as u64;
    }
    send.finish()?;
    Ok(())
}
