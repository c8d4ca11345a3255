"""The `defectfusion` command: argument parsing and user-facing errors, nothing else.

Each subcommand imports its stage lazily, so `--help` is instant and a data command
does not pay for importing torch. A `UserError` (bad input) is printed as one line
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from defectfusion.core.errors import UserError
from defectfusion.core.fsutil import os_error_message
from defectfusion.core.version import __version__

Handler = Callable[[argparse.Namespace], int | None]


# ---- handlers: translate arguments into calls to the stages ----------------------------


def _data_synth(a: argparse.Namespace) -> None:
    from defectfusion.data.synth import SynthSpec, generate

    spec = SynthSpec(
        seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, image_size=a.image_size
    )
    generate(a.out, spec)


def _data_prepare(a: argparse.Namespace) -> None:
    from defectfusion.data import prepare

    cfg = _load_config(a)
    prepare(dataclasses.asdict(cfg.pipeline.dataset), cfg.data.image_size, a.out or cfg.data.dir)


def _data_import_neu(a: argparse.Namespace) -> None:
    from defectfusion.data.importers import import_neu

    import_neu(a.src, a.out, seed=a.seed)


def _data_import_coco(a: argparse.Namespace) -> None:
    from defectfusion.data.importers import import_coco

    import_coco(a.images, a.annotations, a.out, seed=a.seed, splits=a.split)


def _data_validate(a: argparse.Namespace) -> int:
    from defectfusion.data.validate import validate_path

    report = validate_path(a.path, check_images=not a.skip_images)
    print(report.summary())
    return 0 if report.ok else 1


def _models_list(a: argparse.Namespace) -> None:
    from defectfusion.model.models import print_presets

    print_presets()


def _load_config(a: argparse.Namespace):
    from defectfusion.config import load_config

    return load_config(
        a.config,
        overrides=a.set,
        preset=getattr(a, "preset", None),
        variant=getattr(a, "variant", None),
    )


def _train_phase1(a: argparse.Namespace) -> None:
    from defectfusion.train.phase1 import train_phase1

    train_phase1(_load_config(a), a.out, resume=a.resume, restart=a.restart)


def _train_phase2(a: argparse.Namespace) -> None:
    from defectfusion.train.phase2 import train_phase2

    train_phase2(_load_config(a), a.phase1, a.out, resume=a.resume, restart=a.restart, text=a.text)


def _evaluate(a: argparse.Namespace) -> None:
    from defectfusion.evaluation.evaluate import evaluate_checkpoint

    if len(a.checkpoint) != len(a.out):
        raise UserError(
            f"evaluate: {len(a.checkpoint)} --checkpoint and {len(a.out)} --out; give one --out "
            "per checkpoint, in the same order"
        )
    headlines = a.headline or []
    if len(headlines) > len(a.out):
        raise UserError(
            f"evaluate: {len(a.out)} --out and {len(headlines)} --headline; give at most one "
            "--headline per --out (they pair in order)"
        )
    config = _load_config(a) if a.config else None
    headlines += [None] * (len(a.out) - len(headlines))
    for checkpoint, out, head in zip(a.checkpoint, a.out, headlines, strict=True):
        metrics = evaluate_checkpoint(checkpoint, a.data, out, config=config, headline_out=head)
        print(_headline(checkpoint, out, metrics))


def _headline(checkpoint: Path, out: Path, m: dict) -> str:
    """One line of the metrics that matter, so a log (or a terminal) shows the result."""

    def f(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.4f}"

    return (
        f"{checkpoint}: mAP {f('map')}  mAP50 {f('map50')}  AR100 {f('ar_100')}  "
        f"crit.recall {f('critical_recall')}  composite {f('composite')}  "
        f"({m.get('n_images')} images) -> {out}"
    )


def _text_embed(a: argparse.Namespace) -> None:
    from defectfusion.model.text import embed_from_config

    embed_from_config(_load_config(a), a.out)


def _compare(a: argparse.Namespace) -> None:
    from defectfusion.analysis.compare import compare_files

    config = _load_config(a) if a.config else None  # else the metrics files' settings
    compare_files(a.a, a.b, a.data, a.out, n_boot=a.n_boot, seed=a.seed, config=config)


def _predict(a: argparse.Namespace) -> None:
    from defectfusion.serve.predict import predict_files, print_summary

    summary = predict_files(
        a.checkpoint,
        a.images,
        a.out,
        threshold=a.threshold,
        draw=a.draw,
        batch_size=a.batch_size,
        device=a.device,
    )
    print_summary(summary)


def _export(a: argparse.Namespace) -> None:
    from defectfusion.serve.export import export

    info = export(a.checkpoint, a.out, a.format, metrics=a.metrics)
    extra = ""
    if a.format == "onnx":
        extra = (
            f"; onnxruntime vs PyTorch: max |diff| scores {info['max_abs_diff_scores']:.1e}, "
            f"boxes {info['max_abs_diff_boxes']:.1e}"
        )
    print(f"wrote {info['out']} (Phase {info['phase']}, {a.format}){extra}")


def _postmortem(a: argparse.Namespace) -> None:
    from defectfusion.analysis.postmortem import run_postmortem

    run_postmortem(
        _load_config(a).to_dict(),
        a.out,
        results=a.results,
        n_boot=a.n_boot,
        seed=a.seed,
        jobs=a.jobs,
    )


def _book(a: argparse.Namespace) -> None:
    from defectfusion.report.book import build_book, build_pdf

    index = build_book(a.results, a.figures, a.out, source=a.source)
    print(index)
    if a.pdf:
        print(build_pdf(index.parent, a.source / "_toc.yml", a.out))


def _report_tables(a: argparse.Namespace) -> None:
    from defectfusion.report.tables import write_tables

    write_tables(_load_config(a).to_dict(), a.out, only=a.only, rule=a.rule, results=a.results)


def _report_figures(a: argparse.Namespace) -> None:
    from defectfusion.report.figures import write_figures

    write_figures(_load_config(a).to_dict(), a.out, only=a.only, rule=a.rule, results=a.results)


def _report_summary(a: argparse.Namespace) -> None:
    from defectfusion.report.summary import write_summary

    write_summary(_load_config(a).to_dict(), a.out, rule=a.rule, results=a.results)


def _report_provenance(a: argparse.Namespace) -> None:
    from defectfusion.report.provenance import build_index

    build_index(a.sidecars, a.out)


def _pipeline_use_profile(a: argparse.Namespace) -> None:
    from defectfusion.workflow.versioning import use_profile

    changed = use_profile(a.profile, a.params)
    print(f"{a.params}: {len(changed)} values from {a.profile}: {', '.join(changed) or 'none'}")
    print(
        "outputs already made with this profile? `defectfusion pipeline record` writes them "
        "into dvc.lock (Snakemake has nothing to do, so it records nothing itself)"
    )


def _pipeline_record(a: argparse.Namespace) -> None:
    from defectfusion.config import read_yaml
    from defectfusion.workflow.versioning import record_in_dvc_lock

    print(record_in_dvc_lock(read_yaml(a.params)))


def _pipeline_rebuild(a: argparse.Namespace) -> None:
    from defectfusion.workflow.versioning import rebuild

    rebuild(cores=a.cores, remote=a.remote)


def _pipeline_touch(a: argparse.Namespace) -> None:
    from defectfusion.workflow.versioning import mark_up_to_date

    mark_up_to_date(".", tuple(a.targets))
    print(f"up to date for Snakemake: the outputs of {' '.join(a.targets) or 'all'}")


def _pipeline_verify(a: argparse.Namespace) -> int:
    from defectfusion.analysis.verify import (
        compare_postmortems,
        format_report,
        read_postmortem,
        recorded_from_dvc,
    )

    recorded = read_postmortem(a.recorded) if a.recorded else recorded_from_dvc(".", a.rev)
    report = compare_postmortems(recorded, read_postmortem(a.results))
    print("\n".join(format_report(report)))
    return 0 if report.reproduced else 1


def _pipeline_remake_missing(a: argparse.Namespace) -> None:
    from defectfusion.workflow.versioning import remake_missing

    missing = remake_missing(".", a.cores)
    print(f"remade {len(missing)} missing output(s)" if missing else "no output is missing")


def _env_lock(a: argparse.Namespace) -> None:
    from defectfusion.core.environment import write_lock

    lock, conda, n = write_lock(a.root)
    print(f"wrote {lock} ({n} packages) and {conda}")


def _env_check(a: argparse.Namespace) -> None:
    from defectfusion.core.environment import installed_problems, read_lock

    problems = installed_problems(a.lock)
    if problems:
        raise UserError(
            f"{a.lock}: the environment is not the locked set ({len(problems)}: "
            + "; ".join(problems[:5])
            + ("; ..." if len(problems) > 5 else "")
            + "); install it: pip install -r requirements.lock"
        )
    print(f"the installed environment is {a.lock}'s set ({len(read_lock(a.lock))} packages)")


def _pipeline_rulegraph(a: argparse.Namespace) -> None:
    from defectfusion.workflow.rulegraph import write_rulegraph

    dot, png = write_rulegraph(a.out)
    print(f"wrote {dot} and {png}")


# ---- parser -----------------------------------------------------------------------------


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--config",
        action="extend",
        nargs="+",
        type=Path,
        required=required,
        metavar="FILE",
        help="YAML config; repeat to overlay (later files win), e.g. params.yaml configs/micro.yaml",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set phase1.epochs=3 (YAML-parsed value)",
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in the help (not the empty ones: None, False, []), epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Not `in (None, False, [])`: 0 == False, and a default of 0 is worth showing.
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)


# One example per command, shown at the end of its --help.
EXAMPLES: dict[str, str] = {
    "": "defectfusion predict --checkpoint runs/p1/best.pt --images photos/ --out preds --draw",
    "data synth": "defectfusion data synth --out data/synth --seed 0",
    "data prepare": "defectfusion data prepare --config params.yaml",
    "data import-neu": "defectfusion data import-neu --src ../shared/datasets/neu-det --out data/neu",
    "data import-coco": "defectfusion data import-coco --images IMGS --annotations ann.json --out data/mine",
    "data validate": "defectfusion data validate data/synth",
    "models list": "defectfusion models list",
    "train phase1": "defectfusion train phase1 --config params.yaml --set phase1.epochs=3 --out runs/p1",
    "train phase2": "defectfusion train phase2 --config params.yaml --phase1 runs/p1/best.pt --out runs/p2",
    "evaluate": "defectfusion evaluate --checkpoint runs/p1/best.pt --data data/synth/annotations/test.json --out m.json",
    "text embed": "defectfusion text embed --config params.yaml --out results/text/embeddings.pt",
    "compare": "defectfusion compare --a m1.json --b m2.json --data data/synth/annotations/test.json --out cmp.json",
    "postmortem": "defectfusion postmortem --config params.yaml --out results/postmortem.json",
    "predict": "defectfusion predict --checkpoint runs/p1/best.pt --images 'photos/*.png' --out preds --threshold 0.5 --draw",
    "export": "defectfusion export --checkpoint runs/p1/best.pt --out export/p1 --format hf --metrics results/phase1/deimv2-dinov3-tiny/test_metrics.json",
    "book": "defectfusion book --results results --figures figures --out thesis/_build",
    "report tables": "defectfusion report tables --config params.yaml --out results/tables",
    "report figures": "defectfusion report figures --config params.yaml --out figures",
    "report summary": "defectfusion report summary --config params.yaml --out results/summary.json",
    "report provenance": "defectfusion report provenance results/provenance/*/*.json --out results/provenance.json",
    "pipeline use-profile": "defectfusion pipeline use-profile configs/thesis.yaml",
    "pipeline record": "defectfusion pipeline record",
    "pipeline rebuild": "defectfusion pipeline rebuild --cores 4",
    "pipeline touch": "defectfusion pipeline touch trained",
    "pipeline rulegraph": "defectfusion pipeline rulegraph --out docs/rulegraph.png",
    "pipeline verify": "defectfusion pipeline verify --recorded recorded/postmortem.json",
    "env lock": "defectfusion env lock",
    "env check": "defectfusion env check",
    "pipeline remake-missing": "defectfusion pipeline remake-missing --cores 4",
}


def _finish_help(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every (sub)parser the help formatter and its example (argparse does not pass
    `formatter_class` down to subparsers)."""
    parser.formatter_class = _HelpFormatter
    example = EXAMPLES.get(path)
    if example is not None and parser.epilog is None:
        parser.epilog = f"example:\n  {example}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _finish_help(child, f"{path} {name}".strip())


