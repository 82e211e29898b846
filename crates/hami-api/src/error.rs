//! The one error type every annotation decoder returns.

use std::fmt;

/// A value that could not be decoded. It names where the value came from
/// (usually an annotation key), which part of it is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Where the value came from, e.g. `hami.io/node-nvidia-register`.
    pub source: String,
    /// The offending part of the value, quoted as it appeared (shortened).
    pub part: String,
    /// What rule the part broke.
    pub reason: String,
}

impl DecodeError {
    pub fn new(source: impl Into<String>, part: &str, reason: impl Into<String>) -> Self {
        DecodeError {
            source: source.into(),
            part: shorten(part),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}: {}", self.source, self.part, self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// Keeps error messages readable when a whole annotation is garbage.
fn shorten(part: &str) -> String {
    const MAX: usize = 80;
    if part.chars().count() <= MAX {
        return part.to_string();
    }
    let mut s: String = part.chars().take(MAX).collect();
    s.push('…');
    s
}
