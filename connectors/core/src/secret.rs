//! A secret value that never prints. `Debug` and `Display` show `[redacted]`; the only
//! way to the value is [`Secret::expose`], so a grep for `expose` finds every use.

use std::fmt;
use std::sync::Arc;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::new("pat-na1-very-secret");
        assert_eq!(
            format!("{s} {s:?} {:?}", Some(&s)),
            "[redacted] [redacted] Some([redacted])"
        );
        assert_eq!(s.expose(), "pat-na1-very-secret");
    }
}

/// Where a secret comes from. Secrets are never written in the configuration file itself:
/// a TOML string where a secret belongs is refused with an explanation.
///
/// ```toml
/// token = { env = "HUBSPOT_TOKEN" }
/// token = { file = "/etc/optout-sync/hubspot-token" }   # mode 0600 or stricter
/// token = { credential = "hubspot-token" }              # systemd LoadCredential=
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(std::path::PathBuf),
    /// A systemd credential, read from `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

/// Why a secret could not be read. Messages name the variable or file, never the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error(
        "secret file {path} is readable by group or others (mode {mode:o}); run chmod 600 on it"
    )]
    FileTooOpen { path: String, mode: u32 },
    #[error("secret file {path} cannot be read: {reason}")]
    FileUnreadable { path: String, reason: String },
    #[error("secret file {0} is empty")]
    FileEmpty(String),
    /// Only spaces, tabs or line breaks: a paste gone wrong, never a real secret.
    #[error("{0} holds only whitespace")]
    Blank(String),
    #[error(
        "credential {0} requested but CREDENTIALS_DIRECTORY is not set (is LoadCredential= in the unit?)"
    )]
    NoCredentialsDirectory(String),
}

impl SecretRef {
    /// Reads the secret now. Trailing newlines of files are dropped (editors add them).
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            SecretRef::Env(name) => match std::env::var(name) {
                Ok(v) if v.is_empty() => Err(SecretError::EnvEmpty(name.clone())),
                Ok(v) if v.trim().is_empty() => {
                    Err(SecretError::Blank(format!("environment variable {name}")))
                }
                Ok(v) => Ok(Secret::new(v)),
                Err(_) => Err(SecretError::EnvMissing(name.clone())),
            },
            SecretRef::File(path) => read_secret_file(path, true),
            SecretRef::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone()))?;
                // systemd makes the credential files private to the service already.
                read_secret_file(&std::path::Path::new(&dir).join(name), false)
            }
        }
    }

    /// A description safe to print: where the secret lives, not what it is.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(n) => format!("env {n}"),
            SecretRef::File(p) => format!("file {}", p.display()),
            SecretRef::Credential(n) => format!("credential {n}"),
        }
    }
}

fn read_secret_file(path: &std::path::Path, check_mode: bool) -> Result<Secret, SecretError> {
    let shown = path.display().to_string();
    let unreadable = |e: std::io::Error| SecretError::FileUnreadable {
        path: shown.clone(),
        reason: e.kind().to_string(),
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    #[cfg(unix)]
    if check_mode {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::FileTooOpen { path: shown, mode });
        }
    }
    let _ = (meta, check_mode);
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(SecretError::FileEmpty(shown));
    }
    if value.trim().is_empty() {
        return Err(SecretError::Blank(format!("secret file {shown}")));
    }
    Ok(Secret::new(value))
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a secret reference: { env = "NAME" }, { file = "/path" } or { credential = "name" }"#)
            }
            fn visit_str<E: Error>(self, _: &str) -> Result<SecretRef, E> {
                Err(E::custom(
                    r#"secrets must not be written in the configuration file; use { env = "NAME" }, { file = "/path" } or { credential = "name" }"#,
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
                let mut found: Option<SecretRef> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let r = match key.as_str() {
                        "env" => SecretRef::Env(value),
                        "file" => SecretRef::File(value.into()),
                        "credential" => SecretRef::Credential(value),
                        other => {
                            return Err(A::Error::unknown_field(
                                other,
                                &["env", "file", "credential"],
                            ));
                        }
                    };
                    if found.replace(r).is_some() {
                        return Err(A::Error::custom(
                            "a secret reference takes exactly one of env, file or credential",
                        ));
                    }
                }
                found.ok_or_else(|| {
                    A::Error::custom("a secret reference needs env, file or credential")
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl serde::Serialize for SecretRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            SecretRef::Env(n) => m.serialize_entry("env", n)?,
            SecretRef::File(p) => m.serialize_entry("file", &p.display().to_string())?,
            SecretRef::Credential(n) => m.serialize_entry("credential", n)?,
        }
        m.end()
    }
}

#[cfg(test)]
mod ref_tests {
    use super::*;

    #[test]
    fn file_secrets_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tok");
        std::fs::write(&p, "abc\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = SecretRef::File(p.clone());
        assert!(matches!(
            r.resolve(),
            Err(SecretError::FileTooOpen { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(r.resolve().unwrap().expose(), "abc");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            SecretRef::Env("OPTOUT_SURELY_UNSET_VAR".into()).resolve(),
            Err(SecretError::EnvMissing("OPTOUT_SURELY_UNSET_VAR".into()))
        );
    }

    #[test]
    fn whitespace_is_not_a_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("secret-blank-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tok");
        std::fs::write(&p, " \t \n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretRef::File(p).resolve().unwrap_err();
        assert!(matches!(e, SecretError::Blank(_)), "{e}");
        assert!(e.to_string().ends_with("holds only whitespace"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
