"""Placeholder: `loraforge serve` is being built."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register this module's CLI subcommand(s)."""
