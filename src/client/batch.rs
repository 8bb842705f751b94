//! `cascade-router batch`: a JSONL file of prompts through the router, one answer line per
//! input line, in input order.
//!
//! Input lines are `{"id": ..., "prompt": ... | "messages": [...], "max_tokens", "temperature",
//! "top_p", "stop", "seed", "tools", "tool_choice", "response_format", "agent", "model"}` (all
//! but the prompt optional; messages, tools and formats in OpenAI's shape); a line that is not
//! a JSON object is a prompt whose id is its line number. Duplicate ids are refused before
//! anything is sent. Lines go in CompleteBatch chunks, a bounded
//! number in flight; answers come back in order (a `FuturesOrdered`), so memory holds at most
//! `concurrency × chunk` of them. Each output line is the input's `id` with the answer, or
//! with `error: {code, message}` — a failed or malformed line never stops the run. With
//! `resume`, ids already in the output file are skipped (a line cut short by a kill is
//! dropped first, and so are answers that were transient errors — UNAVAILABLE,
//! DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED — which are asked again), so an interrupted run
//! continues where it stopped.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::FuturesOrdered};
use serde::Deserialize;
use serde_json::Value;

use super::{Client, ClientError, code_name, openai_json, response_json};
use crate::proto::v1;

pub struct Options {
    pub input: PathBuf,
    /// Answers go here (appended to with `resume`); stdout when `None`.
    pub output: Option<PathBuf>,
    pub resume: bool,
    /// CompleteBatch calls in flight at most.
    pub concurrency: usize,
    /// Prompts per CompleteBatch call.
    pub chunk: usize,
    /// For lines that name none.
    pub model: Option<String>,
    pub agent: Option<String>,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

/// What a run did, printed on stderr at the end.
#[derive(Debug, Default)]
pub struct Summary {
    pub lines: usize,
    /// Lines whose id was already answered in the output file (`resume`).
    pub skipped: usize,
    pub answered: usize,
    pub failed: BTreeMap<&'static str, usize>,
    pub cached: usize,
    pub by_provider: BTreeMap<String, usize>,
    pub elapsed: Duration,
    /// Stopped by Ctrl-C before every line was sent.
    pub interrupted: bool,
}

impl Summary {
    fn failures(&self) -> usize {
        self.failed.values().sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let done = self.answered + self.failures();
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{done} of {} lines in {secs:.2} s ({:.0}/s): {} answered ({} from the cache), {} failed",
            self.lines,
            done as f64 / secs.max(1e-9),
            self.answered,
            self.cached,
            self.failures()
        )?;
        if !self.failed.is_empty() {
            let by: Vec<String> = self
                .failed
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            write!(f, " ({})", by.join(", "))?;
        }
        if self.skipped > 0 {
            write!(f, "; {} already in the output", self.skipped)?;
        }
        if !self.by_provider.is_empty() {
            let by: Vec<String> = self
                .by_provider
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect();
            write!(f, "; by provider: {}", by.join(", "))?;
        }
        if self.interrupted {
            write!(f, "; interrupted: run again with --resume to finish")?;
        }
        Ok(())
    }
}

/// A JSON input line: a prompt or OpenAI-shaped messages, with the request's fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    #[serde(rename = "id")]
    _id: Option<Value>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    #[serde(default)]
    stop: Vec<String>,
    seed: Option<i64>,
    agent: Option<String>,
    model: Option<String>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
}

/// One input line: its id, and the request or why it is not one.
struct Line {
    id: Value,
    request: Result<v1::CompleteRequest, String>,
}

/// The id's canonical text, to match ids across runs.
fn key(id: &Value) -> String {
    id.to_string()
}

