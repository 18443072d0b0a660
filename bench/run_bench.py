"""Performance benchmark of the LoRA-X transfer (``make bench``; not part of ``make test``).

On the zoo's full-size synthetic checkpoints ("sd15" -> "sdxl", fp16 single files) with a full-coverage
rank-32 SD1.5 LoRA, at subspace rank r (default 320), it measures:

* cold: ``python -m lorax_engine transfer`` as a subprocess with an empty cache dir: wall time, peak RSS;
* warm: the same command again (cache populated);
* batch: ``batch`` over 1 and over 10 LoRAs (different seeds), warm cache: marginal seconds per LoRA;
* exact: the same transfer with ``--exact`` (exact bases to screen and to project), for the accuracy figures;
* accuracy of the default fast path vs exact: max |Δ| of normalised similarities over every scored pair,
  max relative Frobenius error of the projected ΔW over the target layers both paths chose alike;
* trained: the same accuracy on weights that look trained (bench/trained_accuracy.py: every pair kind of
  lorax_zoo.pairs, bulk spectra i^-0.2..i^-1, condition numbers 1e2 and 1e4), fast and exact against float64;
* naive: bench/naive_transfer.py (full float32 SVD per layer, no cache), run on one stage for real
  (and checked against the engine's exact output) and extrapolated to the whole transfer from one timed
  SVD per distinct weight shape;
* step cost: in-process ComfyUI, tiny SDXL; UNet forward time with the projected LoRA applied by the pack's
  Apply node vs the same LoRA written to a file and loaded by ComfyUI's stock LoraLoader;
* machine: device, torch version, threads, CPU model, load average.

Prints a table and one final JSON line, and appends that line to bench/results.jsonl.
``--device cuda`` runs the same on a GPU; ``--quick`` is a small smoke run on the tiny zoo models.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[1:1] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from naive_transfer import naive_transfer, plan, plan_svds, time_svds  # noqa: E402
from trained_accuracy import measure as trained_accuracy  # noqa: E402
from trained_accuracy import table as trained_table  # noqa: E402

import lorax_zoo  # noqa: E402
from lorax_engine.files.base_weights import CheckpointWeights  # noqa: E402
from lorax_engine.files.lora_formats import read_lora  # noqa: E402

RESULTS = BENCH / "results.jsonl"
TARGETS = {   # name: (figure, comparison, bound) for the 2-core CPU targets of the performance brief
    "naive_over_cold": (">=", 4.0), "sim_max_abs_err": ("<=", 0.01), "dw_max_rel_err": ("<=", 1e-2),
    "cold_s": ("<=", 60.0), "warm_s": ("<=", 3.0), "batch_marginal_s_per_lora": ("<=", 3.0),
    "cold_peak_rss_gb": ("<=", 4.0), "step_overhead": ("<=", 0.05),
    "trained_max_score_err": ("<=", 0.01), "trained_max_dw_err": ("<=", 1e-2), "trained_flips": ("<=", 0),
}


# --------------------------------------------------------------------------------------------- helpers

def machine(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": cpu, "ram_gb": round(mem, 1) if mem else None,
            "python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    info["git"] = git.stdout.strip() or None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


CPU_SECONDS: dict[str, float] = {}   # log name -> user + system CPU seconds: on a shared machine the steadier figure


def run_cli(argv: list[str], log: Path) -> tuple[float, float]:
    """Run ``python -m lorax_engine ARGV``; (wall seconds, peak RSS in GB) of that process alone (wait4)."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "lorax_engine", *argv], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    CPU_SECONDS[log.stem] = usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench: `lorax_engine {' '.join(argv[:1])}` failed ({proc.returncode}); see {log}:\n"
                 + log.read_text()[-3000:])
    return seconds, usage.ru_maxrss / 2**20     # ru_maxrss is in KiB on Linux


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def report_scores(path: Path) -> dict[tuple[str, str], tuple[float, float, bool]]:
    """{(source key, target key): (normalised U score, normalised V score, applied)} from a report."""
    out = {}
    for layer in json.loads(path.read_text())["layers"]:
        for c in layer["candidates"]:
            if c["similarity"] is not None:
                out[(layer["source_key"], c["target_key"])] = (c["similarity"]["score_u"], c["similarity"]["score_v"],
                                                               c["applied"])
    return out


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return {k: layer.delta() for k, layer in read_lora(path).layers.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float(a.norm())


# --------------------------------------------------------------------------------------------- phases

def accuracy(fast_report: Path, exact_report: Path, fast_out: Path, exact_out: Path) -> dict:
    fast, exact = report_scores(fast_report), report_scores(exact_report)
    if set(fast) != set(exact):
        sys.exit("bench: fast and exact runs scored different pairs")
    sim_err = max(max(abs(fast[p][0] - exact[p][0]), abs(fast[p][1] - exact[p][1])) for p in exact)
    chosen = lambda scores: {p for p, v in scores.items() if v[2]}   # noqa: E731
    differ = sorted({s for s, _ in chosen(fast) ^ chosen(exact)})
    # a differing choice is a near-tie: the exact-score gap between the two targets each path picked
    ties = []
    for s in differ:
        ef = [exact[p][:2] for p in chosen(fast) if p[0] == s]
        ee = [exact[p][:2] for p in chosen(exact) if p[0] == s]
        if ef and ee:
            ties.append(min(ee[0]) - min(ef[0]))
    df, de = deltas(fast_out), deltas(exact_out)
    # target layers fed by exactly the same source layers in both runs
    feeds = lambda scores: {t: {s for s, t2 in chosen(scores) if t2 == t} for _, t in chosen(scores)}  # noqa: E731
    ff, fe = feeds(fast), feeds(exact)
    same = [t for t in fe if ff.get(t) == fe[t]]
    dw_err = max((rel_err(df[t], de[t]) for t in same), default=0.0)
    return {"pairs_scored": len(exact), "sim_max_abs_err": sim_err, "dw_max_rel_err": dw_err,
            "target_layers_compared": len(same), "target_layers_exact": len(fe),
            "source_layers_choice_differs": len(differ),
            "choice_differs_max_exact_score_gap": max(ties, default=0.0)}


def naive(lora_path: Path, source_path: Path, target_path: Path, rank: int, device: str, exact_out: Path,
          full: bool) -> dict:
    lora = read_lora(lora_path)
    with CheckpointWeights(source_path) as source, CheckpointWeights(target_path) as target:
        stages = plan(lora, source, target)
        counts = plan_svds(stages, source, target)
        per_shape = time_svds(counts, source, target, device)
        estimate = sum(counts[s] * per_shape[s] for s in counts)
        # run one stage for real (the one with the fewest SVDs beyond the text encoder), or all with --quick
        unet = [st for st in stages if not st.startswith("clip")]
        cost = {st: sum(per_shape[s] for s in plan_svds({st: stages[st]}, source, target).elements())
                for st in unet}
        run = list(stages) if full else [min(cost, key=cost.get)]
        got, _, seconds = naive_transfer(lora, source, target, rank, device=device, stages=set(run))
    ref = deltas(exact_out)
    agree = max((rel_err(got[t], ref[t]) for t in got if t in ref), default=math.nan)
    return {"naive_s": seconds if full else estimate, "naive_extrapolated": not full,
            "naive_svds": sum(counts.values()),
            "naive_svd_s_by_shape": {f"{m}x{n}": [counts[(m, n)], round(per_shape[(m, n)], 3)]
                                     for m, n in sorted(counts)},
            "naive_ran_stages": run, "naive_ran_s": round(seconds, 2), "naive_ran_target_layers": len(got),
            "naive_ran_missing_in_engine": sum(t not in ref for t in got),
            "naive_vs_engine_exact_max_rel_err": agree}


def step_cost(lora_path: Path, work: Path, device: str, rank: int, steps: int, rounds: int) -> dict:
    """UNet forward time on tiny SDXL: LoRA applied by the pack's Apply node vs by ComfyUI's LoraLoader."""
    import comfy_harness
    comfy_harness.ensure_comfy_path()
    from comfy.cli_args import args
    args.cpu = not device.startswith("cuda")
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths

    import nodes
    from lorax_engine.files.lora_formats import write_lora

    pack = comfy_harness.load_pack()
    ncm = pack.NODE_CLASS_MAPPINGS

    def call(cls, **kw):
        out = getattr(cls(), cls.FUNCTION)(**kw)
        return out["result"] if isinstance(out, dict) else out

    with torch.inference_mode():
        sd15 = comfy.sd.load_checkpoint_guess_config(str(lorax_zoo.checkpoint("tiny_sd15")), output_vae=False,
                                                     output_clip=False)[0]
        sdxl = comfy.sd.load_checkpoint_guess_config(str(lorax_zoo.checkpoint("tiny_sdxl")), output_vae=False,
                                                     output_clip=False)[0]
        lora, _ = call(ncm["LoRAX_LoadSourceLoRA"], lora_name="", strength=1.0, lora_path=str(lora_path))
        smap, _, _ = call(ncm["LoRAX_SubspaceSimilarity"], source_model=sd15, target_model=sdxl, rank=rank,
                          threshold=-1.0, policy="best", method="fast", lora=lora)
        projected, _ = call(ncm["LoRAX_ProjectLoRA"], lora=lora, subspace_map=smap, mode="subspace", rank_cap=0)
        lorax_model, _ = call(ncm["LoRAX_ApplyToSDXL"], model=sdxl, clip=None, projected_lora=projected,
                              strength_model=1.0, strength_clip=1.0)
        loras = fresh(work / "comfy_loras")
        write_lora(projected, loras / "projected.safetensors", architecture="sdxl", dtype=torch.float32)
        folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
        stock_model, _ = nodes.LoraLoader().load_lora(sdxl, None, "projected.safetensors", 1.0, 1.0)

        dev = mm.get_torch_device()
        dm = sdxl.model
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 32, 32, generator=gen).to(dev)
        ctx = torch.randn(1, 77, dm.model_config.unet_config["context_dim"], generator=gen).to(dev)
        y = torch.randn(1, dm.adm_channels, generator=gen).to(dev)
        sigma = torch.tensor([1.0], device=dev)

        def forward_seconds(patcher) -> list[float]:
            mm.load_models_gpu([patcher])        # patches the weights, as sampling does
            patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y)     # warm-up
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return times

        per = {"lorax": [], "stock": [], "none": []}
        # interleaved rounds, so load drift on a shared machine hits all three alike
        for _ in range(rounds):
            for name, patcher in (("lorax", lorax_model), ("stock", stock_model), ("none", sdxl)):
                per[name] += forward_seconds(patcher)
        out_patched = {}
        for name, patcher in (("lorax", lorax_model), ("stock", stock_model)):
            mm.load_models_gpu([patcher])
            out_patched[name] = patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y).float().cpu()
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"step_ms_lorax": 1e3 * med["lorax"], "step_ms_stock": 1e3 * med["stock"],
            "step_ms_no_lora": 1e3 * med["none"], "step_overhead": med["lorax"] / med["stock"] - 1.0,
            "step_forwards_each": len(per["lorax"]), "step_latent": list(x.shape),
            "step_patched_layers": len(projected.layers),
            "step_outputs_max_abs_diff": float((out_patched["lorax"] - out_patched["stock"]).abs().max())}


