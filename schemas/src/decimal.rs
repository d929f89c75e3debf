//! Exact decimals on the wire: Avro `bytes` with logical type `decimal(38, 18)`.
//!
//! The unscaled value is the two's-complement big-endian integer of the value times
//! 10^18, in the fewest bytes (as Java's `BigInteger.toByteArray`, fastavro and
//! apache-avro write it). Nothing is ever rounded: a value with more than 18
//! fractional digits, or with 20 or more integer digits, is refused.

use rust_decimal::Decimal;

/// Fractional digits carried on the wire.
pub const SCALE: u32 = 18;
/// Total digits carried on the wire.
pub const PRECISION: u32 = 38;

const POW10: [i128; 19] = {
    let mut t = [1i128; 19];
    let mut i = 1;
    while i < 19 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};
const LIMIT: i128 = POW10[18] * POW10[18] * 100; // 10^38

/// Why a decimal cannot be carried exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("{0} has more than 18 fractional digits")]
    TooPrecise(Decimal),
    #[error("{0} has more than 20 integer digits")]
    TooLarge(Decimal),
}

/// The unscaled integer of `d` at scale 18.
#[inline]
pub fn to_unscaled(d: &Decimal) -> Result<i128, DecimalError> {
    let m = d.mantissa();
    let s = d.scale();
    let v = if s <= SCALE {
        m.checked_mul(POW10[(SCALE - s) as usize])
            .ok_or(DecimalError::TooLarge(*d))?
    } else {
        let div = POW10[(s - SCALE) as usize];
        if m % div != 0 {
            return Err(DecimalError::TooPrecise(*d));
        }
        m / div
    };
    if v >= LIMIT || v <= -LIMIT {
        return Err(DecimalError::TooLarge(*d));
    }
    Ok(v)
}

/// `p × q` as an unscaled integer at scale 18, computed from the mantissas so
/// that it is exact (rust_decimal rounds a product beyond 28 digits); `None`
/// when it does not fit decimal(38, 18) exactly.
#[inline]
pub fn product_unscaled(p: &Decimal, q: &Decimal) -> Option<i128> {
    let exact = |p: &Decimal, q: &Decimal| {
        let scale = (p.scale() + q.scale()) as usize;
        let v = p
            .mantissa()
            .checked_mul(q.mantissa())?
            .checked_mul(*POW10.get(18usize.checked_sub(scale)?)?)?;
        (v > -LIMIT && v < LIMIT).then_some(v)
    };
    // Trailing zeros may push the combined scale past 18; without them it may fit.
    exact(p, q).or_else(|| exact(&p.normalize(), &q.normalize()))
}

/// Appends the minimal two's-complement big-endian bytes of `v`, length-prefixed.
#[inline]
pub fn put_unscaled(out: &mut Vec<u8>, v: i128) {
    let be = v.to_be_bytes();
    let sign = if v < 0 { 0xffu8 } else { 0 };
    let mut start = 0;
    // Drop a leading sign byte while the next byte still carries the sign bit.
    while start < 15 && be[start] == sign && (be[start + 1] & 0x80) == (sign & 0x80) {
        start += 1;
    }
    crate::wire::put_bytes(out, &be[start..]);
}

/// Reads the unscaled integer from two's-complement big-endian bytes.
#[inline]
pub fn unscaled_from_bytes(raw: &[u8]) -> Option<i128> {
    if raw.is_empty() {
        return Some(0);
    }
    // Longer encodings are accepted only when the extra leading bytes are sign
    // extension.
    let (head, tail) = if raw.len() > 16 {
        raw.split_at(raw.len() - 16)
    } else {
        (&raw[..0], raw)
    };
    let negative = raw[0] & 0x80 != 0;
    let ext = if negative { 0xff } else { 0 };
    if head.iter().any(|&b| b != ext) || (!head.is_empty() && (tail[0] & 0x80 != 0) != negative) {
        return None;
    }
    let mut buf = [ext; 16];
    buf[16 - tail.len()..].copy_from_slice(tail);
    Some(i128::from_be_bytes(buf))
}

