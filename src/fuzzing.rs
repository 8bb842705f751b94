//! Entry points for the fuzz targets (`fuzz/`, built with the `fuzzing` feature) and the
//! property tests below: each reads untrusted input the way the service does — a cascade
//! file, a provider's HTTP answer, a request off the wire — and must never panic. Not a
//! stable API.

use prost::Message;

use futures_util::FutureExt;

use crate::{
    completion::{CompletionRequest, StreamEvent},
    config,
    proto::v1,
    provider::{
        ProviderError, anthropic, ollama, openai,
        stream::{self, Framing},
    },
};

/// Loads a cascade file from `text`; `${VAR}`s resolve to `"x"`. Returns whether it loaded.
pub fn cascade_file(text: &str) -> bool {
    config::parse(text, "fuzz.yaml", &|_| Some("x".into())).is_ok()
}

/// An OpenAI-shaped answer, as read for a chat call, one prompt, or a batch of `prompts`.
/// Returns the number of results (one per prompt) or `None` for a failed request.
pub fn openai_answer(
    chat: bool,
    prompts: usize,
    status: u16,
    retry_after: &[u8],
    body: &[u8],
) -> Option<usize> {
    openai::read_answer(chat, prompts.max(1), status, retry_after, body)
        .ok()
        .map(|r| r.len())
}

/// An Ollama answer; whether it gave a completion.
pub fn ollama_answer(chat: bool, status: u16, retry_after: &[u8], body: &[u8]) -> bool {
    ollama::read_answer(chat, status, retry_after, body).is_ok()
}

/// An Anthropic answer; whether it gave a completion.
pub fn anthropic_answer(status: u16, retry_after: &[u8], body: &[u8]) -> bool {
    anthropic::read_answer(status, retry_after, body).is_ok()
}

/// A streamed answer from API `api` (0 OpenAI SSE, 1 Ollama NDJSON, 2 Anthropic SSE) whose
/// body arrives in `chunks`. Returns whether it ended as every stream must: exactly one end —
/// [`StreamEvent::End`] or an error — and that last.
pub fn stream_answer(api: u8, chunks: Vec<Vec<u8>>) -> bool {
    let read = match api % 3 {
        0 => stream::read_all(chunks, Framing::Sse, openai::Chunks::default()).boxed(),
        1 => stream::read_all(chunks, Framing::Ndjson, ollama::Lines::default()).boxed(),
        _ => stream::read_all(chunks, Framing::Sse, anthropic::Events::default()).boxed(),
    };
    // The body is a ready iterator: reading it never waits.
    let Some(events) = read.now_or_never() else {
        return false;
    };
    let is_end = |e: &Result<StreamEvent, ProviderError>| {
        !matches!(e, Ok(StreamEvent::Text(_) | StreamEvent::ToolCall(_)))
    };
    events.iter().filter(|e| is_end(e)).count() == 1 && events.last().is_some_and(is_end)
}

/// A request body of the OpenAI-compatible front (`/v1/chat/completions` when `chat`, else
/// `/v1/completions`): read field by field into domain requests, or refused. Returns how many
/// requests it made.
pub fn http_request(chat: bool, body: &[u8]) -> Option<usize> {
    use crate::front::openai::request;
    let fields: request::Body = serde_json::from_slice(body).ok()?;
    let extras = request::Extras::default();
    if chat {
        request::chat(fields, &extras).ok().map(|_| 1)
    } else {
        request::text(fields, &extras).ok().map(|r| r.len())
    }
}

/// A `Complete` request off the wire: decoded, then validated into a domain request.
pub fn complete_request(bytes: &[u8]) -> bool {
    v1::CompleteRequest::decode(bytes)
        .ok()
        .and_then(|m| CompletionRequest::try_from(m).ok())
        .is_some()
}

#[cfg(test)]
mod properties {
    //! Bounded cases in CI; `fuzz/README.md` runs the same entry points for longer.
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::*;

