//! The status page in a real browser: Debian's headless Chromium, driven through
//! chromedriver's WebDriver protocol (plain HTTP, spoken here with reqwest), loads `/status`
//! from a running router with several mock providers; the test reads the rendered DOM after
//! the page's script ran. A provider disabled through the API shows as disabled within 2 s
//! without a reload, the page's own button enables it again, and a provider killed mid-run
//! turns unhealthy through the health checks. With `CASCADE_SCREENSHOT=FILE` it saves a PNG
//! of the page (the README's `docs/status-page.png` came from it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use cascade_devtools::mock::{MockServer, Script};
use common::*;
use serde_json::{Value, json};

/// chromedriver, stopped with its browser when dropped: both are in a process group of their
/// own, killed whole (killing chromedriver alone left Chromium running, adopted by init).
struct Driver {
    child: Child,
    url: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(chromedriver: &str, chromium: &str) -> Driver {
        let port = free_port().await;
        let child = Command::new(chromedriver)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        within(async {
            loop {
                if let Ok(r) = http.get(format!("{url}/status")).send().await
                    && let Ok(v) = r.json::<Value>().await
                    && v["value"]["ready"] == true
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let profile = std::env::temp_dir().join(format!("cascade-chromium-{port}"));
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1500,560",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let mut d = Driver {
            child,
            url,
            session: String::new(),
            http,
        };
        let v = d.post("/session", caps).await;
        d.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        d
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v.get("value").cloned().unwrap_or(v)
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/session/{}{path}", self.url, self.session))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v.get("value").cloned().unwrap_or(v)
    }

    async fn session(&self, path: &str, body: Value) -> Value {
        self.post(&format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn script(&self, script: &str) -> Value {
        self.session("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Each provider row's name and state as rendered.
    async fn states(&self) -> Vec<(String, String)> {
        let v = self
            .script("return Array.from(document.querySelectorAll('tr[data-provider]')).map(r => [r.dataset.provider, r.dataset.state])")
            .await;
        v.as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r[0].as_str().unwrap_or_default().to_string(),
                            r[1].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn state_of(&self, provider: &str) -> Option<String> {
        self.states()
            .await
            .into_iter()
            .find(|(p, _)| p == provider)
            .map(|(_, s)| s)
    }

    /// Waits (polling the DOM, bounded) until `provider` shows `state`.
    async fn shows(&self, provider: &str, state: &str) {
        within(async {
            while self.state_of(provider).await.as_deref() != Some(state) {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .await;
    }
}

fn installed(name: &str) -> Option<String> {
    ["/usr/bin/", "/usr/local/bin/"]
        .iter()
        .map(|dir| format!("{dir}{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_each_provider_live_in_a_real_browser() {
    let (Some(chromedriver), Some(chromium)) = (installed("chromedriver"), installed("chromium"))
    else {
        skip_unless_ci(
            "no chromium and chromedriver",
            "apt-get install chromium chromium-driver (scripts/test does)",
        );
        return;
    };
    let mocks = [
        MockServer::start(Script {
            base_latency: Duration::from_millis(15),
            ..Script::default()
        })
        .await
        .unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
        MockServer::start(Script::default()).await.unwrap(),
    ];
    let port = free_port().await;
    let check = "health_check: {interval_seconds: 0.2, timeout_ms: 150, unhealthy_after: 2}";
    let yaml = format!(
        "server: {{http_listen: \"127.0.0.1:{port}\"}}\ncache: {{enabled: true}}\ncost_tracking: {{budget_daily_usd: 10}}\nproviders:\n\
         - {{name: alpha, type: openai, priority: 1, base_url: \"{}/v1\", models: [{{name: m, price: {{input_per_million: 1, output_per_million: 1}}}}], {check}, batching: {{mode: adaptive}}}}\n\
         - {{name: beta, type: openai, priority: 2, base_url: \"{}/v1\", models: [m, beta-model], {check}}}\n\
         - {{name: gamma, type: ollama, priority: 3, url: \"{}\", models: [m, llama3], {check}}}\n",
        mocks[0].url(),
        mocks[1].url(),
        mocks[2].url(),
    );
    let mut router = start(&yaml).await;
    let base = format!("http://127.0.0.1:{port}");
    http_listening(&format!("127.0.0.1:{port}")).await;
    for i in 0..40 {
        router
            .client
            .complete(prompt(&format!("warm {i}")))
            .await
            .unwrap();
    }
    let driver = Driver::start(&chromedriver, &chromium).await;
    driver
        .session("/url", json!({"url": format!("{base}/status")}))
        .await;
    for p in ["alpha", "beta", "gamma"] {
        driver.shows(p, "healthy").await;
    }
    driver.script("window.__loaded = true; return true").await;
    // The day's spend: the router's budget, and alpha's (priced) answers.
    let budget = driver
        .script("const b = document.querySelector('#budgets li[data-budget=router]'); return b ? b.textContent : ''")
        .await;
    assert!(
        budget
            .as_str()
            .is_some_and(|t| t.contains(" of $10.00 used") && !t.contains("$0.0000 of")),
        "{budget}"
    );
    let alpha = driver
        .script("return document.querySelector('tr[data-provider=alpha] td').textContent")
        .await;
    assert!(
        alpha.as_str().is_some_and(|t| t.contains(" today")),
        "{alpha}"
    );

    // Disabled through the API: shown within 2 s, without a reload.
    let asked = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{base}/api/providers/beta/control"))
        .json(&json!({"action": "disable"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    driver.shows("beta", "disabled").await;
    let shown_after = asked.elapsed();
    assert!(
        shown_after < Duration::from_secs(2),
        "shown after {shown_after:?}"
    );
    assert_eq!(
        driver.script("return window.__loaded === true").await,
        true,
        "no reload"
    );

    // The page's own button enables it again.
    let button = driver
        .session(
            "/element",
            json!({"using": "css selector", "value": "tr[data-provider=beta] button[data-action=enable]"}),
        )
        .await;
    let id = button
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no enable button: {button}"))
        .to_string();
    driver
        .session(&format!("/element/{id}/click"), json!({}))
        .await;
    driver.shows("beta", "healthy").await;

    // Killed mid-run: the health checks turn it unhealthy on the page.
    let [alpha, beta, gamma] = mocks;
    drop(gamma);
    driver.shows("gamma", "unhealthy").await;
    assert_eq!(driver.state_of("alpha").await.as_deref(), Some("healthy"));
    for i in 0..20 {
        router
            .client
            .complete(prompt(&format!("after {i}")))
            .await
            .unwrap();
    }

    if let Ok(path) = std::env::var("CASCADE_SCREENSHOT") {
        // For the picture: ten seconds of traffic (alpha failing a fifth of its requests, so
        // the fallback to beta, the error rate and the failures show), then the page.
        alpha.set_script(Script {
            base_latency: Duration::from_millis(15),
            fault: Some(cascade_devtools::mock::Fault::Status(503)),
            fault_rate: 0.2,
            ..Script::default()
        });
        let until = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        while Instant::now() < until {
            let _ = router
                .client
                .complete(prompt(&format!("traffic {i}")))
                .await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let png = driver.get("/screenshot").await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    drop((alpha, beta));
}
