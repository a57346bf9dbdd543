//! Per-run figures, medians over runs, the printed table and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

/// Whose stack a run measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Ours(Flavor),
    Baseline,
}

/// Which configuration of our server a run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// As the command line says (--backend, --steering).
    AsConfigured,
    /// --matrix: io_uring with eBPF reuseport steering.
    UringSteering,
    /// --matrix: io_uring, steering off (the handoff queue routes).
    UringHandoff,
    /// --matrix: the AF_XDP backend behind the XDP front door.
    Xdp,
    /// --congestion: as configured, with this congestion controller (a
    /// name the server accepted, kept for the whole process).
    Congestion(&'static str),
}

impl Side {
    pub const OURS: Side = Side::Ours(Flavor::AsConfigured);

    /// The label used in progress lines, the table and the JSON.
    pub fn label(self) -> &'static str {
        match self {
            Side::Ours(Flavor::AsConfigured) => "ours",
            Side::Ours(Flavor::UringSteering) => "uring+steer",
            Side::Ours(Flavor::UringHandoff) => "uring-handoff",
            Side::Ours(Flavor::Xdp) => "xdp",
            Side::Ours(Flavor::Congestion(name)) => name,
            Side::Baseline => "quinn",
        }
    }

    /// The name in the JSON, matching its `baseline` key.
    pub fn json_name(self) -> &'static str {
        match self {
            Side::Baseline => "baseline",
            ours => ours.label(),
        }
    }

    pub fn is_ours(self) -> bool {
        matches!(self, Side::Ours(_))
    }
}

/// Declares `Metrics` once: its fields, their JSON keys (the field names)
/// and the array view that medians and JSON iterate over.
macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $field:ident,)*) => {
        /// Every metric is optional: server-side figures do not exist in
        /// two-host client mode, the handoff ratio only exists for our
        /// server, and the per-handshake CPU only for handshake runs.
        #[derive(Clone, Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $field: Option<f64>,)*
        }

        /// JSON keys, in the order of `Metrics::values`.
        const KEYS: &[&str] = &[$(stringify!($field)),*];

        impl Metrics {
            fn values(&self) -> Vec<Option<f64>> {
                vec![$(self.$field),*]
            }

            fn from_values(v: &[Option<f64>]) -> Metrics {
                let mut v = v.iter().copied();
                Metrics {
                    $($field: v.next().flatten(),)*
                }
            }
        }
    };
}

metrics! {
    goodput_gbps,
    /// Server CPU seconds over the client run divided by its wall time.
    server_cpu_cores,
    gbps_per_server_core,
    handshakes_per_s,
    handshake_us_p50,
    handshake_us_p99,
    /// Set-up rate (connections/s) over the first and the last 1000
    /// handshakes of the run: equal when a handshake costs the same at any
    /// number of held connections.
    setup_rate_first_1k,
    setup_rate_last_1k,
    /// Server CPU per full handshake, in µs (handshake-only runs).
    server_cpu_us_per_handshake,
    /// Server CPU per resumed handshake, in µs (handshake-only runs with
    /// --resume, where the client saw the server resume).
    server_cpu_us_per_resumed_handshake,
    /// Handshakes that resumed a session, as the client saw them.
    handshakes_resumed,
    /// Connections the client still held at the end of the run.
    connections,
    /// Peak RSS (VmHWM) of the server process, which covers the moment all
    /// connections were held even though the client has exited by the time
    /// it is read.
    server_rss_bytes,
    /// RSS (VmRSS) of the server right after the client run.
    server_rss_end_bytes,
    /// (peak RSS - RSS before the client started) / connections held: the
    /// marginal memory of one (mostly idle) connection, without the fixed
    /// start-up cost.
    server_rss_per_idle_connection,
    /// handoffs_in / datagrams_rx of our server: the share of datagrams that
    /// arrived on the wrong worker and had to be passed to another.
    handoff_ratio,
    errors,
    duration_s,
    /// --transfer-mib: seconds from the first byte requested to the last
    /// byte received.
    transfer_s,
    server_cpu_s,
    /// The impairment relay (--delay-ms, --loss, --rate-mbit): time the
    /// datagrams towards the client (the bulk data) waited for the
    /// bottleneck, ms, and what each direction dropped.
    relay_to_client_queue_ms_p50,
    relay_to_client_queue_ms_p99,
    relay_to_client_dropped_loss,
    relay_to_client_dropped_queue,
    relay_to_server_dropped_loss,
    relay_to_server_dropped_queue,
}

