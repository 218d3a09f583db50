"""The `wbc-edge` command line: each command is a thin wrapper over one library call."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .build.targets import QUANTIZERS, TARGETS, targets_help
from .data.degrade import KINDS


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _known_errors() -> tuple:
    """Failures that are the input's or the machine's, not a bug: bad input, unusable bundle or engine,
    missing extra, an output that cannot be written (OSError: full disk, read-only, locked --out)."""
    from ._optional import MissingExtraError
    from .edge.runners import RunnerError

    known = [MissingExtraError, RunnerError, ValueError, OSError, NotImplementedError]
    trt = sys.modules.get("wbc_edge.build.tensorrt")  # loaded whenever an EngineError can have been raised
    return tuple(known + ([trt.EngineError] if trt else []))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


class _Group(click.Group):
    """Exit codes (README "Failure modes"): known failures end as one clear line, not a traceback (1);
    usage errors are click's (2); Ctrl-C and SIGTERM at any point, start-up included, end with 128 + the
    signal (130, 143): SIGTERM is raised like Ctrl-C so the same cleanup runs."""

    def invoke(self, ctx):
        from .outdir import signal_of, signals_interrupt

        with signals_interrupt() as seen:
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt as exc:  # click's own handler would print "Aborted!" and exit 1
                _interrupted(signal_of(exc))
            except Exception as exc:
                if seen.signum is not None:  # the interrupt came back as a library's error (e.g. an
                    # extension module whose import it cut short)
                    _interrupted(seen.signum)
                _fail(exc)


def _interrupted(signum: int):
    from .outdir import exit_code_for

    click.echo(f"interrupted ({signal.Signals(signum).name})", err=True)
    sys.exit(exit_code_for(signum))


def _fail(exc: Exception):
    """A known failure as click's one-line error (exit 1); anything else is a bug: its traceback stays."""
    if not isinstance(exc, _known_errors()) or isinstance(exc, click.ClickException):
        raise exc
    if logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("wbc_edge").exception("failed")  # called inside the except: the traceback with -v
    raise click.ClickException(_one_line(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wbc-edge")
@click.option("-v", "--verbose", is_flag=True, help="log progress details")
@click.option("--trust-unsigned", is_flag=True,
              help="run bundles whose manifest carries no checksum of itself (sets WBC_EDGE_TRUST_UNSIGNED=1)")
@click.option("--max-pixels", type=click.IntRange(min=1),
              help="largest image decoded at full size (default 50 MP; larger JPEGs are decoded reduced, "
                   "others refused; sets WBC_EDGE_MAX_PIXELS)")
def main(verbose: bool, trust_unsigned: bool, max_pixels: int | None) -> None:
    """Classify white blood cells in blood-smear images, at the edge."""
    import os

    from .bundle import TRUST_ENV
    from .data.images import MAX_PIXELS_ENV

    _setup_logging(verbose)
    # read where they apply (Bundle.load, the image reader), so every command and library call sees
    # them without plumbing
    if trust_unsigned:
        os.environ[TRUST_ENV] = "1"
    if max_pixels:
        os.environ[MAX_PIXELS_ENV] = str(max_pixels)


def _views_option(ctx, param, value):
    """--views checked before the command runs: a typo must not start a run or create outputs."""
    from .edge.tta import parse_views

    try:
        return parse_views(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML config")
@click.option("--data", help="ImageFolder (<CODE>/<file>) or manifest CSV")
@click.option("--out", help="bundle directory to write")
@click.option("--member", help="backbone from the member registry")
@click.option("--classes", help="comma-separated class codes (default: every WBC class found)")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--input-size", type=int)
@click.option("--seed", type=int)
@click.option("--exclude-from", type=click.Path(exists=True), help="skip files whose names appear here")
@click.option("--max-per-class", type=int)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="any other config key (YAML value)")
def train(config_path, sets, classes, **opts):
    """Train an ensemble bundle on labelled cells (needs the `train` extra)."""
    import yaml

    from .outdir import claim
    from .trainer.config import load_config
    from .trainer.loop import train as run_train

    extra = dict(s.split("=", 1) for s in sets)
    opts.update({k.replace("-", "_"): yaml.safe_load(v) for k, v in extra.items()})
    opts["classes"] = classes.split(",") if classes else None
    cfg = load_config(config_path, **opts)
    with claim(cfg.out):  # one training run per bundle directory (a second would mix checkpoints)
        bundle = run_train(cfg)
    summary = bundle.extra["training"]
    best = summary["best_val_macro_f1"]
    click.echo(f"bundle: {bundle.root} ({len(bundle.members)} member(s), {summary['n_train']} training images, "
               f"{summary['seconds']:.0f} s); mean best val macro-F1: {'n/a' if best is None else f'{best:.4f}'}")


@main.command(epilog="Targets:\n\n" + targets_help().replace("\n", "\n\n"))
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--target", type=click.Choice(list(TARGETS)), default="onnx", show_default=True)
@click.option("--calib", type=click.Path(exists=True), help="real cells to calibrate INT8 on")
@click.option("--val", type=click.Path(exists=True), help="labelled cells for the check against FP32")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--max-f1-drop", type=float, default=0.01, show_default=True,
              help="refuse an INT8 build losing more macro-F1 than this (0.01 = 1 point)")
@click.option("--quantizer", type=click.Choice(list(QUANTIZERS)),
              help="INT8 targets: who places the Q/DQ nodes (default: ort; trt-int8 also takes modelopt, "
                   "extra `modelopt`)")
@click.option("--fuse", is_flag=True, help="onnx: also one graph for the whole ensemble (weighted mean)")
@click.option("--check", "check_data", type=click.Path(exists=True),
              help="parity on these real cells: PyTorch vs ORT FP32 (if torch is installed), fused vs members")
@click.option("--out", type=click.Path(file_okay=False), help="triton: the model repository to write")
@click.option("--triton-backend", type=click.Choice(["onnxruntime", "python"]), default="onnxruntime",
              show_default=True, help="triton: onnxruntime_onnx, or ONNX Runtime inside the Python backend")
@click.option("--instance-kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="triton: instance_group kind")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="triton: model instances")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="triton: max_batch_size in cells (each cell runs every TTA view inside)")
def build(bundle, target, calib, val, calib_method, max_f1_drop, quantizer, fuse, check_data, out,
          triton_backend, instance_kind, instances, max_batch):
    """Build deployable artifacts for BUNDLE (no torch needed)."""
    from .build.builder import build as run_build

    if quantizer and not TARGETS[target].quantizers:
        raise click.UsageError(f"--quantizer applies to INT8 targets, not {target!r}")
    if TARGETS[target].writes_out != bool(out):
        raise click.UsageError(f"target {target} needs --out" if out is None else "--out applies to target triton")
    opts = {"calib": calib, "val": val, "calib_method": calib_method, "max_f1_drop": max_f1_drop,
            "quantizer": quantizer} if TARGETS[target].quantizers else {"fuse": fuse} if target == "onnx" else {}
    if target == "triton":
        opts = {"out": out, "backend": triton_backend, "kind": instance_kind, "instances": instances,
                "max_batch": max_batch}
    b = run_build(bundle, target, check=check_data, **opts)
    if out:
        click.echo(f"Triton model repository in {out} (model wbc_edge; serving it: README 'Serving on Triton')")
        return
    for r in b.extra.get("parity", []) if check_data else []:
        click.echo(f"parity {r.get('member', 'ensemble')} {r['check']}: max abs {r['max_abs']:.2e} "
                   f"{'ok' if r['ok'] else 'FAILED'}")
    click.echo(f"built {target} for {len(b.members)} member(s) in {b.root}")
    check = b.extra.get("calibration", {}).get(TARGETS[target].calibration)
    if check:
        click.echo(f"vs FP32 on {check['n_val']} cells: top-1 agreement {check['top1_agreement']:.4f}, "
                   f"macro-F1 drop {100 * check['macro_f1_drop']:.2f} points")


def _scale_options(f):
    """The physical-scale options evaluate and stream share."""
    f = click.option("--scale-per", type=click.Choice(["slide", "image"]), default="slide", show_default=True,
                     help="estimate the physical scale from red cells pooled over a slide (a folder of frames, "
                          "a video/camera stream, a crops stream, a dataset or its `group` column) or per image")(f)
    return click.option("--pixel-size", type=click.FloatRange(min=0, min_open=True),
                        help="um per pixel of the input when known (default: estimated from red cells)")(f)


def _check_server(ctx, param, value):
    from .edge.triton_runner import parse_server

    try:
        if value is not None:
            parse_server(value)  # checked before any work; the runner parses it again
        return value
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _server_option(f):
    return click.option("--server", metavar="grpc://HOST:PORT[/MODEL]", callback=_check_server,
                        help="classify on a Triton server (a repository from `build --target triton`; "
                             "its model checksum must match the bundle's; extra `triton`)")(f)


@main.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="results/evaluate", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32", show_default=True)
@click.option("--views", callback=_views_option, help="comma-separated TTA views (default: the bundle's)")
@click.option("--refine/--no-refine", default=True, show_default=True, help="apply the bundle's enabled refinement")
@click.option("--label-map", metavar="NAME|FILE.yaml",
              help="map labels and predictions, e.g. 5part; default: automatic")
@_scale_options
@_server_option
def evaluate(data, bundle, out, device, precision, views, refine, label_map, pixel_size, scale_per, server):
    """Score BUNDLE on labelled DATA: per-class table, macro-F1, confusion matrix PNG."""
    from .evaluate import evaluate as run_evaluate
    from .metrics import format_report

    rep = run_evaluate(bundle, data, out, device, precision, views, refine=refine,
                       label_map=label_map, pixel_size=pixel_size, scale_per=scale_per, server=server)
    if rep["scored_on"] == "model":
        click.echo(format_report(rep))
        click.echo(f"\nmacro-F1 {rep['macro_f1']:.4f} on {rep['n']} cells labelled with the model's classes")
    if "mapped" in rep:
        m = rep["mapped"]
        click.echo(f"\nlabels and predictions mapped through label map {m['map']}:\n{format_report(m)}")
        click.echo(f"\n{m['map']} macro-F1 {m['macro_f1']:.4f} on {m['n']} cells")
    click.echo(f"({rep['runner']}, views {rep['views']}); {rep['n_unknown_label']} with labels not scored, "
               f"{rep['n_unreadable']} unreadable")
    click.echo(f"results in {out}/ ({', '.join(rep['files'])})")


@main.command()
@click.argument("source")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="results/stream", show_default=True, type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(["auto", "frames", "crops", "video", "camera", "watch"]), default="auto",
              show_default=True, help="auto: a video file, a camera index/URL, or a folder of frames")
@click.option("--crops", "crops_flag", is_flag=True, help="same as --mode crops (inputs are single cells)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default="fp32", show_default=True)
@click.option("--views", callback=_views_option, help="comma-separated TTA views (default: the bundle's)")
@click.option("--max-batch", type=int, default=64, show_default=True)
@click.option("--max-delay-ms", type=float, default=20.0, show_default=True)
@click.option("--annotate", is_flag=True, help="write annotated frames / video")
@click.option("--report/--no-report", default=True, show_default=True, help="HTML report with gallery")
@click.option("--loop", type=int, default=1, show_default=True, help="repeat a finite source N times")
@click.option("--max-frames", type=int)
@click.option("--workers", type=int, default=1, show_default=True, help="localiser threads")
@click.option("--low-confidence", type=float, default=0.5, show_default=True)
@click.option("--review-max", type=int, default=2000, show_default=True)
@click.option("--retries", type=int, default=5, show_default=True, help="camera reconnect attempts")
@click.option("--watch-idle", "watch_idle_s", type=float, default=10.0, show_default=True)
@click.option("--refine/--no-refine", default=True, show_default=True, help="apply the bundle's enabled refinement")
@_scale_options
@_server_option
def stream(source, bundle, out, mode, crops_flag, views, **opts):
    """Classify the white cells in SOURCE: per-cell rows, a differential count, a review queue, a report."""
    from .edge.pipeline import run_stream
    from .edge.report import summary_text

    summary = run_stream(source, bundle, out, mode="crops" if crops_flag else mode,
                         views=views, **opts)
    click.echo(summary_text(summary.to_dict()))
    sys.exit(summary.exit_code)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--val", required=True, type=click.Path(exists=True), help="labelled validation cells (not test cells)")
@click.option("--morph", type=click.Path(exists=True), help="labelled training cells for the morphology models")
@click.option("--verify", "verify_source", metavar="SOURCE",
              help="phase 2 embedder: member[:N], bundle:DIR, onnx:FILE, timm:NAME[@WEIGHTS] or hf:DIR "
                   "(prototypes from the --morph cells)")
@click.option("--prototypes", "per_class", type=click.IntRange(1, 32), default=3, show_default=True,
              help="phase 2 prototypes per class (k-means)")
def refine(bundle, val, morph, verify_source, per_class):
    """Fit BUNDLE's confidence temperature and refinement on labelled cells: the temperature (validation
    NLL; the class never changes, only its probability), phase 1 (logit offsets for macro-F1); with --morph,
    phase 3 (morphology models for confusion pairs); with --verify too, phase 2 (embedding prototypes
    that must back every switch to a rarer class). The phases are then switched on or off together:
    the subset with the best macro-F1 on the validation cells phase 1 was not fitted on."""
    from .bundle import Bundle
    from .edge.confidence import fit_bundle_temperature, validation_cells
    from .edge.refine.refiner import fit_morphology, fit_refinement, fit_verification, select_phases

    if verify_source and not morph:
        raise click.UsageError("--verify needs --morph (the training cells its prototypes come from)")
    if verify_source:
        from .edge.refine.embed import EmbedderError, check_source

        try:
            check_source(verify_source)
        except EmbedderError as exc:
            raise click.BadParameter(str(exc), param_hint="--verify") from exc

    b = Bundle.load(bundle)
    cells = validation_cells(b, val, progress=True)  # read and predicted once for every fit below
    t = fit_bundle_temperature(b, val, val=cells)  # first: the phases are fitted on calibrated probabilities
    click.echo(f"confidence: temperature {t['temperature']} (fitted {t['fitted_temperature']:.3f}); validation "
               f"NLL {t['nll_before']:.4f} -> {t['nll_after']:.4f}, ECE {t['ece_before']:.4f} -> {t['ece_after']:.4f}")
    boost = fit_refinement(b, val, val=cells)
    state = "enabled" if boost["enabled"] else "left disabled (no gain)"
    click.echo(f"boost: fit half {boost['macro_f1_before']:.4f} -> {boost['macro_f1_after']:.4f}, check half "
               f"{boost['check_macro_f1_before']:.4f} -> {boost['check_macro_f1_after']:.4f} ({boost['n_val']} "
               f"cells); {state}; offsets {boost['offsets']}")
    if morph:
        m = fit_morphology(b, morph, val, progress=True, val=cells)
        click.echo(f"morphology: val macro-F1 {m['val_macro_f1_before']:.4f} -> {m['val_macro_f1_after']:.4f} "
                   f"(close {m['close']}); {'enabled' if m['enabled'] else 'left disabled (no gain)'}; pairs "
                   f"before {m['pairs_before']} after {m['pairs_after']}")
    if verify_source:
        v = fit_verification(b, morph, val, verify_source, per_class, progress=True, val=cells)
        click.echo(f"verify ({verify_source}, {v['n_prototypes']} prototypes): val macro-F1 "
                   f"{v['val_macro_f1_before']:.4f} -> {v['val_macro_f1_after']:.4f} (rank {v['rank']}); "
                   f"{'enabled' if v['enabled'] else 'left disabled (no gain)'}; by rank {v['by_rank']}")
    if morph:
        sel = select_phases(b, val, val=cells)
        click.echo(f"phases chosen jointly on {sel['n_check']} validation cells: {sel['chosen']} "
                   f"(macro-F1 {', '.join(f'{k} {v:.4f}' for k, v in sel['macro_f1'].items())})")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("cells", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="the new bundle (a new or empty directory)")
@click.option("--labels", type=click.Path(exists=True),
              help="few-shot: labelled cells of the site, at most 20 per class (5-part codes map to the "
                   "model's classes, NE to SNE); refits the classifier head on the adapted backbone")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="cells per BatchNorm statistics batch")
@_scale_options
def adapt(bundle, cells, out, labels, batch_size, pixel_size, scale_per):
    """Calibrate BUNDLE to a new site: BatchNorm statistics re-estimated on the site's unlabelled CELLS
    (pooled over the site), its stain reference recorded; written as a new bundle (needs the `train`
    extra). Built INT8/TensorRT artifacts and the fused graph are left out: rebuild them with `build`."""
    from .fit.adapt import adapt as run_adapt

    a = run_adapt(bundle, cells, out, labels, pixel_size, scale_per, batch_size).extra["adapt"]
    before, after = a["predictions_before"], a["predictions_after"]
    click.echo(f"adapted bundle: {out} ({a['cells']['n']} cells of {cells}, "
               f"{len(a['cells']['unreadable'])} unreadable)")
    for m in a["members"]:
        bn = (f"{m['bn_layers']} BatchNorm layers, running variances moved by |log ratio| "
              f"{m['var_abs_log_ratio']:.3f}, means by {m['mean_abs_change_in_sd']:.3f} sd" if m["bn_layers"]
              else "no BatchNorm layers, nothing to re-estimate")
        click.echo(f"member {m['member']}: {bn}"
                   + (f"; head on {m['head']['n']} labelled views: accuracy "
                      f"{m['head']['train_accuracy_before']:.3f} -> {m['head']['train_accuracy_after']:.3f}"
                      if "head" in m else ""))
    click.echo(f"site cells: mean top-1 probability {before['mean_max_prob']:.3f} -> "
               f"{after['mean_max_prob']:.3f}, predicted-class entropy "
               f"{before['predicted_class_entropy']:.2f} -> {after['predicted_class_entropy']:.2f} bits")
    click.echo(f"  predicted before {before['predicted']}\n  predicted after  {after['predicted']}")
    if "few_shot" in a:
        f = a["few_shot"]
        click.echo(f"few-shot labels per class {f['per_class']}" +
                   (f"; skipped (no model class): {f['skipped_labels']}" if f["skipped_labels"] else ""))
    if a["dropped"]:
        click.echo(f"left out (stale after adaptation): {', '.join(a['dropped'])}; rebuild with "
                   f"`wbc-edge build {out} --target ...`")


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="the ensemble bundle (a new or empty directory)")
@click.option("--weights", help="comma-separated ensemble weight per BUNDLE (default: equal)")
@click.option("--val", type=click.Path(exists=True), help="labelled held-out cells to fit the temperature on")
@click.option("--drift-cells", type=click.Path(exists=True),
              help="the members' training cells, for the drift monitor's statistics")
