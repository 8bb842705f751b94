//! The `cascade-router` binary: `serve` and `check` for operators, `complete` and `batch` for
//! agents and scripts. The team's tools (mock provider, load harness) are `cascade-bench`, in
//! the `devtools` crate.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use cascade_router::{
    Router,
    client::{self, Client, ClientError, Target, batch},
    config::{self, Config},
    proto::v1,
    server,
};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "cascade-router", version, about)]
struct Cli {
    /// How log lines on stderr look: text for people, json (one object a line) for collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve cascade.v1.Router over gRPC (with health and reflection).
    Serve {
        /// The cascade file; without one, a built-in simulated provider answers.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on; overrides `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a cascade file without serving; exit 2 if it is unusable.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask a running router for one completion and print it. Exit codes: 0 answered, 2
    /// invalid, 3 unavailable, 4 deadline exceeded, 5 resource exhausted, 6 not allowed.
    Complete {
        #[command(flatten)]
        to: RouterArgs,
        /// A model or fallback chain; empty: the agent's assignment or the default cascade.
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long, default_value = "")]
        agent: String,
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long)]
        temperature: Option<f32>,
        /// An image file (PNG, JPEG, GIF, WebP) sent with the prompt; repeatable.
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// A JSON file of tools in OpenAI's shape; the model may answer with tool calls.
        #[arg(long)]
        tools: Option<PathBuf>,
        /// `json` for a JSON object, or a JSON schema file the answer must follow.
        #[arg(long)]
        response_format: Option<String>,
        /// Print the whole response as JSON (provider, attempts, usage, tool calls, ...).
        #[arg(long)]
        json: bool,
        prompt: String,
    },
    /// Print a day's spend by tenant, provider and model, and the budgets: the fleet's, from
    /// the Redis the cascade file names, or else a running router's (`GET /api/spend` on
    /// `server.http_listen`).
    Spend {
        #[arg(long)]
        config: PathBuf,
        /// The UTC day, YYYY-MM-DD; default today.
        #[arg(long)]
        day: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The client key, when the router has `server.auth`.
        #[arg(long, env = "CASCADE_ROUTER_KEY", hide_env_values = true)]
        key: Option<String>,
    },
    /// Send a JSONL file of prompts through a running router; one JSONL answer per line, in
    /// input order, with errors in place.
    Batch {
        #[command(flatten)]
        to: RouterArgs,
        /// For lines that name no model.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// CompleteBatch calls in flight at most.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Prompts per CompleteBatch call.
        #[arg(long, default_value_t = 32)]
        chunk: usize,
        /// Write answers here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Skip ids already answered in --output, and append.
        #[arg(long)]
        resume: bool,
        /// JSONL: {"id", "prompt" | "messages" (OpenAI's shape), "max_tokens", "temperature",
        /// "top_p", "stop", "seed", "tools", "tool_choice", "response_format", "agent",
        /// "model"}; a plain-text line is a prompt whose id is its line number.
        input: PathBuf,
    },
}

/// Which router `complete` and `batch` talk to, and how.
#[derive(clap::Args)]
struct RouterArgs {
    /// The router: http://host:port or https://host:port.
    #[arg(
        long,
        env = "CASCADE_ROUTER_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// Each call's deadline, in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// The client key, when the router has `server.auth`.
    #[arg(long, env = "CASCADE_ROUTER_KEY", hide_env_values = true)]
    key: Option<String>,
    /// A CA certificate (PEM) to trust for an https:// router.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

impl RouterArgs {
    fn target(self) -> Result<Target, ClientError> {
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 86_400.0) {
            return Err(ClientError::Usage(format!(
                "--timeout {} must be seconds above 0, at most a day",
                self.timeout
            )));
        }
        Ok(Target {
            addr: self.addr,
            key: self.key.filter(|k| !k.trim().is_empty()),
            timeout: Duration::from_secs_f64(self.timeout),
            ca_file: self.ca_file,
        })
    }
}

/// Logs to stderr at `RUST_LOG`'s levels — `info` when it is unset, empty or unreadable —
/// with colours only on a terminal.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let wanted = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, bad) = match wanted.trim() {
        "" => (EnvFilter::new("info"), None),
        directives => match EnvFilter::try_new(directives) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(e)),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some(e) = bad {
        tracing::warn!("RUST_LOG is not understood ({e}); logging at info");
    }
}

