//! The OpenAI shapes that several upstream APIs share: messages with parts and tool calls,
//! tools, tool choice and response format (OpenAI-compatible servers take all of them; Ollama
//! takes the same `tools`), and the tool calls they answer with.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::completion::{
    ChatMessage, Content, GenParams, Part, ResponseFormat, Tool, ToolCall, ToolCallDelta,
    ToolChoice,
};

/// A chat message as OpenAI-compatible servers take it.
#[derive(Serialize)]
pub struct Message<'a> {
    pub role: &'static str,
    /// `null` for an assistant turn that only calls tools.
    pub content: Option<MessageContent<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<CallOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum MessageContent<'a> {
    Text(&'a str),
    Parts(Vec<PartOut<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PartOut<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageUrl<'a> },
}

#[derive(Serialize)]
pub struct ImageUrl<'a> {
    pub url: crate::completion::ImageUrl<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
}

/// A tool call in a request's history (OpenAI: arguments as JSON text).
#[derive(Serialize)]
pub struct CallOut<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut<'a>,
}

#[derive(Serialize)]
pub struct FunctionCallOut<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

pub fn messages(messages: &[ChatMessage]) -> Vec<Message<'_>> {
    messages
        .iter()
        .map(|m| Message {
            role: m.role.as_str(),
            content: match (&m.content, m.tool_calls.is_empty()) {
                (Content::Text(t), false) if t.is_empty() => None,
                (Content::Text(t), _) => Some(MessageContent::Text(t)),
                (Content::Parts(parts), _) => Some(MessageContent::Parts(
                    parts
                        .iter()
                        .map(|p| match p {
                            Part::Text(text) => PartOut::Text { text },
                            Part::Image(img) => PartOut::ImageUrl {
                                image_url: ImageUrl {
                                    url: img.url(),
                                    detail: img.detail.map(|d| d.as_str()),
                                },
                            },
                        })
                        .collect(),
                )),
            },
            name: m.name.as_deref(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| CallOut {
                    id: &c.id,
                    kind: "function",
                    function: FunctionCallOut {
                        name: &c.name,
                        arguments: &c.arguments,
                    },
                })
                .collect(),
            tool_call_id: m.tool_call_id.as_deref(),
        })
        .collect()
}

/// `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` as OpenAI takes them.
#[derive(Serialize)]
pub struct ToolFields<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
}

impl<'a> ToolFields<'a> {
    pub fn of(p: &'a GenParams) -> ToolFields<'a> {
        ToolFields {
            tools: tools(&p.tools),
            tool_choice: p.tool_choice.as_ref().map(tool_choice),
            parallel_tool_calls: p.parallel_tool_calls,
            response_format: p.response_format.as_ref().map(response_format),
        }
    }
}

#[derive(Serialize)]
pub struct ToolOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut<'a>,
}

#[derive(Serialize)]
pub struct FunctionOut<'a> {
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

pub fn tools(tools: &[Tool]) -> Vec<ToolOut<'_>> {
    tools
        .iter()
        .map(|t| ToolOut {
            kind: "function",
            function: FunctionOut {
                name: &t.name,
                description: t.description.as_deref(),
                parameters: t.parameters.as_deref(),
                strict: t.strict,
            },
        })
        .collect()
}

pub fn tool_choice(c: &ToolChoice) -> Value {
    match c {
        ToolChoice::Auto => "auto".into(),
        ToolChoice::None => "none".into(),
        ToolChoice::Required => "required".into(),
        ToolChoice::Function(name) => {
            serde_json::json!({"type": "function", "function": {"name": name}})
        }
    }
}

pub fn response_format(f: &ResponseFormat) -> Value {
    match f {
        ResponseFormat::Text => serde_json::json!({"type": "text"}),
        ResponseFormat::JsonObject => serde_json::json!({"type": "json_object"}),
        ResponseFormat::JsonSchema {
            name,
            description,
            schema,
            strict,
        } => {
            let mut inner = serde_json::Map::new();
            inner.insert("name".into(), name.as_str().into());
            if let Some(d) = description {
                inner.insert("description".into(), d.as_str().into());
            }
            if let Some(s) = schema {
                inner.insert("schema".into(), Value::clone(s));
            }
            if let Some(s) = strict {
                inner.insert("strict".into(), (*s).into());
            }
            serde_json::json!({"type": "json_schema", "json_schema": inner})
        }
    }
}

/// A tool call in an answer, as OpenAI-shaped APIs send it (Ollama: arguments as an object,
/// no id; stream pieces: an `index`, the rest in pieces).
#[derive(Debug, Deserialize)]
pub struct CallIn {
    #[serde(default)]
    pub index: Option<u32>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub function: FunctionIn,
}

#[derive(Debug, Default, Deserialize)]
pub struct FunctionIn {
    #[serde(default)]
    pub name: Option<String>,
    /// JSON text (OpenAI) or a JSON value (Ollama).
    #[serde(default)]
    pub arguments: Option<Value>,
}

/// Arguments as JSON text, whichever way the API sent them.
fn arguments_text(v: Option<Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
    }
}

/// Whole tool calls from an answer; a call without an id gets `call_<i>` (Ollama sends none).
pub fn calls(calls: Vec<CallIn>) -> Vec<ToolCall> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCall {
            id: c.id.unwrap_or_else(|| format!("call_{i}")),
            name: c.function.name.unwrap_or_default(),
            arguments: arguments_text(c.function.arguments),
        })
        .collect()
}

/// Stream pieces of tool calls; `base` numbers calls that come without an index (whole calls
/// in one piece each, as Ollama streams them).
pub fn deltas(calls: Vec<CallIn>, base: u32) -> Vec<ToolCallDelta> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let index = c
                .index
                .unwrap_or_else(|| base + u32::try_from(i).unwrap_or(u32::MAX));
            ToolCallDelta {
                id: c
                    .id
                    .or_else(|| c.index.is_none().then(|| format!("call_{index}"))),
                index,
                name: c.function.name,
                arguments: arguments_text(c.function.arguments),
            }
        })
        .collect()
}
