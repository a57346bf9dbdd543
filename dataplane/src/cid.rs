//! Server connection-ID layout: which worker owns a datagram.
//!
//! Every CID a worker issues is `CID_LEN` bytes: byte 0 is the worker index,
//! the rest is CSPRNG output. Routing is a pure function of the datagram's
//! destination CID (`owner_of`), so every packet carrying one DCID reaches one
//! worker. A client-chosen DCID (first Initials) routes by its own first
//! byte, which is uniformly random: the handshake lands on a random worker,
//! and from then on the client uses that worker's CIDs. The reuseport eBPF
//! program mirrors this function.

use quinn_proto::{ConnectionId, ConnectionIdGenerator};
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

/// Length of every server-issued connection ID.
pub const CID_LEN: usize = 8;
/// Workers are addressed by one CID byte.
pub const WORKERS_MAX: usize = 256;
/// Byte offset of the worker field inside a CID.
pub const WORKER_FIELD: usize = 0;

const _: () = assert!(WORKER_FIELD < CID_LEN && WORKERS_MAX <= 256);

/// Index of a dataplane worker (also its CID field value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u16);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker-{}", self.0)
    }
}

/// Issues CIDs carrying one worker's index.
pub struct WorkerCidGenerator {
    worker: WorkerId,
    rng: SystemRandom,
}

impl WorkerCidGenerator {
    pub fn new(worker: WorkerId) -> Self {
        assert!(
            (worker.0 as usize) < WORKERS_MAX,
            "worker index fits the CID field"
        );
        Self {
            worker,
            rng: SystemRandom::new(),
        }
    }
}

impl ConnectionIdGenerator for WorkerCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        self.rng
            .fill(&mut bytes)
            .expect("the kernel CSPRNG is available");
        bytes[WORKER_FIELD] = self.worker.0 as u8;
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Why a datagram could not be routed at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// Shorter than any QUIC header that could name a destination CID.
    Truncated,
    /// The QUIC fixed bit (RFC 9000 §17.2) is clear: not QUIC v1.
    NotQuic,
}

/// The worker that owns `datagram`, out of `workers`.
///
/// RFC 9000 §17.2: a long header carries the DCID length at byte 5 and the
/// DCID from byte 6; RFC 9000 §17.3: a short header carries our fixed-length
/// DCID from byte 1.
pub fn owner_of(datagram: &[u8], workers: u16) -> Result<WorkerId, RouteError> {
    debug_assert!(workers > 0);
    // As the BPF program: nothing shorter than a short header with our
    // CID can be a packet of ours, whatever its first byte says.
    if datagram.len() < 1 + CID_LEN {
        return Err(RouteError::Truncated);
    }
    let first = datagram[0];
    let field = if first & 0x80 != 0 {
        // In bounds: the datagram is at least 1 + CID_LEN bytes (asserted
        // below to cover byte 5).
        let dcid_len = usize::from(datagram[5]);
        if dcid_len == 0 {
            0
        } else {
            if datagram.len() < 6 + dcid_len {
                return Err(RouteError::Truncated);
            }
            // A client DCID shorter than our field position still routes.
            if WORKER_FIELD < dcid_len {
                datagram[6 + WORKER_FIELD]
            } else {
                datagram[6]
            }
        }
    } else {
        if first & 0x40 == 0 {
            return Err(RouteError::NotQuic);
        }
        datagram[1 + WORKER_FIELD]
    };
    Ok(WorkerId(u16::from(field) % workers))
}

