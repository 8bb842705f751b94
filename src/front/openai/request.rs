//! OpenAI's request bodies read into domain values, field by field. Every field of OpenAI's
//! chat-completions and completions references is used by the router, carried into the
//! request for the providers, or refused here by name; a field outside the references (a
//! server's own, such as vLLM's `top_k`) is carried too, and goes only to providers whose
//! `pass_through` lists it (the router refuses the request, naming the field, when none on
//! its route does). The README's field table says the same field by field.
//!
//! A body is read as a JSON object first and each field taken from it by name, so an error
//! names the field it is about and whatever is left over is, by construction, what the
//! router did not model.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::{
    completion::{
        CacheMode, ChatMessage, CompletionRequest, Content, Detail, GenParams, Image, Input,
        MAX_MESSAGES, Part, ResponseFormat, Role, Tool, ToolCall, ToolChoice,
    },
    error::RouterError,
};

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

/// Fields of OpenAI's references the router refuses: their answers carry more than text and
/// tool calls, which the router does not pass back.
const REFUSED: &[(&str, &str)] = &[
    ("audio", "the router answers text and tool calls, not audio"),
    (
        "web_search_options",
        "the router does not pass back web search annotations",
    ),
];

/// A JSON body whose fields are taken one by one.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct Body(Map<String, Value>);

impl Body {
    /// `key` read as `T`; `null` or absent is `None`; an error names `key`.
    fn take<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, RouterError> {
        take(&mut self.0, "", key)
    }

    pub fn stream(&self) -> bool {
        self.0.get("stream").and_then(Value::as_bool) == Some(true)
    }

    pub fn include_usage(&self) -> bool {
        self.0
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true)
    }
}

fn take<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    at: &str,
    key: &str,
) -> Result<Option<T>, RouterError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| invalid(format!("{at}{key}: {e}"))),
    }
}

/// What the front's headers add to a request.
#[derive(Default)]
pub struct Extras {
    pub agent: Option<String>,
    pub cache: CacheMode,
    pub request_id: String,
}

/// The most prompts one `/v1/completions` request may carry.
pub const MAX_PROMPTS: usize = 1024;

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The fields both endpoints share, taken from `b`, and the request's agent.
fn common(b: &mut Body, extras: &Extras) -> Result<(GenParams, String), RouterError> {
    // Used by the front itself (see `Body::stream`, `Body::include_usage`).
    b.take::<bool>("stream")?;
    if let Some(Value::Object(options)) = b.take::<Value>("stream_options")?
        && let Some(other) = options.keys().find(|k| *k != "include_usage")
    {
        return Err(invalid(format!(
            "stream_options.{other}: not supported (include_usage is)"
        )));
    }
    if let Some(n) = b.take::<u32>("n")?
        && n != 1
    {
        return Err(invalid(format!(
            "n: {n}; the router answers one choice per prompt (n: 1)"
        )));
    }
    let user = b.take::<String>("user")?;
    let max_tokens = b.take::<u32>("max_tokens")?;
    let logit_bias = b
        .take::<BTreeMap<String, f32>>("logit_bias")?
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            k.parse::<u32>()
                .map(|t| (t, v))
                .map_err(|_| invalid(format!("logit_bias: {k:?} is not a token id")))
        })
        .collect::<Result<_, _>>()?;
    let params = GenParams {
        max_tokens: b.take::<u32>("max_completion_tokens")?.or(max_tokens),
        temperature: b.take("temperature")?,
        stop: b
            .take::<OneOrMany>("stop")?
            .map(OneOrMany::into_vec)
            .unwrap_or_default(),
        seed: b.take("seed")?,
        top_p: b.take("top_p")?,
        frequency_penalty: b.take("frequency_penalty")?,
        presence_penalty: b.take("presence_penalty")?,
        logit_bias,
        ..GenParams::default()
    };
    let agent = extras.agent.clone().or(user).unwrap_or_default();
    Ok((params, agent))
}

/// What is left of the body once every modelled field was taken: refused by name, or
/// carried for providers that take it.
fn rest(b: Body) -> Result<BTreeMap<String, Value>, RouterError> {
    let mut extra = BTreeMap::new();
    for (k, v) in b.0 {
        if let Some((_, why)) = REFUSED.iter().find(|(name, _)| *name == k) {
            return Err(invalid(format!("{k}: not supported; {why}")));
        }
        if k == "modalities" && v != serde_json::json!(["text"]) {
            return Err(invalid(
                "modalities: only [\"text\"]; the router answers text and tool calls",
            ));
        }
        if v.is_null() || k == "modalities" {
            continue;
        }
        extra.insert(k, v);
    }
    Ok(extra)
}