/// The decimal for an unscaled integer at scale 18, with trailing zeros removed.
#[inline]
pub fn from_unscaled(v: i128) -> Option<Decimal> {
    if v >= LIMIT || v <= -LIMIT {
        return None;
    }
    if v == 0 {
        return Some(Decimal::ZERO);
    }
    // One 128-bit division splits off the fraction; the trailing zeros are then
    // stripped with 64-bit arithmetic, which is far cheaper.
    let negative = v < 0;
    let abs = v.unsigned_abs();
    let int = abs / POW10[18] as u128;
    let mut frac = (abs % POW10[18] as u128) as u64;
    let (mantissa, scale) = if frac == 0 {
        (int, 0)
    } else {
        let mut scale = SCALE;
        while frac % 10 == 0 {
            frac /= 10;
            scale -= 1;
        }
        (int * POW10[scale as usize] as u128 + u128::from(frac), scale)
    };
    let m = i128::try_from(mantissa).ok()?;
    Decimal::try_from_i128_with_scale(if negative { -m } else { m }, scale).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn check(text: &str, wire: &[u8]) {
        let d = Decimal::from_str(text).unwrap();
        let v = to_unscaled(&d).unwrap();
        let mut out = Vec::new();
        put_unscaled(&mut out, v);
        assert_eq!(&out[1..], wire, "bytes of {text}");
        assert_eq!(unscaled_from_bytes(wire), Some(v));
        assert_eq!(from_unscaled(v), Some(d));
    }

    #[test]
    fn minimal_twos_complement() {
        check("0", &[0x00]);
        check("0.000000000000000001", &[0x01]);
        check("-0.000000000000000001", &[0xff]);
        check("0.000000000000000128", &[0x00, 0x80]);
        check("-0.000000000000000128", &[0x80]);
        check("-0.000000000000000129", &[0xff, 0x7f]);
        check("1", &[0x0d, 0xe0, 0xb6, 0xb3, 0xa7, 0x64, 0x00, 0x00]);
    }

    #[test]
    fn exact_values_survive() {
        for s in [
            "68040.01",
            "0.00150000",
            "19873412.0000000000000000",
            "16.903027981466749702",
            "99999999999999999999.999999",
        ] {
            let d = Decimal::from_str(s).unwrap();
            let back = from_unscaled(to_unscaled(&d).unwrap()).unwrap();
            assert_eq!(back, d);
            assert_eq!(back.to_string(), d.normalize().to_string());
        }
    }

    #[test]
    fn refuses_instead_of_rounding() {
        let d = Decimal::from_str("0.0000000000000000001").unwrap();
        assert_eq!(to_unscaled(&d), Err(DecimalError::TooPrecise(d)));
        let d = Decimal::from_str("100000000000000000000").unwrap();
        assert_eq!(to_unscaled(&d), Err(DecimalError::TooLarge(d)));
    }

    #[test]
    fn products_are_exact_or_refused() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(
            product_unscaled(&d("0.23103"), &d("243.0")),
            to_unscaled(&d("56.14029")).ok()
        );
        // 99 x 9999999999.999999999999999999 has 30 digits: exact here, where
        // rust_decimal would round.
        let big = product_unscaled(&d("99"), &d("9999999999.999999999999999999")).unwrap();
        assert_eq!(big, 989_999_999_999_999_999_999_999_999_901);
        assert_eq!(product_unscaled(&d("0.0000000001"), &d("0.000000001")), None);
        assert_eq!(
            product_unscaled(&d("0.10000000000"), &d("0.10000000000")),
            to_unscaled(&d("0.01")).ok()
        );
    }

    #[test]
    fn sign_extended_long_encodings_are_read() {
        assert_eq!(unscaled_from_bytes(&[0u8; 20]), Some(0));
        let mut neg = vec![0xffu8; 18];
        neg.push(0x7f);
        assert_eq!(unscaled_from_bytes(&neg), Some(-129));
        assert_eq!(unscaled_from_bytes(&[0x01; 17]), None);
    }
}
