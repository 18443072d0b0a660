"""Commands ``transfer``, ``similarity`` and ``batch`` of ``python -m lorax_engine``.

    transfer   --source-model SD15.safetensors --target-model SDXL.safetensors --lora IN --out OUT
               [--report R.json] [--plot P.png] [--rank 320] [--threshold T] [--mode M] [--policy P]
               [--output-rank K] [--device cuda|cpu] [--cache-dir DIR | --no-cache] [--fast | --exact]
    similarity --source-model ... --target-model ... [--lora IN] [--plot P.png] [--report R.json]
    batch      --source-model ... --target-model ... --lora-dir DIR --out-dir DIR [--report-dir DIR]

Bases are cached in ``--cache-dir`` (default ``$LORAX_CACHE_DIR`` or ``~/.cache/lorax/subspaces``), so a
second run against the same models is fast; ``batch`` computes them once for the whole folder. Progress
goes to stderr. Inputs of the wrong architecture are refused before any work (files/compatibility.py).
Errors print one line (see cli.py); ``batch`` skips a LoRA of another architecture (an SDXL LoRA among SD1.5
ones) with the reason, carries on past a bad file, and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ..analysis.matching import DEFAULT_POLICY, DEFAULT_THRESHOLD, POLICIES
from ..analysis.subspaces import DEFAULT_RANK, SubspaceCache, default_cache_dir
from ..atomic import write_text_atomic
from ..cache_bound import DiskBound
from ..errors import ArchitectureError, LoraXError, OutputPathError, TransferOptionError
from ..files.base_weights import CheckpointWeights
from ..files.compatibility import check_model_pair, check_transfer_inputs
from ..files.lora_formats import read_lora
from ..files.output_names import sanitize_stem, unique_output_path
from ..files.provenance import attach, hash_ahead, source_provenance, write_lora_with_provenance
from ..files.safetensors_file import PICKLE_SUFFIXES
from ..projection.operators import DEFAULT_MODE, MODES
from ..projection.transfer import TransferOptions, compute_similarity_map, transfer
from ..reports.plot import plot_similarity

LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)   # what ``batch`` picks up in a folder


# --------------------------------------------------------------------------------------------- arguments

def _threshold(text: str) -> float:
    if text.strip().lower() in ("off", "none"):
        return -math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use 'off' to apply every candidate)") from None


def default_device() -> str:
    """The GPU when there is one: that is where users run, and bases compute several times faster there."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_args(p):
    p.add_argument("--source-model", required=True, help="checkpoint the LoRA was trained on (.safetensors)")
    p.add_argument("--target-model", required=True, help="checkpoint to carry the LoRA over to (.safetensors)")


def _option_args(p, projection: bool = True):
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"subspace rank r (default {DEFAULT_RANK})")
    p.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                   help=f"minimum normalised similarity, 0 = chance, 1 = same (default {DEFAULT_THRESHOLD}; "
                        "'off' applies every candidate)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--fast", dest="exact", action="store_false",
                       help="score candidates with randomised bases, project with Gram bases (default)")
    speed.add_argument("--exact", dest="exact", action="store_true", help="exact bases everywhere (slower)")
    p.set_defaults(exact=False)
    p.add_argument("--device", default=default_device(),
                   help="where bases are computed: cpu or cuda (default: cuda when torch sees a CUDA GPU, else cpu; "
                        f"here {default_device()})")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", type=Path, default=None,
                       help="subspace cache folder (default $LORAX_CACHE_DIR or ~/.cache/lorax/subspaces)")
    cache.add_argument("--no-cache", action="store_true", help="do not read or write the disk cache")
    p.add_argument("--rehash", action="store_true",
                   help="hash the models' weights again instead of trusting the digest memo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if projection:
        p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                       help=f"{', '.join(MODES)} (default {DEFAULT_MODE}; direct is the baseline: no projection)")
        p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                       help=f"target layer choice (default {DEFAULT_POLICY})")
        p.add_argument("--output-rank", type=int, default=None, help="cap the output rank (truncated SVD)")


