//! Shared test scaffolding: the real router on a loopback port, reached by a real tonic
//! client, in front of real mock HTTP servers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod redis_server;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use cascade_router::{
    Router, config,
    proto::v1::{self, router_client::RouterClient},
    server,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub struct RunningRouter {
    pub addr: SocketAddr,
    pub router: Arc<Router>,
    pub client: RouterClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for RunningRouter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Starts the router from cascade-file text, `${VAR}`s resolved from `env`.
pub async fn start_with_env(yaml: &str, env: HashMap<String, String>) -> RunningRouter {
    let config = config::parse(yaml, "test.yaml", &move |k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("{e}"));
    let router = Arc::new(Router::new(&config).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server_config = config.server.clone();
    let serving = router.clone();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        server::serve(serving, server_config, listener, shutdown)
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    RunningRouter {
        addr,
        router,
        client: RouterClient::new(channel),
        stop: Some(stop),
        task,
    }
}

pub async fn start(yaml: &str) -> RunningRouter {
    start_with_env(yaml, HashMap::new()).await
}

/// A cascade section with fast retries, so tests spend no time in backoff.
pub fn cascade(retries: u32, failure_threshold: u32, recovery_seconds: f64) -> String {
    format!(
        "cascade:\n  timeout_seconds: 30\n  max_retries_per_provider: {retries}\n  retry_delay_seconds: 0.001\n  circuit_breaker: {{failure_threshold: {failure_threshold}, recovery_timeout: {recovery_seconds}, half_open_max_calls: 1}}\n"
    )
}

/// An OpenAI-shaped provider entry serving model `m`.
pub fn openai(name: &str, priority: i32, base: &str) -> String {
    format!(
        "  - {{name: {name}, type: openai, priority: {priority}, base_url: \"{base}/v1\", models: [m]}}\n"
    )
}

/// A loopback address nothing listens on (bound, then released).
pub async fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A free loopback port for a front the test configures (the HTTP front, say).
pub async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Waits until an HTTP front at `addr` answers (it binds its port as the server starts).
pub async fn http_listening(addr: &str) {
    within(async {
        while reqwest::get(format!("http://{addr}/v1/models"))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Reads until the server closes the connection (EOF or reset): an event, bounded by `within`.
pub async fn closed_by_server(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    within(async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

pub fn prompt(text: &str) -> v1::CompleteRequest {
    v1::CompleteRequest {
        model: "m".into(),
        prompt: text.into(),
        ..Default::default()
    }
}

/// `client.ask(req)`: one Complete that must succeed, its response.
#[allow(async_fn_in_trait)]
pub trait Ask {
    async fn ask(
        &mut self,
        req: impl tonic::IntoRequest<v1::CompleteRequest>,
    ) -> v1::CompleteResponse;
}

impl Ask for RouterClient<Channel> {
    async fn ask(
        &mut self,
        req: impl tonic::IntoRequest<v1::CompleteRequest>,
    ) -> v1::CompleteResponse {
        self.complete(req).await.unwrap().into_inner()
    }
}

/// One CompleteBatch of `prompts` (model `m`); the results in order.
pub async fn complete_batch(
    client: &mut RouterClient<Channel>,
    prompts: &[String],
) -> Vec<v1::BatchResult> {
    let req = v1::CompleteBatchRequest {
        requests: prompts.iter().map(|p| prompt(p)).collect(),
    };
    client
        .complete_batch(req)
        .await
        .unwrap()
        .into_inner()
        .results
}

/// Calls in flight: `n` Completes of the prompts `{tag}{i}`, each with `timeout`, each in a task
/// of its own, all started at once; await the handles for the answers, in order.
pub fn spawn_calls(
    client: &RouterClient<Channel>,
    n: usize,
    tag: &str,
    timeout: Duration,
) -> Vec<JoinHandle<Result<tonic::Response<v1::CompleteResponse>, tonic::Status>>> {
    (0..n)
        .map(|i| {
            let mut c = client.clone();
            let req = with_timeout(prompt(&format!("{tag}{i}")), timeout);
            tokio::spawn(async move { c.complete(req).await })
        })
        .collect()
}

pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

pub async fn providers(client: &mut RouterClient<Channel>) -> Vec<v1::ProviderStatus> {
    client
        .list_providers(v1::ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers
}

pub fn circuit_of(providers: &[v1::ProviderStatus], name: &str) -> v1::CircuitState {
    providers
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.circuit())
        .unwrap()
}

/// Bounds a wait on an event so that a broken test fails instead of hanging.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("event did not happen within 20 s")
}

/// Waits until `provider` has `n` items in its batch queues (polls ListProviders).
pub async fn wait_queued(client: &mut RouterClient<Channel>, provider: &str, n: u64) {
    loop {
        let queued = providers(client)
            .await
            .iter()
            .find(|p| p.name == provider)
            .map(|p| p.queued);
        if queued == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The value of one Prometheus sample (`name` with its labels, as rendered), 0 if absent.
pub fn metric(router: &RunningRouter, name: &str) -> f64 {
    sample(&router.router.render_metrics(), name)
}

/// The value of sample `name` in a Prometheus text exposition, 0 if absent.
pub fn sample(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The metrics a router serves on `server.metrics_listen` at loopback `port`.
pub async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The real `cascade-router serve` binary, its stderr lines arriving on a channel, so tests
/// can wait for what it logs (an event) rather than for time to pass.
pub struct Served {
    pub addr: String,
    pid: u32,
    lines: std::sync::mpsc::Receiver<String>,
    exited: std::sync::mpsc::Receiver<std::process::ExitStatus>,
    reader: Option<std::thread::JoinHandle<()>>,
    seen: Vec<String>,
    /// Set once the process is known to have ended: its pid must not be signalled again.
    gone: bool,
}

impl Served {
    /// Starts `cascade-router [global args] serve --config PATH --listen 127.0.0.1:0` and waits
    /// for it to say where it listens.
    pub fn start(global: &[&str], config: &std::path::Path, rust_log: &str) -> Served {
        Served::start_with_env(global, config, rust_log, &[])
    }

    /// [`Served::start`] with extra environment variables.
    pub fn start_with_env(
        global: &[&str],
        config: &std::path::Path,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Served {
        use std::process::Command;
        Served::spawn(
            Command::new(env!("CARGO_BIN_EXE_cascade-router")),
            global,
            config,
            rust_log,
            env,
        )
    }

    /// [`Served::start`] with its open-file limit (soft and hard) set to `nofile` by util-linux's
    /// `prlimit`, so the router cannot raise it.
    pub fn start_with_nofile(global: &[&str], config: &std::path::Path, nofile: u64) -> Served {
        let mut limited = std::process::Command::new("prlimit");
        limited
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_cascade-router"));
        Served::spawn(limited, global, config, "info", &[])
    }

    fn spawn(
        mut command: std::process::Command,
        global: &[&str],
        config: &std::path::Path,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Served {
        use std::{
            io::{BufRead, BufReader},
            process::Stdio,
        };
        let mut child = command
            .args(global)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let pid = child.id();
        let (done, exited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = done.send(status);
            }
        });
        let mut served = Served {
            addr: String::new(),
            pid,
            lines,
            exited,
            reader: Some(reader),
            seen: Vec::new(),
            gone: false,
        };
        let line = served.wait_for_line("cascade-router serving");
        let start = line.find("127.0.0.1:").expect("an address in the line");
        served.addr = line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        served
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits (at most 30 s) for a log line containing `needle`, and returns it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| {
                    panic!(
                        "no log line with {needle:?}; seen:\n{}",
                        self.seen.join("\n")
                    )
                });
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// The exit status, if the process ends within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let status = self.exited.recv_timeout(within).ok();
        self.gone |= status.is_some();
        status
    }

    fn kill(&mut self) {
        if !self.gone && self.exited.try_recv().is_err() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let _ = self.exited.recv_timeout(Duration::from_secs(30));
        }
        self.gone = true;
    }

    pub async fn client(&self) -> RouterClient<Channel> {
        RouterClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// Every line logged so far and until the process ends (after killing it if it runs).
    pub fn finish(mut self) -> Vec<String> {
        self.kill();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let mut all = std::mem::take(&mut self.seen);
        all.extend(self.lines.try_iter());
        all
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `text` to a fresh file in the temp directory and returns its path.
pub fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("cascade-{name}-{}-{n}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// A test's prerequisite is missing: a loud skip on a developer's machine, a failure under CI
/// (which must run every test).
pub fn skip_unless_ci(what: &str, fix: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{what}, and CI must run this test: {fix}"
    );
    eprintln!("\n\n*** SKIPPED: {what} ({fix}) ***\n\n");
}

/// A Python that can import `modules` (comma-separated): `CASCADE_PYTHON` (scripts/real-servers
/// prints it), else the project's venv in the cache. Absent is a loud skip, and a failure
/// under CI.
pub fn python_with(modules: &str) -> Option<std::path::PathBuf> {
    let python = std::env::var_os("CASCADE_PYTHON")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/cascade-router/venv/bin/python"))
        })?;
    let usable = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if usable {
        return Some(python);
    }
    skip_unless_ci(
        &format!("no Python with {modules}"),
        "run scripts/real-servers, or scripts/test",
    );
    None
}

/// Runs `examples/python/<script>` with `args` and `--report` on a blocking thread; the JSON
/// report it prints (the test fails, showing its output, if it fails).
pub async fn python_report(
    python: std::path::PathBuf,
    script: &str,
    args: Vec<String>,
) -> serde_json::Value {
    let path = format!("{}/examples/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(path)
            .args(args)
            .arg("--report")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
