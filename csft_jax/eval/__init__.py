"""Evaluation: CMB-Exam, CMB-Clin and MedS-Bench prompts, answer extraction and metrics.

Submodules are imported on demand (`from csft_jax.eval import cmb`) so that
importing the package stays cheap; tokenisers load on first use.
"""
