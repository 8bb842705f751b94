//! Shared test scaffolding: the real router on a loopback port, reached by a real tonic
//! client, in front of real mock HTTP servers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    router
        .router
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}
