//! The pooled HTTP client every network provider owns, and the one place upstream HTTP
//! outcomes are classified into [`ProviderError`]s.

use std::time::{Duration, SystemTime};

use reqwest::{
    Client, StatusCode, Url,
    header::{HeaderMap, RETRY_AFTER},
};
use serde::{Serialize, de::DeserializeOwned};

use super::ProviderError;
use crate::{completion::FailureKind, config::ProviderConfig};

/// Largest upstream body read; bigger ones are malformed for our purposes.
const MAX_BODY: usize = 32 << 20;
/// Most of an error body read for its code when the answer was to be streamed.
const MAX_ERROR_BODY: usize = 64 << 10;
/// A `Retry-After` longer than this is capped: the provider is probed again after it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// The longest provider error code or type quoted back to callers.
const MAX_ERROR_CODE: usize = 64;

/// One pooled client per provider: keep-alive with an idle timeout below common servers'
/// keep-alive, TCP_NODELAY, HTTP/2 through ALPN on TLS (or prior knowledge when configured).
pub fn client(config: &ProviderConfig, headers: HeaderMap) -> Result<Client, reqwest::Error> {
    let http = &config.http;
    let mut b = Client::builder()
        .default_headers(headers)
        .pool_idle_timeout(http.pool_idle_timeout)
        .pool_max_idle_per_host(http.pool_max_idle_per_host)
        .connect_timeout(http.connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(30))
        // Model APIs answer POSTs in place: a redirect is a misconfiguration to surface (as a
        // malformed answer that moves the request on), not to follow.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cascade-router/", env!("CARGO_PKG_VERSION")));
    // Proxies from the environment are honoured; without any, skip reqwest's per-request
    // proxy matching (1.2% of a routed request's instructions under callgrind).
    if !proxy_in_env() {
        b = b.no_proxy();
    }
    if http.http2_prior_knowledge {
        b = b.http2_prior_knowledge();
    }
    if let Some(pem) = &http.ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem)? {
            b = b.add_root_certificate(cert);
        }
    }
    b.build()
}

fn proxy_in_env() -> bool {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// What active health checks GET: the config's `health_check.path` on the provider's server
/// (replacing the base URL's path), else `default` joined onto the base URL.
pub fn probe_url(config: &ProviderConfig, base: &Url, default: &str) -> Url {
    match config.health_check.as_ref().and_then(|h| h.path.as_deref()) {
        Some(path) => {
            let mut u = base.clone();
            u.set_path(path);
            u
        }
        None => join(base, default),
    }
}

/// One health probe: a GET whose answer is any 2xx (its body is not read past a little).
/// The caller bounds its time.
pub async fn probe(client: &Client, url: &Url) -> Result<(), ProviderError> {
    let resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(transport_error)?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let retry = retry_after(resp.headers());
    let body = resp.bytes().await.unwrap_or_default();
    let cut = body.len().min(MAX_ERROR_BODY);
    Err(status_error(status, &body[..cut], retry))
}

/// Joins an endpoint path onto a base URL whose path has no trailing slash.
pub fn join(base: &Url, path: &str) -> Url {
    let mut u = base.clone();
    let joined = format!("{}{}", base.path().trim_end_matches('/'), path);
    u.set_path(&joined);
    u
}

/// POSTs `body` as JSON: the response once its head arrived, whatever its status.
async fn send_json<B: Serialize + ?Sized>(
    client: &Client,
    url: &Url,
    body: &B,
) -> Result<reqwest::Response, ProviderError> {
    let bytes = serde_json::to_vec(body).map_err(|e| {
        ProviderError::new(
            FailureKind::Rejected,
            format!("the request could not be written as JSON: {e}"),
        )
    })?;
    let post = |body: reqwest::Body| {
        client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
    };
    // reqwest keeps a reusable body until the answer (to resend it on a redirect or a
    // refused HTTP/2 stream). A large one — an image's base64 — goes as a one-shot body
    // instead, freed once written: one copy fewer held per call while the provider works.
    if bytes.len() > LARGE_BODY {
        let body = reqwest::Body::wrap(http_body_util::Full::new(bytes::Bytes::from(bytes)));
        return post(body).await.map_err(transport_error);
    }
    let bytes = bytes::Bytes::from(bytes);
    let mut resent = 0;
    loop {
        match post(reqwest::Body::from(bytes.clone())).await {
            // A pooled connection the server closed as it was taken: llama-server closes a
            // kept-alive connection after a streamed answer when its HTTP threads are busy,
            // though the answer's headers said keep-alive. The request went nowhere: send it
            // again (the pool drops that connection), a few times at most.
            Err(e) if resent < RESENDS && closed_before_answer(&e) => resent += 1,
            sent => return sent.map_err(transport_error),
        }
    }
}

/// Sends after finding a pooled connection closed, at most.
const RESENDS: u32 = 3;

/// Whether `e` is a connection closed before any of the answer came (hyper's incomplete
/// message): what a reused connection the server had closed gives.
fn closed_before_answer(e: &reqwest::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message();
        }
        cause = c.source();
    }
    false
}