impl Metrics {
    /// Per-metric medians. Each metric is its own median (the median
    /// Gbit/s per core is not median Gbit/s over median cores), so one
    /// outlier run cannot skew a derived figure.
    pub fn median<'a>(runs: impl IntoIterator<Item = &'a Metrics> + Clone) -> Metrics {
        let mut out = vec![None; KEYS.len()];
        for (i, slot) in out.iter_mut().enumerate() {
            let mut xs: Vec<f64> = runs
                .clone()
                .into_iter()
                .filter_map(|m| m.values()[i])
                .filter(|x| x.is_finite())
                .collect();
            *slot = median(&mut xs);
        }
        Metrics::from_values(&out)
    }

    fn to_json(&self) -> Map<String, Value> {
        KEYS.iter()
            .zip(self.values())
            .map(|(k, v)| (k.to_string(), v.map_or(Value::Null, Value::from)))
            .collect()
    }
}

fn median(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// One finished run.
#[derive(Clone, Debug)]
pub struct Run {
    pub side: Side,
    pub metrics: Metrics,
    /// The impairment relay's whole stats document, when it ran.
    pub relay: Option<Value>,
}

/// All runs of a benchmark plus a description of the setup for the header.
pub struct Report {
    pub setup: Value,
    pub runs: Vec<Run>,
}

impl Report {
    /// The sides in the order they first ran, the baseline last.
    fn sides(&self) -> Vec<Side> {
        let mut sides: Vec<Side> = Vec::new();
        for run in &self.runs {
            if !sides.contains(&run.side) {
                sides.push(run.side);
            }
        }
        sides.sort_by_key(|s| !s.is_ours());
        sides
    }

    fn medians(&self, side: Side) -> Metrics {
        Metrics::median(
            self.runs
                .iter()
                .filter(|r| r.side == side)
                .map(|r| &r.metrics),
        )
    }

    /// The table: one column per side (medians) and, when the baseline ran,
    /// each of ours against quinn for the headline figures.
    pub fn table(&self) -> String {
        let sides = self.sides();
        let medians: Vec<Metrics> = sides.iter().map(|&s| self.medians(s)).collect();
        let baseline = sides.iter().position(|s| *s == Side::Baseline);
        let ours: Vec<usize> = (0..sides.len()).filter(|&i| sides[i].is_ours()).collect();
        let mib = |x: Option<f64>| x.map(|b| b / (1024.0 * 1024.0));
        type Row<'a> = (&'a str, usize, fn(&Metrics) -> Option<f64>, bool);
        let rows: [Row; 18] = [
            ("goodput Gbit/s", 3, |m| m.goodput_gbps, true),
            ("server CPU cores", 2, |m| m.server_cpu_cores, false),
            (
                "Gbit/s per server core",
                3,
                |m| m.gbps_per_server_core,
                true,
            ),
            ("handshakes/s", 1, |m| m.handshakes_per_s, true),
            ("handshake p50 µs", 0, |m| m.handshake_us_p50, false),
            ("handshake p99 µs", 0, |m| m.handshake_us_p99, false),
            (
                "server CPU µs/handshake",
                1,
                |m| m.server_cpu_us_per_handshake,
                true,
            ),
            (
                "server CPU µs/resumed",
                1,
                |m| m.server_cpu_us_per_resumed_handshake,
                true,
            ),
            ("set-up/s first 1000", 0, |m| m.setup_rate_first_1k, false),
            ("set-up/s last 1000", 0, |m| m.setup_rate_last_1k, false),
            ("connections", 0, |m| m.connections, false),
            ("server RSS peak MiB", 1, |m| m.server_rss_bytes, false),
            ("server RSS end MiB", 1, |m| m.server_rss_end_bytes, false),
            (
                "RSS per idle conn B",
                0,
                |m| m.server_rss_per_idle_connection,
                false,
            ),
            ("resumed handshakes", 0, |m| m.handshakes_resumed, false),
            ("handoff ratio", 4, |m| m.handoff_ratio, false),
            ("transfer s", 2, |m| m.transfer_s, false),
            ("client errors", 0, |m| m.errors, false),
        ];
        // Over the impairment relay: goodput in the path's unit, and the
        // relay's queue and drops ("down" carries the bulk data).
        let relay_rows: [Row; 7] = [
            (
                "goodput Mbit/s",
                1,
                |m| m.goodput_gbps.map(|g| g * 1e3),
                true,
            ),
            (
                "down queue p50 ms",
                2,
                |m| m.relay_to_client_queue_ms_p50,
                false,
            ),
            (
                "down queue p99 ms",
                2,
                |m| m.relay_to_client_queue_ms_p99,
                false,
            ),
            ("down lost", 0, |m| m.relay_to_client_dropped_loss, false),
            (
                "down queue drops",
                0,
                |m| m.relay_to_client_dropped_queue,
                false,
            ),
            ("up lost", 0, |m| m.relay_to_server_dropped_loss, false),
            (
                "up queue drops",
                0,
                |m| m.relay_to_server_dropped_queue,
                false,
            ),
        ];
        let relay = self.runs.iter().any(|r| r.relay.is_some());
        let relay_rows = if relay { &relay_rows[..] } else { &[] };
        let mut out = String::new();
        let runs_per_side = self
            .runs
            .iter()
            .filter(|r| r.side == sides.first().copied().unwrap_or(Side::OURS))
            .count();
        let _ = writeln!(
            out,
            "\n{}\n(medians of {runs_per_side} run(s) per side)",
            setup_line(&self.setup)
        );
        let _ = write!(out, "{:<24}", "");
        for side in &sides {
            let _ = write!(out, "{:>14}", side.label());
        }
        // Ratio columns are as wide as their label needs.
        let ratio_width = |i: usize| sides[i].label().len() + "/quinn".len() + 2;
        if baseline.is_some() {
            for &i in &ours {
                let label = format!("{}/quinn", sides[i].label());
                let _ = write!(out, "{label:>w$}", w = ratio_width(i));
            }
        }
        out.push('\n');
        for &(name, decimals, get, with_ratio) in rows.iter().chain(relay_rows) {
            let _ = write!(out, "{name:<24}");
            for m in &medians {
                let v = get(m);
                let v = if name.ends_with("MiB") { mib(v) } else { v };
                let _ = write!(out, "{:>14}", fmt(v, decimals));
            }
            if let Some(b) = baseline {
                for &i in &ours {
                    let cell = if with_ratio {
                        ratio(get(&medians[i]), get(&medians[b]))
                            .map_or("-".to_string(), |r| format!("{r:.2}x"))
                    } else {
                        String::new()
                    };
                    let _ = write!(out, "{cell:>w$}", w = ratio_width(i));
                }
            }
            out.push('\n');
        }
        if relay {
            out.push_str(
                "(relay: down = server to client, the bulk data; up = client to server)\n",
            );
        }
        out
    }

    /// The JSON document: the first side's medians at top level (ours, or
    /// the baseline when only it ran), every run, and with both sides the
    /// baseline medians and the ours/baseline ratios.
    pub fn json(&self) -> Value {
        let sides = self.sides();
        let mut top = match sides.first() {
            Some(&side) => self.medians(side).to_json(),
            None => Metrics::default().to_json(),
        };
        if let Some(&side) = sides.first() {
            top.insert("side".into(), side.json_name().into());
        }
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|r| {
                let mut m = r.metrics.to_json();
                m.insert("side".into(), r.side.json_name().into());
                if let Some(relay) = &r.relay {
                    m.insert("relay".into(), relay.clone());
                }
                Value::Object(m)
            })
            .collect();
        top.insert("runs".into(), Value::Array(runs));
        let num = |x: Option<f64>| x.map_or(Value::Null, Value::from);
        if sides.contains(&Side::Baseline) && sides[0].is_ours() {
            let ours = self.medians(sides[0]);
            let base = self.medians(Side::Baseline);
            top.insert(
                "ratio_goodput".into(),
                num(ratio(ours.goodput_gbps, base.goodput_gbps)),
            );
            top.insert(
                "ratio_handshakes".into(),
                num(ratio(ours.handshakes_per_s, base.handshakes_per_s)),
            );
            top.insert(
                "ratio_gbps_per_server_core".into(),
                num(ratio(ours.gbps_per_server_core, base.gbps_per_server_core)),
            );
            top.insert(
                "ratio_server_cpu_us_per_handshake".into(),
                num(ratio(
                    ours.server_cpu_us_per_handshake,
                    base.server_cpu_us_per_handshake,
                )),
            );
            top.insert(
                "ratio_server_cpu_us_per_resumed_handshake".into(),
                num(ratio(
                    ours.server_cpu_us_per_resumed_handshake,
                    base.server_cpu_us_per_resumed_handshake,
                )),
            );
            top.insert("baseline".into(), Value::Object(base.to_json()));
        }
        // --matrix: every configuration of ours, with its ratios to quinn.
        if sides.contains(&Side::Baseline) && sides.iter().filter(|s| s.is_ours()).count() > 1 {
            let base = self.medians(Side::Baseline);
            let mut variants = Map::new();
            for &side in sides.iter().filter(|s| s.is_ours()) {
                let m = self.medians(side);
                let mut v = m.to_json();
                v.insert(
                    "ratio_goodput".into(),
                    num(ratio(m.goodput_gbps, base.goodput_gbps)),
                );
                v.insert(
                    "ratio_handshakes".into(),
                    num(ratio(m.handshakes_per_s, base.handshakes_per_s)),
                );
                variants.insert(side.json_name().into(), Value::Object(v));
            }
            top.insert("variants".into(), Value::Object(variants));
        }
        // --congestion: each controller's medians, side by side.
        let controllers: Map<String, Value> = sides
            .iter()
            .filter_map(|&side| match side {
                Side::Ours(Flavor::Congestion(name)) => Some((
                    name.to_string(),
                    Value::Object(self.medians(side).to_json()),
                )),
                _ => None,
            })
            .collect();
        if !controllers.is_empty() {
            top.insert("congestion".into(), Value::Object(controllers));
        }
        top.insert("setup".into(), self.setup.clone());
        Value::Object(top)
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.json())? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) => format!("{x:.decimals$}"),
        None => "-".to_string(),
    }
}