fn request(
    model: String,
    input: Input,
    params: GenParams,
    agent: String,
    extras: &Extras,
) -> Result<CompletionRequest, RouterError> {
    let r = CompletionRequest {
        model,
        input,
        params,
        tenant: agent.clone(),
        agent,
        request_id: extras.request_id.clone(),
        cache: extras.cache,
    };
    r.check()?;
    Ok(r)
}

/// `POST /v1/chat/completions`
pub fn chat(mut b: Body, extras: &Extras) -> Result<CompletionRequest, RouterError> {
    let model = b.take::<String>("model")?.unwrap_or_default();
    let messages = b.take::<Vec<Map<String, Value>>>("messages")?;
    let stream = b.stream();
    let (mut params, agent) = common(&mut b, extras)?;
    params.logprobs = b.take::<bool>("logprobs")?.unwrap_or(false);
    params.top_logprobs = b.take("top_logprobs")?;
    if params.logprobs && stream {
        return Err(invalid(
            "logprobs: not with stream: true (the router does not stream log probabilities)",
        ));
    }
    params.tools = b
        .take::<Vec<Map<String, Value>>>("tools")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, t)| tool(i, t))
        .collect::<Result<_, _>>()?;
    params.tool_choice = b
        .take::<Value>("tool_choice")?
        .map(tool_choice)
        .transpose()?;
    params.parallel_tool_calls = b.take("parallel_tool_calls")?;
    params.response_format = b
        .take::<Map<String, Value>>("response_format")?
        .map(response_format)
        .transpose()?;
    let messages = messages.unwrap_or_default();
    if messages.is_empty() {
        return Err(invalid("messages: at least one message is needed"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(invalid(format!("messages: more than {MAX_MESSAGES}")));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    params.extra = rest(b)?;
    request(model, Input::Chat(messages), params, agent, extras)
}

/// `POST /v1/completions`: one request per prompt, in order.
pub fn text(mut b: Body, extras: &Extras) -> Result<Vec<CompletionRequest>, RouterError> {
    let model = b.take::<String>("model")?.unwrap_or_default();
    let prompts = b
        .take::<OneOrMany>("prompt")?
        .map(OneOrMany::into_vec)
        .ok_or_else(|| invalid("prompt: a prompt or a list of prompts is needed"))?;
    let stream = b.stream();
    let (mut params, agent) = common(&mut b, extras)?;
    if let Some(n) = b.take::<u32>("logprobs")? {
        if stream {
            return Err(invalid(
                "logprobs: not with stream: true (the router does not stream log probabilities)",
            ));
        }
        params.logprobs = true;
        params.top_logprobs = Some(n);
    }
    params.echo = b.take::<bool>("echo")?.unwrap_or(false);
    params.suffix = b.take("suffix")?;
    params.best_of = b.take("best_of")?;
    params.extra = rest(b)?;
    if prompts.is_empty() {
        return Err(invalid("prompt: at least one prompt is needed"));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(invalid(format!(
            "prompt: {} prompts; at most {MAX_PROMPTS} in one request",
            prompts.len()
        )));
    }
    if stream && prompts.len() > 1 {
        return Err(invalid(
            "stream: one prompt per streamed request (send the others separately)",
        ));
    }
    if prompts.iter().any(String::is_empty) {
        return Err(invalid("prompt: prompts must not be empty"));
    }
    let many = prompts.len() > 1;
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = request(
                model.clone(),
                Input::Prompt(p),
                params.clone(),
                agent.clone(),
                extras,
            )?;
            if many {
                r.request_id = format!("{}-{i}", extras.request_id);
            }
            Ok(r)
        })
        .collect()
}

/// Fields of a message that carry nothing when empty; any other value is refused by name.
fn refuse_rest(at: &str, m: Map<String, Value>) -> Result<(), RouterError> {
    for (k, v) in m {
        let empty = match &v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        if !empty {
            return Err(invalid(format!("{at}.{k}: not supported by the router")));
        }
    }
    Ok(())
}

fn message(i: usize, mut m: Map<String, Value>) -> Result<ChatMessage, RouterError> {
    let at = format!("messages[{i}].");
    let role: String = take(&mut m, &at, "role")?
        .ok_or_else(|| invalid(format!("messages[{i}].role: missing")))?;
    let role = match role.as_str() {
        // OpenAI's newer name for system instructions.
        "developer" => Role::System,
        other => Role::parse_at(i, other)?,
    };
    let content = match m.remove("content") {
        None | Some(Value::Null) => Content::default(),
        Some(Value::String(s)) => Content::Text(s),
        Some(Value::Array(parts)) => Content::Parts(
            parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| part(&format!("messages[{i}].content[{j}]"), p))
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => {
            return Err(invalid(format!(
                "messages[{i}].content: a string or a list of parts"
            )));
        }
    };
    let tool_calls = take::<Vec<Map<String, Value>>>(&mut m, &at, "tool_calls")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(j, c)| call(&format!("messages[{i}].tool_calls[{j}]"), c))
        .collect::<Result<_, _>>()?;
    let message = ChatMessage {
        role,
        content,
        name: take(&mut m, &at, "name")?,
        tool_calls,
        tool_call_id: take(&mut m, &at, "tool_call_id")?,
    };
    refuse_rest(&format!("messages[{i}]"), m)?;
    Ok(message)
}

