"""The command line: one thin function per verb (parse, call the library, print).

Exit codes: 0 success; 2 a user error (bad config, bad data, missing file) with a one-paragraph message and no
traceback; 1 an internal error or a run stopped by a guard. `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
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


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _task_module(task: str):  # noqa: ANN202 - a module
    from tunelab.tasks import sft

    if task == "sft":
        return sft
    raise UserError(f"task '{task}' is not available in this version. Available: sft.")


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=1e-4 data.max_length=2048."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its last checkpoint."),
) -> None:
    """Train; prints progress, writes the run folder and prints its path last."""
    from tunelab.config import load_config

    run_config = load_config(config, overrides or [])
    run_dir = _task_module(run_config.task).train(run_config, resume=resume)
    typer.echo(str(run_dir))


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="Run folder."),
    data: str = typer.Option(None, "--data", help="Score on this file instead of the run's validation split."),
) -> None:
    """Score a run's best weights; prints JSON."""
    task = _run_task(run)
    typer.echo(json.dumps(_task_module(task).evaluate_run(run, data), indent=2))


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder."),
    data: str = typer.Option(..., "--data", help="Input file (CSV / JSONL / Parquet)."),
    out: Path = typer.Option(..., "--out", help="Output CSV."),
) -> None:
    """Write predictions for every row of --data."""
    task = _run_task(run)
    typer.echo(str(_task_module(task).predict_run(run, data, out)))


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the base weights."),
) -> None:
    """Adapter or merged weights in the standard HF / peft layout (safetensors)."""
    task = _run_task(run)
    typer.echo(str(_task_module(task).export_run(run, out, merge)))


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
    out: Path = typer.Option(Path("runs/demo-sft"), "--out", help="Run folder (replaced if it exists)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides for the demo recipe."),
) -> None:
    """Run a built-in recipe end to end on the embedded default model and data."""
    from tunelab.demo import run_demo

    typer.echo(str(run_demo(task, out, overrides or [])))


def _run_task(run: Path) -> str:
    import yaml

    config_file = Path(run) / "config.yaml"
    if not config_file.exists():
        raise UserError(f"{run} is not a tunelab run folder (no config.yaml). Pass the output.dir of a run.")
    return (yaml.safe_load(config_file.read_text()) or {}).get("task", "sft")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn errors into exit codes and readable messages."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        app(args=argv, standalone_mode=False)
    except UserError as error:
        if _state["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {error}", highlight=False)
        return UserError.exit_code
    except RunStopped as error:
        if _state["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]stopped:[/] {error}", highlight=False)
        return RunStopped.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; `tunelab train CONFIG --resume` continues from the last checkpoint.")
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as error:  # noqa: BLE001 - the last line of defence: a readable internal error
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            return 2
        if isinstance(error, click.exceptions.Abort):
            return 1
        if _state["debug"]:
            traceback.print_exc()
        err.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {error}\nRun again with --debug for the "
            "traceback, and report it with the config.",
            highlight=False,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
