//! Which paths a Node request may name: absolute, without `..`, and under the kubelet
//! directory the plugin was started with — also after following symlinks, so a link
//! planted under the kubelet directory cannot make the plugin mount over `/etc`.
//!
//! Owns: [`check_under`]. Must never: create, mount or change anything (it only reads
//! the file system to resolve links); a path is checked before anything is mounted.

use std::path::{Component, Path, PathBuf};

/// Why a path was refused (CSI answers INVALID_ARGUMENT with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Relative path.
    #[error("{field} {path:?} is not an absolute path")]
    Relative {
        /// The request field.
        field: &'static str,
        /// As given.
        path: String,
    },
    /// A `..` or `.` component, or an empty one that is not a trailing slash.
    #[error("{field} {path:?} has a '..' or '.' component; give the plain absolute path")]
    Dots {
        /// The request field.
        field: &'static str,
        /// As given.
        path: String,
    },
    /// Not under the kubelet directory (as written, or once symlinks are followed).
    #[error(
        "{field} {path:?} {how} is not under the kubelet directory {kubelet_dir:?}; this plugin \
         mounts only there (start it with --kubelet-dir set to the kubelet's --root-dir)"
    )]
    Outside {
        /// The request field.
        field: &'static str,
        /// As given.
        path: String,
        /// "as written" or "resolved to /real/path".
        how: String,
        /// The kubelet directory.
        kubelet_dir: String,
    },
}

/// Checks that `path` (request field `field`) is absolute, has no `.`/`..` components
/// and lies strictly under `kubelet_dir`, also after resolving the symlinks of the part of
/// it that exists. Returns the path as a `PathBuf` (unchanged: mounts use the path the
/// kubelet gave, which is where it looks).
///
/// # Errors
/// [`PathError`] saying which rule the path breaks.
pub fn check_under(
    field: &'static str,
    path: &str,
    kubelet_dir: &Path,
) -> Result<PathBuf, PathError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(PathError::Relative {
            field,
            path: path.to_owned(),
        });
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || path.split('/').any(|s| s == "." || s == "..")
    {
        return Err(PathError::Dots {
            field,
            path: path.to_owned(),
        });
    }
    let outside = |how: String| PathError::Outside {
        field,
        path: path.to_owned(),
        how,
        kubelet_dir: kubelet_dir.display().to_string(),
    };
    if !p.starts_with(kubelet_dir) || p == kubelet_dir {
        return Err(outside("as written".to_owned()));
    }
    // Follow symlinks: the deepest existing ancestor, canonicalized, must still be under
    // the (canonical) kubelet directory. The rest does not exist yet, has no `..`, and so
    // cannot leave it.
    let real_kubelet = kubelet_dir
        .canonicalize()
        .unwrap_or_else(|_| kubelet_dir.to_path_buf());
    let mut existing = p;
    let mut rest = PathBuf::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let full = real.join(&rest);
            if !full.starts_with(&real_kubelet) || full == real_kubelet {
                return Err(outside(format!("resolved to {}", full.display())));
            }
            break;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest = Path::new(name).join(&rest);
                existing = parent;
            }
            _ => break,
        }
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_dots_and_outside_are_refused() {
        let k = Path::new("/var/lib/kubelet");
        let f = "target_path";
        assert!(matches!(
            check_under(f, "var/lib/kubelet/x", k),
            Err(PathError::Relative { .. })
        ));
        assert!(matches!(
            check_under(f, "", k),
            Err(PathError::Relative { .. })
        ));
        for dots in [
            "/var/lib/kubelet/../../etc",
            "/var/lib/kubelet/pods/../x",
            "/var/lib/kubelet/./x",
        ] {
            assert!(
                matches!(check_under(f, dots, k), Err(PathError::Dots { .. })),
                "{dots}"
            );
        }
        for out in ["/etc", "/var/lib/kubeletx/a", "/var/lib/kubelet", "/"] {
            assert!(
                matches!(check_under(f, out, k), Err(PathError::Outside { .. })),
                "{out}"
            );
        }
        assert_eq!(
            check_under(f, "/var/lib/kubelet/pods/p/volumes/v/mount", k),
            Ok(PathBuf::from("/var/lib/kubelet/pods/p/volumes/v/mount"))
        );
        let e = check_under(f, "/etc/x", k).expect_err("outside");
        assert!(e.to_string().contains("--kubelet-dir"), "{e}");
    }

    #[test]
    fn a_symlink_out_of_the_kubelet_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kubelet = dir.path().join("kubelet");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(kubelet.join("pods")).expect("mkdir");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        std::os::unix::fs::symlink(&elsewhere, kubelet.join("pods/escape")).expect("symlink");
        let through = kubelet.join("pods/escape/target");
        let e = check_under("target_path", through.to_str().expect("utf-8"), &kubelet)
            .expect_err("a link out");
        assert!(matches!(e, PathError::Outside { .. }), "{e}");
        assert!(e.to_string().contains("resolved to"), "{e}");
        // A path that does not exist yet under a real directory is fine.
        let fine = kubelet.join("pods/p/new/mount");
        assert!(check_under("target_path", fine.to_str().expect("utf-8"), &kubelet).is_ok());
        // A kubelet directory that is itself a link is followed on both sides.
        let link = dir.path().join("kubelet-link");
        std::os::unix::fs::symlink(&kubelet, &link).expect("symlink");
        let via = link.join("pods/x");
        assert!(check_under("target_path", via.to_str().expect("utf-8"), &link).is_ok());
    }
}
