//! Network namespace handles.
//!
//! Named namespaces live under `/run/netns` exactly as `ip netns` keeps them, so
//! operators can inspect a lab with `ip -n NAME ...`. Work inside a namespace
//! happens on a dedicated thread that enters it with `setns` and never leaves
//! it; that thread ends when the work is done, so no thread of the process can
//! be left in the wrong namespace, even on panic.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

pub const NETNS_DIR: &str = "/run/netns";

/// A namespace could not be opened, entered, created or removed; every
/// variant names the namespace (its `/run/netns` name or its path).
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace '{name}' does not exist ({path}): {io}")]
    NotFound {
        name: String,
        path: String,
        io: std::io::Error,
    },
    #[error("cannot open network namespace {path}: {io}")]
    Open { path: String, io: std::io::Error },
    #[error("duplicate the handle of network namespace '{name}': {io}")]
    Clone { name: String, io: std::io::Error },
    #[error("setns into network namespace '{name}': {errno}")]
    Enter { name: String, errno: nix::Error },
    #[error("spawn a thread for network namespace '{name}': {io}")]
    Spawn { name: String, io: std::io::Error },
    #[error("start a runtime inside network namespace '{name}': {io}")]
    Runtime { name: String, io: std::io::Error },
    #[error("work inside network namespace '{name}' panicked")]
    Panicked { name: String },
    #[error("invalid network namespace name '{name}': use 1-64 characters from [A-Za-z0-9._-]")]
    InvalidName { name: String },
    /// Making `/run/netns` a shared mount failed at `step`.
    #[error("{step}: {errno}")]
    PrepareDir { step: String, errno: String },
    #[error("create network namespace '{name}': {path} exists or cannot be created: {io}")]
    Exists {
        name: String,
        path: String,
        io: std::io::Error,
    },
    #[error("create network namespace '{name}': {step}: {errno}")]
    Create {
        name: String,
        step: String,
        errno: nix::Error,
    },
    #[error("creating network namespace '{name}' panicked")]
    CreatePanicked { name: String },
    #[error("remove {path}: {io}")]
    Remove { path: String, io: std::io::Error },
    /// Loopback could not be brought up in a new namespace.
    #[error("{0}")]
    Loopback(#[from] crate::dataplane::sysctl::SysctlError),
}

