"""The side-by-side experiment (`sap-dist experiment`): settings and presets (`settings`), the
data it prepares (`data`), each fine-tuning run and its judging (`runs`), the table and plots
(`report`), and the whole pipeline (`run`)."""

from sap_dist.experiment.data import prepare_data
from sap_dist.experiment.report import aggregate, markdown_table
from sap_dist.experiment.run import main, run_experiment, run_plan
from sap_dist.experiment.settings import METHOD_LABELS, METHODS, PRESETS, ExperimentSettings, settings_from

__all__ = ["METHODS", "METHOD_LABELS", "PRESETS", "ExperimentSettings", "aggregate", "main", "markdown_table",
           "prepare_data", "run_experiment", "run_plan", "settings_from"]