// `owner_of` reads a long header's DCID length (byte 5) once the datagram
// is known to hold a short header with our CID.
const _: () = assert!(1 + CID_LEN > 5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{XorShift, hex};

    #[test]
    fn issued_cids_route_to_their_worker() {
        for w in 0..4u16 {
            let mut generator = WorkerCidGenerator::new(WorkerId(w));
            let cid = generator.generate_cid();
            let mut short = vec![0x40u8];
            short.extend_from_slice(&cid);
            short.extend_from_slice(&[0u8; 20]);
            assert_eq!(owner_of(&short, 4), Ok(WorkerId(w)));
            let mut long = vec![0xc0u8, 0, 0, 0, 1, CID_LEN as u8];
            long.extend_from_slice(&cid);
            long.push(0);
            assert_eq!(owner_of(&long, 4), Ok(WorkerId(w)));
        }
    }

    #[test]
    fn cids_are_random_beyond_the_worker_field() {
        let mut generator = WorkerCidGenerator::new(WorkerId(1));
        let a = generator.generate_cid();
        let b = generator.generate_cid();
        assert_ne!(a[1..], b[1..]);
    }

    #[test]
    fn garbage_is_classified() {
        assert_eq!(owner_of(&[], 2), Err(RouteError::Truncated));
        assert_eq!(
            owner_of(&[0x00, 1, 2, 3, 4, 5, 6, 7, 8], 2),
            Err(RouteError::NotQuic)
        );
        assert_eq!(owner_of(&[0x40, 1, 2], 2), Err(RouteError::Truncated));
        assert_eq!(
            owner_of(&[0xc0, 0, 0, 0, 1, 20, 1], 2),
            Err(RouteError::Truncated)
        );
        // Shorter than a short header with our CID: truncated, as in BPF.
        assert_eq!(
            owner_of(&[0xc0, 0, 0, 0, 1, 0], 3),
            Err(RouteError::Truncated)
        );
        assert_eq!(
            owner_of(&[0xc0, 0, 0, 0, 1, 0, 0, 0, 0], 3),
            Ok(WorkerId(0))
        );
    }

    // Real datagrams (UDP payloads), captured on the loopback interface of a
    // scratch network namespace while the release `internet2-server`
    // (`bind = "::1"`, `port = 4433`, `[dataplane] workers = 2`) served
    // `internet2 ping --connect [::1]:4433` (connection A, client port 50292)
    // and then `internet2 bench --duration 1` (connection B, client port
    // 40865), read with a python3 AF_PACKET socket bound to `lo` (frame
    // bytes 62.. of each incoming copy: Ethernet 14 + IPv6 40 + UDP 8).
    //
    // The server issued 00faae7d7d22eac3 (worker 0) to A and 01cebc9e11b972cc
    // (worker 1) to B; the clients chose the 8-byte SCIDs f2bd8e142c39e7c5
    // (A) and ab9f23f93ff33216 (B) and, for their first Initials, the 20-byte
    // DCIDs 44e9e8e7... (A) and 215aef84... (B).
    //
    // Trimmed: where a comment says "first 100 bytes", the rest of the
    // datagram (ciphertext) is cut off; the router reads at most the first
    // 6 + 20 bytes. CLIENT_COALESCED_W0 is kept whole (1200 bytes).
    /// A's first datagram: a lone client Initial (first byte 0xcd), padded to
    /// 1200 bytes (RFC 9000 §14.1); first 100 bytes. DCID 44e9e8e7... (client
    /// chosen, 20 bytes).
    const CLIENT_INITIAL_A: &str = "cd000000011444e9e8e77e1c0ec9b833118101372207cf1a6caa08f2bd8e142c\
        39e7c500448ad7108a5c6255133a9f518f0efd9d12c9496edd4c4dc4bd5f6b17\
        abf32564f005df8e04e2c44a0abeefc28981a0f97c12708ac83e626f99ca1897\
        09119a7d";
    /// B's first datagram, as CLIENT_INITIAL_A: DCID 215aef84...; first 100 bytes.
    const CLIENT_INITIAL_B: &str = "c60000000114215aef84f63abab7cb81c98dd676f429ae26fb5f08ab9f23f93f\
        f3321600448ac914601eb8c44e3b73977df251157dd3b75d20f3ac3fae075e00\
        729ebd7823fc151ffb96d16e3e67628dabf6f889bd1e6f07efd6a179669b772e\
        aac1a429";
    /// The server's first datagram to A (1200 bytes): Initial + Handshake + 1-RTT
    /// coalesced, DCID = A's SCID f2bd8e142c39e7c5. Its first byte 0x89 has the
    /// fixed bit clear: A's client advertised grease_quic_bit (RFC 9287), so the
    /// server greases it. First 100 bytes.
    const SERVER_REPLY_A: &str = "890000000108f2bd8e142c39e7c50800faae7d7d22eac3004077def696647bd4\
        433f2d882c4592f662c60cf95be2ae1727296ab3e5fb469ae23b5cf911af6b31\
        98c179f9b6c8fd72c84b69b90f284a700ac5b37962ce60de082aa81fb9cf6f64\
        35497e39";
    /// The server's first datagram to B, as SERVER_REPLY_A (first byte 0x88, DCID
    /// ab9f23f93ff33216); first 100 bytes.
    const SERVER_REPLY_B: &str = "880000000108ab9f23f93ff332160801cebc9e11b972cc004077e364021d5017\
        8c9662b287101a25e8c129cdc61afd19f8c708283d7e93b493cd61291063b699\
        9b96677a2e5d1078bfd0c690fe3ea0beae25a468589ae6d3da880cf48876aa63\
        76d95857";
    /// A's second datagram, complete: Initial (51 bytes) + Handshake (89 bytes) +
    /// 1-RTT (1060 bytes) coalesced (RFC 9000 §12.2), every DCID the server's
    /// 00faae7d7d22eac3.
    const CLIENT_COALESCED_W0: &str = "c2000000010800faae7d7d22eac308f2bd8e142c39e7c5004019c35aa8178769\
        5d8f861460939aaf9a8d4edd3a577a9c23e6c0e9000000010800faae7d7d22ea\
        c308f2bd8e142c39e7c540406715ab19c8db865045d46935291d291d2e644a47\
        364a29da6f20ee4caafdb61c4259ec07fcbc0e75a48848555136db854d8cbf5e\
        696e3400dfe7a2ef0746336a6d00faae7d7d22eac39030ac6c40ca1e9acd87c9\
        a633b82ba3b5fc6198d64336f17be8f7911e011ebec1e9e2a6fa52f875b24566\
        fa8bebf9b29bcc6bd5322d297298c9fe08325a08070f09ead9e8375adc82d602\
        6c46c10f54f39cd8e5dc0fcb8d80def93fb0f7470d83386b737cf21dffa7b93d\
        76531e5619672833a48fa62b2d6290bbb2d2b2f9de45689e219dd03624f71e6a\
        e3c1721b02b55966bd13b5e903bd2295c3d3de93b1194638bc2bab2d0fa5efdd\
        0c133c17ff7230e126f4939357a683316a1d22a5aa172330694f8946150bd59f\
        59c6ce08c2c84a45c9c05f49a406d4e5b9df8cf9a2ad87d047331d4a37967d06\
        e1b4c67249aae338e8224fe2167039966048a886e807860acaeb283232411412\
        cec2cc829861a5dd04ad03f2d2f368c6ee26e5ab7b56b9dddea482309b43c40e\
        26b0e8f0ca71db2228bf055c3004a63b5974aa1ec2a419918c49fd891e888066\
        b7ee15e2c39c3bfd0c70a8e92993d88cb1b6d5954153be35390822c3819db5e8\
        a6d33f531a1eeba7f5602ef9d91cd776a1d26f94ab65a9fdbdf4ce8ec16e5952\
        f4d4b1c9a1c3e818fba0014e8026b2d9ebb7a9d2964671f8ed645c38380dc18e\
        5f0e03e21907cba56cccb35f4236b3a433ef88fc8656135cf132cc13f5ebe566\
        af998cbeb169accc1ad99c8eba4e30aaa92f438da866bc8558361d7c99b86601\
        cc9769e70e370213ae1f4bce5d83350987067c6939f372abc0acf488f98ee3fb\
        25ca0c1835e2d8590301a8a7065a26e7e524546aab97bc9e408282be2668827c\
        8da7d8597f101c2fff56836409d1b8e7b38b74f7571a190cfaba5e6414a91acd\
        7a25899ca2d42b198c871b256f9d4d09cba59bd5fcd9f4305cdeabd267ef9d83\
        e06419bb8cf003da3579993df8fa843af52884b3709c1c936fb8271e1e8d4927\
        08fac580988ea4f91ecb4604b0526e35b9d27edf181412cbb2e1ec8330fd5ddd\
        ffff0ca0900f287922dd13eab580d33a4a9c15b1764659356d27e2d71a1e1f04\
        22d6202991d8a551688959bf776b96beec1886c9f6c228cf8cfa8ac5d05d0d2c\
        acf28117c56de854b9bbaf113273e053a04d0ee264494ab68c4f019170182731\
        6a140f9ff60bfc5b68b5d1d0c329b5759a5d2a5061e58b4d1cda1b6c1824ec0b\
        26c33e81c55a63069a01729cdfcf75fa6e5e3784fa4a260539ad9d29d1370931\
        dd7b2fe0d06a2b42ac67a18a43530018f3ec5e6eabb86d18a732576c8f5f26c6\
        9f1699072bff079eda872ebd6628e719384fce9657eec151f48b46cb0d68fa64\
        bb615b60cab0a0e29e80d4b5952acde653cb65e3aab8d7818e641f9056921ad8\
        48e721371fa2019d1abd2e3d795c2d5c28a8d15afa1ce3c52ce80f59c1b1a2d4\
        6cc137d97665143af1ff911bd062525c9e0ec6e7d8754f18ae5e8db1bc9b1585\
        ac4e3b75cc2894dd6a0265c69dabeb79d80b2b340fbaf8c2678a379e40f98659\
        9563bea40f92856ff16d95764a9823cf";
    /// B's second datagram, as CLIENT_COALESCED_W0 with DCID 01cebc9e11b972cc;
    /// first 100 bytes.
    const CLIENT_COALESCED_W1: &str = "c8000000010801cebc9e11b972cc08ab9f23f93ff332160040198754138505ed\
        c7d845ce569edf2d65cfedb7e4b21154f496d3e8000000010801cebc9e11b972\
        cc08ab9f23f93ff3321640401b1bc459fc486217ecfe19e7239f879cba45707a\
        e9300612";
    /// The client Handshake packet (first byte 0xe9) alone: bytes 51..140 of
    /// CLIENT_COALESCED_W0, as it would arrive uncoalesced.
    const CLIENT_HANDSHAKE_W0: &str = "e9000000010800faae7d7d22eac308f2bd8e142c39e7c540406715ab19c8db86\
        5045d46935291d291d2e644a47364a29da6f20ee4caafdb61c4259ec07fcbc0e\
        75a48848555136db854d8cbf5e696e3400dfe7a2ef0746336a";
    /// The client Handshake packet of B: bytes 51..140 of B's second datagram.
    const CLIENT_HANDSHAKE_W1: &str = "e8000000010801cebc9e11b972cc08ab9f23f93ff3321640401b1bc459fc4862\
        17ecfe19e7239f879cba45707ae9300612a64f375f7fbe579a200757d2b8b1fb\
        821550ac41bf7720582d26055aee8a0c92d2991ede56589a3a";
    /// A client 1-RTT datagram of A, complete (41 bytes): short header, DCID
    /// 00faae7d7d22eac3.
    const CLIENT_SHORT_W0: &str = "5000faae7d7d22eac3ca157a081382383383b9de43c3480a150f258674980ec6\
        58b792528713b1f800";
    /// A client 1-RTT datagram of B, complete (37 bytes): DCID 01cebc9e11b972cc.
    const CLIENT_SHORT_W1: &str = "6a01cebc9e11b972ccfb919d35fea3a755c4a008eddbaf3f5b6874a7998332c1\
        293062dc5a";
    /// A's first full-size 1-RTT datagram (1326 bytes); first 100 bytes.
    const CLIENT_SHORT_W0_BIG: &str = "7800faae7d7d22eac3a68de9bd09764e65a7241d3ff00c22f13e5fbbaab0bd72\
        bfc1f6084e9cfc75ac986187e250bed2c734dde07074372e05462dd5ac230ed8\
        ca80025e25deb599bae2aca92e691e6518ae2727fa6dc81b9061085a88cf366e\
        a71d42bf";
    /// B's first full-size 1-RTT datagram (1326 bytes); first 100 bytes.
    const CLIENT_SHORT_W1_BIG: &str = "6f01cebc9e11b972cca0182db6ffac50d7e54e867959cb190fb029b5b189f183\
        6226f6d6beb95630aae6de10fe086a83c64a0c3295bb5a11fd5731585204af0a\
        83d6e096e0d27e9f00db6838e10e413acce4e439034feff114276e2a683ba07b\
        c43c65b0";
    /// A server 1-RTT datagram to B (a 9600-byte GSO batch, as loopback
    /// carries it), fixed bit set (first byte 0x6c); DCID d33717ece7d88f6a, a
    /// CID B's client issued. First 100 bytes.
    const SERVER_SHORT: &str = "6cd33717ece7d88f6a53b042ff45d8ce0b01eb4edb08c6483f4a2b7495fa566f\
        5ef82061379528504dab53e2be2ef1bfb59d7cd4ff6d1201528479070a7f539b\
        e79d9c6bb97f6d1e7c5a67012fccd5f48734a96f0c09fc40bd52317efe72801a\
        03ca86fc";
    /// A server 1-RTT datagram to A (1326 bytes) whose fixed bit the server
    /// greased (first byte 0x22); DCID 278ff30dd31c713f, a CID A's client
    /// issued. First 100 bytes.
    const SERVER_SHORT_GREASED: &str = "22278ff30dd31c713f223078a43f72fb0c806e2950debc6837c299e65ace38f3\
        3b1ecd0e75c3e5a39abc42cd18692088583de326f0579646574ac7407204aa04\
        f57da4c0d9f9a04abf62f6f4c9ffe22b23019d0ac7fb94dd4097cdb34e7201fa\
        3f2100b1";

    /// The worker counts every captured datagram is routed for.
    const WORKER_COUNTS: [u16; 2] = [2, 4];

    /// One captured datagram and where it must go.
    struct Captured {
        name: &'static str,
        datagram: &'static str,
        /// The destination CID the datagram carries (of its first packet).
        dcid: &'static str,
        /// `owner_of` for 2 and for 4 workers.
        owner: [Result<WorkerId, RouteError>; 2],
    }

    const fn to(w2: u16, w4: u16) -> [Result<WorkerId, RouteError>; 2] {
        [Ok(WorkerId(w2)), Ok(WorkerId(w4))]
    }

    /// For a server-issued CID the owner is byte 0 of the DCID, the worker
    /// that issued it (0 or 1 here: the server ran 2 workers). For a
    /// client-chosen DCID it is the DCID's first byte modulo the worker count
    /// (reuseport_steer.c: `key = field % workers_n`), worked out by hand in
    /// each comment.
    const CAPTURED: [Captured; 14] = [
        Captured {
            name: "client Initial A",
            datagram: CLIENT_INITIAL_A,
            dcid: "44e9e8e77e1c0ec9b833118101372207cf1a6caa",
            owner: to(0, 0), // 0x44 = 68; 68 % 2 = 0, 68 % 4 = 0
        },
        Captured {
            name: "client Initial B",
            datagram: CLIENT_INITIAL_B,
            dcid: "215aef84f63abab7cb81c98dd676f429ae26fb5f",
            owner: to(1, 1), // 0x21 = 33; 33 % 2 = 1, 33 % 4 = 1
        },
        Captured {
            name: "server reply A (greased long header)",
            datagram: SERVER_REPLY_A,
            dcid: "f2bd8e142c39e7c5",
            owner: to(0, 2), // 0xf2 = 242; 242 % 2 = 0, 242 % 4 = 2
        },
        Captured {
            name: "server reply B (greased long header)",
            datagram: SERVER_REPLY_B,
            dcid: "ab9f23f93ff33216",
            owner: to(1, 3), // 0xab = 171; 171 % 2 = 1, 171 % 4 = 3
        },
        Captured {
            name: "client coalesced A, whole",
            datagram: CLIENT_COALESCED_W0,
            dcid: "00faae7d7d22eac3",
            owner: to(0, 0),
        },
        Captured {
            name: "client coalesced B",
            datagram: CLIENT_COALESCED_W1,
            dcid: "01cebc9e11b972cc",
            owner: to(1, 1),
        },
        Captured {
            name: "client Handshake A",
            datagram: CLIENT_HANDSHAKE_W0,
            dcid: "00faae7d7d22eac3",
            owner: to(0, 0),
        },
        Captured {
            name: "client Handshake B",
            datagram: CLIENT_HANDSHAKE_W1,
            dcid: "01cebc9e11b972cc",
            owner: to(1, 1),
        },
        Captured {
            name: "client 1-RTT A, whole",
            datagram: CLIENT_SHORT_W0,
            dcid: "00faae7d7d22eac3",
            owner: to(0, 0),
        },
        Captured {
            name: "client 1-RTT B, whole",
            datagram: CLIENT_SHORT_W1,
            dcid: "01cebc9e11b972cc",
            owner: to(1, 1),
        },
        Captured {
            name: "client full-size 1-RTT A",
            datagram: CLIENT_SHORT_W0_BIG,
            dcid: "00faae7d7d22eac3",
            owner: to(0, 0),
        },
        Captured {
            name: "client full-size 1-RTT B",
            datagram: CLIENT_SHORT_W1_BIG,
            dcid: "01cebc9e11b972cc",
            owner: to(1, 1),
        },
        Captured {
            name: "server 1-RTT to B",
            datagram: SERVER_SHORT,
            dcid: "d33717ece7d88f6a",
            owner: to(1, 3), // 0xd3 = 211; 211 % 2 = 1, 211 % 4 = 3
        },
        Captured {
            name: "server 1-RTT to A, greased",
            datagram: SERVER_SHORT_GREASED,
            dcid: "278ff30dd31c713f",
            owner: [Err(RouteError::NotQuic); 2],
        },
    ];

    /// Where the DCID of `datagram`'s first packet starts and ends, read by
    /// hand: RFC 9000 §17.2 (long: length at byte 5) and §17.3 (short: our
    /// fixed length from byte 1).
    fn dcid_span(datagram: &[u8]) -> std::ops::Range<usize> {
        if datagram[0] & 0x80 != 0 {
            6..6 + usize::from(datagram[5])
        } else {
            1..1 + CID_LEN
        }
    }

    #[test]
    fn captured_datagrams_route_to_their_owner() {
        for case in &CAPTURED {
            let datagram = hex(case.datagram);
            let dcid = hex(case.dcid);
            assert_eq!(datagram[dcid_span(&datagram)], dcid[..], "{}", case.name);
            for (workers, owner) in WORKER_COUNTS.into_iter().zip(case.owner) {
                assert_eq!(owner_of(&datagram, workers), owner, "{}", case.name);
                if let Ok(owner) = owner {
                    assert_eq!(owner.0, u16::from(dcid[0]) % workers, "{}", case.name);
                }
            }
        }
        // The server really issued CIDs carrying its worker index, one
        // connection per worker.
        assert_eq!(hex(CLIENT_COALESCED_W0).len(), 1200, "kept whole");
        let issued = [CLIENT_SHORT_W0, CLIENT_SHORT_W1].map(|d| owner_of(&hex(d), 2));
        assert_eq!(issued, [Ok(WorkerId(0)), Ok(WorkerId(1))]);
    }

    #[test]
    fn captured_prefixes_route_by_header_only() {
        for case in &CAPTURED {
            let datagram = hex(case.datagram);
            let first = datagram[0];
            let header_len = dcid_span(&datagram).end;
            for len in 0..=datagram.len() {
                let prefix = &datagram[..len];
                for (workers, whole) in WORKER_COUNTS.into_iter().zip(case.owner) {
                    let expected = if len < 1 + CID_LEN {
                        Err(RouteError::Truncated)
                    } else if first & 0xc0 == 0 {
                        // A short header with the fixed bit clear is
                        // classified by its first byte alone.
                        Err(RouteError::NotQuic)
                    } else if len < header_len {
                        Err(RouteError::Truncated)
                    } else {
                        whole
                    };
                    let name = case.name;
                    assert_eq!(owner_of(prefix, workers), expected, "{name}, {len} bytes");
                    assert_eq!(bpf_steer(prefix, workers), bpf_expected(len, expected));
                }
            }
        }
    }

    #[test]
    fn captured_with_fixed_bit_flipped() {
        for case in &CAPTURED {
            let mut datagram = hex(case.datagram);
            let long = datagram[0] & 0x80 != 0;
            let dcid_first = hex(case.dcid)[0];
            for set in [false, true] {
                if set {
                    datagram[0] |= 0x40;
                } else {
                    datagram[0] &= !0x40;
                }
                for workers in WORKER_COUNTS {
                    // RFC 9000 §17.2: neither the BPF program nor owner_of
                    // checks a long header's fixed bit (Version Negotiation
                    // leaves it unset), so it routes either way; a short
                    // header without it is not QUIC v1 (RFC 9000 §17.3).
                    let expected = if long || set {
                        Ok(WorkerId(u16::from(dcid_first) % workers))
                    } else {
                        Err(RouteError::NotQuic)
                    };
                    let name = case.name;
                    assert_eq!(
                        owner_of(&datagram, workers),
                        expected,
                        "{name}, fixed {set}"
                    );
                }
            }
        }
    }

    /// Why `bpf_steer` left the choice to the kernel's 4-tuple hash.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum SteerFallback {
        Truncated,
        NotQuic,
    }

    /// A line-by-line transcription of `steer_to_owner` in
    /// ebpf/reuseport_steer.c over a UDP payload: `Ok(key)` is the socket
    /// array slot it selects.
    fn bpf_steer(payload: &[u8], worker_count: u16) -> Result<u16, SteerFallback> {
        const UDP_HEADER_LEN: usize = 8;
        let len = UDP_HEADER_LEN + payload.len();
        if len < UDP_HEADER_LEN + 1 + CID_LEN {
            return Err(SteerFallback::Truncated);
        }
        let payload_len = len - UDP_HEADER_LEN;
        let header = &payload[..7];
        let field = if header[0] & 0x80 != 0 {
            let dcid_len = usize::from(header[5]);
            if dcid_len == 0 {
                0
            } else {
                if payload_len < 6 + dcid_len {
                    return Err(SteerFallback::Truncated);
                }
                header[6]
            }
        } else {
            if header[0] & 0x40 == 0 {
                return Err(SteerFallback::NotQuic);
            }
            header[1]
        };
        Ok(u16::from(field) % worker_count.max(1))
    }

    /// What `bpf_steer` does with a datagram of `len` bytes that `owner_of`
    /// routes as `owner`: the same decision at every length (below 9 bytes
    /// both call it truncated, the program's first check).
    fn bpf_expected(len: usize, owner: Result<WorkerId, RouteError>) -> Result<u16, SteerFallback> {
        if len < 1 + CID_LEN {
            return Err(SteerFallback::Truncated);
        }
        match owner {
            Ok(owner) => Ok(owner.0),
            Err(RouteError::Truncated) => Err(SteerFallback::Truncated),
            Err(RouteError::NotQuic) => Err(SteerFallback::NotQuic),
        }
    }

    #[test]
    fn random_and_mutated_datagrams_never_panic() {
        let captured: Vec<Vec<u8>> = CAPTURED.iter().map(|c| hex(c.datagram)).collect();
        let mut rng = XorShift(0x853c_49e6_748f_ea9b);
        let mut routed = 0;
        let mut errors = [0; 2];
        for i in 0..200_000 {
            let datagram: Vec<u8> = if i % 2 == 0 {
                let len = (rng.next() % 100) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // A captured datagram, cut short and with a few bytes
                // changed, mostly in the first 30 (first byte, DCID length,
                // DCID).
                let mut datagram = captured[i / 2 % captured.len()].clone();
                datagram.truncate((rng.next() % 110) as usize);
                for _ in 0..rng.next() % 4 {
                    if datagram.is_empty() {
                        break;
                    }
                    let span = if rng.next().is_multiple_of(4) {
                        datagram.len()
                    } else {
                        datagram.len().min(30)
                    };
                    datagram[rng.next() as usize % span] = rng.next() as u8;
                }
                datagram
            };
            let workers = match rng.next() % 4 {
                0 => 1,
                1 => 2,
                2 => 4,
                _ => 1 + (rng.next() % WORKERS_MAX as u64) as u16,
            };
            let owner = owner_of(&datagram, workers);
            match owner {
                Ok(owner) => {
                    assert!(owner.0 < workers, "{owner} of {workers}");
                    routed += 1;
                }
                Err(RouteError::Truncated) => errors[0] += 1,
                Err(RouteError::NotQuic) => errors[1] += 1,
            }
            assert_eq!(
                bpf_steer(&datagram, workers),
                bpf_expected(datagram.len(), owner),
                "{datagram:02x?} with {workers} workers"
            );
        }
        // Every outcome is exercised.
        assert!(
            routed > 10_000 && errors.iter().all(|&n| n > 1_000),
            "{routed} {errors:?}"
        );
    }
}
