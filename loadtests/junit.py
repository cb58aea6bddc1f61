"""JUnit XML for CI systems: one test case per gate, failed gates marked as failures."""

from __future__ import annotations

from pathlib import Path

from junit_xml import TestCase, TestSuite, to_xml_report_string

from ..core.schema import LoadTestResult

__all__ = ["write_junit"]


def write_junit(result: LoadTestResult, path: Path) -> None:
    cases = []
    for gate in result.gates:
        case = TestCase(name=gate.name, classname="infer_plan.loadtest.gates", stdout=gate.detail)
        if not gate.passed:
            case.add_failure_info(message=gate.detail, failure_type="gate")
        cases.append(case)
    suite = TestSuite(f"infer-plan loadtest {result.target} @ {result.rps:g} rps", cases)
    path.write_text(to_xml_report_string([suite]), encoding="utf-8")
