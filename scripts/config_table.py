"""Write the README's two generated tables: training parameters and operator settings.

`python scripts/config_table.py` rewrites the parts of README.md between the
config-table markers (from etc/config.yaml) and the operator-table markers
(from speechclas.limits.SETTINGS); tests check that README agrees with both.
"""

import argparse
from pathlib import Path

from speechclas.config import load_param_specs
from speechclas.limits import SETTINGS

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"
OPERATOR_BEGIN = "<!-- operator-table:begin -->"
OPERATOR_END = "<!-- operator-table:end -->"


def _format_value(value) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "\"\""
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


def operator_table() -> str:
    rows = ["| environment variable | default | what it bounds |", "|---|---|---|"]
    for setting in SETTINGS:
        default = _format_value(setting.default)
        bounds = setting.bounds.replace("|", "\\|")
        rows.append(f"| `{setting.env}` | `{default}` | {bounds} |")
    return "\n".join(rows)


def replace_between(text: str, begin: str, end: str, table: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + table + "\n" + text[stop:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args()
    text = replace_between(args.readme.read_text(), BEGIN, END, config_table())
    text = replace_between(text, OPERATOR_BEGIN, OPERATOR_END, operator_table())
    args.readme.write_text(text)


if __name__ == "__main__":
    main()