def add_arguments(subparsers) -> None:
    p = subparsers.add_parser("transfer", help="carry a LoRA from its base model to another one (LoRA-X)")
    _model_args(p)
    p.add_argument("--lora", required=True, help="LoRA file trained on the source model")
    p.add_argument("--out", required=True, type=Path, help="output LoRA (.safetensors)")
    p.add_argument("--report", type=Path, help="write the per-layer report as JSON")
    p.add_argument("--plot", type=Path, help="write the similarity plot as PNG")
    p.add_argument("--table", action="store_true", help="print the per-layer table")
    _option_args(p)
    p.set_defaults(run=run_transfer)

    p = subparsers.add_parser("similarity", help="similarity map of two base models (and plot), no LoRA written")
    _model_args(p)
    p.add_argument("--lora", help="only the layers this LoRA touches (default: every layer of a known role)")
    p.add_argument("--report", type=Path, help="write the map as JSON")
    p.add_argument("--plot", type=Path, help="write the similarity plot as PNG")
    _option_args(p, projection=False)
    p.set_defaults(run=run_similarity)

    p = subparsers.add_parser("batch", help="transfer every LoRA of a folder (bases computed once)")
    _model_args(p)
    p.add_argument("--lora-dir", required=True, type=Path,
                   help="folder of LoRA files (.safetensors; pickles are read weights-only)")
    p.add_argument("--out-dir", required=True, type=Path, help="folder for the transferred LoRAs")
    p.add_argument("--report-dir", type=Path, help="folder for per-file JSON reports")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: add a counter)")
    _option_args(p)
    p.set_defaults(run=run_batch)


# --------------------------------------------------------------------------------------------- helpers

class ProgressBar:
    """A one-line progress bar on stderr (plain lines, at most every few seconds, when not a terminal)."""

    def __init__(self, label: str = "", enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.label = label
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int):
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"{self.label} [{bar}] {100 * frac:5.1f}% ({done}/{total})"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()
        self._shown = True

    def close(self):
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = False


def _options(args) -> TransferOptions:
    return TransferOptions(rank=args.rank, method="exact" if args.exact else "fast", threshold=args.threshold,
                           policy=getattr(args, "policy", DEFAULT_POLICY), mode=getattr(args, "mode", DEFAULT_MODE),
                           output_rank=getattr(args, "output_rank", None), device=args.device)


def _cache(args) -> SubspaceCache:
    if args.no_cache:
        return SubspaceCache()
    return SubspaceCache(args.cache_dir or default_cache_dir())


def _open_models(args, cache: SubspaceCache):
    memo = cache.fingerprint_dir
    source = CheckpointWeights(args.source_model, fingerprint_dir=memo, rehash=args.rehash)
    try:
        target = CheckpointWeights(args.target_model, fingerprint_dir=memo, rehash=args.rehash)
    except BaseException:
        source.close()
        raise
    return source, target


def _write_text(path: Path, text: str):
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise OutputPathError(f"{path}: cannot be written ({err.strerror or err})") from None


def _plot(path: Path, rows, threshold, title):
    try:
        plot_similarity(rows, threshold, title, path)
    except OSError as err:
        raise OutputPathError(f"{path}: cannot be written ({err.strerror or err})") from None


def _summary_line(report) -> str:
    s = report.summary()
    reasons = ", ".join(f"{n} {r}" for r, n in s["dropped_by_reason"].items()) or "none dropped"
    moved = s["moved"]
    work = report.work
    pairs = (f"; pairs: {work['identical_by_value']} identical by value, {work['decided_on_estimate']} ruled out by "
             f"a bound, {work['scored_exactly']} scored exactly" if work else "")
    return (f"{s['applied']}/{s['source_layers']} layers applied -> {s['target_layers_written']} target layers "
            f"({reasons}); energy kept {100 * s['energy_kept']:.1f}%; moved: {moved['whole']} whole, "
            f"{moved['little']} <= 2%, {moved['more']} more{pairs}; {s['seconds']:.1f} s")


def _check_output_paths(*paths):
    """Refuse unusable output paths before the minutes of work, not after them."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise OutputPathError(f"{path}: is a folder; give the output a file name")
        if not path.parent.is_dir():
            raise OutputPathError(f"{path}: the folder {path.parent} does not exist")


def _record_sources(result, report, args, lora_path, cache: SubspaceCache):
    """The files read, with their sha256, into the report and the result's metadata."""
    attach(result, report, source_provenance(lora_path=lora_path, source_model=args.source_model,
                                             target_model=args.target_model, memo_dir=cache.fingerprint_dir))


def _write_result(result, report, out: Path):
    if not result.layers:
        raise TransferOptionError(f"nothing to write to {out}: no layer passed the threshold "
                                  f"({_summary_line(report)}); see the report, or lower --threshold")
    if result.architecture not in ("sd1", "sdxl"):
        raise TransferOptionError(f"cannot write {out}: the target model's architecture is "
                                  f"{report.target_architecture!r}")
    # the result carries the report's lorax.* keys, provenance included
    write_lora_with_provenance(result, out, architecture=result.architecture)


# --------------------------------------------------------------------------------------------- commands

