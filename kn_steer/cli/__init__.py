"""The ``kn-steer`` command line. Each area registers its own commands; errors exit non-zero."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="kn-steer", no_args_is_help=True, add_completion=False,
    help="Find MLP neurons offline and steer them per request in vLLM.",
)

# Areas that add commands: each module has ``register(app: typer.Typer) -> None``.
_AREAS = (
    "kn_steer.cli.model",
    "kn_steer.cli.inspect",
    "kn_steer.cli.vocabulary",
    "kn_steer.cli.analysis",
    "kn_steer.cli.stats",
    "kn_steer.cli.localize",
    "kn_steer.cli.eval",
    "kn_steer.cli.serve",
    "kn_steer.cli.ab",
)
for _name in _AREAS:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Run the CLI; a :class:`KnSteerError` becomes a message on stderr and exit code 2."""
    from kn_steer.errors import KnSteerError

    try:
        app(standalone_mode=False)
    except KnSteerError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
