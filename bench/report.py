"""Benchmark reporting: the measured rows, the target ratios, a printed table, JSON and a PNG chart.

A benchmark fills a `Report` with `Measure`s (a throughput in tok/s or a latency in ms, keyed
by the issue's letters) and `Target`s (a ratio or a bound between two keys). Targets whose
inputs were not measured read "n/a", never "met". Files go under `bench/results/`. Nothing
here measures anything.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Measure:
    """One figure: `value` in `unit` ("tok/s" or "ms"), with what produced it."""

    key: str  # the letter, e.g. "a", "c0", "e_engine"
    label: str
    value: float
    unit: str
    note: str = ""


@dataclass(frozen=True)
class Target:
    """`numerator / denominator >= threshold` (kind "ratio"), or `numerator <= threshold` (kind "max")."""

    name: str
    numerator: str
    threshold: float
    denominator: str | None = None
    kind: str = "ratio"

    def evaluate(self, values: dict[str, float]) -> tuple[float | None, str]:
        """(observed figure, "met" | "not met" | "n/a")."""
        num = values.get(self.numerator)
        if num is None or not math.isfinite(num):
            return None, "n/a"
        if self.kind == "max":
            return num, "met" if num <= self.threshold else "not met"
        den = values.get(self.denominator)
        if den is None or not math.isfinite(den) or den <= 0:
            return None, "n/a"
        ratio = num / den
        return ratio, "met" if ratio >= self.threshold else "not met"

    def describe(self) -> str:
        if self.kind == "max":
            return f"({self.numerator}) <= {self.threshold:g}"
        return f"({self.numerator})/({self.denominator}) >= {self.threshold:g}"


@dataclass
class Report:
    title: str
    measures: list[Measure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, measure: Measure) -> Measure:
        self.measures.append(measure)
        return measure

    def values(self) -> dict[str, float]:
        return {m.key: m.value for m in self.measures}

    def evaluated_targets(self) -> list[dict]:
        values = self.values()
        rows = []
        for target in self.targets:
            observed, verdict = target.evaluate(values)
            rows.append({"target": target.describe(), "observed": observed, "verdict": verdict, **asdict(target)})
        return rows

    def table(self) -> str:
        lines = [self.title, ""]
        width = max((len(m.label) for m in self.measures), default=10)
        keys = max((len(m.key) for m in self.measures), default=1) + 2
        lines.append(f"  {'':{keys}} {'system':<{width}}  {'value':>10}  unit   note")
        for m in self.measures:
            lines.append(f"  {'(' + m.key + ')':<{keys}} {m.label:<{width}}  {m.value:>10.2f}  {m.unit:<5}  {m.note}")
        if self.targets:
            lines += ["", "  targets:"]
            for row in self.evaluated_targets():
                observed = "-" if row["observed"] is None else f"{row['observed']:.3g}"
                lines.append(f"    {row['target']:<18} {row['name']:<22} observed {observed:>8}   {row['verdict']}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "title": self.title,
            "measures": [asdict(m) for m in self.measures],
            "targets": self.evaluated_targets(),
            "notes": self.notes,
            **self.extra,
        }

    def write(self, stem: str, directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
        """Write `<stem>.json` and `<stem>.png` under `directory`; returns both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / f"{stem}.json"
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        png_path = directory / f"{stem}.png"
        write_chart(self, png_path)
        return json_path, png_path


def write_chart(report: Report, path: Path) -> None:
    """Horizontal bars: throughputs on the left panel, latencies on the right (if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(unit, [m for m in report.measures if m.unit == unit]) for unit in ("tok/s", "ms")]
    groups = [(unit, ms) for unit, ms in groups if ms]
    if not groups:
        return
    widths = [3 if unit == "tok/s" else 2 for unit, _ in groups]
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(5 * len(groups) + 2, 0.45 * max(len(ms) for _, ms in groups) + 2),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for ax, (unit, ms) in zip(axes[0], groups):
        labels = [f"({m.key}) {m.label}" for m in ms][::-1]
        values = [m.value for m in ms][::-1]
        # Our engine in blue, references (transformers, PEFT, the matmul bound) in grey.
        colors = ["#4c72b0" if m.label.startswith("engine") else "#999999" for m in ms][::-1]
        bars = ax.barh(labels, values, color=colors)
        ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
        ax.set_xlabel(unit)
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
            unit += " (log scale)"
            ax.set_xlabel(unit)
        ax.margins(x=0.2)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(report.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)
