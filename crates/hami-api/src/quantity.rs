//! Kubernetes resource quantities ("3000", "3k", "3Gi", "1.5", "2e3"),
//! parsed the way the API server does.
//!
//! A quantity is a signed decimal number followed by an optional suffix:
//! binary (`Ki Mi Gi Ti Pi Ei`), decimal (`n u m k M G T P E`) or a decimal
//! exponent (`e3`, `E-2`). [`Quantity::value`] rounds up to a whole number
//! like `resource.Quantity.Value()` does.

use std::fmt;

/// An exact quantity: `mantissa * 10^exp10 * 2^exp2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    mantissa: i128,
    exp10: i32,
    exp2: u32,
}

/// Why a string is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a quantity: {}", self.input, self.reason)
    }
}

impl std::error::Error for QuantityError {}

/// Longest digit run we keep exactly; Kubernetes itself caps precision too.
const MAX_DIGITS: usize = 30;

impl Quantity {
    pub fn parse(input: &str) -> Result<Quantity, QuantityError> {
        let err = |reason| QuantityError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        let (negative, rest) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);
        let (int_part, frac_part) = match number.split_once('.') {
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err("no digits"));
        }
        if frac_part.contains('.') {
            return Err(err("more than one decimal point"));
        }
        let digits = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        if digits.len() > MAX_DIGITS {
            return Err(err("too many digits"));
        }
        let mut mantissa: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().map_err(|_| err("bad digits"))?
        };
        if negative {
            mantissa = -mantissa;
        }
        let mut exp10 = -(frac_part.len() as i32);
        let mut exp2 = 0;
        match suffix {
            "" => {}
            "Ki" => exp2 = 10,
            "Mi" => exp2 = 20,
            "Gi" => exp2 = 30,
            "Ti" => exp2 = 40,
            "Pi" => exp2 = 50,
            "Ei" => exp2 = 60,
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            s if s.starts_with(['e', 'E']) => {
                let e: i32 = s[1..].parse().map_err(|_| err("bad exponent"))?;
                if !(-100..=100).contains(&e) {
                    return Err(err("exponent out of range"));
                }
                exp10 += e;
            }
            _ => return Err(err("unknown suffix")),
        }
        Ok(Quantity {
            mantissa,
            exp10,
            exp2,
        })
    }

    /// The value rounded up to an integer (towards +infinity), saturating
    /// at the i64 range, as `Quantity.Value()` in Kubernetes.
    pub fn value(&self) -> i64 {
        self.scaled_ceil(0)
    }

    /// The value in thousandths, rounded up (`Quantity.MilliValue()`).
    pub fn milli_value(&self) -> i64 {
        self.scaled_ceil(3)
    }

    /// True when the quantity is a whole number.
    pub fn is_integer(&self) -> bool {
        let (num, den) = self.fraction(0);
        den == 0 || num % den == 0
    }

    /// `(numerator, denominator)` of `self * 10^shift`; `den == 0` means overflow.
    fn fraction(&self, shift: i32) -> (i128, i128) {
        let e = self.exp10 + shift;
        let mut num = self.mantissa;
        let mut den: i128 = 1;
        let pow = |n: u32| 10i128.checked_pow(n);
        if e >= 0 {
            match pow(e as u32).and_then(|p| num.checked_mul(p)) {
                Some(v) => num = v,
                None => return (num.signum(), 0),
            }
        } else {
            match pow((-e) as u32) {
                Some(p) => den = p,
                None => return (0, 1),
            }
        }
        match num.checked_mul(1i128 << self.exp2) {
            Some(v) => (v, den),
            None => (num.signum(), 0),
        }
    }

    fn scaled_ceil(&self, shift: i32) -> i64 {
        let (num, den) = self.fraction(shift);
        if den == 0 {
            return if num < 0 { i64::MIN } else { i64::MAX };
        }
        let q = num.div_euclid(den) + i128::from(num.rem_euclid(den) != 0);
        q.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> i64 {
        Quantity::parse(s).unwrap().value()
    }

    #[test]
    fn plain_and_suffixed_values() {
        assert_eq!(v("3000"), 3000);
        assert_eq!(v("3k"), 3000);
        assert_eq!(v("3Ki"), 3072);
        assert_eq!(v("3Gi"), 3 * 1024 * 1024 * 1024);
        assert_eq!(v("2e3"), 2000);
        assert_eq!(v("2E-3"), 1);
        assert_eq!(v("+7"), 7);
        assert_eq!(v("0"), 0);
        assert_eq!(v(".5"), 1);
        assert_eq!(v("5."), 5);
    }

    #[test]
    fn fractions_round_up_like_kubernetes() {
        assert_eq!(v("1.5"), 2);
        assert_eq!(v("100m"), 1);
        assert_eq!(v("-1.5"), -1);
        assert_eq!(Quantity::parse("1.5").unwrap().milli_value(), 1500);
        assert_eq!(Quantity::parse("250m").unwrap().milli_value(), 250);
        assert!(!Quantity::parse("1.5").unwrap().is_integer());
        assert!(Quantity::parse("1.0").unwrap().is_integer());
        assert!(!Quantity::parse("1500m").unwrap().is_integer());
        assert!(Quantity::parse("2000m").unwrap().is_integer());
    }

    #[test]
    fn huge_values_saturate() {
        assert_eq!(
            v("9E"),
            9_000_000_000_000_000_000i128.min(i64::MAX as i128) as i64
        );
        assert_eq!(v("100Ei"), i64::MAX);
        assert_eq!(v("1e100"), i64::MAX);
    }

    #[test]
    fn bad_input_is_an_error() {
        for bad in ["", "abc", "1..2", "1x", "Gi", "1e", "1e1000", "--1", "1 Gi"] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = Quantity::parse(&s).map(|q| (q.value(), q.milli_value(), q.is_integer()));
        }

        #[test]
        fn integers_round_trip(n in 0i64..=i64::MAX / 2) {
            proptest::prop_assert_eq!(v(&n.to_string()), n);
        }
    }
}