def combine(bundles, out, weights, val, drift_cells):
    """Join the members of several trained BUNDLES (same classes, preprocessing, scale and colour
    anchors) into one ensemble bundle; its temperature and drift statistics are fitted again."""
    from .fit.combine import combine as run_combine

    w = [float(x) for x in weights.split(",")] if weights else None
    b = run_combine(bundles, out, w, val, drift_cells)
    click.echo(f"ensemble bundle: {out} ({len(b.members)} members: "
               f"{', '.join(f'{m.name} {m.arch} x{m.weight:g}' for m in b.members)}); temperature "
               f"{b.extra.get('confidence', {}).get('temperature', 1.0)}")


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--kind", required=True, type=click.Choice(list(KINDS)), help="degradation kind")
@click.option("--severity", type=click.IntRange(1, 4), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def degrade(src, dst, kind, severity, seed):
    """Write degraded copies of the cells in SRC to DST, with a manifest (robustness benchmarks)."""
    import csv

    from .data.degrade import degrade_dataset

    manifest = degrade_dataset(src, dst, kind, severity, seed)
    rows = list(csv.DictReader(open(manifest)))
    click.echo(f"wrote {len(rows)} rows to {manifest}; {sum(1 for r in rows if r['error'])} unreadable input(s) "
               "listed with their reason")


@main.command("train-restorer")
@click.option("--data", required=True, type=click.Path(exists=True), help="clean cells (ImageFolder or manifest)")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False), help="the bundle to extend")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the new bundle (with the restorer)")
@click.option("--exclude-from", type=click.Path(exists=True), help="skip files whose names appear here")
@click.option("--cells", "n_cells", type=click.IntRange(min=2), default=3000, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--width", type=click.IntRange(min=4), default=16, show_default=True, help="U-Net channels")
@click.option("--max-minutes", type=float, help="stop training after this long and export what was learned")
@click.option("--seed", type=int, default=0, show_default=True)
def train_restorer(data, bundle, out, exclude_from, n_cells, epochs, width, max_minutes, seed):
    """Train the learned restorer (U-Net on synthetic degraded pairs) and write a copy of BUNDLE with it
    and its quality gate (`restore` section) to OUT."""
    from .trainer.restorer import RestorerConfig
    from .trainer.restorer import train_restorer as run

    b = run(data, bundle, out, RestorerConfig(width=width, n_cells=n_cells, epochs=epochs, seed=seed,
                                              max_minutes=max_minutes), exclude_from)
    last = b.extra["restore"]["training"]["history"][-1]
    click.echo(f"restorer bundle: {out}; validation PSNR {last['val_psnr']:.2f} dB (degraded "
               f"{last['val_psnr_degraded']:.2f}); gate {b.extra['restore']['gate']}")


BENCHMARKS = ("throughput", "stream", "cross_site", "site_ablation", "site_members", "site_adapt", "drift",
              "robustness", "bench_stream", "bench_int8", "bench_localise", "bench_stain_quality", "bench_features",
              "longtail_ablation")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name", type=click.Choice(BENCHMARKS))
@click.pass_context
def bench(ctx, name):
    """Run benchmarks/NAME.py from a source checkout (extra arguments go to it; try `-- --help`)."""
    import importlib

    root = Path.cwd()
    if not (root / "benchmarks" / f"{name}.py").is_file():
        raise click.ClickException("run `wbc-edge bench` from the root of a wbc-edge checkout (benchmarks/ is "
                                   "not installed with the package)")
    sys.path.insert(0, str(root))
    result = importlib.import_module(f"benchmarks.{name}").main(list(ctx.args))
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
