"""Collecting the figures of a run, deriving the ratios, writing the results
file and printing the compact table."""

import datetime
import json
import os
import platform
import re
import subprocess

import torch

import featadapt
from featadapt.fileio import write_atomically

from bench_cases import PEER_OF

# Targets for forward+backward time as a ratio to the floor, by kind of device
# and x's dtype ("*": any): on the CPU for the torch backend, on the GPU for
# every backend. CPUs with native bfloat16 instructions (AVX512-BF16, AMX) have
# their own: there bfloat16 GEMMs are fast, and every pass around them shows.
TARGETS = {
    "cpu": {"*": {"vefa": 1.05, "lora": 1.15, "lorfa": 1.20}},
    "cpu-bf16": {
        "bfloat16": {"vefa": 1.10, "lora": 1.20, "lorfa": 1.25},
        "float32": {"vefa": 1.05, "lora": 1.12, "lorfa": 1.15},
    },
    "cuda": {"*": {"vefa": 1.03, "lora": 1.08, "lorfa": 1.08}},
}

# The CPU features that decide how fast the benchmarks' dtypes run, as the
# results files name them, with torch's own test for each.
CPU_FEATURES = {
    "AVX2": torch.cpu._is_avx2_supported,
    "AVX512": torch.cpu._is_avx512_supported,
    "AVX512-BF16": torch.cpu._is_avx512_bf16_supported,
    "AMX": torch.cpu._is_amx_tile_supported,
}


def cpu_features():
    """The features of CPU_FEATURES this CPU has, e.g. ["AVX2", "AVX512", "AVX512-BF16", "AMX"]."""
    return [name for name, has in CPU_FEATURES.items() if has()]


def has_native_bfloat16():
    features = cpu_features()
    return "AVX512-BF16" in features or "AMX" in features


def cpu_model():
    """The CPU's model name without trademark signs and clock speed, e.g. "Intel Xeon"."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = re.sub(r"\((R|TM|tm)\)|\bCPU\b|\bProcessor\b|@.*$", " ", model)
    return " ".join(model.split())


def device_name(device):
    """E.g. "NVIDIA H200" or "Intel Xeon (2 cores; AVX2, AVX512, AVX512-BF16, AMX)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores; {', '.join(cpu_features()) or 'no AVX2'})"


def target_kind(device):
    """Which row of TARGETS applies on `device`."""
    if device.type == "cuda":
        return "cuda"
    return "cpu-bf16" if has_native_bfloat16() else "cpu"


def target_ratio(kind, dtype, method):
    by_dtype = TARGETS.get(kind, {})
    return by_dtype.get(dtype, by_dtype.get("*", {})).get(method)


def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_revision():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _load_average():
    """The 1-, 5- and 15-minute load averages (other work sharing the cores), or None."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def environment(device, set_name):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        # the dispatch table's device class (tools/write_dispatch_table.py)
        "compute_capability": ("%d.%d" % torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "cpu_features": cpu_features() if device.type == "cpu" else None,
        "machine_load": _load_average(),
        "bench_set": set_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "featadapt_revision": git_revision(),
        "featadapt": featadapt.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "peft": peft_version,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


class Results:
    def __init__(self):
        self.layers = []  # one dict per (layer, shape, dtype, rank, mode)
        self.end_to_end = []  # one dict per (model, method)

    def _peer(self, row):
        peer = PEER_OF.get(row["method"]) if row["kind"] == "featadapt" else None
        for other in self.layers:
            if other["layer"] == peer and all(other[k] == row[k] for k in ("shape", "dtype", "mode", "rank")):
                return other
        return None

    @staticmethod
    def _ratio(a, b, key):
        if b is None or a[key] is None or b[key] is None:
            return None
        return a[key] / b[key]

    def finish(self, device, rank):
        """Fill in the ratios and the targets (at the set's main rank); returns the target rows."""
        kind = target_kind(device)
        targets = []
        for row in self.layers:
            # Both ratios to the floor were timed in alternation with it, so
            # their quotient resists drift better than a quotient of medians.
            peer = self._peer(row)
            row["peer"] = peer["layer"] if peer else None
            row["ratio_to_peer"] = self._ratio(row, peer, "ratio_to_floor")
            limit = target_ratio(kind, row["dtype"], row["method"])
            applies = row["kind"] == "featadapt" and row["mode"] == "forward+backward" and row["rank"] == rank
            if applies and limit is not None and (kind == "cuda" or row["layer"].endswith("/torch")) \
                    and row["ratio_to_floor"] is not None:
                met = row["ratio_to_floor"] <= limit and (row["ratio_to_peer"] is None or row["ratio_to_peer"] < 1.0)
                targets.append({
                    "case": case_label(row), "target_ratio_to_floor": limit, "ratio_to_floor": row["ratio_to_floor"],
                    "ratio_to_peer": row["ratio_to_peer"], "peer": row["peer"], "met": met,
                })
        return targets

    def write(self, path, env, targets):
        payload = {"environment": env, "targets": targets, "layers": self.layers, "end_to_end": self.end_to_end}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=1)
                f.write("\n")

        write_atomically(path, dump)


def case_label(row):
    m, k, n = row["shape"]
    return f"{row['layer']} {row['mode']} {row['dtype']} M{m} K{k} N{n} r{row['rank']}"


def _fmt(value, spec):
    """format(value, spec), or a dash of the same width for a missing figure."""
    if value is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(value, spec)


def table(results, targets):
    lines = [f"{'case':<66} {'x floor':>8} {'x peer':>8} {'peer':<12} {'saved MiB':>9} {'saved/x':>7}"]
    for row in results.layers:
        lines.append(
            f"{case_label(row):<66} {_fmt(row.get('ratio_to_floor'), '8.3f')} "
            f"{_fmt(row.get('ratio_to_peer'), '8.3f')} {row.get('peer') or '':<12} "
            f"{row['saved_bytes'] / 2**20:9.2f} {row['saved_bytes'] / row['x_bytes']:7.2f}"
        )
    if results.end_to_end:
        lines.append("")
        lines.append(f"{'end to end (training step)':<40} {'tokens/s':>10} {'x full FT':>10} {'peak MiB':>10}")
        for row in results.end_to_end:
            lines.append(
                f"{row['model'] + ' ' + row['method']:<40} {_fmt(row['tokens_per_s'], '10.0f')} "
                f"{_fmt(row.get('speed_vs_full'), '10.2f')} {_fmt(row['peak_bytes'] and row['peak_bytes'] / 2**20, '10.1f')}"
            )
    if targets:
        lines.append("")
        missed = [t for t in targets if not t["met"]]
        lines.append(f"targets (forward+backward time / floor, and faster than the peer): {len(targets) - len(missed)} of {len(targets)} met")
        for t in missed:
            lines.append(
                f"  MISSED {t['case']}: {t['ratio_to_floor']:.3f} x floor (target {t['target_ratio_to_floor']}), "
                f"{_fmt(t['ratio_to_peer'], '.3f')} x {t['peer']}"
            )
    return "\n".join(lines)