def run_transfer(args) -> int:
    options = _options(args)
    _check_output_paths(args.out, args.report, args.plot)
    cache = _cache(args)
    lora = read_lora(args.lora)
    source, target = _open_models(args, cache)
    bar = ProgressBar("transfer", not args.quiet)
    try:
        check_transfer_inputs(lora, source, target)     # before the files are hashed
        hash_ahead(args.lora, args.source_model, args.target_model, memo_dir=cache.fingerprint_dir)
        with DiskBound(cache) as bound:                 # also after an error or Ctrl-C
            result, report = transfer(lora, source, target, options, cache=cache, progress=bar, should_stop=bound)
    finally:
        bar.close()
        source.close()
        target.close()
    _record_sources(result, report, args, args.lora, cache)
    _write_result(result, report, args.out)
    if args.report:
        _write_text(args.report, report.to_json())
    if args.plot:
        _plot(args.plot, report.plot_rows(), options.threshold, f"{Path(args.lora).name}: {source.name} -> "
                                                                  f"{target.name}")
    if args.table:
        print(report.format_table())
    print(f"wrote {args.out}: {_summary_line(report)}")
    return 0


def run_similarity(args) -> int:
    options = _options(args)
    _check_output_paths(args.report, args.plot)
    cache = _cache(args)
    lora = read_lora(args.lora) if args.lora else None
    source, target = _open_models(args, cache)
    bar = ProgressBar("similarity", not args.quiet)
    try:
        if lora is not None:
            check_transfer_inputs(lora, source, target)
        else:
            check_model_pair(source, target)
        with DiskBound(cache) as bound:
            smap = compute_similarity_map(source, target, options, cache=cache, progress=bar, should_stop=bound,
                                          source_keys=sorted(lora.layers) if lora else None)
    finally:
        bar.close()
        source.close()
        target.close()
    if args.report:
        import json
        _write_text(args.report, json.dumps(smap.to_dict(), indent=1))
    rows = smap.plot_rows()
    if args.plot:
        _plot(args.plot, rows, options.threshold, f"{source.name} -> {target.name}")
    scored = [r["best"] for r in rows if r["best"] is not None]
    above = sum(s >= options.threshold for s in scored)
    mean = sum(scored) / len(scored) if scored else math.nan
    print(f"{len(rows)} source layers, {len(scored)} with candidates; best score >= threshold "
          f"{options.threshold:g}: {above}; mean best score {mean:.3f}; {smap.seconds:.1f} s")
    return 0


def run_batch(args) -> int:
    options = _options(args)
    if not args.lora_dir.is_dir():
        raise TransferOptionError(f"{args.lora_dir}: not a folder")
    files = sorted(p for p in args.lora_dir.iterdir() if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
    if not files:
        raise TransferOptionError(f"{args.lora_dir}: no LoRA files ({', '.join(LORA_SUFFIXES)})")
    for folder in (args.out_dir, args.report_dir):
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputPathError(f"{folder}: cannot be created ({err.strerror or err})") from None
    cache = _cache(args)
    source, target = _open_models(args, cache)
    failures, skipped, written, start = [], [], set(), time.perf_counter()
    bound = DiskBound(cache)
    try:
        check_model_pair(source, target)
        hash_ahead(args.source_model, args.target_model, memo_dir=cache.fingerprint_dir)
        for i, path in enumerate(files, 1):
            bar = ProgressBar(f"[{i}/{len(files)}] {path.name[:40]}", not args.quiet)
            try:
                lora = read_lora(path)
                result, report = transfer(lora, source, target, options, cache=cache, progress=bar,
                                          should_stop=bound)
                bar.close()
                _record_sources(result, report, args, path, cache)
                out = args.out_dir / f"{sanitize_stem(path.stem)}.safetensors"
                # "a.pt" and "a.safetensors" of one folder must not overwrite each other's output
                if not args.overwrite or out in written:
                    out = unique_output_path(args.out_dir, path.stem)
                _write_result(result, report, out)
                written.add(out)
                if args.report_dir:
                    _write_text(args.report_dir / f"{out.stem}.json", report.to_json())
                print(f"ok     {path.name} -> {out.name}: {_summary_line(report)}", flush=True)
            except ArchitectureError as err:    # e.g. an SDXL LoRA among SD1.5 ones: nothing to convert
                bar.close()
                skipped.append((path.name, str(err)))
                print(f"skipped {path.name}: {err}", flush=True)
            except LoraXError as err:
                bar.close()
                failures.append((path.name, str(err)))
                print(f"FAILED {path.name}: {err}", flush=True)
            except Exception as err:   # a bug on one file must not cost the user the rest of the folder
                bar.close()
                failures.append((path.name, f"unexpected {type(err).__name__}: {err}"))
                print(f"FAILED {path.name}: unexpected {type(err).__name__}: {err}", flush=True)
    finally:
        source.close()
        target.close()
        bound.trim()
    converted = len(files) - len(failures) - len(skipped)
    print(f"batch: {converted} of {len(files)} converted, {len(skipped)} skipped, {len(failures)} failed, "
          f"{time.perf_counter() - start:.1f} s")
    for label, entries in (("skipped", skipped), ("failed", failures)):
        for name, err in entries:
            print(f"  {label} {name}: {err}")
    return 1 if failures else 0
