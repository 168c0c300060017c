//! Device identity as seen on the wire: a 32-byte Ed25519 public key.

use std::fmt;

/// The public key of a device; doubles as its id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("device key must be 32 bytes, got {0}")]
pub struct BadKeyLength(pub usize);

impl DeviceKey {
    pub fn from_slice(b: &[u8]) -> Result<Self, BadKeyLength> {
        <[u8; 32]>::try_from(b)
            .map(DeviceKey)
            .map_err(|_| BadKeyLength(b.len()))
    }

    /// First 8 bytes in hex: enough to tell devices apart in logs.
    pub fn short(&self) -> String {
        hex(&self.0[..8])
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey({})", self.short())
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001ABff").as_deref(), Some(&b[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn key_length_is_checked() {
        assert_eq!(DeviceKey::from_slice(&[1; 31]), Err(BadKeyLength(31)));
        assert!(DeviceKey::from_slice(&[1; 32]).is_ok());
    }
}
