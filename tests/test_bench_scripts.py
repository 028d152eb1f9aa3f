"""Every script of bench/ still imports: a name it takes from the engine that was renamed or
removed breaks it here, not in the next person's benchmark run (mypy does not read bench/)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# bench/peers/ holds the peers' runtimes (bench/peers/requirements.txt, not installed by make test);
# its command-line bench needs none of them
SCRIPTS = [*sorted(BENCH.glob("*.py")), BENCH / "peers" / "cli.py", BENCH / "peers" / "corpus.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(BENCH)) for s in SCRIPTS])
def test_the_script_imports(script: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_check_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (a dataclass of the script looks its module up)
    try:
        spec.loader.exec_module(module)  # runs its imports; its main() only under __main__
    finally:
        del sys.modules[spec.name]
    assert module.__file__ == str(script)