/// Request bodies above this size are not kept for a resend (see [`send_json`]).
const LARGE_BODY: usize = 64 << 10;

/// POSTs `body` as JSON and decodes a JSON answer, classifying every failure.
pub async fn post_json<B: Serialize + ?Sized, R: DeserializeOwned>(
    client: &Client,
    url: &Url,
    body: &B,
) -> Result<R, ProviderError> {
    let mut resp = send_json(client, url, body).await?;
    let status = resp.status();
    if let Some(len) = resp.content_length()
        && len > MAX_BODY as u64
    {
        return Err(ProviderError::new(
            FailureKind::Malformed,
            format!("body of {len} bytes is over the {MAX_BODY}-byte limit"),
        ));
    }
    let retry_after = retry_after(resp.headers());
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        if bytes.len() + chunk.len() > MAX_BODY {
            return Err(ProviderError::new(
                FailureKind::Malformed,
                format!("body over the {MAX_BODY}-byte limit"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(status_error(status, &bytes, retry_after));
    }
    decode(&bytes)
}

/// POSTs `body` as JSON for a streamed answer: the response once its status is a success,
/// else the classified failure (its body read, bounded, for the error code).
pub async fn post_for_stream<B: Serialize + ?Sized>(
    client: &Client,
    url: &Url,
    body: &B,
) -> Result<reqwest::Response, ProviderError> {
    let mut resp = send_json(client, url, body).await?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let mut bytes = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if bytes.len() + chunk.len() > MAX_ERROR_BODY {
            break;
        }
        bytes.extend_from_slice(&chunk);
    }
    Err(status_error(status, &bytes, retry_after))
}

/// A successful answer's body as `R`, or a [`FailureKind::Malformed`] error.
pub fn decode<R: DeserializeOwned>(body: &[u8]) -> Result<R, ProviderError> {
    serde_json::from_slice(body)
        .map_err(|e| ProviderError::new(FailureKind::Malformed, format!("unexpected JSON: {e}")))
}

/// What an answer with `status`, `body` and a `Retry-After` of `retry_after_value` becomes
/// (for the fuzz targets and property tests).
#[cfg(any(test, feature = "fuzzing"))]
pub fn read_answer<R: DeserializeOwned>(
    status: u16,
    retry_after_value: &[u8],
    body: &[u8],
) -> Result<R, ProviderError> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = reqwest::header::HeaderValue::from_bytes(retry_after_value) {
        headers.insert(RETRY_AFTER, v);
    }
    let wait = retry_after(&headers);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        return Err(status_error(status, body, wait));
    }
    decode(body)
}