# ---- the parser: one function per command group ----------------------------------------


def _data_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion data`: make, import and validate datasets."""
    data = sub.add_parser("data", help="make, import and validate datasets (COCO layout)")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("synth", help="generate the procedural metal-surface dataset (6 classes)")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--n-train", type=int, default=800, help="training images")
    p.add_argument("--n-val", type=int, default=200, help="validation images")
    p.add_argument("--n-test", type=int, default=200, help="test images")
    p.add_argument("--image-size", type=int, default=192, help="square image side in pixels")
    p.set_defaults(func=_data_synth)

    p = dsub.add_parser(
        "prepare", help="make the pipeline's dataset as pipeline.dataset says (synth, neu, coco)"
    )
    _add_config_args(p)
    p.add_argument("--out", type=Path, help="output dataset folder (default: data.dir)")
    p.set_defaults(func=_data_prepare)

    p = dsub.add_parser(
        "import-neu",
        help="import NEU-DET (Pascal VOC ANNOTATIONS/+IMAGES/ or YOLO images/+labels/)",
    )
    p.add_argument("--src", type=Path, required=True, help="NEU-DET folder")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.set_defaults(func=_data_import_neu)

    p = dsub.add_parser("import-coco", help="import any COCO detection dataset")
    p.add_argument(
        "--images", type=Path, required=True, help="folder the file_names are relative to"
    )
    p.add_argument(
        "--annotations",
        type=Path,
        required=True,
        action="append",
        help="COCO JSON; one file is split train/val/test, or repeat with --split for given splits",
    )
    p.add_argument(
        "--split",
        action="append",
        choices=["train", "val", "test"],
        help="the split of each --annotations file, in order (omit to split one file)",
    )
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.set_defaults(func=_data_import_coco)

    p = dsub.add_parser("validate", help="check a dataset folder or split JSON and summarise it")
    p.add_argument("path", type=Path, help="dataset folder (DIR/annotations/*.json) or one JSON")
    p.add_argument("--skip-images", action="store_true", help="do not open the image files")
    p.set_defaults(func=_data_validate)


def _models_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion models`: the detector presets."""
    models = sub.add_parser("models", help="detector presets")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser("list", help="print each preset, its parameter count and input size")
    p.set_defaults(func=_models_list)


def _train_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion train`: Phase 1 and Phase 2 training."""
    train = sub.add_parser("train", help="train Phase 1 (vision only) or Phase 2 (fusion)")
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="PHASE")
    p = tsub.add_parser("phase1", help="train the vision-only DEIMv2 detector")
    _add_config_args(p)
    p.add_argument(
        "--preset", help="model preset, with its pipeline.preset_overrides (default: model.preset)"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last checkpoint")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start a new run even if OUT holds an earlier run's best.pt (it is replaced)",
    )
    p.set_defaults(func=_train_phase1)

    p = tsub.add_parser("phase2", help="train the residual vision-language fusion")
    _add_config_args(p)
    p.add_argument(
        "--variant", help="a name in pipeline.variant_switches (zero_start, naive, frozen0, ...)"
    )
    p.add_argument("--phase1", type=Path, required=True, help="Phase 1 checkpoint to start from")
    p.add_argument(
        "--text",
        type=Path,
        default=None,
        help="text embeddings written by `text embed` (default: encode the prompts now)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last checkpoint")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start a new run even if OUT holds an earlier run's best.pt (it is replaced)",
    )
    p.set_defaults(func=_train_phase2)


