//! X25519 key pairs of the secure underlay: generation, base64 text as `wg`
//! writes it, and key files that only their owner can read.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

/// The file in the state dir that holds the node's key when no key file is
/// configured.
pub const STATE_KEY_FILE: &str = "wg.key";

/// The file in the state dir that holds the key a rotation switches to
/// (`vxmesh rotate-key` writes it; the agent moves it over the node's key
/// when the switch is done).
pub const NEXT_KEY_FILE: &str = "wg.next.key";

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;

/// A problem with a key or a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not base64 ({source}): write the 44-character key `vxmesh keygen` prints")]
    Base64 {
        what: String,
        source: base64::DecodeError,
    },
    #[error(
        "{what} decodes to {len} bytes, not {KEY_LEN}: write the 44-character key `vxmesh keygen` prints"
    )]
    Length { what: String, len: usize },
    #[error(
        "key file {path} has mode {mode:o}: it is readable by others; run `chmod 600 {path}`",
        path = path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} does not exist: make one with `vxmesh keygen --out {path}` (mode 0600), or name another",
        path = path.display()
    )]
    Missing { path: PathBuf },
    #[error("key file {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} already exists: choose another path or remove it first",
        path = path.display()
    )]
    Exists { path: PathBuf },
    #[error("no randomness for a new key: {0}")]
    Random(std::io::Error),
}

/// A public key (sent to peers, listed in the store).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

/// A private key. Never printed: its `Debug` hides the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PublicKey {
    /// Parse base64 text; `what` names the text in errors (`node 'a' public_key`).
    pub fn parse(text: &str, what: &str) -> Result<Self, KeyError> {
        decode(text, what).map(PublicKey)
    }

    /// The key for boringtun.
    pub fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::parse(s, "public key")
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl PrivateKey {
    /// A new random key, clamped as X25519 wants (as `wg genkey` does).
    pub fn generate() -> Result<Self, KeyError> {
        let mut b = [0u8; KEY_LEN];
        fill_random(&mut b).map_err(KeyError::Random)?;
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        Ok(PrivateKey(b))
    }

    pub fn parse(text: &str, what: &str) -> Result<Self, KeyError> {
        decode(text, what).map(PrivateKey)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.to_x25519()).to_bytes())
    }

    /// The key for boringtun.
    pub fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }

    /// The base64 text, for a key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public())
    }
}

fn decode(text: &str, what: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|source| KeyError::Base64 {
            what: what.to_string(),
            source,
        })?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length {
        what: what.to_string(),
        len: bytes.len(),
    })
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Read a private key file, refusing one that group or others may read.
pub fn read_key_file(path: &Path) -> Result<PrivateKey, KeyError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => KeyError::Missing {
            path: path.to_path_buf(),
        },
        _ => KeyError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    PrivateKey::parse(&text, &format!("key file {}", path.display()))
}

/// Write `key` to a new file of mode 0600; an existing file is refused.
pub fn write_key_file(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
    writeln!(f, "{}", key.to_base64())
        .and_then(|_| f.sync_all())
        .map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// The keys a store lists for a node: `public_key` (the key it uses) and,
/// during a rotation, `next_public_key` (the key it switches to).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListedKeys {
    pub public_key: Option<PublicKey>,
    pub next_public_key: Option<PublicKey>,
}

impl ListedKeys {
    /// Is `key` one of them?
    pub fn lists(&self, key: PublicKey) -> bool {
        self.public_key == Some(key) || self.next_public_key == Some(key)
    }
}

/// Check a node's listed keys as written (cluster file, etcd record):
/// both base64 X25519 keys, `next_public_key` only beside a `public_key`
/// and different from it. The error names the field.
#[allow(clippy::type_complexity)] // the two keys, or the field and message
pub fn check_listed(
    node: &str,
    public_key: Option<&str>,
    next_public_key: Option<&str>,
) -> Result<(Option<PublicKey>, Option<PublicKey>), (&'static str, String)> {
    let parse = |field: &'static str, text: Option<&str>| {
        text.map(|t| PublicKey::parse(t, &format!("node '{node}' {field}")))
            .transpose()
            .map_err(|e| (field, e.to_string()))
    };
    let current = parse("public_key", public_key)?;
    let next = parse("next_public_key", next_public_key)?;
    match (current, next) {
        (None, Some(_)) => Err((
            "next_public_key",
            format!(
                "node '{node}' lists a next_public_key but no public_key: a rotation lists the new key beside the old one (public_key = the key in use)"
            ),
        )),
        (Some(a), Some(b)) if a == b => Err((
            "next_public_key",
            format!(
                "node '{node}' next_public_key is its public_key: list the key `vxmesh rotate-key` printed, or remove next_public_key"
            ),
        )),
        keys => Ok(keys),
    }
}

