//! Client authentication, as Redis's `requirepass` and ACL users, to the extent ferry needs:
//! the `default` user (password `requirepass`) and the `[[users]]` of the config, each either
//! read-write or `readonly`. With neither configured every connection is the `default` user
//! and may read and write, as a Redis without a password.
//!
//! A connection that has not authenticated is answered `-NOAUTH` for everything but AUTH,
//! HELLO and QUIT. A `readonly` user's writes are refused with `-NOPERM`, inside MULTI too (so
//! its EXEC aborts).

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame as Frame;

use crate::commands;
use crate::config::NodeConfig;

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub readonly: bool,
}

/// The users clients may authenticate as.
#[derive(Debug, Clone, Default)]
pub struct Users {
    /// Name, password, read-only.
    entries: Vec<(String, String, bool)>,
}

impl Users {
    pub fn from_config(config: &NodeConfig) -> Users {
        let mut entries = Vec::new();
        if let Some(p) = &config.requirepass {
            entries.push(("default".to_string(), p.clone(), false));
        }
        for u in &config.users {
            entries.push((u.name.clone(), u.password.clone(), u.readonly));
        }
        Users { entries }
    }

    /// Whether connections must authenticate.
    pub fn required(&self) -> bool {
        !self.entries.is_empty()
    }

    /// The user a new connection is before any AUTH: `default` without passwords, else nobody.
    pub fn initial(&self) -> Option<User> {
        (!self.required()).then(|| User {
            name: "default".into(),
            readonly: false,
        })
    }

    /// AUTH's check: `user` defaults to `default`. The refusal is Redis's.
    pub fn check(&self, user: Option<&Bytes>, password: &[u8]) -> Result<User, Frame> {
        if !self.required() {
            // As Redis with a password-less default user: any password is its password.
            return match user {
                None => Err(commands::error(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                )),
                Some(u) if &u[..] == b"default" => Ok(User {
                    name: "default".into(),
                    readonly: false,
                }),
                Some(_) => Err(commands::error(
                    "WRONGPASS invalid username-password pair or user is disabled.",
                )),
            };
        }
        let name = user.map_or(&b"default"[..], |u| &u[..]);
        // Every entry is compared, whole, so the time taken says nothing about the password.
        let mut found = None;
        for (n, p, readonly) in &self.entries {
            let ok =
                constant_time_eq(n.as_bytes(), name) & constant_time_eq(p.as_bytes(), password);
            if ok && found.is_none() {
                found = Some(User {
                    name: n.clone(),
                    readonly: *readonly,
                });
            }
        }
        found.ok_or_else(|| {
            commands::error("WRONGPASS invalid username-password pair or user is disabled.")
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for (i, x) in a.iter().enumerate() {
        diff |= u64::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// The answer to any command but AUTH, HELLO and QUIT before authentication.
pub fn noauth() -> Frame {
    commands::error("NOAUTH Authentication required.")
}

/// HELLO without AUTH before authentication.
pub fn noauth_hello() -> Frame {
    commands::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")
}

/// A read-only user's write.
pub fn noperm(user: &User, name: &[u8]) -> Frame {
    commands::error(format!(
        "NOPERM User {} has no permissions to run the '{}' command",
        user.name,
        String::from_utf8_lossy(name).to_ascii_lowercase()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserConfig;

    fn users() -> Users {
        let config = NodeConfig {
            requirepass: Some("secret".into()),
            users: vec![UserConfig {
                name: "reader".into(),
                password: "r-pass".into(),
                readonly: true,
            }],
            ..NodeConfig::default()
        };
        Users::from_config(&config)
    }

    #[test]
    fn passwords_are_checked_per_user() {
        let u = users();
        assert!(u.required());
        assert_eq!(u.initial(), None);
        let default = u.check(None, b"secret").expect("default user");
        assert!(!default.readonly);
        let reader = u
            .check(Some(&Bytes::from_static(b"reader")), b"r-pass")
            .expect("reader");
        assert!(reader.readonly);
        assert!(u.check(None, b"r-pass").is_err());
        assert!(u
            .check(Some(&Bytes::from_static(b"reader")), b"secret")
            .is_err());
        assert!(u.check(None, b"secre").is_err());
        assert!(u.check(None, b"secrets").is_err());
    }

    #[test]
    fn without_passwords_everyone_is_the_default_user() {
        let u = Users::from_config(&NodeConfig::default());
        assert!(!u.required());
        assert_eq!(u.initial().map(|u| u.readonly), Some(false));
        assert!(u.check(None, b"x").is_err());
        assert!(u.check(Some(&Bytes::from_static(b"default")), b"x").is_ok());
        assert!(u.check(Some(&Bytes::from_static(b"other")), b"x").is_err());
    }
}
