//! The completion cache: exact match on a hash of the canonical request, scoped to the
//! tenant unless `cache.scope: shared`, bounded in bytes (moka, TinyLFU admission), with an
//! optional Redis second level that several replicas share.
//!
//! Only deterministic requests are cached (temperature 0, or a seed); errors never are, since
//! only answers reach [`Cache::put`]. Redis is a guest, not a dependency ([`redis`]): a
//! failure is a miss, a Redis that keeps failing is skipped until a background probe finds it
//! back, and writes to it never hold up a caller.

mod redis;

use std::{sync::Arc, time::Duration};

use self::redis::Redis;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    completion::{
        Answer, ChatMessage, Completion, CompletionRequest, Content, Fingerprint, GenParams, Image,
        ImageSource, Input, Part, ToolCall, count_field,
    },
    config::{CacheConfig, CacheScope},
    metrics::CacheMetrics,
};

/// A blake3 hash of everything that shapes a completion, plus the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// `route` is the resolved model or chain name. Fields are length-prefixed so that no two
    /// different requests hash the same bytes; the request is destructured exhaustively so a
    /// new field fails to compile until the key accounts for it.
    pub fn new(tenant: &str, route: &str, request: &CompletionRequest) -> CacheKey {
        let CompletionRequest {
            model: _, // replaced by the resolved `route`
            input,
            params,
            agent: _,      // picks the model assignment, not the answer
            tenant: _,     // passed in when the cache is scoped per tenant
            request_id: _, // differs per call by design
            cache: _,      // how to use the cache, not what is asked
        } = request;
        let mut key = Fingerprint::default();
        let mut field = |bytes: &[u8]| key.field(bytes);
        field(b"cache v4");
        field(tenant.as_bytes());
        field(route.as_bytes());
        hash_input(input, &mut field);
        params.hash_into(&mut field);
        CacheKey(key.finish())
    }

    fn redis_key(&self) -> String {
        format!("cascade:v4:{}", blake3::Hash::from_bytes(self.0).to_hex())
    }
}

/// Feeds every part of `input` to `field`, destructured exhaustively; an image by its type
/// and bytes (or its URL), so two requests with the same picture share an answer.
pub fn hash_input(input: &Input, field: &mut impl FnMut(&[u8])) {
    match input {
        Input::Prompt(p) => {
            field(b"prompt");
            field(p.as_bytes());
        }
        Input::Chat(messages) => {
            field(b"chat");
            count_field(messages.len(), field);
            for ChatMessage {
                role,
                content,
                name,
                tool_calls,
                tool_call_id,
            } in messages
            {
                field(role.as_str().as_bytes());
                match content {
                    Content::Text(t) => {
                        field(b"text");
                        field(t.as_bytes());
                    }
                    Content::Parts(parts) => {
                        count_field(parts.len(), field);
                        for part in parts {
                            match part {
                                Part::Text(t) => {
                                    field(b"text");
                                    field(t.as_bytes());
                                }
                                Part::Image(Image { source, detail }) => {
                                    match source {
                                        ImageSource::Inline { mime, data } => {
                                            field(b"image");
                                            field(mime.as_bytes());
                                            field(data);
                                        }
                                        ImageSource::Url(url) => {
                                            field(b"image_url");
                                            field(url.as_bytes());
                                        }
                                    }
                                    field(detail.map_or("", |d| d.as_str()).as_bytes());
                                }
                            }
                        }
                    }
                }
                field(name.as_deref().map_or(&[0xff][..], str::as_bytes));
                count_field(tool_calls.len(), field);
                for ToolCall {
                    id,
                    name,
                    arguments,
                } in tool_calls
                {
                    field(id.as_bytes());
                    field(name.as_bytes());
                    field(arguments.as_bytes());
                }
                field(tool_call_id.as_deref().map_or(&[0xff][..], str::as_bytes));
            }
        }
    }
}

/// Whether a request's answer may be reused: temperature 0 or a fixed seed.
pub fn deterministic(p: &GenParams) -> bool {
    p.seed.is_some() || p.temperature == Some(0.0)
}

/// What is stored: the completion and who gave it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    completion: Completion,
    provider: Arc<str>,
    model: Arc<str>,
}

