//! The operator's view and hands on the HTTP front's listener: the status page (`/status`,
//! `/` leads there; its HTML, script and style are in the binary, nothing from elsewhere) and
//! the JSON API behind it — `GET /api/status`, `GET /api/config`, `GET /api/spend`,
//! `POST /api/providers/{name}/control` (`{"action": "enable" | "disable" | "drain" |
//! "reset_circuit"}`), `POST /api/health-check`.
//!
//! Who may look and act: with `server.auth` on, the API needs a client key
//! (`authorization: Bearer <key>`) and the control actions one marked `admin: true`; with
//! it off, the API answers loopback peers only. Keys go by header, never a cookie, so another
//! site cannot act through a browser (no CSRF). The page itself is only code: it asks for a
//! key when the API answers 401 and keeps it for the tab (sessionStorage).

use std::sync::Arc;

use axum::{
    Router as App,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use super::{edge::Edge, openai::Failure};
use crate::{
    auth::Authenticate, control::Action, error::RouterError, listener::Connection, status::Board,
};

const PAGE: &str = include_str!("status/page.html");
const SCRIPT: &str = include_str!("status/page.js");
const STYLE: &str = include_str!("status/page.css");

struct Console {
    edge: Arc<Edge>,
    auth: Authenticate,
    board: Arc<Board>,
}

/// The page's and the API's routes.
pub(crate) fn routes(edge: Arc<Edge>, auth: Authenticate, board: Arc<Board>) -> App {
    App::new()
        .route("/", get(|| async { Redirect::to("/status") }))
        .route(
            "/status",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/status/page.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/status/page.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route("/api/status", get(status))
        .route("/api/config", get(config))
        .route("/api/spend", get(spend))
        .route("/api/providers/{name}/control", post(control))
        .route("/api/health-check", post(health_check))
        .with_state(Arc::new(Console { edge, auth, board }))
}

/// An embedded asset; the page may load only its own script and style (CSP).
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn json_response(v: &Value) -> impl IntoResponse + use<> {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        v.to_string(),
    )
}

impl Console {
    /// Whether this request may use the API (`act`: a control action).
    fn allow(
        &self,
        headers: &HeaderMap,
        on: Option<axum::Extension<Connection>>,
        act: bool,
    ) -> Result<(), RouterError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.auth.client(authorization)? {
            Some(client) if act && !client.admin => Err(RouterError::NotOperator(format!(
                "client {:?} may not control providers: its key is not marked admin: true (server.auth.keys[].admin)",
                client.name
            ))),
            Some(_) => Ok(()),
            None if on
                .and_then(|axum::Extension(c)| c.peer())
                .is_some_and(|p| p.ip().is_loopback()) =>
            {
                Ok(())
            }
            None => Err(RouterError::NotOperator(
                "the operator API answers loopback only while server.auth is off".into(),
            )),
        }
    }
}

async fn status(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    on: Option<axum::Extension<Connection>>,
) -> Result<Response, Failure> {
    c.allow(&headers, on, false)?;
    let edge = &c.edge;
    let view = c.board.view(
        &edge.router,
        edge.inflight.count(),
        edge.config.limits.max_in_flight,
    );
    let body = serde_json::to_value(&view).map_err(|e| RouterError::Internal(e.to_string()))?;
    Ok(json_response(&body).into_response())
}

async fn config(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    on: Option<axum::Extension<Connection>>,
) -> Result<Response, Failure> {
    c.allow(&headers, on, false)?;
    Ok(json_response(&c.edge.router.config_view()).into_response())
}

/// `GET /api/spend[?day=YYYY-MM-DD]`: the day's ledger and today's budgets.
async fn spend(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    on: Option<axum::Extension<Connection>>,
    RawQuery(query): RawQuery,
) -> Result<Response, Failure> {
    c.allow(&headers, on, false)?;
    let day = match query.as_deref().and_then(|q| q.strip_prefix("day=")) {
        None => None,
        Some(d) => Some(crate::spend::parse_date(d).ok_or_else(|| {
            RouterError::InvalidArgument(format!("day: {d:?} is not a date; give YYYY-MM-DD"))
        })?),
    };
    let report = c.edge.router.spend().report(day).await;
    let body = serde_json::to_value(&report).map_err(|e| RouterError::Internal(e.to_string()))?;
    Ok(json_response(&body).into_response())
}

async fn control(
    State(c): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    on: Option<axum::Extension<Connection>>,
    body: Bytes,
) -> Result<Response, Failure> {
    c.allow(&headers, on, true)?;
    let asked: Value = serde_json::from_slice(&body).map_err(|e| {
        RouterError::InvalidArgument(format!(
            "the body is not JSON ({e}); send {{\"action\": \"enable\" | \"disable\" | \"drain\" | \"reset_circuit\"}}"
        ))
    })?;
    let action = asked.get("action").and_then(Value::as_str).ok_or_else(|| {
        RouterError::InvalidArgument(format!("action: missing; valid: {}", Action::NAMES))
    })?;
    let action = Action::parse(action)?;
    let s = c.edge.router.control(&name, action)?;
    Ok(json_response(&json!({
        "provider": &*s.name,
        "order": s.order.as_str(),
        "circuit": s.circuit.as_str(),
        "in_flight": s.in_flight,
    }))
    .into_response())
}

async fn health_check(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    on: Option<axum::Extension<Connection>>,
) -> Result<Response, Failure> {
    c.allow(&headers, on, true)?;
    let probes = c.edge.router.check_health().await;
    let providers: Vec<Value> = probes
        .into_iter()
        .map(|(name, probe)| match probe {
            None => json!({"provider": &*name, "checked": false}),
            Some(p) => json!({
                "provider": &*name,
                "checked": true,
                "passed": p.failure.is_none(),
                "took_ms": p.took.as_secs_f64() * 1e3,
                "error": p.failure.map(|(kind, message)| format!("{kind}: {message}")),
            }),
        })
        .collect();
    Ok(json_response(&json!({ "providers": providers })).into_response())
}
