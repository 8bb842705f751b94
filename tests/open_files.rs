//! The real binary raises its open-file limit to the hard limit at start, so a few hundred
//! idle clients cannot exhaust a low soft limit and stop both fronts (#26). In a file of its
//! own: it lowers the test process's soft limit, which its child inherits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

fn soft_and_hard(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

/// The tests here change or need this process's open-file limit: one at a time.
static LIMITS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[test]
fn the_router_raises_its_open_file_limit_to_the_hard_limit() {
    let _one = LIMITS.blocking_lock();
    let (soft_before, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, 128.min(hard), hard).unwrap();
    let config = temp_file(
        "open-files",
        "providers:\n  - {name: s, type: simulated, models: [m]}\n",
    );
    let served = Served::start(&[], &config, "info");
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft_before, hard).unwrap();
    let (soft, hard_seen) = soft_and_hard(served.pid());
    assert_eq!(soft, hard_seen, "soft limit raised to the hard one");
    if hard > 128 {
        assert_ne!(soft, "128");
    }
    served.finish();
}

/// With a low open-file limit it cannot raise, the real binary still serves a healthy client
/// on both fronts while another peer (127.0.0.2) tries to hold 300 sockets on each: the peer
/// gets its 50 per front and the rest are closed at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_holding_sockets_cannot_starve_a_low_file_limit() {
    let _one = LIMITS.lock().await;
    // The test itself holds 600 sockets.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let up = cascade_devtools::mock::MockServer::start(cascade_devtools::mock::Script::default())
        .await
        .unwrap();
    let port = free_port().await;
    let config = temp_file(
        "held",
        &format!(
            "server: {{http_listen: \"127.0.0.1:{port}\"}}\n\
             limits: {{max_connections_per_peer: 50}}\n\
             providers:\n{}",
            openai("up", 1, &up.url())
        ),
    );
    let served = Served::start_with_nofile(&[], &config, 160);
    let (soft, hard) = soft_and_hard(served.pid());
    assert_eq!((soft.as_str(), hard.as_str()), ("160", "160"));
    let http = format!("127.0.0.1:{port}");
    http_listening(&http).await;

    let mut held = Vec::new();
    for front in [served.addr.as_str(), http.as_str()] {
        for _ in 0..300 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            held.push(s.connect(front.parse().unwrap()).await.unwrap());
        }
    }
    let mut c = served.client().await;
    let answer = within(c.complete(prompt("still served")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.provider, "up");
    let models = within(reqwest::get(format!("http://{http}/v1/models")))
        .await
        .unwrap();
    assert_eq!(models.status().as_u16(), 200);
    drop(held);
    served.finish();
}
