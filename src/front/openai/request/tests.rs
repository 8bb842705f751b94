use super::*;

fn extras() -> Extras {
    Extras {
        request_id: "r".into(),
        ..Extras::default()
    }
}

fn body(json: &str) -> Body {
    serde_json::from_str(json).unwrap()
}

#[test]
fn chat_reads_strings_parts_tools_and_every_sampling_field() {
    let r = chat(
        body(
            r#"{"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null, "refusal": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}
        ], "max_completion_tokens": 5, "stop": "x", "top_p": 0.9, "user": "u1",
           "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"50256": -100},
           "logprobs": true, "top_logprobs": 2, "parallel_tool_calls": false,
           "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
           "tool_choice": {"type": "function", "function": {"name": "f"}},
           "response_format": {"type": "json_object"}, "top_k": 5, "store": false}"#,
        ),
        &extras(),
    )
    .unwrap();
    let Input::Chat(m) = &r.input else {
        panic!("chat")
    };
    assert_eq!(m[0].role, Role::System);
    assert_eq!(m[1].content.text(), "hi there");
    assert_eq!(m[2].tool_calls[0].name, "f");
    assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
    let p = &r.params;
    assert_eq!(p.max_tokens, Some(5));
    assert_eq!(p.stop, ["x"]);
    assert_eq!(p.top_p, Some(0.9));
    assert_eq!(p.logit_bias.get(&50256), Some(&-100.0));
    assert_eq!(p.top_logprobs, Some(2));
    assert_eq!(p.tool_choice, Some(ToolChoice::Function("f".into())));
    assert_eq!(p.parallel_tool_calls, Some(false));
    assert_eq!(p.response_format, Some(ResponseFormat::JsonObject));
    let extra: Vec<&str> = p.extra.keys().map(String::as_str).collect();
    assert_eq!(extra, ["store", "top_k"]);
    assert_eq!(r.agent, "u1");
}

#[test]
fn what_the_router_cannot_honour_is_refused_by_name() {
    let bad = [
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}"#,
            "n: 2",
        ),
        (r#"{"model": "m", "messages": []}"#, "messages"),
        (
            r#"{"model": "m", "messages": [{"role": "robot", "content": "x"}]}"#,
            "messages[0].role",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#,
            "messages[0].content[0]",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}"#,
            "temperature",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}"#,
            "audio",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}"#,
            "tool_choice",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}"#,
            "tools[0].function.parameters",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}"#,
            "messages[0].tool_call_id",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]}"#,
            "messages[0].content[0]",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "stream": true}"#,
            "logprobs",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]}"#,
            "messages[0].content[0].cache_control",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": {"include_obfuscation": false}}"#,
            "stream_options.include_obfuscation",
        ),
    ];
    for (json, names) in bad {
        let e = chat(body(json), &extras())
            .err()
            .unwrap_or_else(|| panic!("{json} was accepted"))
            .to_string();
        assert!(e.contains(names), "{json}: {e}");
    }
}

#[test]
fn prompts_as_a_string_or_an_array() {
    let one = text(body(r#"{"model": "m", "prompt": "a"}"#), &extras()).unwrap();
    assert_eq!(one.len(), 1);
    let many = text(
        body(r#"{"model": "m", "prompt": ["a", "b", "c"], "echo": true, "logprobs": 2}"#),
        &extras(),
    )
    .unwrap();
    let ids: Vec<&str> = many.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, ["r-0", "r-1", "r-2"]);
    assert!(many[0].params.echo && many[0].params.logprobs);
    assert!(
        text(
            body(r#"{"model": "m", "prompt": ["a", "b"], "stream": true}"#),
            &extras()
        )
        .is_err()
    );
}
