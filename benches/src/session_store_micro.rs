//! `session-store-micro`: the cost of one resumption's session-store work
//! (take the ticket being resumed, put the new one) as the number of stored
//! sessions grows, for rustls' `ServerSessionMemoryCache` and the server's
//! `dataplane::session_store::SessionStore`, in the same run.
//!
//! A per-operation cost that grows with n is what made handshakes slow
//! down as connections accumulated; this prints ns per operation for each
//! n (median of `--runs`), so the curve is visible.

mod stats;

use clap::Parser;
use rustls::server::StoresServerSessions;
use stats::median;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Sessions stored before measuring, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sessions: Vec<usize>,
    /// Take+put pairs measured per run.
    #[arg(long, default_value_t = 20_000)]
    operations: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// Median ns per take+put pair with `n` sessions stored.
fn measure(store: &dyn StoresServerSessions, n: usize, operations: usize) -> f64 {
    let key = |i: usize| {
        (i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .to_be_bytes()
            .to_vec()
    };
    for i in 0..n {
        store.put(key(i), vec![0; 120]);
    }
    let started = Instant::now();
    for op in 0..operations {
        // Resume one of the stored sessions, newest first (clients resume
        // their latest ticket; the newest is the far end of an insertion
        // order scan), and store its successor.
        let resumed = store.take(&key(n - 1 - op % n));
        std::hint::black_box(resumed);
        store.put(key(n + op), vec![0; 120]);
    }
    started.elapsed().as_nanos() as f64 / operations as f64
}

fn main() {
    let args = Args::parse();
    println!("sessions  rustls_cache_ns_per_op  session_store_ns_per_op  ratio");
    for &n in &args.sessions {
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..args.runs.max(1) {
            let cache: Arc<dyn StoresServerSessions> =
                rustls::server::ServerSessionMemoryCache::new(n + 1);
            theirs.push(measure(&*cache, n, args.operations));
            let store: Arc<dyn StoresServerSessions> =
                dataplane::session_store::SessionStore::new(n + 1);
            ours.push(measure(&*store, n, args.operations));
        }
        // At least one run each (`runs.max(1)`).
        let (theirs, ours) = (
            median(&mut theirs).expect("a run"),
            median(&mut ours).expect("a run"),
        );
        println!(
            "{n:>8}  {theirs:>22.0}  {ours:>23.0}  {:>5.1}",
            theirs / ours
        );
    }
}
