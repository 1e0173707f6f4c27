"""Write the README's configuration table from etc/config.yaml.

`python scripts/config_table.py` rewrites the part of README.md between the
config-table markers; tests/test_config.py checks the two agree.
"""

import argparse
from pathlib import Path

from speechclas.config import load_param_specs

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def _format_value(value) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def config_table(config_path: Path | None = None) -> str:
    rows = ["| parameter | group | type | default | allowed | meaning |", "|---|---|---|---|---|---|"]
    for spec in load_param_specs(config_path).values():
        if spec.choices:
            allowed = ", ".join(str(choice) for choice in spec.choices)
        elif spec.range:
            allowed = f"{spec.range[0]} to {spec.range[1]}"
        else:
            allowed = ""
        help_text = spec.help.replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{spec.name}` | {spec.group} | {spec.type} | `{_format_value(spec.default)}` | {allowed} | {help_text} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args()
    text = args.readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    args.readme.write_text(text[:start] + "\n" + config_table() + "\n" + text[end:])


if __name__ == "__main__":
    main()
