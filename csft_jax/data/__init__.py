"""Collective-instruction data pipeline: sources -> conversations -> tokens -> mixture -> packed batches."""
