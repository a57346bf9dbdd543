//! What the benchmark binaries share: the median of a run's values (and
//! of runs' JSON reports, key by key), and a scratch directory for a run. Each binary compiles this module and
//! uses what it needs of it.
#![allow(dead_code)]

/// The median (the mean of the middle two for an even count); `None` for
/// no values.
pub fn median(xs: &mut [f64]) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => None,
        n if n % 2 == 1 => Some(xs[n / 2]),
        n => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

/// The median over `runs` of each of `keys` (a run without a number
/// there is left out; `null` when none has one).
pub fn medians_of(
    runs: &[serde_json::Value],
    keys: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    keys.iter()
        .map(|key| {
            let mut values: Vec<f64> = runs.iter().filter_map(|r| r[*key].as_f64()).collect();
            ((*key).to_owned(), serde_json::json!(median(&mut values)))
        })
        .collect()
}

/// `run` with `dir` empty before it and gone after it, whatever it returns.
pub fn in_scratch<T>(
    dir: &std::path::Path,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let _ = std::fs::remove_dir_all(dir);
    let result = run();
    let _ = std::fs::remove_dir_all(dir);
    result
}