impl Options {
    fn line(&self, number: usize, text: &str) -> Option<Line> {
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return None;
        }
        let defaults = |model: Option<String>, agent: Option<String>| v1::CompleteRequest {
            model: model.or_else(|| self.model.clone()).unwrap_or_default(),
            agent: agent.or_else(|| self.agent.clone()).unwrap_or_default(),
            ..Default::default()
        };
        if !text.trim_start().starts_with('{') {
            return Some(Line {
                id: Value::from(number),
                request: Ok(v1::CompleteRequest {
                    prompt: text.to_string(),
                    ..defaults(None, None)
                }),
            });
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                return Some(Line {
                    id: Value::from(number),
                    request: Err(format!("line {number} is not a prompt object: {e}")),
                });
            }
        };
        // A line the router or this reader refuses is still reported under its own id.
        let id = line_id(&value, number);
        let parsed: InputLine = match serde_json::from_value(value) {
            Ok(l) => l,
            Err(e) => {
                return Some(Line {
                    id,
                    request: Err(format!("line {number} is not a prompt object: {e}")),
                });
            }
        };
        let request = match (parsed.prompt, parsed.messages) {
            (Some(prompt), None) => Ok(prompt),
            (None, Some(m)) => Err(m),
            _ => {
                return Some(Line {
                    id,
                    request: Err(format!(
                        "line {number}: give exactly one of \"prompt\" and \"messages\""
                    )),
                });
            }
        };
        let mut r = defaults(parsed.model, parsed.agent);
        let shaped = (|| -> Result<(), String> {
            match request {
                Ok(prompt) => r.prompt = prompt,
                Err(messages) => {
                    r.messages = messages
                        .iter()
                        .enumerate()
                        .map(|(i, m)| openai_json::message(m, &format!("messages[{i}]")))
                        .collect::<Result<_, _>>()?;
                }
            }
            if let Some(t) = &parsed.tools {
                r.tools = openai_json::tools(t, "tools")?;
            }
            if let Some(c) = &parsed.tool_choice {
                r.tool_choice = Some(openai_json::tool_choice(c, "tool_choice")?);
            }
            if let Some(f) = &parsed.response_format {
                r.response_format = Some(openai_json::response_format(f, "response_format")?);
            }
            Ok(())
        })();
        if let Err(why) = shaped {
            return Some(Line {
                id,
                request: Err(format!("line {number}: {why}")),
            });
        }
        r.max_tokens = parsed.max_tokens;
        r.temperature = parsed.temperature;
        r.top_p = parsed.top_p;
        r.frequency_penalty = parsed.frequency_penalty;
        r.presence_penalty = parsed.presence_penalty;
        r.parallel_tool_calls = parsed.parallel_tool_calls;
        r.stop = parsed.stop;
        r.seed = parsed.seed;
        Some(Line { id, request: Ok(r) })
    }
}

/// A line's id: its `id` field, else its line number.
fn line_id(value: &Value, number: usize) -> Value {
    value
        .get("id")
        .filter(|id| !id.is_null())
        .cloned()
        .unwrap_or(Value::from(number))
}

/// The id a non-empty input line answers under, without reading the rest of it.
fn id_of(number: usize, text: &str) -> Value {
    let text = text.trim();
    if text.starts_with('{')
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        return line_id(&v, number);
    }
    Value::from(number)
}

/// Codes of an answer worth asking again on `--resume`: the router or a provider was away,
/// out of time or full, not the request at fault.
const TRANSIENT: [&str; 3] = ["UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"];

/// The ids answered in an earlier run's output. The output is rewritten without what is to
/// be asked again: a last line left incomplete by a kill, and answers that were transient
/// errors ([`TRANSIENT`]).
fn answered_ids(path: &PathBuf) -> io::Result<HashSet<String>> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let transient = |v: &Value| {
        v["error"]["code"]
            .as_str()
            .is_some_and(|c| TRANSIENT.contains(&c))
    };
    let mut kept = Vec::with_capacity(complete);
    let mut ids = HashSet::new();
    for line in bytes[..complete].split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if transient(&v) {
            continue;
        }
        if let Some(id) = v.get("id") {
            ids.insert(key(id));
        }
        kept.extend_from_slice(line);
        kept.push(b'\n');
    }
    if kept.len() < bytes.len() {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&kept)?;
    }
    Ok(ids)
}

/// Writes answer lines and keeps the tally.
struct Sink {
    out: Box<dyn Write>,
    summary: Summary,
    bar: indicatif::ProgressBar,
}

