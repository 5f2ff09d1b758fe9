"""Side-by-side A/B of engine variants: decode_step.py's cases, one process and engine per variant, alternating.

A change to the engine's hot path is adopted on its measured effect in the engine, not on a kernel's
alone (bench/RESULTS.md holds several kernels that won alone and lost in the step). A variant is a name
and module constants to set before the engine is built; each runs in its own process (kernel files
pick their code at import, CUDA graphs are captured once), and the repeats alternate variants, so a
drifting machine shows as spread instead of as a difference:

    PYTHONPATH=$PWD/backend_src:/tmp/pp python3 bench/engine_ab.py \\
        --variant today \\
        --variant no-deferral:multilora.lora.lora_linear.DEFERRED_EXPAND_MAX_TOKENS=0 \\
        --repeats 2 --cases base,sampled,8,32,closed,closed32      # H200, ~1 minute a process
    ... bench/engine_ab.py --tiny --variant a --variant b:MODULE.NAME=VALUE     # CPU, seconds (the smoke test)

VALUE is JSON (0, false, "text"); a variant without settings is today's code. `name@TREE` runs the
engine of another source tree (a folder holding backend_src/, kernels/ and bench/, e.g. an older
commit's: `git archive REV backend_src kernels bench | tar -x -C TREE`), to tell a code change from a
machine's drift or to A/B a change that constants cannot express. Cases: base, sampled
(issue 7's sampled step), 8 and 32 (decode steps over that many distinct adapters), chunk (one prompt
chunk beside the decode rows), prefill, closed and closed32 (the closed batch, base and over 32
adapters). The table is printed last: each case's median over repeats, the LoRA steps as base +
delta; JSON with every repeat goes to $OUT/engine_ab.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "ENGINE_AB_RESULT "
CASES = ("base", "sampled", "8", "32", "chunk", "prefill", "closed", "closed32")


def parse_variant(text: str) -> dict:
    """'name[@TREE][:module.NAME=value,...]' -> {"name", "tree": TREE or None, "settings": {path: value}}."""
    head, _, rest = text.partition(":")
    name, _, tree = head.partition("@")
    if tree and not all((Path(tree) / part).is_dir() for part in ("backend_src", "kernels", "bench")):
        raise SystemExit(f"--variant {text!r}: {tree} must hold backend_src/, kernels/ and bench/ "
                         "(e.g. `git archive REV backend_src kernels bench | tar -x -C TREE`)")
    settings = {}
    for item in filter(None, rest.split(",")):
        path, sep, value = item.partition("=")
        if not sep or "." not in path:
            raise SystemExit(f"--variant {text!r}: write NAME:MODULE.NAME=VALUE, e.g. "
                             "no-deferral:multilora.lora.lora_linear.DEFERRED_EXPAND_MAX_TOKENS=0")
        try:
            settings[path] = json.loads(value)
        except json.JSONDecodeError:
            settings[path] = value
    return {"name": name, "tree": str(Path(tree).resolve()) if tree else None, "settings": settings}


def apply_settings(settings: dict) -> dict:
    """Sets each module constant; returns them as read back from their modules."""
    read_back = {}
    for path, value in settings.items():
        module_name, _, attr = path.rpartition(".")
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            raise SystemExit(f"{module_name} has no {attr} to set")
        setattr(module, attr, value)
        read_back[path] = getattr(module, attr)
    return read_back


def run_variant(variant: dict, cases: list[str], tiny: bool) -> dict:
    """In this process: the settings, one engine, the cases (decode_step.py's). Returns {"figures":
    case -> figure, "settings": the constants as the engine's modules held them}."""
    import torch

    settings = apply_settings(variant["settings"])
    sys.path.insert(0, str(Path(variant["tree"]) / "bench" if variant["tree"] else HERE))
    import decode_step as ds
    import multilora
    import multilora_kernels

    size = ds.SIZES["tiny" if tiny else "full"]
    config = dict(ds.TINY_MODEL if tiny else ds.LLAMA3_8B, bos_token_id=256, eos_token_id=257)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    few, many = size.adapter_counts
    with tempfile.TemporaryDirectory(prefix="engine-ab-") as work:
        llm, loras, _ = ds.build_engine(Path(work), config, size, device, dtype, {})
        driver = ds.EngineDriver(llm, size, config["vocab_size"], device)
        ds.warm_up(driver, loras)
        # The case functions themselves, not decode_step's report: they are what a `name@TREE` variant's
        # older decode_step has too.
        run = {"base": lambda: ds.decode_case(driver)["step_ms"],
               "sampled": lambda: ds.decode_case(driver, sampled=True)["step_ms"],
               "8": lambda: ds.decode_case(driver, loras=loras[:few])["step_ms"],
               "32": lambda: ds.decode_case(driver, loras=loras[:many])["step_ms"],
               "chunk": lambda: ds.chunk_case(driver)["step_ms"],
               "prefill": lambda: ds.prefill_case(driver)["ms"],
               "closed": lambda: ds.closed_case(driver)["tokens_per_s"],
               "closed32": lambda: ds.closed_case(driver, loras[:many])["tokens_per_s"]}
        return {"figures": {case: run[case]() for case in cases}, "settings": settings,
                "engine_source": str(Path(multilora.__file__).parent),
                "kernels_source": str(Path(multilora_kernels.__file__).resolve().parent)}


def summarise(variants: list[dict], runs: list[dict], cases: list[str]) -> list[dict]:
    """Per variant, each case's median over its repeats (and, for LoRA and sampled steps, against base)."""
    rows = []
    for variant in variants:
        mine = [r["figures"] for r in runs if r["variant"] == variant["name"] and r["figures"]]
        row = {"variant": variant["name"], "repeats": len(mine),
               **{case: statistics.median(f[case] for f in mine) if mine else None for case in cases}}
        if mine and "base" in cases:
            for case in ("8", "32"):
                if case in cases:
                    row[f"{case}_over_base"] = row[case] - row["base"]
            if "sampled" in cases:
                row["sampled_over_greedy"] = row["sampled"] / row["base"]
        if mine and {"closed", "closed32"} <= set(cases):
            row["closed32_over_closed"] = row["closed32"] / row["closed"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], cases: list[str]) -> None:
    units = {"closed": "tok/s", "closed32": "tok/s", "prefill": "ms"}
    print(f"\n{'variant':20} {'n':>2} " + " ".join(f"{c + ' ' + units.get(c, 'ms'):>14}" for c in cases))
    for row in rows:
        cells = []
        for case in cases:
            value = row[case]
            if value is None:
                cells.append(f"{'failed':>14}")
            elif case in ("8", "32") and f"{case}_over_base" in row:
                cells.append(f"{'base ' + format(row[case + '_over_base'], '+.3f'):>14}")
            elif case == "sampled" and "sampled_over_greedy" in row:
                cells.append(f"{format(row['sampled_over_greedy'], '.3f') + 'x':>14}")
            elif case == "closed32" and "closed32_over_closed" in row:
                cells.append(f"{format(value, '.0f') + ' ' + format(row['closed32_over_closed'], '.2f') + 'x':>14}")
            else:
                cells.append(f"{value:14.3f}" if value < 100 else f"{value:14.0f}")
        print(f"{row['variant']:20} {row['repeats']:2d} " + " ".join(cells))


