"""Google's CEL runtime (cel-expr-python) over JSON Lines: the reference for `bindpolicy decide --jsonl`.

The rules that apply to an official bind under policy v2, each as `applies_when && fires_when`,
compiled once; then, per line: stdlib `json.loads`, one activation, every rule evaluated (an error counts as
fired, as bindpolicy fails closed), stdlib `json.dumps` of the fired ids, one line out.

Run: .venv/bin/python bench/peers/cel_expr_lines.py REQUESTS.jsonl > answers.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rules() -> tuple[list[tuple[str, str]], dict[str, object]]:
    """(id, CEL text) of each rule of an official bind under v2, and v2's parameters."""
    from engine.loader import load_policies

    version = load_policies(ROOT / "policies").get("v2")
    assert version is not None
    texts = [(r.id, r.fires_when.text if r.applies_when is None
              else f"({r.applies_when.text}) && ({r.fires_when.text})") for r in version.rules_for("bind", "official")]
    return texts, dict(version.native_parameters)


def main() -> None:
    from cel_expr_python import cel

    texts, params = rules()
    env = cel.NewEnv(variables={name: cel.Type.DYN for name in ("shop", "account", "invitation", "params")}
                     | {"action": cel.Type.STRING, "role": cel.Type.STRING})
    compiled = [(rule_id, env.compile(text)) for rule_id, text in texts]
    out = sys.stdout
    with open(sys.argv[1], encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            request["params"] = params
            activation = env.Activation(request)  # the request converted once, for every rule
            fired = []
            for rule_id, expression in compiled:
                try:
                    if expression.eval(activation).value() is not False:
                        fired.append(rule_id)
                except Exception:  # an evaluation error: fails closed, as bindpolicy does
                    fired.append(rule_id)
            out.write(json.dumps({"fired": fired}) + "\n")


if __name__ == "__main__":
    main()
