//! What the benchmark binaries share: the median of a run's values.

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
