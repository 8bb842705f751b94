//! Streamed answers: an upstream body read as it arrives, cut into lines, framed as
//! server-sent events (OpenAI, Anthropic) or newline-delimited JSON (Ollama), and each
//! payload handed to the provider's [`Decode`] — which turns it into text and says when the
//! answer is complete.
//!
//! Hand-written: the framing both APIs need is a line splitter with a bound on line length
//! and the `data:` field of SSE; the SSE crates bring a parser-combinator dependency for the
//! same forty lines and know nothing of NDJSON.
//!
//! A body that ends before the API's end marker (`[DONE]`, `"done": true`,
//! `message_stop`) is an error, never a short answer taken for a whole one.

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream::BoxStream};

use super::ProviderError;
use crate::completion::{Completion, FailureKind, StreamEvent, ToolCall, ToolCallDelta, Usage};

/// Longest line (one event's payload) read; a longer one is malformed.
const MAX_LINE: usize = 1 << 20;

/// A provider's streamed answer. Dropping it closes the upstream request.
pub type EventStream = BoxStream<'static, Result<StreamEvent, ProviderError>>;

/// How a body is cut into payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events: the `data:` lines of each event, joined.
    Sse,
    /// One JSON document per line.
    Ndjson,
}

/// What one payload said.
#[derive(Debug, Default, PartialEq)]
pub struct Read {
    /// Text to pass on (empty: none).
    pub text: String,
    /// Pieces of tool calls to pass on, after the text.
    pub tool_calls: Vec<ToolCallDelta>,
    /// The answer is complete.
    pub end: bool,
}

impl Read {
    pub fn text(text: String) -> Read {
        Read {
            text,
            ..Read::default()
        }
    }

    pub fn end() -> Read {
        Read {
            end: true,
            ..Read::default()
        }
    }
}

/// One API's streamed payloads.
pub trait Decode: Send + 'static {
    fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError>;
    /// How the answer ended, once [`Decode::read`] said it did.
    fn finish(self) -> (String, Option<Usage>);
}

/// The events of `body` (chunks as they arrive), framed by `framing` and read by `decoder`.
pub fn events<D: Decode>(
    body: impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static,
    framing: Framing,
    decoder: D,
) -> EventStream {
    let state = Framer {
        body: Some(body.boxed()),
        buf: Vec::new(),
        data: Vec::new(),
        framing,
        decoder: Some(decoder),
        ready: VecDeque::new(),
        texts: 0,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        let next = st.next().await?;
        Some((next, st))
    })
    .boxed()
}

/// A streamed answer read to its end as one completion: text joined, tool calls put together
/// from their pieces in the order of their index. A unary call sent upstream as a stream (so
/// that a caller who goes stops the generation) answers as the unary request would.
pub async fn assemble(mut events: EventStream) -> Result<Completion, ProviderError> {
    let mut text = String::new();
    let mut calls: Vec<(u32, ToolCall)> = Vec::new();
    while let Some(event) = events.next().await {
        match event? {
            StreamEvent::Text(t) => text.push_str(&t),
            StreamEvent::ToolCall(piece) => {
                let at = match calls.iter().position(|(i, _)| *i == piece.index) {
                    Some(at) => at,
                    None => {
                        calls.push((
                            piece.index,
                            ToolCall {
                                id: String::new(),
                                name: String::new(),
                                arguments: String::new(),
                            },
                        ));
                        calls.len() - 1
                    }
                };
                let call = &mut calls[at].1;
                if let Some(id) = piece.id {
                    call.id = id;
                }
                if let Some(name) = piece.name {
                    call.name = name;
                }
                call.arguments.push_str(&piece.arguments);
            }
            StreamEvent::End {
                finish_reason,
                usage,
            } => {
                calls.sort_by_key(|(i, _)| *i);
                return Ok(Completion {
                    text,
                    finish_reason,
                    usage,
                    tool_calls: calls.into_iter().map(|(_, c)| c).collect(),
                    logprobs: None,
                });
            }
        }
    }
    // `events` ends with `End` or an error; a stream of another making might not.
    Err(ProviderError::new(
        FailureKind::Io,
        "the stream ended before its end marker",
    ))
}

