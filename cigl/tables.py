"""The per-tensor table: one row format and one printer for the training mask table,
cigl-export's size table and `cigl-export --inspect` (torch-free)."""

from __future__ import annotations

import math


def tensor_row(
    name: str, shape, nnz: int, stored: str | None = None, nbytes: int | None = None, numel: int | None = None
) -> dict:
    """One tensor: name, shape, numel, nnz, density and, for a stored file, how (dense or
    packed) and in how many bytes. `numel` is given for a row that sums several tensors."""
    shape = [int(s) for s in shape]
    numel = math.prod(shape) if numel is None else numel
    row = {"name": name, "shape": shape, "numel": numel, "nnz": int(nnz), "density": int(nnz) / max(numel, 1)}
    if stored is not None:
        row |= {"stored": stored, "bytes": int(nbytes or 0)}
    return row


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(rows: list[dict], title: str = "layer", group_small: bool = False) -> str:
    """Rows as aligned text with a total line. Stored rows also show how and in how many bytes;
    `group_small` sums the 0-d and 1-d tensors (biases, norms, buffers) into one line."""
    if group_small and any(len(r["shape"]) < 2 for r in rows):
        small = [r for r in rows if len(r["shape"]) < 2]
        numel = sum(r["numel"] for r in small)
        other = tensor_row(f"other ({len(small)} tensors)", [], sum(r["nnz"] for r in small), numel=numel)
        if "stored" in rows[0]:
            other |= {"stored": "dense", "bytes": sum(r["bytes"] for r in small)}
        rows = [r for r in rows if len(r["shape"]) >= 2] + [other]
    stored = bool(rows) and "stored" in rows[0]
    width = max([len(r["name"]) for r in rows] + [len(title), 5])
    extra = f" {'stored':>7} {'bytes':>12}" if stored else ""
    lines = [f"{title:<{width}}  {'shape':<18} {'density':>8} {'nnz':>10}" + extra]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        extra = f" {r['stored']:>7} {r['bytes']:>12,}" if stored else ""
        lines.append(f"{r['name']:<{width}}  {shape:<18} {r['density']:>8.4f} {r['nnz']:>10,}" + extra)
    nnz, numel = sum(r["nnz"] for r in rows), sum(r["numel"] for r in rows)
    extra = f" {'':>7} {sum(r['bytes'] for r in rows):>12,}" if stored else ""
    lines.append(f"{'total':<{width}}  {'':<18} {nnz / max(numel, 1):>8.4f} {nnz:>10,}" + extra)
    return "\n".join(lines)
