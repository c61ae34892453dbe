"""The command line: one thin function per verb (parse, call the library, print).

Exit codes: 0 success; 2 a user error (bad config, bad data, missing file) with a one-paragraph message and no
traceback; 1 an internal error or a run stopped by a guard. `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import typer

from tunelab.errors import RunStopped, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tunelab: from a CSV to a fine-tuned model, metrics and predictions, with one YAML.",
)
_state = {"debug": False}
# Verbs that load a model: only these pay for importing transformers to quiet it.
_MODEL_VERBS = ("train", "eval", "predict", "export", "demo")


@app.callback()
def _main(
    ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")
) -> None:
    _state["debug"] = debug
    if ctx.invoked_subcommand in _MODEL_VERBS and not debug:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Drop library noise from a normal run: transformers' per-load "Loading weights" bars, and FutureWarnings
    that transformers / peft / accelerate raise about their own internals (addressed to library authors, and
    nothing a user of tunelab can act on). Their logged warnings stay on (a checkpoint with missing weights must
    still be reported), and so do tunelab's own warnings, which go through the console, not `warnings`.
    `--debug` keeps everything."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for library in ("transformers", "peft", "accelerate"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{library}(\.|$)")


def _task_module(task: str):  # noqa: ANN202 - a module
    from tunelab.tasks import sft

    if task == "sft":
        return sft
    if task == "summarize":
        from tunelab.tasks import summarize

        return summarize
    if task == "image_cls":
        from tunelab.tasks import image_cls

        return image_cls
    if task == "mcqa":
        from tunelab.tasks import mcqa

        return mcqa
    raise UserError(f"task '{task}' is not available in this version. Available: sft, summarize, image_cls, mcqa.")


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Argument(
        None,
        help="Patch files (x.yaml, e.g. from `tunelab diagnose RUN --write-patch x.yaml`) and dotted overrides "
        "(train.lr=1e-4); patches are merged first, in order, then the overrides.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its last checkpoint."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Processes to launch (one per GPU; gloo processes on a CPU)."),
) -> None:
    """Train; prints progress, writes the run folder and prints its path last."""
    from tunelab.advise.patch import is_patch_argument
    from tunelab.config import load_config
    from tunelab.train.run import preflight

    patches = [a for a in overrides or [] if is_patch_argument(a)]
    run_config = load_config(config, [a for a in overrides or [] if not is_patch_argument(a)], patches)
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        preflight(run_config, resume, gpus)  # the common mistakes fail once, here, not once per process
        raise typer.Exit(_launch(gpus, ["train", str(config), *(overrides or []), *(["--resume"] if resume else [])]))
    run_dir = _task_module(run_config.task).train(run_config, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(str(run_dir))


def _launch(processes: int, args: list[str]) -> int:
    """Run this command in `processes` processes through torchrun (the same code on 1 or N; rank 0 writes).

    Returns 2 when a process stopped on a user error (its message was printed by rank 0), else torchrun's code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    debug = ["--debug"] if _state["debug"] else []
    launch = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={processes}", "-m", "tunelab", *debug, *args]
    )
    with tempfile.TemporaryDirectory(prefix="tunelab-ranks-") as errors:
        os.environ[RANK_ERRORS_ENV] = errors
        try:
            run(launch)
        except ChildFailedError as failed:
            _print_other_ranks_error(Path(errors))
            codes = {failure.exitcode for failure in failed.failures.values()}
            return 2 if 2 in codes else 1
        finally:
            os.environ.pop(RANK_ERRORS_ENV, None)
    return 0


def _print_other_ranks_error(folder: Path) -> None:
    """Print the first error of a process other than rank 0 when rank 0 printed none (it was stopped by torchrun
    when the other one failed alone)."""
    if (folder / "rank-0.txt").exists():
        return
    for report in sorted(folder.glob("rank-*.txt"), key=lambda path: int(path.stem.split("-")[1])):
        kind, _, message = report.read_text(encoding="utf-8").partition("\n")
        typer.echo(f"{kind} (process {report.stem.split('-')[1]}): {message}", err=True)
        return


RANK_ERRORS_ENV = "TUNELAB_RANK_ERRORS"  # folder where each torchrun process leaves its error message

GPUS_HELP = "Processes to spread the rows over (one per GPU, each with the whole model); sft and summarize runs."


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="Run folder."),
    data: str = typer.Option(None, "--data", help="Score on this file instead of the run's validation split."),
    gpus: int = typer.Option(1, "--gpus", min=1, help=GPUS_HELP),
) -> None:
    """Score a run's best weights; prints JSON."""
    task = _run_task(run)
    _check_paths(data=data if task != "image_cls" else None)  # image_cls also takes a class-folder tree
    if _spread(gpus, task, "eval"):
        raise typer.Exit(_launch(gpus, ["eval", str(run), *(["--data", data] if data else [])]))
    metrics = _task_module(task).evaluate_run(run, data)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(metrics, indent=2))


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder."),
    data: str = typer.Option(..., "--data", help="Input file (CSV / JSONL / Parquet)."),
    out: Path = typer.Option(..., "--out", help="Output CSV."),
    gpus: int = typer.Option(1, "--gpus", min=1, help=GPUS_HELP),
) -> None:
    """Write predictions for every row of --data."""
    task = _run_task(run)
    _check_paths(data=data if task != "image_cls" else None, out_file=out)  # image_cls: a folder of images too
    if _spread(gpus, task, "predict"):
        raise typer.Exit(_launch(gpus, ["predict", str(run), "--data", data, "--out", str(out)]))
    written = _task_module(task).predict_run(run, data, out)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(str(written))