/// Write `key` to `path` replacing what is there, atomically (a 0600
/// temporary file in the same directory, renamed over it).
pub fn replace_key_file(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_key_file(&tmp, key)?;
    std::fs::rename(&tmp, path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The key a rotation switches to (`STATE_DIR/wg.next.key`), if one is
/// under way.
pub fn read_next(state_dir: &Path) -> Result<Option<PrivateKey>, KeyError> {
    match read_key_file(&state_dir.join(NEXT_KEY_FILE)) {
        Ok(k) => Ok(Some(k)),
        Err(KeyError::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The node's key: from `key_file` if configured, else from the state dir,
/// created there on first start.
pub fn load_or_create(key_file: Option<&Path>, state_dir: &Path) -> Result<PrivateKey, KeyError> {
    if let Some(path) = key_file {
        return read_key_file(path);
    }
    let path = state_dir.join(STATE_KEY_FILE);
    match read_key_file(&path) {
        Err(KeyError::Missing { .. }) => {
            std::fs::create_dir_all(state_dir).map_err(|source| KeyError::Io {
                path: state_dir.to_path_buf(),
                source,
            })?;
            let key = PrivateKey::generate()?;
            match write_key_file(&path, &key) {
                Ok(()) => Ok(key),
                // Another process made it first: use that one.
                Err(KeyError::Exists { .. }) => read_key_file(&path),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_round_trips_through_text() {
        let k = PrivateKey::generate().unwrap();
        let again = PrivateKey::parse(&k.to_base64(), "k").unwrap();
        assert_eq!(k, again);
        let p = k.public();
        assert_eq!(p.to_string().len(), 44);
        assert_eq!(p.to_string().parse::<PublicKey>().unwrap(), p);
        assert_ne!(PrivateKey::generate().unwrap(), k, "two keys differ");
    }

    #[test]
    fn the_public_key_is_the_x25519_one() {
        // RFC 7748 section 6.1, Alice's key pair.
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        let private = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let k = PrivateKey::parse(&STANDARD.encode(private), "k").unwrap();
        assert_eq!(k.public(), PublicKey(public));
    }

    #[test]
    fn bad_text_is_named_with_the_fix() {
        let e = PublicKey::parse("not base64!", "node 'b' public_key").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("node 'b' public_key is not base64"), "{msg}");
        assert!(msg.contains("vxmesh keygen"), "{msg}");
        let short = STANDARD.encode([1u8; 16]);
        let e = PublicKey::parse(&short, "node 'b' public_key").unwrap_err();
        assert!(e.to_string().contains("decodes to 16 bytes, not 32"), "{e}");
    }

    #[test]
    fn listed_keys_are_checked_with_their_field() {
        let a = PrivateKey::generate().unwrap().public().to_string();
        let b = PrivateKey::generate().unwrap().public().to_string();
        assert!(matches!(
            check_listed("h1", Some(&a), Some(&b)),
            Ok((Some(_), Some(_)))
        ));
        assert_eq!(check_listed("h1", None, None).unwrap(), (None, None));
        let (field, msg) = check_listed("h1", None, Some(&b)).unwrap_err();
        assert_eq!(field, "next_public_key");
        assert!(msg.contains("no public_key"), "{msg}");
        let (field, msg) = check_listed("h1", Some(&a), Some(&a)).unwrap_err();
        assert_eq!(field, "next_public_key");
        assert!(msg.contains("is its public_key"), "{msg}");
        let (field, msg) = check_listed("h1", Some(&a), Some("short")).unwrap_err();
        assert_eq!(field, "next_public_key");
        assert!(msg.contains("node 'h1' next_public_key"), "{msg}");
        let (field, _) = check_listed("h1", Some("x"), None).unwrap_err();
        assert_eq!(field, "public_key");
        let listed = ListedKeys {
            public_key: Some(a.parse().unwrap()),
            next_public_key: Some(b.parse().unwrap()),
        };
        assert!(listed.lists(b.parse().unwrap()));
        assert!(!ListedKeys::default().lists(b.parse().unwrap()));
    }

    #[test]
    fn the_next_key_replaces_the_key_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_next(dir.path()).unwrap(), None);
        let next = PrivateKey::generate().unwrap();
        write_key_file(&dir.path().join(NEXT_KEY_FILE), &next).unwrap();
        assert_eq!(read_next(dir.path()).unwrap(), Some(next.clone()));
        let current = dir.path().join(STATE_KEY_FILE);
        write_key_file(&current, &PrivateKey::generate().unwrap()).unwrap();
        replace_key_file(&current, &next).unwrap();
        assert_eq!(read_key_file(&current).unwrap(), next);
        let mode = std::fs::metadata(&current).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let k = PrivateKey::generate().unwrap();
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }

    #[test]
    fn key_files_are_0600_and_an_open_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = PrivateKey::generate().unwrap();
        write_key_file(&path, &k).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key_file(&path).unwrap(), k);
        assert!(matches!(
            write_key_file(&path, &k),
            Err(KeyError::Exists { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::Mode { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn the_state_dir_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = load_or_create(None, &state).unwrap();
        let second = load_or_create(None, &state).unwrap();
        assert_eq!(first, second);
        let mode = std::fs::metadata(state.join(STATE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // A configured key file wins and is never created.
        let missing = dir.path().join("missing.key");
        let e = load_or_create(Some(&missing), &state).unwrap_err();
        assert!(matches!(e, KeyError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("vxmesh keygen --out"), "{e}");
        assert!(!missing.exists(), "a configured key file is never created");
    }
}
