"""Golden-record tolerances against measured error: how far float16 / bfloat16 (and float32 on another thread
count) move each probe of `adapters/golden.py` from the float32 record, next to `TOLERANCES`; and how far each
set moves its own probes from the bare backbone, next to the bfloat16 tolerance (a check is only useful where
that effect is far above the tolerance: otherwise a set serving the backbone's outputs would pass).

Two models, on the CPU:
- demo: the shipped backbone (model/demo/backbone) with the bare backbone and the three shipped sets
  (model/demo/adapters/*/v1, trained);
- base: a BLIP-base-sized random backbone (`random_backbone("blip-base")`, 384 px) with one random set per task
  (`random_adapter`, every tensor N(0, --adapter-std), LayerNorm weights around 1; bottleneck 512, the task
  defaults: retrieval with its heads, videoqa with a temporal embedding of 8 frames).

Each record is computed as the verifier does (`Prober.record` with the float32 record's answers and probe names):
the backbone and set cast from their float32 weights to the dtype, as `load_backbone(dtype=)` and the manager do.
The float32 reference runs on --threads threads; "fp32 1t" is float32 on one thread (summation order only; on
blip-base the bare backbone alone, which takes every path, unless --thread-all).

Per probe kind the tables show the largest |difference| from the float32 record over every subject, probe row and
coordinate, and difference / TOLERANCES[dtype][kind] (what compare() allows is the sum of both sides' rows, i.e.
float32's plus the dtype's):
- unit: sketch coordinates of unit vectors (image_states, image_itc, text_itc, clip_itc);
- prob: ITM probabilities; logodds: log(p / (1 - p)) of the same, derived here (no record holds it: it shows what
  a log-odds probe would see where the probabilities sit near 0 or 1); logp: an answer's summed log-likelihood;
- text: the greedy answer's score where the answer is the same (tolerance: logp), with the count of changed
  answers and their recorded lead (tolerance: twice the margin row);
- margin: the per-token lead of the greedy answer (measured where the answer is the same).

The effect of a set is its float32 record against a *null set* of the same config: every adapter tensor zero and
the heads the backbone's, which computes the bare backbone's outputs on the set's own probe inputs (for videoqa
sets that is the clip, which no backbone record has). The run checks the null set against the bare backbone's
record where both have a probe. "/gate" is effect / what compare() allows a bfloat16 run against a float32 record
(per row: the weakest and strongest), "/bf16 err" effect / the largest bfloat16 error of that kind measured above.

Run from the repository root (defaults: about 3 minutes on two quiet cores, fp16 BLIP-base half of it; peak RSS
3.8 GB):

    .venv/bin/python bench/golden_tolerance.py
    .venv/bin/python bench/golden_tolerance.py --only demo --repeat 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uniadapter_serve.adapters.format import load_adapter_set, read_adapter_meta
from uniadapter_serve.adapters.golden import TOLERANCES, GoldenRecord, Prober, compare, read_record
from uniadapter_serve.model.backbone import BlipBackbone, text_config
from uniadapter_serve.model.loading import load_backbone, random_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.tokenizer import BlipTokenizer, load_answer_list, load_tokenizer
from uniadapter_serve.model.uniadapter import HEAD_NAMES, AdapterSetModule, UniAdapterConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO_BACKBONE = ROOT / "model" / "demo" / "backbone"
DEMO_SETS = ROOT / "model" / "demo" / "adapters"
SHOWN = ("unit", "logit", "logp", "text", "margin")
TOL_KIND: dict[str, str | None] = {"unit": "unit", "prob": "prob", "logit": "logit", "logodds": None, "logp": "logp",
                                   "text": "logp", "margin": "margin"}
"""the TOLERANCES row each kind shown is held to (logp and text: against ONE token's tolerance, so the ratio shown
over-states how close a multi-token answer is; the "compare" row applies the real per-token rule); logodds (of
probabilities, for records made before ITM was recorded as log-odds) has none"""
P_FLOOR = 1e-6
"""log-odds of recorded probabilities (7 decimals) are taken at no less than this"""
SAFETY = 4.0
"""suggested tolerance = SAFETY x the largest error measured (the factor TOLERANCES' comment names)"""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- differences -------------------------------------------------------------------------------------------------

@dataclass
class Worst:
    """Largest difference per kind, with where it was."""

    value: dict[str, float] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    """greedy answers that changed: 'probe[i] a -> b (lead x)'"""

    def add(self, kind: str, value: float, where: str) -> None:
        if value > self.value.get(kind, -1.0):
            self.value[kind] = value
            self.where[kind] = where

    def merge(self, other: Worst, prefix: str) -> None:
        for kind, value in other.value.items():
            self.add(kind, value, f"{prefix} {other.where[kind]}")
        self.changed.extend(f"{prefix} {c}" for c in other.changed)


def differences(want: GoldenRecord, got: GoldenRecord, tokenizer: BlipTokenizer) -> Worst:
    """Per kind, the largest |got - want| over the record's probes, rows and coordinates."""
    out = Worst()
    for name, w in want.probes.items():
        h = got.probes[name]
        if w["kind"] != "text":
            for i, (a, b) in enumerate(zip(w["values"], h["values"], strict=True)):
                out.add(w["kind"], max(abs(x - y) for x, y in zip(a, b, strict=True)), f"{name}[{i}]")
                if w["kind"] == "prob":
                    out.add("logodds", max(abs(logit(x) - logit(y)) for x, y in zip(a, b, strict=True)),
                            f"{name}[{i}]")
            continue
        for i, (text, now) in enumerate(zip(w["texts"], h["texts"], strict=True)):
            if text == now:
                out.add("text", abs(w["scores"][i] - h["scores"][i]), f"{name}[{i}]")
                out.add("margin", max(abs(x - y) for x, y in zip(w["margins"][i], h["margins"][i], strict=True)),
                        f"{name}[{i}]")
            else:
                ids, now_ids = w["ids"][i], tokenizer.encode_answers([now])[0][0].tolist()
                at = next((t for t, (a, b) in enumerate(zip(ids, now_ids, strict=False)) if a != b),
                          min(len(ids), len(now_ids)))
                lead = w["margins"][i][at - 1] if 0 < at <= len(w["margins"][i]) else math.inf
                out.changed.append(f"{name}[{i}] {text!r} -> {now!r} (recorded lead {lead:.3g})")
    return out


def logit(p: float) -> float:
    p = min(max(p, P_FLOOR), 1.0 - P_FLOOR)
    return math.log(p / (1.0 - p))


# -- subjects ----------------------------------------------------------------------------------------------------

@dataclass
class Subject:
    name: str
    module: AdapterSetModule | None
    """float32 (None: the bare backbone)"""
    ref: str | None = None
    answer_list: list[str] | None = None


@dataclass
class Case:
    label: str
    backbone: BlipBackbone
    """float32"""
    tokenizer: BlipTokenizer
    answers: list[str]
    subjects: list[Subject]
    shipped: dict[str, GoldenRecord] = field(default_factory=dict)
    """shipped golden.json per subject name (demo)"""


def demo_case() -> Case:
    backbone = load_backbone("demo")
    tokenizer = load_tokenizer("demo", backbone.config)
    subjects = [Subject("backbone", None)]
    shipped = {}
    record = read_record(DEMO_BACKBONE)
    if record is not None:
        shipped["backbone"] = record
    for folder in sorted(DEMO_SETS.glob("*/v1")):
        meta = read_adapter_meta(folder)
        module = load_adapter_set(folder, backbone, meta=meta).module
        subjects.append(Subject(meta.name, module, meta.ref, meta.answer_list))
        record = read_record(folder)
        if record is not None:
            shipped[meta.name] = record
    return Case("demo (shipped backbone and trained sets)", backbone, tokenizer,
                load_answer_list(DEMO_BACKBONE / "answer_list.json"), subjects, shipped)


def base_case(std: float, bottleneck: int) -> Case:
    backbone = random_backbone("blip-base", seed=0).requires_grad_(False).eval()
    tokenizer = BlipTokenizer.demo(text_config(backbone.config).vocab_size)
    subjects = [Subject("backbone", None)]
    for k, task in enumerate(("retrieval", "vqa", "videoqa")):
        config = UniAdapterConfig.for_task(task, bottleneck=bottleneck)
        subjects.append(Subject(f"random-{task}", random_adapter(backbone, config, seed=100 + k, std=std),
                                f"random-{task}@0"))
    return Case(f"blip-base (random backbone, random sets: std {std}, bottleneck {bottleneck})", backbone,
                tokenizer, load_answer_list(), subjects)


def null_set(module: AdapterSetModule, backbone: BlipBackbone) -> AdapterSetModule:
    """`module`'s config with every tensor zero and the backbone's heads: the bare backbone on the set's path."""
    null = copy.deepcopy(module)
    with torch.no_grad():
        for p in null.parameters():
            p.zero_()
        for name in HEAD_NAMES:
            mine, theirs = null.head(name), getattr(backbone, name, None)
            if mine is not None and theirs is not None:
                mine.load_state_dict(theirs.state_dict())
    return null


def cast(module: AdapterSetModule | None, dtype: torch.dtype) -> AdapterSetModule | None:
    return None if module is None else copy.deepcopy(module).to(dtype)


def record(prober: Prober, subject: Subject, module: AdapterSetModule | None,
           like: GoldenRecord | None = None) -> GoldenRecord:
    """As `Verifier.verify` computes it when `like` (the float32 record) is given."""
    if like is None:
        return prober.record(module, ref=subject.ref, answer_list=subject.answer_list)
    answers = like.probes.get("answer_scores", {}).get("answers")
    return prober.record(module, ref=subject.ref, answer_list=subject.answer_list, answers=answers,
                         probes=list(like.probes))


# -- the run -----------------------------------------------------------------------------------------------------

@dataclass
class Variant:
    label: str
    dtype: str
    threads: int
    backbone_only: bool = False
    """run the bare backbone only (it takes every path: vision states, ITC, ITM, answers, greedy)"""


def variants(args: argparse.Namespace, base: bool) -> list[Variant]:
    alt = 1 if args.threads != 1 else 2
    return [Variant(f"fp32 {alt}t", "float32", alt, base and not args.thread_all),
            Variant("bf16", "bfloat16", args.threads), Variant("fp16", "float16", args.threads)]


def fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}" if x else "0"


