//! `LIBCUDA_LOG_LEVEL` logging to stderr: `[HAMI-core <LEVEL>(<pid>)]: ...`.
//!
//! Formats into a stack buffer and writes it with one `write(2)`: no heap
//! allocation, no lock, usable from any hook.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

pub(crate) const ERROR: u8 = 0;
pub(crate) const WARN: u8 = 1;
pub(crate) const INFO: u8 = 3;
pub(crate) const DEBUG: u8 = 4;

/// Current level; 2 (the default) shows errors and warnings. `UNSET` until
/// the first message, which reads `LIBCUDA_LOG_LEVEL` with `getenv` (no
/// allocation), so messages before the interposer's initialisation obey it.
pub(crate) static LEVEL: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;

pub(crate) fn enabled(level: u8) -> bool {
    let mut current = LEVEL.load(Relaxed);
    if current == UNSET {
        // SAFETY: NUL-terminated name; the value is read immediately.
        let v = unsafe { libc::getenv(c"LIBCUDA_LOG_LEVEL".as_ptr()) };
        current = 2;
        if !v.is_null() {
            // SAFETY: getenv returns a NUL-terminated string.
            let s = unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes();
            if let [d @ b'0'..=b'4'] = s {
                current = d - b'0';
            }
        }
        LEVEL.store(current, Relaxed);
    }
    level <= current
}

struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub(crate) fn write(level: u8, args: fmt::Arguments<'_>) {
    let name = match level {
        ERROR => "ERROR",
        WARN => "WARN",
        INFO => "INFO",
        _ => "DEBUG",
    };
    let mut b = StackBuf {
        buf: [0; 512],
        len: 0,
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(b, "[HAMI-core {name}({pid})]: ");
    let _ = b.write_fmt(args);
    b.buf[b.len] = b'\n';
    // SAFETY: writing our own buffer to fd 2.
    unsafe { libc::write(2, b.buf.as_ptr().cast(), b.len + 1) };
}

macro_rules! hlog {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)*));
        }
    };
}
