"""Tests marked ``runtime`` run in a child pytest process, one per test module, never in the process that runs
the training tests.

Why: the deployment runtimes (OpenVINO, ExecuTorch, LiteRT, ncnn, TFLite Micro) load native libraries of their
own (thread pools, allocators, operator registries) that stay loaded for the life of the process, and a crash in
one of them must fail its tests, not end the test run. The parent collects and selects as usual; at the first
``runtime`` item of a module it runs every selected ``runtime`` item of that module in one child
(``python -m pytest NODEIDS`` without xdist), then replays the child's reports as its own, so ``-k``, ``-x``,
xdist and the summary work as for any other test; under xdist the child runs once per module, whichever worker
reaches the module first, and another worker that reaches it reads its results (with ``--dist loadfile``, the
README's command, one worker runs the whole module). A child that dies is one failed report per
test it did not finish, quoting the end of its output. ``MICRONET_TEST_CHILD`` names the child's report file;
inside the child the marker changes nothing. The conftest imports these hooks and calls ``configure``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CHILD_ENV = "MICRONET_TEST_CHILD"
_NODEID = pytest.StashKey[str]()  # an item's node id as the child names it
CHILD_TIMEOUT_S = 2400  # a safety net for a hung runtime, far above a slow machine's module time
_RESULTS = pytest.StashKey[dict]()


def in_child() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def _isolated(item: pytest.Item) -> bool:
    return not in_child() and item.get_closest_marker("runtime") is not None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Remember each ``runtime`` item's node id as the child will know it."""
    if _isolated(item):
        item.stash[_NODEID] = item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The isolated modules first (a stable sort, so each module's items stay together): under xdist's
    ``--dist loadfile`` each module is one unit of work on one worker, the isolated ones are the long units, and
    long units started first leave the short ones to fill both workers at the end."""
    items.sort(key=lambda item: not _isolated(item))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember which selected items of each module the child will run."""
    groups: dict[Path, list[str]] = {}
    for item in session.items:
        if _isolated(item):
            groups.setdefault(item.path, []).append(item.stash[_NODEID])
    session.config.stash[_RESULTS] = {"groups": groups, "done": {}}


def _run_child(config: pytest.Config, path: Path, nodeids: list[str]) -> dict[str, list[dict]]:
    """Run ``nodeids`` in a child pytest; its serialized reports by node id (missing ids: it died first)."""
    with tempfile.TemporaryDirectory(prefix="micronet-child-") as tmp:
        report = Path(tmp) / "reports.json"
        env = dict(os.environ, **{CHILD_ENV: str(report)})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "--no-header"]
        cmd += ["-o", "addopts=", "--basetemp", str(Path(tmp) / "basetemp"), *nodeids]
        try:
            proc = subprocess.run(
                cmd, cwd=config.rootpath, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
            )
            tail = (proc.stdout + proc.stderr)[-3000:]
            why = f"the child pytest for {path.name} ended with exit code {proc.returncode} before this test finished"
        except subprocess.TimeoutExpired as err:
            tail = str(err.stdout or "")[-3000:]
            why = f"the child pytest for {path.name} ran past {CHILD_TIMEOUT_S} s"
        reports: dict[str, list[dict]] = {}
        if report.is_file():
            for line in report.read_text().splitlines():
                data = json.loads(line)
                reports.setdefault(data["nodeid"], []).append(data)
        for nodeid in nodeids:
            if not any(d["when"] == "teardown" for d in reports.get(nodeid, [])):
                reports.setdefault(nodeid, []).append({"__died__": f"{why}; its output ends:\n{tail}"})
        return reports


def _module_results(config: pytest.Config, path: Path, nodeids: list[str]) -> dict[str, list[dict]]:
    """The child's reports for a module, run once per test run: under xdist the first worker to reach the module
    runs the child while holding a lock in the run's shared home; a worker that comes later reads its results."""
    home = Path(os.environ.get("MICRONET_TEST_HOME") or tempfile.gettempdir())
    key = hashlib.sha256(f"{path}\0{nodeids}".encode()).hexdigest()[:16]
    results = home / f"isolation-{path.stem}-{key}.json"
    with open(home / f"isolation-{path.stem}-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if results.is_file():
            return json.loads(results.read_text())
        reports = _run_child(config, path, nodeids)
        partial = results.with_suffix(".part")
        partial.write_text(json.dumps(reports))
        partial.replace(results)
        return reports


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not _isolated(item):
        return None
    state = item.config.stash[_RESULTS]
    if item.path not in state["done"]:
        state["done"][item.path] = _module_results(item.config, item.path, state["groups"][item.path])
    # what the items before this one set up (module, class fixtures) is torn down as pytest's own protocol would
    # between this item and the next: this item sets nothing up in this process
    item.session._setupstate.teardown_exact(nextitem)
    hook = item.ihook
    hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for data in state["done"][item.path][item.stash[_NODEID]]:
        if "__died__" in data:
            rep = pytest.TestReport(item.nodeid, item.location, {}, "failed", data["__died__"], "call")
        else:
            rep = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
            rep.nodeid = item.nodeid  # the child's id, as this process names the item
            if rep.skipped and isinstance(rep.longrepr, list):  # (path, line, reason), as a skip is reported
                rep.longrepr = tuple(rep.longrepr)
        hook.pytest_runtest_logreport(report=rep)
    hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


_child_config: list[pytest.Config] = []


def configure(config: pytest.Config) -> None:
    """Called from the conftest's ``pytest_configure``: the child's reports are serialized with its config."""
    if in_child():
        _child_config[:] = [config]


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the child: append every report to the parent's file as it comes (a crash keeps what came before)."""
    if not in_child():
        return
    config = _child_config[0]
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    with open(os.environ[CHILD_ENV], "a") as fh:
        fh.write(json.dumps(data) + "\n")
