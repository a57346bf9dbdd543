//! `internet2-server`: load the configuration, make or load the server
//! identity, start the control plane and the workers, drain on SIGINT/SIGTERM.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, ValueEnum};
use controlplane::ControlPlane;
use controlplane::authority::ca::KeyAlgorithm;
use controlplane::authority::ct::LogKeyAlgorithm;
use controlplane::authority::service::ServiceConfig;
use dataplane::control::ControlPort;
use dataplane::front_door::FrontDoor;
use dataplane::io::signals;
use dataplane::trust::SnapshotClientVerifier;
use dataplane::{Resumption, ServerIdentity};
use internet2_server::authority::AuthorityRuntime;
use internet2_server::config::SigningAlgorithm;
use internet2_server::config::{self, EMBEDDED_DEV_CONFIG, EMBEDDED_NAME};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Resumable sessions kept for 0-RTT (each a few hundred bytes).
const SESSION_CACHE_ENTRIES: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bootstrap {
    Phase0,
    Federated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Development,
    Production,
}

/// A QUIC-over-IPv6 protocol stack appliance.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; without it the embedded development
    /// configuration (deploy/internet2-dev.toml) is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// `production` requires --config.
    #[arg(long, value_enum, default_value = "development")]
    mode: Mode,
    /// Where keys and state live (overrides [storage] data_dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Check the configuration, print the result and exit.
    #[arg(long)]
    check_config: bool,
    /// Also serve the zone over plain DNS on UDP
    /// (`[trustchain_authority] legacy_dns_port`, 53 by default), for
    /// resolvers that do not speak DNS over QUIC.
    #[arg(long)]
    enable_legacy_gateway: bool,
    /// `phase0`: a single node with its own CA. `federated`: a member of a
    /// cluster that replicates the control plane with Raft (start a new
    /// one with --cluster-init, or join one with --join and --join-token;
    /// afterwards neither is needed).
    #[arg(long, value_enum, default_value = "phase0")]
    bootstrap: Bootstrap,
    /// Start a new cluster with this node as its first member.
    #[arg(long, requires = "bootstrap", conflicts_with = "join")]
    cluster_init: bool,
    /// Join the cluster through the member at `[ADDRESS]:PORT`.
    #[arg(long, value_name = "[ADDRESS]:PORT", requires = "join_token")]
    join: Option<std::net::SocketAddr>,
    /// The join token a member printed (`internet2-server cluster join-token`).
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<String>,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

