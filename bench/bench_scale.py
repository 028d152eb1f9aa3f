"""How cost grows with the number of rules: load-and-check time, and decision time against the
number of rules that apply versus the number that exist.

Run: .venv/bin/python bench/bench_scale.py   (synthetic policy sets, written to a temp folder)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_decide import NOW, measure, realistic_bind  # noqa: E402
from engine.decider import Engine  # noqa: E402
from engine.loader import load_policies  # noqa: E402

OTHER_ACTIONS = ("unbind", "create_org_account", "upgrade_start", "upgrade_confirm", "upgrade_cancel",
                 "enable_affiliate", "login")
# Rule shapes seen in the real policies, each with its own threshold so that no two texts are equal.
SHAPES = (
    ("account.type == 'personal'", "account.age < {k}"),
    (None, "account.followers < {k} && account.location != shop.market"),
    (None, "size(account.name) >= {k} || account.name == shop.name + '{k}'"),
    (None, "shop.channel_unbinds.filter(t, at - t < duration('{k}h')).size() >= 10"),
    ("account.type == 'organization'", "account.bind_history.filter(h, h.shop_id == shop.id).size() >= {k}"),
    (None, "has(account.upgrade) && account.upgrade.state == 'trial' && account.upgrade.shop_id != 'x{k}'"),
)


def write_policy(folder: Path, applying: int, total: int) -> None:
    """`applying` rules for bind (no role restriction), the rest spread over the other actions."""
    (folder / "v1").mkdir(parents=True)
    (folder / "v1" / "version.yaml").write_text(
        'version: v1\neffective_from: "2024-01-01T00:00:00Z"\ndescription: synthetic\n')
    lines = ["rules:"]
    for index in range(total):
        applies, fires = SHAPES[index % len(SHAPES)]
        action = "bind" if index < applying else OTHER_ACTIONS[index % len(OTHER_ACTIONS)]
        k = 1000 + index
        lines += [f"  - id: synthetic.rule-{index}", f"    actions: [{action}]", "    effect: deny",
                  f'    fires_when: "{fires.format(k=k)}"', "    message: synthetic", "    source: synthetic"]
        if applies:
            lines.append(f'    applies_when: "{applies}"')
    (folder / "v1" / "rules.yaml").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="decisions per measurement")
    args = parser.parse_args()
    request = realistic_bind()
    request.pop("policy_version", None)
    print("| rules in the set | rules that apply | load + check s | decision median µs | µs per applying rule |")
    print("|---:|---:|---:|---:|---:|")
    for applying, total in ((40, 40), (40, 400), (40, 4000), (400, 400), (4000, 4000)):
        with tempfile.TemporaryDirectory() as temp:
            write_policy(Path(temp), applying, total)
            start = time.perf_counter()
            engine = Engine(load_policies(temp))
            loaded = time.perf_counter() - start
            median, _ = measure(lambda engine=engine: engine.decide(request, now=NOW), args.n)
            print(f"| {total} | {applying} | {loaded:.2f} | {median:.0f} | {median / applying:.2f} |")


if __name__ == "__main__":
    main()
