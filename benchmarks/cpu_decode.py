"""CPU decode benchmark: the demo engine's tokens/s beside Hugging Face eager.

    .venv/bin/python benchmarks/cpu_decode.py [--config examples/llama_tiny.yaml]

Both run the same weights on this machine's CPU, one token per step, greedy, and must
produce the same tokens. tilec runs its kernel in Triton's interpreter (every task is
numpy calls in Python), so this measures the interpreter path the tests use, not what
a GPU does; it is here to track that path and to keep the two in agreement.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tilec  # noqa: E402,F401  (interpreter mode before torch imports Triton)
import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples/llama_tiny.yaml"))
    ap.add_argument("--prompt", default="5,9,2")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prompt = [int(t) for t in args.prompt.split(",")]

    from tilec.api import compile as tilec_compile
    from tilec.compiler.build import build_model
    from tilec.compiler.config import load_config
    from tilec.models.hf import to_transformers

    cfg = load_config(args.config)
    engine = tilec_compile(cfg)
    engine.generate(prompt[:1], 1, stop_at_eos=False)               # warm-up
    g = engine.generate(prompt, args.new_tokens, stop_at_eos=False)

    module, _ = build_model(cfg)
    hf = to_transformers(module)
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)   # warm-up
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        hf_s = time.perf_counter() - t0
    hf_tokens = out[0, len(prompt):].tolist()
    result = {
        "config": args.config, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
        "tilec_interpret_tokens_per_s": g.tokens_per_s,
        "hf_eager_tokens_per_s": args.new_tokens / hf_s,
        "ratio_tilec_over_hf": g.tokens_per_s / (args.new_tokens / hf_s),
        "tokens_equal": g.tokens == hf_tokens,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'system':<28} {'tokens/s':>10}")
    print(f"{'tilec (interpret backend)':<28} {result['tilec_interpret_tokens_per_s']:10.2f}")
    print(f"{'Hugging Face eager':<28} {result['hf_eager_tokens_per_s']:10.2f}")
    print(f"ratio tilec / HF: {result['ratio_tilec_over_hf']:.3f}; greedy tokens equal: "
          f"{result['tokens_equal']}")
    return 0 if result["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
