//! A conversation as agents send it: roles, text or parts (text and images), the assistant's
//! tool calls and the `tool` messages that answer them. Both fronts build these; every
//! provider adapter maps them to its own API or says which part it cannot carry.

use std::fmt;

use bytes::Bytes;

use crate::error::RouterError;

fn invalid(msg: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument(msg.into())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Content,
    /// OpenAI's `name`: which participant spoke (not a tool's name).
    pub name: Option<String>,
    /// Calls the assistant made (assistant messages only).
    pub tool_calls: Vec<ToolCall>,
    /// The call this message answers (`tool` messages only).
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of plain text.
    pub fn text(role: Role, text: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role,
            content: Content::Text(text.into()),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A message's content: one text, or parts in order.
#[derive(Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl Default for Content {
    fn default() -> Content {
        Content::Text(String::new())
    }
}

// Prompts are not logged by default, so Debug shows only sizes.
impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Text(t) => write!(f, "Text({} bytes)", t.len()),
            Content::Parts(p) => write!(f, "Parts({})", p.len()),
        }
    }
}

impl Content {
    /// The text parts joined (images left out).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(t) => t.as_str().into(),
            Content::Parts(parts) => match parts.as_slice() {
                [Part::Text(t)] => t.as_str().into(),
                _ => parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Text(t) => Some(t.as_str()),
                        Part::Image(_) => None,
                    })
                    .collect::<String>()
                    .into(),
            },
        }
    }

    /// Bytes of text it carries.
    pub fn text_len(&self) -> usize {
        match self {
            Content::Text(t) => t.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => t.len(),
                    Part::Image(_) => 0,
                })
                .sum(),
        }
    }

    pub fn images(&self) -> impl Iterator<Item = &Image> {
        let parts = match self {
            Content::Text(_) => &[][..],
            Content::Parts(p) => p.as_slice(),
        };
        parts.iter().filter_map(|p| match p {
            Part::Image(i) => Some(i),
            Part::Text(_) => None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Image(Image),
}

/// An image in a message: its bytes, or a URL the provider fetches. The router never fetches
/// a URL itself (no server-side request forgery): a provider that needs bytes is skipped.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    pub source: ImageSource,
    /// OpenAI's `detail`: `auto`, `low` or `high`; `None` leaves the provider's default.
    pub detail: Option<Detail>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            ImageSource::Inline { mime, data } => write!(f, "Image({mime}, {} bytes)", data.len()),
            ImageSource::Url(_) => f.write_str("Image(url)"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Decoded bytes (from a `data:` URL or the proto's bytes), shared, never copied.
    Inline { mime: String, data: Bytes },
    /// An `http(s)://` URL, passed on by reference.
    Url(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    Auto,
    Low,
    High,
}

impl Detail {
    pub fn parse(s: &str) -> Option<Detail> {
        match s {
            "auto" => Some(Detail::Auto),
            "low" => Some(Detail::Low),
            "high" => Some(Detail::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Detail::Auto => "auto",
            Detail::Low => "low",
            Detail::High => "high",
        }
    }
}

/// The image MIME types every provider that takes images accepts.
pub const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

impl Image {
    /// An image from a URL as OpenAI's `image_url.url` carries it: `data:<mime>;base64,...`
    /// is decoded to bytes; `http(s)://` stays a reference. `at` names the part in errors.
    pub fn from_url(url: &str, detail: Option<Detail>, at: &str) -> Result<Image, RouterError> {
        let source = if let Some(rest) = url.strip_prefix("data:") {
            let (meta, b64) = rest.split_once(',').ok_or_else(|| {
                invalid(format!("{at}: a data: URL needs a comma before its data"))
            })?;
            let mime = meta.strip_suffix(";base64").ok_or_else(|| {
                invalid(format!(
                    "{at}: only base64 data: URLs are taken (data:<type>;base64,...)"
                ))
            })?;
            let data = base64_decode(b64).map_err(|e| {
                invalid(format!(
                    "{at}: the data: URL's base64 does not decode ({e})"
                ))
            })?;
            Image::inline(mime, Bytes::from(data), at)?.source
        } else if url.starts_with("https://") || url.starts_with("http://") {
            ImageSource::Url(url.to_string())
        } else {
            return Err(invalid(format!(
                "{at}: an image URL must be https://, http:// or data:<type>;base64,..."
            )));
        };
        Ok(Image { source, detail })
    }

    /// Bytes of a known image type.
    pub fn inline(mime: &str, data: Bytes, at: &str) -> Result<Image, RouterError> {
        let mime = mime.to_ascii_lowercase();
        if !IMAGE_TYPES.contains(&mime.as_str()) {
            return Err(invalid(format!(
                "{at}: image type {mime:?} is not one of {}",
                IMAGE_TYPES.join(", ")
            )));
        }
        if data.is_empty() {
            return Err(invalid(format!("{at}: the image is empty")));
        }
        Ok(Image {
            source: ImageSource::Inline { mime, data },
            detail: None,
        })
    }

    /// Bytes the router holds for it (0 for a URL).
    pub fn len(&self) -> usize {
        match &self.source {
            ImageSource::Inline { data, .. } => data.len(),
            ImageSource::Url(u) => u.len(),
        }
    }

    /// The image as a URL for APIs that take images as URLs: its own, or a `data:` URL
    /// written straight into the request body (see [`Base64`]).
    pub fn url(&self) -> ImageUrl<'_> {
        ImageUrl(self)
    }
}

/// An image's URL, serialized as a string without building it first.
#[derive(Clone, Copy)]
pub struct ImageUrl<'a>(&'a Image);

impl serde::Serialize for ImageUrl<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0.source {
            ImageSource::Inline { mime, data } => {
                s.collect_str(&format_args!("data:{mime};base64,{}", Base64(data)))
            }
            ImageSource::Url(u) => s.serialize_str(u),
        }
    }
}

/// Bytes as standard base64, serialized (or displayed) without an intermediate string: a
/// 1 MiB image would otherwise be held a third time, as 1.33 MiB of base64 text, on its way
/// into the request body (serde_json's `collect_str` writes a `Display` straight in).
#[derive(Clone, Copy)]
pub struct Base64<'a>(pub &'a [u8]);

