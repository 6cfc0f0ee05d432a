"""CPU decode and prefill speed of SmolLM2-135M-Instruct, one GGUF file, three engines in the same run:
lmlab (weights as stored: the Q4_1 layers as int4, lmlab.quant), HF transformers (`generate`, the file
dequantized to float32, its only way to read a GGUF) and llama.cpp (llama-cpp-python, the `[bench]` extra).

    python benchmarks/decode_smollm2.py [--new-tokens 128] [--repeats 3] [--threads 2] [--batch 8]
        [--engines lmlab,float,compiled,hf,llamacpp]

Each engine decodes greedily exactly --new-tokens tokens (EOS ignored) after the same chat-templated prompt.
Per-token timestamps (lmlab's generator, an HF streamer, llama.cpp's generator) split each run into prefill
(prompt tokens / time to the first new token) and decode (later tokens / the time they took). Engines
alternate run by run after one warm-up each; medians are reported. lmlab's batch row decodes --batch copies of
the prompt at once and counts every row's tokens. The `float` engine is lmlab with the file dequantized to
float32 (`quantize="off"`), the weights transformers computes with.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def split(stamps: list[float], start: float, n_prompt: int, batch: int = 1) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) from the start time and one timestamp per new token."""
    prefill = n_prompt * batch / (stamps[0] - start)
    decode = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0])
    return prefill, decode


def llamacpp_stamps(llm, ids: list[int], n: int) -> tuple[float, list[float]]:
    """llama.cpp's greedy generation of n tokens after `ids` from a reset state: (start, each token's time)."""
    llm.reset()
    start, stamps = time.perf_counter(), []
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return start, stamps


def engines(args, ids: list[int], gguf_path):
    """name -> a function running one timed generation and returning (prefill tok/s, decode tok/s)."""
    import lmlab
    from lmlab.infer.engine import forget_prompt
    from lmlab.infer.generate import SamplingConfig, generate_ids

    n = args.new_tokens
    lm = lmlab.load(gguf_path, device="cpu")
    s = SamplingConfig(max_new_tokens=n, temperature=0)

    def runner(model, batch: int = 1):
        def run():
            forget_prompt(model)  # a cold prefill each run: the model keeps its last prompt's keys and values
            start, stamps = time.perf_counter(), []
            for _ in generate_ids(model, [ids] * batch, s, eos_id=None):
                stamps.append(time.perf_counter())
            assert len(stamps) == n
            return split(stamps, start, len(ids), batch)

        return run

    out = {"lmlab": runner(lm.model), f"lmlab batch {args.batch}": runner(lm.model, args.batch)}
    if "float" in args.engines:  # the file dequantized to float32, as transformers holds it: like for like
        out["lmlab float32"] = runner(lmlab.load(gguf_path, device="cpu", quantize="off").model)
    if "compiled" in args.engines:  # the same model with its decoding step compiled (the warm-up compiles)
        out["lmlab --compile"] = runner(lmlab.load(gguf_path, device="cpu", compile=True).model)
    if "hf" in args.engines:
        out["transformers"] = hf_engine(gguf_path, ids, n)
    if "llamacpp" in args.engines:
        out["llama.cpp"] = llamacpp_engine(gguf_path, ids, n, args.threads)
    return out


def hf_engine(gguf_path, ids: list[int], n: int):
    import transformers
    from transformers.generation.streamers import BaseStreamer

    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.first = [], True

        def put(self, value):
            if self.first:  # generate hands the streamer the prompt first
                self.first = False
            else:
                self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def run():
        x, streamer = torch.tensor([ids]), Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0, streamer=streamer)
        assert len(streamer.stamps) == n
        return split(streamer.stamps, start, len(ids))

    return run


def llamacpp_engine(gguf_path, ids: list[int], n: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run():
        start, stamps = llamacpp_stamps(llm, ids, n)
        return split(stamps, start, len(ids))

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--engines", default="lmlab,compiled,hf,llamacpp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lmlab
    from lmlab.data.fetch import fetch_model
    from lmlab.templates import chat_prompt_ids

    path = fetch_model("smollm2-135m-instruct")
    gguf_path = path if path.is_file() else next(path.glob("*.gguf"))
    tok = lmlab.load(gguf_path, device="cpu").tokenizer
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is dropout in neural networks?"}])
    runs = engines(args, ids, gguf_path)
    for fn in runs.values():
        fn()  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            results[name].append(fn())
    from lmlab.bench import machine

    print(f"machine: {machine(torch.device('cpu'))}, {args.threads} torch threads; torch {torch.__version__}")
    print(f"prompt {len(ids)} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats}\n")
    print("| engine | prefill tokens/s | decode tokens/s |")
    print("|---|---|---|")
    med = {name: (statistics.median(p for p, _ in r), statistics.median(d for _, d in r))
           for name, r in results.items()}
    for name, (p, d) in med.items():
        print(f"| {name} | {p:.0f} | {d:.1f} |")
    ours = med["lmlab"][1]
    for name in ("transformers", "llama.cpp"):
        for mine in ("lmlab", "lmlab float32", "lmlab --compile"):
            if name in med and mine in med:
                print(f"{mine} / {name}: decode {med[mine][1] / med[name][1]:.2f}x, "
                      f"prefill {med[mine][0] / med[name][0]:.2f}x")
    print(f"lmlab batch {args.batch} / batch 1 (aggregate decode): {med[f'lmlab batch {args.batch}'][1] / ours:.2f}x")


if __name__ == "__main__":
    main()
