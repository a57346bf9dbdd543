//! The bytes of a [`Command`]: what a command log stores and what a
//! replica receives. Each part is written in the encoding its table already
//! uses (a certificate record as `ca_certificates` holds it, a revocation
//! as `ca_revocations`, a name's records as `dns_records`, a plot and a
//! tick as the admission tables), so there is one encoding per thing.
//!
//! `command = version (1) ‖ kind ‖ body`, integers big-endian:
//! - kind 1, certify: serial (16 bytes) ‖ record length u32 ‖ the record ‖ token
//!   (0, or 1 ‖ id (16 bytes) ‖ expiry u64) ‖ zone change;
//! - kind 2, revoke: serial (16 bytes) ‖ revocation length u8 ‖ the revocation ‖
//!   zone change;
//! - kind 3, zone: zone change (present);
//! - kind 4, admission: 1 grant or 2 withdraw ‖ identity (32 bytes) ‖ amount
//!   u64; 3 plot ‖ identity (32 bytes) ‖ plot length u8 ‖ plot ‖ stake target (0,
//!   or 1 ‖ u64); 4 tick ‖ tick length u8 ‖ tick;
//! - kind 5, asset: 1 alloc ‖ owner (32) ‖ size u64 ‖ id u64 ‖ name length
//!   u8 ‖ name ‖ zone change; 2 write ‖
//!   caller (32) ‖ id u64 ‖ offset u64 ‖ length u32 ‖ data; 3 compare-and-swap ‖
//!   caller ‖ id ‖ offset ‖ length u32 ‖ expected ‖ length u32 ‖ new; 4 free ‖
//!   caller ‖ id ‖ zone change;
//!   5 grant ‖ caller ‖ id ‖ grantee (32) ‖ access u8 (0 withdraws, 1 read, 2
//!   write); 6 quota ‖ owner (32) ‖ memory (0, or 1 ‖ u64) ‖ storage (the same);
//!
//! `zone change = 0 | 1 ‖ counter u64 ‖ edits u32 ‖ (name length u8 ‖
//! name ‖ 0 | 1 ‖ records length u16 ‖ records)*`.
//!
//! [`decode`] takes exactly what [`encode`] writes and refuses anything
//! else (a short or long buffer, an unknown version or kind, a part its
//! own decoder refuses).

use super::Command;
use crate::assets::{AssetChange, Quota};
use crate::authority::logged::{Certify, Revoke, SpentToken};
use crate::authority::registry::{
    Reader, RegistryError, decode_record, decode_revocation, encode_record, encode_revocation,
};
use crate::consensus::stake::Identity;
use crate::consensus::state::{self, AdmissionChange};
use crate::dns::{RecordSet, ZoneChange, store};
use dataplane::assets::memory::Access;

/// The encoding's version byte.
const VERSION: u8 = 1;
const CERTIFY: u8 = 1;
const REVOKE: u8 = 2;
const ZONE: u8 = 3;
const ADMISSION: u8 = 4;
const GRANT: u8 = 1;
const WITHDRAW: u8 = 2;
const PLOT: u8 = 3;
const TICK: u8 = 4;
const ASSET: u8 = 5;
const ASSET_ALLOC: u8 = 1;
const ASSET_WRITE: u8 = 2;
const ASSET_CAS: u8 = 3;
const ASSET_FREE: u8 = 4;
const ASSET_GRANT: u8 = 5;
/// A quota without fuel, as written before VMs had it (read, not written).
const ASSET_QUOTA: u8 = 6;
/// A quota with its fuel.
const ASSET_QUOTA_FUEL: u8 = 7;

/// Why a command cannot be encoded: a part its table's encoding cannot
/// hold (the proposers' checks keep commands far inside these limits).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Record(#[from] RegistryError),
    #[error("a zone change holds {0}, more than the encoding holds")]
    Zone(&'static str),
}

