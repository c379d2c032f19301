"""The `dalle2` command line: thin click commands over the public API, one module per family of commands
(models.py: convert, cache, info, verify; generate.py: the generation verbs, compare, eval; train.py; options.py:
what the generation verbs share).

Every user error is a `Dalle2Error` and is printed as one line `error: ...` with exit status 2.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import warnings

import click

from ..errors import Dalle2Error, Dalle2Warning



def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, Dalle2Warning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


class _Echo(logging.Handler):
    """The library's log lines on stderr, as they are (whatever sys.stderr is at the time)."""

    def emit(self, record):
        click.echo(record.getMessage(), err=True)


class _Signal(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so that every `finally` runs (temporary files go)."""


def _on_signal(signum, frame):
    raise _Signal(signum)


_OPTION = re.compile(r"\b(prior|decoder|super_res)_(steps|guidance|sampler)\b")


def _in_cli_terms(message: str) -> str:
    """An API message as a shell user reads it: options by their flags (decoder_guidance -> --decoder-guidance),
    no Python keyword advice."""
    if "model.json" not in message:  # there the names are the file's fields
        message = _OPTION.sub(lambda m: "--" + m.group(0).replace("_", "-"), message)
    return message.replace(" (overwrite=True)", "").replace("(or None for fresh noise)", "")


class _Group(click.Group):
    def invoke(self, ctx):
        warnings.showwarning = _show_warning  # a Dalle2Warning is one line, like an error
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
        log = logging.getLogger("dalle2_portable")
        if not any(isinstance(h, _Echo) for h in log.handlers):  # what the library does on the user's behalf
            log.addHandler(_Echo())
            log.setLevel(logging.INFO)
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, _Signal) as e:
            signum = e.args[0] if isinstance(e, _Signal) else signal.SIGINT
            click.echo(f"error: interrupted ({signal.Signals(signum).name}); nothing half-written was left", err=True)
            sys.exit(128 + signum)
        except Dalle2Error as e:
            click.echo(f"error: {_in_cli_terms(str(e))}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a bad option value: one line too, pointing at the command's help
            where = e.ctx.command_path if e.ctx else "dalle2"
            click.echo(f"error: {e.format_message().rstrip('.')}; see `{where} --help`", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dalle2_portable")
def main():
    """DALL-E 2 (unCLIP) on MLX and PyTorch."""



from . import generate, lora, models, train  # noqa: E402,F401  (each module adds its commands to main)
