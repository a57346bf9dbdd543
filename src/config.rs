//! The server's TOML configuration: sections, defaults, validation.
//!
//! Every key has a default, so an empty file is a working development
//! configuration. Unknown keys, bad values and an IPv4 bind address are
//! errors that name the file, the line and the key; nothing is started
//! before the whole file is valid.

use dataplane::capacity::PerCore;
use dataplane::front_door::{Ipv6Prefix, XdpAttachMode};
use dataplane::io::IoBatch;
use dataplane::io::xdp::ZeroCopy;
use dataplane::server::XdpPlan;
use dataplane::steering::SteeringMode;
use dataplane::{BackendKind, CongestionControl, ServerSettings, TransportSettings};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// The development configuration compiled into the binary (also shipped as
/// `deploy/internet2-dev.toml`).
pub const EMBEDDED_DEV_CONFIG: &str = include_str!("../deploy/internet2-dev.toml");
pub const EMBEDDED_NAME: &str = "<embedded deploy/internet2-dev.toml>";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub internet2: Internet2,
    pub stoq_transport: StoqTransport,
    pub dataplane: Dataplane,
    pub hypermesh_assets: HypermeshAssets,
    pub trustchain_authority: TrustchainAuthority,
    pub storage: Storage,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Internet2 {
    /// IPv6 address to listen on (`bind` is the older name).
    #[serde(alias = "bind")]
    pub bind_address: Spanned<String>,
    pub port: u16,
}

