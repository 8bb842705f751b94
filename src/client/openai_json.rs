//! OpenAI-shaped JSON — as agents already write messages, tools and response formats — into
//! the proto, for `complete --tools` / `--response-format` and `batch` lines. Only the shape is
//! mapped here; the router checks the values and names what it refuses.

use serde_json::{Map, Value};

use crate::proto::v1;

/// Why a piece of JSON is not the OpenAI shape it should be, naming where.
fn shape(at: &str, want: &str) -> String {
    format!("{at}: expected {want}")
}

fn str_of(v: &Value, at: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| shape(at, "a string"))
}

fn opt_str(o: &Map<String, Value>, key: &str, at: &str) -> Result<String, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(v) => str_of(v, &format!("{at}.{key}")),
    }
}

/// A message: `role`, `content` (a string or parts), `name`, `tool_calls`, `tool_call_id`.
pub fn message(v: &Value, at: &str) -> Result<v1::ChatMessage, String> {
    let o = v.as_object().ok_or_else(|| shape(at, "a message object"))?;
    let mut m = v1::ChatMessage {
        role: opt_str(o, "role", at)?,
        name: opt_str(o, "name", at)?,
        tool_call_id: opt_str(o, "tool_call_id", at)?,
        ..Default::default()
    };
    match o.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => m.content = s.clone(),
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                m.parts.push(part(p, &format!("{at}.content[{j}]"))?);
            }
        }
        Some(_) => {
            return Err(shape(
                &format!("{at}.content"),
                "a string or a list of parts",
            ));
        }
    }
    if let Some(calls) = o.get("tool_calls").and_then(Value::as_array) {
        for (j, c) in calls.iter().enumerate() {
            let at = format!("{at}.tool_calls[{j}]");
            let f = c
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| shape(&at, "{\"id\", \"function\": {\"name\", \"arguments\"}}"))?;
            m.tool_calls.push(v1::ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                name: opt_str(f, "name", &at)?,
                arguments: opt_str(f, "arguments", &at)?,
            });
        }
    }
    Ok(m)
}

fn part(p: &Value, at: &str) -> Result<v1::ContentPart, String> {
    let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
    let part = match kind {
        "text" => v1::content_part::Part::Text(str_of(&p["text"], &format!("{at}.text"))?),
        "image_url" => {
            let u = &p["image_url"];
            v1::content_part::Part::Image(v1::Image {
                source: Some(v1::image::Source::Url(str_of(
                    &u["url"],
                    &format!("{at}.image_url.url"),
                )?)),
                detail: u["detail"].as_str().unwrap_or_default().into(),
                ..Default::default()
            })
        }
        other => {
            return Err(format!(
                "{at}: {other:?} parts are not taken (text, image_url)"
            ));
        }
    };
    Ok(v1::ContentPart { part: Some(part) })
}

/// A list of tools: `[{"type": "function", "function": {name, description, parameters,
/// strict}}]` (a bare `{name, ...}` function is taken too).
pub fn tools(v: &Value, at: &str) -> Result<Vec<v1::Tool>, String> {
    let list = v.as_array().ok_or_else(|| shape(at, "a list of tools"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("{at}[{i}]");
            let f = t.get("function").unwrap_or(t);
            let f = f
                .as_object()
                .ok_or_else(|| shape(&at, "{\"type\": \"function\", \"function\": {...}}"))?;
            Ok(v1::Tool {
                name: opt_str(f, "name", &at)?,
                description: opt_str(f, "description", &at)?,
                parameters_json: f
                    .get("parameters")
                    .filter(|p| !p.is_null())
                    .map(Value::to_string)
                    .unwrap_or_default(),
                strict: f.get("strict").and_then(Value::as_bool),
            })
        })
        .collect()
}

/// `"auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}`.
pub fn tool_choice(v: &Value, at: &str) -> Result<v1::ToolChoice, String> {
    let choice = match v {
        Value::String(s) => v1::tool_choice::Choice::Mode(s.clone()),
        _ => v1::tool_choice::Choice::Function(str_of(
            &v["function"]["name"],
            &format!("{at}.function.name"),
        )?),
    };
    Ok(v1::ToolChoice {
        choice: Some(choice),
    })
}

/// `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {name, schema, ...}}`,
/// or `{"type": "text"}`.
pub fn response_format(v: &Value, at: &str) -> Result<v1::ResponseFormat, String> {
    let kind = str_of(&v["type"], &format!("{at}.type"))?;
    let s = &v["json_schema"];
    Ok(v1::ResponseFormat {
        r#type: kind,
        name: s["name"].as_str().unwrap_or_default().into(),
        description: s["description"].as_str().unwrap_or_default().into(),
        schema_json: s
            .get("schema")
            .filter(|x| !x.is_null())
            .map(Value::to_string)
            .unwrap_or_default(),
        strict: s["strict"].as_bool(),
    })
}

/// The MIME type of an image file, by its extension.
pub fn image_type(path: &std::path::Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn openai_shapes_map_to_the_proto() {
        let m = message(
            &json!({"role": "assistant", "content": null,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
            "messages[1]",
        )
        .unwrap();
        assert_eq!(
            (m.tool_calls[0].id.as_str(), m.tool_calls[0].name.as_str()),
            ("c1", "f")
        );
        let m = message(
            &json!({"role": "user", "content": [{"type": "text", "text": "see"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]}),
            "m",
        )
        .unwrap();
        assert_eq!(m.parts.len(), 2);
        let t = tools(
            &json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
            "tools",
        )
        .unwrap();
        assert_eq!(t[0].parameters_json, r#"{"type":"object"}"#);
        let f = response_format(
            &json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}),
            "response_format",
        )
        .unwrap();
        assert_eq!((f.r#type.as_str(), f.name.as_str()), ("json_schema", "s"));
        let e = message(
            &json!({"role": "user", "content": [{"type": "audio"}]}),
            "messages[0]",
        )
        .unwrap_err();
        assert!(e.starts_with("messages[0].content[0]"), "{e}");
    }
}
