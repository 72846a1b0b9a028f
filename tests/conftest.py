"""Test-wide settings: must run before torch is imported by any test module."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see wf_pipeline/__init__.py
