//! CompleteStream through the real gRPC service in front of real mock HTTP servers that
//! stream (SSE, NDJSON) one word per chunk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use cascade_devtools::mock::{self, Fault, MockServer, Script};
use cascade_router::proto::v1::{self, FailureKind};
use common::*;
use tonic::{Code, Streaming};

/// A mock whose streamed answers pause `interval` between chunks.
async fn streaming_mock(interval: Duration, fault: Option<Fault>) -> MockServer {
    MockServer::start(Script {
        chunk_interval: interval,
        fault,
        ..Script::default()
    })
    .await
    .unwrap()
}

/// Reads a stream to its end: the text messages, then the end message or the error status.
async fn drain(
    mut s: Streaming<v1::CompleteStreamResponse>,
) -> (Vec<String>, Result<v1::StreamEnd, tonic::Status>) {
    let mut texts = Vec::new();
    loop {
        match within(s.message()).await {
            Ok(Some(m)) => match m.end {
                Some(end) => {
                    assert!(m.text.is_empty(), "the last message carries no text");
                    assert!(
                        within(s.message()).await.unwrap().is_none(),
                        "nothing after the end"
                    );
                    return (texts, Ok(end));
                }
                None => texts.push(m.text),
            },
            Ok(None) => panic!("the stream closed without its end message"),
            Err(status) => return (texts, Err(status)),
        }
    }
}

#[tokio::test]
async fn every_provider_api_streams_the_whole_answer_word_by_word() {
    let m = streaming_mock(Duration::from_millis(1), None).await;
    let url = m.url();
    let yaml = format!(
        "providers:\n\
         - {{name: oa, type: openai, base_url: \"{url}/v1\", models: [oa-model]}}\n\
         - {{name: ol, type: ollama, url: \"{url}\", models: [ol-model]}}\n\
         - {{name: an, type: anthropic, url: \"{url}\", api_key: k, models: [an-model]}}\n"
    );
    let mut router = start(&yaml).await;
    let said = "stream these five words please";
    let want = mock::reply(said);
    for (model, chat) in [
        ("oa-model", false),
        ("oa-model", true),
        ("ol-model", false),
        ("ol-model", true),
        ("an-model", false),
        ("an-model", true),
    ] {
        let mut req = v1::CompleteRequest {
            model: model.into(),
            ..Default::default()
        };
        if chat {
            req.messages = vec![v1::ChatMessage {
                role: "user".into(),
                content: said.into(),
                ..Default::default()
            }];
        } else {
            req.prompt = said.into();
        }
        let resp = router.client.complete_stream(req).await.unwrap();
        let provider = resp.metadata().get("x-cascade-provider").cloned();
        let (texts, end) = drain(resp.into_inner()).await;
        let end = end.unwrap_or_else(|s| panic!("{model} chat={chat}: {s:?}"));
        assert_eq!(texts.concat(), want, "{model} chat={chat}");
        assert_eq!(
            texts.len(),
            want.split_inclusive(' ').count(),
            "{model} chat={chat}: one message per upstream chunk"
        );
        assert_eq!(end.chunks as usize, texts.len());
        assert_eq!(provider.unwrap().to_str().unwrap(), end.provider);
        assert_eq!(end.model, model);
        assert!(!end.finish_reason.is_empty(), "{model} chat={chat}");
        let usage = end.usage.expect("usage");
        assert_eq!(
            usage.completion_tokens as usize,
            texts.len(),
            "{model} chat={chat}"
        );
        assert!(!end.cached);
    }
    assert_eq!(m.stats().requests, 6);
    assert_eq!(m.stats().completed, 6);
}

#[tokio::test]
async fn chunks_arrive_before_the_upstream_finishes_and_a_caller_leaving_closes_it() {
    // An hour between chunks: the upstream cannot have finished when the first arrives.
    let m = streaming_mock(Duration::from_secs(3600), None).await;
    let yaml = format!("providers:\n{}", openai("slow", 1, &m.url()));
    let mut router = start(&yaml).await;

    let mut s = router
        .client
        .complete_stream(prompt("first words first"))
        .await
        .unwrap()
        .into_inner();
    let first = within(s.message()).await.unwrap().unwrap();
    assert_eq!(first.text, "mock ");
    let seen = m.stats();
    assert_eq!(
        (seen.requests, seen.completed, seen.cancelled),
        (1, 0, 0),
        "the upstream is still streaming"
    );

    drop(s);
    let after = within(m.wait_for(|s| s.cancelled == 1)).await;
    assert_eq!(
        after.completed, 0,
        "the upstream stream was closed, not finished"
    );
}

