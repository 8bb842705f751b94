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
import base64
import json
import os
import sys

from openai import BadRequestError, NotFoundError, OpenAI


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
}


def tool_round_trip(client, model):
    """An agent's tool loop: the model calls a tool, the agent runs it and sends the result
    back, the model answers. Once whole, once streamed (tool-call deltas put together)."""
    out = {}
    for streamed in (False, True):
        messages = [{"role": "user", "content": "weather in Paris?"}]
        if streamed:
            calls = {}
            finish = None
            for chunk in client.chat.completions.create(
                model=model, messages=messages, tools=[WEATHER], stream=True
            ):
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish = choice.finish_reason or finish
                for d in choice.delta.tool_calls or []:
                    c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    c["id"] = d.id or c["id"]
                    if d.function:
                        c["name"] += d.function.name or ""
                        c["arguments"] += d.function.arguments or ""
            call = calls[0]
            messages.append({
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call["id"], "type": "function",
                                "function": {"name": call["name"], "arguments": call["arguments"]}}],
            })
        else:
            first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
            finish = first.choices[0].finish_reason
            message = first.choices[0].message
            c = message.tool_calls[0]
            call = {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            # The SDK's own message object goes back as the assistant turn, as agents do.
            messages.append(message)
        # The agent runs the tool and sends the result back.
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"})
        if streamed:
            pieces = [
                ch.choices[0].delta.content
                for ch in client.chat.completions.create(
                    model=model, messages=messages, tools=[WEATHER], stream=True)
                if ch.choices and ch.choices[0].delta.content
            ]
            final = "".join(pieces)
        else:
            final = client.chat.completions.create(
                model=model, messages=messages, tools=[WEATHER]).choices[0].message.content
        out["streamed" if streamed else "unary"] = {
            "name": call["name"],
            "arguments": json.loads(call["arguments"]),
            "id": call["id"],
            "finish_reason": finish,
            "final": final,
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8088/v1")
    p.add_argument("--model", default="simulated")
    p.add_argument("--fallback-model", help="a model whose first provider fails")
    p.add_argument("--tool-models", default="",
                   help="comma-separated models to run a tool round trip on (streamed and not)")
    p.add_argument("--vision-model", help="a text-only model: an image sent to it goes to a vision model")
    p.add_argument("--ca", help="a CA certificate (PEM) to trust: the router's HTTP front over TLS")
    p.add_argument("--report", action="store_true", help="print the results as JSON")
    args = p.parse_args()

    # The key is the router's client key when server.auth is on; any string otherwise.
    # Over TLS with a private CA, the SDK's HTTP client is told to trust it.
    extra = {}
    if args.ca:
        from openai import DefaultHttpxClient
        extra["http_client"] = DefaultHttpxClient(verify=args.ca)
    client = OpenAI(
        base_url=args.base_url,
        api_key=os.environ.get("CASCADE_ROUTER_KEY", "not-needed"),
        max_retries=0,
        timeout=30,
        **extra,
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

    out["tools"] = {m: tool_round_trip(client, m) for m in args.tool_models.split(",") if m}

    # JSON output, and a field no provider on the route takes (the SDK's extra_body).
    as_json = client.chat.completions.create(
        model=args.model, messages=said, response_format={"type": "json_object"})
    out["json"] = json.loads(as_json.choices[0].message.content)
    try:
        client.chat.completions.create(model=args.model, messages=said, extra_body={"top_k": 5})
        out["extra"] = None
    except BadRequestError as e:
        out["extra"] = {"status": e.status_code, "code": e.code, "message": e.message}

    if args.vision_model:
        # An image for a text-only model: the router walks fallback_chains.vision.
        png = base64.b64encode(b"\x89PNG\r\n\x1a\n a tiny picture").decode()
        raw = client.chat.completions.with_raw_response.create(
            model=args.vision_model,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            ]}],
        )
        out["vision"] = {
            "provider": raw.headers.get("x-cascade-provider"),
            "attempted": raw.headers.get("x-cascade-attempted"),
            "text": raw.parse().choices[0].message.content,
            "image": png,
        }

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