/// [`Command`] as bytes; see the module documentation.
pub fn encode(command: &Command) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![VERSION];
    match command {
        Command::Certify(certify) => {
            out.push(CERTIFY);
            out.extend_from_slice(&certify.record.serial.0);
            let record = encode_record(&certify.record)?;
            // A record is a certificate and its names: far below 4 GiB.
            out.extend_from_slice(&(record.len() as u32).to_be_bytes());
            out.extend_from_slice(&record);
            match &certify.token {
                None => out.push(0),
                Some(token) => {
                    out.push(1);
                    out.extend_from_slice(&token.id);
                    out.extend_from_slice(&token.expires_at_s.to_be_bytes());
                }
            }
            encode_zone(certify.zone.as_ref(), &mut out)?;
        }
        Command::Revoke(revoke) => {
            out.push(REVOKE);
            out.extend_from_slice(&revoke.serial.0);
            short(&encode_revocation(&revoke.revocation), &mut out);
            encode_zone(revoke.zone.as_ref(), &mut out)?;
        }
        Command::Zone(change) => {
            out.push(ZONE);
            encode_zone(Some(change), &mut out)?;
        }
        Command::Admission(change) => {
            out.push(ADMISSION);
            encode_admission(change, &mut out);
        }
        Command::Asset(change) => {
            out.push(ASSET);
            encode_asset(change, &mut out)?;
        }
    }
    Ok(out)
}

/// A part of at most 255 bytes, after its length.
fn short(part: &[u8], out: &mut Vec<u8>) {
    let len = u8::try_from(part.len()).expect("revocations, plots and ticks are short");
    out.push(len);
    out.extend_from_slice(part);
}

fn encode_zone(change: Option<&ZoneChange>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let Some(change) = change else {
        out.push(0);
        return Ok(());
    };
    out.push(1);
    out.extend_from_slice(&change.counter().to_be_bytes());
    let edits = change.edits();
    let count = u32::try_from(edits.len()).map_err(|_| EncodeError::Zone("too many names"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, records) in edits {
        let len = u8::try_from(name.len()).map_err(|_| EncodeError::Zone("a name too long"))?;
        out.push(len);
        out.extend_from_slice(name.as_bytes());
        match records {
            None => out.push(0),
            Some(records) => {
                out.push(1);
                let bytes = store::encode(records);
                let len = u16::try_from(bytes.len())
                    .map_err(|_| EncodeError::Zone("records too long"))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&bytes);
            }
        }
    }
    Ok(())
}

fn encode_admission(change: &AdmissionChange, out: &mut Vec<u8>) {
    match change {
        AdmissionChange::StakeGrant { identity, amount }
        | AdmissionChange::StakeWithdraw { identity, amount } => {
            let grant = matches!(change, AdmissionChange::StakeGrant { .. });
            out.push(if grant { GRANT } else { WITHDRAW });
            out.extend_from_slice(&identity.0);
            out.extend_from_slice(&amount.to_be_bytes());
        }
        AdmissionChange::PlotRegister {
            identity,
            plot,
            stake_to,
        } => {
            out.push(PLOT);
            out.extend_from_slice(&identity.0);
            short(&state::encode_plot(plot), out);
            match stake_to {
                None => out.push(0),
                Some(target) => {
                    out.push(1);
                    out.extend_from_slice(&target.to_be_bytes());
                }
            }
        }
        AdmissionChange::BeaconTick(tick) => {
            out.push(TICK);
            short(&state::encode_tick(tick), out);
        }
    }
}

