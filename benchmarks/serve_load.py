"""Load test of `lmlab serve` on loopback: C concurrent streaming clients for S seconds, C in 1, 4, 8, 16.

Each client loops over a fixed set of requests with mixed prompt and output lengths, stop strings and seeds.
Every request is first run alone to get its reference text; under load each streamed reply must equal its
reference in its first PREFIX characters (a mixed-up row would not), and the table counts the replies identical to
it: a batched step's attention sums over the whole shared window (other rows' slots masked) and a prompt that
reuses the prompt cache is prefilled in other chunks, so floats round differently from the solo run and a sampled
token near a tie can differ later on. The server must still answer /health at the end. Prints
aggregate completion tokens/s per concurrency.

    python benchmarks/serve_load.py --model smollm2-135m-instruct --seconds 60 --max-batch 16
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time

import httpx

PREFIX = 12  # characters every reply must share with its reference, whatever the batch's rounding
PROMPTS = ["Tell me a story about a fox.", "What is the capital of France?", "Write a haiku about the sea.",
           "List three colours.", "Explain gravity to a child in a few sentences.", "Say hello."]


def requests_mix() -> list[dict]:
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": (16, 48, 96)[i % 3],
                "temperature": 0.8, "seed": 100 + i, "stream": True, "stream_options": {"include_usage": True}}
        if i % 4 == 1:
            body["stop"] = ["\n\n", "."]
        out.append(body)
    return out


def stream(client: httpx.Client, url: str, body: dict) -> tuple[str, int]:
    """(the reply's text, its completion tokens) from one streamed request."""
    text, tokens = "", 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return text, tokens


def load(url: str, mix: list[dict], reference: list[str], clients: int, seconds: float) -> tuple[float, int, int]:
    """Aggregate tokens/s of `clients` threads streaming for `seconds`, requests completed, and how many of them
    equal their reference exactly."""
    done, tokens, same, errors = [0], [0], [0], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(k: int) -> None:
        with httpx.Client() as client:
            i = k
            while time.perf_counter() < stop_at:
                text, n = stream(client, url, mix[i % len(mix)])
                ref = reference[i % len(mix)]
                if text[:PREFIX] != ref[:PREFIX]:  # another request's reply: a mixed-up row
                    errors.append(f"request {i % len(mix)}: {text!r} != {ref!r}")
                with lock:
                    done[0] += 1
                    same[0] += text == ref
                    tokens[0] += n
                i += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} replies differ from their reference, e.g. {errors[0]}")
    return tokens[0] / (time.perf_counter() - start), done[0], same[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--extra", default="", help="more lmlab serve flags, e.g. '--quantize int8'")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lmlab", "serve", "--model", args.model, "--port", str(port), "--max-batch",
           str(args.max_batch), *args.extra.split()]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        mix = requests_mix()
        with httpx.Client() as client:
            reference = [stream(client, url, body)[0] for body in mix]
        import torch

        from lmlab.bench import machine

        where = machine(torch.device("cpu"))
        print(f"lmlab serve {args.model}, --max-batch {args.max_batch}, {args.seconds:g} s per row; {where}")
        print(f"{'clients':>7} {'requests':>8} {'identical':>9} {'tokens/s':>9} {'vs 1':>6}")
        base = None
        for clients in (int(c) for c in args.clients.split(",")):
            rate, n, same = load(url, mix, reference, clients, args.seconds)
            base = base or rate
            print(f"{clients:>7} {n:>8} {same:>9} {rate:>9.1f} {rate / base:>5.2f}x", flush=True)
        assert httpx.get(url + "/health").json() == {"status": "ok"}, "the server is not healthy after the load"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