    /// JSON values whose keys come from `keys`, so generated bodies get past the outer shape
    /// and into the fields a parser reads.
    fn json_with(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (0u32..4).prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::from),
            prop::sample::select(keys).prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(keys), inner), 0..6).prop_map(|kv| {
                    Value::Object(
                        kv.into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect::<Map<_, _>>(),
                    )
                }),
            ]
        })
    }

    const OPENAI_KEYS: &[&str] = &[
        "choices",
        "index",
        "text",
        "finish_reason",
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "message",
        "content",
        "error",
        "code",
        "type",
        "delta",
        "tool_calls",
        "function",
        "name",
        "arguments",
        "id",
        "logprobs",
    ];
    const OLLAMA_KEYS: &[&str] = &[
        "response",
        "message",
        "content",
        "done_reason",
        "prompt_eval_count",
        "eval_count",
        "done",
        "error",
        "tool_calls",
        "function",
        "name",
        "arguments",
    ];
    const ANTHROPIC_KEYS: &[&str] = &[
        "content",
        "type",
        "text",
        "stop_reason",
        "usage",
        "input_tokens",
        "output_tokens",
        "error",
        "tool_use",
        "id",
        "name",
        "input",
        "index",
        "delta",
        "partial_json",
        "content_block",
        "content_block_start",
        "content_block_delta",
        "input_json_delta",
    ];
    /// The fields of OpenAI's request bodies, and values their parsers branch on.
    const REQUEST_KEYS: &[&str] = &[
        "model",
        "messages",
        "prompt",
        "role",
        "user",
        "assistant",
        "tool",
        "system",
        "content",
        "type",
        "text",
        "image_url",
        "url",
        "detail",
        "tools",
        "function",
        "name",
        "parameters",
        "tool_choice",
        "tool_calls",
        "tool_call_id",
        "arguments",
        "id",
        "response_format",
        "json_schema",
        "json_object",
        "schema",
        "stream",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "stop",
        "n",
        "max_tokens",
        "temperature",
        "top_p",
        "echo",
        "suffix",
        "best_of",
        "modalities",
        "audio",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/png;base64,@@",
        "https://example.invalid/x.png",
    ];

    fn status() -> impl Strategy<Value = u16> {
        prop_oneof![
            Just(200u16),
            Just(400),
            Just(401),
            Just(429),
            Just(500),
            0u16..1000
        ]
    }

    fn retry_after() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            "[0-9]{1,12}(\\.[0-9]{0,4})?".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..40),
        ]
    }

    fn bytes_or(json: impl Strategy<Value = Value>) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json.prop_map(|v| v.to_string().into_bytes()),
        ]
    }

    /// A streamed body: lines an API sends (its events, its end marker, comments, blank
    /// lines) or junk, cut into chunks anywhere.
    fn stream_body(
        keys: &'static [&'static str],
        sse: bool,
    ) -> impl Strategy<Value = Vec<Vec<u8>>> {
        let line = prop_oneof![
            json_with(keys).prop_map(|v| v.to_string()),
            Just("[DONE]".to_string()),
            Just(r#"{"type": "message_stop"}"#.to_string()),
            Just(r#"{"done": true}"#.to_string()),
            Just(r#"{"choices": [{"index": 0, "text": "t"}]}"#.to_string()),
            Just(String::new()),
            Just(": ping".to_string()),
            ".{0,20}",
        ];
        let lines = prop::collection::vec((line, any::<bool>()), 0..12).prop_map(move |ls| {
            let mut body = Vec::new();
            for (l, framed) in ls {
                if sse && framed {
                    body.extend_from_slice(format!("data: {l}\n\n").as_bytes());
                } else {
                    body.extend_from_slice(format!("{l}\n").as_bytes());
                }
            }
            body
        });
        let body = prop_oneof![lines, prop::collection::vec(any::<u8>(), 0..256)];
        (body, prop::collection::vec(0usize..300, 0..6)).prop_map(|(body, mut cuts)| {
            cuts.push(body.len());
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut from = 0;
            for c in cuts {
                let c = c.min(body.len()).max(from);
                out.push(body[from..c].to_vec());
                from = c;
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn openai_streams_end_exactly_once(chunks in stream_body(OPENAI_KEYS, true)) {
            prop_assert!(stream_answer(0, chunks));
        }

        #[test]
        fn ollama_streams_end_exactly_once(chunks in stream_body(OLLAMA_KEYS, false)) {
            prop_assert!(stream_answer(1, chunks));
        }

        #[test]
        fn anthropic_streams_end_exactly_once(chunks in stream_body(ANTHROPIC_KEYS, true)) {
            prop_assert!(stream_answer(2, chunks));
        }

        #[test]
        fn openai_answers_give_one_result_per_prompt_or_fail(
            chat in any::<bool>(),
            prompts in 1usize..12,
            status in status(),
            wait in retry_after(),
            body in bytes_or(json_with(OPENAI_KEYS)),
        ) {
            if let Some(n) = openai_answer(chat, prompts, status, &wait, &body) {
                prop_assert_eq!(n, if chat { 1 } else { prompts });
                prop_assert!((200..300).contains(&status));
            }
        }

        #[test]
        fn ollama_answers_parse_or_fail(
            chat in any::<bool>(),
            status in status(),
            wait in retry_after(),
            body in bytes_or(json_with(OLLAMA_KEYS)),
        ) {
            if ollama_answer(chat, status, &wait, &body) {
                prop_assert!((200..300).contains(&status));
            }
        }

        #[test]
        fn anthropic_answers_parse_or_fail(
            status in status(),
            wait in retry_after(),
            body in bytes_or(json_with(ANTHROPIC_KEYS)),
        ) {
            if anthropic_answer(status, &wait, &body) {
                prop_assert!((200..300).contains(&status));
            }
        }

        #[test]
        fn wire_requests_decode_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            complete_request(&bytes);
        }

        #[test]
        fn http_requests_parse_or_fail(chat in any::<bool>(), body in bytes_or(json_with(REQUEST_KEYS))) {
            if let Some(n) = http_request(chat, &body) {
                prop_assert!(n >= 1);
            }
        }

        #[test]
        fn wire_requests_with_tools_and_images_validate_or_fail(
            roles in prop::collection::vec(prop::sample::select(&["user", "assistant", "tool", "system", "x"][..]), 1..5),
            ids in prop::collection::vec(prop::sample::select(&["", "c1", "c2"][..]), 1..5),
            json in prop::collection::vec(json_with(REQUEST_KEYS).prop_map(|v| v.to_string()), 1..4),
            image in prop::collection::vec(any::<u8>(), 0..16),
            mime in prop::sample::select(&["image/png", "text/plain", ""][..]),
            choice in prop::sample::select(&["auto", "none", "required", "other", ""][..]),
        ) {
            let messages = roles.iter().zip(ids.iter().cycle()).enumerate().map(|(i, (role, id))| v1::ChatMessage {
                role: role.to_string(),
                content: if i % 2 == 0 { format!("m{i}") } else { String::new() },
                parts: if i % 2 == 1 {
                    vec![v1::ContentPart { part: Some(v1::content_part::Part::Image(v1::Image {
                        source: Some(v1::image::Source::Data(image.clone().into())),
                        mime_type: mime.to_string(),
                        detail: String::new(),
                    })) }]
                } else { Vec::new() },
                tool_calls: if *role == "assistant" {
                    vec![v1::ToolCall { id: id.to_string(), name: "f".into(), arguments: json[0].clone() }]
                } else { Vec::new() },
                tool_call_id: if *role == "tool" { id.to_string() } else { String::new() },
                ..Default::default()
            }).collect();
            let request = v1::CompleteRequest {
                messages,
                tools: json.iter().map(|j| v1::Tool { name: "f".into(), parameters_json: j.clone(), ..Default::default() }).collect(),
                tool_choice: (!choice.is_empty()).then(|| v1::ToolChoice { choice: Some(v1::tool_choice::Choice::Mode(choice.to_string())) }),
                ..Default::default()
            };
            complete_request(&request.encode_to_vec());
        }
    }

    #[test]
    fn the_entry_points_read_good_answers() {
        let openai = br#"{"choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}]}"#;
        assert_eq!(openai_answer(false, 2, 200, b"", openai), Some(2));
        assert_eq!(openai_answer(false, 2, 500, b"1", openai), None);
        assert!(ollama_answer(
            false,
            200,
            b"",
            br#"{"response": "hi", "done": true}"#
        ));
        assert!(anthropic_answer(
            200,
            b"",
            br#"{"content": [{"type": "text", "text": "hi"}]}"#
        ));
        assert!(!anthropic_answer(200, b"", br#"{"content": []}"#));
        let openai_stream =
            b"data: {\"choices\": [{\"index\": 0, \"text\": \"a\"}]}\n\ndata: [DONE]\n\n";
        assert!(stream_answer(0, vec![openai_stream.to_vec()]));
        assert!(stream_answer(
            1,
            vec![b"{\"response\": \"a\"}\n{\"done\": true}\n".to_vec()]
        ));
        assert!(stream_answer(
            2,
            vec![b"data: {\"type\": \"message_stop\"}\n\n".to_vec()]
        ));
        let wire = v1::CompleteRequest {
            prompt: "hi".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(complete_request(&wire));
        assert!(cascade_file(
            "providers:\n  - {name: s, type: simulated, models: [m]}\n"
        ));
        assert!(!cascade_file("providers: 3"));
    }

    /// Found by the `cascade_file` fuzz target: a top-level key that serde names differently
    /// from the map's own (here a tagged key) was looked for and "removed" forever.
    #[test]
    fn a_tagged_unknown_key_fails_instead_of_looping() {
        assert!(!cascade_file("!\t\t\t\t\t\t\t::\t"));
    }

    /// Found by the `cascade_file` fuzz target: a named file that never ends hung the load.
    #[test]
    fn named_files_that_never_end_fail_at_once() {
        for path in ["/dev/zero", "/dev/urandom", "/"] {
            let yaml = format!(
                "server: {{tls: {{cert: {path}, key: {path}}}}}\nproviders:\n  - {{name: s, type: simulated, models: [m]}}\n"
            );
            assert!(!cascade_file(&yaml), "{path}");
            let yaml = format!(
                "providers:\n  - {{name: o, type: openai, base_url: \"http://127.0.0.1:1/v1\", models: [m], http: {{ca_file: {path}}}}}\n"
            );
            assert!(!cascade_file(&yaml), "{path}");
        }
    }
}
