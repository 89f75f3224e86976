"""Fill the ${VITOK_*} placeholders of an infra/ manifest from the environment and print the result.

    python infra/render.py infra/kuberay/raycluster.yaml | kubectl apply -f -
    python infra/render.py infra/launcher/aws-gpu.yaml > /tmp/vitok-aws.yaml && ray up -y /tmp/vitok-aws.yaml

Only ${VITOK_*} placeholders are replaced (never $RAY_HEAD_IP or other shell variables the manifests
pass through), and a placeholder whose variable is unset or empty is an error, so a manifest never goes out
half-filled. The variables are listed in infra/README.md. They name places (registry, buckets, roles),
never credentials: those come from IRSA / instance profiles at run time. Standard library only.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

PLACEHOLDER = re.compile(r"\$\{(VITOK_[A-Z0-9_]+)\}")


def placeholders(text: str) -> set[str]:
    """The VITOK_* variable names a manifest uses."""
    return set(PLACEHOLDER.findall(text))


def render(text: str, env: Mapping[str, str]) -> str:
    """`text` with every ${VITOK_*} replaced from `env`; KeyError names the variables that are missing."""
    missing = sorted(name for name in placeholders(text) if not env.get(name))
    if missing:
        raise KeyError(f"unset: {', '.join(missing)} (see infra/README.md)")
    return PLACEHOLDER.sub(lambda m: env[m.group(1)], text)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        text = f.read()
    try:
        sys.stdout.write(render(text, os.environ))
    except KeyError as err:
        print(f"{argv[0]}: {err.args[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
