"""Profile the engine's decode steps: where a step's time goes, by Python function (cProfile).

    python bench/profile_step.py [--dtype bfloat16] [--batch 1] [--steps 30] [--lora 0]

Loads the embedded SmolLM2 into an `Engine`, starts `--batch` greedy requests of 41-token prompts (each on its own
random LoRA r16 adapter when `--lora` is set), runs two steps to get past prefill, then profiles `--steps` decode
steps and prints the 25 functions with the most time of their own, and the mean step time under the profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from deltafleet.adapters import LoraConfig, random_adapter
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lora", type=int, default=0, help="distinct LoRA adapters the requests use (0: the base)")
    args = ap.parse_args()
    engine = Engine.from_pretrained("smollm2-135m", config=EngineConfig(dtype=args.dtype, max_batch=args.batch,
                                                                        max_model_len=256))
    names = []
    for i in range(args.lora):
        engine.add_adapter(f"t{i}", random_adapter(engine.model.config, LoraConfig(r=16, alpha=32.0, targets=ALL7),
                                                   seed=i))
        names.append(f"t{i}")
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    requests = [Request(prompt_ids=list(range(100 + 41 * j, 141 + 41 * j)), params=params,
                        adapter=names[j % len(names)] if names else None) for j in range(args.batch)]
    engine.generate([Request(prompt_ids=r.prompt_ids, params=SamplingParams(max_tokens=2), adapter=r.adapter)
                     for r in requests])  # warm: adapters resident, kernels built
    for r in requests:
        engine.submit(r)
    engine.step()
    engine.step()
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    profile.disable()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    print(f"{args.dtype}, batch {args.batch}, {args.lora} LoRAs: {ms:.1f} ms a decode step under the profiler")


if __name__ == "__main__":
    main()
