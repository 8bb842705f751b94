//! The `cascade-router` binary: `serve` and `check`. The team's tools (mock provider, load
//! harness) are `cascade-bench`, in the `devtools` crate.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use cascade_router::{
    Router,
    config::{self, Config},
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
        Command::Serve { config, listen } => {
            let loaded = match load(config.clone()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(serve(loaded, config, listen))
        }
    }
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
