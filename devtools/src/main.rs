//! `cascade-bench`: the team's tools as one binary — the mock model server, the load harness
//! and the bare gRPC baseline. Not part of the product.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use cascade_devtools::{
    load,
    mock::{Fault, MockServer, Script},
};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "cascade-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mock model server (OpenAI, Ollama and Anthropic shapes, streamed or not) with
    /// scripted latency and faults.
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: SocketAddr,
        /// Fixed latency per request, in milliseconds.
        #[arg(long, default_value_t = 0.0)]
        latency_ms: f64,
        /// Extra latency per prompt in the request, in milliseconds.
        #[arg(long, default_value_t = 0.0)]
        per_item_ms: f64,
        /// Requests in service at once; the rest queue.
        #[arg(long, default_value_t = 1024)]
        concurrency: usize,
        /// Pause between the chunks of a streamed answer, in milliseconds.
        #[arg(long, default_value_t = 0.0)]
        chunk_interval_ms: f64,
        /// A fault: a status (500), 429:SECONDS, reset, break (mid-stream), hang or malformed.
        #[arg(long)]
        fault: Option<Fault>,
        /// Fraction of requests that get the fault.
        #[arg(long, default_value_t = 1.0)]
        fault_rate: f64,
        /// Serve TLS with a self-signed certificate made now, written (PEM) to this file.
        #[arg(long)]
        tls_cert_out: Option<PathBuf>,
        /// Prompt prefixes (first 1 KiB) the server's prefix cache holds, for `/stats`'
        /// `prefix_hits`.
        #[arg(long, default_value_t = 1024)]
        prefix_cache: usize,
    },
    /// Load-test the router over gRPC (or an OpenAI-shaped HTTP server directly).
    Load(LoadArgs),
    /// A bare tonic server answering Complete with a constant: the gRPC ceiling baseline.
    BareServer {
        #[arg(long, default_value = "127.0.0.1:50052")]
        listen: SocketAddr,
        /// Forward each prompt to this OpenAI-shaped base URL (with /v1) instead: the
        /// thinnest proxy tonic and reqwest make, the overhead scenario's floor.
        #[arg(long)]
        forward: Option<String>,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The router's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Load this OpenAI-shaped base URL (with /v1) directly instead of the router.
    #[arg(long)]
    http: Option<String>,
    /// With --http: `POST /chat/completions` (the prompt as one user message) rather than
    /// `/completions`.
    #[arg(long)]
    chat: bool,
    /// Requests in flight at most (closed loop: workers).
    #[arg(short, long, default_value_t = 50)]
    concurrency: usize,
    /// Requests to send (default 200 when no --duration).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Seconds to run; with --requests, whichever ends first.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests per second, open loop (latency counted from each request's due time).
    #[arg(long)]
    rate: Option<f64>,
    /// gRPC channels (HTTP/2 connections) or HTTP clients.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Unrecorded requests sent first.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Request template as JSON; `{{n}}` in the prompt becomes the request number.
    #[arg(short, long, default_value = r#"{"prompt":"hello {{n}}"}"#)]
    data: String,
    /// JSONL file of request templates, used in turn (overrides --data).
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Deadline per request, in seconds.
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
    /// Make each call a CompleteBatch of this many prompts (an agent's own batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Load(args) => match runtime.block_on(load_test(args)) {
            Ok(out) => {
                say(&out);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::BareServer { listen, forward } => runtime.block_on(async {
            let served = match (tokio::net::TcpListener::bind(listen).await, forward) {
                (Ok(l), None) => load::bare::serve(l, false).await.map_err(|e| e.to_string()),
                (Ok(l), Some(base)) => load::bare::serve_forwarding(l, &base)
                    .await
                    .map_err(|e| e.to_string()),
                (Err(e), _) => Err(e.to_string()),
            };
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::MockProvider {
            listen,
            latency_ms,
            per_item_ms,
            concurrency,
            chunk_interval_ms,
            fault,
            fault_rate,
            tls_cert_out,
            prefix_cache,
        } => {
            let script = Script {
                base_latency: Duration::from_secs_f64(latency_ms.max(0.0) / 1e3),
                per_item_latency: Duration::from_secs_f64(per_item_ms.max(0.0) / 1e3),
                max_concurrency: concurrency,
                fault,
                fault_rate,
                fault_every: 0,
                reject_marker: None,
                omit_marker: None,
                refuse_arrays: false,
                chunk_interval: Duration::from_secs_f64(chunk_interval_ms.max(0.0) / 1e3),
                prefix_cache,
                usage: None,
            };
            runtime.block_on(async {
                let started = match tls_cert_out {
                    None => MockServer::bind(listen, script).await,
                    Some(path) => match MockServer::bind_tls(listen, script).await {
                        Ok((mock, pem)) => std::fs::write(&path, pem).map(|()| mock),
                        Err(e) => Err(e),
                    },
                };
                match started {
                    Ok(mock) => {
                        tracing::info!(addr = %mock.addr(), "mock provider listening");
                        tokio::select! {
                            _ = mock.run_forever() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: cannot listen on {listen}: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

async fn load_test(args: LoadArgs) -> Result<String, String> {
    let data = match &args.data_file {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => args.data.clone(),
    };
    let spec = load::Spec {
        target: match args.http {
            Some(url) if args.chat => load::Target::HttpChat(url),
            Some(url) => load::Target::Http(url),
            None => load::Target::Grpc(args.addr),
        },
        concurrency: args.concurrency,
        connections: args.connections,
        requests: args.requests,
        duration: args.duration.map(Duration::from_secs_f64),
        rate: args.rate,
        warmup: args.warmup,
        templates: load::templates(&data)?,
        timeout: Duration::from_secs_f64(args.timeout),
        batch: args.batch,
    };
    let report = load::run(spec).await.map_err(|e| e.to_string())?;
    Ok(if args.json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    } else {
        load::render(&report)
    })
}

/// Prints a result line; a closed pipe (`| head`) is not an error worth a panic.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}