def _evaluate_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion evaluate`: a checkpoint on a split."""
    p = sub.add_parser("evaluate", help="COCO metrics, critical recall, composite, confusion")
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True, help="model checkpoint(s)")
    p.add_argument(
        "--data", type=Path, required=True, help="split JSON, e.g. DIR/annotations/test.json"
    )
    p.add_argument(
        "--out",
        type=Path,
        nargs="+",
        required=True,
        help="metrics JSON to write, one per checkpoint",
    )
    p.add_argument(
        "--headline",
        type=Path,
        nargs="+",
        help="also write the headline numbers (mAP, critical recall, composite) here; paired "
        "with --out in order (fewer: the first ones only)",
    )
    _add_config_args(p, required=False)
    p.set_defaults(func=_evaluate)


def _text_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion text`: the class prompts' embeddings."""
    text = sub.add_parser("text", help="class-prompt text embeddings")
    xsub = text.add_subparsers(dest="text_command", required=True, metavar="ACTION")
    p = xsub.add_parser("embed", help="encode the class prompts into T (K x D_t)")
    _add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="embeddings file to write")
    p.set_defaults(func=_text_embed)


def _compare_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion compare`: two models, paired bootstrap."""
    p = sub.add_parser("compare", help="paired bootstrap CI of the difference between two models")
    p.add_argument(
        "--a",
        type=Path,
        required=True,
        help="model A: metrics JSON written by evaluate (or a COCO results JSON)",
    )
    p.add_argument(
        "--b",
        type=Path,
        required=True,
        help="model B: metrics JSON written by evaluate (or a COCO results JSON)",
    )
    p.add_argument("--data", type=Path, required=True, help="ground-truth split JSON")
    p.add_argument("--out", type=Path, required=True, help="comparison JSON to write")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_config_args(p, required=False)
    p.set_defaults(func=_compare)


def _postmortem_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion postmortem`: the verdict on the thesis's epoch-1 drop."""
    p = sub.add_parser(
        "postmortem",
        help="epoch-1 drift, contrasts and verdicts of every Phase 2 variant (seeds x images CIs)",
    )
    _add_config_args(p)
    p.add_argument(
        "--out", type=Path, required=True, help="JSON to write, e.g. results/postmortem.json"
    )
    p.add_argument("--results", default="results", help="the results folder the runs wrote")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates (default: pipeline.bootstrap)")
    p.add_argument("--seed", type=int, help="bootstrap seed (default: the config's seed)")
    p.add_argument(
        "--jobs", type=int, default=1, help="processes reading and evaluating the prediction sets"
    )
    p.set_defaults(func=_postmortem)