fn encode_asset(change: &AssetChange, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let long = |part: &[u8], out: &mut Vec<u8>| {
        // A request's payload is at most 64 KiB.
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    };
    let optional = |value: Option<u64>, out: &mut Vec<u8>| match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
    };
    match change {
        AssetChange::Alloc {
            owner,
            size,
            id,
            name,
            zone,
            limits,
        } => {
            out.push(ASSET_ALLOC);
            out.extend_from_slice(&owner.0);
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(&id.0.to_be_bytes());
            out.extend_from_slice(&limits.default_quota.to_be_bytes());
            out.extend_from_slice(&limits.node_max.to_be_bytes());
            let name = name.as_deref().unwrap_or_default();
            let len = u8::try_from(name.len()).map_err(|_| EncodeError::Zone("a name too long"))?;
            out.push(len);
            out.extend_from_slice(name.as_bytes());
            encode_zone(zone.as_ref(), out)?;
        }
        AssetChange::Write {
            caller,
            id,
            offset,
            data,
        } => {
            out.push(ASSET_WRITE);
            out.extend_from_slice(&caller.0);
            out.extend_from_slice(&id.0.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            long(data, out);
        }
        AssetChange::Cas {
            caller,
            id,
            offset,
            expected,
            new,
        } => {
            out.push(ASSET_CAS);
            out.extend_from_slice(&caller.0);
            out.extend_from_slice(&id.0.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            long(expected, out);
            long(new, out);
        }
        AssetChange::Free { caller, id, zone } => {
            out.push(ASSET_FREE);
            out.extend_from_slice(&caller.0);
            out.extend_from_slice(&id.0.to_be_bytes());
            encode_zone(zone.as_ref(), out)?;
        }
        AssetChange::Grant {
            caller,
            id,
            grantee,
            access,
            limits,
        } => {
            out.push(ASSET_GRANT);
            out.extend_from_slice(&caller.0);
            out.extend_from_slice(&id.0.to_be_bytes());
            out.extend_from_slice(&grantee.0);
            out.push(access.map_or(0, Access::byte));
            out.extend_from_slice(&limits.default_quota.to_be_bytes());
            out.extend_from_slice(&limits.node_max.to_be_bytes());
        }
        AssetChange::Quota { owner, quota } => {
            // Without fuel, as releases before VMs wrote it (which they
            // read).
            out.push(match quota.fuel {
                Some(_) => ASSET_QUOTA_FUEL,
                None => ASSET_QUOTA,
            });
            out.extend_from_slice(&owner.0);
            optional(quota.memory, out);
            optional(quota.storage, out);
            if quota.fuel.is_some() {
                optional(quota.fuel, out);
            }
        }
    }
    Ok(())
}

/// [`encode`]'s output back; `None` for anything else.
pub fn decode(bytes: &[u8]) -> Option<Command> {
    let mut r = Reader(bytes);
    if r.u8()? != VERSION {
        return None;
    }
    let command = match r.u8()? {
        CERTIFY => {
            let serial = r.serial()?;
            let len = usize::try_from(r.u32()?).ok()?;
            let record = decode_record(serial, r.take(len)?)?;
            let token = match r.u8()? {
                0 => None,
                1 => Some(SpentToken {
                    id: r.take(16)?.try_into().ok()?,
                    expires_at_s: r.u64()?,
                }),
                _ => return None,
            };
            let zone = decode_zone(&mut r)?;
            Command::Certify(Certify {
                record,
                token,
                zone,
            })
        }
        REVOKE => {
            let serial = r.serial()?;
            let len = usize::from(r.u8()?);
            let revocation = decode_revocation(r.take(len)?)?;
            let zone = decode_zone(&mut r)?;
            Command::Revoke(Revoke {
                serial,
                revocation,
                zone,
            })
        }
        ZONE => Command::Zone(decode_zone(&mut r)??),
        ADMISSION => Command::Admission(decode_admission(&mut r)?),
        ASSET => Command::Asset(decode_asset(&mut r)?),
        _ => return None,
    };
    r.0.is_empty().then_some(command)
}

fn decode_zone(r: &mut Reader<'_>) -> Option<Option<ZoneChange>> {
    match r.u8()? {
        0 => return Some(None),
        1 => {}
        _ => return None,
    }
    let counter = r.u64()?;
    let count = r.u32()?;
    let mut edits = Vec::new();
    for _ in 0..count {
        let len = usize::from(r.u8()?);
        let name = String::from_utf8(r.take(len)?.to_vec()).ok()?;
        let records: Option<RecordSet> = match r.u8()? {
            0 => None,
            1 => {
                let len = usize::from(r.u16()?);
                Some(store::decode(r.take(len)?)?)
            }
            _ => return None,
        };
        edits.push((name, records));
    }
    Some(Some(ZoneChange::from_parts(edits, counter)))
}

fn decode_admission(r: &mut Reader<'_>) -> Option<AdmissionChange> {
    let identity =
        |r: &mut Reader<'_>| -> Option<Identity> { Some(Identity(r.take(32)?.try_into().ok()?)) };
    Some(match r.u8()? {
        GRANT => AdmissionChange::StakeGrant {
            identity: identity(r)?,
            amount: r.u64()?,
        },
        WITHDRAW => AdmissionChange::StakeWithdraw {
            identity: identity(r)?,
            amount: r.u64()?,
        },
        PLOT => {
            let identity = identity(r)?;
            let len = usize::from(r.u8()?);
            let plot = state::decode_plot(r.take(len)?)?;
            let stake_to = match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                _ => return None,
            };
            AdmissionChange::PlotRegister {
                identity,
                plot,
                stake_to,
            }
        }
        TICK => {
            let len = usize::from(r.u8()?);
            AdmissionChange::BeaconTick(state::decode_tick(r.take(len)?)?)
        }
        _ => return None,
    })
}