impl Default for Internet2 {
    fn default() -> Self {
        Self {
            bind_address: Spanned::new(0..0, "::1".into()),
            port: 4433,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoqTransport {
    pub backend: BackendKind,
    /// io_uring receive buffers per worker (see `dataplane::io::IoBatch`).
    pub uring_recv_ops: usize,
    /// io_uring send operations in flight per worker.
    pub uring_send_ops: usize,
    pub congestion_control: CongestionControl,
    pub gso: bool,
    pub socket_buffer_bytes: usize,
    pub stream_receive_window_bytes: u64,
    pub connection_receive_window_bytes: u64,
    pub send_window_bytes: u64,
    pub streams_bidi_max: u32,
    pub idle_timeout_ms: u64,
    pub initial_mtu: u16,
    /// The largest UDP payload MTU discovery probes for: 1452 for a
    /// 1500-byte MTU, 8952 for jumbo frames (MTU 9000).
    pub max_udp_payload_bytes: u16,
    pub zero_rtt: bool,
    pub connections_per_worker_max: usize,
    pub handshake_rate_retry_per_s: u32,
    /// AF_XDP zero-copy (`backend = "xdp"`): auto | on | off.
    pub zero_copy: ZeroCopy,
    /// AF_XDP UMEM frames per worker (2 KiB each; a power of two).
    pub xdp_frames: u32,
    /// Zero-copy paths where the backend has them (AF_XDP); false forces
    /// copies.
    pub enable_zero_copy: bool,
    /// The goodput this server is sized for, in Gbit/s (absent: the
    /// defaults of each key).
    pub target_throughput_gbps: Option<f64>,
    /// GSO/GRO, eBPF steering and AES instructions; false turns them off.
    pub enable_hardware_acceleration: bool,
}

impl Default for StoqTransport {
    fn default() -> Self {
        let t = TransportSettings::default();
        Self {
            backend: BackendKind::Uring,
            uring_recv_ops: IoBatch::default().recv_ops,
            uring_send_ops: IoBatch::default().send_ops,
            congestion_control: t.congestion,
            gso: t.gso,
            socket_buffer_bytes: 16 << 20,
            stream_receive_window_bytes: t.stream_receive_window_bytes,
            connection_receive_window_bytes: t.receive_window_bytes,
            send_window_bytes: t.send_window_bytes,
            streams_bidi_max: t.streams_bidi_max,
            idle_timeout_ms: t.idle_timeout.as_millis() as u64,
            initial_mtu: t.initial_mtu,
            max_udp_payload_bytes: t.max_udp_payload,
            zero_rtt: true,
            connections_per_worker_max: 200_000,
            handshake_rate_retry_per_s: 50_000,
            zero_copy: ZeroCopy::Auto,
            xdp_frames: 4096,
            enable_zero_copy: true,
            target_throughput_gbps: None,
            enable_hardware_acceleration: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dataplane {
    /// Worker threads; 0 = one per available core.
    pub workers: Spanned<usize>,
    /// The core each worker is pinned to (one entry per worker); empty = unpinned.
    pub worker_cores: Spanned<Vec<usize>>,
    /// The control-plane thread's core; absent = unpinned.
    pub control_plane_core: Option<Spanned<usize>>,
    pub handoff_queue_len: usize,
    pub drain_timeout_ms: u64,
    /// eBPF reuseport steering: auto | on | off.
    pub steering: SteeringMode,
    /// Attach the XDP front door to this interface (absent: none).
    pub xdp_interface: Option<String>,
    pub xdp_mode: XdpAttachMode,
    /// The NIC queue of each worker for `backend = "xdp"`; empty = worker i
    /// takes queue i.
    pub xdp_queues: Spanned<Vec<u32>>,
    /// IPv6 prefixes whose datagrams to our port are dropped at XDP.
    pub blocklist: Spanned<Vec<String>>,
}

impl Default for Dataplane {
    fn default() -> Self {
        Self {
            workers: Spanned::new(0..0, 0),
            worker_cores: Spanned::new(0..0, Vec::new()),
            control_plane_core: None,
            handoff_queue_len: 8192,
            drain_timeout_ms: 3000,
            steering: SteeringMode::Auto,
            xdp_interface: None,
            xdp_mode: XdpAttachMode::Native,
            xdp_queues: Spanned::new(0..0, Vec::new()),
            blocklist: Spanned::new(0..0, Vec::new()),
        }
    }
}

/// Admission of `stoq/1` connections (docs/ADMISSION.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypermeshAssets {
    /// `"mandatory"` (all four proofs), a comma-separated subset of
    /// `work,time,stake,space` (development), or `"off"`.
    pub consensus_mode: String,
    /// Time from the handshake to a valid bundle.
    pub admission_deadline_ms: u64,
    /// Least stake an identity must hold.
    pub stake_min: u64,
    /// Development: registering a plot tops the identity up to this stake
    /// (0: never; the operator grants stake).
    pub development_stake: u64,
    /// Plot size: 2^plot_k leaves.
    pub plot_k: u8,
    /// Space challenges per connection.
    pub challenges: u8,
    /// Oldest beacon tick a bundle may name, in seconds.
    pub beacon_window_s: u64,
    /// Work difficulty (leading zero bits) when idle, and its ceiling.
    pub difficulty_base: u8,
    pub difficulty_max: u8,
    /// Handshake attempts per second above which the difficulty rises.
    pub flood_rate_per_s: u32,
    /// Seconds below half the flood rate before the difficulty steps down.
    pub difficulty_decay_s: u64,
    /// Failures from one prefix within the window that block it.
    pub isolation_threshold: u32,
    /// Failures of one identity within the window that suspend it.
    pub isolation_identity_threshold: u32,
    pub isolation_window_s: u64,
    /// How long a blocked prefix or suspended identity stays so.
    pub isolation_ttl_s: u64,
    /// Length of the IPv6 prefix blocked around a failing address.
    pub isolation_ipv6_prefix_len: u8,
    /// Prefixes that are scored but never blocked (the operator's own
    /// networks). Loopback and the server's own bind address are always
    /// exempt.
    pub isolation_exempt: Vec<String>,
    /// VM execution: WebAssembly modules deployed as storage assets, run
    /// on their own threads (needs `nat_addressing`).
    pub enable_vm_execution: bool,
    /// VM threads (each runs one call at a time).
    pub vm_threads: usize,
    /// Cores to pin the VM threads to, in turn (empty: not pinned).
    pub vm_cores: Vec<usize>,
    /// The fuel each VM call of an identity may be given, unless the
    /// operator set it otherwise (`quota set --fuel`).
    pub vm_fuel_quota: u64,
    /// The largest memory a VM may grow to, MiB.
    pub vm_memory_mib_max: u32,
    /// How long one VM call may run, wall clock.
    pub vm_deadline_ms: u64,
    /// Asset addressing: memory assets at addresses of this node's /64
    /// locator, reached with the `stoq/1` asset requests.
    pub nat_addressing: bool,
    /// This node's /64 locator, e.g. `"fd71:7e57:0:1::/64"`; default: the
    /// ULA /48 derived from `dns_apex` (RFC 4193: `fd`, then 40 bits of
    /// SHA-256 of the apex) with subnet 0.
    pub asset_prefix: Option<Spanned<String>>,
    /// Memory an identity may hold on this node, in MiB.
    pub memory_quota_mib: u64,
    /// Memory all identities together may hold on this node, in MiB.
    pub memory_node_max_mib: u64,
    /// How long an identity's memory assets outlive its last connection.
    pub asset_lease_grace_s: u64,
    /// This node's number among the cluster's members (0 to 4095, each
    /// member its own): part of every identifier it hands out, and the
    /// default locator's subnet. A single node's default is 0; a cluster
    /// member serves assets only with one set.
    pub node_number: Option<u16>,
    /// Durable storage an identity may hold on this node, in MiB.
    pub storage_quota_mib: u64,
    /// Storage all identities together may hold on this node, in MiB.
    pub storage_node_max_mib: u64,
}

impl Default for HypermeshAssets {
    fn default() -> Self {
        Self {
            consensus_mode: "mandatory".into(),
            admission_deadline_ms: controlplane::consensus::DEADLINE_MS_DEFAULT,
            stake_min: 1,
            development_stake: 0,
            plot_k: 18,
            challenges: controlplane::consensus::space::CHALLENGES_DEFAULT,
            beacon_window_s: controlplane::consensus::beacon::WINDOW_S_DEFAULT,
            difficulty_base: 8,
            difficulty_max: 24,
            flood_rate_per_s: 1_000,
            difficulty_decay_s: 10,
            isolation_threshold: 8,
            isolation_identity_threshold: 8,
            isolation_window_s: 10,
            isolation_ttl_s: 300,
            isolation_ipv6_prefix_len: 64,
            isolation_exempt: Vec::new(),
            enable_vm_execution: true,
            vm_threads: 1,
            vm_cores: Vec::new(),
            vm_fuel_quota: controlplane::vm::FUEL_QUOTA_DEFAULT,
            vm_memory_mib_max: 64,
            vm_deadline_ms: 1_000,
            nat_addressing: true,
            asset_prefix: None,
            memory_quota_mib: 64,
            memory_node_max_mib: 4096,
            asset_lease_grace_s: dataplane::assets::memory::LEASE_GRACE.as_secs(),
            node_number: None,
            storage_quota_mib: 1024,
            storage_node_max_mib: 65_536,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustchainAuthority {
    /// Names (DNS or IP) the server certificate carries.
    pub server_names: Vec<String>,
    /// The apex of the zone answered over DNS-over-QUIC.
    pub dns_apex: String,
    /// The server's own name in that zone (relative to the apex).
    pub dns_name: String,
    /// IPv6 addresses published for that name (default: the bind address).
    pub dns_addresses: Vec<std::net::Ipv6Addr>,
    /// Lifetime of the certificates the CA issues.
    pub certificate_lifetime_hours: u32,
    /// The server's own certificate is renewed this often (with
    /// overlapping validity); must be shorter than the lifetime.
    pub certificate_rotation_hours: f64,
    /// `doq` connections need no client certificate (they can only query).
    pub public_dns: bool,
    /// Serve `perf` (benchmarks) to clients without a certificate.
    pub perf_without_client_certificate: bool,
    /// Key algorithm of the root and intermediate, chosen on first start
    /// (later starts keep the keys they find).
    pub ca_algorithm: SigningAlgorithm,
    /// Key algorithm of the CT log's signing key (first start, likewise).
    pub log_algorithm: SigningAlgorithm,
    /// UDP port of the legacy DNS gateway (`--enable-legacy-gateway`).
    pub legacy_dns_port: u16,
    /// DNS-over-QUIC questions for names outside the zone: `refuse` (the
    /// default) or `system-resolver` (phase0 only: asked of the host's
    /// resolvers and answered, IPv6 only).
    pub outside_zone: OutsideZone,
    /// The resolvers `system-resolver` asks, as `"[ADDR]:PORT"` or `"ADDR"`
    /// (port 53), at most 3; empty: the nameservers of /etc/resolv.conf.
    pub upstream_resolvers: Vec<String>,
    /// Phase0 only: a PEM certificate chain (leaf first) another CA issued
    /// for public names, presented to clients that ask for those names.
    pub import_certificate: Option<PathBuf>,
    /// The PEM private key of `import_certificate`.
    pub import_key: Option<PathBuf>,
    /// `embedded` (the server's CA issues its certificate) or `external`
    /// (phase0: `import_certificate` is the server's certificate for every
    /// client).
    pub ca_mode: Provided,
    /// `embedded` (names outside the zone are refused) or `external`
    /// (phase0: they are asked of the system's resolvers).
    pub dns_mode: Provided,
}

/// Who provides a service: the server itself or the world around it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provided {
    #[default]
    Embedded,
    External,
}

/// What the DNS does with names outside its zone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutsideZone {
    #[default]
    Refuse,
    SystemResolver,
}

/// `ecdsa-p256` (the default) or `ed25519`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SigningAlgorithm {
    EcdsaP256,
    Ed25519,
}

impl Default for TrustchainAuthority {
    fn default() -> Self {
        Self {
            server_names: vec!["localhost".into()],
            dns_apex: "internet2.test.".into(),
            dns_name: "node1".into(),
            dns_addresses: Vec::new(),
            certificate_lifetime_hours: 24,
            certificate_rotation_hours: 12.0,
            public_dns: true,
            perf_without_client_certificate: false,
            ca_algorithm: SigningAlgorithm::EcdsaP256,
            log_algorithm: SigningAlgorithm::EcdsaP256,
            legacy_dns_port: 53,
            outside_zone: OutsideZone::Refuse,
            upstream_resolvers: Vec::new(),
            import_certificate: None,
            import_key: None,
            ca_mode: Provided::Embedded,
            dns_mode: Provided::Embedded,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Where keys and state live; default: the user's data directory.
    pub data_dir: Option<PathBuf>,
}

/// A configuration error, located.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// What the server publishes about itself in its DNS zone.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub apex: String,
    pub name: String,
    pub addresses: Vec<std::net::Ipv6Addr>,
}

impl DnsSettings {
    /// The server's own fully qualified name, without the trailing dot
    /// (`node1.internet2.test`), as a certificate carries it.
    pub fn fqdn(&self) -> String {
        if self.name.ends_with('.') {
            self.name.trim_end_matches('.').to_owned()
        } else {
            format!("{}.{}", self.name, self.apex.trim_end_matches('.'))
        }
    }
}

/// The validated result, ready to start.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub settings: ServerSettings,
    pub control_plane_core: Option<usize>,
    pub drain: Duration,
    pub dns: DnsSettings,
    pub server_names: Vec<String>,
    pub data_dir: Option<PathBuf>,
    pub zero_rtt: bool,
    pub xdp: Option<(String, XdpAttachMode)>,
    pub blocklist: BTreeSet<Ipv6Prefix>,
    pub certificate_lifetime: Duration,
    pub certificate_rotation: Duration,
    pub ca_algorithm: SigningAlgorithm,
    pub log_algorithm: SigningAlgorithm,
    pub legacy_dns_port: u16,
    /// Names outside the zone go to these resolvers (None: REFUSED; empty:
    /// those of /etc/resolv.conf).
    pub outside_zone: Option<Vec<std::net::SocketAddr>>,
    /// The imported certificate chain and key files (phase0's migration).
    pub import: Option<(PathBuf, PathBuf)>,
    /// `ca_mode = "external"`: the imported certificate is the server's
    /// for every client.
    pub ca_external: bool,
    pub admission: crate::admission::AdmissionSettings,
    /// Asset addressing (`nat_addressing`); None when off.
    pub assets: Option<AssetSettings>,
    /// What `target_throughput_gbps` chose (None: not set).
    pub throughput: Option<ThroughputPlan>,
    /// What the file's keys switched on or off, for the start-up log.
    pub choices: Vec<String>,
    /// Keys that ask for more than this machine or build gives: logged as
    /// warnings at start, never refused.
    pub warnings: Vec<String>,
}

impl Resolved {
    /// What differs from `running` among the settings that take effect
    /// only at start, as the keys an operator edits. A reload (SIGHUP)
    /// applies the blocklist and the imported certificate (with `ca_mode`)
    /// and names these, which the running server keeps until a restart.
    pub fn changed_at_restart(&self, running: &Resolved) -> Vec<&'static str> {
        use std::fmt::Debug;
        let differ = |a: &dyn Debug, b: &dyn Debug| format!("{a:?}") != format!("{b:?}");
        let pairs: [(&'static str, &dyn Debug, &dyn Debug); 10] = [
            (
                "[internet2] and [stoq_transport] (address, port, workers, backend, \
                 windows, congestion control, zero copy, hardware acceleration)",
                &self.settings,
                &running.settings,
            ),
            (
                "[dns] and dns_mode",
                &(&self.dns, &self.outside_zone, self.legacy_dns_port),
                &(&running.dns, &running.outside_zone, running.legacy_dns_port),
            ),
            ("server names", &self.server_names, &running.server_names),
            (
                "certificate lifetime, rotation and algorithms",
                &(
                    self.certificate_lifetime,
                    self.certificate_rotation,
                    self.ca_algorithm,
                    self.log_algorithm,
                ),
                &(
                    running.certificate_lifetime,
                    running.certificate_rotation,
                    running.ca_algorithm,
                    running.log_algorithm,
                ),
            ),
            (
                "admission ([hypermesh_assets])",
                &self.admission,
                &running.admission,
            ),
            (
                "asset addressing ([hypermesh_assets] nat_addressing, asset_prefix, quota, lease)",
                &self.assets,
                &running.assets,
            ),
            ("data_dir", &self.data_dir, &running.data_dir),
            ("XDP front door", &self.xdp, &running.xdp),
            ("zero_rtt", &self.zero_rtt, &running.zero_rtt),
            (
                "control-plane core and drain",
                &(self.control_plane_core, self.drain),
                &(running.control_plane_core, running.drain),
            ),
        ];
        pairs
            .into_iter()
            .filter(|(_, a, b)| differ(*a, *b))
            .map(|(name, _, _)| name)
            .collect()
    }
}

/// Asset addressing, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetSettings {
    pub node: dataplane::assets::address::NodeNumber,
    /// Whether the file set `node_number` (a cluster member needs it).
    pub node_set: bool,
    pub locator: dataplane::assets::address::Locator,
    /// Memory an identity may hold, unless the operator set it otherwise.
    pub quota_bytes: u64,
    /// Memory all identities together may hold.
    pub node_bytes: u64,
    pub lease_grace: Duration,
    /// Storage an identity may hold, unless the operator set it otherwise.
    pub storage_quota_bytes: u64,
    /// Storage all identities together may hold.
    pub storage_node_bytes: u64,
    /// The fuel each VM call may be given, unless the operator set it
    /// otherwise.
    pub fuel_quota: u64,
    /// The VM threads (None: VM execution is off).
    pub vm: Option<vm::VmConfig>,
}

impl AssetSettings {
    /// The limits the control plane checks storage (and reports memory)
    /// quotas against.
    pub fn limits(&self) -> controlplane::assets::StorageLimits {
        controlplane::assets::StorageLimits {
            default_quota: self.storage_quota_bytes,
            default_memory_quota: self.quota_bytes,
            node_max: self.storage_node_bytes,
            default_fuel_quota: self.fuel_quota,
        }
    }
}

/// A ULA /48 of `apex` (RFC 4193 §3.2: `fd` and a 40-bit global ID), for a
/// node's default asset locator: stable for a deployment, and unlikely to
/// meet another's.
fn ula48(apex: &str) -> std::net::Ipv6Addr {
    let digest = ring::digest::digest(&ring::digest::SHA256, apex.as_bytes());
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&digest.as_ref()[..5]);
    std::net::Ipv6Addr::from(octets)
}

/// How `target_throughput_gbps` sized the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputPlan {
    pub target_gbps: f64,
    /// One core's cipher rate measured at start, and the goodput per
    /// worker core estimated from it (`dataplane::capacity`).
    pub per_core: PerCore,
    /// Workers needed for the target at that rate.
    pub workers_needed: usize,
    /// What the chosen workers reach at that rate.
    pub reachable_gbps: f64,
}

/// The round trip the windows are sized for when a target is set: a
/// connection reaches `window / RTT`.
const WINDOW_RTT: Duration = Duration::from_millis(50);
/// How long a worker may stall before its socket's receive buffer
/// overflows, when a target sizes the buffers.
const SOCKET_BUFFER_STALL: Duration = Duration::from_millis(10);

/// Parse and validate `text` read from `file`. `cores` is the number of
/// CPUs this process may run on (for pinning checks). With
/// `target_throughput_gbps`, one core's cipher rate is measured (about
/// 15 ms) to size the server.
pub fn parse(file: &str, text: &str, cores: usize) -> Result<Resolved, ConfigError> {
    parse_on(file, text, cores, &dataplane::capacity::measured)
}

/// [`parse`] with the per-core measurement given (`aes_first` says which
/// suite it seals with).
pub fn parse_on(
    file: &str,
    text: &str,
    cores: usize,
    per_core: &dyn Fn(bool) -> PerCore,
) -> Result<Resolved, ConfigError> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| locate(file, text, e.span(), e.message()))?;
    let given = Given(table);
    if given.has("internet2", "bind") && given.has("internet2", "bind_address") {
        return Err(contradiction(
            file,
            text,
            ("internet2", "bind"),
            "internet2.bind_address (bind is its older name)",
        ));
    }
    let config: Config =
        toml::from_str(text).map_err(|e| locate(file, text, e.span(), e.message()))?;
    config.resolve(file, text, cores, &given, per_core)
}

