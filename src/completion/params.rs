//! Everything besides the input that shapes an answer: sampling fields, the tools a model may
//! call, the output format, and fields outside OpenAI's reference that some servers take.
//! Each is checked here once, whichever edge it came in by, and hashed here once for the
//! cache and the batch queues ([`GenParams::hash_into`]), destructured exhaustively so a field
//! added later cannot be left out of either.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::fingerprint::count_field;
use crate::error::RouterError;

/// Bounds on what one request may carry, whichever edge it came in by.
pub const MAX_STOP_SEQUENCES: usize = 16;
pub const MAX_TOKENS: u32 = 1 << 20;
pub const MAX_TOOLS: usize = 128;
/// A tool's JSON schema, or a response format's, as JSON text.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
pub const MAX_LOGIT_BIAS: usize = 300;
pub const MAX_TOP_LOGPROBS: u32 = 20;
pub const MAX_EXTRA_FIELDS: usize = 32;

/// Fields of OpenAI's chat and completions references that the router does not model: kept
/// as they came in [`GenParams::extra`], forwarded to OpenAI-shaped providers, and to others
/// only through their `pass_through`.
pub const OPENAI_FIELDS: &[&str] = &[
    "store",
    "metadata",
    "service_tier",
    "reasoning_effort",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "prediction",
    "functions",
    "function_call",
];

pub fn is_openai_field(name: &str) -> bool {
    OPENAI_FIELDS.contains(&name)
}

/// Request fields the router reads into [`GenParams`] or uses itself, on either endpoint.
const MODELLED_FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "n",
    "user",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stop",
    "seed",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "best_of",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
];

pub fn is_modelled_field(name: &str) -> bool {
    MODELLED_FIELDS.contains(&name)
}

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

/// Generation parameters; `None` (or empty) leaves the provider's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenParams {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub top_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Token id → bias (-100 ..= 100).
    pub logit_bias: BTreeMap<u32, f32>,
    /// Log probabilities of the chosen tokens, with `top_logprobs` alternatives each.
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    /// `/v1/completions` only: the prompt repeated before the answer.
    pub echo: bool,
    /// `/v1/completions` only: text that follows the completion.
    pub suffix: Option<String>,
    /// `/v1/completions` only: candidates generated server-side, the best returned.
    pub best_of: Option<u32>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    /// Fields outside OpenAI's reference (vLLM's `top_k`, `min_p`, ...), forwarded only to
    /// providers whose `pass_through` lists them.
    pub extra: BTreeMap<String, Value>,
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema object; `None` takes no arguments.
    pub parameters: Option<Arc<Value>>,
    pub strict: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

/// What the answer's text must be.
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        description: Option<String>,
        schema: Option<Arc<Value>>,
        strict: Option<bool>,
    },
}

impl ResponseFormat {
    /// Whether it asks for JSON (the `json` capability).
    pub fn is_json(&self) -> bool {
        !matches!(self, ResponseFormat::Text)
    }
}

/// A tool or format name: OpenAI's rule, letters, digits, `_` and `-`, at most 64.
fn check_name(at: &str, name: &str) -> Result<(), RouterError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(format!(
            "{at}: {} is not a name of 1 to 64 letters, digits, '_' or '-'",
            crate::error::Shown(name)
        )));
    }
    Ok(())
}

/// A JSON schema: an object, of bounded size.
fn check_schema(at: &str, schema: &Value) -> Result<(), RouterError> {
    if !schema.is_object() {
        return Err(invalid(format!("{at}: a JSON schema must be an object")));
    }
    let size = serde_json::to_vec(schema).map_or(usize::MAX, |v| v.len());
    if size > MAX_SCHEMA_BYTES {
        return Err(invalid(format!(
            "{at}: the schema is {size} bytes; at most {MAX_SCHEMA_BYTES}"
        )));
    }
    if let Some(t) = schema.get("type")
        && !(t.is_string() || t.is_array())
    {
        return Err(invalid(format!(
            "{at}.type: must be a type name or a list of them"
        )));
    }
    Ok(())
}