fn decode_asset(r: &mut Reader<'_>) -> Option<AssetChange> {
    use dataplane::assets::address::AssetId;
    use dataplane::assets::memory::Owner;
    let owner = |r: &mut Reader<'_>| -> Option<Owner> { Some(Owner(r.take(32)?.try_into().ok()?)) };
    let long = |r: &mut Reader<'_>| -> Option<Vec<u8>> {
        let len = usize::try_from(r.u32()?).ok()?;
        Some(r.take(len)?.to_vec())
    };
    let optional = |r: &mut Reader<'_>| -> Option<Option<u64>> {
        match r.u8()? {
            0 => Some(None),
            1 => Some(Some(r.u64()?)),
            _ => None,
        }
    };
    Some(match r.u8()? {
        ASSET_ALLOC => AssetChange::Alloc {
            owner: owner(r)?,
            size: r.u64()?,
            id: AssetId(r.u64()?),
            limits: crate::assets::AllocLimits {
                default_quota: r.u64()?,
                node_max: r.u64()?,
            },
            name: match usize::from(r.u8()?) {
                0 => None,
                len => Some(String::from_utf8(r.take(len)?.to_vec()).ok()?),
            },
            zone: decode_zone(r)?,
        },
        ASSET_WRITE => AssetChange::Write {
            caller: owner(r)?,
            id: AssetId(r.u64()?),
            offset: r.u64()?,
            data: long(r)?,
        },
        ASSET_CAS => AssetChange::Cas {
            caller: owner(r)?,
            id: AssetId(r.u64()?),
            offset: r.u64()?,
            expected: long(r)?,
            new: long(r)?,
        },
        ASSET_FREE => AssetChange::Free {
            caller: owner(r)?,
            id: AssetId(r.u64()?),
            zone: decode_zone(r)?,
        },
        ASSET_GRANT => AssetChange::Grant {
            caller: owner(r)?,
            id: AssetId(r.u64()?),
            grantee: owner(r)?,
            access: match r.u8()? {
                0 => None,
                byte => Some(Access::from_byte(byte)?),
            },
            limits: crate::assets::AllocLimits {
                default_quota: r.u64()?,
                node_max: r.u64()?,
            },
        },
        kind @ (ASSET_QUOTA | ASSET_QUOTA_FUEL) => AssetChange::Quota {
            owner: owner(r)?,
            quota: Quota {
                memory: optional(r)?,
                storage: optional(r)?,
                fuel: match kind {
                    ASSET_QUOTA_FUEL => optional(r)?,
                    _ => None,
                },
            },
        },
        _ => return None,
    })
}
