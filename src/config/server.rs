//! `server:` — this router's own listener and request settings.

use std::{net::SocketAddr, num::NonZeroU32, time::Duration};

use super::{
    Check, ConfigError,
    auth::{AuthConfig, open_to_network},
    raw::{RawLimits, RawServer, RawTls},
};

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    pub max_batch_items: usize,
    pub metrics_listen: Option<SocketAddr>,
    /// The OpenAI-compatible HTTP front's address; `None`: not served.
    pub http_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    pub limits: Limits,
    /// Per-client quotas; `None`: none.
    pub quotas: Option<QuotaConfig>,
    /// Client keys; `None`: no authentication.
    pub auth: Option<AuthConfig>,
    pub allow_unauthenticated: bool,
    /// The listener's certificate chain and key, PEM; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Log prompts and completions (at info); otherwise they are logged at no level.
    pub log_prompts: bool,
}

/// PEM bytes read (and checked) at load, so `check` refuses what `serve` would.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles(<cert>, <key redacted>)")
    }
}

/// Each client's (tenant's) calls per minute, with a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaConfig {
    pub requests_per_minute: NonZeroU32,
    pub burst: NonZeroU32,
}

/// Global bounds on what clients may hold of the router.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_in_flight: usize,
    pub max_concurrent_streams: u32,
    pub max_connection_age: Duration,
    pub max_prompt_bytes: usize,
    pub max_messages: usize,
    pub max_tokens: u32,
    pub max_message_bytes: usize,
    pub max_image_bytes: usize,
    pub max_images: usize,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub header_read_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl Check<'_> {
    fn tls(&self, t: &RawTls) -> Result<TlsFiles, ConfigError> {
        let read = |key: &str, path: &str, what: &str| {
            super::read_named_file(path).map_err(|e| {
                self.err(
                    key,
                    format!("cannot read {path:?}: {e}"),
                    format!("name a readable PEM file with the {what}"),
                )
            })
        };
        let cert_pem = read("server.tls.cert", &t.cert, "certificate chain")?;
        let key_pem = read("server.tls.key", &t.key, "private key")?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if !text(&cert_pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(self.err(
                "server.tls.cert",
                format!("{:?} holds no PEM certificate", t.cert),
                "name the PEM certificate chain (-----BEGIN CERTIFICATE-----)",
            ));
        }
        if !text(&key_pem).contains("PRIVATE KEY-----") {
            return Err(self.err(
                "server.tls.key",
                format!("{:?} holds no PEM private key", t.key),
                "name the PEM private key (-----BEGIN PRIVATE KEY-----)",
            ));
        }
        Ok(TlsFiles { cert_pem, key_pem })
    }

    pub(super) fn server(&self, s: RawServer, l: RawLimits) -> Result<ServerConfig, ConfigError> {
        let address = |key: &str, text: &str, example: &str| {
            text.parse::<SocketAddr>().map_err(|_| {
                self.err(
                    key,
                    format!("{text:?} is not an address"),
                    format!("use IP:PORT, e.g. {example}"),
                )
            })
        };
        let listen = address("server.listen", &s.listen, "127.0.0.1:50051")?;
        let request_timeout = self.seconds(
            "server.request_timeout_seconds",
            s.request_timeout_seconds,
            false,
        )?;
        if s.max_batch_items == 0 {
            return Err(self.err(
                "server.max_batch_items",
                "must be at least 1",
                "set the most items one CompleteBatch may carry, e.g. 1024",
            ));
        }
        let metrics_listen = match &s.metrics_listen {
            None => None,
            Some(text) => Some(address("server.metrics_listen", text, "127.0.0.1:9464")?),
        };
        let http_listen = match &s.http_listen {
            None => None,
            Some(text) => Some(address("server.http_listen", text, "127.0.0.1:8080")?),
        };
        let shutdown_grace = self.seconds(
            "server.shutdown_grace_seconds",
            s.shutdown_grace_seconds,
            true,
        )?;
        if l.max_in_flight == 0 {
            return Err(self.err(
                "limits.max_in_flight",
                "must be at least 1",
                "set the most calls to run at once, e.g. 10000",
            ));
        }
        if l.max_concurrent_streams == 0 {
            return Err(self.err(
                "limits.max_concurrent_streams",
                "must be at least 1",
                "set the most calls one connection may carry at once, e.g. 1024",
            ));
        }
        // A zero would refuse every request: refused here, as a typo, rather than raised.
        for (key, value, least, fix) in [
            (
                "limits.max_prompt_bytes",
                l.max_prompt_bytes,
                1,
                "e.g. 1048576 (1 MiB)",
            ),
            ("limits.max_messages", l.max_messages, 1, "e.g. 256"),
            ("limits.max_tokens", l.max_tokens as usize, 1, "e.g. 32768"),
            (
                "limits.max_message_bytes",
                l.max_message_bytes,
                1024,
                "e.g. 4194304 (4 MiB)",
            ),
            (
                "limits.max_image_bytes",
                l.max_image_bytes,
                1,
                "e.g. 4194304 (4 MiB)",
            ),
            ("limits.max_connections", l.max_connections, 1, "e.g. 10000"),
            (
                "limits.max_connections_per_peer",
                l.max_connections_per_peer,
                1,
                "e.g. 1000",
            ),
        ] {
            if value < least {
                return Err(self.err(key, format!("must be at least {least}"), fix));
            }
        }
        let limits = Limits {
            max_in_flight: l.max_in_flight,
            max_concurrent_streams: l.max_concurrent_streams,
            max_prompt_bytes: l.max_prompt_bytes,
            max_messages: l.max_messages,
            max_tokens: l.max_tokens,
            max_message_bytes: l.max_message_bytes,
            max_image_bytes: l.max_image_bytes,
            max_images: l.max_images,
            max_connections: l.max_connections,
            max_connections_per_peer: l.max_connections_per_peer,
            header_read_timeout: self.seconds(
                "limits.header_read_timeout_seconds",
                l.header_read_timeout_seconds,
                false,
            )?,
            handshake_timeout: self.seconds(
                "limits.handshake_timeout_seconds",
                l.handshake_timeout_seconds,
                false,
            )?,
            idle_timeout: self.seconds(
                "limits.idle_timeout_seconds",
                l.idle_timeout_seconds,
                false,
            )?,
            body_read_timeout: self.seconds(
                "limits.body_read_timeout_seconds",
                l.body_read_timeout_seconds,
                false,
            )?,
            max_connection_age: self.seconds(
                "limits.max_connection_age_seconds",
                l.max_connection_age_seconds,
                false,
            )?,
        };
        let quotas = match s.quotas {
            None => None,
            Some(q) => {
                let rpm = NonZeroU32::new(q.requests_per_minute).ok_or_else(|| {
                    self.err(
                        "server.quotas.requests_per_minute",
                        "must be at least 1",
                        "leave `quotas` out for none, or give calls per minute per client",
                    )
                })?;
                let burst = match q.burst {
                    None => super::rate::ten_seconds_of(Some(rpm)),
                    Some(b) => NonZeroU32::new(b).ok_or_else(|| {
                        self.err("server.quotas.burst", "must be at least 1", "e.g. 10")
                    })?,
                };
                Some(QuotaConfig {
                    requests_per_minute: rpm,
                    burst,
                })
            }
        };
        let auth = self.auth(s.auth)?;
        let tls = match &s.tls {
            None => None,
            Some(t) => Some(self.tls(t)?),
        };
        for (key, addr) in [
            ("server.listen", Some(listen)),
            ("server.http_listen", http_listen),
        ] {
            let Some(addr) = addr else { continue };
            open_to_network(addr, auth.as_ref(), s.allow_unauthenticated).map_err(|e| {
                let (problem, fix) = e.split_once(" (fix: ").unwrap_or((&e, ""));
                self.err(key, problem, fix.trim_end_matches(')'))
            })?;
        }
        Ok(ServerConfig {
            tls,
            log_prompts: s.log_prompts,
            auth,
            allow_unauthenticated: s.allow_unauthenticated,
            quotas,
            listen,
            request_timeout,
            max_batch_items: s.max_batch_items,
            metrics_listen,
            http_listen,
            shutdown_grace,
            limits,
        })
    }
}