impl Sink {
    fn answer(&mut self, id: Value, r: &v1::CompleteResponse) -> io::Result<()> {
        self.summary.answered += 1;
        self.summary.cached += usize::from(r.cached);
        *self
            .summary
            .by_provider
            .entry(r.provider.clone())
            .or_default() += 1;
        let mut line = response_json(r);
        if let Some(obj) = line.as_object_mut() {
            obj.insert("id".into(), id);
        }
        self.write(&line)
    }

    fn error(&mut self, id: Value, code: tonic::Code, message: &str) -> io::Result<()> {
        let name = code_name(code);
        *self.summary.failed.entry(name).or_default() += 1;
        self.write(&serde_json::json!({
            "id": id,
            "error": {"code": name, "message": message},
        }))
    }

    fn write(&mut self, line: &Value) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")?;
        self.bar.inc(1);
        Ok(())
    }

    /// One chunk's lines with the router's answer to the ones that were sent.
    fn chunk(
        &mut self,
        lines: Vec<Line>,
        answer: Result<Vec<v1::BatchResult>, tonic::Status>,
    ) -> io::Result<()> {
        let sent = lines.iter().filter(|l| l.request.is_ok()).count();
        let mut results = match answer {
            Ok(r) if r.len() == sent => Ok(r.into_iter()),
            Ok(r) => Err(tonic::Status::internal(format!(
                "the router answered {} results for {sent} requests",
                r.len()
            ))),
            Err(s) => Err(s),
        };
        for line in lines {
            if let Err(why) = &line.request {
                self.error(line.id, tonic::Code::InvalidArgument, why)?;
                continue;
            }
            match &mut results {
                Err(status) => self.error(line.id, status.code(), status.message())?,
                Ok(it) => match it.next().and_then(|r| r.result) {
                    Some(v1::batch_result::Result::Response(r)) => self.answer(line.id, &r)?,
                    Some(v1::batch_result::Result::Error(e)) => {
                        self.error(line.id, tonic::Code::from(e.code), &e.message)?;
                    }
                    None => self.error(line.id, tonic::Code::Internal, "empty result")?,
                },
            }
        }
        self.out.flush()
    }
}

