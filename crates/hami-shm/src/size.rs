//! Memory sizes as the interposer's env and limits file write them:
//! a decimal number with an optional `k`/`K`, `m`/`M` or `g`/`G` suffix,
//! powers of 1024; no suffix means bytes.

use std::fmt;

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Nothing but whitespace.
    Empty,
    /// Not `<digits>[kKmMgG]`.
    Malformed(String),
    /// The value does not fit in 64 bits of bytes.
    Overflow(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Empty => write!(f, "empty size"),
            SizeError::Malformed(s) => write!(
                f,
                "size {s:?}: must be a number with an optional k, m or g suffix (powers of 1024)"
            ),
            SizeError::Overflow(s) => write!(f, "size {s:?}: larger than 2^64 bytes"),
        }
    }
}

impl std::error::Error for SizeError {}

/// Parses `3000m`, `3g`, `512k` or `1048576` into bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let (digits, shift) = match s.as_bytes()[s.len() - 1] {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Malformed(s.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_owned()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_owned()))
}

/// Writes bytes in the shortest exact form [`parse_size`] reads back
/// (`3000m` rather than `3145728000`).
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(30, 'g'), (20, 'm'), (10, 'k')] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("3000m"), Ok(3000 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size(" 1048576 "), Ok(1 << 20));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("m"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("3 g"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("3gb"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1.5g"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17179869184g"),
            Err(SizeError::Overflow(_))
        ));
    }

    proptest! {
        #[test]
        fn format_round_trips(bytes in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }
    }
}
