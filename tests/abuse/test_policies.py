"""Bad policy files and unlucky deploys (issue 8, items 3, 11, 14, 17): the service keeps serving
a whole, known set, says which, and never loses a version by accident."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from engine.decider import Engine
from engine.decisionlog import open_store
from engine.errors import PolicyLoadError
from engine.loader import load_policies
from engine.sources import ArchiveSource

from ..conftest import NOW, POLICIES, bind_request, make_app

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


def app_on(tmp_path: Path, policies: Path, data: str = "data") -> Flask:
    return make_app(tmp_path, f"sqlite:///{tmp_path / 'log.db'}", POLICY_DIR=str(policies),
                    DATA_DIR=str(tmp_path / data))


def young() -> dict[str, Any]:
    request = bind_request()
    request["account"]["age"] = 17  # type: ignore[index]
    return request


# Item 11: aliases are refused where they stand, before they can expand.
def test_a_yaml_alias_bomb_is_refused_at_once(policy_copy: Path) -> None:
    (policy_copy / "v1" / "zz_bomb.yaml").write_text(BOMB)
    started = time.process_time()
    with pytest.raises(PolicyLoadError) as caught:
        load_policies(policy_copy)
    assert time.process_time() - started < 10  # the whole set, not the bomb (which never expands)
    problems = [p for p in caught.value.problems if p.code == "yaml_alias"]
    assert [(p.location.file, p.location.line) for p in problems] == [("v1/zz_bomb.yaml", 2)]


# Item 3: a worker that starts on broken files serves the last good set, and says so.
def test_a_worker_starting_on_broken_files_serves_the_last_good_set(tmp_path: Path, policy_copy: Path) -> None:
    first = app_on(tmp_path, policy_copy).test_client()
    good = first.post("/v1/decisions", json=young()).json
    with open(policy_copy / "v2" / "bind.yaml", "a") as broken:
        broken.write("  - id: [\n")
    second = app_on(tmp_path, policy_copy).test_client()  # a new worker, same log
    again = second.post("/v1/decisions", json=young()).json
    assert again["policy"] == good["policy"] and again["rule"] == good["rule"]
    ready = second.get("/readyz")
    assert ready.status_code == 200 and "archive" in ready.json["policies_from"]
    assert "v2/bind.yaml" in ready.json["last_reload"]["error"]
    assert "bindpolicy_policy_from_archive 1.0" in second.get("/metrics").data.decode()


def test_with_no_good_set_ever_kept_broken_files_do_not_start(tmp_path: Path, policy_copy: Path) -> None:
    with open(policy_copy / "v2" / "bind.yaml", "a") as broken:
        broken.write("  - id: [\n")
    with pytest.raises(PolicyLoadError):
        app_on(tmp_path, policy_copy)


def test_once_the_files_are_mended_they_serve_again(tmp_path: Path, policy_copy: Path) -> None:
    app_on(tmp_path, policy_copy)
    path = policy_copy / "v1" / "bind.yaml"
    original = path.read_text()
    path.write_text(original + "  - id: [\n")
    app = app_on(tmp_path, policy_copy)
    path.write_text(original.replace("must be at least", "needs to be at least"))
    service = app.extensions["bindpolicy"]
    assert service.holder.reload_if_changed()
    client = app.test_client()
    assert "needs to be at least" in client.post("/v1/decisions", json=young()).json["rule"]["message"]
    assert "policies_from" not in client.get("/readyz").json
    assert "bindpolicy_policy_from_archive 0.0" in client.get("/metrics").data.decode()


# Item 14: a reload never drops a version unless the set retires it; deploys swap a symlink.
def test_a_reload_that_drops_a_version_is_refused_unless_retired(tmp_path: Path, policy_copy: Path) -> None:
    app = app_on(tmp_path, policy_copy)
    holder = app.extensions["bindpolicy"].holder
    (policy_copy / "v2" / "version.yaml").unlink()
    shutil.rmtree(policy_copy / "v2")
    assert not holder.reload_if_changed()
    assert [v.name for v in holder.engine.policies] == ["v1", "v2"]
    ready = app.test_client().get("/readyz").json
    assert "version v2 served and is missing" in ready["last_reload"]["error"]
    (policy_copy / "retired.yaml").write_text("retired: [v2]\n")
    assert holder.reload_if_changed()
    assert [v.name for v in holder.engine.policies] == ["v1"]


@pytest.mark.parametrize("last_good", ["digest and versions", "digest only (older services)"])
def test_a_version_removed_while_stopped_is_refused_at_the_next_start(tmp_path: Path, policy_copy: Path,
                                                                      last_good: str) -> None:
    app_on(tmp_path, policy_copy)  # served v1 and v2
    if last_good.startswith("digest only"):
        path = tmp_path / "data" / "last-good-policies"
        path.write_text(path.read_text().splitlines()[0] + "\n")
    shutil.rmtree(policy_copy / "v2")  # while the service is stopped
    client = app_on(tmp_path, policy_copy).test_client()
    assert [v["version"] for v in client.get("/v1/policies").json["versions"]] == ["v1", "v2"]
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "archive" in ready.json["policies_from"]
    assert "version v2 served and is missing" in ready.json["last_reload"]["error"]
    assert "retired.yaml" in ready.json["last_reload"]["error"]
    assert "bindpolicy_policy_from_archive 1.0" in client.get("/metrics").data.decode()
    (policy_copy / "retired.yaml").write_text("retired: [v2]\n")
    client = app_on(tmp_path, policy_copy).test_client()  # retired: the files serve, without v2
    assert [v["version"] for v in client.get("/v1/policies").json["versions"]] == ["v1"]
    assert "policies_from" not in client.get("/readyz").json
    (policy_copy / "retired.yaml").unlink()  # v2 is gone from the last good set now: no longer missed
    client = app_on(tmp_path, policy_copy).test_client()
    assert "policies_from" not in client.get("/readyz").json


def test_a_deploy_through_a_swapped_symlink_is_seen_even_with_the_same_sizes_and_times(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    shutil.copytree(POLICIES, releases / "one", copy_function=shutil.copy2)
    shutil.copytree(POLICIES, releases / "two", copy_function=shutil.copy2)
    bind = releases / "two" / "v1" / "bind.yaml"
    stat = bind.stat()
    bind.write_text(bind.read_text().replace("must be at least", "must be AT LEAST"))  # same size
    os.utime(bind, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and same time
    live = tmp_path / "policies"
    live.symlink_to(releases / "one")
    app = app_on(tmp_path, live)
    holder = app.extensions["bindpolicy"].holder
    swap = tmp_path / "policies.new"
    swap.symlink_to(releases / "two")
    swap.replace(live)  # rename(2): atomic
    assert holder.reload_if_changed()
    assert "AT LEAST" in app.test_client().post("/v1/decisions", json=young()).json["rule"]["message"]


# Item 17: under reloads, every answer is what the files of its own digest say.
@pytest.mark.slow
def test_every_answer_during_reloads_matches_the_files_of_its_digest(tmp_path: Path, policy_copy: Path) -> None:
    app = app_on(tmp_path, policy_copy)
    holder = app.extensions["bindpolicy"].holder
    client = app.test_client()
    bind = policy_copy / "v1" / "bind.yaml"
    original = bind.read_text()
    variants = [original,
                "# moved down\n" * 7 + original.replace("must be at least", "has to be at least"),
                "# moved\n" * 3 + original.replace("must be at least", "shall be at least")]
    answers: list[dict[str, Any]] = []
    stop = threading.Event()

    def judge() -> None:
        while not stop.is_set():
            answers.append(client.post("/v1/decisions", json=young()).json)

    threads = [threading.Thread(target=judge) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(6):
            bind.write_text(variants[(round_ + 1) % len(variants)])
            holder.reload_if_changed()
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    store = open_store(f"sqlite:///{tmp_path / 'log.db'}")
    expected: dict[str, Any] = {}
    for answer in answers:
        digest = answer["policy"]["digest"]
        if digest not in expected:  # decided again by the set its digest names, from the archive
            engine = Engine(load_policies(ArchiveSource(store, digest)))
            expected[digest] = engine.decide(young(), now=NOW).to_dict()["rule"]
        assert answer["rule"] == expected[digest], (answer["rule"], expected[digest])
    assert len(expected) >= 3 and len(answers) > 20
    sources = {expected[d]["source"] for d in expected}
    assert len(sources) == 3  # the rule moved between the sets: a line from the wrong set would show