def ratio(value: float, kind: str, dtype: str) -> str:
    tol_kind = TOL_KIND[kind]
    if math.isnan(value):
        return "-"
    return f"{value / TOLERANCES[dtype][tol_kind]:.2f}" if tol_kind is not None else "n/a"


def run_case(case: Case, args: argparse.Namespace, base: bool) -> dict[str, Worst]:
    """Prints the case's tables; returns the largest error per variant label (for the summary)."""
    print(f"\n== {case.label}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prober = Prober(case.backbone, case.tokenizer, case.answers)
    refs: dict[str, GoldenRecord] = {}
    for s in case.subjects:
        t0 = time.perf_counter()
        refs[s.name] = record(prober, s, s.module)
        print(f"  fp32 record of {s.name}: probes {sorted(refs[s.name].probes)} ({time.perf_counter() - t0:.1f} s)")
    for name, shipped in case.shipped.items():
        worst = differences(shipped, refs[name], case.tokenizer)
        changed = f"; changed {worst.changed}" if worst.changed else ""
        print(f"  shipped golden.json of {name} reproduced here in fp32: largest difference "
              f"{max(worst.value.values(), default=0.0):.2e}{changed}")

    runs = variants(args, base)
    errors: dict[str, dict[str, Worst]] = {s.name: {} for s in case.subjects}
    gates: dict[str, dict[str, str]] = {s.name: {} for s in case.subjects}
    for v in runs:
        torch.set_num_threads(v.threads)
        dtype = DTYPES[v.dtype]
        backbone = copy.deepcopy(case.backbone).to(dtype) if v.dtype != "float32" else case.backbone
        vprober = Prober(backbone, case.tokenizer, case.answers)
        t0 = time.perf_counter()
        subjects = [s for s in case.subjects if s.module is None or not v.backbone_only]
        for s in subjects:
            module = cast(s.module, dtype)
            worst = Worst()
            for _ in range(args.repeat):
                got = record(vprober, s, module, refs[s.name])
                worst.merge(differences(refs[s.name], got, case.tokenizer), "")
            verdict = compare(s.name, refs[s.name], got, case.tokenizer)
            w = verdict.worst
            gates[s.name][v.label] = (f"{'pass' if verdict.ok else 'FAIL'} {w.difference / w.tolerance:.2f}"
                                      if w is not None else "-")
            errors[s.name][v.label] = worst
        print(f"  {v.label}: {', '.join(s.name for s in subjects)} x {args.repeat} in "
              f"{time.perf_counter() - t0:.1f} s")
        del backbone, vprober
    torch.set_num_threads(args.threads)

    print("\n  error: largest |x - x_fp32| (difference / TOLERANCES[dtype][kind])")
    print(f"  {'subject':<18} {'kind':<8}" + "".join(f"{v.label:>22}" for v in runs))
    totals = {v.label: Worst() for v in runs}
    for s in case.subjects:
        for kind in SHOWN:
            cells = []
            for v in runs:
                value = errors[s.name].get(v.label, Worst()).value.get(kind, math.nan)
                cells.append(f"{fmt(value)} ({ratio(value, kind, v.dtype)})" if not math.isnan(value) else "-")
            if any(c != "-" for c in cells):
                print(f"  {s.name:<18} {kind:<8}" + "".join(f"{c:>22}" for c in cells))
        for v in runs:
            if v.label in errors[s.name]:
                totals[v.label].merge(errors[s.name][v.label], s.name)
                for change in errors[s.name][v.label].changed:
                    print(f"  {s.name:<18} changed {v.label}: {change}")
        print(f"  {s.name:<18} {'compare':<8}" + "".join(f"{gates[s.name].get(v.label, '-'):>22}" for v in runs)
              + "   (compare(fp32 record, run): pass/FAIL, worst difference / its tolerance)")

    effects(case, prober, refs, totals["bf16"])
    print(f"  ({case.label.split(' ')[0]}: {time.perf_counter() - started:.1f} s)")
    return totals


def effects(case: Case, prober: Prober, refs: dict[str, GoldenRecord], bf16: Worst) -> None:
    """Each set against its null set, in fp32: the effect a check must see, next to the bf16 tolerance, the gate
    compare() applies to a bf16 run against an fp32 record, and the largest bf16 error measured in this case."""
    gate_dtype = "bfloat16"
    bare = refs["backbone"]
    print("\n  effect of each set: its fp32 record vs its null set's (the backbone's outputs on the set's inputs)")
    print(f"  {'subject':<18} {'probe':<14} {'kind':<8} {'effect':>14} {'/bf16 tol':>10} {'/gate min..max row':>19} "
          f"{'/bf16 err':>10}")
    for s in case.subjects:
        if s.module is None:
            continue
        null = record(prober, s, null_set(s.module, case.backbone), refs[s.name])
        video = s.module.config.task == "videoqa"  # its answers are on the clip: no backbone record has them
        same = {n: p for n, p in null.probes.items() if n in bare.probes and not video
                and p.get("answers") == bare.probes[n].get("answers")}
        if same:
            check = differences(dataclasses.replace(bare, probes={n: bare.probes[n] for n in same}),
                                dataclasses.replace(null, probes=same), case.tokenizer)
            print(f"  {s.name:<18} (null set vs the bare backbone's record on {sorted(same)}: largest difference "
                  f"{max(check.value.values(), default=0.0):.1e}{', answers changed' if check.changed else ''})")
        # the null run as if computed in bf16: compare() then applies the fp32-record / bf16-run gate
        verdict = compare(s.name, refs[s.name], dataclasses.replace(null, dtype=gate_dtype), case.tokenizer)
        for name, want in refs[s.name].probes.items():
            kind = want["kind"]
            ratios = [c.difference / c.tolerance for c in verdict.checks if c.probe.split("[")[0] == name]
            effect = differences(dataclasses.replace(refs[s.name], probes={name: want}),
                                 dataclasses.replace(null, probes={name: null.probes[name]}), case.tokenizer)
            shown_kind = "text" if kind == "text" else kind
            value = effect.value.get(shown_kind, math.nan)
            shown = fmt(value)
            if effect.changed:
                changed = f"{len(effect.changed)}/{len(want['texts'])} changed"
                shown = changed if math.isnan(value) else f"{changed}, {shown}"
            weak = "   <- a row within the gate" if min(ratios) <= 1.0 else ""
            print(f"  {s.name:<18} {name:<14} {shown_kind:<8} {shown:>14} {ratio(value, shown_kind, gate_dtype):>10} "
                  f"{f'{min(ratios):.1f}..{max(ratios):.1f}':>19} {_per(value, bf16, shown_kind):>10}{weak}")
            if kind == "prob":
                value = effect.value["logodds"]
                print(f"  {s.name:<18} {name:<14} {'logodds':<8} {fmt(value):>14} {'n/a':>10} {'(not recorded)':>19} "
                      f"{_per(value, bf16, 'logodds'):>10}")


def _per(value: float, errors: Worst, kind: str) -> str:
    err = errors.value.get(kind, math.nan)
    return f"{value / err:.0f}" if err and not math.isnan(err) and not math.isnan(value) else "-"


def summary(totals: dict[str, dict[str, Worst]], args: argparse.Namespace) -> None:
    print("\n== summary over the models run: largest error per kind, current tolerance, suggested "
          f"({SAFETY:g} x largest, one significant digit up)")
    for v in variants(args, base=False):
        merged = Worst()
        for case, per in totals.items():
            merged.merge(per[v.label], case)
        print(f"  {v.label} (TOLERANCES[{v.dtype!r}]):")
        for kind in SHOWN:
            if kind not in merged.value:
                continue
            value, tol_kind = merged.value[kind], TOL_KIND[kind]
            tol = f"{TOLERANCES[v.dtype][tol_kind]:g}" if tol_kind is not None else "none"
            print(f"    {kind:<8} largest {fmt(value):>9} at {merged.where[kind]:<40} tolerance {tol:<8} "
                  f"ratio {ratio(value, kind, v.dtype):<6} suggested {round_up(SAFETY * value):g}")
        if merged.changed:
            print(f"    greedy answers changed: {merged.changed}")


def round_up(x: float) -> float:
    if x <= 0:
        return 0.0
    exponent = math.floor(math.log10(x))
    return math.ceil(x / 10 ** exponent) * 10 ** exponent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("demo", "base"), default=None, help="run one model (default: both)")
    p.add_argument("--repeat", type=int, default=1, help="records per subject and variant (the largest counts)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the reference and the fp16/bf16 runs")
    p.add_argument("--adapter-std", type=float, default=0.02, help="std of the blip-base random sets' tensors")
    p.add_argument("--bottleneck", type=int, default=512, help="bottleneck of the blip-base random sets")
    p.add_argument("--thread-all", action="store_true",
                   help="blip-base: the fp32 thread-count check on every subject (default: the bare backbone)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"golden_tolerance: torch {torch.__version__}, python {platform.python_version()}, device cpu, "
          f"reference fp32 on {args.threads} threads, repeat {args.repeat}")
    totals: dict[str, dict[str, Worst]] = {}
    if args.only in (None, "demo"):
        totals["demo"] = run_case(demo_case(), args, base=False)
    if args.only in (None, "base"):
        t0 = time.perf_counter()
        case = base_case(args.adapter_std, args.bottleneck)
        print(f"\n(blip-base backbone and sets built in {time.perf_counter() - t0:.1f} s)")
        totals["base"] = run_case(case, args, base=True)
        del case
    summary(totals, args)
    print(f"\nwall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