def _predict_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion predict`: the model on an inspector's images."""
    p = sub.add_parser(
        "predict", help="detect defects in your images: COCO results JSON, drawn images"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint (Phase 1 or 2) or a folder written by `export --format hf`",
    )
    p.add_argument(
        "--images",
        required=True,
        help="a folder of images, one image, or a glob such as 'photos/**/*.png' (quote it)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for predictions.json (and drawn/)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="keep detections with at least this score (default: the model's operating point, "
        "its eval.score_threshold: 0.3 unless its profile set another)",
    )
    p.add_argument(
        "--draw", action="store_true", help="also write each image with its boxes to OUT/drawn/"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    p.set_defaults(func=_predict)


def _export_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion export`: transformers and ONNX export."""
    p = sub.add_parser(
        "export", help="a checkpoint as a transformers folder + model card, or as ONNX"
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint (Phase 1 or 2)")
    p.add_argument(
        "--out", type=Path, required=True, help="folder to write (replaced if an export)"
    )
    p.add_argument(
        "--format",
        choices=["hf", "onnx"],
        default="hf",
        help="hf: save_pretrained + image processor + model card (Phase 2: safetensors + JSON "
        "for defectfusion.load); onnx: model.onnx checked with onnxruntime",
    )
    p.add_argument(
        "--metrics",
        type=Path,
        help="test metrics for the model card, e.g. results/phase1/PRESET/test_metrics.json",
    )
    p.set_defaults(func=_export)


def _book_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion book`: the thesis book."""
    p = sub.add_parser("book", help="build the thesis book (HTML, Spanish) from the results")
    p.add_argument("--results", type=Path, default=Path("results"), help="summary.json, tables/")
    p.add_argument("--figures", type=Path, default=Path("figures"), help="the figures (PNG)")
    p.add_argument("--out", type=Path, default=Path("thesis/_build"), help="writes OUT/html")
    p.add_argument("--source", type=Path, default=Path("thesis"), help="the book's sources")
    p.add_argument("--pdf", action="store_true", help="also OUT/libro.pdf (WeasyPrint)")
    p.set_defaults(func=_book)