/// One line describing the setup, from the `setup` object.
fn setup_line(setup: &Value) -> String {
    let mut parts = Vec::new();
    if let Value::Object(map) = setup {
        for (k, v) in map {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            parts.push(format!("{k}={v}"));
        }
    }
    format!("bench-40g: {}", parts.join(" "))
}

/// The setup description shared by the table header and the JSON.
pub fn setup(fields: &[(&str, Value)]) -> Value {
    let map: Map<String, Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    json!(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn medians_skip_missing_values() {
        let a = Metrics {
            goodput_gbps: Some(1.0),
            handoff_ratio: None,
            ..Default::default()
        };
        let b = Metrics {
            goodput_gbps: Some(3.0),
            handoff_ratio: Some(0.5),
            ..Default::default()
        };
        let m = Metrics::median([&a, &b]);
        assert_eq!(m.goodput_gbps, Some(2.0));
        assert_eq!(m.handoff_ratio, Some(0.5));
        assert_eq!(m.connections, None);
    }

    #[test]
    fn json_has_ratios_with_both_sides() {
        let run = |side, g| Run {
            side,
            metrics: Metrics {
                goodput_gbps: Some(g),
                handshakes_per_s: Some(g * 10.0),
                ..Default::default()
            },
            relay: None,
        };
        let report = Report {
            setup: setup(&[("duration_s", 3.into())]),
            runs: vec![run(Side::OURS, 8.0), run(Side::Baseline, 4.0)],
        };
        let j = report.json();
        assert_eq!(j["goodput_gbps"], 8.0);
        assert_eq!(j["baseline"]["goodput_gbps"], 4.0);
        assert_eq!(j["ratio_goodput"], 2.0);
        assert_eq!(j["ratio_handshakes"], 2.0);
        assert_eq!(j["runs"].as_array().unwrap().len(), 2);
        assert_eq!(j["runs"][1]["side"], "baseline");
        assert!(report.table().contains("2.00x"));
    }

    #[test]
    fn matrix_reports_every_flavor_against_quinn() {
        let run = |side, g| Run {
            side,
            metrics: Metrics {
                goodput_gbps: Some(g),
                ..Default::default()
            },
            relay: None,
        };
        let report = Report {
            setup: setup(&[]),
            runs: vec![
                run(Side::Ours(Flavor::UringSteering), 6.0),
                run(Side::Ours(Flavor::UringHandoff), 5.0),
                run(Side::Ours(Flavor::Xdp), 3.0),
                run(Side::Baseline, 4.0),
            ],
        };
        let j = report.json();
        assert_eq!(j["variants"]["uring+steer"]["ratio_goodput"], 1.5);
        assert_eq!(j["variants"]["uring-handoff"]["ratio_goodput"], 1.25);
        assert_eq!(j["variants"]["xdp"]["ratio_goodput"], 0.75);
        let table = report.table();
        assert!(table.contains("xdp/quinn"), "{table}");
        assert!(table.contains("0.75x"), "{table}");
    }

    #[test]
    fn controllers_side_by_side_with_the_relay() {
        let run = |name, g, p99| Run {
            side: Side::Ours(Flavor::Congestion(name)),
            metrics: Metrics {
                goodput_gbps: Some(g),
                relay_to_client_queue_ms_p99: Some(p99),
                relay_to_client_dropped_queue: Some(3.0),
                ..Default::default()
            },
            relay: Some(json!({ "to_client": { "dropped_queue": 3 } })),
        };
        let report = Report {
            setup: setup(&[("congestion", "cubic,bbr".into())]),
            runs: vec![
                run("cubic", 0.006, 40.0),
                run("bbr", 0.044, 12.0),
                run("cubic", 0.008, 44.0),
                run("bbr", 0.040, 10.0),
            ],
        };
        let j = report.json();
        let cubic = j["congestion"]["cubic"]["goodput_gbps"].as_f64().unwrap();
        assert!((cubic - 0.007).abs() < 1e-12, "{cubic}");
        assert_eq!(j["congestion"]["bbr"]["relay_to_client_queue_ms_p99"], 11.0);
        assert!(j.get("variants").is_none(), "no baseline, no ratios: {j}");
        assert_eq!(j["runs"][1]["side"], "bbr");
        assert_eq!(j["runs"][1]["relay"]["to_client"]["dropped_queue"], 3);
        let table = report.table();
        for cell in [
            "cubic",
            "bbr",
            "goodput Mbit/s",
            "7.0",
            "42.0",
            "42.00",
            "11.00",
        ] {
            assert!(table.contains(cell), "{cell} missing from\n{table}");
        }
    }
}
