#!/usr/bin/env python3
"""A small Python client for cascade-router: Complete, CompleteBatch, a deadline, and what an
agent does with each status code it can get back.

Needs grpcio and grpcio-tools (`pip install grpcio grpcio-tools`). The stubs are generated
from ../../proto at first use into ./_gen (not committed), so they always match the proto.

    python3 examples/python/client.py --addr 127.0.0.1:50051            # a short demo
    python3 examples/python/client.py --addr 127.0.0.1:50051 --report   # JSON, for the tests

With authentication on, set CASCADE_ROUTER_KEY.
"""

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
GEN = os.path.join(HERE, "_gen")


def load_stubs():
    """Generates the stubs from proto/ with grpcio-tools if they are missing or older."""
    proto = os.path.join(PROTO_ROOT, "cascade", "v1", "router.proto")
    out = os.path.join(GEN, "cascade", "v1", "router_pb2.py")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(proto):
        from grpc_tools import protoc

        os.makedirs(GEN, exist_ok=True)
        code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={GEN}",
                            f"--grpc_python_out={GEN}", proto])
        if code != 0:
            sys.exit(f"protoc failed ({code}) on {proto}")
    sys.path.insert(0, GEN)
    from cascade.v1 import router_pb2, router_pb2_grpc  # noqa: E402

    return router_pb2, router_pb2_grpc


import grpc  # noqa: E402

pb, pb_grpc = load_stubs()

# What an agent does with each code (see the README's status table).
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
FIX_THE_REQUEST = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.OUT_OF_RANGE}
FIX_THE_KEY = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def metadata():
    key = os.environ.get("CASCADE_ROUTER_KEY")
    return [("authorization", f"Bearer {key}")] if key else []


def retry_after(err):
    """The router's retry hint (a `retry-after` trailer, seconds) when it sent one."""
    for k, v in (err.trailing_metadata() or ()):
        if k == "retry-after":
            try:
                return float(v)
            except ValueError:
                pass
    return None


def complete(stub, request, timeout=30.0, tries=3):
    """One completion, acting on the status: retry UNAVAILABLE and RESOURCE_EXHAUSTED with
    backoff (honouring retry-after), give up at once on what retrying cannot fix."""
    delay = 0.2
    for attempt in range(tries):
        try:
            return stub.Complete(request, timeout=timeout, metadata=metadata())
        except grpc.RpcError as err:
            code = err.code()
            if code in RETRY and attempt + 1 < tries:
                time.sleep(retry_after(err) or delay * (1 + random.random()))
                delay *= 2
                continue
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise  # the caller's time is gone; its loop decides (skip, or ask with more)
            if code in FIX_THE_REQUEST or code in FIX_THE_KEY:
                raise  # a bad model name, prompt or key: retrying the same call cannot help
            raise


def report(stub, tool_models):
    """Every path the example shows, as one JSON object (the CI test checks it)."""
    out = {}
    r = complete(stub, pb.CompleteRequest(model="m", prompt="hello from python"))
    out["complete"] = {"text": r.text, "provider": r.provider, "model": r.model}

    batch = pb.CompleteBatchRequest(requests=[
        pb.CompleteRequest(model="m", prompt=f"batch item {i}") for i in range(5)])
    results = stub.CompleteBatch(batch, timeout=30, metadata=metadata()).results
    out["batch"] = [r.response.text if r.WhichOneof("result") == "response"
                    else {"code": r.error.code, "message": r.error.message} for r in results]

    def code_of(request, timeout):
        try:
            complete(stub, request, timeout=timeout, tries=1)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    out["deadline"] = code_of(pb.CompleteRequest(model="slow", prompt="take your time"), 0.3)
    out["unknown_model"] = code_of(pb.CompleteRequest(model="no-such-model", prompt="x"), 5)
    out["empty_prompt"] = code_of(pb.CompleteRequest(model="m"), 5)
    out["tool_round_trip"] = {m: tool_round_trip(stub, m) for m in tool_models}
    return out


WEATHER = pb.Tool(
    name="get_weather",
    description="The weather in a city",
    parameters_json=json.dumps({"type": "object", "properties": {"text": {"type": "string"}},
                                "required": ["text"]}),
)


def tool_round_trip(stub, model):
    """An agent's tool loop over gRPC: the model calls a tool, the agent runs it and sends the
    result back (an assistant message with the call, a tool message with its id), the model
    answers in text."""
    messages = [pb.ChatMessage(role="user", content="weather in Paris?")]
    first = complete(stub, pb.CompleteRequest(model=model, messages=messages, tools=[WEATHER]))
    call = first.tool_calls[0]
    messages.append(pb.ChatMessage(role="assistant", tool_calls=[call]))
    messages.append(pb.ChatMessage(role="tool", tool_call_id=call.id, content="sunny, 21 C"))
    final = complete(stub, pb.CompleteRequest(model=model, messages=messages, tools=[WEATHER]))
    out = {"name": call.name, "arguments": json.loads(call.arguments),
           "finish_reason": first.finish_reason, "final": final.text}

    # The same, streamed: tool-call pieces put together by index, then the answer's text.
    asked = pb.CompleteRequest(model=model, messages=messages[:1], tools=[WEATHER])
    calls, end = {}, None
    for m in stub.CompleteStream(asked, timeout=30, metadata=metadata()):
        for d in m.tool_calls:
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            c["id"] = d.id or c["id"]
            c["name"] += d.name
            c["arguments"] += d.arguments
        if m.HasField("end"):
            end = m.end
    c = calls[0]
    streamed = [messages[0],
                pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(**c)]),
                pb.ChatMessage(role="tool", tool_call_id=c["id"], content="sunny, 21 C")]
    text = "".join(m.text for m in stub.CompleteStream(
        pb.CompleteRequest(model=model, messages=streamed, tools=[WEATHER]),
        timeout=30, metadata=metadata()))
    out["streamed"] = {"name": c["name"], "arguments": json.loads(c["arguments"]),
                       "finish_reason": end.finish_reason if end else None, "final": text}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the router")
    ap.add_argument("--report", action="store_true", help="print what every call returned, as JSON")
    ap.add_argument("--tool-models", default="m", help="models to run the tool round trip on")
    args = ap.parse_args()
    with grpc.insecure_channel(args.addr) as channel:
        stub = pb_grpc.RouterStub(channel)
        if args.report:
            print(json.dumps(report(stub, [m for m in args.tool_models.split(",") if m])))
            return
        r = complete(stub, pb.CompleteRequest(prompt="Say hello in five words."))
        print(f"{r.provider}/{r.model}: {r.text}")


if __name__ == "__main__":
    main()