fn part(at: &str, p: Value) -> Result<Part, RouterError> {
    let Value::Object(mut p) = p else {
        return Err(invalid(format!("{at}: a part is an object with a type")));
    };
    let kind: String = take(&mut p, &format!("{at}."), "type")?.unwrap_or_default();
    let part = match kind.as_str() {
        "text" => Part::Text(take(&mut p, &format!("{at}."), "text")?.unwrap_or_default()),
        "image_url" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Url {
                url: String,
                detail: Option<String>,
            }
            let u: Url = take(&mut p, &format!("{at}."), "image_url")?
                .ok_or_else(|| invalid(format!("{at}.image_url: missing")))?;
            let detail = match u.detail.as_deref() {
                None => None,
                Some(d) => Some(Detail::parse(d).ok_or_else(|| {
                    invalid(format!(
                        "{at}.image_url.detail: {d:?} is not auto, low or high"
                    ))
                })?),
            };
            Part::Image(Image::from_url(&u.url, detail, at)?)
        }
        other => {
            return Err(invalid(format!(
                "{at}: {other:?} parts are not supported (text and image_url are)"
            )));
        }
    };
    // Anything else on the part (`cache_control`, ...) would be dropped: refused by name.
    refuse_rest(at, p)?;
    Ok(part)
}

#[derive(Deserialize)]
struct FunctionCall {
    name: String,
    arguments: String,
}

fn call(at: &str, mut c: Map<String, Value>) -> Result<ToolCall, RouterError> {
    let dot = format!("{at}.");
    if let Some(kind) = take::<String>(&mut c, &dot, "type")?
        && kind != "function"
    {
        return Err(invalid(format!("{at}.type: {kind:?}; only function calls")));
    }
    let f: FunctionCall = take(&mut c, &dot, "function")?
        .ok_or_else(|| invalid(format!("{at}.function: missing")))?;
    let call = ToolCall {
        id: take(&mut c, &dot, "id")?.unwrap_or_default(),
        name: f.name,
        arguments: f.arguments,
    };
    refuse_rest(at, c)?;
    Ok(call)
}

fn tool(i: usize, mut t: Map<String, Value>) -> Result<Tool, RouterError> {
    let at = format!("tools[{i}].");
    let kind: Option<String> = take(&mut t, &at, "type")?;
    if kind.as_deref() != Some("function") {
        return Err(invalid(format!(
            "tools[{i}].type: {kind:?}; only function tools are supported"
        )));
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Function {
        name: String,
        description: Option<String>,
        parameters: Option<Value>,
        strict: Option<bool>,
    }
    let f: Function = take(&mut t, &at, "function")?
        .ok_or_else(|| invalid(format!("tools[{i}].function: missing")))?;
    refuse_rest(&format!("tools[{i}]"), t)?;
    Ok(Tool {
        name: f.name,
        description: f.description,
        parameters: f.parameters.map(Arc::new),
        strict: f.strict,
    })
}

fn tool_choice(v: Value) -> Result<ToolChoice, RouterError> {
    match &v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(invalid(format!(
                "tool_choice: {other:?} is not auto, none, required or {{\"type\": \"function\", ...}}"
            ))),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Function(n.to_string()))
            .ok_or_else(|| invalid("tool_choice.function.name: missing")),
        _ => Err(invalid(
            "tool_choice: auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )),
    }
}

fn response_format(mut f: Map<String, Value>) -> Result<ResponseFormat, RouterError> {
    let kind: String = take(&mut f, "response_format.", "type")?.unwrap_or_default();
    match kind.as_str() {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Schema {
                name: String,
                description: Option<String>,
                schema: Option<Value>,
                strict: Option<bool>,
            }
            let s: Schema = take(&mut f, "response_format.", "json_schema")?
                .ok_or_else(|| invalid("response_format.json_schema: missing"))?;
            Ok(ResponseFormat::JsonSchema {
                name: s.name,
                description: s.description,
                schema: s.schema.map(Arc::new),
                strict: s.strict,
            })
        }
        other => Err(invalid(format!(
            "response_format.type: {other:?} is not text, json_object or json_schema"
        ))),
    }
}

#[cfg(test)]
mod tests;
