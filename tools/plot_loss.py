"""Plot the loss curve of a training run from its ``--log-json`` file (JSON lines).

    python tools/plot_loss.py runs/quickstart/train_log.jsonl --output runs/quickstart/loss.png

Every record that has a step (``step`` or ``iteration``) and a numeric field whose name contains
``loss`` contributes a point to that field's curve; validation records
``{"kind": "eval", "step": 100, "losses": {"bert": 5.1}}`` become the curve ``eval/bert``.
``--keys`` picks the curves instead. Records from several ranks (a ``rank`` field) are
filtered to rank 0. It prints the first and last value of each curve, and ``--require-drop KEY
MARGIN`` exits with status 1 unless ``KEY`` fell by at least ``MARGIN`` from its first point to the
mean of its last ``--tail`` points (default 5; the mean smooths the step-to-step noise of
per-micro-batch objectives). That is the quickstart's check that training learned something.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

STEP_KEYS = ("step", "iteration")


def _step_of(record: dict[str, object]) -> int | None:
    for key in STEP_KEYS:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return None


def read_curves(
    lines: Iterable[str], keys: list[str] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """``{field: [(step, value), ...]}`` in file order, from JSON lines; other lines are errors."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"line {number} is not JSON ({error.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or record.get("rank", 0) != 0:
            continue
        step = _step_of(record)
        if step is None:
            continue
        values = dict(record)
        # Validation records ({"kind": "eval", "losses": {"bert": 5.1}}) -> "eval/bert".
        nested = values.pop("losses", None)
        if isinstance(nested, dict):
            prefix = str(record.get("kind", "eval"))
            values.update({f"{prefix}/{name}": value for name, value in nested.items()})
        for key, value in values.items():
            wanted = key in keys if keys else "loss" in key or "/" in key
            if key == "loss_scale" and not keys:
                wanted = False
            if wanted and isinstance(value, int | float) and not isinstance(value, bool):
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def plot(curves: dict[str, list[tuple[int, float]]], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, points in sorted(curves.items(), key=lambda item: item[0] != "loss"):
        steps, values = zip(*points)
        evaluation = "/" in key
        axes.plot(
            steps,
            values,
            marker="." if evaluation or len(points) < 60 else None,
            linestyle="--" if evaluation else "-",
            label="train loss" if key == "loss" else key,
        )
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss (nats / token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot loss curves from a --log-json file.")
    parser.add_argument("log_json", type=Path, help="the JSON-lines file written by --log-json")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: next to log)")
    parser.add_argument("--keys", default=None, help="comma-separated fields to plot")
    parser.add_argument("--title", default=None)
    parser.add_argument(
        "--require-drop",
        nargs=2,
        metavar=("KEY", "MARGIN"),
        default=None,
        help="exit 1 unless the mean of KEY's last --tail values is at least MARGIN below its first",
    )
    parser.add_argument("--tail", type=int, default=5, help="points averaged for --require-drop")
    args = parser.parse_args(argv)

    if not args.log_json.is_file():
        parser.error(f"{args.log_json} does not exist")
    keys = [key.strip() for key in args.keys.split(",")] if args.keys else None
    with args.log_json.open(encoding="utf-8") as handle:
        curves = read_curves(handle, keys)
    if not curves:
        parser.error(f"{args.log_json} has no records with an iteration and a *loss* field")
    output = args.output or args.log_json.with_suffix(".png")
    plot(curves, output, args.title or args.log_json.parent.name)
    for key, points in sorted(curves.items()):
        (first_step, first), (last_step, last) = points[0], points[-1]
        print(
            f"{key}: {first:.4f} at iteration {first_step} -> {last:.4f} at iteration {last_step}"
        )
    print(f"wrote {output}")

    if args.require_drop is not None:
        key, margin_text = args.require_drop
        margin = float(margin_text)
        if key not in curves:
            print(f"FAIL: no {key!r} values in {args.log_json} (have {sorted(curves)})")
            return 1
        if args.tail < 1:
            parser.error(f"--tail must be >= 1, got {args.tail}")
        values = [value for _, value in curves[key]]
        first, tail = values[0], values[-args.tail :]
        last = sum(tail) / len(tail)
        drop = first - last
        summary = (
            f"{key} fell from {first:.4f} (first point) to {last:.4f} (mean of the last "
            f"{len(tail)}): {drop:.4f}"
        )
        if not (math.isfinite(last) and len(values) > args.tail and drop >= margin):
            print(f"FAIL: {summary}, less than the required {margin} (or too few points)")
            return 1
        print(f"OK: {summary} >= {margin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