/// A response's body as a stream of chunks, transport errors classified.
pub fn body(resp: reqwest::Response) -> impl Stream<Item = Result<Bytes, ProviderError>> + Send {
    futures_util::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match resp.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(resp))),
            Ok(None) => None,
            Err(e) => Some((Err(super::http::transport_error(e)), None)),
        }
    })
}

struct Framer<D> {
    /// `None` once the body ended or failed.
    body: Option<BoxStream<'static, Result<Bytes, ProviderError>>>,
    /// Bytes read but not yet cut into lines.
    buf: Vec<u8>,
    /// The `data:` lines of the SSE event being read.
    data: Vec<u8>,
    framing: Framing,
    /// `None` once the answer ended.
    decoder: Option<D>,
    ready: VecDeque<Result<StreamEvent, ProviderError>>,
    /// Text events passed on, for the error that says where a stream broke.
    texts: usize,
}

impl<D: Decode> Framer<D> {
    async fn next(&mut self) -> Option<Result<StreamEvent, ProviderError>> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            self.decoder.as_ref()?;
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line(&line);
                continue;
            }
            if self.buf.len() > MAX_LINE {
                self.fail(ProviderError::new(
                    FailureKind::Malformed,
                    format!("a streamed line over {MAX_LINE} bytes"),
                ));
                continue;
            }
            let body = self.body.as_mut()?;
            match body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => self.fail(e),
                None => {
                    self.body = None;
                    // A last line without its newline, then the blank line that ends an event.
                    let rest = std::mem::take(&mut self.buf);
                    if !rest.is_empty() {
                        self.line(&rest);
                    }
                    self.line(b"");
                    if self.decoder.is_some() {
                        let texts = self.texts;
                        self.fail(ProviderError::new(
                            FailureKind::Io,
                            format!("the stream ended before its end marker, after {texts} chunks"),
                        ));
                    }
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        match self.framing {
            Framing::Ndjson => {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    self.payload(line);
                }
            }
            Framing::Sse => {
                if line.is_empty() {
                    if !self.data.is_empty() {
                        let data = std::mem::take(&mut self.data);
                        self.payload(&data);
                    }
                } else if let Some(value) = line.strip_prefix(b"data:") {
                    if !self.data.is_empty() {
                        self.data.push(b'\n');
                    }
                    self.data
                        .extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
                    if self.data.len() > MAX_LINE {
                        self.fail(ProviderError::new(
                            FailureKind::Malformed,
                            format!("a streamed event over {MAX_LINE} bytes"),
                        ));
                    }
                }
                // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing we need:
                // the APIs name each event's type inside its data too.
            }
        }
    }

    fn payload(&mut self, payload: &[u8]) {
        let Some(decoder) = self.decoder.as_mut() else {
            return;
        };
        match decoder.read(payload) {
            Err(e) => self.fail(e),
            Ok(read) => {
                if !read.text.is_empty() {
                    self.texts += 1;
                    self.ready.push_back(Ok(StreamEvent::Text(read.text)));
                }
                for call in read.tool_calls {
                    self.texts += 1;
                    self.ready.push_back(Ok(StreamEvent::ToolCall(call)));
                }
                if read.end
                    && let Some(decoder) = self.decoder.take()
                {
                    let (finish_reason, usage) = decoder.finish();
                    self.ready.push_back(Ok(StreamEvent::End {
                        finish_reason,
                        usage,
                    }));
                    self.body = None;
                }
            }
        }
    }

    /// Ends the stream with `e` after what is already read.
    fn fail(&mut self, e: ProviderError) {
        if self.decoder.take().is_some() {
            self.ready.push_back(Err(e));
        }
        self.body = None;
    }
}