# --------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small smoke run on the tiny zoo models")
    p.add_argument("--rank", type=int, default=None, help="subspace rank (default 320; 64 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="LoRAs in the batch run (default 10; 3 with --quick)")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench", help="scratch folder (default out/bench)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: naive,step,trained")
    p.add_argument("--models", choices=("zoo", "trained"), default="zoo",
                   help="zoo: sd15 -> sdxl (1/i spectra); trained: sd15_trained -> sdxl_trained (slow spectra, "
                        "CLIP-L fp32 vs its fp16 copy)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/results.jsonl")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    rank = args.rank or (64 if args.quick else 320)
    n_batch = args.batch or (3 if args.quick else 10)
    names = {(True, "zoo"): ("tiny_sd15", "tiny_sdxl"), (False, "zoo"): ("sd15", "sdxl"),
             (True, "trained"): ("tiny_sd15_trained", "demo_sdxl_trained"),
             (False, "trained"): ("sd15_trained", "sdxl_trained")}[(args.quick, args.models)]
    work = fresh(args.work)
    result = {"schema": 1, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "machine": machine(args.device), "models": list(names), "rank": rank, "lora_rank": 32,
              "lora_cover": "full", "threshold": "off", "policy": "best", "mode": "auto"}
    t_all = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t_all:7.1f} s] {msg}", flush=True)

    source, target = (lorax_zoo.checkpoint(n) for n in names)
    result["checkpoint_gb"] = round((source.stat().st_size + target.stat().st_size) / 1e9, 2)
    loras = fresh(work / "loras")
    lora_paths = [lorax_zoo.make_sd15_lora(loras / f"lora{i:02d}.safetensors", rank=32, seed=i, cover="full")
                  for i in range(n_batch)]
    cache = work / "cache"
    common = ["--source-model", str(source), "--target-model", str(target), "--rank", str(rank),
              "--threshold", "off", "--device", args.device, "--quiet"]

    def transfer(tag, *extra):
        out, rep = work / f"{tag}.safetensors", work / f"{tag}.json"
        s, rss = run_cli(["transfer", *common, "--lora", str(lora_paths[0]), "--out", str(out), "--report",
                          str(rep), "--cache-dir", str(cache), *extra], work / f"{tag}.log")
        say(f"{tag}: {s:.1f} s, peak RSS {rss:.2f} GB")
        return s, rss, out, rep

    say(f"cold transfer {source.name} -> {target.name}, r={rank}, cache {cache} (empty)")
    result["cold_s"], result["cold_peak_rss_gb"], cold_out, cold_rep = transfer("cold")
    result["warm_s"], result["warm_peak_rss_gb"], _, _ = transfer("warm")
    result["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20, 1)

    times = {}
    for n in (1, n_batch):
        src = fresh(work / f"batch{n}_in")
        for path in lora_paths[:n]:
            os.link(path, src / path.name)
        out_dir = fresh(work / f"batch{n}_out")
        times[n], _ = run_cli(["batch", *common, "--lora-dir", str(src), "--out-dir", str(out_dir),
                               "--cache-dir", str(cache)], work / f"batch{n}.log")
        say(f"batch of {n}: {times[n]:.1f} s")
    result["batch_1_s"], result[f"batch_{n_batch}_s"] = times[1], times[n_batch]
    result["batch_marginal_s_per_lora"] = (times[n_batch] - times[1]) / (n_batch - 1)

    say("exact transfer (exact bases to screen and to project)")
    result["exact_s"], _, exact_out, exact_rep = transfer("exact", "--exact")
    result.update(accuracy(cold_rep, exact_rep, cold_out, exact_out))
    say(f"fast vs exact: similarity max |Δ| {result['sim_max_abs_err']:.4f}, "
        f"ΔW max rel err {result['dw_max_rel_err']:.2e}")

    if "trained" not in skip:
        say("fast and exact vs float64 on trained-looking layer pairs")
        trained = trained_accuracy(**({"shapes": ((640, 640),), "spectra": ((0.2, 1e4),)} if args.quick else {}))
        print(trained_table(trained), flush=True)
        result.update(trained_max_score_err=trained["max_score_err"], trained_max_dw_err=trained["max_dw_err"],
                      trained_flips=trained["flips"], trained_rows=trained["rows"])

    if "naive" not in skip:
        say("naive reference transfer")
        result.update(naive(lora_paths[0], source, target, rank, args.device, exact_out, full=args.quick))
        result["naive_over_cold"] = result["naive_s"] / result["cold_s"]
        say(f"naive: {result['naive_s']:.0f} s{' (extrapolated)' if result['naive_extrapolated'] else ''}")
    if "step" not in skip:
        say("sampling-step cost (tiny SDXL in ComfyUI)")
        result.update(step_cost(lora_paths[0], work, args.device, min(rank, 64), steps=3 if args.quick else 8,
                                rounds=2 if args.quick else 3))
    result["cpu_s"] = {k: round(v, 1) for k, v in CPU_SECONDS.items()}
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    result["targets_met"] = {k: (result[k] >= b if op == ">=" else result[k] <= b)
                             for k, (op, b) in TARGETS.items() if k in result}

    print()
    print(f"{'figure':34} {'value':>14}  target")
    for k, v in result.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            op, b = TARGETS.get(k, ("", ""))
            mark = "" if k not in result["targets_met"] else ("  met" if result["targets_met"][k] else "  MISSED")
            print(f"{k:34} {v:>14.4g}  {op} {b}{mark}")
    line = json.dumps(result, sort_keys=True)
    if not args.no_record:
        with open(RESULTS, "a") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