/// jemalloc, configured in `.cargo/config.toml` (a background thread returns pages unused for
/// 1 s): glibc's malloc kept a burst's peak resident for good — ~100 MiB after 10,000 calls in
/// flight, against ~16 MiB here (BENCHMARKS.md, "memory_rounds").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
        Command::Check { config } => match load(Some(config)) {
            Ok(c) => {
                let names: Vec<&str> = c.providers.iter().map(|p| p.name.as_str()).collect();
                say(&format!(
                    "ok: {} provider(s): {}",
                    names.len(),
                    names.join(", ")
                ));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Spend {
            config,
            day,
            json,
            key,
        } => {
            let loaded = match load(Some(config)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let asked = client::spend::report(&loaded, day.as_deref(), key.as_deref());
            match runtime.block_on(asked) {
                Ok(report) if json => {
                    say(&report.to_string());
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    say(client::spend::table(&report).trim_end());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Serve { config, listen } => {
            let loaded = match load(config.clone()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(serve(loaded, config, listen))
        }
        Command::Complete {
            to,
            model,
            agent,
            max_tokens,
            temperature,
            images,
            tools,
            response_format,
            json,
            prompt,
        } => {
            let ask = client::Ask {
                model,
                agent,
                max_tokens,
                temperature,
                images,
                tools,
                response_format,
                prompt,
            };
            finish(
                ask.into_request()
                    .and_then(|request| runtime.block_on(complete(to, request, json))),
            )
        }
        Command::Batch {
            to,
            model,
            agent,
            concurrency,
            chunk,
            output,
            resume,
            input,
        } => {
            let opts = batch::Options {
                input,
                output,
                resume,
                concurrency,
                chunk,
                model,
                agent,
                progress: true,
            };
            finish(runtime.block_on(run_batch(to, opts)))
        }
    }
}

/// A client command's outcome as its exit code, an error as one line on stderr.
fn finish(outcome: Result<u8, ClientError>) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn complete(
    to: RouterArgs,
    request: v1::CompleteRequest,
    json: bool,
) -> Result<u8, ClientError> {
    let mut c = Client::connect(to.target()?).await?;
    let r = c.complete(request).await?;
    if json {
        say(&client::response_json(&r).to_string());
    } else if r.tool_calls.is_empty() {
        say(&r.text);
    } else {
        // Text (if any), then each call as one JSON line: what a shell loop acts on.
        if !r.text.is_empty() {
            say(&r.text);
        }
        for c in &r.tool_calls {
            let call = serde_json::json!({"id": c.id, "name": c.name, "arguments": c.arguments});
            say(&call.to_string());
        }
    }
    Ok(0)
}

/// Exit 0 when every line was answered, 1 when some failed, 130 when interrupted.
async fn run_batch(to: RouterArgs, opts: batch::Options) -> Result<u8, ClientError> {
    let c = Client::connect(to.target()?).await?;
    let stop = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let summary = batch::run(&c, &opts, stop).await?;
    eprintln!("{summary}");
    Ok(if summary.interrupted {
        130
    } else if summary.failed.is_empty() {
        0
    } else {
        1
    })
}

/// Loads and validates the cascade file; a bad one prints one line and means exit code 2.
fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let loaded = match &path {
        Some(p) => config::load(p),
        None => config::parse(config::DEFAULT_YAML, "(built-in default)", &|_| None),
    };
    match loaded {
        Ok(c) => {
            for w in &c.warnings {
                tracing::warn!("{w}");
            }
            Ok(c)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

async fn serve(config: Config, path: Option<PathBuf>, listen: Option<SocketAddr>) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};

    let mut server_config = config.server.clone();
    if let Some(addr) = listen {
        server_config.listen = addr;
    }
    if let Err(e) = config::open_to_network(
        server_config.listen,
        server_config.auth.as_ref(),
        server_config.allow_unauthenticated,
    ) {
        eprintln!("error: --listen {e}");
        return ExitCode::from(2);
    }
    if server_config.auth.is_none() && !server_config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %server_config.listen,
            "serving WITHOUT client keys on a non-loopback address (server.allow_unauthenticated: true)"
        );
    }
    // Every connection is a file: the soft limit (often 1024, or lower) would let a few
    // hundred idle clients stop both fronts; the hard limit is the operator's.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let router = match Router::new(&config) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (term, int, hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("error: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(server_config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", server_config.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(server_config.listen);
    tracing::info!(
        %addr,
        providers = config.providers.len(),
        "cascade-router serving cascade.v1.Router"
    );
    tokio::spawn(reload_on_hangup(hup, router.clone(), path, config.server));
    match server::serve(router, server_config, listener, stop_signal(term, int)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT, which starts the drain; a second one ends the
/// process at once.
async fn stop_signal(mut term: tokio::signal::unix::Signal, mut int: tokio::signal::unix::Signal) {
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{name}: shutting down (a second signal exits at once)");
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!("second signal ({name}): exiting without draining");
        std::process::exit(130);
    });
}

/// On each SIGHUP, reads the cascade file again and swaps it in; an unusable file is logged
/// and the running config keeps serving. `server` settings (listener, limits) need a restart.
async fn reload_on_hangup(
    mut hup: tokio::signal::unix::Signal,
    router: Arc<Router>,
    path: Option<PathBuf>,
    server: config::ServerConfig,
) {
    while hup.recv().await.is_some() {
        let Some(path) = &path else {
            tracing::warn!("SIGHUP: serving the built-in config (no --config); nothing to reload");
            continue;
        };
        let config = match config::load(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: reload rejected, still serving the previous config: {e}");
                continue;
            }
        };
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        match router.reload(&config) {
            Ok(r) => tracing::info!(
                kept = ?r.kept,
                built = ?r.built,
                cache_kept = r.cache_kept,
                "SIGHUP: reloaded {}",
                path.display()
            ),
            Err(e) => {
                tracing::error!("SIGHUP: reload rejected, still serving the previous config: {e}");
                continue;
            }
        }
        if config.server != server {
            tracing::warn!("SIGHUP: `server` and `limits` changes take effect at the next restart");
        }
    }
}

/// Prints a result line; a closed pipe (`| head`) is not an error worth a panic.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{text}");
}
