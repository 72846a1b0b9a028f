"""Deployment: sparse ONNX export, ONNX Runtime validation, latency measurement and deployment gates."""
from wf_pipeline.deploy.export import ExportResult, export_onnx
from wf_pipeline.deploy.gates import GateResult, evaluate_gates
from wf_pipeline.deploy.validate import ValidationResult, ValidationSettings, validate_model

__all__ = [
    "ExportResult",
    "GateResult",
    "ValidationResult",
    "ValidationSettings",
    "evaluate_gates",
    "export_onnx",
    "validate_model",
]