pub(super) fn transport_error(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_connect() {
        FailureKind::Connect
    } else if e.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Io
    };
    // The innermost cause says what happened ("Connection refused"); the URL is left out.
    let root = root_cause(&e);
    let e = e.without_url();
    let message = match root {
        Some(root) => format!("{e}: {root}"),
        None => e.to_string(),
    };
    ProviderError::new(kind, message)
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = e.source()?;
    while let Some(next) = cur.source() {
        cur = next;
    }
    Some(cur.to_string())
}

fn status_error(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> ProviderError {
    let kind = match status.as_u16() {
        429 => FailureKind::RateLimited,
        401 | 403 => FailureKind::Unauthorized,
        408 => FailureKind::Timeout,
        400..=499 => FailureKind::Rejected,
        500..=599 => FailureKind::ServerError,
        _ => FailureKind::Malformed,
    };
    // An upstream's error body may echo the request — the prompt, even the Authorization
    // header — so none of it goes back to callers or into the logs: only the status and the
    // provider's own short error code or type, when its JSON has one (never for 401/403).
    let code = match kind {
        FailureKind::Unauthorized => None,
        _ => error_code(body),
    };
    ProviderError {
        kind,
        http_status: Some(status.as_u16()),
        message: match code {
            Some(code) => format!("HTTP {status} ({code})"),
            None => format!("HTTP {status}"),
        },
        retry_after,
    }
}

/// `error.code` or `error.type` from an OpenAI- or Anthropic-shaped error body, if it is a
/// short identifier (letters, digits, `_`, `-`, `.`): never free text.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error")?;
    ["code", "type"]
        .iter()
        .filter_map(|k| err.get(k)?.as_str())
        .find(|c| {
            !c.is_empty()
                && c.len() <= MAX_ERROR_CODE
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'))
        })
        .map(str::to_string)
}

/// Parses `Retry-After` as seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64()))
        }
        Ok(_) => return None,
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(d.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(RETRY_AFTER, v);
        }
        h
    }

    #[test]
    fn retry_after_seconds_date_and_cap() {
        assert_eq!(retry_after(&with("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&with("99999")), Some(MAX_RETRY_AFTER));
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = retry_after(&with(&future)).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(retry_after(&with("soon")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn statuses_are_classified() {
        let k = |s: u16| status_error(StatusCode::from_u16(s).unwrap(), b"", None).kind;
        assert_eq!(k(429), FailureKind::RateLimited);
        assert_eq!(k(401), FailureKind::Unauthorized);
        assert_eq!(k(422), FailureKind::Rejected);
        assert_eq!(k(503), FailureKind::ServerError);
    }

    #[test]
    fn error_bodies_give_at_most_a_short_code() {
        let secret = br#"{"error": {"message": "Incorrect API key sk-abc123 for prompt 'my secret'", "type": "invalid_request_error", "code": "invalid_api_key"}}"#;
        let e = status_error(StatusCode::BAD_REQUEST, secret, None);
        assert_eq!(e.message, "HTTP 400 Bad Request (invalid_api_key)");
        let e = status_error(StatusCode::UNAUTHORIZED, secret, None);
        assert_eq!(
            e.message, "HTTP 401 Unauthorized",
            "nothing from a 401's body"
        );
        let free_text = br#"{"error": {"type": "the prompt was: my secret"}}"#;
        let e = status_error(StatusCode::INTERNAL_SERVER_ERROR, free_text, None);
        assert_eq!(e.message, "HTTP 500 Internal Server Error");
        let e = status_error(StatusCode::BAD_GATEWAY, b"<html>oops</html>", None);
        assert_eq!(e.message, "HTTP 502 Bad Gateway");
    }

    #[test]
    fn join_keeps_base_path() {
        let base = Url::parse("http://127.0.0.1:8000/v1").unwrap();
        assert_eq!(
            join(&base, "/completions").as_str(),
            "http://127.0.0.1:8000/v1/completions"
        );
    }
}
