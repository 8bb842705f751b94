//! TLS on the listener (rustls through tonic): a TLS client is answered, a plaintext one is not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use cascade_router::{
    Router, config,
    proto::v1::{self, router_client::RouterClient},
    server,
};
use common::temp_file;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[tokio::test]
async fn a_tls_listener_answers_tls_clients_and_refuses_plaintext() {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = cert.pem();
    let cert_path = temp_file("tls-cert", &cert_pem);
    let key_path = temp_file("tls-key", &signing_key.serialize_pem());
    let yaml = format!(
        "server: {{tls: {{cert: \"{}\", key: \"{}\"}}}}\nlimits: {{handshake_timeout_seconds: 0.3}}\nproviders:\n  - {{name: s, type: simulated, models: [m]}}\n",
        cert_path.display(),
        key_path.display()
    );
    let cfg = config::parse(&yaml, "tls.yaml", &|_| None).unwrap();
    assert!(
        !format!("{cfg:?}").contains("PRIVATE KEY"),
        "the key never shows in Debug"
    );
    let router = Arc::new(Router::new(&cfg).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(server::serve(
        router,
        cfg.server.clone(),
        listener,
        std::future::pending(),
    ));

    // A client that connects and never finishes its handshake is dropped at the timeout,
    // holding nothing; TLS clients are served all the while.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ask = || v1::CompleteRequest {
        model: "m".into(),
        prompt: "over tls".into(),
        ..Default::default()
    };
    let r = RouterClient::new(channel)
        .complete(ask())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.text, "[m] you said: over tls");
    let mut buf = [0u8; 64];
    let closed = common::within(async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed, "the stalled handshake was dropped");

    let plaintext = match Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => RouterClient::new(ch).complete(ask()).await.is_err(),
    };
    assert!(plaintext, "a plaintext client is refused");
    serving.abort();
}