impl GenParams {
    /// Every parameter in its range, named when not.
    pub fn check(&self) -> Result<(), RouterError> {
        let range = |name: &str, v: Option<f32>, lo: f32, hi: f32| match v {
            Some(x) if !(lo..=hi).contains(&x) => Err(invalid(format!(
                "{name}: {x} is outside {lo:.1} ..= {hi:.1}"
            ))),
            _ => Ok(()),
        };
        range("temperature", self.temperature, 0.0, 2.0)?;
        range("top_p", self.top_p, 0.0, 1.0)?;
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        if let Some(m) = self.max_tokens
            && !(1..=MAX_TOKENS).contains(&m)
        {
            return Err(invalid(format!(
                "max_tokens: {m} is outside 1 ..= {MAX_TOKENS}"
            )));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "stop: more than {MAX_STOP_SEQUENCES} sequences"
            )));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop: sequences must not be empty"));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(invalid(format!(
                "logit_bias: more than {MAX_LOGIT_BIAS} tokens"
            )));
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(*b))
        {
            return Err(invalid(format!(
                "logit_bias.{t}: {b} is outside -100 ..= 100"
            )));
        }
        if let Some(n) = self.top_logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(invalid(format!(
                    "top_logprobs: {n} is outside 0 ..= {MAX_TOP_LOGPROBS}"
                )));
            }
            if !self.logprobs {
                return Err(invalid("top_logprobs: needs logprobs: true"));
            }
        }
        if let Some(b) = self.best_of
            && !(1..=20).contains(&b)
        {
            return Err(invalid(format!("best_of: {b} is outside 1 ..= 20")));
        }
        self.check_tools()?;
        if let Some(ResponseFormat::JsonSchema { name, schema, .. }) = &self.response_format {
            check_name("response_format.json_schema.name", name)?;
            if let Some(s) = schema {
                check_schema("response_format.json_schema.schema", s)?;
            }
        }
        if self.extra.len() > MAX_EXTRA_FIELDS {
            return Err(invalid(format!(
                "more than {MAX_EXTRA_FIELDS} fields outside OpenAI's reference"
            )));
        }
        Ok(())
    }

    fn check_tools(&self) -> Result<(), RouterError> {
        if self.tools.len() > MAX_TOOLS {
            return Err(invalid(format!("tools: more than {MAX_TOOLS}")));
        }
        for (i, t) in self.tools.iter().enumerate() {
            check_name(&format!("tools[{i}].function.name"), &t.name)?;
            if self.tools[..i].iter().any(|u| u.name == t.name) {
                return Err(invalid(format!(
                    "tools[{i}].function.name: {:?} is listed twice",
                    t.name
                )));
            }
            if let Some(p) = &t.parameters {
                check_schema(&format!("tools[{i}].function.parameters"), p)?;
            }
        }
        match &self.tool_choice {
            Some(ToolChoice::Function(name)) if !self.tools.iter().any(|t| &t.name == name) => {
                Err(invalid(format!(
                    "tool_choice: function {name:?} is not one of the request's tools"
                )))
            }
            Some(ToolChoice::Required | ToolChoice::Function(_)) if self.tools.is_empty() => Err(
                invalid("tool_choice: a tool is required but the request offers no tools"),
            ),
            _ => Ok(()),
        }
    }

    /// Feeds every field to `field`, length-prefixed by the caller, in a fixed order: the
    /// cache key and the batch key both hash this, so two requests share a cached answer or
    /// an upstream request only when nothing that changes the answer differs.
    pub fn hash_into(&self, field: &mut impl FnMut(&[u8])) {
        let GenParams {
            max_tokens,
            temperature,
            stop,
            seed,
            top_p,
            frequency_penalty,
            presence_penalty,
            logit_bias,
            logprobs,
            top_logprobs,
            echo,
            suffix,
            best_of,
            tools,
            tool_choice,
            parallel_tool_calls,
            response_format,
            extra,
        } = self;
        // An absent parameter is an empty field, which the length prefix tells from a value.
        let f32_field = |v: &Option<f32>| v.map(|t| t.to_bits().to_le_bytes());
        field(present(&max_tokens.map(u32::to_le_bytes)));
        field(present(&f32_field(temperature)));
        count_field(stop.len(), field);
        for s in stop {
            field(s.as_bytes());
        }
        field(present(&seed.map(i64::to_le_bytes)));
        field(present(&f32_field(top_p)));
        field(present(&f32_field(frequency_penalty)));
        field(present(&f32_field(presence_penalty)));
        count_field(logit_bias.len(), field);
        for (t, b) in logit_bias {
            field(&t.to_le_bytes());
            field(&b.to_bits().to_le_bytes());
        }
        field(&[u8::from(*logprobs), u8::from(*echo)]);
        field(present(&top_logprobs.map(u32::to_le_bytes)));
        field(suffix.as_deref().map_or(&[0xff][..], str::as_bytes));
        field(present(&best_of.map(u32::to_le_bytes)));
        count_field(tools.len(), field);
        for Tool {
            name,
            description,
            parameters,
            strict,
        } in tools
        {
            field(name.as_bytes());
            field(description.as_deref().map_or(&[0xff][..], str::as_bytes));
            json_field(field, parameters.as_deref());
            field(present(&strict.map(|s| [u8::from(s)])));
        }
        match tool_choice {
            None => field(b""),
            Some(ToolChoice::Auto) => field(b"auto"),
            Some(ToolChoice::None) => field(b"none"),
            Some(ToolChoice::Required) => field(b"required"),
            Some(ToolChoice::Function(name)) => {
                field(b"function");
                field(name.as_bytes());
            }
        }
        field(present(&parallel_tool_calls.map(|s| [u8::from(s)])));
        match response_format {
            None => field(b""),
            Some(ResponseFormat::Text) => field(b"text"),
            Some(ResponseFormat::JsonObject) => field(b"json_object"),
            Some(ResponseFormat::JsonSchema {
                name,
                description,
                schema,
                strict,
            }) => {
                field(b"json_schema");
                field(name.as_bytes());
                field(description.as_deref().map_or(&[0xff][..], str::as_bytes));
                json_field(field, schema.as_deref());
                field(present(&strict.map(|s| [u8::from(s)])));
            }
        }
        count_field(extra.len(), field);
        for (k, v) in extra {
            field(k.as_bytes());
            json_field(field, Some(v));
        }
    }
}

