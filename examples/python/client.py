#!/usr/bin/env python3
"""Stream a completion from Tandem over gRPC, from Python.

    pip install grpcio grpcio-tools
    python3 examples/python/client.py --addr 127.0.0.1:50051 "Write a haiku about Rust."

Stubs are generated at start from the repo's proto/ into a temporary folder (grpcio-tools), so
there is nothing to check in; a real service would generate them once in its build.
"""

import argparse
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")


def load_stubs():
    out = tempfile.mkdtemp(prefix="tandem-stubs-")
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tandem/v1/generation.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from tandem.v1 import generation_pb2, generation_pb2_grpc

    return generation_pb2, generation_pb2_grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prompt")
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()

    pb, rpc = load_stubs()
    stub = rpc.GenerationStub(grpc.insecure_channel(args.addr))
    req = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.prompt)]),
        sampling=pb.SamplingParameters(temperature=args.temperature),
        stopping=pb.StoppingCriteria(max_new_tokens=args.max_new_tokens),
    )
    last = None
    try:
        for chunk in stub.GenerateStream(req, timeout=args.timeout):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
    except grpc.RpcError as e:
        sys.exit(f"\nerror: {e.code().name}: {e.details()}")
    print()
    if last is not None:
        reason = pb.FinishReason.Name(last.finish_reason)
        print(
            f"[{reason}; {last.usage.prompt_tokens} prompt + "
            f"{last.usage.completion_tokens} completion tokens]",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
