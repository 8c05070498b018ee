"""pytest options and hooks of the benchmark suite.

    pytest benchmarks                      # the set for this machine (gpu if CUDA, else cpu-bf16 or cpu)
    pytest benchmarks --bench-set tiny     # seconds; with --benchmark-disable, what make test runs

Every run writes benchmarks/results/<device>.json (or --bench-results PATH)
and prints a compact table at the end.
"""

import os

import pytest

from bench_cases import BENCH_SETS, bench_device, default_set_name
from bench_report import Results, device_name, device_slug, environment, table

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pytest_addoption(parser):
    group = parser.getgroup("featadapt benchmarks")
    group.addoption("--bench-set", choices=sorted(BENCH_SETS), default=None,
                    help="which cases to run (default: gpu when CUDA is available, else cpu-bf16 on "
                         "CPUs with native bfloat16 instructions, else cpu)")
    group.addoption("--bench-results", default=None,
                    help="results file to write (default: benchmarks/results/<device>.json)")


def bench_set_name(config):
    return config.getoption("--bench-set") or default_set_name()


@pytest.fixture(scope="session")
def bench_set(request):
    return BENCH_SETS[bench_set_name(request.config)]


@pytest.fixture(scope="session")
def bench_results(request):
    return request.config._featadapt_results


def pytest_configure(config):
    config._featadapt_results = Results()


def pytest_generate_tests(metafunc):
    # The parametrisation depends on --bench-set; each test module says how.
    generate = getattr(metafunc.module, "generate_cases", None)
    if generate is not None:
        generate(metafunc, BENCH_SETS[bench_set_name(metafunc.config)])


def pytest_sessionfinish(session, exitstatus):
    results = session.config._featadapt_results
    if not results.layers and not results.end_to_end:
        return
    device = bench_device()
    targets = results.finish(device, BENCH_SETS[bench_set_name(session.config)].rank)
    path = session.config.getoption("--bench-results") or os.path.join(
        RESULTS_DIR, device_slug(device_name(device)) + ".json"
    )
    results.write(path, environment(device, bench_set_name(session.config)), targets)
    session.config._featadapt_summary = table(results, targets) + f"\n\nresults written to {path}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = getattr(config, "_featadapt_summary", None)
    if summary:
        terminalreporter.write_sep("=", "featadapt benchmark summary")
        terminalreporter.write_line(summary)
