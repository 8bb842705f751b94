//! A request's debug log lines carry its request_id from the gRPC edge to the provider call —
//! unbatched and through a batch queue — in both log formats, and prompts are not logged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use cascade_devtools::mock::{MockServer, Script};
use cascade_router::proto::v1::{self, router_client::RouterClient};

const PROMPT: &str = "a private prompt that must stay out of the logs";

/// The real binary serving `config`, its stderr lines arriving on the receiver.
struct Served {
    child: Child,
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

impl Served {
    fn start(format: &str, config: &str) -> Served {
        let path = std::env::temp_dir().join(format!(
            "cascade-logging-{}-{format}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cascade-router"))
            .args(["--log-format", format, "serve", "--listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "cascade_router=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Served {
            child,
            lines,
            reader,
        }
    }

    /// Waits for the line that says the router is serving, and reads its address from it.
    fn addr(&self) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the router never said it was serving");
            if !line.contains("cascade-router serving") {
                continue;
            }
            let start = line.find("127.0.0.1:").expect("an address in the line");
            let addr: String = line[start..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            return addr;
        }
    }

    /// Stops the router and returns every line it wrote after the serving line.
    fn stop(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.reader.join().unwrap();
        self.lines.try_iter().collect()
    }
}

async fn ask(client: &mut RouterClient<tonic::transport::Channel>, model: &str, id: &str) {
    let r = client
        .complete(v1::CompleteRequest {
            model: model.into(),
            prompt: PROMPT.into(),
            request_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.request_id, id);
}

/// The messages of the lines that carry `id`.
fn messages_of<'a>(lines: &'a [String], id: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(id)).collect()
}

async fn request_ids_reach_the_provider_call(format: &str) -> Vec<String> {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let config = format!(
        "providers:\n  - name: up\n    type: openai\n    base_url: \"{}/v1\"\n    models:\n      - m\n      - {{name: b, batching: {{max_batch_size: 4, max_wait_ms: 1}}}}\n",
        mock.url()
    );
    let served = Served::start(format, &config);
    let addr = served.addr();
    let mut client = RouterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    ask(&mut client, "m", "trace-unbatched-1").await;
    ask(&mut client, "b", "trace-batched-2").await;
    let lines = served.stop();

    for (id, provider_line) in [
        ("trace-unbatched-1", "upstream request sent"),
        ("trace-batched-2", "batch answered"),
    ] {
        let mine = messages_of(&lines, id);
        for needle in ["request received", provider_line, "answered"] {
            assert!(
                mine.iter().any(|l| l.contains(needle)),
                "no {needle:?} line with {id} in {format} logs:\n{}",
                lines.join("\n")
            );
        }
    }
    assert!(
        !lines.iter().any(|l| l.contains(PROMPT)),
        "a prompt was logged"
    );
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_carry_the_request_id_to_the_provider_call() {
    let lines = request_ids_reach_the_provider_call("text").await;
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "no colours when stderr is not a terminal"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_request_id_to_the_provider_call() {
    let lines = request_ids_reach_the_provider_call("json").await;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    let sent = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "upstream request sent")
        .expect("an upstream request line");
    assert_eq!(sent["span"]["request_id"], "trace-unbatched-1", "{sent}");
}