#[tokio::test]
async fn a_unary_caller_who_gives_up_closes_the_upstream_stream() {
    // Unary calls go to OpenAI-compatible providers as streams (`stream_unary`), so a caller
    // who gives up ends the generation: llama-server does not watch a unary request's
    // connection, but stops a stream that is closed.
    let m = streaming_mock(Duration::from_secs(3600), None).await;
    let yaml = format!("providers:\n{}", openai("slow", 1, &m.url()));
    let mut router = start(&yaml).await;
    let status = router
        .client
        .complete(with_timeout(
            prompt("words that never end"),
            Duration::from_millis(300),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let after = within(m.wait_for(|s| s.cancelled == 1)).await;
    assert_eq!((after.requests, after.completed), (1, 0));
    assert_eq!(m.last_body().unwrap()["stream"], true);
}

#[tokio::test]
async fn a_unary_call_is_read_whole_from_the_stream_or_sent_unary_when_told() {
    let m = streaming_mock(Duration::from_millis(1), None).await;
    let url = m.url();
    let yaml = format!(
        "providers:\n\
         - {{name: streamed, type: openai, base_url: \"{url}/v1\", models: [s]}}\n\
         - {{name: plain, type: openai, base_url: \"{url}/v1\", models: [p], stream_unary: false}}\n"
    );
    let mut router = start(&yaml).await;
    let mut answers = Vec::new();
    for model in ["s", "p"] {
        let mut ask = prompt("five words in one answer");
        ask.model = model.into();
        let r = router.client.complete(ask).await.unwrap().into_inner();
        let body = m.last_body().unwrap();
        assert_eq!(
            body["stream"].as_bool(),
            (model == "s").then_some(true),
            "{model}"
        );
        answers.push((r.text, r.finish_reason, r.usage));
    }
    assert_eq!(answers[0], answers[1], "the same answer either way");
    // `best_of` goes only unary (OpenAI refuses it with a stream), stream_unary or not.
    let mut ask = prompt("five words in one answer");
    ask.model = "s".into();
    ask.best_of = Some(2);
    router.client.complete(ask).await.unwrap();
    let body = m.last_body().unwrap();
    assert_eq!(
        (body["stream"].as_bool(), body["best_of"].as_u64()),
        (None, Some(2))
    );
    assert!(answers[0].2.is_some(), "usage from the stream's last chunk");
    assert_eq!(m.stats().completed, 3);
}

#[tokio::test]
async fn a_provider_failing_before_its_first_chunk_falls_back() {
    let failing = streaming_mock(Duration::ZERO, Some(Fault::Status(500))).await;
    let hanging = streaming_mock(Duration::ZERO, Some(Fault::Hang)).await;
    let healthy = streaming_mock(Duration::from_millis(1), None).await;
    let yaml = format!(
        "{}providers:\n{}{}  - {{name: hangs, type: openai, priority: 2, base_url: \"{}/v1\", first_token_timeout_seconds: 0.2, models: [m]}}\n{}",
        cascade(0, 100, 60.0),
        openai("fails", 1, &failing.url()),
        "",
        hanging.url(),
        openai("healthy", 3, &healthy.url()),
    );
    let mut router = start(&yaml).await;

    let resp = router
        .client
        .complete_stream(prompt("fall back please"))
        .await
        .unwrap();
    assert_eq!(
        resp.metadata().get("x-cascade-attempts").unwrap(),
        "2",
        "two providers failed before the one streaming"
    );
    let (texts, end) = drain(resp.into_inner()).await;
    let end = end.unwrap();
    assert_eq!(texts.concat(), mock::reply("fall back please"));
    assert_eq!(end.provider, "healthy");
    let kinds: Vec<(&str, FailureKind)> = end
        .attempts
        .iter()
        .map(|a| (a.provider.as_str(), a.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("fails", FailureKind::ServerError),
            ("hangs", FailureKind::Timeout)
        ]
    );
    assert!(
        end.attempts[1].error.contains("first token"),
        "{:?}",
        end.attempts[1].error
    );
    assert_eq!(
        within(hanging.wait_for(|s| s.cancelled == 1))
            .await
            .requests,
        1,
        "the hanging request was closed when it ran out of time"
    );
}

#[tokio::test]
async fn a_break_mid_stream_ends_with_unavailable_saying_what_was_sent() {
    let breaking = streaming_mock(Duration::ZERO, Some(Fault::BreakMidStream)).await;
    let spare = streaming_mock(Duration::ZERO, None).await;
    let yaml = format!(
        "{}providers:\n{}{}",
        cascade(2, 100, 60.0),
        openai("breaks", 1, &breaking.url()),
        openai("spare", 2, &spare.url()),
    );
    let mut router = start(&yaml).await;

    let s = router
        .client
        .complete_stream(prompt("this will break"))
        .await
        .unwrap()
        .into_inner();
    let (texts, end) = drain(s).await;
    assert_eq!(
        texts,
        ["mock ", "reply "],
        "the two chunks sent before the break: {end:?}"
    );
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("breaks/m broke after 2 chunks (11 bytes of text) were sent"),
        "{}",
        status.message()
    );
    assert_eq!(
        spare.stats().requests,
        0,
        "no fallback once text was sent: the caller would get two answers spliced"
    );
    assert_eq!(breaking.stats().requests, 1, "and no retry either");
}

#[tokio::test]
async fn a_cached_answer_streams_as_one_chunk() {
    let m = streaming_mock(Duration::ZERO, None).await;
    let yaml = format!(
        "cache: {{ttl_seconds: 60}}\nproviders:\n{}",
        openai("p", 1, &m.url())
    );
    let mut router = start(&yaml).await;
    let req = v1::CompleteRequest {
        temperature: Some(0.0),
        ..prompt("cache me")
    };

    let (texts, end) = drain(
        router
            .client
            .complete_stream(req.clone())
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(!end.unwrap().cached);
    assert!(texts.len() > 1);

    let (again, end) = drain(
        router
            .client
            .complete_stream(req.clone())
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let end = end.unwrap();
    assert!(end.cached);
    assert_eq!(again, [texts.concat()], "one chunk, the whole answer");
    let unary = router.client.ask(req).await;
    assert!(unary.cached, "the streamed answer serves Complete too");
    assert_eq!(unary.text, texts.concat());
    assert_eq!(m.stats().requests, 1);
}

#[tokio::test]
async fn a_bad_request_is_refused_before_the_stream() {
    let m = streaming_mock(Duration::ZERO, None).await;
    let yaml = format!("providers:\n{}", openai("p", 1, &m.url()));
    let mut router = start(&yaml).await;
    let unknown = v1::CompleteRequest {
        model: "nope".into(),
        ..prompt("x")
    };
    let status = router.client.complete_stream(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("nope"), "{}", status.message());
    let empty = router.client.complete_stream(prompt("")).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(m.stats().requests, 0);
}