/// A JSON value as canonical text (serde_json's maps are ordered by key here).
fn json_field(field: &mut impl FnMut(&[u8]), v: Option<&Value>) {
    match v {
        None => field(&[0xff]),
        Some(v) => field(serde_json::to_string(v).unwrap_or_default().as_bytes()),
    }
}

fn present<const N: usize>(v: &Option<[u8; N]>) -> &[u8] {
    v.as_ref().map_or(&[], |b| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: None,
            parameters: Some(Arc::new(serde_json::json!({"type": "object"}))),
            strict: None,
        }
    }

    #[test]
    fn bad_tools_and_choices_are_named() {
        let cases: Vec<(GenParams, &str)> = vec![
            (
                GenParams {
                    tools: vec![tool("has space")],
                    ..GenParams::default()
                },
                "tools[0].function.name",
            ),
            (
                GenParams {
                    tools: vec![Tool {
                        parameters: Some(Arc::new(serde_json::json!([1, 2]))),
                        ..tool("f")
                    }],
                    ..GenParams::default()
                },
                "tools[0].function.parameters",
            ),
            (
                GenParams {
                    tools: vec![tool("f")],
                    tool_choice: Some(ToolChoice::Function("g".into())),
                    ..GenParams::default()
                },
                "tool_choice",
            ),
            (
                GenParams {
                    tool_choice: Some(ToolChoice::Required),
                    ..GenParams::default()
                },
                "tool_choice",
            ),
            (
                GenParams {
                    tools: vec![tool("f"), tool("f")],
                    ..GenParams::default()
                },
                "tools[1].function.name",
            ),
            (
                GenParams {
                    top_p: Some(1.5),
                    ..GenParams::default()
                },
                "top_p",
            ),
            (
                GenParams {
                    top_logprobs: Some(3),
                    ..GenParams::default()
                },
                "top_logprobs",
            ),
        ];
        for (p, names) in cases {
            let e = p.check().unwrap_err().to_string();
            assert!(e.starts_with(names), "{names}: {e}");
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let hash = |p: &GenParams| {
            let mut f = crate::completion::Fingerprint::default();
            p.hash_into(&mut |b: &[u8]| f.field(b));
            f.finish()
        };
        let base = GenParams::default();
        let variants = [
            GenParams {
                top_p: Some(0.5),
                ..GenParams::default()
            },
            GenParams {
                frequency_penalty: Some(0.5),
                ..GenParams::default()
            },
            GenParams {
                presence_penalty: Some(0.5),
                ..GenParams::default()
            },
            GenParams {
                logit_bias: [(5, 1.0)].into(),
                ..GenParams::default()
            },
            GenParams {
                logprobs: true,
                ..GenParams::default()
            },
            GenParams {
                echo: true,
                ..GenParams::default()
            },
            GenParams {
                suffix: Some(String::new()),
                ..GenParams::default()
            },
            GenParams {
                tools: vec![tool("f")],
                ..GenParams::default()
            },
            GenParams {
                tool_choice: Some(ToolChoice::None),
                ..GenParams::default()
            },
            GenParams {
                parallel_tool_calls: Some(false),
                ..GenParams::default()
            },
            GenParams {
                response_format: Some(ResponseFormat::JsonObject),
                ..GenParams::default()
            },
            GenParams {
                extra: [("top_k".to_string(), serde_json::json!(5))].into(),
                ..GenParams::default()
            },
        ];
        let mut seen = vec![hash(&base)];
        for v in &variants {
            let h = hash(v);
            assert!(!seen.contains(&h), "{v:?} hashes like another");
            seen.push(h);
        }
    }
}
