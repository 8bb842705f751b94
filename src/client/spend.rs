//! `cascade-router spend`: a day's spend and budgets — the fleet's, read from the Redis the
//! cascade file names (no router need be running), or else one running router's, from
//! `GET /api/spend` on its `server.http_listen`.

use serde_json::Value;

use super::ClientError;
use crate::{config::Config, spend};

/// The report of `day` (`YYYY-MM-DD`, UTC; today when `None`) as JSON.
pub async fn report(
    config: &Config,
    day: Option<&str>,
    key: Option<&str>,
) -> Result<Value, ClientError> {
    let parsed = match day {
        None => None,
        Some(d) => Some(spend::parse_date(d).ok_or_else(|| {
            ClientError::Usage(format!("--day {d:?} is not a date; give YYYY-MM-DD"))
        })?),
    };
    if config.fleet.is_some() {
        let report = spend::report_from_redis(config, parsed)
            .await
            .ok_or_else(|| ClientError::Unreachable {
                addr: "the Redis the cascade file names".into(),
                cause: "it did not answer".into(),
            })?;
        return serde_json::to_value(report).map_err(|e| ClientError::Io(e.to_string()));
    }
    let Some(http) = config.server.http_listen else {
        return Err(ClientError::Usage(
            "the cascade file names no Redis (fleet.redis_url or cache.redis_url) and no \
             server.http_listen: each router keeps its ledger in memory, and this one cannot \
             be asked for it"
                .into(),
        ));
    };
    let mut url = format!("http://{http}/api/spend");
    if let Some(d) = day {
        url.push_str(&format!("?day={d}"));
    }
    let mut ask = reqwest::Client::new().get(&url);
    if let Some(k) = key {
        ask = ask.bearer_auth(k);
    }
    let unreachable = |e: reqwest::Error| ClientError::Unreachable {
        addr: url.clone(),
        cause: e.to_string(),
    };
    let answer = ask.send().await.map_err(unreachable)?;
    let status = answer.status();
    let body: Value = answer.json().await.map_err(unreachable)?;
    if !status.is_success() {
        return Err(ClientError::Usage(format!(
            "{url} answered {status}: {body}"
        )));
    }
    Ok(body)
}

/// The report as a table for people.
pub fn table(report: &Value) -> String {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let mut out = format!(
        "spend on {} (from {})\n{:<20} {:<16} {:<24} {:>8} {:>14}\n",
        s(report, "date"),
        s(report, "source"),
        "tenant",
        "provider",
        "model",
        "calls",
        "usd"
    );
    let empty = Vec::new();
    let rows = report
        .get("rows")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for r in rows {
        let tenant = s(r, "tenant");
        out.push_str(&format!(
            "{:<20} {:<16} {:<24} {:>8} {:>14.6}\n",
            if tenant.is_empty() { "-" } else { &tenant },
            s(r, "provider"),
            s(r, "model"),
            r.get("calls").and_then(Value::as_u64).unwrap_or(0),
            f(r, "usd")
        ));
    }
    out.push_str(&format!("total ${:.6}\n", f(report, "total_usd")));
    let budgets = report
        .get("budgets")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for b in budgets {
        out.push_str(&format!(
            "budget {}: ${:.6} of ${:.2} used, ${:.6} left\n",
            s(b, "budget"),
            f(b, "used_usd"),
            f(b, "daily_usd"),
            f(b, "remaining_usd")
        ));
    }
    out
}
