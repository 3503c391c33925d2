"""The command line: LightningCLI's ``fit`` / ``validate`` / ``test`` / ``predict``, plus our own subcommands.

Models and data modules are chosen in YAML by short class name (``class_path: TextImageDataModule``)
or by full import path for classes of other projects. The extra subcommands (``prepare``, ...) are plain
typed functions run through jsonargparse, so their signatures and docstrings are their ``--help``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, DefaultHelpFormatter, auto_cli, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lit_dalle  # noqa: F401  (imports the modules, so their short class names resolve in YAML)

# Dataclass fields documented by a string under them (EmbeddedShapes, ...) get that string as their help.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("lit_dalle.data.prepare:prepare", "convert a folder of images with .txt captions into tar shards"),
    "train-tokenizer": (
        "lit_dalle.text:train_tokenizer",
        "train the caption BPE tokenizer on the captions of tar shards",
    ),
    "generate": ("lit_dalle.generate:generate", "sample images for captions from a Prior checkpoint into a PNG grid"),
    "tokenize": ("lit_dalle.image_tokens:tokenize", "encode image shards with a frozen DVAE into pre-tokenized shards"),
    "evaluate": (
        "lit_dalle.evaluate:evaluate",
        "sample, rerank and score a Prior: attribute accuracy, CLIP score, FID / IS with blur, best-of-N",
    ),
    "quickstart": (
        "lit_dalle.quickstart:quickstart",
        "the whole pipeline on the embedded data: DVAE, reranker, tokens, Prior, reranked samples, metrics",
    ),
    "convert-openai-dvae": (
        "lit_dalle.dvae:convert_openai",
        "convert the released OpenAI dVAE encoder.pkl / decoder.pkl into a DVAE checkpoint",
    ),
}
"""Subcommands beyond LightningCLI's: name -> ("module:function", one-line summary)."""


class DalleCLI(LightningCLI):
    """LightningCLI in subclass mode for lit_dalle's modules (and any subclass of them)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Default the data to ``TextImageDataModule``; tie values that must agree instead of typing them twice.

        ``data.resolution`` sets a Prior's ``model.image_size`` (so its token grid matches the DVAE's
        output on that data); models without that argument (the DVAE) are left alone.
        """
        parser.set_defaults({"data": {"class_path": "lit_dalle.data.TextImageDataModule"}})
        parser.link_arguments("data.init_args.resolution", "model.init_args.image_size")


def _run_extra(name: str, argv: list[str]) -> Any:
    """Run one of ``EXTRA_COMMANDS`` with its arguments (``--a-b`` is accepted for ``--a_b``)."""
    target, _ = EXTRA_COMMANDS[name]
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    argv = [_underscore_flag(arg) for arg in argv]
    return auto_cli(fn, args=argv, as_positional=False, prog=f"python -m lit_dalle {name}")


def shipped_config(path: str) -> str:
    """Resolve ``--config`` paths of the shipped configs from anywhere (installed wheel or source tree).

    An existing file is returned as it is. Otherwise ``configs/prior.yaml`` (or ``prior.yaml``,
    ``paper/prior.yaml``) is looked up among the configs installed with the package (``lit_dalle/configs``
    in a wheel) and then in the source tree beside the package (an editable install).
    """
    if os.path.exists(path):
        return path
    name = path.split("configs/", 1)[1] if "configs/" in path else path
    candidates = [
        Path(__file__).resolve().parent / "configs" / name,
        Path(__file__).resolve().parents[1] / "configs" / name,
    ]
    return next((str(c) for c in candidates if c.is_file()), path)


def _resolve_configs(argv: list[str]) -> list[str]:
    """Apply `shipped_config` to the value of every ``--config`` / ``-c`` argument."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = shipped_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + shipped_config(arg.split("=", 1)[1])
    return out


def _underscore_flag(arg: str) -> str:
    """``--from-folder=x`` -> ``--from_folder=x``; values and other arguments are left alone."""
    if not arg.startswith("--"):
        return arg
    flag, sep, value = arg.partition("=")
    return "--" + flag[2:].replace("-", "_") + sep + value


class _KeepLinesFormatter(DefaultHelpFormatter):
    """Help formatter that keeps the epilog's line breaks (it holds pre-formatted help)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _data_help() -> str:
    """The default DataModule's arguments, appended to ``fit --help`` and the other subcommands' help."""
    from lit_dalle.data import TextImageDataModule

    parser = ArgumentParser(prog="python -m lit_dalle fit", usage="", add_help=False)
    parser.add_class_arguments(TextImageDataModule, "data")
    body = parser.format_help().split("\n", 2)[-1]
    return "The default --data is TextImageDataModule; its arguments (other classes: --data.help CLASS):\n" + body


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``python -m lit_dalle``.

    Args:
        args: the command line without the program name; None reads ``sys.argv``.

    Returns:
        The ``DalleCLI`` (LightningCLI subcommands) or the extra subcommand's return value.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    resolved = _resolve_configs(argv)
    if resolved != argv:
        args = argv = resolved
    subcommand_kwargs: dict[str, Any] = {}
    if "-h" in argv or "--help" in argv:
        epilog = {"epilog": _data_help()}
        subcommand_kwargs = {name: epilog for name in ("fit", "validate", "test", "predict")}
    extra = "".join(f"\n  {name:22s}{summary}" for name, (_, summary) in EXTRA_COMMANDS.items())
    return DalleCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,  # None: LightningCLI reads sys.argv itself
        parser_kwargs={
            "prog": "python -m lit_dalle",
            "description": "lit_dalle: DALL-E as Lightning modules.\n\nMore subcommands, each with its own --help:"
            + extra,
            "formatter_class": _KeepLinesFormatter,
            **subcommand_kwargs,
        },
        save_config_kwargs={"overwrite": True},
    )
