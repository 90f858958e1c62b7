"""The default model under tensor parallelism 3 and pipeline parallelism 3 and 2 against one rank,
on held-out Shakespeare (two 192-token windows): the largest logit difference, the greedy
agreement and the near ties (top-2 margin under 1e-3). The ranks run the integration test's own
function (tests/integration/test_default_model.py `_parallel_layouts`: gloo, one process a rank).

    .venv/bin/python bench/parallel_agreement.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.integration

import tandem  # noqa: E402
from tests.integration.test_default_model import SHAKESPEARE, _parallel_layouts  # noqa: E402


def main() -> None:
    llm = tandem.LLM("smollm2-135m", progress=False, quantization="none", num_kv_blocks=16)
    print("| window | layout | max logit difference | max logit | greedy agreement | near ties |")
    print("|---|---|---|---|---|---|")
    for start in (60_000, 120_000):
        ids = torch.tensor([llm.tokenize(SHAKESPEARE.read_text()[start:start + 1000])[:192]])
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_parallel_layouts, args=(3, f"file://{tmp}/rendezvous", ids, tmp), nprocs=3,
                               join=True, start_method="spawn")
            with torch.inference_mode():
                ref = llm.model.compute_logits(llm.model(ids, torch.arange(ids.shape[1])[None]))[0]
            top2 = ref.topk(2, -1).values
            ties = int(((top2[:, 0] - top2[:, 1]) <= 1e-3).sum())
            for layout in ("tp3", "pp3", "pp2"):
                got = torch.load(f"{tmp}/{layout}.pt")[0]
                agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
                print(f"| {start} | {layout} | {float((got - ref).abs().max()):.2e} | {float(ref.abs().max()):.1f} | "
                      f"{100 * agree:.1f}% | {ties} of {len(ref)} |")


if __name__ == "__main__":
    main()