/// Operator commands (without one: run the server).
#[derive(Debug, clap::Subcommand)]
enum ServerCommand {
    /// Print a one-time enrollment token; a new client uses it once with
    /// `internet2 enroll TOKEN` to get its first certificate.
    EnrollToken {
        /// How long the token stays usable.
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        ttl_secs: u64,
    },
    /// Renew the running server's certificate now (overlapping validity;
    /// open connections and handshakes in flight are not disturbed). On a
    /// cluster member, the certificate it serves is its node certificate.
    Rotate {
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Manage the stake ledger of the running server (admission).
    Stake {
        #[command(subcommand)]
        action: StakeAction,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Show or lift isolation entries of the running server.
    Blocklist {
        #[command(subcommand)]
        action: BlocklistAction,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Set, reset or list the asset quotas of identities (memory, storage
    /// and VM fuel) on the running server; durable.
    Quota {
        #[command(subcommand)]
        action: QuotaAction,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// List the admitted connections of the running server by owner.
    Assets {
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Manage the cluster this member belongs to.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ClusterAction {
    /// Print a one-time join token: a new node joins with
    /// `--bootstrap federated --join [ADDRESS]:PORT --join-token TOKEN`.
    JoinToken {
        /// How long the token stays usable.
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        ttl_secs: u64,
    },
    /// Take a member out of the cluster (asks the running server as its
    /// operator; a follower passes it to the leader).
    Remove {
        name: String,
        /// The leader waits for the next election when it removes itself.
        #[arg(long, default_value_t = 40000)]
        timeout_ms: u64,
    },
}

/// Who an identity is: 64 hex digits, or a certificate file (PEM) whose key
/// it is.
#[derive(Debug, clap::Args)]
struct IdentityArg {
    /// SHA-256 of the certificate's public key (64 hex digits), as
    /// `stake list` and admission errors print it.
    #[arg(required_unless_present = "cert", conflicts_with = "cert")]
    identity: Option<String>,
    /// Take the identity from this certificate (PEM) instead.
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
}

impl IdentityArg {
    fn resolve(&self) -> anyhow::Result<String> {
        if let Some(path) = &self.cert {
            let der = controlplane::authority::pem::load_cert(path)
                .with_context(|| format!("cannot read the certificate {}", path.display()))?;
            let identity = internet2_server::admission::identity_of_certificate(&der)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            return Ok(controlplane::authority::api::hex(&identity.0));
        }
        let text = self.identity.clone().unwrap_or_default();
        internet2_server::admission::parse_identity(&text).map_err(|e| anyhow::anyhow!(e))?;
        Ok(text.to_ascii_lowercase())
    }
}

#[derive(Debug, clap::Subcommand)]
enum StakeAction {
    /// Add stake to an identity.
    Grant {
        #[command(flatten)]
        who: IdentityArg,
        /// How much to add.
        #[arg(long, default_value_t = 1)]
        amount: u64,
    },
    /// Withdraw stake (all of it unless --amount).
    Revoke {
        #[command(flatten)]
        who: IdentityArg,
        #[arg(long, default_value_t = u64::MAX)]
        amount: u64,
    },
    /// Every identity with stake.
    List,
}

#[derive(Debug, clap::Subcommand)]
enum QuotaAction {
    /// Set an identity's limits (suffixes K, M, G: KiB, MiB, GiB; `64MiB`);
    /// a limit not given stays as it is. New allocations are held to it;
    /// what the identity holds already stays.
    Set {
        #[command(flatten)]
        who: IdentityArg,
        /// Memory assets the identity may hold on this node.
        #[arg(long, value_name = "SIZE", required_unless_present_any = ["storage", "fuel"])]
        memory: Option<String>,
        /// Storage assets the identity may hold on this node.
        #[arg(long, value_name = "SIZE")]
        storage: Option<String>,
        /// The fuel each call of the identity's VMs may be given.
        #[arg(long, value_name = "N")]
        fuel: Option<u64>,
    },
    /// Back to the node's defaults ([hypermesh_assets] memory_quota_mib,
    /// storage_quota_mib, vm_fuel_quota).
    Reset {
        #[command(flatten)]
        who: IdentityArg,
    },
    /// Every identity with a quota set: its limits and the storage it holds.
    List,
}

#[derive(Debug, clap::Subcommand)]
enum BlocklistAction {
    /// Isolated prefixes and suspended identities, with their time left,
    /// and the configured prefixes.
    List,
    /// Lift an isolated prefix (e.g. 2001:db8:1:2::/64).
    Remove { prefix: String },
    /// Lift a suspended identity.
    Unsuspend {
        #[command(flatten)]
        who: IdentityArg,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // openraft narrates every election and append at info.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let resolved = match load_config(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{:#?}", resolved.settings);
        for choice in &resolved.choices {
            println!("config: {choice}");
        }
        for warning in &resolved.warnings {
            println!("warning: {warning}");
        }
        return ExitCode::SUCCESS;
    }
    let result = match &args.command {
        Some(command) => operator_command(&args, &resolved, command),
        None => run(&args, resolved),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn data_dir(args: &Args, resolved: &config::Resolved) -> PathBuf {
    args.data_dir
        .clone()
        .or(resolved.data_dir.clone())
        .unwrap_or_else(internet2_server::default_data_dir)
}

/// `enroll-token` works on the data directory alone (the running server
/// holds the store); `rotate` asks the running server as its operator.
fn operator_command(
    args: &Args,
    resolved: &config::Resolved,
    command: &ServerCommand,
) -> anyhow::Result<()> {
    let data_dir = data_dir(args, resolved);
    match command {
        ServerCommand::EnrollToken { ttl_secs } => {
            let token = controlplane::authority::enrollment::mint(
                &data_dir,
                std::time::Duration::from_secs(*ttl_secs),
                std::time::SystemTime::now(),
            )
            .with_context(|| format!("cannot mint a token in {}", data_dir.display()))?;
            println!("{token}");
            Ok(())
        }
        ServerCommand::Rotate { timeout_ms } => {
            let rotated = internet2_server::authority::request_rotation(
                &data_dir,
                resolved.settings.listen,
                &resolved.server_names,
                std::time::Duration::from_millis(*timeout_ms),
            )?;
            println!(
                "rotated: serial {} valid until {}",
                rotated.serial, rotated.not_after
            );
            Ok(())
        }
        ServerCommand::Stake { action, timeout_ms } => {
            use internet2_server::admission::StakeRequest;
            let request = match action {
                StakeAction::Grant { who, amount } => StakeRequest::Grant {
                    identity: who.resolve()?,
                    amount: *amount,
                },
                StakeAction::Revoke { who, amount } => StakeRequest::Revoke {
                    identity: who.resolve()?,
                    amount: *amount,
                },
                StakeAction::List => StakeRequest::List,
            };
            operator_json(
                &data_dir,
                resolved,
                internet2_server::admission::STAKE,
                &serde_json::to_vec(&request)?,
                *timeout_ms,
            )
        }
        ServerCommand::Blocklist { action, timeout_ms } => {
            use internet2_server::admission::BlocklistRequest;
            let request = match action {
                BlocklistAction::List => BlocklistRequest::List,
                BlocklistAction::Remove { prefix } => BlocklistRequest::Remove {
                    prefix: prefix.clone(),
                },
                BlocklistAction::Unsuspend { who } => BlocklistRequest::Unsuspend {
                    identity: who.resolve()?,
                },
            };
            operator_json(
                &data_dir,
                resolved,
                internet2_server::admission::BLOCKLIST,
                &serde_json::to_vec(&request)?,
                *timeout_ms,
            )
        }
        ServerCommand::Cluster {
            action: ClusterAction::JoinToken { ttl_secs },
        } => {
            let token = controlplane::cluster::node::mint_join_token(
                &data_dir,
                std::time::Duration::from_secs(*ttl_secs),
                std::time::SystemTime::now(),
            )
            .map_err(|e| {
                anyhow::anyhow!("cannot mint a join token in {}: {e}", data_dir.display())
            })?;
            println!("{token}");
            Ok(())
        }
        ServerCommand::Cluster {
            action: ClusterAction::Remove { name, timeout_ms },
        } => operator_json(
            &data_dir,
            resolved,
            dataplane::protocols::stoq_registry::CLUSTER_REMOVE,
            &serde_json::to_vec(&serde_json::json!({ "name": name }))?,
            *timeout_ms,
        ),
        ServerCommand::Quota { action, timeout_ms } => {
            use controlplane::runtime::assets::QuotaRequest;
            let size = |text: &Option<String>| {
                text.as_deref()
                    .map(internet2_server::cli_assets::parse_size)
                    .transpose()
            };
            let request = match action {
                QuotaAction::Set {
                    who,
                    memory,
                    storage,
                    fuel,
                } => QuotaRequest::Set {
                    identity: who.resolve()?,
                    memory: size(memory)?,
                    storage: size(storage)?,
                    fuel: *fuel,
                },
                QuotaAction::Reset { who } => QuotaRequest::Reset {
                    identity: who.resolve()?,
                },
                QuotaAction::List => QuotaRequest::List,
            };
            operator_json(
                &data_dir,
                resolved,
                controlplane::runtime::assets::QUOTAS,
                &serde_json::to_vec(&request)?,
                *timeout_ms,
            )
        }
        ServerCommand::Assets { timeout_ms } => operator_json(
            &data_dir,
            resolved,
            internet2_server::admission::ASSETS,
            b"{}",
            *timeout_ms,
        ),
    }
}

/// Send an operator request and print its JSON answer, indented.
fn operator_json(
    data_dir: &std::path::Path,
    resolved: &config::Resolved,
    kind: u8,
    payload: &[u8],
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let body = internet2_server::authority::operator_request(
        data_dir,
        resolved.settings.listen,
        &resolved.server_names,
        kind,
        payload,
        std::time::Duration::from_millis(timeout_ms),
    )?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).context("the server's answer is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn load_config(args: &Args) -> anyhow::Result<config::Resolved> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            Ok(config::parse(&path.display().to_string(), &text, cores)?)
        }
        None if args.mode == Mode::Production => {
            anyhow::bail!(
                "--mode production needs --config FILE (the embedded configuration is for development)"
            )
        }
        None => Ok(config::parse(EMBEDDED_NAME, EMBEDDED_DEV_CONFIG, cores)?),
    }
}

fn run(args: &Args, resolved: config::Resolved) -> anyhow::Result<()> {
    // Before any thread exists, so every thread inherits the blocked mask
    // and only the sigwait below sees the signals.
    signals::block_termination_signals().context("cannot block SIGINT/SIGTERM")?;
    for choice in &resolved.choices {
        tracing::info!("config: {choice}");
    }
    for warning in &resolved.warnings {
        tracing::warn!("config: {warning}");
    }
    let data_dir = data_dir(args, &resolved);
    let mut names = resolved.server_names.clone();
    let ip = *resolved.settings.listen.ip();
    if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
        names.push(ip.to_string());
    }
    // The server's own name in its zone, so clients that reach it by that
    // name (`internet2 ping --host node1.internet2.test`) can verify it.
    let fqdn = resolved.dns.fqdn();
    if !names.contains(&fqdn) {
        names.push(fqdn);
    }
    // A cluster's name is its zone's apex: it resolves to every member,
    // and every member's certificate carries it.
    let apex = resolved.dns.apex.trim_end_matches('.').to_ascii_lowercase();
    if args.bootstrap == Bootstrap::Federated && !names.contains(&apex) {
        names.push(apex);
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    // The file as the server started with it, for a reload to name what
    // changed but applies only at the next start (`resolved` gets the
    // runtime's stores filled in below).
    let as_started = resolved.clone();
    let mut resolved = resolved;
    let port = ControlPort::new(resolved.settings.workers);
    let service_config = ServiceConfig {
        lifetime: resolved.certificate_lifetime,
        server_names: names.clone(),
        ca_algorithm: match resolved.ca_algorithm {
            SigningAlgorithm::EcdsaP256 => KeyAlgorithm::EcdsaP256,
            SigningAlgorithm::Ed25519 => KeyAlgorithm::Ed25519,
        },
        log_algorithm: match resolved.log_algorithm {
            SigningAlgorithm::EcdsaP256 => LogKeyAlgorithm::EcdsaP256Sha256,
            SigningAlgorithm::Ed25519 => LogKeyAlgorithm::Ed25519,
        },
        zone: Some(controlplane::dns::ZoneConfig {
            apex: resolved.dns.apex.clone(),
            server_name: resolved.dns.name.clone(),
            server_addresses: resolved.dns.addresses.clone(),
            server_port: resolved.settings.listen.port(),
        }),
    };
    // The front door goes first: the `xdp` backend registers its sockets in
    // it while the workers are built, and isolation writes its blocklist.
    // A failure later drops (detaches) it.
    let front_door = attach_front_door(&resolved)?;
    let blocklists = internet2_server::admission::Blocklists::new(
        resolved.blocklist.clone(),
        front_door.clone(),
    );
    let worker_stats = Arc::new(std::sync::OnceLock::new());
    let resumption = if resolved.zero_rtt {
        Resumption::SingleUseWithZeroRtt(dataplane::session_store::SessionStore::new(
            SESSION_CACHE_ENTRIES,
        ))
    } else {
        // rustls' ticketer rotates its key every 6 hours by itself.
        Resumption::Tickets(
            rustls::crypto::aws_lc_rs::Ticketer::new()
                .context("cannot create the session-ticket key")?,
        )
    };
    if args.bootstrap == Bootstrap::Federated {
        // A federated cluster depends on nothing outside it.
        if resolved.outside_zone.is_some() {
            anyhow::bail!(
                "[trustchain_authority] dns_mode = \"external\" (outside_zone = \"system-resolver\") is phase0's migration aid; a federated cluster answers its own zone only"
            );
        }
        if resolved.import.is_some() {
            anyhow::bail!(
                "[trustchain_authority] import_certificate (and ca_mode = \"external\") is phase0's migration aid; a federated cluster serves its own CA's certificates only"
            );
        }
    }
    // Before the control plane starts: it takes the workers' memory assets
    // (their quotas are the operator's, in its store).
    resolved.settings.assets = match &resolved.assets {
        Some(assets) if args.bootstrap == Bootstrap::Federated && !assets.node_set => {
            // Members would share node 0's identifiers and locator.
            tracing::warn!(
                "asset addressing on a cluster member needs [hypermesh_assets] node_number (each member its own, 0 to 4095); asset requests are refused"
            );
            None
        }
        Some(assets) => match internet2_server::assets::reserve_blocks(&data_dir)? {
            Some(blocks) => Some(Arc::new(
                dataplane::assets::memory::MemoryAssets::new(
                    assets.node,
                    assets.locator,
                    resolved.settings.workers,
                    blocks,
                    (assets.quota_bytes, assets.node_bytes),
                )
                .with_grace(assets.lease_grace),
            )),
            None => {
                tracing::warn!(
                    file = %data_dir.join(internet2_server::assets::BLOCKS_FILE).display(),
                    "this node has used up its asset identifiers: asset requests are refused"
                );
                None
            }
        },
        None => None,
    };
    // The VM threads run what the control plane checked, beside it.
    let vm_pool = match resolved
        .assets
        .as_ref()
        .and_then(|assets| assets.vm.as_ref())
    {
        Some(config) if resolved.settings.assets.is_some() => Some(
            vm::VmPool::start(config, port.clone(), resolved.settings.assets.clone())
                .map_err(anyhow::Error::msg)
                .context("cannot start the VM threads")?,
        ),
        _ => None,
    };
    let vm_host = vm_pool
        .clone()
        .map(|pool| pool as Arc<dyn controlplane::vm::VmHost>);
    let mut resolver = None;
    let (control, identity) = match args.bootstrap {
        Bootstrap::Phase0 => {
            let authority = AuthorityRuntime::start(
                &data_dir,
                service_config,
                resolved.certificate_rotation,
                port.clone(),
                internet2_server::authority::AdmissionPlug {
                    settings: resolved.admission.clone(),
                    blocklists: blocklists.clone(),
                    stats: worker_stats.clone(),
                },
            )
            .context("cannot start the certificate authority")?;
            let trust = authority.trust();
            if let Some((certificate, key)) = &resolved.import {
                import_certificate(
                    &authority.certificates(),
                    certificate,
                    key,
                    &names,
                    resolved.ca_external,
                )?;
            }
            if let Some(upstreams) = &resolved.outside_zone {
                resolver = Some(start_resolver(&port, upstreams)?);
            }
            let identity = ServerIdentity {
                certificates: authority.certificates(),
                client_verifier: Some(SnapshotClientVerifier::new(trust.clone())),
                resumption,
            };
            resolved.settings.zone = authority.zone();
            resolved.settings.trust = Some(trust);
            resolved.settings.admission = Some(authority.admission_gate());
            let mut authority = authority;
            if let Some(assets) = &resolved.assets {
                authority.attach_assets(
                    assets.node,
                    assets.locator,
                    assets.limits(),
                    resolved.settings.assets.clone(),
                );
                if let Some(host) = vm_host {
                    authority.attach_vm(host);
                }
            }
            let control =
                ControlPlane::spawn(resolved.control_plane_core, move |now| authority.poll(now))
                    .context("cannot start the control plane")?;
            (control, identity)
        }
        Bootstrap::Federated => {
            let node = cluster_node(args, &resolved, &data_dir, &service_config)?;
            let start = controlplane::runtime::cluster::MemberStart {
                data_dir: data_dir.clone(),
                config: service_config,
                port: port.clone(),
                admission: resolved.admission.clone(),
                blocklists: blocklists.clone(),
                stats: worker_stats.clone(),
                cluster: controlplane::runtime::cluster::ClusterSettings {
                    node,
                    init: args.cluster_init,
                    backend: resolved.settings.backend,
                    transport: resolved.settings.transport.clone(),
                    assets: match (&resolved.settings.assets, &resolved.assets) {
                        (Some(memory), Some(assets)) => {
                            Some(controlplane::runtime::cluster::MemberAssets {
                                memory: memory.clone(),
                                node: assets.node,
                                limits: assets.limits(),
                                vm: vm_host,
                            })
                        }
                        _ => None,
                    },
                },
            };
            let (control, published) =
                controlplane::runtime::cluster::start(resolved.control_plane_core, start)
                    .context("cannot start the cluster member")?;
            let identity = ServerIdentity {
                certificates: published.certificates,
                client_verifier: Some(SnapshotClientVerifier::new(published.trust.clone())),
                resumption,
            };
            resolved.settings.zone = published.zone;
            resolved.settings.trust = Some(published.trust);
            resolved.settings.admission = Some(published.gate);
            (control, identity)
        }
    };
    resolved.settings.control = Some(port.clone());
    resolved.settings.front_door = front_door.clone();
    resolved.settings.blocklist = Some(blocklists.store());
    port.set_control_waker(control.waker());
    let server = match dataplane::serve(&resolved.settings, &identity) {
        Ok(server) => server,
        Err(e) => {
            control.stop();
            return Err(e.into());
        }
    };
    let _ = worker_stats.set(server.stats.clone());
    let gateway = match (&resolved.settings.zone, args.enable_legacy_gateway) {
        (Some(zone), true) => {
            let at = std::net::SocketAddrV6::new(
                *resolved.settings.listen.ip(),
                resolved.legacy_dns_port,
                0,
                0,
            );
            match dataplane::protocols::legacy_dns::LegacyGateway::start(at, zone.clone()) {
                Ok(gateway) => {
                    tracing::info!(listen = %gateway.local, "legacy DNS gateway: the zone over plain UDP");
                    Some(gateway)
                }
                Err(e) => {
                    server.shutdown(std::time::Duration::ZERO);
                    server.join();
                    control.stop();
                    return Err(anyhow::anyhow!(
                        "cannot start the legacy DNS gateway on [{}]:{}: {e}",
                        at.ip(),
                        at.port()
                    ));
                }
            }
        }
        _ => None,
    };
    let listen = resolved.settings.listen;
    tracing::info!(%listen, workers = server.worker_count(), backends = ?server.backends, data_dir = %data_dir.display(), "serving");
    println!(
        "listening on [{}]:{} workers={} ca={}",
        listen.ip(),
        listen.port(),
        server.worker_count(),
        data_dir
            .join(internet2_server::authority::CA_FILE)
            .display()
    );
    let _ = std::io::stdout().flush();

    let signal = loop {
        let signal = signals::wait_termination_signal().context("waiting for a signal")?;
        if signal != signals::SIGHUP {
            break signal;
        }
        let imported = (args.bootstrap == Bootstrap::Phase0)
            .then(|| (identity.certificates.as_ref(), names.as_slice()));
        reload(args, &as_started, &blocklists, imported);
    };
    tracing::info!(
        signal,
        drain_ms = resolved.drain.as_millis() as u64,
        "draining: refusing new connections, closing open ones"
    );
    if let Some(gateway) = gateway {
        gateway.stop();
    }
    server.shutdown(resolved.drain);
    let stats = server.stats.clone();
    server.join();
    if let Some(resolver) = resolver {
        resolver.stop();
    }
    // The VM threads first: a call waiting on the control plane for a
    // storage asset is answered before the control plane stops.
    if let Some(pool) = vm_pool {
        pool.stop();
    }
    control.stop();
    let total = stats.snapshot().total;
    tracing::info!(
        accepted = total.accepted,
        handshakes = total.handshakes,
        "stopped"
    );
    Ok(())
}

/// Who this node is in its cluster: its record in the data directory, or
/// (first start) a new one: `--cluster-init` makes it the first member,
/// `--join` asks a member to let it in. Its name is its zone name
/// (`[trustchain_authority] dns_name`), its address the listen address.
fn cluster_node(
    args: &Args,
    resolved: &config::Resolved,
    data_dir: &std::path::Path,
    service_config: &ServiceConfig,
) -> anyhow::Result<controlplane::cluster::node::NodeRecord> {
    use controlplane::cluster::node;
    let listen = resolved.settings.listen;
    if listen.ip().is_unspecified() {
        anyhow::bail!(
            "--bootstrap federated needs a specific listen address (the one the other members reach), not [::]"
        );
    }
    let address = format!("[{}]:{}", listen.ip(), listen.port());
    let name = resolved.dns.name.clone();
    if let Some(existing) = node::load_node(data_dir).map_err(|e| anyhow::anyhow!(e))? {
        if args.join.is_some() {
            tracing::info!(name = %existing.name, "this node is a member already; --join is ignored");
        }
        if existing.address != address {
            anyhow::bail!(
                "this member's address is {} but it listens on {address}: members keep their address (remove it and join again to move it)",
                existing.address
            );
        }
        return Ok(existing);
    }
    if let (Some(via), Some(token)) = (args.join, &args.join_token) {
        let via_spec = node::JoinVia {
            remote: via,
            backend: resolved.settings.backend,
            transport: resolved.settings.transport.clone(),
            timeout: std::time::Duration::from_secs(30),
        };
        eprintln!("joining the cluster through {via} as {name} ({address}) ...");
        let record = node::join(
            data_dir,
            &via_spec,
            token,
            &name,
            &address,
            &service_config.server_names,
            resolved
                .settings
                .assets
                .as_ref()
                .map(|assets| assets.locator().0),
        )
        .map_err(|e| anyhow::anyhow!("cannot join the cluster through {via}: {e}"))?;
        eprintln!(
            "joined as member {} (id {}); catching up",
            record.name, record.id
        );
        return Ok(record);
    }
    if !args.cluster_init {
        anyhow::bail!(
            "this node is not a member yet: start a new cluster with --cluster-init, or join one with --join [ADDRESS]:PORT --join-token TOKEN"
        );
    }
    node::check_name(&name).map_err(|e| anyhow::anyhow!("dns_name: {e}"))?;
    let spki = controlplane::authority::service::server_public_key(data_dir)?;
    let record = node::NodeRecord {
        id: node::node_id(&spki),
        name,
        address,
    };
    node::save_node(data_dir, &record).map_err(|e| anyhow::anyhow!(e))?;
    Ok(record)
}

/// Attach the XDP front door when the config names an interface, with the
/// configured blocklist.
fn attach_front_door(resolved: &config::Resolved) -> anyhow::Result<Option<Arc<FrontDoor>>> {
    let Some((interface, mode)) = &resolved.xdp else {
        return Ok(None);
    };
    let front_door = FrontDoor::attach(interface, resolved.settings.listen.port(), *mode)?;
    front_door.set_blocklist(&resolved.blocklist)?;
    tracing::info!(%interface, ?mode, blocked = resolved.blocklist.len(), "XDP front door attached");
    Ok(Some(Arc::new(front_door)))
}

/// Phase0's migration: serve the certificate another CA issued (chain and
/// key files) to clients that ask for its names, or with `ca_mode =
/// "external"` to every client as the server's own.
fn import_certificate(
    certificates: &dataplane::trust::CertificateStore,
    certificate: &std::path::Path,
    key: &std::path::Path,
    own_names: &[String],
    external: bool,
) -> anyhow::Result<()> {
    use controlplane::authority::import;
    let mut loaded = import::load(certificate, key, own_names, std::time::SystemTime::now())
        .context("cannot import the certificate")?;
    if external {
        // The default certificate: the server's own names (the operator's,
        // enrollment's and the CLI's) keep the embedded one.
        loaded.imported = loaded.imported.as_default_except(own_names.to_vec());
    }
    let expires = loaded
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tracing::info!(
        names = ?loaded.names,
        issuer = %loaded.issuer,
        expires_in_days = expires.as_secs() / 86_400,
        external,
        "imported certificate served (ca_mode external: to clients asking for any name but the server's own; else to clients asking for its names)"
    );
    if expires < import::EXPIRY_WARNING {
        tracing::warn!(
            expires_in_days = expires.as_secs() / 86_400,
            file = %certificate.display(),
            "the imported certificate expires soon: renew it and send SIGHUP"
        );
    }
    certificates.set_imported(Some(loaded.imported));
    Ok(())
}

/// Phase0's system resolver for names outside the zone.
fn start_resolver(
    port: &std::sync::Arc<ControlPort>,
    upstreams: &[std::net::SocketAddr],
) -> anyhow::Result<controlplane::dns::forward::Forwarder> {
    use controlplane::dns::forward;
    let upstreams = if upstreams.is_empty() {
        forward::system_upstreams(std::path::Path::new(forward::RESOLV_CONF))
            .context("outside_zone = \"system-resolver\" found no resolver")?
    } else {
        upstreams.to_vec()
    };
    let resolver = forward::Forwarder::start(port.clone(), upstreams.clone())?;
    tracing::info!(
        ?upstreams,
        "names outside the zone are asked of the system's resolvers"
    );
    Ok(resolver)
}

/// SIGHUP: re-read the config file and apply what can change live (the
/// blocklist, the imported certificate and `ca_mode`); name what changed
/// but applies only at the next start. A bad file is logged and changes
/// nothing.
fn reload(
    args: &Args,
    running: &internet2_server::config::Resolved,
    blocklists: &internet2_server::admission::Blocklists,
    imported: Option<(&dataplane::trust::CertificateStore, &[String])>,
) {
    let resolved = match load_config(args) {
        Ok(resolved) => resolved,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reload refused: the configuration is invalid; nothing changed");
            return;
        }
    };
    let restart = resolved.changed_at_restart(running);
    if !restart.is_empty() {
        tracing::warn!(
            changed = ?restart,
            "reload: these settings changed in the file and take effect at the next start; the server keeps running with the ones it started with"
        );
    }
    // The workers drop blocklisted sources at the first packet; an XDP
    // front door drops them in the driver too. Isolation's entries stay.
    let blocked = resolved.blocklist.len();
    blocklists.set_configured(resolved.blocklist);
    tracing::info!(
        blocked,
        "reloaded: blocklist applied (isolation entries kept)"
    );
    let Some((certificates, own_names)) = imported else {
        return;
    };
    match &resolved.import {
        Some((certificate, key)) => {
            if let Err(e) = import_certificate(
                certificates,
                certificate,
                key,
                own_names,
                resolved.ca_external,
            ) {
                tracing::error!(error = %format!("{e:#}"), "reload: the imported certificate was not replaced; the one served stays");
            }
        }
        None if !certificates.imported_names().is_empty() => {
            certificates.set_imported(None);
            tracing::info!("reloaded: the imported certificate is no longer served");
        }
        None => {}
    }
}
