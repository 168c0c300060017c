//! The device's Ed25519 key pair, kept in its data directory (mode 0600),
//! created on first run. The public key is the device id.

use ed25519_dalek::SigningKey;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: expected a 32-byte key, found {1} bytes")]
    Corrupt(PathBuf, usize),
    #[error("no randomness available for a new key")]
    Rng,
}

pub fn generate() -> Result<SigningKey, IdentityError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| IdentityError::Rng)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Loads the key at `path`, or creates it (and its directory) with mode 0600.
pub fn load_or_create(path: &Path) -> Result<SigningKey, IdentityError> {
    let io = |e| IdentityError::Io(path.to_path_buf(), e);
    match std::fs::read(path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| IdentityError::Corrupt(path.to_path_buf(), bytes.len()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                // Only the owner may list or read the device's directory.
                let mut b = std::fs::DirBuilder::new();
                b.recursive(true);
                #[cfg(unix)]
                std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
                b.create(dir).map_err(io)?;
            }
            let key = generate()?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(path).map_err(io)?;
            f.write_all(&key.to_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/device.key");
        let a = load_or_create(&p).expect("create");
        let b = load_or_create(&p).expect("load");
        assert_eq!(a.to_bytes(), b.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&p, b"short").expect("write");
        assert!(matches!(
            load_or_create(&p),
            Err(IdentityError::Corrupt(_, 5))
        ));
    }
}