impl Entry {
    fn weight(&self) -> u32 {
        let c = &self.completion;
        // Key, Arc headers and struct overhead, plus the strings.
        let calls: usize = c
            .tool_calls
            .iter()
            .map(|t| 72 + t.id.len() + t.name.len() + t.arguments.len())
            .sum();
        let logprobs = c
            .logprobs
            .as_ref()
            .map_or(0, |l| serde_json::to_vec(l).map_or(0, |v| v.len() * 2));
        let bytes = 96
            + c.text.len()
            + c.finish_reason.len()
            + self.provider.len()
            + self.model.len()
            + calls
            + logprobs;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

#[derive(Clone)]
struct Timed {
    entry: Arc<Entry>,
    /// Checked on read with tokio's clock, so TTLs are exact under a paused test clock;
    /// moka's own TTL (on the std clock) reclaims the memory.
    expires: Instant,
}

pub struct Cache {
    /// Hashed by foldhash (seeded per process): the key is a blake3 hash already, and std's
    /// SipHash over it was ~270 instructions a look-up.
    memory: moka::sync::Cache<CacheKey, Timed, foldhash::fast::RandomState>,
    ttl: Duration,
    scope: CacheScope,
    redis: Option<Redis>,
    metrics: CacheMetrics,
}

impl Cache {
    pub fn new(config: &CacheConfig, metrics: CacheMetrics) -> Result<Cache, ::redis::RedisError> {
        let evictions = metrics.evictions();
        let memory = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_k, v: &Timed| v.entry.weight())
            .time_to_live(config.ttl)
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        let redis = config
            .redis
            .as_ref()
            .map(|c| Redis::new(c, config.max_redis_value_bytes, metrics.redis().clone()))
            .transpose()?;
        Ok(Cache {
            memory,
            ttl: config.ttl,
            scope: config.scope,
            redis,
            metrics,
        })
    }

    /// The key for `request` routed as `route`, scoped per the config.
    pub fn key(&self, route: &str, request: &CompletionRequest) -> CacheKey {
        let tenant = match self.scope {
            CacheScope::Tenant => request.tenant.as_str(),
            CacheScope::Shared => "",
        };
        CacheKey::new(tenant, route, request)
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Answer> {
        let now = Instant::now();
        if let Some(t) = self.memory.get(key) {
            if now < t.expires {
                self.metrics.hit();
                return Some(answer(&t.entry));
            }
            self.memory.invalidate(key);
        }
        // Boxed: Redis's call is a large state (~900 bytes) that every look-up's future, and
        // every future around it, would otherwise carry and copy, a memory hit included.
        if let Some(redis) = &self.redis
            && let Some(entry) = Box::pin(redis.get(key)).await
        {
            let entry = Arc::new(entry);
            self.insert_memory(*key, entry.clone());
            self.metrics.hit();
            return Some(answer(&entry));
        }
        self.metrics.miss();
        None
    }

    pub async fn put(&self, key: CacheKey, a: &Answer) {
        let entry = Arc::new(Entry {
            completion: a.completion.clone(),
            provider: a.provider.clone(),
            model: a.model.clone(),
        });
        self.insert_memory(key, entry.clone());
        if let Some(redis) = &self.redis {
            redis.put(&key, &entry, self.ttl);
        }
    }

    fn insert_memory(&self, key: CacheKey, entry: Arc<Entry>) {
        self.memory.insert(
            key,
            Timed {
                entry,
                expires: Instant::now() + self.ttl,
            },
        );
    }

    /// Entries held in memory (as of the last [`Cache::settle`]).
    pub fn entries(&self) -> u64 {
        self.memory.entry_count()
    }

    /// Bytes held in memory (as of the last [`Cache::settle`]).
    pub fn bytes(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// Settles moka's pending bookkeeping (evictions, weights) and updates the bytes gauge:
    /// done when metrics are read, not on every insert, so writes stay cheap (moka amortises
    /// the rest of its maintenance over reads and writes).
    pub fn settle(&self) {
        self.memory.run_pending_tasks();
        self.metrics.held(self.memory.weighted_size());
    }
}

fn answer(e: &Entry) -> Answer {
    Answer {
        completion: e.completion.clone(),
        provider: e.provider.clone(),
        model: e.model.clone(),
        attempts: Vec::new(),
        queue_wait: Duration::ZERO,
        upstream: Duration::ZERO,
        batch_size: 0,
        cached: true,
        cost: crate::completion::Cost::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::{CacheMode, ChatMessage, Role};

    fn req(agent: &str, prompt: &str) -> CompletionRequest {
        CompletionRequest {
            model: "m".into(),
            input: Input::Prompt(prompt.into()),
            params: GenParams {
                temperature: Some(0.0),
                ..GenParams::default()
            },
            agent: agent.into(),
            tenant: agent.into(),
            request_id: "r".into(),
            cache: CacheMode::Default,
        }
    }

    #[test]
    fn key_covers_every_field_and_separates_them() {
        let base = CacheKey::new("t", "m", &req("a", "hello"));
        assert_eq!(
            base,
            CacheKey::new("t", "m", &req("other agent", "hello")),
            "agent is not in the key itself"
        );
        assert_ne!(base, CacheKey::new("u", "m", &req("a", "hello")), "tenant");
        assert_ne!(base, CacheKey::new("t", "n", &req("a", "hello")), "route");
        assert_ne!(
            CacheKey::new("ab", "c", &req("a", "x")),
            CacheKey::new("a", "bc", &req("a", "x")),
            "separators"
        );
        let mut r = req("a", "hello");
        r.params.seed = Some(1);
        assert_ne!(base, CacheKey::new("t", "m", &r), "seed");
        let mut r = req("a", "hello");
        r.params.stop = vec!["x".into()];
        assert_ne!(base, CacheKey::new("t", "m", &r), "stop");
        let mut r = req("a", "hello");
        r.input = Input::Chat(vec![ChatMessage::text(Role::User, "hello")]);
        assert_ne!(base, CacheKey::new("t", "m", &r), "chat vs prompt");
    }

    fn answer_of(text: &str) -> Answer {
        Answer {
            completion: Completion::text(text.into(), "stop".into(), None),
            provider: "p".into(),
            model: "m".into(),
            attempts: vec![],
            queue_wait: Duration::ZERO,
            upstream: Duration::ZERO,
            batch_size: 1,
            cached: false,
            cost: crate::completion::Cost::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_ttl() {
        let config = CacheConfig {
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
            scope: CacheScope::Tenant,
            redis: None,
            max_redis_value_bytes: 1 << 20,
        };
        let metrics = CacheMetrics::default();
        let cache = Cache::new(&config, metrics.clone()).unwrap();
        let key = cache.key("m", &req("a", "q"));
        cache.put(key, &answer_of("A")).await;
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            cache.get(&key).await.map(|a| (a.completion.text, a.cached)),
            Some(("A".into(), true))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cache.get(&key).await.is_none());
        assert_eq!(metrics.hits_and_misses(), (1, 1));
    }
}