impl fmt::Display for Base64<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::display::Base64Display;
        Base64Display::new(self.0, &base64::engine::general_purpose::STANDARD).fmt(f)
    }
}

impl serde::Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

pub fn base64_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text.trim())
}

/// A call to one of the request's tools, as the model made it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them.
    pub arguments: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// The role of `messages[i]`, or an error naming it.
    pub fn parse_at(i: usize, s: &str) -> Result<Role, RouterError> {
        Role::parse(s).ok_or_else(|| {
            invalid(format!(
                "messages[{i}].role: {} is not system, user, assistant or tool",
                crate::error::Shown(s)
            ))
        })
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// Checks a conversation's shape, whichever edge it came in by: tool calls only on assistant
/// messages, each `tool` message answering a call made earlier, images only from the user.
pub fn check_conversation(messages: &[ChatMessage]) -> Result<(), RouterError> {
    let mut calls: Vec<&str> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if !m.tool_calls.is_empty() && m.role != Role::Assistant {
            return Err(invalid(format!(
                "messages[{i}].tool_calls: only assistant messages carry tool calls"
            )));
        }
        for (j, c) in m.tool_calls.iter().enumerate() {
            if c.id.is_empty() || c.name.is_empty() {
                return Err(invalid(format!(
                    "messages[{i}].tool_calls[{j}]: a call needs an id and a function name"
                )));
            }
            calls.push(&c.id);
        }
        match (m.role, &m.tool_call_id) {
            (Role::Tool, None) => {
                return Err(invalid(format!(
                    "messages[{i}].tool_call_id: a tool message must name the call it answers"
                )));
            }
            (Role::Tool, Some(id)) if !calls.contains(&id.as_str()) => {
                return Err(invalid(format!(
                    "messages[{i}].tool_call_id: {id:?} answers no tool call of an earlier assistant message"
                )));
            }
            (Role::Tool, Some(_)) => {}
            (_, Some(_)) => {
                return Err(invalid(format!(
                    "messages[{i}].tool_call_id: only tool messages answer a call"
                )));
            }
            (_, None) => {}
        }
        if m.role != Role::User && m.content.images().next().is_some() {
            return Err(invalid(format!(
                "messages[{i}].content: images go in user messages"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_and_bad_ones_are_named() {
        let png = format!("data:image/png;base64,{}", Base64(b"\x89PNG"));
        let img = Image::from_url(&png, None, "messages[0].content[1]").unwrap();
        assert_eq!(img.len(), 4);
        assert_eq!(serde_json::to_value(img.url()).unwrap(), png.as_str());
        let bad = [
            ("data:image/png;base64,@@@", "does not decode"),
            ("data:image/png,abc", "only base64"),
            ("data:text/plain;base64,aGk=", "image type"),
            ("ftp://x/y.png", "https://"),
        ];
        for (url, says) in bad {
            let e = Image::from_url(url, None, "messages[2].content[0]")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("messages[2].content[0]") && e.contains(says),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn tool_messages_answer_earlier_calls() {
        let mut call = ChatMessage::text(Role::Assistant, "");
        call.tool_calls.push(ToolCall {
            id: "c1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        });
        let mut result = ChatMessage::text(Role::Tool, "42");
        result.tool_call_id = Some("c1".into());
        let user = ChatMessage::text(Role::User, "hi");
        assert!(check_conversation(&[user.clone(), call.clone(), result.clone()]).is_ok());
        let e = check_conversation(&[user.clone(), result.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("messages[1].tool_call_id"), "{e}");
        let mut orphan = result;
        orphan.tool_call_id = None;
        let e = check_conversation(&[user, call, orphan])
            .unwrap_err()
            .to_string();
        assert!(e.contains("messages[2].tool_call_id"), "{e}");
    }
}
