//! The API's unix socket: one daemon per socket path, created mode 0600, a stale socket
//! from a dead daemon replaced, a live daemon never displaced.
//!
//! Owns: [`ApiSocket::bind`] and the socket's removal at stop (or whenever it is dropped).
//! Ownership of a path is an
//! exclusive `flock` on `<socket>.lock`, held for the daemon's life: the kernel drops it
//! when the daemon dies however it dies, so a socket file whose lock is free is stale.
//! The socket is bound under a temporary name, chmod'ed to 0600 and renamed over the
//! final path, so no client ever finds a socket with looser permissions and a stale file
//! is replaced atomically.
//!
//! Must never: remove or replace a socket while another process holds its lock or answers
//! on it; follow a path that exists but is not a socket.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the socket could not be set up. Every message names `--socket`.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket's directory cannot be created.
    #[error("cannot create the API socket in {}: {error} ({hint})", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why (not a `source`: the message already says it).
        error: io::Error,
        /// What to do.
        hint: String,
    },
    /// Another daemon owns the socket.
    #[error("another coreblkd is serving on {} ({how}); stop it first, or give this one another --socket", path.display())]
    InUse {
        /// The socket.
        path: PathBuf,
        /// How we know.
        how: &'static str,
    },
    /// Something that is not a socket sits at the path.
    #[error("{} exists and is not a unix socket; refusing to replace it (remove it, or choose another --socket)", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A step failed.
    #[error("cannot {op} {}: {error} (choose another --socket?)", path.display())]
    Io {
        /// The path acted on.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why (not a `source`: the message already says it).
        error: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |error| SocketError::Io {
        path: path.to_path_buf(),
        op,
        error,
    }
}

/// The bound API socket and the lock that makes it ours.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, so we only ever remove our own.
    identity: (u64, u64),
    /// Holds the `flock`; dropped last.
    _lock: File,
    /// Whether a stale socket was replaced.
    replaced_stale: bool,
}

/// `<socket>.lock`.
#[must_use]
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The directory the socket goes in (`.` for a bare file name).
fn socket_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates the socket's directory and checks that this process may create the socket in
/// it, without touching any socket: run early, so a daemon that cannot serve its API (not
/// root, read-only `/run`) says so before it starts anything.
///
/// # Errors
/// [`SocketError::CreateDir`], naming `--socket`.
pub fn check_dir(path: &Path) -> Result<(), SocketError> {
    let dir = socket_dir(path);
    let fail = |error: io::Error| SocketError::CreateDir {
        hint: create_dir_hint(&error),
        dir: dir.clone(),
        error,
    };
    fs::create_dir_all(&dir).map_err(fail)?;
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| fail(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // `c_dir` is a NUL-terminated string that lives across the call; access()
    // only reads it.
    // SAFETY: the reasons above hold for this call.
    let rc = unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

impl ApiSocket {
    /// Takes the socket at `path`: creates its directory, takes the lock, checks that
    /// nobody answers on an existing socket, and binds a new one with mode 0600.
    ///
    /// # Errors
    /// The directory cannot be created (not root, read-only), another daemon holds the
    /// socket, a non-socket file is in the way, or binding fails.
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        let dir = socket_dir(path);
        fs::create_dir_all(&dir).map_err(|error| SocketError::CreateDir {
            hint: create_dir_hint(&error),
            dir: dir.clone(),
            error,
        })?;
        let lock_file = lock_path(path);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_file)
            .map_err(io_err(&lock_file, "open the socket lock file"))?;
        try_flock(&lock).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => SocketError::InUse {
                path: path.to_path_buf(),
                how: "it holds the socket's lock file",
            },
            _ => SocketError::Io {
                path: lock_file.clone(),
                error: e,
                op: "lock",
            },
        })?;
        let replaced_stale = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(path, "stat")(e)),
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(SocketError::InUse {
                        path: path.to_path_buf(),
                        how: "it accepts connections",
                    })
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
                    true
                }
                Err(e) => return Err(io_err(path, "probe the existing socket")(e)),
            },
        };
        let file_name = path.file_name().map_or_else(
            || "coreblkd.sock".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(&tmp, "remove the leftover temporary socket")(e))
            }
            _ => {}
        }
        let listener = UnixListener::bind(&tmp).map_err(io_err(&tmp, "bind"))?;
        let finish = || -> Result<(u64, u64), SocketError> {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .map_err(io_err(&tmp, "chmod 0600"))?;
            fs::rename(&tmp, path).map_err(io_err(path, "move the new socket to"))?;
            let meta = fs::symlink_metadata(path).map_err(io_err(path, "stat"))?;
            Ok((meta.dev(), meta.ino()))
        };
        let identity = finish().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            identity,
            _lock: lock,
            replaced_stale,
        })
    }

    /// The socket's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether binding replaced a stale socket left by a dead daemon.
    #[must_use]
    pub fn replaced_stale(&self) -> bool {
        self.replaced_stale
    }

    /// The listening socket.
    #[must_use]
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// A second handle on the listening socket (for the server's runtime).
    ///
    /// # Errors
    /// `dup` fails.
    pub fn try_clone_listener(&self) -> io::Result<UnixListener> {
        self.listener.try_clone()
    }

    /// Removes the socket file if it is still the one we created, then lets the lock go
    /// (what dropping it does; this names the intent at a stop).
    pub fn remove(self) {
        drop(self);
    }
}

