//! Client authentication at the edge: `authorization: Bearer <key>` checked against the SHA-256
//! of each configured key, in constant time and always against every key (never by prefix),
//! as a tonic interceptor on every service but health, and by the OpenAI-compatible front. The client it names rides in the
//! request's extensions to the handlers: its name is the tenant, its list bounds the models.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::{
    config::{AuthConfig, KeyHash},
    error::RouterError,
};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Client {
    pub name: Arc<str>,
    /// Models or chains it may ask for; `None`: any.
    pub models: Option<Arc<[String]>>,
    /// May use the operator's control actions (`server.auth.keys[].admin`).
    pub admin: bool,
}

/// The interceptor; with no keys configured it lets every call through.
#[derive(Clone)]
pub struct Authenticate {
    keys: Arc<[(KeyHash, Client)]>,
    on: bool,
    /// Counts the calls refused here, which no handler sees.
    refused: Counter,
}

impl Authenticate {
    pub fn new(auth: Option<&AuthConfig>, refused: Counter) -> Authenticate {
        let keys = auth
            .map(|a| {
                a.keys
                    .iter()
                    .map(|k| {
                        let client = Client {
                            name: k.name.as_str().into(),
                            models: k.models.as_ref().map(|m| m.clone().into()),
                            admin: k.admin,
                        };
                        (k.hash, client)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Authenticate {
            keys,
            on: auth.is_some(),
            refused,
        }
    }

    /// The client whose key this is: hashed, then compared with every key without stopping
    /// early, so neither the time taken nor a shared prefix tells anything about the keys.
    fn find(&self, presented: &str) -> Option<&Client> {
        let hash = KeyHash::of(presented);
        let mut found = None;
        for (k, client) in self.keys.iter() {
            if bool::from(k.0.ct_eq(&hash.0)) {
                found = Some(client);
            }
        }
        found
    }
}

impl Authenticate {
    /// The client an `authorization` header names (`Bearer <key>`), `None` when
    /// authentication is off; a call with no known key is refused (and counted). Both fronts
    /// ask this.
    pub fn client(&self, authorization: Option<&str>) -> Result<Option<Client>, RouterError> {
        if !self.on {
            return Ok(None);
        }
        let presented = authorization.and_then(bearer).map(str::trim);
        let found = match presented {
            None => Err("no client key: send the header `authorization: Bearer <key>`"),
            Some(key) => self.find(key).cloned().ok_or("unknown client key"),
        };
        found.map(Some).map_err(|why| {
            self.refused.inc();
            RouterError::Unauthenticated(why)
        })
    }
}

/// The credentials of a `Bearer` authorization, the scheme in any case (RFC 7235).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, credentials) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(credentials)
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if !self.on {
            return Ok(req);
        }
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if let Some(client) = self.client(header)? {
            req.extensions_mut().insert(client);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientKey;

    #[test]
    fn only_the_whole_key_matches() {
        let key = "sk-router-0123456789abcdefghij-rest";
        let auth = AuthConfig {
            keys: vec![ClientKey {
                name: "a".into(),
                hash: KeyHash::of(key),
                models: None,
                admin: false,
            }],
        };
        let a = Authenticate::new(Some(&auth), Counter::default());
        assert_eq!(a.find(key).map(|c| &*c.name), Some("a"));
        assert!(a.find(&key[..20]).is_none(), "a prefix is not the key");
        assert!(a.find(&format!("{}x", &key[..key.len() - 1])).is_none());
        assert!(a.find("").is_none());
        for header in [
            format!("Bearer {key}"),
            format!("bearer {key}"),
            format!("BEARER {key}"),
        ] {
            assert!(a.client(Some(&header)).is_ok(), "{header}");
        }
        assert!(a.client(Some(&format!("Basic {key}"))).is_err());
        assert!(a.client(Some(key)).is_err());
    }
}