/// A mid-stream error object's short code, as [`super::http`] quotes error bodies.
pub fn stream_error(code: Option<&str>) -> ProviderError {
    let code = code.filter(|c| {
        !c.is_empty()
            && c.len() <= 64
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'))
    });
    ProviderError::new(
        FailureKind::ServerError,
        match code {
            Some(c) => format!("the provider sent an error mid-stream ({c})"),
            None => "the provider sent an error mid-stream".to_string(),
        },
    )
}

/// A payload that is not the JSON the API promises.
pub fn malformed(e: &serde_json::Error) -> ProviderError {
    ProviderError::new(
        FailureKind::Malformed,
        format!("unexpected streamed JSON: {e}"),
    )
}

/// Reads `chunks` as a body would arrive, through `decoder` (for tests and fuzzing).
#[cfg(any(test, feature = "fuzzing"))]
pub async fn read_all<D: Decode>(
    chunks: Vec<Vec<u8>>,
    framing: Framing,
    decoder: D,
) -> Vec<Result<StreamEvent, ProviderError>> {
    let body = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
    events(body, framing, decoder).collect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes every payload on as text; `END` ends.
    struct Echo;

    impl Decode for Echo {
        fn read(&mut self, payload: &[u8]) -> Result<Read, ProviderError> {
            Ok(match payload {
                b"END" => Read::end(),
                p => Read::text(String::from_utf8_lossy(p).into_owned()),
            })
        }

        fn finish(self) -> (String, Option<Usage>) {
            ("stop".into(), None)
        }
    }

    fn texts(events: &[Result<StreamEvent, ProviderError>]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(StreamEvent::Text(t)) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn split(body: &[u8], at: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut from = 0;
        for &a in at {
            let a = a.min(body.len()).max(from);
            out.push(body[from..a].to_vec());
            from = a;
        }
        out.push(body[from..].to_vec());
        out
    }

    #[tokio::test]
    async fn sse_events_however_the_bytes_are_cut() {
        let body = b": comment\r\nevent: x\ndata: one\n\ndata: two\ndata: lines\n\ndata:END\n\n";
        for cut in 0..body.len() {
            let got = read_all(split(body, &[cut, cut + 3]), Framing::Sse, Echo).await;
            assert_eq!(texts(&got), ["one", "two\nlines"], "cut at {cut}");
            assert!(
                matches!(got.last(), Some(Ok(StreamEvent::End { .. }))),
                "{got:?}"
            );
        }
    }

    #[tokio::test]
    async fn ndjson_lines_and_a_last_line_without_newline() {
        let got = read_all(
            vec![b"a\n\nb\nEN".to_vec(), b"D".to_vec()],
            Framing::Ndjson,
            Echo,
        )
        .await;
        assert_eq!(texts(&got), ["a", "b"]);
        assert!(matches!(got.last(), Some(Ok(StreamEvent::End { .. }))));
    }

    #[tokio::test]
    async fn a_body_ending_before_its_end_marker_is_an_error() {
        let got = read_all(vec![b"data: one\n\ndata: tw".to_vec()], Framing::Sse, Echo).await;
        assert_eq!(texts(&got), ["one", "tw"], "what arrived is passed on");
        match got.last() {
            Some(Err(e)) => {
                assert_eq!(e.kind, FailureKind::Io);
                assert!(e.message.contains("after 2 chunks"), "{}", e.message);
            }
            other => panic!("expected an error at the end, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn nothing_after_the_end_marker_is_read() {
        let got = read_all(
            vec![b"data: END\n\ndata: more\n\n".to_vec()],
            Framing::Sse,
            Echo,
        )
        .await;
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[tokio::test]
    async fn an_endless_line_is_refused() {
        let got = read_all(vec![vec![b'x'; MAX_LINE + 10]], Framing::Ndjson, Echo).await;
        assert!(
            matches!(got.as_slice(), [Err(e)] if e.kind == FailureKind::Malformed),
            "{got:?}"
        );
    }
}
