//! What the cascade file says a model can do: its `capabilities` and `context_window`.

use std::fmt;

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
    /// `None`: free (a local or simulated model unless priced).
    pub price: Option<super::Price>,
}