def _report_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion report`: tables, figures, summary, provenance."""
    report = sub.add_parser("report", help="tables, figures and summary.json from the results")
    rsub = report.add_subparsers(dest="report_command", required=True, metavar="WHAT")
    for what, out_help, handler in (
        ("tables", "folder for NAME.csv/.md/.tex, e.g. results/tables", _report_tables),
        ("figures", "folder for NAME.png/.pdf, e.g. figures", _report_figures),
        ("summary", "the JSON to write, e.g. results/summary.json", _report_summary),
    ):
        p = rsub.add_parser(what, help=f"write the {what}, with provenance")
        _add_config_args(p)
        p.add_argument("--out", type=Path, required=True, help=out_help)
        if what != "summary":
            p.add_argument(
                "--only", action="append", metavar="NAME", help="only this one (repeatable)"
            )
        p.add_argument(
            "--results", default="results", help="the results folder (provenance/ goes in it)"
        )
        p.add_argument("--rule", default="manual", help="the Snakemake rule, for the provenance")
        p.set_defaults(func=handler)
    p = rsub.add_parser("provenance", help="assemble results/provenance.json from the sidecars")
    p.add_argument("sidecars", nargs="*", type=Path, help="results/provenance/KIND/NAME.json")
    p.add_argument("--out", type=Path, required=True, help="the index to write")
    p.set_defaults(func=_report_provenance)


def _env_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion env`: the locked environment."""
    env = sub.add_parser("env", help="the locked environment: requirements.lock, environment.yml")
    esub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    p = esub.add_parser(
        "lock", help="pin every package defectfusion[dev] pulled in, at its installed version"
    )
    p.add_argument("--root", type=Path, default=Path("."), help="where to write the two files")
    p.set_defaults(func=_env_lock)
    p = esub.add_parser(
        "check", help="check that what is installed is exactly the lock's set (CI runs it)"
    )
    p.add_argument("--lock", type=Path, default=Path("requirements.lock"), help="the lock file")
    p.set_defaults(func=_env_check)


def _pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """`defectfusion pipeline`: Snakemake and DVC together."""
    pipe = sub.add_parser("pipeline", help="Snakemake and DVC together: profiles, rebuild, graph")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    p = psub.add_parser(
        "use-profile", help="write a profile's values into params.yaml (what DVC reads)"
    )
    p.add_argument("profile", type=Path, help="overlay, e.g. configs/thesis.yaml")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="file to update")
    p.set_defaults(func=_pipeline_use_profile)
    p = psub.add_parser(
        "record",
        help="record the outputs of params.yaml's finished run in dvc.lock (dvc commit)",
    )
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="the run's params")
    p.set_defaults(func=_pipeline_record)
    p = psub.add_parser(
        "rebuild",
        help="the committee's path: dvc pull the checkpoints, rebuild results, figures, book",
    )
    p.add_argument("--cores", default="all", help="Snakemake --cores (default: all)")
    p.add_argument("--remote", help="DVC remote to pull from (default: .dvc/config's)")
    p.set_defaults(func=_pipeline_rebuild)
    p = psub.add_parser(
        "touch", help="after a plain `dvc pull`: mark the pulled outputs up to date for Snakemake"
    )
    p.add_argument("targets", nargs="*", help="Snakemake targets (default: all)")
    p.set_defaults(func=_pipeline_touch)
    p = psub.add_parser(
        "remake-missing",
        help="remake the workflow outputs deleted by hand (Snakemake alone does not when "
        "what reads them is up to date); `dvc repro` runs it",
    )
    p.add_argument("--cores", default="all", help="Snakemake --cores (default: all)")
    p.set_defaults(func=_pipeline_remake_missing)
    p = psub.add_parser(
        "verify",
        help="did this run reproduce the recorded one? every number within its tolerance, "
        "every verdict the same (exit 0), or the list of those that are not (exit 1)",
    )
    p.add_argument(
        "--recorded",
        type=Path,
        help="the recorded postmortem.json (or its results folder); default: the one the "
        "commit --rev's dvc.lock records, from the DVC cache or remote",
    )
    p.add_argument("--rev", default="HEAD", help="git revision of the recorded run (default HEAD)")
    p.add_argument(
        "--results", type=Path, default=Path("results"), help="this run's results folder"
    )
    p.set_defaults(func=_pipeline_verify)
    p = psub.add_parser("rulegraph", help="draw `snakemake --rulegraph` (for the README)")
    p.add_argument(
        "--out", type=Path, default=Path("docs/rulegraph.png"), help="PNG (the .dot beside it)"
    )
    p.set_defaults(func=_pipeline_rulegraph)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectfusion",
        description="Defect detection with DEIMv2 + DINOv3 and residual vision-language fusion.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(sub)
    _models_commands(sub)
    _train_commands(sub)
    _evaluate_commands(sub)
    _text_commands(sub)
    _compare_commands(sub)
    _postmortem_commands(sub)
    _predict_commands(sub)
    _export_commands(sub)
    _book_commands(sub)
    _report_commands(sub)
    _env_commands(sub)
    _pipeline_commands(sub)
    _finish_help(parser)
    return parser


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as e:
        print(f"defectfusion: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, read-only or full disk: the user's to fix
        print(f"defectfusion: error: {_one_line(os_error_message(e))}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:  # a binary file where text was expected
        print(
            f"defectfusion: error: a file is not UTF-8 text ({e.reason} at byte {e.start}); "
            "check that each path names a text (YAML/JSON) file",
            file=sys.stderr,
        )
        return 2
    except MemoryError:
        print(
            "defectfusion: error: out of memory; lower the batch sizes (phase1.batch_size, "
            "eval.batch_size) or data.image_size",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("defectfusion: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