/// Runs the file through the router until every line is answered or `stop` resolves
/// (then the calls in flight finish and are written, and nothing more is sent).
pub async fn run(
    client: &Client,
    opts: &Options,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Summary, ClientError> {
    let io_err = |what: &str, e: io::Error| ClientError::Io(format!("{what}: {e}"));
    let open_input = || {
        File::open(&opts.input)
            .map(BufReader::new)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", opts.input.display())))
    };
    // One pass to count the lines (for the progress bar) and find duplicate ids, which would
    // make the output ambiguous and `--resume` skip the wrong line.
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut lines = 0;
    for (i, text) in open_input()?.lines().map_while(Result::ok).enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        lines += 1;
        let id = id_of(i + 1, &text);
        if let Some(first) = seen.insert(key(&id), i + 1) {
            return Err(ClientError::Usage(format!(
                "{}: lines {first} and {} have the same id {id}; give every line its own id",
                opts.input.display(),
                i + 1
            )));
        }
    }
    let done = match (&opts.output, opts.resume) {
        (Some(path), true) => answered_ids(path).map_err(|e| io_err("reading the output", e))?,
        (None, true) => {
            return Err(ClientError::Usage(
                "--resume needs --output: the file to continue".into(),
            ));
        }
        _ => HashSet::new(),
    };
    let out: Box<dyn Write> = match &opts.output {
        Some(path) => Box::new(BufWriter::new(
            OpenOptions::new()
                .create(true)
                .append(opts.resume)
                .write(true)
                .truncate(!opts.resume)
                .open(path)
                .map_err(|e| io_err(&path.display().to_string(), e))?,
        )),
        None => Box::new(BufWriter::new(io::stdout())),
    };
    let bar = if opts.progress && std::io::IsTerminal::is_terminal(&io::stderr()) {
        let bar = indicatif::ProgressBar::new(lines as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} lines, {per_sec}, eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut sink = Sink {
        out,
        summary: Summary {
            lines,
            ..Summary::default()
        },
        bar,
    };
    let started = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    let mut chunk: Vec<Line> = Vec::with_capacity(opts.chunk);
    let mut input = open_input()?.lines().enumerate();
    tokio::pin!(stop);
    let mut stopped = false;
    loop {
        // Room for another call: fill a chunk from the input.
        let mut exhausted = false;
        while !stopped
            && in_flight.len() < opts.concurrency.max(1)
            && chunk.len() < opts.chunk.max(1)
        {
            match input.next() {
                None => {
                    exhausted = true;
                    break;
                }
                Some((i, text)) => {
                    let text = text.map_err(|e| io_err("reading the input", e))?;
                    let Some(line) = opts.line(i + 1, &text) else {
                        continue;
                    };
                    if done.contains(&key(&line.id)) {
                        sink.summary.skipped += 1;
                        sink.bar.inc(1);
                        continue;
                    }
                    chunk.push(line);
                }
            }
        }
        if !stopped && (chunk.len() >= opts.chunk.max(1) || (exhausted && !chunk.is_empty())) {
            let lines = std::mem::take(&mut chunk);
            let requests: Vec<v1::CompleteRequest> = lines
                .iter()
                .filter_map(|l| l.request.as_ref().ok().cloned())
                .collect();
            let mut client = client.clone();
            in_flight.push_back(async move {
                let answer = if requests.is_empty() {
                    Ok(Vec::new())
                } else {
                    client.complete_batch(requests).await
                };
                (lines, answer)
            });
            continue;
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            () = &mut stop, if !stopped => {
                stopped = true;
                sink.summary.interrupted = true;
            }
            Some((lines, answer)) = in_flight.next() => {
                sink.chunk(lines, answer).map_err(|e| io_err("writing the output", e))?;
            }
        }
    }
    sink.bar.finish_and_clear();
    sink.summary.elapsed = started.elapsed();
    Ok(sink.summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            input: PathBuf::new(),
            output: None,
            resume: false,
            concurrency: 1,
            chunk: 1,
            model: Some("m".into()),
            agent: None,
            progress: false,
        }
    }

    #[test]
    fn plain_json_and_malformed_lines() {
        let o = opts();
        let plain = o.line(3, "summarise this\r").unwrap();
        assert_eq!(plain.id, Value::from(3));
        let r = plain.request.unwrap();
        assert_eq!(
            (r.prompt.as_str(), r.model.as_str()),
            ("summarise this", "m")
        );

        let json = o
            .line(4, r#"{"id": "t-1", "messages": [{"role": "user", "content": "hi"}], "model": "x", "max_tokens": 5}"#)
            .unwrap();
        assert_eq!(json.id, Value::from("t-1"));
        let r = json.request.unwrap();
        assert_eq!(
            (r.model.as_str(), r.max_tokens, r.messages.len()),
            ("x", Some(5), 1)
        );

        let bad = o
            .line(5, r#"{"id": 9, "prompt": "a", "promt": "b"}"#)
            .unwrap();
        assert_eq!(
            bad.id,
            Value::from(9),
            "a line this reader refuses keeps its own id"
        );
        assert!(bad.request.unwrap_err().contains("line 5"));

        let both = o.line(6, r#"{"prompt": "a", "messages": []}"#).unwrap();
        assert!(both.request.unwrap_err().contains("exactly one"));
        assert!(o.line(7, "   ").is_none());
    }

    #[test]
    fn resume_drops_a_cut_line_and_reads_the_ids() {
        let path = std::env::temp_dir().join(format!("batch-resume-{}.jsonl", std::process::id()));
        std::fs::write(
            &path,
            "{\"id\":1,\"text\":\"a\"}\n{\"id\":\"x\",\"error\":{}}\n{\"id\":3,\"te",
        )
        .unwrap();
        let ids = answered_ids(&path).unwrap();
        assert_eq!(ids, HashSet::from(["1".to_string(), "\"x\"".to_string()]));
        let left = std::fs::read_to_string(&path).unwrap();
        assert!(left.ends_with("}\n"), "the cut line is gone: {left:?}");
        let _ = std::fs::remove_file(&path);
    }
}
