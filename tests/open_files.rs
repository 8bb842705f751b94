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

#[test]
fn the_router_raises_its_open_file_limit_to_the_hard_limit() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, 128.min(hard), hard).unwrap();
    let config = temp_file(
        "open-files",
        "providers:\n  - {name: s, type: simulated, models: [m]}\n",
    );
    let served = Served::start(&[], &config, "info");
    let (soft, hard_seen) = soft_and_hard(served.pid());
    assert_eq!(soft, hard_seen, "soft limit raised to the hard one");
    if hard > 128 {
        assert_ne!(soft, "128");
    }
    served.finish();
}
