"""JUnit XML for CI systems: one testcase per gate, a <failure> naming each failed gate, <skipped> with the reason."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from wf_pipeline.deploy.validate import ValidationResult

SUITE_NAME = "wf-pipeline.validate"


def _property(parent: ET.Element, name: str, value: object) -> None:
    if value is not None:
        ET.SubElement(parent, "property", name=name, value=str(value))


def gates_to_junit(result: ValidationResult) -> str:
    failures = sum(1 for g in result.gates if g.passed is False)
    skipped = sum(1 for g in result.gates if g.passed is None)
    root = ET.Element("testsuites", name="wf-pipeline", tests=str(len(result.gates)), failures=str(failures))
    suite = ET.SubElement(
        root,
        "testsuite",
        name=SUITE_NAME,
        tests=str(len(result.gates)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    properties = ET.SubElement(suite, "properties")
    _property(properties, "model", result.model_path)
    _property(properties, "baseline", result.baseline_path)
    _property(properties, "accuracy", result.accuracy)
    _property(properties, "baseline_accuracy", result.baseline_accuracy)
    _property(properties, "sparsity", result.sparsity)
    _property(properties, "file_bytes", result.file_bytes)
    if result.latency:
        first = result.latency[0]
        _property(properties, f"latency_p50_ms_batch{first.batch_size}", first.pruned.p50)
        _property(properties, f"latency_ratio_batch{first.batch_size}", first.ratio_p50)
    for gate in result.gates:
        case = ET.SubElement(suite, "testcase", classname="wf_pipeline.gates", name=gate.name, time="0")
        if gate.passed is False:
            failure = ET.SubElement(case, "failure", message=f"gate {gate.name} failed: {gate.message}",
                                    type="GateFailure")
            failure.text = f"value={gate.value} threshold={gate.threshold}"
        elif gate.passed is None:
            ET.SubElement(case, "skipped", message=gate.message)
        else:
            ET.SubElement(case, "system-out").text = gate.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
