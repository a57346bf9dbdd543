//! Each owner's compute budget on this node: the fuel its VMs may burn,
//! drawn down by every call and refilled continuously at the owner's fuel
//! quota per second, up to one second's worth. A call starts while the
//! balance is above zero and is charged the fuel it burned when it ends,
//! so the balance goes below zero by at most the calls running at once
//! (each at most the quota). Sans-IO: the caller gives the time.

use dataplane::assets::memory::Owner;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Owners whose balance is kept; past it, the full ones are forgotten
/// (a full balance is what a forgotten owner starts with).
pub const OWNERS_KEPT_MAX: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Balance {
    fuel: i128,
    at: Instant,
}

/// The owners' balances.
#[derive(Default, Debug)]
pub struct Budgets {
    balances: HashMap<Owner, Balance>,
}

/// Why a call may not start: its owner's budget is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    /// Until the balance is above zero again.
    pub wait: Duration,
}

impl Budgets {
    /// Whether a call of `owner`, whose quota is `per_second` fuel a second,
    /// may start at `now`.
    pub fn draw(&mut self, owner: &Owner, per_second: u64, now: Instant) -> Result<(), Spent> {
        let Some(balance) = self.balances.get_mut(owner) else {
            return Ok(());
        };
        refill(balance, per_second, now);
        if balance.fuel > 0 {
            return Ok(());
        }
        // Back above zero after (1 - fuel) / per_second seconds.
        let missing = (1 - balance.fuel) as u128;
        let nanos = missing * 1_000_000_000 / u128::from(per_second.max(1));
        Err(Spent {
            wait: Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)),
        })
    }

    /// Charge `owner` the `fuel` a call burned, at `now`.
    pub fn charge(&mut self, owner: &Owner, per_second: u64, fuel: u64, now: Instant) {
        if fuel == 0 {
            return;
        }
        if self.balances.len() >= OWNERS_KEPT_MAX && !self.balances.contains_key(owner) {
            self.forget_full(per_second, now);
        }
        let balance = self.balances.entry(*owner).or_insert(Balance {
            fuel: i128::from(per_second),
            at: now,
        });
        refill(balance, per_second, now);
        balance.fuel -= i128::from(fuel);
    }

    /// Forget the owners whose balance refilled to full (as a forgotten
    /// owner's is). Each owner's quota is taken as `per_second`: at worst
    /// an owner of a larger quota is forgotten early, with a full balance
    /// of its own quota when it comes back.
    fn forget_full(&mut self, per_second: u64, now: Instant) {
        self.balances.retain(|_, balance| {
            refill(balance, per_second, now);
            balance.fuel < i128::from(per_second)
        });
    }

    /// Owners whose balance is kept.
    pub fn len(&self) -> usize {
        self.balances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.balances.is_empty()
    }
}

/// Refill `balance` at `per_second` fuel a second up to one second's
/// worth, as of `now`.
fn refill(balance: &mut Balance, per_second: u64, now: Instant) {
    let elapsed = now.saturating_duration_since(balance.at);
    let gained = i128::from(per_second) * elapsed.as_nanos() as i128 / 1_000_000_000;
    balance.fuel = (balance.fuel + gained).min(i128::from(per_second));
    balance.at = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_draw_the_balance_down_and_time_refills_it() {
        let mut budgets = Budgets::default();
        let owner = Owner([1; 32]);
        let other = Owner([2; 32]);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        // Full at first (1 000): a call starts while anything is left, and
        // is charged what it burned, below zero too.
        budgets.draw(&owner, 1000, start).unwrap();
        budgets.charge(&owner, 1000, 600, start);
        budgets.draw(&owner, 1000, start).unwrap();
        budgets.charge(&owner, 1000, 900, start);
        let spent = budgets.draw(&owner, 1000, start).unwrap_err();
        assert_eq!(spent.wait, Duration::from_millis(501));
        // Another owner is not touched.
        budgets.draw(&other, 1000, start).unwrap();
        // 1 000 a second: at zero after half a second, above it after.
        budgets.draw(&owner, 1000, at(500)).unwrap_err();
        budgets.draw(&owner, 1000, at(502)).unwrap();
        // Never refilled past one second's worth.
        budgets.charge(&owner, 1000, 1000, at(100_000));
        budgets.draw(&owner, 1000, at(100_000)).unwrap_err();
    }

    #[test]
    fn full_balances_are_forgotten_past_the_bound() {
        let mut budgets = Budgets::default();
        let start = Instant::now();
        for i in 0..OWNERS_KEPT_MAX as u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            budgets.charge(&Owner(key), 1000, 10, start);
        }
        assert_eq!(budgets.len(), OWNERS_KEPT_MAX);
        // A second later they are all full again: the next owner's charge
        // forgets them.
        let later = start + Duration::from_secs(1);
        budgets.charge(&Owner([9; 32]), 1000, 10, later);
        assert_eq!(budgets.len(), 1);
    }
}
