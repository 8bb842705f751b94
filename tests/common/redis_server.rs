//! A real redis-server for the tests that share state through Redis.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{skip_unless_ci, within};

/// A real redis-server on a loopback port of the test's own, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    /// A real redis-server on `port`; `None` (after a loud skip, or a failure under CI) when
    /// it is not installed.
    pub async fn start(port: u16) -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            skip_unless_ci(
                "redis-server is not installed",
                "apt-get install redis-server, or run scripts/test, which installs it",
            );
            return None;
        }
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        within(async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        Some(RedisServer { port, child })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends the server a signal (`STOP`: it hangs, connections open; `CONT`: it goes on).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits until the server holds `n` keys: a replica's write, which leaves the request
    /// path, has landed.
    pub async fn wait_keys(&self, n: usize) {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap();
        within(async {
            loop {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    let size: Result<usize, _> = redis::cmd("DBSIZE").query_async(&mut c).await;
                    if size.is_ok_and(|s| s >= n) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