def _spread(gpus: int, task: str, verb: str) -> bool:
    """Whether to launch `gpus` processes for eval / predict (not when already one of them)."""
    if gpus == 1 or "LOCAL_RANK" in os.environ:
        return False
    if task not in ("sft", "summarize"):
        raise UserError(f"{verb} --gpus {gpus} spreads sft and summarize runs; this is a {task} run: drop --gpus.")
    return True


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base weights."),
    int8: bool = typer.Option(
        False, "--int8", help="image_cls: also an INT8 CPU model, with its accuracy drop and speedup vs fp32."
    ),
) -> None:
    """Adapter or merged weights in the standard HF / peft layout (safetensors); timm's layout for image_cls."""
    task = _run_task(run)
    _check_paths(out_folder=out)
    if int8 and task != "image_cls":
        raise UserError(
            f"--int8 (post-training INT8 quantization for CPU inference) is for image_cls runs; {run} is a "
            f"{task} run. Export it without --int8 (--merge gives a single model)."
        )
    module = _task_module(task)
    typer.echo(str(module.export_run(run, out, merge, int8=True) if int8 else module.export_run(run, out, merge)))


@app.command("inspect")
def inspect_(
    target: Path = typer.Argument(..., help="Run config (YAML), or a data file or image folder."),
    out: Path = typer.Option(
        None, "--out", help="Folder for inspect.json / inspect.html (default: the config's output.dir, else beside it)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print inspect.json instead of the summary."),
) -> None:
    """EDA: findings first (ranked, each with its fix), inspect.json and inspect.html with plots."""
    from tunelab.advise.inspect import inspect_config, inspect_file
    from tunelab.advise.inspect_report import print_report
    from tunelab.config import load_config

    if target.suffix.lower() in (".yaml", ".yml"):
        run_config = load_config(target)
        report = inspect_config(run_config, out_dir=out or Path(run_config.output.dir))
    else:
        report = inspect_file(target, out_dir=out or (target if target.is_dir() else target.parent))
    if as_json:
        typer.echo(report.to_json())
    else:
        print_report(report)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.batch_size=8."),
    gpu: str = typer.Option(
        None,
        "--gpu",
        help="GPU preset: T4, V100-16, V100-32, A10G, L4, RTX3090, RTX4090, A100-40, A100-80, H100, H200.",
    ),
    gpu_mem: float = typer.Option(None, "--gpu-mem", help="Any other GPU: its memory in GiB."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs per run (sharded states with train.distributed)."),
    apply: bool = typer.Option(False, "--apply", help="Write the config with the recommended changes beside it."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Estimate peak GPU memory by part for CONFIG on a GPU, say whether it fits, recommend settings."""
    import json

    from tunelab.advise.plan import apply_plan, find_gpu, make_plan, print_plan
    from tunelab.config import load_config

    run_config = load_config(config, overrides or [])
    the_plan = make_plan(run_config, find_gpu(gpu, gpu_mem), gpus)
    if as_json:
        typer.echo(json.dumps(the_plan.to_dict(), indent=2))
    else:
        print_plan(the_plan, run_config)
    if apply:
        if not the_plan.changes:
            typer.echo("--apply: nothing to change; the config is written as it is.", err=True)
        written = apply_plan(config, the_plan)
        typer.echo(f"patched config written to {written}; train with `tunelab train {written}`", err=True)


@app.command()
def diagnose(
    run: Path = typer.Argument(..., help="Run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print diagnosis.json instead of the ranked text."),
    write_patch: Path = typer.Option(
        None, "--write-patch", help="Write the prescribed changes as a YAML patch: `tunelab train CONFIG PATCH`."
    ),
) -> None:
    """Read a run's curves, name the problem with its evidence, prescribe config changes (writes diagnosis.json)."""
    from tunelab.advise.diagnose import diagnose_run, print_diagnosis
    from tunelab.advise.diagnose import write_patch as write_patch_file

    diagnosis = diagnose_run(run)
    if write_patch is not None:
        write_patch_file(diagnosis, write_patch)
    if as_json:
        typer.echo(diagnosis.to_json())
    else:
        print_diagnosis(diagnosis)
        if write_patch is not None:
            typer.echo(f"patch written to {write_patch}; apply it with `tunelab train CONFIG {write_patch}`", err=True)


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.recipes import list_recipes

    table = Table("recipe", "what it is for")
    for name, description in list_recipes().items():
        table.add_row(name, description)
    Console().print(table)


@app.command()
def init(name: str = typer.Argument(..., help="Recipe name (see `tunelab recipes`), or 'full' for every key.")) -> None:
    """Print a recipe as a starting config."""
    from tunelab.recipes import recipe_text

    typer.echo(recipe_text(name))


@app.command()
def demo(
    task: str = typer.Argument("sft", help="Task to demonstrate."),
    out: Path = typer.Option(None, "--out", help="Run folder (replaced if it exists); default runs/demo-TASK."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides for the demo recipe."),
) -> None:
    """Run a built-in recipe end to end on the embedded default model and data."""
    from tunelab.demo import run_demo

    typer.echo(str(run_demo(task, out, overrides or [])))


def _check_paths(data: str | None = None, out_file: Path | None = None, out_folder: Path | None = None) -> None:
    """Refuse a missing --data, or an --out that cannot be written, before the run's model is loaded (and, for
    predict, before every answer is generated only to fail on the write)."""
    from tunelab.train.run import check_writable_folder

    if data is not None and not Path(data).is_file():
        problem = "is a folder" if Path(data).is_dir() else f"does not exist (looked for {Path(data).absolute()})"
        raise UserError(f"--data {data} {problem}. Pass a CSV, JSONL or Parquet file.")
    if out_file is not None:
        if out_file.is_dir():
            raise UserError(f"--out {out_file} is a folder. Pass a file name, e.g. {out_file / 'predictions.csv'}.")
        # an existing file is replaced; otherwise its folder must be makeable
        check_writable_folder(out_file.parent if out_file.exists() else out_file, "--out")
    if out_folder is not None:
        check_writable_folder(out_folder, "--out")


def _run_task(run: Path) -> str:
    import yaml

    if not Path(run).exists():
        raise UserError(f"Run folder {run} does not exist. Pass the output.dir of a finished `tunelab train`.")
    config_file = Path(run) / "config.yaml"
    if not config_file.exists():
        raise UserError(f"{run} is not a tunelab run folder (no config.yaml). Pass the output.dir of a run.")
    try:
        saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{config_file} is not a readable run config. Was it edited? Train the run again.")
    return saved.get("task", "sft")


def _click_exceptions() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage error types, abort types) that the parser raises under standalone_mode=False. Typer >= 0.2x raises
    those of its own copy of click, which `click.ClickException` does not catch; older typer raises click's."""
    usage: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        usage.append(click.exceptions.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:  # typer that vendors click does not install it
        pass
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # typer that uses click itself
        pass
    else:
        usage.append(ClickException)
    return tuple(usage), tuple(aborts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn errors into exit codes and readable messages."""
    code = _main_unguarded(argv)
    _leave_process_group(clean=code == 0)
    return code


def _leave_process_group(clean: bool) -> None:
    """Close the process group of a torchrun process before the interpreter exits. Left to interpreter teardown,
    gloo's worker threads are sometimes destroyed while still joinable and the process aborts ("terminate called
    without an active exception") after a run that succeeded. The barrier keeps one process from closing its
    connections while the others still use them; after a failure there is none (the others may never reach it)."""
    if "torch" not in sys.modules:  # a command that never imported torch (recipes, init, --help) has no group
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; torchrun reports the exit code
        pass


def _report_rank_error(kind: str, message: str) -> None:
    """Leave this process's error where the launching process finds it (see _launch): when one process alone
    fails, torchrun stops rank 0 before it can print anything, and the user would see only exit codes."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    rank = int(os.environ.get("RANK", "0"))
    if not folder:
        return
    try:
        Path(folder, f"rank-{rank}.txt").write_text(f"{kind}\n{message}", encoding="utf-8")
    except OSError:
        pass


def _main_unguarded(argv: list[str] | None) -> int:
    from rich.console import Console

    # one message, from rank 0; printed with soft_wrap, since a path cut at column 80 cannot be copied
    err = Console(stderr=True, quiet=int(os.environ.get("RANK", "0")) != 0)
    try:
        code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code here
    except UserError as error:
        if _state["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        _report_rank_error("error", str(error))
        return UserError.exit_code
    except RunStopped as error:
        if _state["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]stopped:[/] {error}", highlight=False, soft_wrap=True)
        _report_rank_error("stopped", str(error))
        return RunStopped.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; `tunelab train CONFIG --resume` continues from the last checkpoint.")
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as error:  # noqa: BLE001 - the last line of defence: a readable internal error
        usage_errors, aborts = _click_exceptions()
        if isinstance(error, usage_errors):  # unknown verb or option, missing argument: click's usage message
            error.show()
            return int(getattr(error, "exit_code", 2))
        if isinstance(error, aborts):
            return 1
        if _state["debug"]:
            traceback.print_exc()
        _report_rank_error("internal error", f"{type(error).__name__}: {error}")
        err.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {error}\nRun again with --debug for the "
            "traceback, and report it with the config.",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
