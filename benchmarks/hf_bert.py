"""Exits on a Hugging Face BERT: the engine against the model itself, in one run.

A 4-layer BERT (hidden 256, 4 heads, FFN 1024, random weights, seed 0), sequences of 128
tokens, exits after layers 1 and 2 (``bert.encoder.layer.0`` / ``.1``) with the default
token branches; thresholds set on the pool so that half the samples leave at the first
exit and a quarter at the second (the rest at the model's own classifier), and PABEE's
patience with P = 1 (the exit op's criterion "patience"). Timed:
``EarlyExitEngine(**inputs)`` against ``model(**inputs).logits`` under inference mode, at
B = 1 (each pool sample alone) and B = 64, rounds interleaving the two; per sample
times, median and min-max over the rounds.

    OMP_NUM_THREADS=1 python benchmarks/hf_bert.py --out benchmarks/results/cpu-xeon-2core/hf

``--gathers`` times instead what one fused gather of a state could save: the state after
layer 1 (hidden states, token ids' mask, the extended attention mask) gathered tensor by
tensor as the engine does, against its largest tensor alone (a fused gather moves the
same bytes, so it saves at most the difference), against the next stage on the gathered
rows; written to state_gather.md / .json.

Needs transformers (``pip install branchynet[hf]``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import branchynet as bn  # noqa: E402
from branchynet.exits import entropy  # noqa: E402
from branchynet.models.hf import import_transformers  # noqa: E402
from profiles import cpu_name, interleaved_times  # noqa: E402

SEQ, B_BIG = 128, 64


def build(seed: int = 0):
    tf = import_transformers()
    torch.manual_seed(seed)
    cfg = tf.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                        num_labels=4)
    hf = tf.BertForSequenceClassification(cfg).eval()
    example = pool_inputs(2, seed + 1)
    net = bn.attach_exits(hf, after=["bert.encoder.layer.0", "bert.encoder.layer.1"], num_classes=4,
                          example_input=example).eval()
    return hf, net


def pool_inputs(m: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (m, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def profile_thresholds(net, pool: dict) -> list:
    """T_1: the median exit-1 entropy (half leave there); T_2: the median exit-2 entropy
    of the samples that stay (a quarter of the pool leaves there)."""
    outs = net(**pool)
    h1, h2 = entropy(outs[0].float()), entropy(outs[1].float())
    t1 = float(h1.median())
    stay = h1 >= t1
    t2 = float(h2[stay].median())
    return [t1, t2]


def timed(fa, fb, inputs, rounds: int) -> dict:
    ta, tb = interleaved_times(fa, fb, inputs, rounds)
    return {"a": ta, "b": tb}


def summary(ts: list, per: int) -> dict:
    us = [t / per * 1e6 for t in ts]
    return {"median_us_per_sample": statistics.median(us), "min": min(us), "max": max(us)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128, help="pool size (a multiple of 64)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for hf_bert.json / hf_bert.md")
    p.add_argument("--gathers", action="store_true", help="time the state's gathers instead (state_gather.*)")
    args = p.parse_args()
    torch.set_num_threads(1)
    hf, net = build()
    if args.gathers:
        return gathers(net, args)
    pool = pool_inputs(args.samples, seed=7)
    th = profile_thresholds(net, pool)
    eng = bn.EarlyExitEngine(net, th)
    with torch.inference_mode():
        counts = eng(**pool).counts
        assert torch.equal(eng(**pool).pred, eng.per_sample(**pool).pred)

    def engine(x):
        return eng(**x)

    @torch.inference_mode()
    def model(x):
        return hf(**x).logits

    rows = {}
    with torch.inference_mode():
        eng.patience = 1
        eng.criterion = "patience"
        patience_counts = eng(**pool).counts
        eng.criterion = "entropy"
    # The profile above, then every sample to the last exit (thresholds 0): the cost of
    # the cut graph, the side branches and the gathers against the model, with no exit;
    # then PABEE's patience with P = 1 (leave at exit 2 when exits 1 and 2 agree).
    for profile, thresholds in (("50/25/25", th), ("0/0/100", [0.0, 0.0]), ("patience P=1", None)):
        if thresholds is None:
            eng.criterion = "patience"
        else:
            eng.thresholds = thresholds
        for b in (1, B_BIG):
            batches = [{k: v[i:i + b] for k, v in pool.items()} for i in range(0, args.samples, b)]
            engine(batches[0]), model(batches[0])  # warm
            t = timed(engine, model, batches, args.rounds)
            e, m = summary(t["a"], b), summary(t["b"], b)
            ratios = [x / y for x, y in zip(t["b"], t["a"])]
            rows[f"{profile} B={b}"] = {"engine": e, "model": m, "speedup_median": statistics.median(ratios),
                                        "speedup_min": min(ratios), "speedup_max": max(ratios)}
    meta = dict(_meta(args), thresholds=th, exit_counts=counts, patience_exit_counts=patience_counts,
                samples=args.samples, rounds=args.rounds)
    result = {"meta": meta, "rows": rows}
    _write(args.out, "hf_bert", result, _markdown(result))



@torch.inference_mode()
def gathers(net, args) -> None:
    """The state's gathers at the survivor counts of the 50/25/25 profile (1 of a B = 1
    call, 32 of B = 64), median (min-max) over ``20 x rounds`` calls each."""
    from branchynet.ops import bind
    from branchynet.state import gather_state, state_input

    op = bind("cpu")
    h = net.stages[0](state_input(None, pool_inputs(B_BIG, seed=7)))
    tensors = [t for t in (h.values() if isinstance(h, dict) else h) if isinstance(t, torch.Tensor)]
    largest = max(tensors, key=lambda t: t.numel() * t.element_size())

    def med(fn, n):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        return {"median_us": statistics.median(ts), "min": min(ts), "max": max(ts)}

    rows = {}
    for k in (1, 32):
        idx = torch.arange(k)
        g = gather_state(op.gather, h, idx)
        rows[f"K={k}"] = {"state": med(lambda: gather_state(op.gather, h, idx), 20 * args.rounds),
                          "largest": med(lambda: op.gather(largest, idx), 20 * args.rounds),
                          "next_stage": med(lambda: net.stages[1](g), args.rounds)}
    meta = _meta(args)
    meta["state"] = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors]
    result = {"meta": meta, "rows": rows}
    lines = [
        "# The gathers of a Transformer state: what one fused gather could save",
        "",
        f"The state after layer 1 of the 4-layer BERT of hf_bert.md: {', '.join(meta['state'])}; its rows "
        f"gathered tensor by tensor (the engine's `gather_state`, {len(tensors)} calls of the exit op's gather) "
        "against its largest tensor alone (a fused gather moves the same bytes: it saves at most the "
        "difference) and the next stage on the gathered rows.",
        f"Commit {meta['commit']}, torch {meta['torch']}, {meta['cpu']}, {meta['threads']} thread, "
        f"{meta['date']}; median (min-max) us.",
        "",
        f"```bash\n{meta['command']}\n```",
        "",
        "| rows gathered | whole state | largest tensor alone | at most saved, % of the next stage | next stage |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, r in rows.items():
        s, lg, ns = r["state"], r["largest"], r["next_stage"]
        saved = 100 * (s["median_us"] - lg["median_us"]) / ns["median_us"]
        lines.append(f"| {k} | {s['median_us']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                     f"{lg['median_us']:.1f} ({lg['min']:.1f}-{lg['max']:.1f}) | {saved:.2f} % | "
                     f"{ns['median_us']:.0f} ({ns['min']:.0f}-{ns['max']:.0f}) |")
    _write(args.out, "state_gather", result, "\n".join(lines) + "\n")


def _write(out: str | None, stem: str, result: dict, text: str) -> None:
    """Print the table; with ``--out``, write ``stem.json`` and ``stem.md`` there."""
    print(text)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text(text)


def _meta(args) -> dict:
    return {
        "command": "OMP_NUM_THREADS=1 python benchmarks/hf_bert.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(),
        "torch": torch.__version__, "transformers": import_transformers().__version__,
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _markdown(r: dict) -> str:
    m = r["meta"]
    lines = [
        "# Exits on a Hugging Face BERT: the engine against the model",
        "",
        f"4-layer BERT (hidden 256, 4 heads, FFN 1024, random weights), sequences of {SEQ} tokens, exits "
        f"after layers 1 and 2; exit counts on the {m['samples']}-sample pool {m['exit_counts']} "
        f"(thresholds {[round(t, 4) for t in m['thresholds']]}); under PABEE's patience with P = 1 "
        f"{m.get('patience_exit_counts')}.",
        f"Commit {m['commit']}, torch {m['torch']}, transformers {m['transformers']}, {m['cpu']}, "
        f"{m['threads']} thread, {m['date']}. {m['rounds']} interleaved rounds; median (min-max) over them.",
        "",
        f"```bash\n{m['command']}\n```",
        "",
        "| exit profile, B | engine, us/sample | model, us/sample | model / engine |",
        "| --- | --- | --- | --- |",
    ]
    for b, row in r["rows"].items():
        e, mo = row["engine"], row["model"]
        lines.append(f"| {b} | {e['median_us_per_sample']:.0f} ({e['min']:.0f}-{e['max']:.0f}) | "
                     f"{mo['median_us_per_sample']:.0f} ({mo['min']:.0f}-{mo['max']:.0f}) | "
                     f"{row['speedup_median']:.2f} ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
