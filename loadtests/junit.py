"""JUnit XML for CI systems: one test case per gate, failed gates marked as failures."""

from __future__ import annotations

from pathlib import Path

from junit_xml import TestCase, TestSuite, to_xml_report_string

from ..core.schema import LoadTestResult, SweepResult

__all__ = ["write_junit"]


def write_junit(result: LoadTestResult | SweepResult, path: Path) -> None:
    """A load test's gates, or a sweep's (its knee, and --min-knee-rps when set)."""
    if isinstance(result, SweepResult):
        knee = TestCase(name="knee", classname="infer_plan.loadtest.sweep", stdout=result.message)
        if not result.measured_a_knee:
            knee.add_failure_info(message=result.message, failure_type="sweep")
        cases = [knee]
        suite_name = f"infer-plan loadtest --sweep {result.target}"
    else:
        cases = []
        suite_name = f"infer-plan loadtest {result.target} @ {result.rps:g} rps"
    for gate in result.gates:
        case = TestCase(name=gate.name, classname=f"infer_plan.{result.kind}.gates", stdout=gate.detail)
        if not gate.passed:
            case.add_failure_info(message=gate.detail, failure_type="gate")
        cases.append(case)
    suite = TestSuite(suite_name, cases)
    path.write_text(to_xml_report_string([suite]), encoding="utf-8")
