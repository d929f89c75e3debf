//! What a source hands to the publisher: a typed record for its entity topic, or
//! a reject that becomes a dead letter. Pure data.

use rust_decimal::Decimal;
pub use tickpipe_ops::now_micros;
use tickpipe_schemas::validate::Rules;
use tickpipe_schemas::{AnyRecord, Micros, Source, Stage, Topic};

/// One unit of output.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A record for its entity topic.
    Record(AnyRecord),
    Reject(Reject),
}

impl<R> From<R> for Item
where
    AnyRecord: From<R>,
{
    fn from(r: R) -> Self {
        Item::Record(r.into())
    }
}

/// Input that could not become a record, kept with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// Which source saw it (`binance-ws`, `coincap-rest`, `replay`, ...): a metric label.
    pub component: &'static str,
    /// Where it failed: `Parse`, `Validate` or `Encode`.
    pub stage: Stage,
    /// Why, in words a user can act on.
    pub reason: String,
    /// The input exactly as received, so nothing is lost.
    pub raw: Vec<u8>,
    /// The topic it was meant for, when that is known.
    pub topic: Option<Topic>,
    pub source: Source,
}

impl Reject {
    pub fn parse(component: &'static str, source: Source, raw: &[u8], reason: impl Into<String>) -> Self {
        Reject {
            component,
            stage: Stage::Parse,
            reason: reason.into(),
            raw: raw.to_vec(),
            topic: None,
            source,
        }
    }
}

impl Item {
    /// Input that did not parse: a parse-stage reject carrying `raw`.
    pub fn unparsed(component: &'static str, source: Source, raw: &[u8], reason: impl Into<String>) -> Item {
        Item::Reject(Reject::parse(component, source, raw, reason))
    }

    /// The entity topic the item is published to.
    pub fn topic(&self) -> Topic {
        match self {
            Item::Record(r) => r.topic(),
            Item::Reject(_) => Topic::DeadLetters,
        }
    }

    /// Runs the meaning checks on a record; a failing record becomes a reject that
    /// carries `raw` (the input it was parsed from).
    pub fn validated(self, rules: &Rules, component: &'static str, raw: &[u8]) -> Item {
        let Item::Record(r) = &self else {
            return self;
        };
        match r.validate(rules) {
            Ok(()) => self,
            Err(reason) => Item::Reject(Reject {
                component,
                stage: Stage::Validate,
                reason,
                raw: raw.to_vec(),
                topic: Some(r.topic()),
                source: r.source(),
            }),
        }
    }
}

/// An exact decimal from an exchange's string. Trailing zeros beyond the 28
/// digits a `Decimal` holds are removed first (CoinCap sends 36-digit strings
/// such as `19873412.0000000000000000`); anything else that does not fit is an
/// error, never rounded.
pub fn decimal(field: &str, s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    let t = if t.contains('.') && !t.contains(['e', 'E']) {
        t.trim_end_matches('0').trim_end_matches('.')
    } else {
        t
    };
    // `.000` trims to nothing: it was a zero.
    let t = if t.is_empty() && !s.trim().is_empty() { "0" } else { t };
    Decimal::from_str_exact(t).map_err(|e| format!("{field}: {s:?} is not an exact decimal ({e})"))
}

/// Microseconds from an exchange time in ms or µs, told apart by magnitude
/// (Binance spot files switched to µs in 2025; 10^14 ms is in the year 5138).
pub fn micros(t: i64) -> Micros {
    if t.unsigned_abs() >= 100_000_000_000_000 {
        t
    } else {
        t.saturating_mul(1000)
    }
}

/// Validation rules at the current wall clock.
pub fn rules_now() -> Rules {
    Rules::at(now_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_and_long_zero_tails_are_accepted() {
        let check =
            |s: &str, want: &str| assert_eq!(decimal("x", s).map(|d| d.to_string()), Ok(want.to_owned()), "{s}");
        check("68040.01000000", "68040.01");
        check("19873412.0000000000000000000000000000", "19873412");
        check("0.00000001", "0.00000001");
        check("-1.5", "-1.5");
        check("42", "42");
        assert!(decimal("x", "1.0000000000000000000000000000001").is_err());
        assert!(decimal("x", "abc").is_err());
        assert!(decimal("x", "").is_err());
        assert!(decimal("x", "0.000").is_ok_and(|d| d.is_zero()));
    }

    #[test]
    fn times_in_ms_and_us_are_told_apart() {
        assert_eq!(micros(1_767_225_600_100), 1_767_225_600_100_000);
        assert_eq!(micros(1_741_046_401_271_000), 1_741_046_401_271_000);
    }
}