/// The keys the file sets, so a default can follow another key while a
/// value the operator wrote wins (or contradicts it, an error).
struct Given(toml::Table);

impl Given {
    fn has(&self, section: &str, key: &str) -> bool {
        self.0
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(key))
    }
}

impl Config {
    fn resolve(
        mut self,
        file: &str,
        text: &str,
        cores: usize,
        given: &Given,
        per_core: &dyn Fn(bool) -> PerCore,
    ) -> Result<Resolved, ConfigError> {
        let mut choices = Vec::new();
        let mut warnings = Vec::new();
        let aes_first = self.hardware(file, text, given, &mut choices, &mut warnings)?;
        self.zero_copy(file, text, given, &mut choices, &mut warnings)?;
        self.features(&mut warnings);
        let congestion = self.stoq_transport.congestion_control;
        choices.push(format!(
            "congestion control {}{}",
            lowercase(congestion),
            match congestion {
                CongestionControl::Bbr2 | CongestionControl::Bbr3 => " (BBRv3)",
                CongestionControl::Bbr => " (quinn-proto's BBRv1)",
                CongestionControl::Cubic | CongestionControl::Newreno => "",
            }
        ));
        let err = |span: Range<usize>, message: String| locate(file, text, Some(span), &message);
        let bind_span = self.internet2.bind_address.span();
        let bind: std::net::IpAddr =
            self.internet2.bind_address.get_ref().parse().map_err(|_| {
                err(
                    bind_span.clone(),
                    format!(
                        "`{}` is not an IP address; use an IPv6 address such as \"::1\" or \"::\"",
                        self.internet2.bind_address.get_ref()
                    ),
                )
            })?;
        let bind: Ipv6Addr = match bind {
            std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => a,
            other => {
                return Err(err(
                    bind_span,
                    format!(
                        "`{other}` is IPv4; internet2-server serves IPv6 only (use \"::1\" or \"::\")"
                    ),
                ));
            }
        };
        let t = &self.stoq_transport;
        let target = match t.target_throughput_gbps {
            Some(gbps) if !(gbps > 0.0 && gbps <= 10_000.0) => {
                return Err(key_error(
                    file,
                    text,
                    "stoq_transport",
                    "target_throughput_gbps",
                    "must be above 0 and at most 10000",
                ));
            }
            Some(gbps) => Some((gbps, per_core(aes_first))),
            None => None,
        };
        let d = &self.dataplane;
        let workers = match *d.workers.get_ref() {
            0 => match target {
                Some((gbps, measured)) => workers_for(gbps, measured).min(cores.max(1)),
                None => cores.max(1),
            },
            n if n > dataplane::cid::WORKERS_MAX => {
                return Err(err(
                    d.workers.span(),
                    format!(
                        "{n} workers; at most {} are addressable",
                        dataplane::cid::WORKERS_MAX
                    ),
                ));
            }
            n => n,
        };
        let worker_cores = d.worker_cores.get_ref();
        if !worker_cores.is_empty() && worker_cores.len() != workers {
            return Err(err(
                d.worker_cores.span(),
                format!(
                    "lists {} cores for {workers} workers; give one core per worker or none",
                    worker_cores.len()
                ),
            ));
        }
        if let Some(core) = worker_cores.iter().find(|&&c| c >= cores) {
            return Err(err(
                d.worker_cores.span(),
                format!(
                    "core {core} does not exist; this machine has cores 0..={}",
                    cores - 1
                ),
            ));
        }
        if let Some(core) = &d.control_plane_core
            && *core.get_ref() >= cores
        {
            return Err(err(
                core.span(),
                format!(
                    "core {} does not exist; this machine has cores 0..={}",
                    core.get_ref(),
                    cores - 1
                ),
            ));
        }
        let throughput = target.map(|(gbps, measured)| {
            let plan = ThroughputPlan {
                target_gbps: gbps,
                per_core: measured,
                workers_needed: workers_for(gbps, measured),
                reachable_gbps: workers.min(cores.max(1)) as f64 * measured.goodput_gbps,
            };
            size_for(
                &mut self.stoq_transport,
                &plan,
                workers,
                given,
                &mut choices,
            );
            if plan.reachable_gbps < gbps {
                warnings.push(format!(
                    "target_throughput_gbps = {gbps}: this machine reaches about {:.1} Gbit/s \
                     ({} workers on {cores} cores at about {:.1} Gbit/s per core; the target \
                     needs {} cores at that rate)",
                    plan.reachable_gbps,
                    workers,
                    measured.goodput_gbps,
                    (gbps / measured.goodput_gbps.max(0.001)).ceil()
                ));
            }
            plan
        });
        let t = &self.stoq_transport;
        let checks: [(&str, bool, &str); 9] = [
            (
                "uring_recv_ops",
                (1..=dataplane::io::uring::RECV_OPS_MAX).contains(&t.uring_recv_ops),
                "must be within 1..=1024",
            ),
            (
                "uring_send_ops",
                (1..=dataplane::io::uring::SEND_OPS_MAX).contains(&t.uring_send_ops),
                "must be within 1..=4096",
            ),
            (
                "initial_mtu",
                (1200..=9000).contains(&t.initial_mtu),
                "must be within 1200..=9000 (RFC 9000 §14)",
            ),
            (
                "max_udp_payload_bytes",
                (1200..=dataplane::io::MAX_UDP_PAYLOAD_RECEIVED).contains(&t.max_udp_payload_bytes),
                "must be within 1200..=65527 (RFC 9000 §18.2)",
            ),
            (
                "streams_bidi_max",
                t.streams_bidi_max >= 1,
                "must be at least 1",
            ),
            (
                "socket_buffer_bytes",
                t.socket_buffer_bytes >= 64 * 1024,
                "must be at least 65536",
            ),
            (
                "stream_receive_window_bytes",
                t.stream_receive_window_bytes >= 16 * 1024,
                "must be at least 16384",
            ),
            (
                "idle_timeout_ms",
                t.idle_timeout_ms >= 100,
                "must be at least 100",
            ),
            (
                "connections_per_worker_max",
                t.connections_per_worker_max >= 1,
                "must be at least 1",
            ),
        ];
        if let Some((key, _, message)) = checks.iter().find(|(_, ok, _)| !ok) {
            return Err(key_error(file, text, "stoq_transport", key, message));
        }
        let blocklist = d
            .blocklist
            .get_ref()
            .iter()
            .map(|p| p.parse::<Ipv6Prefix>())
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|message| err(d.blocklist.span(), message))?;
        if blocklist.len() > dataplane::front_door::BLOCKLIST_MAX {
            let message = format!("at most {} prefixes", dataplane::front_door::BLOCKLIST_MAX);
            return Err(err(d.blocklist.span(), message));
        }
        if d.xdp_interface
            .as_deref()
            .is_some_and(|i| i.is_empty() || i.len() > 15)
        {
            return Err(key_error(
                file,
                text,
                "dataplane",
                "xdp_interface",
                "must be an interface name of 1..=15 bytes",
            ));
        }
        let xdp = self.xdp_plan(file, text, workers)?;
        let admission = self.admission(file, text, bind)?;
        let assets = self.assets(file, text, cores, &mut choices)?;
        let a = &mut self.trustchain_authority;
        let lifetime_given = given.has("trustchain_authority", "certificate_lifetime_hours");
        if !lifetime_given && a.certificate_rotation_hours.is_finite() {
            // The lifetime follows the rotation period: twice it (a full
            // period of overlap), at least the default day.
            let doubled = (a.certificate_rotation_hours * 2.0)
                .ceil()
                .min(f64::from(24 * 90));
            a.certificate_lifetime_hours = a.certificate_lifetime_hours.max(doubled as u32);
        }
        let a = &self.trustchain_authority;
        if !(1..=24 * 90).contains(&a.certificate_lifetime_hours) {
            return Err(key_error(
                file,
                text,
                "trustchain_authority",
                "certificate_lifetime_hours",
                "must be within 1..=2160 (90 days)",
            ));
        }
        // At least a second: a rotation period of about zero would issue
        // certificates (and fill the CT log) without pause.
        if !(a.certificate_rotation_hours >= 1.0 / 3600.0
            && a.certificate_rotation_hours < f64::from(a.certificate_lifetime_hours))
        {
            return Err(key_error(
                file,
                text,
                "trustchain_authority",
                "certificate_rotation_hours",
                &if lifetime_given {
                    format!(
                        "must be at least a second (1/3600) and below certificate_lifetime_hours ({}) so that \
                         validity overlaps: lower it, or raise certificate_lifetime_hours \
                         (twice the rotation period gives a full period of overlap)",
                        a.certificate_lifetime_hours
                    )
                } else {
                    "must be at least a second (1/3600) and below 2160 (the longest certificate lifetime, 90 days)"
                        .to_owned()
                },
            ));
        }
        let certificate_lifetime =
            Duration::from_secs(u64::from(a.certificate_lifetime_hours) * 3600);
        let certificate_rotation = Duration::from_secs_f64(a.certificate_rotation_hours * 3600.0);
        if let Err(e) = dataplane::protocols::doq::validate_names(&a.dns_apex, &a.dns_name) {
            let key = if dataplane::protocols::doq::validate_names(&a.dns_apex, "x").is_err() {
                "dns_apex"
            } else {
                "dns_name"
            };
            return Err(key_error(
                file,
                text,
                "trustchain_authority",
                key,
                &e.to_string(),
            ));
        }
        let outside_zone_given = given.has("trustchain_authority", "outside_zone");
        let outside_zone = match (a.dns_mode, a.outside_zone) {
            (Provided::External, OutsideZone::Refuse) if outside_zone_given => {
                return Err(contradiction(
                    file,
                    text,
                    ("trustchain_authority", "outside_zone"),
                    "trustchain_authority.dns_mode = \"external\"",
                ));
            }
            (Provided::External, _) => OutsideZone::SystemResolver,
            (Provided::Embedded, OutsideZone::SystemResolver)
                if given.has("trustchain_authority", "dns_mode") =>
            {
                return Err(contradiction(
                    file,
                    text,
                    ("trustchain_authority", "outside_zone"),
                    "trustchain_authority.dns_mode = \"embedded\"",
                ));
            }
            (Provided::Embedded, mode) => mode,
        };
        let outside_zone = match outside_zone {
            OutsideZone::Refuse if !a.upstream_resolvers.is_empty() => {
                return Err(key_error(
                    file,
                    text,
                    "trustchain_authority",
                    "upstream_resolvers",
                    "is used only with outside_zone = \"system-resolver\"",
                ));
            }
            OutsideZone::Refuse => None,
            OutsideZone::SystemResolver => Some(
                upstream_resolvers(&a.upstream_resolvers).map_err(|message| {
                    key_error(
                        file,
                        text,
                        "trustchain_authority",
                        "upstream_resolvers",
                        &message,
                    )
                })?,
            ),
        };
        let import = match (&a.import_certificate, &a.import_key) {
            (Some(certificate), Some(key)) => Some((certificate.clone(), key.clone())),
            (None, None) if a.ca_mode == Provided::External => {
                return Err(key_error(
                    file,
                    text,
                    "trustchain_authority",
                    "ca_mode",
                    "\"external\" needs import_certificate and import_key: the chain (leaf first) and key another CA issued for this server",
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(key_error(
                    file,
                    text,
                    "trustchain_authority",
                    "import_certificate",
                    "needs import_key (the certificate's private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(key_error(
                    file,
                    text,
                    "trustchain_authority",
                    "import_key",
                    "needs import_certificate (the certificate chain it belongs to)",
                ));
            }
        };
        if d.handoff_queue_len == 0 {
            return Err(key_error(
                file,
                text,
                "dataplane",
                "handoff_queue_len",
                "must be at least 1",
            ));
        }
        let transport = TransportSettings {
            congestion: t.congestion_control,
            stream_receive_window_bytes: t.stream_receive_window_bytes,
            receive_window_bytes: t.connection_receive_window_bytes,
            send_window_bytes: t.send_window_bytes,
            streams_bidi_max: t.streams_bidi_max,
            idle_timeout: Duration::from_millis(t.idle_timeout_ms),
            keep_alive: None,
            initial_mtu: t.initial_mtu,
            max_udp_payload: t.max_udp_payload_bytes,
            gso: t.gso,
        };
        let settings = ServerSettings {
            listen: SocketAddrV6::new(bind, self.internet2.port, 0, 0),
            workers,
            worker_cores: (!worker_cores.is_empty()).then(|| worker_cores.clone()),
            backend: t.backend,
            zone: None,
            steering: d.steering,
            io_batch: IoBatch {
                recv_ops: t.uring_recv_ops,
                send_ops: t.uring_send_ops,
            },
            socket_buffer_bytes: t.socket_buffer_bytes,
            handoff_queue_len: d.handoff_queue_len,
            connections_per_worker_max: t.connections_per_worker_max,
            handshake_rate_retry_per_s: t.handshake_rate_retry_per_s,
            transport,
            aes_first,
            xdp,
            front_door: None,
            control: None,
            trust: None,
            perf_without_certificate: self.trustchain_authority.perf_without_client_certificate,
            dns_without_certificate: self.trustchain_authority.public_dns,
            blocklist: None,
            admission: None,
            assets: None,
        };
        Ok(Resolved {
            settings,
            control_plane_core: d.control_plane_core.as_ref().map(|c| *c.get_ref()),
            drain: Duration::from_millis(d.drain_timeout_ms),
            dns: DnsSettings {
                apex: self.trustchain_authority.dns_apex,
                name: self.trustchain_authority.dns_name,
                addresses: if self.trustchain_authority.dns_addresses.is_empty()
                    && !bind.is_unspecified()
                {
                    vec![bind]
                } else {
                    self.trustchain_authority.dns_addresses
                },
            },
            server_names: self.trustchain_authority.server_names,
            data_dir: self.storage.data_dir,
            zero_rtt: t.zero_rtt,
            xdp: d.xdp_interface.clone().map(|i| (i, d.xdp_mode)),
            blocklist,
            certificate_lifetime,
            certificate_rotation,
            ca_algorithm: self.trustchain_authority.ca_algorithm,
            log_algorithm: self.trustchain_authority.log_algorithm,
            legacy_dns_port: self.trustchain_authority.legacy_dns_port,
            outside_zone,
            import,
            ca_external: self.trustchain_authority.ca_mode == Provided::External,
            admission,
            assets,
            throughput,
            choices,
            warnings,
        })
    }

    /// `nat_addressing` and the memory assets' keys.
    fn assets(
        &self,
        file: &str,
        text: &str,
        cores: usize,
        choices: &mut Vec<String>,
    ) -> Result<Option<AssetSettings>, ConfigError> {
        use dataplane::assets::address::{Locator, NodeNumber};
        let h = &self.hypermesh_assets;
        if !h.nat_addressing {
            choices.push("asset addressing off: asset requests are refused".into());
            return Ok(None);
        }
        let node = NodeNumber::new(h.node_number.unwrap_or(0)).map_err(|e| {
            key_error(
                file,
                text,
                "hypermesh_assets",
                "node_number",
                &e.to_string(),
            )
        })?;
        let locator = match &h.asset_prefix {
            Some(prefix) => {
                let bad = || {
                    locate(
                        file,
                        text,
                        Some(prefix.span()),
                        &format!(
                            "`{}` is not a /64 prefix; write one like \"fd71:7e57:0:1::/64\"",
                            prefix.get_ref()
                        ),
                    )
                };
                let (address, len) = prefix.get_ref().split_once('/').ok_or_else(bad)?;
                let address: std::net::Ipv6Addr = address.parse().map_err(|_| bad())?;
                if len != "64" || u128::from(address) & u128::from(u64::MAX) != 0 {
                    return Err(bad());
                }
                Locator::of_prefix(address)
            }
            None => Locator::in_ula(ula48(&self.trustchain_authority.dns_apex), node),
        };
        let mib = |value: u64, key: &str| {
            value
                .checked_mul(1 << 20)
                .ok_or_else(|| key_error(file, text, "hypermesh_assets", key, "is too large"))
        };
        let quota_bytes = mib(h.memory_quota_mib, "memory_quota_mib")?;
        let node_bytes = mib(h.memory_node_max_mib, "memory_node_max_mib")?;
        let storage_quota_bytes = mib(h.storage_quota_mib, "storage_quota_mib")?;
        let storage_node_bytes = mib(h.storage_node_max_mib, "storage_node_max_mib")?;
        if !(1..=86_400).contains(&h.asset_lease_grace_s) {
            return Err(key_error(
                file,
                text,
                "hypermesh_assets",
                "asset_lease_grace_s",
                "must be within 1..=86400 seconds",
            ));
        }
        let vm = self.vm(file, text, cores)?;
        if let Some(vm) = &vm {
            choices.push(format!(
                "VM execution on: {} thread(s){}, at most {} MiB and {} ms a call, {} fuel a call per identity",
                vm.threads,
                if vm.cores.is_empty() {
                    String::new()
                } else {
                    format!(" on cores {:?}", vm.cores)
                },
                vm.memory_mib_max,
                vm.deadline.as_millis(),
                h.vm_fuel_quota,
            ));
        } else {
            choices.push("VM execution off: VM requests are refused".into());
        }
        let settings = AssetSettings {
            node,
            node_set: h.node_number.is_some(),
            locator,
            quota_bytes,
            node_bytes,
            lease_grace: Duration::from_secs(h.asset_lease_grace_s),
            storage_quota_bytes,
            storage_node_bytes,
            fuel_quota: h.vm_fuel_quota,
            vm,
        };
        choices.push(format!(
            "asset addressing on: node {}, assets at {}/64; memory {} MiB per identity, {} MiB in all, released {} s after its last connection; storage {} MiB per identity, {} MiB in all",
            node.get(),
            std::net::Ipv6Addr::from(u128::from(locator.0) << 64),
            h.memory_quota_mib,
            h.memory_node_max_mib,
            h.asset_lease_grace_s,
            h.storage_quota_mib,
            h.storage_node_max_mib,
        ));
        Ok(Some(settings))
    }

    /// The VM threads' settings, checked (None: VM execution is off).
    fn vm(
        &self,
        file: &str,
        text: &str,
        cores: usize,
    ) -> Result<Option<vm::VmConfig>, ConfigError> {
        let h = &self.hypermesh_assets;
        if !h.enable_vm_execution {
            return Ok(None);
        }
        let bad =
            |key: &str, message: &str| key_error(file, text, "hypermesh_assets", key, message);
        if !(1..=256).contains(&h.vm_threads) {
            return Err(bad("vm_threads", "must be within 1..=256"));
        }
        if let Some(core) = h.vm_cores.iter().find(|&&core| core >= cores) {
            return Err(bad(
                "vm_cores",
                &format!(
                    "core {core} does not exist; this machine has cores 0..={}",
                    cores - 1
                ),
            ));
        }
        if !(1..=controlplane::vm::MEMORY_MIB_MAX).contains(&h.vm_memory_mib_max) {
            return Err(bad(
                "vm_memory_mib_max",
                &format!("must be within 1..={}", controlplane::vm::MEMORY_MIB_MAX),
            ));
        }
        if !(1..=60_000).contains(&h.vm_deadline_ms) {
            return Err(bad("vm_deadline_ms", "must be within 1..=60000"));
        }
        if h.vm_fuel_quota == 0 {
            return Err(bad("vm_fuel_quota", "must be at least 1"));
        }
        Ok(Some(vm::VmConfig {
            threads: h.vm_threads,
            cores: h.vm_cores.clone(),
            memory_mib_max: h.vm_memory_mib_max,
            deadline: Duration::from_millis(h.vm_deadline_ms),
        }))
    }

    /// `[hypermesh_assets]`, checked.
    fn admission(
        &self,
        file: &str,
        text: &str,
        bind: std::net::Ipv6Addr,
    ) -> Result<crate::admission::AdmissionSettings, ConfigError> {
        use controlplane::consensus::{AdmissionMode, space::SpaceParams, work::Difficulty};
        let h = &self.hypermesh_assets;
        let bad =
            |key: &str, message: &str| key_error(file, text, "hypermesh_assets", key, message);
        let mode = match h.consensus_mode.trim() {
            "off" => AdmissionMode::parse("").expect("the empty subset parses"),
            other => AdmissionMode::parse(other).map_err(|e| bad("consensus_mode", &e))?,
        };
        if !(100..=60_000).contains(&h.admission_deadline_ms) {
            return Err(bad("admission_deadline_ms", "must be within 100..=60000"));
        }
        let space = SpaceParams::new(h.plot_k, h.challenges).ok_or_else(|| {
            bad(
                "plot_k",
                "plot_k must be within 1..=24 and challenges within 1..=16, and their answers must fit an 8 KiB bundle",
            )
        })?;
        let difficulty = |key: &str, bits: u8| {
            Difficulty::new(bits).ok_or_else(|| bad(key, "must be at most 32 bits"))
        };
        let base = difficulty("difficulty_base", h.difficulty_base)?;
        let max = difficulty("difficulty_max", h.difficulty_max)?;
        if base > max {
            return Err(bad("difficulty_base", "must not exceed difficulty_max"));
        }
        if h.beacon_window_s == 0 {
            return Err(bad("beacon_window_s", "must be at least 1"));
        }
        if mode.stake && h.stake_min == 0 {
            return Err(bad(
                "stake_min",
                "must be at least 1 when stake is required (0 admits every identity)",
            ));
        }
        if h.isolation_threshold == 0 || h.isolation_identity_threshold == 0 {
            return Err(bad("isolation_threshold", "thresholds must be at least 1"));
        }
        if h.isolation_window_s == 0 || h.isolation_ttl_s == 0 {
            return Err(bad(
                "isolation_ttl_s",
                "the window and the time to live must be at least 1 s",
            ));
        }
        let isolation = controlplane::consensus::isolation::IsolationConfig {
            threshold: h.isolation_threshold,
            identity_threshold: h.isolation_identity_threshold,
            window: Duration::from_secs(h.isolation_window_s),
            ttl: Duration::from_secs(h.isolation_ttl_s),
            ipv6_prefix_len: h.isolation_ipv6_prefix_len,
            exempt: isolation_exempt(&h.isolation_exempt, bind)
                .map_err(|e| bad("isolation_exempt", &e))?,
        };
        isolation
            .check()
            .map_err(|e| bad("isolation_ipv6_prefix_len", &e))?;
        let config = controlplane::consensus::state::AdmissionConfig {
            mode,
            window_s: h.beacon_window_s,
            stake_min: h.stake_min.max(1),
            space,
            difficulty: controlplane::consensus::work::DifficultyConfig {
                base,
                max,
                flood_rate_per_s: h.flood_rate_per_s.max(1),
                decay_every: Duration::from_secs(h.difficulty_decay_s.max(1)),
                ..Default::default()
            },
            development_stake: (h.development_stake > 0).then_some(h.development_stake),
        };
        Ok(crate::admission::AdmissionSettings {
            mode_name: crate::admission::mode_name(mode),
            config,
            isolation,
            deadline: Duration::from_millis(h.admission_deadline_ms),
        })
    }
}

/// Workers a target needs at one core's estimated goodput.
fn workers_for(target_gbps: f64, per_core: PerCore) -> usize {
    let per_core = per_core.goodput_gbps.max(0.001);
    ((target_gbps / per_core).ceil() as usize).clamp(1, dataplane::cid::WORKERS_MAX)
}

/// Sizes what the file leaves unset from the target: each worker's socket
/// buffer holds [`SOCKET_BUFFER_STALL`] of its share, and a connection's
/// windows (one connection runs on one worker) carry the smaller of the
/// target and one core over a [`WINDOW_RTT`] path, its streams a quarter of
/// that, as the defaults do.
fn size_for(
    t: &mut StoqTransport,
    plan: &ThroughputPlan,
    workers: usize,
    given: &Given,
    choices: &mut Vec<String>,
) {
    const MIB: f64 = 1024.0 * 1024.0;
    let bytes = |gbps: f64, time: Duration| gbps * 1e9 / 8.0 * time.as_secs_f64();
    let per_worker = plan.target_gbps / workers.max(1) as f64;
    if !given.has("stoq_transport", "socket_buffer_bytes") {
        t.socket_buffer_bytes =
            bytes(per_worker, SOCKET_BUFFER_STALL).clamp(4.0 * MIB, 256.0 * MIB) as usize;
    }
    let connection = plan.target_gbps.min(plan.per_core.goodput_gbps);
    let window = bytes(connection, WINDOW_RTT).clamp(MIB, 1024.0 * MIB) as u64;
    for (key, value) in [
        (
            "connection_receive_window_bytes",
            &mut t.connection_receive_window_bytes,
        ),
        ("send_window_bytes", &mut t.send_window_bytes),
    ] {
        if !given.has("stoq_transport", key) {
            *value = window;
        }
    }
    if !given.has("stoq_transport", "stream_receive_window_bytes") {
        t.stream_receive_window_bytes = window / 4;
    }
    choices.push(format!(
        "target_throughput_gbps = {}: {:.1} Gbit/s of goodput per worker core estimated \
         (the packet cipher sealed {:.1} Gbit/s on one core at start); {workers} workers, \
         socket buffers of {} bytes, connection windows of {} bytes (streams {}) \
         for a {} ms path (keys set in the file win)",
        plan.target_gbps,
        plan.per_core.goodput_gbps,
        plan.per_core.cipher_gbps,
        t.socket_buffer_bytes,
        t.connection_receive_window_bytes,
        t.stream_receive_window_bytes,
        WINDOW_RTT.as_millis()
    ));
}

impl Config {
    /// `enable_hardware_acceleration`: off turns GSO/GRO and eBPF steering
    /// off and puts ChaCha20 first; on, the CPU's AES instructions decide
    /// the suite. Returns whether AES-GCM goes first.
    fn hardware(
        &mut self,
        file: &str,
        text: &str,
        given: &Given,
        choices: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> Result<bool, ConfigError> {
        let aes = dataplane::capacity::AesHardware::detect();
        if self.stoq_transport.enable_hardware_acceleration {
            choices.push(format!(
                "hardware acceleration on: GSO/GRO {}, eBPF steering {}, AES instructions {}, vector AES {}",
                if self.stoq_transport.gso { "on" } else { "off (gso = false)" },
                lowercase(self.dataplane.steering),
                if aes.aes { "yes" } else { "no" },
                if aes.vaes { "yes" } else { "no" },
            ));
            if !aes.aes {
                warnings.push(
                    "this CPU has no AES instructions: ChaCha20-Poly1305 goes first for every client"
                        .into(),
                );
            }
            return Ok(aes.aes);
        }
        let off = "stoq_transport.enable_hardware_acceleration = false";
        let clash = |section, key| contradiction(file, text, (section, key), off);
        if given.has("stoq_transport", "gso") && self.stoq_transport.gso {
            return Err(clash("stoq_transport", "gso"));
        }
        if given.has("dataplane", "steering") && self.dataplane.steering == SteeringMode::On {
            return Err(clash("dataplane", "steering"));
        }
        self.stoq_transport.gso = false;
        self.dataplane.steering = SteeringMode::Off;
        choices.push(
            "hardware acceleration off: no GSO/GRO, no eBPF steering, ChaCha20-Poly1305 first for every client"
                .into(),
        );
        Ok(false)
    }

    /// `enable_zero_copy` against `zero_copy` (AF_XDP's own key).
    fn zero_copy(
        &mut self,
        file: &str,
        text: &str,
        given: &Given,
        choices: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let t = &mut self.stoq_transport;
        let clash = |other| contradiction(file, text, ("stoq_transport", "zero_copy"), other);
        let zero_copy_given = given.has("stoq_transport", "zero_copy");
        if zero_copy_given && t.zero_copy == ZeroCopy::On && t.backend != BackendKind::Xdp {
            let default = if given.has("stoq_transport", "backend") {
                ""
            } else {
                " (the default)"
            };
            return Err(key_error(
                file,
                text,
                "stoq_transport",
                "zero_copy",
                &format!(
                    "\"on\" needs backend \"xdp\", the only one with a zero-copy path; \
                     stoq_transport.backend = \"{}\"{default}",
                    lowercase(t.backend)
                ),
            ));
        }
        if !t.enable_zero_copy {
            if zero_copy_given && t.zero_copy == ZeroCopy::On {
                return Err(clash("stoq_transport.enable_zero_copy = false"));
            }
            t.zero_copy = ZeroCopy::Off;
        } else if given.has("stoq_transport", "enable_zero_copy")
            && zero_copy_given
            && t.zero_copy == ZeroCopy::Off
        {
            return Err(clash("stoq_transport.enable_zero_copy = true"));
        } else if given.has("stoq_transport", "enable_zero_copy") && t.backend != BackendKind::Xdp {
            warnings.push(format!(
                "enable_zero_copy = true: backend {} has no zero-copy path; datagrams are copied",
                lowercase(t.backend)
            ));
        }
        choices.push(match (t.backend, t.zero_copy) {
            (BackendKind::Xdp, ZeroCopy::Off) => "zero copy off: AF_XDP in copy mode".into(),
            (BackendKind::Xdp, mode) => format!(
                "zero copy {}: AF_XDP zero-copy where the driver has it",
                lowercase(mode)
            ),
            (backend, _) => format!(
                "zero copy: backend {} has no zero-copy path (the kernel copies each datagram once each way)",
                lowercase(backend)
            ),
        });
        Ok(())
    }

    /// Features this build does not have: a warning each, never a refusal,
    /// so the design document's file runs as written.
    fn features(&self, warnings: &mut Vec<String>) {
        let h = &self.hypermesh_assets;
        if h.enable_vm_execution && !h.nat_addressing {
            warnings.push(
                "hypermesh_assets.enable_vm_execution = true needs nat_addressing: a VM is a storage asset; VM requests are refused".into(),
            );
        }
    }

    /// The AF_XDP plan for `backend = "xdp"` (None for other backends).
    fn xdp_plan(
        &self,
        file: &str,
        text: &str,
        workers: usize,
    ) -> Result<Option<XdpPlan>, ConfigError> {
        let (t, d) = (&self.stoq_transport, &self.dataplane);
        if t.backend != BackendKind::Xdp {
            return Ok(None);
        }
        let Some(interface) = d.xdp_interface.clone() else {
            return Err(key_error(
                file,
                text,
                "stoq_transport",
                "backend",
                "\"xdp\" needs [dataplane] xdp_interface (the NIC whose queues the workers bind)",
            ));
        };
        let frame_payload = dataplane::worker::UDP_PAYLOAD_MAX as u16;
        for (key, value) in [
            ("max_udp_payload_bytes", t.max_udp_payload_bytes),
            ("initial_mtu", t.initial_mtu),
        ] {
            if value > frame_payload {
                return Err(key_error(
                    file,
                    text,
                    "stoq_transport",
                    key,
                    &format!(
                        "backend \"xdp\" holds one datagram per 2 KiB frame: at most {frame_payload}"
                    ),
                ));
            }
        }
        if !t.xdp_frames.is_power_of_two() || !(64..=262_144).contains(&t.xdp_frames) {
            return Err(key_error(
                file,
                text,
                "stoq_transport",
                "xdp_frames",
                "must be a power of two within 64..=262144",
            ));
        }
        let queues_error =
            |message: String| locate(file, text, Some(d.xdp_queues.span()), &message);
        let queues = d.xdp_queues.get_ref();
        let queues: Vec<u32> = if queues.is_empty() {
            (0..workers as u32).collect()
        } else if queues.len() != workers {
            return Err(queues_error(format!(
                "lists {} queues for {workers} workers; give one NIC queue per worker or none",
                queues.len()
            )));
        } else {
            queues.clone()
        };
        let mut seen = BTreeSet::new();
        if let Some(q) = queues.iter().find(|q| !seen.insert(**q)) {
            return Err(queues_error(format!(
                "queue {q} is given to two workers; an AF_XDP socket owns its queue"
            )));
        }
        Ok(Some(XdpPlan {
            interface,
            queues,
            zero_copy: t.zero_copy,
            frames: t.xdp_frames,
        }))
    }
}

/// `upstream_resolvers`: `"[ADDR]:PORT"`, `"ADDR:PORT"` (IPv4) or a bare
/// address (port 53), at most 3, no duplicates.
fn upstream_resolvers(listed: &[String]) -> Result<Vec<std::net::SocketAddr>, String> {
    let max = controlplane::dns::forward::UPSTREAMS_MAX;
    if listed.len() > max {
        return Err(format!(
            "lists {} resolvers; at most {max} are asked",
            listed.len()
        ));
    }
    let mut found = Vec::new();
    for entry in listed {
        let address = entry
            .parse::<std::net::SocketAddr>()
            .or_else(|_| {
                entry
                    .parse::<std::net::IpAddr>()
                    .map(|ip| std::net::SocketAddr::new(ip, 53))
            })
            .map_err(|_| {
                format!(
                    "`{entry}` is not an address; write \"[2001:db8::53]:53\" or \"2001:db8::53\""
                )
            })?;
        if address.port() == 0 {
            return Err(format!("`{entry}`: port 0 is not a resolver's port"));
        }
        if address.ip().is_unspecified() || address.ip().is_multicast() {
            return Err(format!("`{entry}` is not one server's address"));
        }
        if found.contains(&address) {
            return Err(format!("`{entry}` is listed twice"));
        }
        found.push(address);
    }
    Ok(found)
}

/// An error for `section.key`, located at the key's line when it is in the
/// file (line 0 when the value is a default).
fn key_error(file: &str, text: &str, section: &str, key: &str, message: &str) -> ConfigError {
    let mut in_section = false;
    let mut line = 0;
    for (index, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.starts_with('[') {
            in_section = l.trim_matches(|c| c == '[' || c == ']').trim() == section;
        } else if in_section && l.split('=').next().is_some_and(|k| k.trim() == key) {
            line = index + 1;
            break;
        }
    }
    ConfigError {
        file: file.into(),
        line,
        key: format!("{section}.{key}"),
        message: message.into(),
    }
}

/// An error for `section.key` that contradicts `other`, another key the
/// file sets.
fn contradiction(file: &str, text: &str, (section, key): (&str, &str), other: &str) -> ConfigError {
    key_error(
        file,
        text,
        section,
        key,
        &format!("contradicts {other} (both set in this file); remove one of the two"),
    )
}

/// An enum's value as the file writes it (`Uring` is `"uring"`).
fn lowercase(value: impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}

/// Turn a byte span into file, line and `section.key`.
fn locate(file: &str, text: &str, span: Option<Range<usize>>, message: &str) -> ConfigError {
    let start = span.map_or(0, |s| s.start.min(text.len()));
    let line = text[..start].matches('\n').count() + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
    let section = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = if line_text.starts_with('[') {
        line_text
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_owned()
    } else {
        let name = line_text.split('=').next().unwrap_or("").trim();
        match section {
            Some(s) if !name.is_empty() => format!("{s}.{name}"),
            Some(s) => s,
            None => name.to_owned(),
        }
    };
    ConfigError {
        file: file.into(),
        line,
        key,
        message: message.trim().to_owned(),
    }
}

/// `isolation_exempt`, checked, plus what is always exempt: loopback (the
/// operator's own commands) and the server's own address when it binds one.
fn isolation_exempt(
    configured: &[String],
    bind: std::net::Ipv6Addr,
) -> Result<Vec<(std::net::Ipv6Addr, u8)>, String> {
    let mut exempt = vec![(std::net::Ipv6Addr::LOCALHOST, 128)];
    if !bind.is_unspecified() && !bind.is_loopback() {
        exempt.push((bind, 128));
    }
    for prefix in configured {
        let prefix: Ipv6Prefix = prefix
            .parse()
            .map_err(|e| format!("{e} (expected IPv6 prefixes such as \"2001:db8::/48\")"))?;
        exempt.push((prefix.addr, prefix.len));
    }
    Ok(exempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> ConfigError {
        parse("t.toml", text, 2).expect_err(text)
    }

    #[test]
    fn empty_and_embedded_configs_work() {
        let empty = parse("empty.toml", "", 2).unwrap();
        assert_eq!(empty.settings.listen.port(), 4433);
        assert_eq!(empty.settings.workers, 2);
        let dev = parse(EMBEDDED_NAME, EMBEDDED_DEV_CONFIG, 2).unwrap();
        // Admission: mandatory everywhere; development grants stake and
        // keeps plots small, production leaves stake to the operator.
        assert_eq!(empty.admission.mode_name, "mandatory");
        assert_eq!(empty.admission.config.development_stake, None);
        assert_eq!(dev.admission.mode_name, "mandatory");
        assert_eq!(dev.admission.config.development_stake, Some(1));
        assert_eq!(dev.admission.config.space.k(), 12);
        let subset = parse(
            "s.toml",
            "[hypermesh_assets]\nconsensus_mode = \"time, work\"\n",
            2,
        )
        .unwrap();
        assert_eq!(subset.admission.mode_name, "work,time");
        let off = parse(
            "o.toml",
            "[hypermesh_assets]\nconsensus_mode = \"off\"\n",
            2,
        )
        .unwrap();
        assert!(!off.admission.required());
    }

    #[test]
    fn bad_files_name_line_and_key() {
        let table: &[(&str, usize, &str, &str)] = &[
            (
                "[internet2]\nbind = \"127.0.0.1\"\n",
                2,
                "internet2.bind",
                "IPv4",
            ),
            (
                "[internet2]\nbind = \"::ffff:10.0.0.1\"\n",
                2,
                "internet2.bind",
                "IPv4",
            ),
            (
                "[internet2]\nbind = \"localhost\"\n",
                2,
                "internet2.bind",
                "not an IP address",
            ),
            (
                "[internet2]\nport = 70000\n",
                2,
                "internet2.port",
                "invalid value",
            ),
            (
                "[internet2]\nprot = 1\n",
                2,
                "internet2.prot",
                "unknown field `prot`",
            ),
            ("[nonsense]\n", 1, "nonsense", "unknown field `nonsense`"),
            (
                "\n[stoq_transport]\ncongestion_control = \"bbr9\"\n",
                3,
                "stoq_transport.congestion_control",
                "expected one of `cubic`, `bbr`, `newreno`, `bbr2`, `bbr3`",
            ),
            (
                "[stoq_transport]\nbackend = \"dpdk\"\n",
                2,
                "stoq_transport.backend",
                "expected one of `uring`, `socket`, `xdp`",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\n",
                2,
                "stoq_transport.backend",
                "needs [dataplane] xdp_interface",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\nxdp_frames = 1000\n[dataplane]\nxdp_interface = \"eth9\"\n",
                3,
                "stoq_transport.xdp_frames",
                "power of two",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\nmax_udp_payload_bytes = 8952\n[dataplane]\nxdp_interface = \"eth9\"\n",
                3,
                "stoq_transport.max_udp_payload_bytes",
                "one datagram per 2 KiB frame",
            ),
            (
                "[stoq_transport]\nmax_udp_payload_bytes = 1000\n",
                2,
                "stoq_transport.max_udp_payload_bytes",
                "1200..=65527",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\nzero_copy = \"maybe\"\n",
                3,
                "stoq_transport.zero_copy",
                "expected one of `auto`, `on`, `off`",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\n[dataplane]\nworkers = 2\nxdp_interface = \"eth9\"\nxdp_queues = [0, 0]\n",
                6,
                "dataplane.xdp_queues",
                "queue 0 is given to two workers",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\n[dataplane]\nworkers = 2\nxdp_interface = \"eth9\"\nxdp_queues = [0]\n",
                6,
                "dataplane.xdp_queues",
                "lists 1 queues for 2 workers",
            ),
            (
                "[trustchain_authority]\ncertificate_lifetime_hours = 24\ncertificate_rotation_hours = 30\n",
                3,
                "trustchain_authority.certificate_rotation_hours",
                "below certificate_lifetime_hours (24)",
            ),
            (
                "[trustchain_authority]\nca_algorithm = \"rsa\"\n",
                2,
                "trustchain_authority.ca_algorithm",
                "expected `ecdsa-p256` or `ed25519`",
            ),
            (
                "[hypermesh_assets]\nconsensus_mode = \"work,luck\"\n",
                2,
                "hypermesh_assets.consensus_mode",
                "unknown proof \"luck\"",
            ),
            (
                "[hypermesh_assets]\nplot_k = 25\n",
                2,
                "hypermesh_assets.plot_k",
                "within 1..=24",
            ),
            (
                "[hypermesh_assets]\ndifficulty_base = 30\ndifficulty_max = 20\n",
                2,
                "hypermesh_assets.difficulty_base",
                "must not exceed difficulty_max",
            ),
            (
                "[hypermesh_assets]\ndifficulty_max = 33\n",
                2,
                "hypermesh_assets.difficulty_max",
                "at most 32",
            ),
            (
                "[hypermesh_assets]\nstake_min = 0\n",
                2,
                "hypermesh_assets.stake_min",
                "at least 1",
            ),
            (
                "[hypermesh_assets]\nvm_threads = 0\n",
                2,
                "hypermesh_assets.vm_threads",
                "within 1..=256",
            ),
            (
                "[hypermesh_assets]\nvm_cores = [9]\n",
                2,
                "hypermesh_assets.vm_cores",
                "core 9 does not exist",
            ),
            (
                "[hypermesh_assets]\nvm_deadline_ms = 0\n",
                2,
                "hypermesh_assets.vm_deadline_ms",
                "within 1..=60000",
            ),
            (
                "[hypermesh_assets]\nvm_memory_mib_max = 5000\n",
                2,
                "hypermesh_assets.vm_memory_mib_max",
                "within 1..=4096",
            ),
            (
                "[hypermesh_assets]\nadmission_deadline_ms = 10\n",
                2,
                "hypermesh_assets.admission_deadline_ms",
                "100..=60000",
            ),
            (
                "[hypermesh_assets]\nisolation_exempt = [\"10.0.0.0/8\"]\n",
                2,
                "hypermesh_assets.isolation_exempt",
                "expected IPv6 prefixes",
            ),
            (
                "[hypermesh_assets]\nisolation_ipv6_prefix_len = 8\n",
                2,
                "hypermesh_assets.isolation_ipv6_prefix_len",
                "prefix",
            ),
            (
                "[trustchain_authority]\ncertificate_lifetime_hours = 0\n",
                2,
                "trustchain_authority.certificate_lifetime_hours",
                "1..=2160",
            ),
            (
                "[stoq_transport]\ninitial_mtu = 900\n",
                2,
                "stoq_transport.initial_mtu",
                "1200..=9000",
            ),
            (
                "[dataplane]\nworkers = 2\nworker_cores = [0]\n",
                3,
                "dataplane.worker_cores",
                "1 cores for 2 workers",
            ),
            (
                "[dataplane]\nworkers = 1\nworker_cores = [7]\n",
                3,
                "dataplane.worker_cores",
                "core 7 does not exist",
            ),
            (
                "[dataplane]\ncontrol_plane_core = 9\n",
                2,
                "dataplane.control_plane_core",
                "core 9 does not exist",
            ),
            (
                "[dataplane]\nworkers = 999\n",
                2,
                "dataplane.workers",
                "at most 256",
            ),
            (
                "[dataplane]\nworkers = \"two\"\n",
                2,
                "dataplane.workers",
                "invalid type",
            ),
            (
                "[storage]\ndata_dir = 5\n",
                2,
                "storage.data_dir",
                "invalid type",
            ),
            ("[internet2\n", 1, "internet2", "invalid table header"),
            (
                "[stoq_transport]\nuring_recv_ops = 0\n",
                2,
                "stoq_transport.uring_recv_ops",
                "1..=1024",
            ),
            (
                "[dataplane]\nblocklist = [\"10.0.0.0/8\"]\n",
                2,
                "dataplane.blocklist",
                "not an IPv6 prefix",
            ),
            (
                "[dataplane]\nxdp_mode = \"offload\"\n",
                2,
                "dataplane.xdp_mode",
                "expected `native` or `generic`",
            ),
            (
                "[trustchain_authority]\ndns_name = \"bad..name\"\n",
                2,
                "trustchain_authority.dns_name",
                "not a valid DNS name",
            ),
            (
                "[trustchain_authority]\ndns_addresses = [\"10.0.0.1\"]\n",
                2,
                "trustchain_authority.dns_addresses",
                "invalid",
            ),
        ];
        for &(text, line, key, needle) in table {
            let e = error(text);
            assert_eq!((e.line, e.key.as_str()), (line, key), "{text:?} gave {e}");
            assert!(
                e.message.contains(needle),
                "{text:?}: {:?} lacks {needle:?}",
                e.message
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("t.toml:{line}: {key}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn loopback_and_the_bind_address_are_always_exempt_from_isolation() {
        let text = "[internet2]\nbind = \"fd71:7e57::1\"\n[hypermesh_assets]\nisolation_exempt = [\"2001:db8::/48\"]\n";
        let resolved = parse("t.toml", text, 2).unwrap();
        let exempt = &resolved.admission.isolation.exempt;
        for prefix in [
            (Ipv6Addr::LOCALHOST, 128),
            ("fd71:7e57::1".parse().unwrap(), 128),
            ("2001:db8::".parse().unwrap(), 48),
        ] {
            assert!(exempt.contains(&prefix), "{prefix:?} in {exempt:?}");
        }
    }

    /// One core's measurement, fixed, so a test does not depend on the
    /// machine it runs on.
    fn ten_per_core(_aes_first: bool) -> PerCore {
        PerCore {
            cipher_gbps: 10.0 / dataplane::capacity::GOODPUT_PER_CIPHER,
            goodput_gbps: 10.0,
        }
    }

    fn parse_fixed(text: &str) -> Result<Resolved, ConfigError> {
        parse_on("t.toml", text, 2, &ten_per_core)
    }

    #[test]
    fn a_reload_names_what_applies_only_at_the_next_start() {
        let seed = include_str!("../deploy/production.toml");
        let running = parse_on("production.toml", seed, 2, &ten_per_core).unwrap();
        let same = parse_on("production.toml", seed, 2, &ten_per_core).unwrap();
        assert_eq!(same.changed_at_restart(&running), Vec::<&str>::new());

        let edited = seed
            .replace("port = 443", "port = 8443")
            .replace("dns_mode = \"embedded\"", "dns_mode = \"external\"")
            .replace(
                "certificate_rotation_hours = 24",
                "certificate_rotation_hours = 12",
            );
        let edited = parse_on("production.toml", &edited, 2, &ten_per_core).unwrap();
        let changed = edited.changed_at_restart(&running);
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert!(changed[0].starts_with("[internet2]"), "{changed:?}");
        assert!(changed[1].contains("dns_mode"), "{changed:?}");
        assert!(changed[2].contains("rotation"), "{changed:?}");

        // What a reload applies itself is not named.
        let blocklist = seed.replace(
            "[stoq_transport]",
            "[dataplane]\nblocklist = [\"2001:db8::/32\"]\n[stoq_transport]",
        );
        let blocklist = parse_on("production.toml", &blocklist, 2, &ten_per_core).unwrap();
        assert_eq!(blocklist.changed_at_restart(&running), Vec::<&str>::new());
    }

    #[test]
    fn the_design_documents_production_file_checks_clean() {
        let seed = include_str!("../deploy/production.toml");
        let r = parse_on("production.toml", seed, 2, &ten_per_core).unwrap();
        assert_eq!(r.settings.listen.to_string(), "[::]:443");
        // 40 Gbit/s at 10 per core needs 4 workers; 2 cores give 2, and a
        // warning says what they reach.
        let plan = r.throughput.as_ref().unwrap();
        assert_eq!((plan.workers_needed, r.settings.workers), (4, 2));
        assert!(
            r.warnings.iter().any(|w| w.contains("reaches about 20.0")),
            "{:?}",
            r.warnings
        );
        // VM execution and asset addressing are both on, without a warning.
        assert!(!r.warnings.iter().any(|w| w.contains("enable_vm_execution")));
        assert!(!r.warnings.iter().any(|w| w.contains("nat_addressing")));
        let assets = r.assets.as_ref().unwrap();
        assert_eq!(assets.quota_bytes, 64 << 20);
        assert_eq!(assets.vm.as_ref().map(|vm| vm.threads), Some(1));
        assert!(r.choices.iter().any(|c| c.starts_with("VM execution on")));
        assert!(
            r.choices
                .iter()
                .any(|c| c.starts_with("asset addressing on"))
        );
        // A day's rotation: the lifetime follows it, with a day's overlap.
        assert_eq!(r.certificate_rotation, Duration::from_secs(24 * 3600));
        assert_eq!(r.certificate_lifetime, Duration::from_secs(48 * 3600));
        assert!(!r.ca_external);
        assert!(r.outside_zone.is_none());
        assert!(r.settings.transport.gso);
        assert!(r.admission.required());
    }

    #[test]
    fn asset_addressing_keys() {
        let on = parse_fixed("[hypermesh_assets]\nasset_prefix = \"fd71:7e57:0:1::/64\"\nmemory_quota_mib = 8\nasset_lease_grace_s = 5\n").unwrap();
        let assets = on.assets.unwrap();
        assert_eq!(
            assets.locator,
            dataplane::assets::address::Locator::of_prefix("fd71:7e57:0:1::".parse().unwrap())
        );
        assert_eq!(assets.quota_bytes, 8 << 20);
        assert_eq!(assets.lease_grace, Duration::from_secs(5));
        // The default locator: a ULA /48 of the apex, subnet 0.
        let default = parse_fixed("").unwrap().assets.unwrap().locator;
        let prefix = std::net::Ipv6Addr::from(u128::from(default.0) << 64);
        assert_eq!(prefix.segments()[0] >> 8, 0xfd, "{prefix}");
        assert_eq!(prefix.segments()[3], 0, "{prefix}");
        let off = parse_fixed("[hypermesh_assets]\nnat_addressing = false\n").unwrap();
        assert!(off.assets.is_none());
        for (bad, needle) in [
            ("asset_prefix = \"fd71::/48\"", "not a /64 prefix"),
            ("asset_prefix = \"fd71:0:0:1::5/64\"", "not a /64 prefix"),
            ("asset_prefix = \"node1\"", "not a /64 prefix"),
            ("memory_quota_mib = 18446744073709551615", "too large"),
            ("asset_lease_grace_s = 0", "1..=86400"),
        ] {
            let err = parse_fixed(&format!("[hypermesh_assets]\n{bad}\n")).unwrap_err();
            assert!(err.message.contains(needle), "{bad}: {err}");
            assert_eq!(err.line, 2, "{bad}: {err}");
        }
    }

    #[test]
    fn bind_address_and_its_older_name_both_work() {
        for key in ["bind_address", "bind"] {
            let r = parse_fixed(&format!("[internet2]\n{key} = \"fd71:7e57::1\"\n")).unwrap();
            assert_eq!(r.settings.listen.ip().to_string(), "fd71:7e57::1");
        }
        let both =
            parse_fixed("[internet2]\nbind = \"::1\"\nbind_address = \"::1\"\n").unwrap_err();
        assert_eq!((both.key.as_str(), both.line), ("internet2.bind", 2));
        assert!(both.message.contains("bind_address"), "{both}");
    }

    #[test]
    fn a_target_sizes_what_the_file_leaves_unset() {
        let r = parse_fixed("[stoq_transport]\ntarget_throughput_gbps = 4\n").unwrap();
        // One worker carries 4 Gbit/s at 10 per core.
        assert_eq!(r.settings.workers, 1);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // 4 Gbit/s for 10 ms in the socket buffer (above the 4 MiB floor).
        assert_eq!(r.settings.socket_buffer_bytes, 5_000_000);
        // A connection at 4 Gbit/s over a 50 ms path.
        let t = &r.settings.transport;
        assert_eq!(t.receive_window_bytes, 25_000_000);
        assert_eq!(t.send_window_bytes, 25_000_000);
        assert_eq!(t.stream_receive_window_bytes, 6_250_000);
        // Keys the operator wrote win; explicit workers stay.
        let r = parse_fixed(
            "[stoq_transport]\ntarget_throughput_gbps = 4\nsocket_buffer_bytes = 1048576\n\
             send_window_bytes = 2097152\n[dataplane]\nworkers = 2\n",
        )
        .unwrap();
        assert_eq!(r.settings.workers, 2);
        assert_eq!(r.settings.socket_buffer_bytes, 1 << 20);
        assert_eq!(r.settings.transport.send_window_bytes, 2 << 20);
        assert_eq!(r.settings.transport.receive_window_bytes, 25_000_000);
        // Without a target nothing is sized.
        let r = parse_fixed("").unwrap();
        assert!(r.throughput.is_none());
        assert_eq!(r.settings.socket_buffer_bytes, 16 << 20);
        assert_eq!(r.settings.workers, 2);
    }

    #[test]
    fn hardware_acceleration_off_turns_the_offloads_off() {
        let r = parse_fixed("[stoq_transport]\nenable_hardware_acceleration = false\n").unwrap();
        assert!(!r.settings.transport.gso);
        assert_eq!(r.settings.steering, SteeringMode::Off);
        assert!(!r.settings.aes_first);
        assert!(
            r.choices
                .iter()
                .any(|c| c.contains("hardware acceleration off"))
        );
        let on = parse_fixed("").unwrap();
        assert!(on.settings.transport.gso);
        assert_eq!(
            on.settings.aes_first,
            dataplane::capacity::AesHardware::detect().aes
        );
    }

    #[test]
    fn contradictory_keys_name_both() {
        let table: &[(&str, &str, &str)] = &[
            (
                "[stoq_transport]\nenable_hardware_acceleration = false\ngso = true\n",
                "stoq_transport.gso",
                "enable_hardware_acceleration = false",
            ),
            (
                "[stoq_transport]\nenable_hardware_acceleration = false\n[dataplane]\nsteering = \"on\"\n",
                "dataplane.steering",
                "enable_hardware_acceleration = false",
            ),
            (
                "[stoq_transport]\nzero_copy = \"on\"\n",
                "stoq_transport.zero_copy",
                "backend = \"uring\"",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\nenable_zero_copy = false\nzero_copy = \"on\"\n[dataplane]\nxdp_interface = \"eth0\"\n",
                "stoq_transport.zero_copy",
                "enable_zero_copy = false",
            ),
            (
                "[stoq_transport]\nbackend = \"xdp\"\nenable_zero_copy = true\nzero_copy = \"off\"\n[dataplane]\nxdp_interface = \"eth0\"\n",
                "stoq_transport.zero_copy",
                "enable_zero_copy = true",
            ),
            (
                "[trustchain_authority]\ndns_mode = \"external\"\noutside_zone = \"refuse\"\n",
                "trustchain_authority.outside_zone",
                "dns_mode = \"external\"",
            ),
            (
                "[trustchain_authority]\nca_mode = \"external\"\n",
                "trustchain_authority.ca_mode",
                "import_certificate and import_key",
            ),
            (
                "[trustchain_authority]\ncertificate_rotation_hours = 24\ncertificate_lifetime_hours = 24\n",
                "trustchain_authority.certificate_rotation_hours",
                "raise certificate_lifetime_hours",
            ),
            (
                "[trustchain_authority]\ncertificate_rotation_hours = 3000\n",
                "trustchain_authority.certificate_rotation_hours",
                "below 2160",
            ),
            (
                "[stoq_transport]\ntarget_throughput_gbps = 0\n",
                "stoq_transport.target_throughput_gbps",
                "above 0",
            ),
        ];
        for (text, key, message) in table {
            let e = parse_fixed(text).expect_err(text);
            assert_eq!(&e.key, key, "{text}");
            assert!(e.message.contains(message), "{text}: {}", e.message);
            assert!(e.line > 0, "{text}: {e}");
        }
    }

    #[test]
    fn the_modes_switch_what_they_name() {
        let dns = parse_fixed("[trustchain_authority]\ndns_mode = \"external\"\n").unwrap();
        assert_eq!(dns.outside_zone, Some(Vec::new()));
        let ca = parse_fixed(
            "[trustchain_authority]\nca_mode = \"external\"\nimport_certificate = \"c.pem\"\nimport_key = \"k.pem\"\n",
        )
        .unwrap();
        assert!(ca.ca_external);
        assert!(ca.import.is_some());
        let zero = parse_fixed(
            "[stoq_transport]\nbackend = \"xdp\"\nenable_zero_copy = false\n[dataplane]\nxdp_interface = \"eth0\"\n",
        )
        .unwrap();
        assert_eq!(zero.settings.xdp.unwrap().zero_copy, ZeroCopy::Off);
    }
}
