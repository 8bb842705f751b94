//! `server.auth` — the client keys allowed to call the router, and the rule that an
//! unauthenticated router listens on loopback only.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::SocketAddr,
};

use sha2::{Digest, Sha256};

use super::{Check, ConfigError, raw::RawAuth};

/// The client keys; `None` in [`super::ServerConfig::auth`] means no authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthConfig {
    pub keys: Vec<ClientKey>,
}

/// One client: its name (the tenant for the cache and the quotas), the SHA-256 of its key,
/// the models or chains it may ask for (`None`: any), and whether it is an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientKey {
    pub name: String,
    pub hash: KeyHash,
    pub models: Option<Vec<String>>,
    /// May use the operator's control actions.
    pub admin: bool,
}

/// The SHA-256 of a client key: all the router keeps of it. Its Debug shows nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<redacted>)")
    }
}

impl Check<'_> {
    pub(super) fn auth(&self, raw: Option<RawAuth>) -> Result<Option<AuthConfig>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        if raw.keys.is_empty() {
            return Err(self.err(
                "server.auth.keys",
                "no keys",
                "list at least one {name, key: \"${ENV_VAR}\"} or {name, sha256: HEX}, or remove `auth`",
            ));
        }
        let mut names = HashSet::new();
        let mut keys = Vec::with_capacity(raw.keys.len());
        for (i, k) in raw.keys.into_iter().enumerate() {
            let at = format!("server.auth.keys[{i}]");
            if k.name.trim().is_empty() || !names.insert(k.name.clone()) {
                return Err(self.err(
                    format!("{at}.name"),
                    "missing, empty or repeated",
                    "give every client key a unique name (it is the client's tenant)",
                ));
            }
            let hash = match (&k.key, &k.sha256) {
                (Some(text), None) => {
                    let key = self.expand(text).map_err(|var| {
                        self.err(
                            format!("{at}.key"),
                            format!("${{{var}}} is unset"),
                            format!("export {var}, or give the key's sha256 instead"),
                        )
                    })?;
                    if key.trim() != key || key.is_empty() {
                        return Err(self.err(
                            format!("{at}.key"),
                            "empty, or has spaces or a newline around it",
                            "set the variable to the key alone (no trailing newline)",
                        ));
                    }
                    KeyHash::of(&key)
                }
                (None, Some(hex)) => self.sha256(&format!("{at}.sha256"), hex)?,
                _ => {
                    return Err(self.err(
                        at,
                        "needs exactly one of `key` and `sha256`",
                        "key: \"${ENV_VAR}\" for a key from the environment, or sha256: HEX of it",
                    ));
                }
            };
            keys.push(ClientKey {
                name: k.name,
                hash,
                models: k.models,
                admin: k.admin,
            });
        }
        Ok(Some(AuthConfig { keys }))
    }

    fn sha256(&self, key: &str, hex: &str) -> Result<KeyHash, ConfigError> {
        let bad = || {
            self.err(
                key,
                "not 64 hex digits",
                "give the key's SHA-256, e.g. from `printf %s \"$KEY\" | sha256sum`",
            )
        };
        let hex = hex.trim();
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(KeyHash(out))
    }

    /// Every model or chain a key names must exist.
    pub(super) fn key_models(
        &self,
        auth: Option<&AuthConfig>,
        models: &BTreeSet<String>,
        chains: &BTreeMap<String, Vec<String>>,
    ) -> Result<(), ConfigError> {
        for (i, k) in auth
            .map(|a| a.keys.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            for (j, m) in k.models.iter().flatten().enumerate() {
                if !models.contains(m) && !chains.contains_key(m) {
                    return Err(self.err(
                        format!("server.auth.keys[{i}].models[{j}]"),
                        format!("unknown model or chain {m:?}"),
                        "name a model listed under some provider's `models` or a `fallback_chains` entry",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Without client keys, only this machine may call the router, unless the operator said
/// otherwise: `Err` says what to change.
pub fn open_to_network(
    listen: SocketAddr,
    auth: Option<&AuthConfig>,
    allow_unauthenticated: bool,
) -> Result<(), String> {
    if auth.is_some() || allow_unauthenticated || listen.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "{listen} is not a loopback address and server.auth has no keys (fix: configure server.auth.keys, listen on 127.0.0.1, or set server.allow_unauthenticated: true)"
    ))
}
