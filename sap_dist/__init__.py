"""sap-dist: safety-aware probing (SAP) fine-tuning, on one process or many."""

__version__ = "0.1.0"