impl Drop for ApiSocket {
    /// A daemon that gives up after binding (its device refused, say) or stops leaves no
    /// socket file behind. The file goes before the lock (fields drop after this), so no
    /// other daemon can have bound the path in between; the identity check keeps us off
    /// a file that is not ours anyway.
    fn drop(&mut self) {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(error) = fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), %error, "cannot remove the API socket");
            }
        }
    }
}

fn create_dir_hint(e: &io::Error) -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        format!(
            "coreblkd is not running as root (uid {euid}); run it as root, or pass --socket \
             with a path in a directory you can write"
        )
    } else if e.kind() == io::ErrorKind::ReadOnlyFilesystem {
        "the filesystem is read-only; pass --socket with a writable path".to_owned()
    } else {
        "pass --socket with a path in a directory that can be created".to_owned()
    }
}

/// An exclusive, non-blocking `flock` on `file`; EWOULDBLOCK when someone holds it.
fn try_flock(file: &File) -> io::Result<()> {
    // flock takes a file descriptor and flags only; the fd belongs to `file`,
    // which is borrowed (so open) for the whole call.
    // SAFETY: the reasons above hold for this call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_0600_refuses_a_second_owner_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sub/api.sock");
        let first = ApiSocket::bind(&path).expect("bind");
        assert!(!first.replaced_stale());
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = ApiSocket::bind(&path).expect_err("second");
        assert!(matches!(e, SocketError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("--socket"), "{e}");
        first.remove();
        assert!(!path.exists());
        // Dropped without a stop (a start-up that fails after binding): no file left.
        drop(ApiSocket::bind(&path).expect("bind again"));
        assert!(!path.exists(), "a dropped socket leaves its file behind");

        // A dead daemon's socket: the file is there, nobody listens, the lock is free.
        drop(UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let again = ApiSocket::bind(&path).expect("replace stale");
        assert!(again.replaced_stale());
        UnixStream::connect(&path).expect("the new socket answers");
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("api.sock");
        fs::write(&path, b"not a socket").expect("write");
        let e = ApiSocket::bind(&path).expect_err("file in the way");
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        assert_eq!(fs::read(&path).expect("read"), b"not a socket");
    }

    #[test]
    fn an_uncreatable_directory_names_the_flag() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("plain");
        fs::write(&file, b"").expect("write");
        let e = ApiSocket::bind(&file.join("sub/api.sock")).expect_err("not a dir");
        assert!(matches!(e, SocketError::CreateDir { .. }), "{e}");
        assert!(e.to_string().contains("--socket"), "{e}");
        let e = check_dir(&file.join("sub/api.sock")).expect_err("not a dir");
        assert!(e.to_string().contains("--socket"), "{e}");
        check_dir(&dir.path().join("run/api.sock")).expect("creatable");
        assert!(dir.path().join("run").is_dir());
    }
}
