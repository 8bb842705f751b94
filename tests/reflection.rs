//! Health answers SERVING and reflection (v1 and v1alpha) resolves cascade.v1.Router, so ghz
//! and grpcurl work with no proto file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use cascade_router::config::DEFAULT_YAML;
use common::*;
use prost::Message;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

const METHODS: [&str; 6] = [
    "Complete",
    "CompleteBatch",
    "CompleteStream",
    "ListProviders",
    "ControlProvider",
    "CheckHealth",
];

fn methods_of(files: &[Vec<u8>]) -> Vec<String> {
    files
        .iter()
        .map(|f| prost_types::FileDescriptorProto::decode(f.as_slice()).unwrap())
        .filter(|f| f.package() == "cascade.v1")
        .flat_map(|f| f.service)
        .filter(|s| s.name() == "Router")
        .flat_map(|s| s.method)
        .map(|m| m.name().to_string())
        .collect()
}

async fn channel() -> (RunningRouter, Channel) {
    let router = start(DEFAULT_YAML).await;
    let ch = Channel::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (router, ch)
}

#[tokio::test]
async fn reflection_v1_lists_and_resolves_router() {
    use v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (_router, ch) = channel().await;
    let mut client = ServerReflectionClient::new(ch);
    let ask = |m: MessageRequest| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "cascade.v1.Router".into(),
        )),
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"cascade.v1.Router".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let Some(MessageResponse::FileDescriptorResponse(fd)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected descriptors")
    };
    assert_eq!(methods_of(&fd.file_descriptor_proto), METHODS);
}

#[tokio::test]
async fn reflection_v1alpha_lists_and_resolves_router() {
    use v1alpha::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let (_router, ch) = channel().await;
    let mut client = ServerReflectionClient::new(ch);
    let ask = |m: MessageRequest| v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "cascade.v1.Router.Complete".into(),
        )),
    ];
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    assert!(list.service.iter().any(|s| s.name == "cascade.v1.Router"));
    let Some(MessageResponse::FileDescriptorResponse(fd)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected descriptors")
    };
    assert_eq!(methods_of(&fd.file_descriptor_proto), METHODS);
}

#[tokio::test]
async fn health_answers_serving_and_simulated_default_answers() {
    let (mut router, ch) = channel().await;
    let mut health = HealthClient::new(ch);
    for service in ["", "cascade.v1.Router"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "service {service:?}");
    }
    let mut req = prompt("hi there");
    req.model.clear();
    let r = router.client.ask(req).await;
    assert_eq!(r.provider, "simulated");
    assert_eq!(r.text, "[simulated] you said: hi there");
}