@functools.lru_cache(maxsize=None)
def _kernels_link(tree: str) -> Path:
    """A fresh folder whose `multilora_kernels` links to the tree's kernels/ (one per tree and run)."""
    links = Path(tempfile.mkdtemp(prefix="engine-ab-"))
    (links / "multilora_kernels").symlink_to(Path(tree) / "kernels")
    return links


def child_env(tree: str | None) -> dict:
    """The child's environment: a variant with a source tree imports multilora and multilora_kernels from it
    (a folder of links maps multilora_kernels to the tree's kernels/), ahead of the installed package."""
    env = dict(os.environ)
    if tree:
        links = _kernels_link(tree)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(Path(tree) / "backend_src"), str(links),
                                                          env.get("PYTHONPATH"))))
    return env


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME[:MODULE.NAME=VALUE,...]",
                        help="a variant and the module constants it sets; repeatable (two or more)")
    parser.add_argument("--cases", default="base,sampled,8,32,closed,closed32",
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=1, help="processes per variant, alternating")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a process may take")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (the smoke test)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of engine_ab.json ($OUT)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    variants = [parse_variant(v) for v in args.variant]
    if args.child is not None:      # one variant, in this process: print its figures for the parent
        result = run_variant(variants[int(args.child)], cases, args.tiny)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return result
    runs = []
    for repeat in range(args.repeats):
        for index, variant in enumerate(variants):
            print(f"[engine_ab {time.strftime('%H:%M:%S')}] {variant['name']} (repeat {repeat + 1})", flush=True)
            command = [sys.executable, "-P", __file__, "--child", str(index), "--cases", ",".join(cases),
                       *[a for v in args.variant for a in ("--variant", v)], *(["--tiny"] if args.tiny else [])]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                      env=child_env(variant["tree"]))
                lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
                result = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {}
                error = None if result else (done.stderr or done.stdout)[-2000:]
            except subprocess.TimeoutExpired:
                result, error = {}, f"timed out after {args.timeout:.0f} s"
            if error:
                print(f"  failed: {error}", flush=True)
            runs.append({"variant": variant["name"], "repeat": repeat, "figures": result.get("figures"),
                         "settings_read_back": result.get("settings"), "engine_source": result.get("engine_source"),
                         "kernels_source": result.get("kernels_source"), "error": error})
    rows = summarise(variants, runs, cases)
    report = {"variants": variants, "cases": cases, "runs": runs, "summary": rows, "tiny": args.tiny,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_ab.json").write_text(json.dumps(report, indent=2))
    print_table(rows, cases)
    return report


if __name__ == "__main__":
    main()
