//! Routing by what a request needs, in the shape of the Python cascade router's file: a model
//! may list `capabilities` (text, tools, json, streaming, vision) and a `context_window`. A
//! request's needs are derived from what it carries; a candidate that lacks one, whose window
//! is too small, or whose provider's API cannot carry one of the request's fields is skipped
//! with no network attempt (attempt kind `unsupported`). When the route's own models lack a
//! capability, the file's `fallback_chains.<capability>` is walked after them, as the Python
//! router does (`cascade::plan`). A model with no `capabilities` list is taken to have them
//! all. Here: what a request [`Needs`]; what a model has is the file's (`config`).

use crate::completion::CompletionRequest;
pub use crate::config::{Capabilities, Capability, ModelInfo};

/// Tokens counted for each image in the window estimate (about what one 512×512 tile and
/// its overhead cost at the hosted APIs).
pub const TOKENS_PER_IMAGE: u32 = 1_000;

/// What a request needs of the model that answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    pub capabilities: Capabilities,
    /// A cheap estimate of the window it fills: text bytes / 4 (about four bytes a token in
    /// English and code), [`TOKENS_PER_IMAGE`] per image, plus `max_tokens` when set.
    pub tokens: u32,
}

impl Needs {
    pub fn of(r: &CompletionRequest, streaming: bool) -> Needs {
        let mut caps = Capabilities::default();
        let images = r.input.images().count();
        if images > 0 {
            caps = caps.with(Capability::Vision);
        }
        if !r.params.tools.is_empty() || r.input.has_tool_turns() {
            caps = caps.with(Capability::Tools);
        }
        if r.params
            .response_format
            .as_ref()
            .is_some_and(|f| f.is_json())
        {
            caps = caps.with(Capability::Json);
        }
        if streaming {
            caps = caps.with(Capability::Streaming);
        }
        let text = u32::try_from(r.input.text_len() / 4).unwrap_or(u32::MAX);
        let images = u32::try_from(images)
            .unwrap_or(u32::MAX)
            .saturating_mul(TOKENS_PER_IMAGE);
        Needs {
            capabilities: caps,
            tokens: text
                .saturating_add(images)
                .saturating_add(r.params.max_tokens.unwrap_or(0)),
        }
    }

    /// Why `info` cannot serve these needs, if it cannot.
    pub fn unmet(&self, info: &ModelInfo) -> Option<String> {
        if let Some(have) = info.capabilities {
            let missing: Vec<&str> = self
                .capabilities
                .iter()
                .filter(|c| !have.has(*c))
                .map(Capability::as_str)
                .collect();
            if !missing.is_empty() {
                return Some(format!("the model lacks {}", missing.join(", ")));
            }
        }
        match info.context_window {
            Some(w) if self.tokens > w => Some(format!(
                "needs about {} tokens; its context_window is {w}",
                self.tokens
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::{ChatMessage, GenParams, Image, Input, Part, ResponseFormat, Role};

    fn request(input: Input, params: GenParams) -> CompletionRequest {
        CompletionRequest {
            model: String::new(),
            input,
            params,
            agent: String::new(),
            tenant: String::new(),
            request_id: String::new(),
            cache: Default::default(),
        }
    }

    #[test]
    fn needs_follow_what_the_request_carries() {
        let png = Image::inline("image/png", bytes::Bytes::from_static(b"x"), "t").unwrap();
        let mut m = ChatMessage::text(Role::User, "look");
        m.content = crate::completion::Content::Parts(vec![
            Part::Text("abcdefgh".into()),
            Part::Image(png),
        ]);
        let r = request(
            Input::Chat(vec![m]),
            GenParams {
                response_format: Some(ResponseFormat::JsonObject),
                max_tokens: Some(10),
                ..GenParams::default()
            },
        );
        let n = Needs::of(&r, true);
        let caps: Vec<_> = n.capabilities.iter().collect();
        assert_eq!(
            caps,
            [Capability::Json, Capability::Streaming, Capability::Vision]
        );
        assert_eq!(n.tokens, 2 + TOKENS_PER_IMAGE + 10);
        let text_only = ModelInfo {
            capabilities: Some([Capability::Text, Capability::Json].into_iter().collect()),
            ..ModelInfo::default()
        };
        let why = n.unmet(&text_only).unwrap();
        assert!(why.contains("streaming, vision"), "{why}");
        assert_eq!(n.unmet(&ModelInfo::default()), None);
        let small = ModelInfo {
            context_window: Some(100),
            ..ModelInfo::default()
        };
        assert!(n.unmet(&small).unwrap().contains("context_window is 100"));
    }

    #[test]
    fn a_plain_request_needs_nothing_listed() {
        let r = request(Input::Prompt("hi".into()), GenParams::default());
        let n = Needs::of(&r, false);
        assert!(n.capabilities.is_empty());
        let listed = ModelInfo {
            capabilities: Some(Capabilities::default().with(Capability::Text)),
            context_window: Some(8),
            ..ModelInfo::default()
        };
        assert_eq!(n.unmet(&listed), None);
    }
}
