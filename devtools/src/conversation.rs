//! What the mock model reads of a chat request and what it answers, in each API's shape: the
//! text of the last turn (string or parts), and a turn of its own — text, or a call to one of
//! the request's tools. Offered tools and asked by the user, the mock calls the chosen tool
//! (the first, unless `tool_choice` names one) with `{"text": <the user's words>}`; given a
//! tool's result, it answers `mock reply to: <the result>`. A request for JSON output gets
//! `{"reply": <its answer>}`.

use serde_json::{Value, json};

use crate::mock::reply;

/// The log probabilities the mock answers when asked for them (OpenAI's chat shape).
pub static LOGPROBS: std::sync::LazyLock<Value> = std::sync::LazyLock::new(
    || json!({"content": [{"token": "mock", "logprob": -0.25, "bytes": [109, 111, 99, 107], "top_logprobs": []}]}),
);

/// The chat APIs the mock speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Ollama,
    Anthropic,
}

/// The mock's answer to a chat.
#[derive(Clone, Debug, PartialEq)]
pub enum Turn {
    Text(String),
    Call {
        id: String,
        name: String,
        arguments: Value,
    },
}

/// The text of a message's content: a string, or the text of its parts (OpenAI's and
/// Anthropic's `text` parts, Anthropic's `tool_result` blocks).
pub fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Some("tool_result") => text_of(p.get("content")),
                _ => String::new(),
            })
            .collect(),
        _ => String::new(),
    }
}

fn is_tool_result(api: Api, m: &Value) -> bool {
    match api {
        Api::OpenAi | Api::Ollama => m.get("role").and_then(Value::as_str) == Some("tool"),
        Api::Anthropic => m.get("content").and_then(Value::as_array).is_some_and(|c| {
            c.iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        }),
    }
}

/// The tool `body` makes the model call, if it offers tools and does not forbid them.
fn chosen_tool(api: Api, body: &Value) -> Option<String> {
    let tools = body.get("tools").and_then(Value::as_array)?;
    let first = tools.first()?;
    let first = match api {
        Api::OpenAi | Api::Ollama => first.pointer("/function/name"),
        Api::Anthropic => first.get("name"),
    }
    .and_then(Value::as_str)?
    .to_string();
    match body.get("tool_choice") {
        Some(Value::String(s)) if s == "none" => None,
        Some(c) if c.get("type").and_then(Value::as_str) == Some("none") => None,
        Some(c) => Some(
            c.pointer("/function/name")
                .or_else(|| c.get("name"))
                .and_then(Value::as_str)
                .map_or(first, str::to_string),
        ),
        None => Some(first),
    }
}

fn wants_json(api: Api, body: &Value) -> bool {
    match api {
        Api::OpenAi => body
            .pointer("/response_format/type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "text"),
        Api::Ollama => body.get("format").is_some_and(|f| !f.is_null()),
        Api::Anthropic => false,
    }
}

/// The mock's answer to the chat in `body`.
pub fn turn(api: Api, body: &Value) -> Turn {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(last) = messages.last() else {
        return Turn::Text(reply(""));
    };
    let said = text_of(last.get("content"));
    if !is_tool_result(api, last)
        && let Some(name) = chosen_tool(api, body)
    {
        return Turn::Call {
            id: format!("call_mock_{}", messages.len()),
            name,
            arguments: json!({ "text": said }),
        };
    }
    let text = reply(&said);
    Turn::Text(if wants_json(api, body) {
        json!({ "reply": text }).to_string()
    } else {
        text
    })
}

/// A whole answer of `turn` in `api`'s shape.
pub fn answer(api: Api, model: &str, turn: &Turn, usage: (usize, usize)) -> Value {
    let (p, c) = usage;
    match (api, turn) {
        (Api::OpenAi, Turn::Text(t)) => json!({
            "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c},
        }),
        (
            Api::OpenAi,
            Turn::Call {
                id,
                name,
                arguments,
            },
        ) => json!({
            "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": id, "type": "function", "function": {"name": name, "arguments": arguments.to_string()}}
            ]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": p, "completion_tokens": c},
        }),
        (Api::Ollama, turn) => {
            let message = match turn {
                Turn::Text(t) => json!({"role": "assistant", "content": t}),
                Turn::Call {
                    name, arguments, ..
                } => json!({"role": "assistant", "content": "",
                    "tool_calls": [{"function": {"name": name, "arguments": arguments}}]}),
            };
            json!({"model": model, "message": message, "done": true, "done_reason": "stop",
                   "prompt_eval_count": p, "eval_count": c})
        }
        (Api::Anthropic, turn) => {
            let (content, stop) = match turn {
                Turn::Text(t) => (json!([{"type": "text", "text": t}]), "end_turn"),
                Turn::Call {
                    id,
                    name,
                    arguments,
                } => (
                    json!([{"type": "tool_use", "id": id, "name": name, "input": arguments}]),
                    "tool_use",
                ),
            };
            json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                   "content": content, "stop_reason": stop,
                   "usage": {"input_tokens": p, "output_tokens": c}})
        }
    }
}

/// The payloads of a streamed tool call in `api`'s shape (unframed), the arguments in two
/// pieces where the API streams them in pieces.
pub fn call_chunks(api: Api, model: &str, id: &str, name: &str, arguments: &Value) -> Vec<Value> {
    let args = arguments.to_string();
    let (a, b) = args.split_at(args.len() / 2);
    match api {
        Api::OpenAi => {
            let piece = |v: Value| json!({"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": v, "finish_reason": null}]});
            vec![
                piece(
                    json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                ),
                piece(json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]})),
                piece(json!({"tool_calls": [{"index": 0, "function": {"arguments": b}}]})),
                json!({"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
                json!({"object": "chat.completion.chunk", "model": model, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
            ]
        }
        Api::Ollama => vec![
            json!({"model": model, "message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": arguments}}]}, "done": false}),
            json!({"model": model, "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 1}),
        ],
        Api::Anthropic => vec![
            json!({"type": "message_start", "message": {"id": "msg_mock", "model": model, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": a}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": b}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 1}}),
            json!({"type": "message_stop"}),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_tools_are_called_and_results_answered() {
        let ask = json!({"messages": [{"role": "user", "content": "weather?"}],
                         "tools": [{"type": "function", "function": {"name": "get_weather"}}]});
        let Turn::Call {
            name, arguments, ..
        } = turn(Api::OpenAi, &ask)
        else {
            panic!("expected a call")
        };
        assert_eq!(
            (name.as_str(), &arguments),
            ("get_weather", &json!({"text": "weather?"}))
        );
        let answered = json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c", "content": "sunny"}]}],
            "tools": [{"name": "get_weather"}]});
        assert_eq!(turn(Api::Anthropic, &answered), Turn::Text(reply("sunny")));
        let none = json!({"messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"});
        assert_eq!(turn(Api::OpenAi, &none), Turn::Text(reply("x")));
    }
}
