//! Connection reuse: sequential calls ride a handful of pooled upstream connections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade_router::mock::{self, MockServer, Script};
use common::*;

#[tokio::test]
async fn thousand_sequential_calls_open_a_handful_of_connections() {
    let mock = MockServer::start(Script::default()).await.unwrap();
    let yaml = format!("providers:\n{}", openai("one", 1, &mock.url()));
    let mut router = start(&yaml).await;

    for i in 0..1000 {
        let p = format!("prompt {i}");
        let r = router
            .client
            .complete(prompt(&p))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.text, mock::reply(&p));
    }
    let s = mock.stats();
    assert_eq!(s.requests, 1000);
    assert!(
        s.connections <= 4,
        "{} upstream connections for 1000 calls",
        s.connections
    );
}
