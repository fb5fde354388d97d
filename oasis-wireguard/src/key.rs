//! WireGuard keys as users write them: 32 bytes in base64 (44 characters).
//! A private key never prints: its `Debug` says it is hidden, and no error
//! quotes a value that could be one.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

/// Why a key was refused. The value is never quoted: it may be a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "not a WireGuard key: give 32 bytes in base64 (44 characters ending in `=`, as `wg genkey` prints)"
    )]
    NotAKey,
}

fn decode(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    if text.len() != 44 {
        return Err(KeyError::NotAKey);
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyError::NotAKey)?;
    bytes.try_into().map_err(|_| KeyError::NotAKey)
}

/// A peer's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        decode(text).map(PublicKey)
    }

    pub(crate) fn x25519(&self) -> x25519::PublicKey {
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

/// This host's private key (x25519 clamps it; dalek zeroes it when
/// dropped).
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    pub fn parse(text: &str) -> Result<PrivateKey, KeyError> {
        decode(text).map(|bytes| PrivateKey(x25519::StaticSecret::from(bytes)))
    }

    /// A new key from the operating system's random source.
    pub fn generate() -> PrivateKey {
        let bytes: [u8; 32] = rand::random();
        PrivateKey(x25519::StaticSecret::from(bytes))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    /// The key as a wg-quick file writes it: only for the file of mode
    /// 0600 that keeps it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }

    pub(crate) fn x25519(&self) -> x25519::StaticSecret {
        self.0.clone()
    }

    /// Reads a key file as `wg genkey` writes one. Whether others than its
    /// owner may read it comes back too, for a warning.
    pub fn read(path: &std::path::Path) -> Result<(PrivateKey, bool), KeyFileError> {
        let (text, open) = read_key_file(path)?;
        let key = PrivateKey::parse(&text).map_err(|_| KeyFileError::NotAKey {
            path: path.display().to_string(),
            what: "private key",
            tool: "wg genkey",
        })?;
        Ok((key, open))
    }
}

/// The most a key file may hold: a key is 44 characters.
pub const MAX_KEY_FILE: u64 = 1024;

/// A key file's text, bounded, and whether others than its owner may read
/// it.
fn read_key_file(path: &std::path::Path) -> Result<(String, bool), KeyFileError> {
    let failed = |source| KeyFileError::Read {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(failed)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge {
            path: path.display().to_string(),
            size: meta.len(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(failed)?;
    #[cfg(unix)]
    let open = {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o077 != 0
    };
    #[cfg(not(unix))]
    let open = false;
    Ok((text, open))
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "{path} is {size} bytes; a key file holds one line of 44 characters (at most {MAX_KEY_FILE} bytes are read)"
    )]
    TooLarge { path: String, size: u64 },
    #[error("{path} holds no WireGuard {what}: it should hold one line as `{tool}` prints it")]
    NotAKey {
        path: String,
        what: &'static str,
        tool: &'static str,
    },
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(hidden; public {})", self.public())
    }
}

/// A pre-shared key: as secret as a private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub(crate) [u8; 32]);

impl PresharedKey {
    pub fn parse(text: &str) -> Result<PresharedKey, KeyError> {
        decode(text).map(PresharedKey)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Reads a file as `wg genpsk` writes one, as [`PrivateKey::read`].
    pub fn read(path: &std::path::Path) -> Result<(PresharedKey, bool), KeyFileError> {
        let (text, open) = read_key_file(path)?;
        let key = PresharedKey::parse(&text).map_err(|_| KeyFileError::NotAKey {
            path: path.display().to_string(),
            what: "pre-shared key",
            tool: "wg genpsk",
        })?;
        Ok((key, open))
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(hidden)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_secrets_never_print() {
        let private = PrivateKey::generate();
        let again = PrivateKey::parse(&private.to_base64()).unwrap();
        assert_eq!(private.public(), again.public());
        let shown = format!("{private:?}");
        assert!(!shown.contains(&private.to_base64()), "{shown}");
        assert!(shown.contains(&private.public().to_string()));
        let psk = PresharedKey([7; 32]);
        assert!(!format!("{psk:?}").contains(&psk.to_base64()));
        let public = private.public();
        assert_eq!(PublicKey::parse(&public.to_string()).unwrap(), public);
    }

    #[test]
    fn key_files_are_read_within_a_bound() {
        let dir = std::env::temp_dir().join(format!("oasis-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, big) = (dir.join("good"), dir.join("big"));
        let private = PrivateKey::generate();
        std::fs::write(&good, format!("{}\n", private.to_base64())).unwrap();
        std::fs::write(&big, vec![b'A'; 4096]).unwrap();
        assert_eq!(PrivateKey::read(&good).unwrap().0.public(), private.public());
        let refused = PrivateKey::read(&big).unwrap_err().to_string();
        assert!(
            refused.contains("4096 bytes") && refused.contains("at most 1024"),
            "{refused}"
        );
        let wrong = PresharedKey::read(&good).map(|_| ()).err();
        assert!(wrong.is_none(), "any 32 bytes are a pre-shared key");
        std::fs::write(&good, "not a key").unwrap();
        let refused = PresharedKey::read(&good).unwrap_err().to_string();
        assert!(
            refused.contains("no WireGuard pre-shared key") && refused.contains("wg genpsk"),
            "{refused}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_is_44_characters_of_base64() {
        // A known pair (RFC 7748 section 6.1's Alice).
        let private = PrivateKey::parse("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(
            private.public().to_string(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
        for bad in [
            "",
            "abc",
            "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LC==",
            &"A".repeat(44),
        ] {
            assert_eq!(PrivateKey::parse(bad).err(), Some(KeyError::NotAKey), "{bad:?}");
        }
        // Whitespace around a key is no part of it.
        assert!(PublicKey::parse(" hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo= ").is_ok());
    }
}
