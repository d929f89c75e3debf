//! Candle intervals, aligned to the UTC epoch as Binance aligns its klines.

use std::fmt;
use std::str::FromStr;

/// The longest interval accepted: a leap year. Binance's longest fixed one is
/// `3d`; a longer name is garbage, and the bound keeps every window of a
/// validated time far from the ends of `i64`.
pub const MAX_INTERVAL_MICROS: i64 = 366 * 86_400_000_000;

/// A fixed-length window size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interval {
    /// Binance's name for it, e.g. `5m`; carried in the candle.
    name: String,
    /// Length in microseconds.
    micros: i64,
}

impl Interval {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn micros(&self) -> i64 {
        self.micros
    }

    /// Start of the window holding `t` (µs since the epoch). For validated
    /// times (`validate::Rules`); [`Interval::checked_open_of`] for any.
    #[inline]
    pub fn open_of(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.micros)
    }

    /// [`Interval::open_of`] for any `t`: `None` where the window would start
    /// before the smallest `i64`.
    pub fn checked_open_of(&self, t: i64) -> Option<i64> {
        t.checked_sub(t.rem_euclid(self.micros))
    }

    /// Binance's close time of the window opening at `open`: the last
    /// millisecond inside it. For validated times, like [`Interval::open_of`].
    #[inline]
    pub fn close_of(&self, open: i64) -> i64 {
        open + self.micros - 1_000
    }
}

impl FromStr for Interval {
    type Err = String;

    /// Parses `<n>s`, `<n>m`, `<n>h` or `<n>d` (e.g. `1s`, `5s`, `1m`, `1h`, `1d`),
    /// at most [`MAX_INTERVAL_MICROS`] long. The name may come from any
    /// writer's record, so the length is computed with checked arithmetic.
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("invalid interval {s:?}: use <n>s, <n>m, <n>h or <n>d, e.g. 1s, 5s, 1m, 5m, 1h, 1d");
        let unit = match s.chars().last() {
            Some('s') => 1_000_000,
            Some('m') => 60_000_000,
            Some('h') => 3_600_000_000,
            Some('d') => 86_400_000_000,
            Some('w' | 'M') => {
                return Err(format!(
                    "interval {s:?} is not supported: weeks and months are not fixed UTC windows"
                ))
            }
            _ => return Err(err()),
        };
        let n: i64 = s[..s.len() - 1].parse().map_err(|_| err())?;
        if n <= 0 {
            return Err(err());
        }
        match n.checked_mul(unit) {
            Some(micros) if micros <= MAX_INTERVAL_MICROS => Ok(Interval {
                name: s.to_owned(),
                micros,
            }),
            _ => Err(format!("interval {s:?} is longer than 366 days")),
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, t: i64, open: i64, close: i64) {
        let i: Interval = name.parse().unwrap();
        assert_eq!((i.open_of(t), i.close_of(i.open_of(t))), (open, close), "{name} at {t}");
    }

    #[test]
    fn windows_align_to_the_epoch_like_binance() {
        // 2025-03-04 00:00:04.349 UTC.
        check(
            "1m",
            1_741_046_404_349_000,
            1_741_046_400_000_000,
            1_741_046_459_999_000,
        );
        check(
            "5s",
            1_741_046_404_349_000,
            1_741_046_400_000_000,
            1_741_046_404_999_000,
        );
        check(
            "1d",
            1_741_046_404_349_000,
            1_741_046_400_000_000,
            1_741_132_799_999_000,
        );
        check("1s", -1, -1_000_000, -1_000);
    }

    #[test]
    fn bad_names_are_refused_clearly() {
        assert!("0m".parse::<Interval>().is_err());
        assert!("1x".parse::<Interval>().unwrap_err().contains("use <n>s"));
        assert!("1w".parse::<Interval>().unwrap_err().contains("not supported"));
        // 2^58 seconds overflows i64 µs (it wrapped to 0 before being checked).
        assert!("288230376151711744s"
            .parse::<Interval>()
            .unwrap_err()
            .contains("longer than 366 days"));
        assert!("9223372036854775807d".parse::<Interval>().is_err());
        assert!("366d".parse::<Interval>().is_ok());
        assert!("367d".parse::<Interval>().is_err());
    }

    #[test]
    fn windows_at_the_ends_of_i64_are_checked() {
        let i: Interval = "1s".parse().unwrap();
        assert_eq!(i.checked_open_of(i64::MIN), None);
        assert_eq!(
            i.checked_open_of(i64::MAX),
            Some(i64::MAX - i64::MAX.rem_euclid(1_000_000))
        );
    }
}
