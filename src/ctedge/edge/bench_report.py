"""`ctedge bench`'s report as tables and sentences: console rows, markdown, the budget
verdict and the fastest variant per model (the CLI prints these)."""

from __future__ import annotations

from pathlib import Path

from ctedge.core.results import BenchReport


def isa_line(machine: dict) -> str:
    isa = machine.get("isa", {})
    return "ISA: " + ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in isa.items())


def table_rows(report: BenchReport | dict) -> list[dict]:
    """One row per model, variant and batch size, as both tables show them."""
    report = report.to_dict() if isinstance(report, BenchReport) else report
    rows = []
    for r in report["results"]:
        e2e = (r.get("end_to_end_ms") or {}).get("p50")
        cold = (r.get("cold_start_ms") or {}).get("process_to_first_prediction")
        change = r.get("vs_fp32") or {}
        detail = r.get("accuracy_detail")
        base = next((x for x in report["results"] if x["model"] == r["model"]), r)
        for batch, lat in r["latency"].items():
            ref = base["latency"].get(batch, {}).get("p50")
            rows.append({"model": Path(r["model"]).name, "format": r["format"], "provider": r["provider"],
                         "MB": f"{r['size_mb']:.1f}", "batch": batch, "p50 ms": f"{lat['p50']:.1f}",
                         "p90 ms": f"{lat['p90']:.1f}", "p99 ms": f"{lat['p99']:.1f}",
                         "/ fp32": "" if not ref else f"{lat['p50'] / ref:.2f}",
                         "images/s": f"{lat['images_per_s']:.1f}",
                         "end-to-end p50 ms": "" if e2e is None else f"{e2e:.1f}",
                         "cold start ms": "" if cold is None else f"{cold:.0f}",
                         "AUC": "" if detail is None else
                         f"{detail['auc']:.3f} ({detail['auc_ci'][0]:.3f}-{detail['auc_ci'][1]:.3f}) n={detail['n']}",
                         "AUC Δ": "" if change.get("auc_change") is None else f"{change['auc_change']:+.4f}",
                         "max |Δp|": "" if not change else f"{change['max_abs_diff']:.1e}"})
    return rows


def budget_line(result: dict) -> tuple[bool, str]:
    """(within the budget, the sentence) for one result with a ``budget``."""
    b = result["budget"]
    share = (f"{b['preprocessing_share']:.0%} of it" if b["preprocessing_share"] > 0
             else "within the timing noise")
    return b["within"], (f"{Path(result['model']).name} ({result['format']}, {result['provider']}): end-to-end p50 "
                         f"{b['end_to_end_p50_ms']:.1f} ms, {'within' if b['within'] else 'OVER'} the "
                         f"{b['budget_ms']:.0f} ms budget (margin {b['margin_ms']:.0f} ms); decode+resize is {share}")


def closing_lines(report: BenchReport | dict) -> list[str]:
    """Per model: the fastest variant within the accuracy tolerance."""
    report = report.to_dict() if isinstance(report, BenchReport) else report
    lines = []
    for model, choice in report.get("fastest", {}).items():
        rows = [r for r in report["results"] if r["model"] == model]
        best = next(r for r in rows if r["runtime"] == choice["runtime"] and r["precision"] == choice["precision"]
                    and r["provider"] == choice["provider"])
        batch = "1" if "1" in best["latency"] else min(best["latency"], key=int)
        ratio = best["latency"][batch]["p50"] / rows[0]["latency"][batch]["p50"]
        line = (f"fastest within tolerance for {Path(model).name}: {best['runtime']} {best['precision']} on "
                f"{best['provider']}, batch-{batch} p50 {best['latency'][batch]['p50']:.1f} ms "
                f"({ratio:.2f}x {rows[0]['format']}; {best['vs_fp32']['tolerance']})")
        if choice.get("saved"):
            line += f"; saved to {choice['saved']} for --runtime auto"
        lines.append(line)
    return lines


def markdown(report: BenchReport | dict) -> str:
    """The report as a markdown table with the machine described."""
    report = report.to_dict() if isinstance(report, BenchReport) else report
    m = report["machine"]
    engines = ", ".join(filter(None, [
        m.get("onnxruntime") and f"onnxruntime {m['onnxruntime']} ({', '.join(m['available_providers'])})",
        m.get("openvino") and f"OpenVINO {m['openvino']}"]))
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
             f"{engines}, threads {m['threads']}. {isa_line(m)}. Timing data: {report['data']}."
             + (f" Accuracy: {report['accuracy_data']}." if report.get("accuracy_data") else ""), ""]
    rows = table_rows(report)
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    lines += [""] + closing_lines(report)
    return "\n".join(lines) + "\n"
