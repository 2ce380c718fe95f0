"""The help formatter every `sap-dist` command shares (its own module, so that no command
imports the dispatcher in `sap_dist.cli`, which imports the commands)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, including options that have no help text."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help  # no default, or the help already says it
        return super()._get_help_string(action)
