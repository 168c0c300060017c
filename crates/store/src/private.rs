//! The data directory is the operator's authority (DESIGN.md, Storage): it
//! holds the ticket-signing seed and the TLS key, so it is 0700 and every
//! file in it 0600. New files are created so; an existing, looser tree is
//! tightened at open with one log line per path changed.

use std::path::Path;

/// Creates `dir` (and its parents) with mode 0700, or tightens an existing
/// one and everything under it: directories to 0700, files to 0600.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        tighten(dir, 0)?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    Ok(())
}

#[cfg(unix)]
fn tighten(path: &Path, depth: usize) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // symlink_metadata: a link in the directory is not followed out of it.
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    let mode = meta.permissions().mode() & 0o777;
    if mode & !want != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & want))?;
        tracing::warn!(
            path = %path.display(),
            from = format_args!("{mode:04o}"),
            to = format_args!("{:04o}", mode & want),
            "tightened permissions in the data directory: others could read it"
        );
    }
    // The tree is ours and shallow (tls/ at most); the bound only stops a
    // pathological one from recursing without end.
    if meta.is_dir() && depth < 4 {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path(), depth + 1)?;
        }
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 when it does not exist, so SQLite
/// (which gives its -wal and -shm files the database's mode) never makes
/// a readable file.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).map(drop)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn new_and_existing_trees_end_private() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("a/server");
        private_dir(&dir).expect("create");
        assert_eq!(mode(&dir), 0o700);
        std::fs::create_dir(dir.join("tls")).expect("mkdir");
        std::fs::set_permissions(dir.join("tls"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(dir.join("tls/key.der"), b"k").expect("write");
        std::fs::set_permissions(
            dir.join("tls/key.der"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("tighten");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("tls")), 0o700);
        assert_eq!(mode(&dir.join("tls/key.der")), 0o600);
        private_file(&dir.join("x.db")).expect("file");
        assert_eq!(mode(&dir.join("x.db")), 0o600);
    }
}
