//! Routing by what a request needs, in the shape of the Python cascade router's file: a model
//! may list `capabilities` (text, tools, json, streaming, vision) and a `context_window`. A
//! request's needs are derived from what it carries; a candidate that lacks one, whose window
//! is too small, or whose provider's API cannot carry one of the request's fields is skipped
//! with no network attempt (attempt kind `unsupported`). When the route's own models lack a
//! capability, the file's `fallback_chains.<capability>` is walked after them, as the Python
//! router does. A model with no `capabilities` list is taken to have them all.

use std::{fmt, sync::Arc, time::Duration};

use crate::{
    cascade::Target,
    completion::{Attempt, CompletionRequest, FailureKind},
    error::RouterError,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    Text,
    Tools,
    Json,
    Streaming,
    Vision,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::Text,
        Capability::Tools,
        Capability::Json,
        Capability::Streaming,
        Capability::Vision,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Text => "text",
            Capability::Tools => "tools",
            Capability::Json => "json",
            Capability::Streaming => "streaming",
            Capability::Vision => "vision",
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of capabilities.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(u8);

impl Capabilities {
    pub fn with(self, c: Capability) -> Capabilities {
        Capabilities(self.0 | c.bit())
    }

    pub fn has(self, c: Capability) -> bool {
        self.0 & c.bit() != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL.into_iter().filter(move |c| self.has(*c))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(it: I) -> Capabilities {
        it.into_iter()
            .fold(Capabilities::default(), Capabilities::with)
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(Capability::as_str))
            .finish()
    }
}

/// What the cascade file says of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelInfo {
    /// `None`: no list given, so nothing is assumed missing.
    pub capabilities: Option<Capabilities>,
    pub context_window: Option<u32>,
}

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

/// The targets a request may go to, and those skipped for it (with why).
pub struct Plan {
    pub targets: Arc<[Target]>,
    pub skipped: Vec<Attempt>,
}

/// Filters `route` (then each `chains` entry for a capability the route lacks) down to the
/// targets that can take `request`; fails when none can, naming what is missing.
pub fn plan(
    route: &Arc<[Target]>,
    chains: &dyn Fn(Capability) -> Option<Arc<[Target]>>,
    request: &CompletionRequest,
    streaming: bool,
) -> Result<Plan, RouterError> {
    let needs = Needs::of(request, streaming);
    let refusal = |t: &Target| t.upstream.refuses(&t.model, request, &needs);
    // The common case, checked without allocating: every target can take it.
    if route.iter().all(|t| refusal(t).is_none()) {
        return Ok(Plan {
            targets: route.clone(),
            skipped: Vec::new(),
        });
    }
    let mut candidates: Vec<Target> = route.to_vec();
    for c in needs.capabilities.iter() {
        let lacking = |t: &Target| {
            t.upstream
                .model_info(&t.model)
                .capabilities
                .is_some_and(|have| !have.has(c))
        };
        if route.iter().any(lacking)
            && let Some(chain) = chains(c)
        {
            for t in chain.iter() {
                if !candidates.contains(t) {
                    candidates.push(t.clone());
                }
            }
        }
    }
    let mut targets = Vec::with_capacity(candidates.len());
    let mut skipped = Vec::new();
    for t in candidates {
        match refusal(&t) {
            None => targets.push(t),
            Some(why) => skipped.push(Attempt {
                provider: t.upstream.name().clone(),
                model: t.model.clone(),
                kind: FailureKind::Unsupported,
                http_status: None,
                error: why,
                tries: 0,
                elapsed: Duration::ZERO,
            }),
        }
    }
    if targets.is_empty() {
        return Err(RouterError::Unsupported {
            needs: describe(&needs),
            attempts: skipped,
        });
    }
    Ok(Plan {
        targets: targets.into(),
        skipped,
    })
}

/// The needs in words, for the error when nothing on the route meets them.
fn describe(needs: &Needs) -> String {
    let mut parts: Vec<&str> = needs.capabilities.iter().map(Capability::as_str).collect();
    let tokens = format!("about {} tokens of window", needs.tokens);
    parts.push(&tokens);
    parts.join(", ")
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
            context_window: None,
        };
        let why = n.unmet(&text_only).unwrap();
        assert!(why.contains("streaming, vision"), "{why}");
        assert_eq!(n.unmet(&ModelInfo::default()), None);
        let small = ModelInfo {
            capabilities: None,
            context_window: Some(100),
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
        };
        assert_eq!(n.unmet(&listed), None);
    }
}
