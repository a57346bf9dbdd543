//! The `internet2 asset` commands: memory and storage assets on the server,
//! by address
//! (`dataplane::assets::wire`, docs/PROTOCOL.md "Assets"). A command's
//! requests go over one `stoq/1` connection; a file larger than one request
//! is written and read in chunks on parallel streams of it.

use crate::cli_authority::Connect;
use anyhow::{Context, bail};
use dataplane::assets::address::AssetAddress;
use dataplane::assets::memory::{Access, Owner};
use dataplane::assets::wire::{
    AllocKind, AssetRequest, PROXIED_READ_LEN_MAX, STORAGE_WRITE_LEN_MAX, WRITE_LEN_MAX,
};
use dataplane::client::rpc::{Framing, Reply, Request};
use dataplane::client::{ClientTarget, rpc_framed};
use dataplane::protocols::ALPN_STOQ;
use dataplane::protocols::stoq::{ErrorCode, encode};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Requests sent on one connection at a time (what the server lets one
/// connection have waiting at its control plane).
const REQUESTS_PER_CONNECTION: usize = dataplane::protocols::stoq::FORWARDED_PER_CONNECTION_MAX;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AllocKindArg {
    /// Bytes held in the server's memory (not durable).
    Memory,
    /// Bytes in the server's store: durable, kept until freed.
    Storage,
}

impl AllocKindArg {
    fn kind(self) -> AllocKind {
        match self {
            AllocKindArg::Memory => AllocKind::Memory,
            AllocKindArg::Storage => AllocKind::Storage,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum AssetCommand<T: Connect> {
    /// Allocate an asset of SIZE bytes (suffixes K, M, G: KiB, MiB, GiB);
    /// prints its address.
    Alloc {
        #[command(flatten)]
        target: T,
        #[arg(value_enum)]
        kind: AllocKindArg,
        size: String,
        /// Publish the address as NAME.assets.APEX in the server's zone
        /// (AAAA; storage only: one DNS label, a-z 0-9 -). Freeing the
        /// asset removes the name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a file's bytes into an asset from --offset.
    Write {
        #[command(flatten)]
        target: T,
        address: AssetAddress,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Read --len bytes from --offset, into --out or to standard output.
    Read {
        #[command(flatten)]
        target: T,
        address: AssetAddress,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long)]
        len: u64,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print the bytes' count and hex (or, with --out, the file) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Free an asset you own.
    Free {
        #[command(flatten)]
        target: T,
        address: AssetAddress,
        #[arg(long)]
        json: bool,
    },
    /// Your assets on the server.
    List {
        #[command(flatten)]
        target: T,
        #[arg(long)]
        json: bool,
    },
    /// Let IDENTITY (64 hex digits: SHA-256 of its certificate's key) read,
    /// or read and write, an asset you own.
    Grant {
        #[command(flatten)]
        target: T,
        address: AssetAddress,
        /// The identity granted (64 hex digits).
        #[arg(value_name = "IDENTITY")]
        grantee: String,
        #[arg(long, conflicts_with = "write", required_unless_present = "write")]
        read: bool,
        #[arg(long)]
        write: bool,
        #[arg(long)]
        json: bool,
    },
    /// Withdraw IDENTITY's grant on an asset you own.
    RevokeGrant {
        #[command(flatten)]
        target: T,
        address: AssetAddress,
        /// The identity whose grant is withdrawn (64 hex digits).
        #[arg(value_name = "IDENTITY")]
        grantee: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn asset<T: Connect>(command: &AssetCommand<T>) -> anyhow::Result<()> {
    match command {
        AssetCommand::Alloc {
            target,
            kind,
            size,
            name,
            json,
        } => {
            let size = parse_size(size)?;
            if let Some(name) = name {
                if kind.kind() != AllocKind::Storage {
                    bail!("{}", dataplane::assets::wire::WireError::NameForMemory);
                }
                dataplane::assets::wire::label(name.as_bytes())?;
            }
            let request = AssetRequest::Alloc {
                kind: kind.kind(),
                size,
                name: name.as_deref(),
            };
            let address = alloc_with(&target.target()?, &request, target.timeout())?;
            print(
                *json,
                &serde_json::json!({"address": address.to_string(), "kind": kind.kind().name(), "size": size, "name": name}),
                || address.to_string(),
            )
        }
        AssetCommand::Write {
            target,
            address,
            offset,
            input,
            json,
        } => {
            let data =
                std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
            let end = offset
                .checked_add(data.len() as u64)
                .context("--offset plus the file's length overflows")?;
            many(target, writes(*address, *offset, &data))?;
            print(
                *json,
                &serde_json::json!({"address": address.to_string(), "offset": offset, "bytes": data.len()}),
                || format!("wrote {} bytes to {address} at {offset}..{end}", data.len()),
            )
        }
        AssetCommand::Read {
            target,
            address,
            offset,
            len,
            out,
            json,
        } => {
            let end = offset
                .checked_add(*len)
                .context("--offset plus --len overflows")?;
            // What one read returns of storage; of memory, what one read
            // through another member of a cluster returns.
            let per_request = match address.id.is_storage() {
                true => controlplane::assets::STORAGE_READ_LEN_MAX,
                false => u64::from(PROXIED_READ_LEN_MAX),
            };
            let requests: Vec<Request> = (*offset..end)
                .step_by(per_request as usize)
                .map(|at| {
                    request(&AssetRequest::Read {
                        address: *address,
                        offset: at,
                        len: (end - at).min(per_request) as u32,
                    })
                })
                .collect();
            let data: Vec<u8> = many(target, requests)?.concat();
            if let Some(out) = out {
                std::fs::write(out, &data)
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            if *json {
                let mut doc = serde_json::json!({"address": address.to_string(), "offset": offset, "bytes": data.len()});
                match out {
                    Some(out) => doc["out"] = out.display().to_string().into(),
                    None => doc["hex"] = controlplane::authority::api::hex(&data).into(),
                }
                println!("{doc}");
            } else if out.is_none() {
                std::io::stdout().write_all(&data)?;
            }
            Ok(())
        }
        AssetCommand::Free {
            target,
            address,
            json,
        } => {
            let body = one(target, &AssetRequest::Free { address: *address })?;
            let freed = byte_count(&body)?;
            print(
                *json,
                &serde_json::json!({"address": address.to_string(), "freed_bytes": freed}),
                || format!("freed {address} ({freed} bytes)"),
            )
        }
        AssetCommand::List { target, json } => {
            let mut list: Vec<serde_json::Value> = Vec::new();
            for kind in [AllocKind::Memory, AllocKind::Storage] {
                let body = match one(target, &AssetRequest::List { kind }) {
                    Ok(body) => body,
                    // A cluster member serves memory assets only, so far.
                    Err(e) if kind == AllocKind::Storage && is_code(&e, ErrorCode::AssetsOff) => {
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let part: Vec<serde_json::Value> =
                    serde_json::from_slice(&body).context("the server's list is not JSON")?;
                list.extend(part);
            }
            if *json {
                println!("{}", serde_json::Value::Array(list));
                return Ok(());
            }
            println!(
                "{:<40} {:<8} {:>12} {:>7}",
                "address", "kind", "size", "grants"
            );
            for a in &list {
                println!(
                    "{:<40} {:<8} {:>12} {:>7}",
                    a["address"].as_str().unwrap_or("?"),
                    a["kind"].as_str().unwrap_or("?"),
                    a["size"].as_u64().unwrap_or(0),
                    a["grants"].as_u64().unwrap_or(0)
                );
            }
            Ok(())
        }
        AssetCommand::Grant {
            target,
            address,
            grantee: identity,
            write,
            json,
            ..
        } => {
            let access = if *write { Access::Write } else { Access::Read };
            let grantee = owner(identity)?;
            one(
                target,
                &AssetRequest::Grant {
                    address: *address,
                    grantee,
                    access: Some(access),
                },
            )?;
            let access = if *write { "write" } else { "read" };
            print(
                *json,
                &serde_json::json!({"address": address.to_string(), "identity": identity, "access": access}),
                || format!("{identity} may {access} {address}"),
            )
        }
        AssetCommand::RevokeGrant {
            target,
            address,
            grantee: identity,
            json,
        } => {
            let body = one(
                target,
                &AssetRequest::Grant {
                    address: *address,
                    grantee: owner(identity)?,
                    access: None,
                },
            )?;
            let had = body.first() == Some(&1);
            print(
                *json,
                &serde_json::json!({"address": address.to_string(), "identity": identity, "withdrawn": had}),
                || {
                    if had {
                        format!("{identity} may no longer use {address}")
                    } else {
                        format!("{identity} had no grant on {address}")
                    }
                },
            )
        }
    }
}

pub(crate) fn print(
    json: bool,
    doc: &serde_json::Value,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{doc}");
    } else {
        println!("{}", text());
    }
    Ok(())
}

pub(crate) fn request(r: &AssetRequest<'_>) -> Request {
    let (kind, payload) = r.encode();
    Request {
        message: encode(kind, &payload),
        idempotent: false,
    }
}

/// The writes that put `data` at `offset` of `address`, each as long as
/// the asset's kind allows.
pub(crate) fn writes(address: AssetAddress, offset: u64, data: &[u8]) -> Vec<Request> {
    let per_request = match address.id.is_storage() {
        true => STORAGE_WRITE_LEN_MAX,
        false => WRITE_LEN_MAX,
    };
    data.chunks(per_request)
        .enumerate()
        .map(|(i, chunk)| {
            request(&AssetRequest::Write {
                address,
                offset: offset + (i * per_request) as u64,
                data: chunk,
            })
        })
        .collect()
}

fn one<T: Connect>(target: &T, r: &AssetRequest<'_>) -> anyhow::Result<Vec<u8>> {
    Ok(many(target, vec![request(r)])?.remove(0))
}

/// Allocate an asset of `kind` and `size` bytes: its address.
pub fn alloc(
    client: &ClientTarget,
    kind: AllocKind,
    size: u64,
    timeout: Duration,
) -> anyhow::Result<AssetAddress> {
    let alloc = AssetRequest::Alloc {
        kind,
        size,
        name: None,
    };
    alloc_with(client, &alloc, timeout)
}

/// Send an `ASSET_ALLOC`: the address it answers.
fn alloc_with(
    client: &ClientTarget,
    alloc: &AssetRequest<'_>,
    timeout: Duration,
) -> anyhow::Result<AssetAddress> {
    let body = send(client, vec![request(alloc)], timeout)?.remove(0);
    let octets: [u8; 16] = body
        .as_slice()
        .try_into()
        .context("the server's answer is not an address")?;
    Ok(AssetAddress::from_octets(octets))
}

/// Free an asset the caller owns: the bytes freed.
pub fn free(
    client: &ClientTarget,
    address: AssetAddress,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let body = send(
        client,
        vec![request(&AssetRequest::Free { address })],
        timeout,
    )?
    .remove(0);
    byte_count(&body)
}

/// A `freed: u64` answer.
fn byte_count(body: &[u8]) -> anyhow::Result<u64> {
    Ok(u64::from_be_bytes(
        body.try_into()
            .context("the server's answer is not a byte count")?,
    ))
}

/// The caller's storage assets: the first 10,000 by address.
pub fn storage_assets(
    client: &ClientTarget,
    timeout: Duration,
) -> anyhow::Result<Vec<AssetAddress>> {
    let list = AssetRequest::List {
        kind: AllocKind::Storage,
    };
    let body = send(client, vec![request(&list)], timeout)?.remove(0);
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&body).context("the server's list is not JSON")?;
    Ok(listed
        .iter()
        .filter_map(|a| a["address"].as_str()?.parse::<AssetAddress>().ok())
        .collect())
}

/// Free every storage asset the caller owns, a list at a time: how many.
/// (`asset-bench` runs it only for an identity that held none before.)
pub fn free_storage(client: &ClientTarget, timeout: Duration) -> anyhow::Result<u64> {
    let mut freed = 0;
    loop {
        let frees: Vec<Request> = storage_assets(client, timeout)?
            .into_iter()
            .map(|address| request(&AssetRequest::Free { address }))
            .collect();
        if frees.is_empty() {
            return Ok(freed);
        }
        freed += send(client, frees, timeout)?.len() as u64;
    }
}

/// Send `requests` to the target; where it answers that the asset is held
/// by another node (`ASSET_ELSEWHERE`) and the target is a cluster's members
/// (several `--connect` addresses, or a cluster's name), to each other
/// member in turn until one holds it.
pub(crate) fn many<T: Connect>(target: &T, requests: Vec<Request>) -> anyhow::Result<Vec<Vec<u8>>> {
    let (first, members) = target.target_and_members()?;
    let mut answered = send(&first, requests.clone(), target.timeout());
    for member in members.into_iter().filter(|m| *m != first.remote) {
        match &answered {
            // Another node's asset, or a member out of reach (the
            // server's own refusals are answers: they stop the search).
            Err(e) if is_code(e, ErrorCode::AssetElsewhere) || !is_server_error(e) => {}
            _ => break,
        }
        let other = ClientTarget {
            remote: member,
            ..first.clone()
        };
        answered = send(&other, requests.clone(), target.timeout());
    }
    answered
}

/// Whether `e` is an error the server answered (as [`send`] words it).
fn is_server_error(e: &anyhow::Error) -> bool {
    e.to_string().starts_with("server error ")
}

/// Whether `e` is the server's error `code` (as [`send`] words it).
pub(crate) fn is_code(e: &anyhow::Error, code: ErrorCode) -> bool {
    e.to_string()
        .starts_with(&format!("server error {}:", code as u16))
}

/// Send `requests` (on one connection per [`REQUESTS_PER_CONNECTION`]) and
/// return their answers in order; the first error stops.
pub(crate) fn send(
    client: &ClientTarget,
    requests: Vec<Request>,
    timeout: Duration,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut answers = Vec::with_capacity(requests.len());
    for batch in requests.chunks(REQUESTS_PER_CONNECTION) {
        let outcome = rpc_framed(client, ALPN_STOQ, Framing::Stoq, batch.to_vec(), timeout)?;
        for reply in outcome.replies {
            match reply {
                Reply::Ok(body) => answers.push(body.to_vec()),
                Reply::Error { code, message } => bail!("server error {code}: {message}"),
                Reply::Failed(why) => bail!("{}: {why}", client.remote),
            }
        }
    }
    Ok(answers)
}

/// An identity as operators write it (64 hex digits), as an asset owner.
fn owner(identity: &str) -> anyhow::Result<Owner> {
    crate::admission::parse_identity(identity)
        .map(|identity| Owner(identity.0))
        .map_err(anyhow::Error::msg)
}

/// `4096`, `64K`, `16M`, `1G` (powers of 1024).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        _ => bail!("{text:?}: a size is a number with an optional K, M or G (KiB, MiB, GiB)"),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .with_context(|| format!("{text:?} is not a size in bytes (e.g. 4096, 64K, 16M)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_identities_are_checked_before_any_request() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        for bad in ["", "K", "12X", "-1", "99999999999999999999G", "1.5M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(owner(&"ab".repeat(32)).unwrap(), Owner([0xab; 32]));
        for bad in ["ab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert!(owner(bad).is_err(), "{bad}");
        }
    }
}