/// An open handle on a network namespace (keeps it alive while open).
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    /// Open the named namespace `/run/netns/NAME`.
    pub fn open(name: &str) -> Result<Self, NetnsError> {
        let path = Path::new(NETNS_DIR).join(name);
        let file = File::open(&path).map_err(|io| NetnsError::NotFound {
            name: name.to_string(),
            path: path.display().to_string(),
            io,
        })?;
        Ok(Netns {
            name: name.to_string(),
            file,
        })
    }

    /// Open a namespace by any path (e.g. `/proc/PID/ns/net` or a CNI_NETNS path).
    pub fn open_path(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|io| NetnsError::Open {
            path: path.display().to_string(),
            io,
        })?;
        Ok(Netns {
            name: path.display().to_string(),
            file,
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open_path(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    pub fn try_clone(&self) -> Result<Self, NetnsError> {
        Ok(Netns {
            name: self.name.clone(),
            file: self.file.try_clone().map_err(|io| NetnsError::Clone {
                name: self.name.clone(),
                io,
            })?,
        })
    }

    /// Run `f` on a fresh thread that has entered this namespace. The thread
    /// exits afterwards, so the namespace switch can never leak.
    /// `f`'s error type only needs to hold a [`NetnsError`] (entering the
    /// namespace can fail before `f` runs).
    pub fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<NetnsError> + Send + 'static,
        F: FnOnce() -> Result<T, E> + Send + 'static,
    {
        let ns = self.try_clone()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name("vxm-netns".into())
            .spawn(move || -> Result<T, E> {
                ns.enter()?;
                f()
            })
            .map_err(|io| NetnsError::Spawn {
                name: name.clone(),
                io,
            })?
            .join()
            .map_err(|_| NetnsError::Panicked { name })?
    }

    /// `setns` the calling thread into this namespace.
    fn enter(&self) -> Result<(), NetnsError> {
        setns(self.fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Enter {
            name: self.name.clone(),
            errno,
        })
    }

    /// Run the async job `f` inside this namespace: on a fresh thread that
    /// has entered it, with its own single-threaded tokio runtime, so every
    /// socket the job opens (an etcd client, say) belongs to the namespace.
    /// The caller's runtime is not blocked; the thread ends with the job.
    pub async fn run_async<T, E, F, Fut>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<NetnsError> + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let ns = self.try_clone()?;
        let name = self.name.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("vxm-netns-rt".into())
            .spawn(move || {
                let r = (|| -> Result<T, E> {
                    ns.enter()?;
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|io| NetnsError::Runtime {
                            name: ns.name.clone(),
                            io,
                        })?
                        .block_on(f())
                })();
                let _ = tx.send(r);
            })
            .map_err(|io| NetnsError::Spawn {
                name: name.clone(),
                io,
            })?;
        rx.await.map_err(|_| NetnsError::Panicked { name })?
    }

    /// Make `cmd` enter this namespace between fork and exec (the child runs
    /// inside it; the caller's thread never moves). Keep `self` alive until
    /// `spawn` has returned: the child uses its file descriptor.
    pub fn enter_on_exec(&self, cmd: &mut std::process::Command) {
        let fd = self.raw_fd();
        // SAFETY: only setns, an async-signal-safe syscall, runs in the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Enter this namespace for the calling thread for good. Only for the start
    /// of a process (before any other thread exists), e.g. `vxmesh --netns`.
    pub fn enter_for_process(&self) -> Result<(), NetnsError> {
        self.enter()
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Check a namespace name: no path separators, sane length.
pub fn validate_name(name: &str) -> Result<(), NetnsError> {
    if name.is_empty()
        || name.len() > 64
        || name.contains('/')
        || name == "."
        || name == ".."
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(NetnsError::InvalidName {
            name: name.to_string(),
        });
    }
    Ok(())
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Make `/run/netns` a shared mount point, as `ip netns add` does, so bind
/// mounts of namespaces propagate to other mount namespaces.
fn prepare_netns_dir() -> Result<(), NetnsError> {
    let failed = |step: &str, errno: String| NetnsError::PrepareDir {
        step: step.to_string(),
        errno,
    };
    std::fs::create_dir_all(NETNS_DIR)
        .map_err(|e| failed(&format!("create {NETNS_DIR}"), e.to_string()))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, NETNS_DIR, Some("none"), shared, None::<&str>).is_err() {
        mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| {
            failed(
                &format!("bind-mount {NETNS_DIR} onto itself"),
                e.to_string(),
            )
        })?;
        mount(None::<&str>, NETNS_DIR, Some("none"), shared, None::<&str>)
            .map_err(|e| failed(&format!("make {NETNS_DIR} a shared mount"), e.to_string()))?;
    }
    Ok(())
}

/// Create a new named network namespace (fails if it exists) with loopback up.
pub fn create(name: &str) -> Result<Netns, NetnsError> {
    validate_name(name)?;
    prepare_netns_dir()?;
    let path = netns_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|io| NetnsError::Exists {
            name: name.to_string(),
            path: path.display().to_string(),
            io,
        })?;
    let target = path.clone();
    let new_name = name.to_string();
    let res = std::thread::Builder::new()
        .name("vxm-netns-new".into())
        .spawn(move || -> Result<(), NetnsError> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|errno| NetnsError::Create {
                name: new_name.clone(),
                step: "unshare(CLONE_NEWNET)".into(),
                errno,
            })?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|errno| NetnsError::Create {
                name: new_name,
                step: format!("bind-mount new namespace onto {}", target.display()),
                errno,
            })?;
            Ok(())
        })
        .map_err(|io| NetnsError::Spawn {
            name: name.to_string(),
            io,
        })?
        .join()
        .map_err(|_| NetnsError::CreatePanicked {
            name: name.to_string(),
        });
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    }
    let ns = Netns::open(name)?;
    ns.run(|| crate::dataplane::sysctl::set_loopback_up().map_err(NetnsError::from))?;
    Ok(ns)
}

/// Delete a named namespace. Missing namespaces are not an error.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(|io| NetnsError::Remove {
        path: path.display().to_string(),
        io,
    })?;
    Ok(())
}

/// Names of all namespaces under /run/netns starting with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// RAII guard for a namespace that must disappear when dropped (tests, lab).
#[derive(Debug)]
pub struct NetnsGuard {
    pub name: String,
}

impl NetnsGuard {
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        create(name)?;
        Ok(NetnsGuard {
            name: name.to_string(),
        })
    }

    pub fn open(&self) -> Result<Netns, NetnsError> {
        Netns::open(&self.name)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            tracing::warn!("failed to delete namespace {}: {e:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("vxm-lab-h1").is_ok());
        assert!(validate_name("../etc").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
    }
}
