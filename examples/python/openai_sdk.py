"""The official OpenAI Python SDK, pointed at cascade-router's OpenAI-compatible front.

Nothing router-specific is needed: set `base_url` to the router's `server.http_listen` (with
/v1) and call the SDK as usual. The router's own facts -- which provider answered, how many
failed first, whether it came from the cache -- are in the `x-cascade-*` response headers,
read here through `with_raw_response`.

    pip install openai
    cargo run --release -- serve --config cascade.yaml      # http_listen: 127.0.0.1:8088
    python3 examples/python/openai_sdk.py --model simulated

With `--report`, prints one JSON object with every result (the test suite reads it).
"""

import argparse
import json
import os
import sys

from openai import NotFoundError, OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8088/v1")
    p.add_argument("--model", default="simulated")
    p.add_argument("--fallback-model", help="a model whose first provider fails")
    p.add_argument("--report", action="store_true", help="print the results as JSON")
    args = p.parse_args()

    # The key is the router's client key when server.auth is on; any string otherwise.
    client = OpenAI(
        base_url=args.base_url,
        api_key=os.environ.get("CASCADE_ROUTER_KEY", "not-needed"),
        max_retries=0,
        timeout=30,
    )
    said = [{"role": "user", "content": "hello from the sdk"}]
    out = {}

    chat = client.chat.completions.create(model=args.model, messages=said)
    out["chat"] = chat.choices[0].message.content
    out["chat_usage"] = chat.usage.total_tokens if chat.usage else None

    text = client.completions.create(model=args.model, prompt="complete this")
    out["text"] = text.choices[0].text

    many = client.completions.create(model=args.model, prompt=["first prompt", "second prompt"])
    out["texts"] = [c.text for c in sorted(many.choices, key=lambda c: c.index)]

    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "stream to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.total_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    out["chat_stream"] = pieces
    out["chat_stream_usage"] = usage

    text_stream = client.completions.create(
        model=args.model, prompt="stream this text", stream=True
    )
    out["text_stream"] = [c.choices[0].text for c in text_stream if c.choices and c.choices[0].text]

    try:
        client.chat.completions.create(model="no-such-model", messages=said)
        out["not_found"] = None
    except NotFoundError as e:
        out["not_found"] = {"status": e.status_code, "code": e.code}

    if args.fallback_model:
        raw = client.chat.completions.with_raw_response.create(
            model=args.fallback_model, messages=said
        )
        out["fallback"] = {
            "attempts": raw.headers.get("x-cascade-attempts"),
            "attempted": raw.headers.get("x-cascade-attempted"),
            "provider": raw.headers.get("x-cascade-provider"),
            "text": raw.parse().choices[0].message.content,
        }

    out["models"] = [m.id for m in client.models.list()]

    if args.report:
        print(json.dumps(out))
    else:
        print("chat:        ", out["chat"])
        print("text:        ", out["text"])
        print("two prompts: ", out["texts"])
        print("chat stream: ", "".join(out["chat_stream"]), f"({len(pieces)} chunks)")
        print("text stream: ", "".join(out["text_stream"]))
        print("unknown model:", out["not_found"])
        if "fallback" in out:
            print("fallback:    ", out["fallback"])
        print("models:      ", ", ".join(out["models"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
